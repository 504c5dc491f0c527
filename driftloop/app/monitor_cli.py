"""CLI verbs of the monitoring capability: ``driftloop monitor``, ``driftloop drift check``, ``driftloop alerts``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import pandas as pd
import typer
from rich.table import Table

from driftloop.core.console import ConfigOpt, ModelOpt, ParamOpt
from driftloop.core.errors import MonitorError

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["infer_columns", "register"]

log = logging.getLogger(__name__)

drift_app = typer.Typer(help="One-off drift reports with Evidently.", no_args_is_help=True)


def monitor_cmd(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default monitor.host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default monitor.port).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="A fleet's check workers: threads running the models' "
                                                     "checks when due.")] = 2,
) -> None:
    """Run the monitor: inference-log sink, periodic drift checks, metrics, alerts and the retraining trigger.

    On a fleet file: one monitor for every model (or the one --model names), each under /models/NAME."""
    import os

    from driftloop.core.console import console, settings_from
    from driftloop.core.files import private_umask
    from driftloop.core.fleet import load_fleet
    from driftloop.core.workspace import tighten_workspace
    from monitoring.service import WEBHOOK_TOKEN_ENV, MonitorService, ingest_token_path
    from monitoring.sink import INGEST_TOKEN_ENV
    from pipelines.training import training_runner_for

    private_umask()  # inference log, alert store, reports, their -wal/-shm: owner-only from the start
    fleet = load_fleet(config, list(params or []))
    if fleet.single:
        settings = settings_from(config, params, model=model)
    else:
        chosen = fleet.select(model)
        for m in chosen:
            tighten_workspace(m.settings.workspace_dir)
        settings = chosen[0].settings
    bind_host = host or settings.monitor.host
    bind_port = settings.monitor.port if port is None else port
    where = "" if os.environ.get(INGEST_TOKEN_ENV) else None
    if fleet.single:
        service = MonitorService(settings, runner_factory=training_runner_for)
        console.print(f"[bold]driftloop monitor[/] on http://{bind_host}:{bind_port}{settings.monitor.base_path} — "
                      f"POST /events, GET /metrics, GET /alerts; checks every "
                      f"{settings.monitor.check_interval_seconds:g}s")
        where = INGEST_TOKEN_ENV if where is not None else str(ingest_token_path(settings))
    else:
        from monitoring.fleet_service import FleetMonitor
        from monitoring.intake import journal_path

        service = FleetMonitor(chosen, workers=workers, runner_factory=training_runner_for,
                               intake=journal_path(fleet.workspace) if fleet.workspace is not None else None)
        console.print(f"[bold]driftloop monitor[/] of {len(chosen)} model(s) of {fleet.source} on "
                      f"http://{bind_host}:{bind_port} — POST /models/NAME/events, GET /models, GET /metrics; "
                      f"{workers} check worker(s)")
        for name, why in service.broken.items():
            console.print(f"[red]model {name}: its monitor cannot start: {why}[/]")
        where = INGEST_TOKEN_ENV if where is not None else "<model workspace>/monitor/ingest.token, one per model"
    console.print(f"POST /events and /feedback need the ingest token ({where}); /events without one: "
                  f"{'accepted (monitor.events_auth=network)' if settings.monitor.events_auth == 'network' else 'refused'}")
    if not os.environ.get(WEBHOOK_TOKEN_ENV):
        console.print(f"[yellow]{WEBHOOK_TOKEN_ENV} is not set: the Alertmanager webhook refuses every call[/]")
    service.run(host=bind_host, port=bind_port)


def infer_columns(frame: pd.DataFrame, exclude: list[str]) -> tuple[list[str], list[str]]:
    """Numeric and categorical columns of a table (time columns and ``exclude`` left out)."""
    numeric, categorical = [], []
    for col in frame.columns:
        if col in exclude or pd.api.types.is_datetime64_any_dtype(frame[col]):
            continue
        if pd.api.types.is_bool_dtype(frame[col]):
            categorical.append(col)
        elif pd.api.types.is_numeric_dtype(frame[col]):
            numeric.append(col)
        else:
            categorical.append(col)
    return numeric, categorical


def _read(path: Path) -> pd.DataFrame:
    from driftloop.core.tables import read_table

    return read_table(str(path))


@drift_app.command("check")
def drift_check_cmd(
    reference: Annotated[Path, typer.Option("--reference", help="Reference table (parquet or csv).")],
    current: Annotated[Path, typer.Option("--current", help="Current table (parquet or csv).")],
    html: Annotated[Path | None, typer.Option("--html", help="Write Evidently's HTML report here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report's JSON here.")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Column to leave out (repeatable).")] = None,
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
) -> None:
    """Compare two files with Evidently's DataDriftPreset (methods/thresholds from monitor.*)."""
    from driftloop.core.console import console, settings_from
    from monitoring.drift import DriftOptions, evidently_report

    settings = settings_from(config, params, model=model)
    ref, cur = _read(reference), _read(current)
    numeric, categorical = infer_columns(ref, list(exclude or []))
    if not numeric and not categorical:
        raise MonitorError(f"{reference} has no columns to compare")
    missing = [c for c in [*numeric, *categorical] if c not in cur.columns]
    if missing:
        raise MonitorError(f"{current} lacks column(s) {missing} of the reference {reference}")
    snapshot, result = evidently_report(ref, cur, numeric, categorical, DriftOptions.from_config(settings.monitor))
    table = Table(title=f"drift: {current.name} vs {reference.name} ({len(cur)} vs {len(ref)} rows)")
    table.add_column("column", overflow="fold")  # long column names fold in 80 columns, never cut
    for name in ("method", "score", "threshold", "drifted"):
        table.add_column(name, justify="right" if name in ("score", "threshold") else "left", no_wrap=True)
    for c in result.columns:
        table.add_row(c.column, c.method, f"{c.score:.4g}", f"{c.threshold:g}", "[red]yes[/]" if c.drifted else "no")
    console.print(table)
    verdict = "[red]dataset drift[/]" if result.dataset_drift else "[green]no dataset drift[/]"
    console.print(f"{verdict}: {len(result.drifted_columns)}/{len(result.columns)} columns drifted "
                  f"(share {result.share:.2f}, threshold {result.drift_share:g})")
    if html:
        html.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(html))
        console.print(f"HTML report -> {html}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_json(str(json_out))
        console.print(f"JSON report -> {json_out}")


def _versions_by_alert(settings: Settings) -> dict[str, str]:
    """alert id -> model version, from the MLflow tag ``driftloop.alert_id`` on model versions."""
    from driftloop.core.errors import RegistryError
    from driftloop.core.registry import TAG, Registry

    try:
        versions = Registry.from_settings(settings).list_versions(settings.mlflow.model_name)
    except RegistryError as exc:
        log.debug("model versions not readable: %s", exc)
        return {}
    return {v.tags[TAG.ALERT]: v.version for v in versions if TAG.ALERT in v.tags}


def alerts_cmd(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: ModelOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="How many recent alerts.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document (every field) for scripts.")] = False,
) -> None:
    """Recent alerts: their decision and reason, the run they started and its model version.

    An unresolved ``needs-attention`` alert (a retrain that left a degraded champion in place) is
    printed above the table; an alert that stands for an episode shows its failing windows."""
    import datetime as dt
    import json

    from driftloop.core.console import console, settings_from
    from monitoring.alerts import AlertStore, alerts_path

    settings = settings_from(config, params, model=model)
    if not alerts_path(settings).exists():
        if as_json:
            typer.echo(json.dumps({"alerts": []}))
            return
        console.print(f"no alerts yet (no alert store at {alerts_path(settings)})")
        return
    store = AlertStore.from_settings(settings)
    try:
        rows = store.recent(limit)
    finally:
        store.close()
    versions = _versions_by_alert(settings)
    for a in rows:
        a["model_version"] = a.get("model_version") or versions.get(a["id"]) or None
        a["model"] = settings.mlflow.model_name
        a["created_utc"] = dt.datetime.fromtimestamp(a["created"], dt.UTC).isoformat()
    if as_json:
        typer.echo(json.dumps({"alerts": rows}, default=str))
        return
    from rich.markup import escape

    for a in rows:
        if a["source"] == "needs-attention" and a.get("resolved") is None:
            console.print(f"[bold red]needs attention[/] ({a['id']}): {escape(a.get('reason') or '')}")
    console.print(_alerts_table(settings, rows))


