"""``driftloop infra check``: the manifest check of ``driftloop.app.infra_check`` on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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


def register(app: typer.Typer) -> None:
    app.add_typer(infra_app, name="infra")
