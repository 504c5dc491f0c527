"""CLI verbs over the whole loop: ``driftloop lineage`` and ``driftloop demo [--fleet]``."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any

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


DEMO_DIR = Path(".driftloop/demo")


def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its workspace (wiped at start).")] = DEMO_DIR,
    rows: Annotated[int, typer.Option(min=2000, help="Rows in the scenario.")] = 12_000,
    interval: Annotated[float, typer.Option(min=0.2, help="Rollout check interval (seconds).")] = 1.0,
    fleet: Annotated[bool, typer.Option("--fleet", help="A fleet of three models on one gateway and one monitor: "
                                                        "drift hits one, only that one retrains and rolls out "
                                                        "(workdir default .driftloop/demo-fleet).")] = False,
) -> None:
    """Run the whole loop on the embedded default: train, serve, drift, retrain, canary, promote / roll back."""
    from driftloop.app.demo import Demo
    from driftloop.app.demo_report import console

    if fleet:
        from driftloop.app.demo_fleet import FleetDemo

        if workdir == DEMO_DIR:
            workdir = Path(".driftloop/demo-fleet")
        demo: Any = FleetDemo(workdir.resolve(), rows=min(rows, 8_000), interval=interval)
    else:
        demo = Demo(workdir.resolve(), rows=rows, interval=interval)
    # SIGTERM (e.g. from `timeout`) stops the demo like Ctrl-C: its services are stopped on the way out;
    # SIGKILL cannot be caught, and then every process the demo started dies with it (processes.spawn).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        demo.run()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: everything the demo started has been stopped; rerun to start clean")
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    app.command("lineage")(lineage_cmd)
    app.command("demo")(demo_cmd)
