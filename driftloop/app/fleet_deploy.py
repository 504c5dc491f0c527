"""A fleet on a cluster: ``driftloop deploy -c FLEET [--dry-run | --apply]`` (docs/fleet.md, "On a cluster").

Every model of the fleet gets its own InferenceService (:func:`serving.inference_service.build_inference_service`
on the model's settings): its own name, its team's namespace and its logger to its own path on the fleet's
one monitor (the defaults :mod:`driftloop.core.fleet` gives a model). ``--dry-run`` (the default) prints them
all as one multi-document YAML; ``--apply`` applies each through :class:`serving.kserve_backend.KServeBackend`
with the model's own kube context (``serving.kube_context``; None: the kubeconfig's current one), one line
per model as it goes. A model whose apply fails -- its namespace missing, RBAC forbidding it, its team's
quota exceeded, admission refusing it, its cluster unreachable -- is its own line and never stops the
others; the command exits 1 when any failed.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.markup import escape

from driftloop.app.fleet_cli import fleet_from
from driftloop.core.console import console, err_console
from driftloop.core.errors import ConfigError, ServingError
from driftloop.core.fleet import Fleet, FleetModel

__all__ = ["apply_model", "deploy_fleet", "render_fleet"]

# what urllib3 puts before the reason of a connection that failed ("<…HTTPSConnection object at 0x…>: ",
# "HTTPSConnection(host='127.0.0.1', port=6443): "); the line names the server once, in front
_OBJECT = re.compile(r"(<[^>]* object at 0x[0-9a-f]+>|\w+Connection\([^)]*\)):\s*")


def deploy_fleet(config: Path | str | None, params: list[str] | None, *, apply: bool, version: str | None = None,
                 canary_percent: int | None = None) -> None:
    """``deploy`` without ``--model``: every model of a fleet file; a one-model file returns at once (the
    one-model command goes on). Exits 1 (``typer.Exit``) when any model's apply failed."""
    fleet = fleet_from(config, params)
    if fleet.single:
        return
    for flag, value in (("--version", version), ("--canary-percent", canary_percent)):
        if value is not None:
            raise ConfigError(f"{flag} acts on one model of {fleet.source}: pass --model NAME "
                              f"(models: {', '.join(fleet.names)})")
    if not apply:
        console.print(render_fleet(fleet), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(0)
    failed = []
    for m in fleet.models:
        where = f"{m.settings.serving.namespace}/{m.settings.serving.name}"
        error = apply_model(m)
        if error is None:
            console.print(f"[green]✓[/] {escape(m.name)} {escape(where)} applied", soft_wrap=True)
        else:
            failed.append(m.name)
            console.print(f"[red]✗[/] {escape(m.name)} {escape(where)}: {escape(error)}", soft_wrap=True)
    if failed:
        err_console.print(f"[red]{len(failed)} of {len(fleet.models)} models not applied[/]: {', '.join(failed)}")
        raise typer.Exit(1)
    raise typer.Exit(0)


def render_fleet(fleet: Fleet) -> str:
    """Every model's InferenceService, as one multi-document YAML in file order."""
    from serving.inference_service import build_inference_service, to_yaml

    return "---\n".join(to_yaml(build_inference_service(m.settings)) for m in fleet.models)


def apply_model(model: FleetModel) -> str | None:
    """Create or replace the model's InferenceService on its own kube context; None, or why not (one line)."""
    from serving.inference_service import build_inference_service
    from serving.kserve_backend import KServeBackend

    backend = KServeBackend(model.settings)
    try:
        backend.apply(build_inference_service(model.settings))
    except ServingError as exc:
        return _unreachable(exc, model.settings.serving.kube_context) or " ".join(str(exc).split())
    return None


def _unreachable(exc: BaseException, context: str | None) -> str | None:
    """``cluster <context> unreachable: <host>: <reason>`` when the API server was never reached (connection
    refused, no route, TLS, no answer in time); None when it answered (its answer says what went wrong)."""
    from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError, SSLError, TimeoutError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (MaxRetryError, NewConnectionError, ProtocolError, SSLError, TimeoutError)):
            reason = getattr(seen, "reason", None) or seen
            pool = getattr(seen, "pool", None)
            host = f"{pool.scheme}://{pool.host}:{pool.port}: " if getattr(pool, "host", None) else ""
            text = " ".join(_OBJECT.sub("", str(reason)).split())
            return f"cluster {context or '(current context)'} unreachable: {host}{text}"
        seen = seen.__cause__ or seen.__context__
    return None
