"""``driftloop infra``: the manifest check of ``driftloop.app.infra_check`` (``check``) and the agent's
guardrails rendered for OPA Gatekeeper (``gatekeeper``) on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from driftloop.core.console import ConfigOpt, ParamOpt

__all__ = ["register", "infra_app"]

infra_app = typer.Typer(help="Kubernetes manifests in infra/ (kustomize base and overlays).", no_args_is_help=True)


@infra_app.command("check")
def infra_check(
    root: Annotated[Path, typer.Option("--root", help="Repository root that holds infra/.")] = Path("."),
) -> None:
    """Build every overlay with kustomize and validate what comes out; exit 1 on any problem."""
    from driftloop.core.console import console, err_console
    from driftloop.app.infra_check import check_tree, kustomize_targets

    problems = check_tree(root)
    for problem in problems:
        err_console.print(f"[red]problem[/] {problem}", soft_wrap=True)
    if problems:
        err_console.print(f"infra check: {len(problems)} problem(s)")
        raise typer.Exit(1)
    built = ", ".join(str(t.relative_to(root / "infra")) for t in kustomize_targets(root / "infra"))
    console.print(f"[green]infra check passed[/]: {built} built with kustomize and valid")


@infra_app.command("gatekeeper")
def infra_gatekeeper(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    agent_namespace: Annotated[Optional[str], typer.Option(
        "--agent-namespace", help="Namespace of the agent's ServiceAccount where it is not each object's own "
                                  "(a fleet's agent in driftloop acting in the teams' namespaces).")] = None,
    service_account: Annotated[Optional[str], typer.Option(
        "--service-account", help="The agent's ServiceAccount name (default: driftloop-agent).")] = None,
) -> None:
    """Print the agent's guardrails as an OPA Gatekeeper ConstraintTemplate and Constraint, a YAML stream for
    kubectl apply -f -: a one-model file's policy, or each model's of a fleet file by its InferenceService."""
    from driftloop.core.fleet import load_fleet
    from serving.admission import constraint_template, policies_of

    account = {"service_account": service_account} if service_account else {}
    docs = constraint_template(policies_of(load_fleet(config, list(params or []))), agent_namespace=agent_namespace,
                               **account)
    # plain text: rich would fold long lines, and the YAML would no longer parse
    typer.echo(yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False, width=1 << 16), nl=False)


class _BlockDumper(yaml.SafeDumper):
    """Safe YAML with every multi-line string (the Rego) as a literal block, as one would write it by hand, and
    no anchors (an object used twice is written twice)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def register(app: typer.Typer) -> None:
    app.add_typer(infra_app, name="infra")