def _alerts_table(settings: Settings, rows: list[dict[str, Any]]) -> Table:
    """The alerts in 80 columns, also in a pipe: each cell folds, nothing is cut. Left, the alert and when
    (UTC); in the middle, the decision and its reason; right, the pipeline run (the id that names its log
    file and that ``driftloop lineage`` shows), the model version and the run's state. ``--json`` has all."""
    import datetime as dt

    from rich import box
    from rich.markup import escape

    table = Table(title=f"alerts ({settings.workspace_dir})", box=box.ROUNDED)
    table.add_column("alert / created (UTC)", overflow="fold", max_width=26)
    table.add_column("decision / reason", overflow="fold", ratio=1, min_width=20)
    table.add_column("run / model / state", overflow="fold", max_width=18)
    for a in rows:
        created = dt.datetime.fromtimestamp(a["created"], dt.UTC).strftime("%Y-%m-%d %H:%M")
        version = a["model_version"]
        windows = f" · {a['episode_windows']} windows" if (a.get("episode_windows") or 0) > 1 else ""
        run = "\n".join(x for x in (a.get("pipeline_run_id") or a.get("request_id") or "",
                                    f"{settings.mlflow.model_name} v{version}" if version else "",
                                    a.get("run_state") or "") if x)
        table.add_row(f"{a['id']}\n{created}", f"{a.get('decision') or ''}{windows}\n[dim]{escape(a.get('reason') or '')}[/]",
                      escape(run))
        table.add_section()
    return table


def register(app: typer.Typer) -> None:
    app.command("monitor")(monitor_cmd)
    app.command("alerts")(alerts_cmd)
    app.add_typer(drift_app, name="drift")
