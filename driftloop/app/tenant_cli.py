"""``driftloop tenant add|list|remove``: render one team's loop under ``infra/tenants/``.

Nothing is applied to a cluster: ``add`` writes a kustomization a platform engineer reviews
and applies with ``kubectl apply -k``. Bad input prints one line and writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

__all__ = ["register", "tenant_app"]

tenant_app = typer.Typer(help="Tenants: one namespace, quota, GPU share, identities, MLflow space and loop per team.",
                         no_args_is_help=True)

InfraOpt = Annotated[Path, typer.Option("--infra", help="The infra/ folder the tenants are rendered into.")]


@tenant_app.command("add")
def tenant_add(
    name: Annotated[str, typer.Argument(help="Tenant name: a DNS label; also its namespace.")],
    gpu: Annotated[int, typer.Option("--gpu", help="GPUs of its own (Kueue nominalQuota).")] = 0,
    borrow: Annotated[int, typer.Option("--borrow", help="GPUs it may borrow from idle tenants of the cohort.")] = 0,
    cpu: Annotated[str, typer.Option("--cpu", help="CPU of its namespace quota and queue.")] = "16",
    memory: Annotated[str, typer.Option("--memory", help="Memory of its namespace quota and queue.")] = "64Gi",
    profile: Annotated[bool, typer.Option("--profile", help="A Kubeflow Profile instead of a plain Namespace.")] = False,
    owner: Annotated[Optional[str], typer.Option("--owner", help="Owner of the Profile (a Kubeflow user).")] = None,
    source: Annotated[str, typer.Option("--source", help="The team's training data URI (data.source).")] = "",
    pool_gpus: Annotated[Optional[int], typer.Option("--pool-gpus", help="First tenant only: the cluster's shared GPUs.")] = None,
    cohort: Annotated[Optional[str], typer.Option("--cohort", help="First tenant only: Kueue cohort for borrowing "
                                                                   "(default driftloop; '' = none, no borrowing).")] = None,
    infra: InfraOpt = Path("infra"),
) -> None:
    """Render infra/tenants/NAME/ (namespace, quota, RBAC, network policy, queue, loop, configs)."""
    from driftloop.core.console import console
    from driftloop.app.tenants import add_tenant, load_pool, load_tenants

    target = add_tenant(infra, name, gpu=gpu, borrow=borrow, cpu=cpu, memory=memory, profile=profile, owner=owner,
                        source=source, pool_gpus=pool_gpus, cohort=cohort)
    tenant = next(t for t in load_tenants(infra) if t.name == name)
    pool = load_pool(infra)
    console.print(f"[green]rendered[/] tenant {name} -> {target} (nothing applied)")
    console.print(f"GPUs: {tenant.gpu} own + {tenant.borrow} borrowable, queue {tenant.queue} -> ClusterQueue "
                  f"{tenant.cluster_queue} in cohort {pool.cohort}; local loop: {target / 'local.yaml'} "
                  f"(gateway :{tenant.gateway_port}, monitor :{tenant.monitor_port})")
    console.print("Next, on the cluster:\n"
                  f"  kubectl apply -k {infra / 'tenants' / 'shared'}   # once: the ResourceFlavor\n"
                  f"  kubectl apply -k {target}\n"
                  f"  kubectl -n {name} create secret generic driftloop-webhook --from-literal=token=\"$(openssl rand -hex 32)\"\n"
                  f"  kubectl -n {name} create secret generic driftloop-mlflow --from-literal=MLFLOW_TRACKING_TOKEN=…\n"
                  f"  driftloop compile -c {target / 'config' / 'driftloop.yaml'} -o compiled/{name}")


@tenant_app.command("list")
def tenant_list(
    infra: InfraOpt = Path("infra"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document (every field) for scripts.")] = False,
) -> None:
    """The tenants rendered under infra/tenants and how the GPU pool is shared."""
    from driftloop.core.console import console
    from driftloop.app.tenants import load_pool, load_tenants

    tenants, pool = load_tenants(infra), load_pool(infra)
    used = sum(t.gpu for t in tenants)
    if as_json:
        typer.echo(json.dumps({"infra": str(infra), "pool": asdict(pool) if pool else None, "gpus_given": used,
                               "tenants": [_tenant_doc(t, pool) for t in tenants]}))
        return
    if not tenants:
        console.print(f"no tenants in {infra / 'tenants'}")
        return
    # Fits 80 columns: the name folds (never cut), the rest is short; namespace and queue are the
    # tenant's name, and they, the model, data source and ClusterQueue are in --json.
    table = Table(title="tenants", box=box.ROUNDED)
    table.add_column("tenant", overflow="fold")
    table.add_column("GPUs\nown+borrow", no_wrap=True)
    table.add_column("CPU /\nmemory", no_wrap=True)
    table.add_column("MLflow\nspace", no_wrap=True)
    table.add_column("ports\ngw/monitor", no_wrap=True)
    for t in tenants:
        profile = f"\n[dim]Profile, owner {escape(t.owner or '-')}[/]" if t.profile else ""
        table.add_row(escape(t.name) + profile, f"{t.gpu} + {t.borrow}", f"{t.cpu} / {t.memory}",
                      _mlflow_space(t, pool).split()[0], f"{t.gateway_port}/{t.monitor_port}")
        table.add_section()
    console.print(table)
    if pool is not None:
        console.print(f"pool: {used} of {pool.gpus} GPUs given, cohort {pool.cohort}")


def _mlflow_space(t: Any, pool: Any) -> str:
    return f"workspace {t.name}" if pool and pool.mlflow_workspaces else f"experiment {t.name}"


def _tenant_doc(t: Any, pool: Any) -> dict[str, Any]:
    """Every field of one tenant, the derived names included, for ``--json``."""
    return {**asdict(t), "namespace": t.namespace, "queue": t.queue, "cluster_queue": t.cluster_queue,
            "model_name": t.model_name, "mlflow_space": _mlflow_space(t, pool), "gateway_port": t.gateway_port,
            "monitor_port": t.monitor_port}


@tenant_app.command("remove")
def tenant_remove(name: Annotated[str, typer.Argument(help="The tenant to remove.")], infra: InfraOpt = Path("infra")) -> None:
    """Delete infra/tenants/NAME/ and nothing else; on the cluster, `kubectl delete -k` it first."""
    from driftloop.core.console import console
    from driftloop.app.tenants import remove_tenant

    target = remove_tenant(infra, name)
    console.print(f"[green]removed[/] {target} (delete it from the cluster with `kubectl delete -k` before, "
                  "if it was applied)")


def register(app: typer.Typer) -> None:
    app.add_typer(tenant_app, name="tenant")
