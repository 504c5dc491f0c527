"""CLI verbs over the whole loop: ``driftloop lineage`` and ``driftloop demo``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

__all__ = ["register"]


def lineage_cmd(
    model: Annotated[str, typer.Argument(help="model, model@alias or model/version (of a fleet file: the fleet's "
                                              "model)")],
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    params: Annotated[list[str] | None, typer.Option("--param", "-p", help="Override a config key.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a tree.")] = False,
) -> None:
    """Show the chain: trigger → pipeline run → data window → metrics and gate → rollout."""
    from driftloop.app.fleet_cli import model_name
    from driftloop.app.lineage import build_lineage, render_lineage
    from driftloop.core.console import console, settings_from

    settings = settings_from(config, params, model=model_name(model, config, params))
    lineage = build_lineage(settings, model)
    if as_json:
        console.print_json(json.dumps(lineage.to_dict(), default=str))
    else:
        console.print(render_lineage(lineage))


def register(app: typer.Typer) -> None:
    app.command("lineage")(lineage_cmd)
    try:
        from driftloop.app.demo import demo_cmd
    except ImportError:
        return
    app.command("demo")(demo_cmd)
