"""``driftloop status``: one row per model of the fleet, what needs attention first (docs/fleet.md).

Each row is read from the model's own workspace by the readers the single-model commands use: the
champion from the MLflow registry (``driftloop lineage``), the canary from the rollout controller's
state (``driftloop rollout status``), open alerts and the last retrain from the monitor's alert store
(``driftloop alerts``), the last drift and quality verdicts from the history (``driftloop history``);
replicas, error rate and p99 from what serves the model, a gateway or a cluster
(:mod:`driftloop.app.status_serving`). A part that cannot be read, or a cluster that cannot be reached, is
named in its row; it never stops the other rows.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from driftloop.app.status_monitor import monitor_fields
from driftloop.app.status_serving import TIMEOUT_S, serving_cell, serving_view
from driftloop.core.config import Settings
from driftloop.core.console import ConfigOpt, ParamOpt
from driftloop.core.errors import ConfigError
from driftloop.core.fleet import FleetModel
from monitoring.model_summary import alerts_summary, iso, verdicts_summary

__all__ = ["attention", "model_row", "register", "status_cmd", "status_read", "status_rows", "status_table",
           "status_view"]

log = logging.getLogger(__name__)

#: what ``--monitor-url`` must look like (as ``monitor.url``)
MONITOR_URL = r"^https?://[^\s/]+"

# ranks of what a row needs, most urgent first (the view is sorted by them)
UNREADABLE, ALERTS, ROLLED_BACK, DEGRADED, DRIFT, CANARY, OK, UNTRAINED = range(8)


def _embedded_store_missing(settings: Settings) -> bool:
    uri = settings.tracking_uri
    return uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):])


def _registry_part(settings: Settings, row: dict[str, Any]) -> None:
    """The champion, and the newest version as the last retrain where no alert started one."""
    from driftloop.core.registry import TAG, Registry

    if _embedded_store_missing(settings):
        return
    registry = Registry.from_settings(settings)
    name = settings.mlflow.model_name
    champion = registry.version_by_alias(name, "champion")
    row["champion"] = champion.version if champion else None
    versions = registry.list_versions(name)
    if versions:
        newest = versions[-1]
        row["newest_version"] = {"version": newest.version, "trigger": newest.tags.get(TAG.TRIGGER),
                                 "gate": newest.tags.get(TAG.GATE), "rollout": newest.tags.get(TAG.ROLLOUT)}


def _rollout_part(settings: Settings, row: dict[str, Any]) -> None:
    from serving.rollout import RolloutStore

    state = RolloutStore(settings.workspace_dir / "rollout", settings.mlflow.model_name).load()
    if state is not None:
        row["rollout"] = {"status": state.status, "canary_version": state.canary_version,
                          "primary_version": state.primary_version, "weight": state.weight,
                          "reason": state.reason, "updated": iso(state.updated_at)}


def _alerts_part(settings: Settings, row: dict[str, Any]) -> None:
    """Open alerts (open drift and quality episodes, unresolved needs-attention) and the last retrain."""
    from monitoring.alerts import AlertStore, alerts_path

    if not alerts_path(settings).exists():
        return
    store = AlertStore.from_settings(settings)
    try:
        row.update(alerts_summary(store, settings.mlflow.model_name))
    finally:
        store.close()


def _history_part(settings: Settings, row: dict[str, Any]) -> None:
    """The last drift and quality verdicts the monitor recorded (the newest records, not the whole history)."""
    from driftloop.core.history import SECRET_ENV, HistoryWorkspace, history_target

    target = history_target(settings)
    workspace = HistoryWorkspace(target, secret=os.environ.get(SECRET_ENV))
    if not (workspace.remote or os.path.isdir(target)):
        return
    row.update(verdicts_summary(workspace, settings.mlflow.model_name))


#: what each part of a row reads: (name in the row's errors, reader)
PARTS: tuple[tuple[str, Callable[[Settings, dict[str, Any]], None]], ...] = (
    ("registry", _registry_part), ("rollout", _rollout_part), ("alerts", _alerts_part), ("history", _history_part))
#: the parts a monitor's API answers where a monitor URL is set (driftloop.app.status_monitor)
MONITOR_PARTS = ("alerts", "history")


def model_row(model: FleetModel, serving: dict[str, Any] | None = None,
              monitor: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model's row; a part that cannot be read is named in ``errors``, the others are still read.

    ``serving``: the model's serving fields (:func:`driftloop.app.status_serving.serving_view`); ``monitor``: its
    monitor fields read from a monitor's API (:func:`driftloop.app.status_monitor.monitor_fields`), which then
    stand for the alerts and history parts."""
    s = model.settings
    row: dict[str, Any] = {"model": model.name, "team": model.team, "workspace": str(s.workspace_dir),
                           "champion": None, "rollout": None, "drift": None, "quality": None, "open_alerts": 0,
                           "open": [], "last_retrain": None, "newest_version": None, "errors": [],
                           "replicas": None, "error_rate": None, "p99_ms": None, "serving_error": None,
                           "monitor_url": None, "monitor_error": None, **(serving or {})}
    if monitor is not None:
        fields = dict(monitor)
        row["errors"].extend(fields.pop("part_errors", []))
        row.update(fields)
    if s.workspace_dir.exists() and not s.workspace_dir.is_dir():
        row["errors"].append(f"workspace: {s.workspace_dir} is not a folder")
    elif s.workspace_dir.is_dir():  # (no workspace yet: not trained)
        for name, read in PARTS:
            if monitor is not None and name in MONITOR_PARTS:
                continue
            try:
                read(s, row)
            except Exception as exc:  # noqa: BLE001 - one unreadable part must not hide the rest
                log.debug("status of %s: %s unreadable", model.name, name, exc_info=True)
                row["errors"].append(f"{name}: {' '.join(str(exc).split()) or type(exc).__name__}")
    rank, reason = attention(row)
    row["attention"] = {"rank": rank, "reason": reason}
    return row


def attention(row: dict[str, Any]) -> tuple[int, str]:
    """(rank, reason): what the row needs, most urgent first."""
    rollout, retrain = row.get("rollout") or {}, row.get("last_retrain") or {}
    if row["errors"] or row.get("serving_error") or row.get("monitor_error"):
        return UNREADABLE, "; ".join((["unreadable: " + "; ".join(row["errors"])] if row["errors"] else []) +
                                     [row[k] for k in ("monitor_error", "serving_error") if row.get(k)])
    if row["open_alerts"]:
        return ALERTS, f"{row['open_alerts']} open alert" + ("s" if row["open_alerts"] > 1 else "")
    if rollout.get("status") == "rolled_back" or retrain.get("outcome") in ("rolled_back", "failed"):
        return ROLLED_BACK, "retrain failed" if retrain.get("outcome") == "failed" else "rolled back"
    if (row.get("quality") or {}).get("verdict") == "degraded":
        return DEGRADED, "quality degraded"
    if (row.get("drift") or {}).get("verdict") == "drift":
        return DRIFT, "drift"
    if rollout and rollout.get("status") not in ("promoted", "rolled_back"):
        return CANARY, f"canary {rollout.get('status')}"
    if row["champion"] is None:
        return UNTRAINED, "not trained yet"
    return OK, "ok"


def status_read(models: list[FleetModel], *, timeout: float = TIMEOUT_S, monitor_url: str | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(every model's row, what needs attention first (then by name); ``{context: {"reachable", "error"}}``
    of the clusters the models are served on; ``{url: {"reachable", "error"}}`` of the monitors read, where a
    monitor URL is set: ``monitor_url`` (``--monitor-url``), else each model's ``monitor.url``)."""
    with ThreadPoolExecutor(max_workers=1) as pool:  # the monitors beside the clusters and gateways
        monitor_read = pool.submit(monitor_fields, models, override=monitor_url, timeout=timeout)
        serving, clusters = serving_view(models, timeout=timeout)
        monitor, monitors = monitor_read.result()
    rows = sorted((model_row(m, serving.get(m.name), monitor.get(m.name)) for m in models),
                  key=lambda r: (r["attention"]["rank"], r["model"]))
    return rows, clusters, monitors


def status_view(models: list[FleetModel], *, timeout: float = TIMEOUT_S, monitor_url: str | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(every model's row, what needs attention first (then by name); ``{context: {"reachable", "error"}}``
    of the clusters the models are served on) -- :func:`status_read` without the monitors."""
    return status_read(models, timeout=timeout, monitor_url=monitor_url)[:2]


def status_rows(models: list[FleetModel], *, timeout: float = TIMEOUT_S,
                monitor_url: str | None = None) -> list[dict[str, Any]]:
    """Every model's row, what needs attention first (then by name)."""
    return status_view(models, timeout=timeout, monitor_url=monitor_url)[0]


def _ago(when: str | None, now: float) -> str:
    if not when:
        return ""
    seconds = max(0.0, now - dt.datetime.fromisoformat(when).timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


_COLOURS = {UNREADABLE: "red", ALERTS: "red", ROLLED_BACK: "red", DEGRADED: "yellow", DRIFT: "yellow",
            CANARY: "cyan", OK: "green", UNTRAINED: "dim"}


def _champion_cell(row: dict[str, Any]) -> str:
    champion = f"v{row['champion']}" if row["champion"] else "–"
    r = row.get("rollout") or {}
    if r and r.get("status") not in ("promoted", "rolled_back"):
        return f"{champion}\ncanary v{r['canary_version']} {r['weight']}%"
    if r.get("status") == "rolled_back":
        return f"{champion}\nv{r['canary_version']} rolled back"
    return champion


def _monitor_cells(row: dict[str, Any], now: float) -> tuple[str, str]:
    d, q = row.get("drift"), row.get("quality")
    drift = "–" if not d else escape(f"{d['verdict']}" + (f" {d['share']:.2f}" if isinstance(d.get("share"), float)
                                                          else "")) + f"\n[dim]{_ago(d['time'], now)}[/]"
    quality = "–" if not q else escape(q["verdict"] + (f": {', '.join(q['degraded'])}" if q["degraded"] else "")) \
        + "".join(f"\n{escape(line)}" for line in _quality_numbers(q)) + f"\n[dim]{_ago(q['time'], now)}[/]"
    return drift, quality


_SHORT = {"accuracy": "acc", "f1": "f1", "roc_auc": "auc", "rmse": "rmse", "mae": "mae", "r2": "r2"}


def _quality_numbers(q: dict[str, Any]) -> list[str]:
    """The first metric realised, its holdout and limit, and the estimate from calibrated scores, a short line
    each (the column is 9 wide; ``--json`` has every metric)."""
    def num(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, (int, float)) else "–"

    lines = []
    m = next(iter(q.get("metrics") or []), None)
    if m:
        lines += [f"{_SHORT.get(m['metric'], m['metric'][:4])} {num(m.get('live'))}", f"hold {num(m.get('holdout'))}"]
        if m.get("limit") is not None:
            lines.append(f"lim {num(m['limit'])}")
    if q.get("estimated") is not None:
        lines.append(f"est {num(q['estimated'])}")
    return lines


def _retrain_cell(row: dict[str, Any], now: float) -> str:
    r = row.get("last_retrain")
    if r:
        return f"{escape(r['outcome'].replace('_', ' '))}\n[dim]{_ago(r['started'], now)}[/]"
    v = row.get("newest_version")
    if v:
        return escape(f"v{v['version']} {v.get('trigger') or ''}".strip() + (f"\n{v['rollout']}" if v.get("rollout") else ""))
    return "–"


def _alerts_line(row: dict[str, Any]) -> str:
    """The open alerts, where the row's first need is another one."""
    n = row["open_alerts"]
    return f"\n{n} open alert" + ("s" if n > 1 else "") if n and row["attention"]["rank"] != ALERTS else ""


def status_table(rows: list[dict[str, Any]], *, now: float | None = None, title: str = "driftloop status") -> Table:
    """The rows in 80 columns: every cell folds, nothing is cut (``--json`` has every field)."""
    now = time.time() if now is None else now
    table = Table(title=title, box=box.ROUNDED)
    table.add_column("model", overflow="fold", max_width=14)
    table.add_column("needs", overflow="fold", ratio=1, min_width=9)
    table.add_column("serving", overflow="fold", max_width=11)
    table.add_column("drift", overflow="fold", max_width=9)
    table.add_column("quality", overflow="fold", max_width=9)
    table.add_column("last run", overflow="fold", max_width=11)
    for row in rows:
        rank, reason = row["attention"]["rank"], row["attention"]["reason"]
        drift, quality = _monitor_cells(row, now)
        table.add_row(escape(row["model"]) + (f"\n[dim]{escape(row['team'])}[/]" if row["team"] else ""),
                      f"[{_COLOURS[rank]}]{escape(reason)}[/]" + _alerts_line(row), escape(_champion_cell(row))
                      + f"\n[dim]{escape(serving_cell(row))}[/]", drift, quality,
                      _retrain_cell(row, now))
    return table


def status_cmd(
    config: ConfigOpt = None,
    params: ParamOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Only this model of the fleet.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document (every field) for scripts.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Redraw every --interval seconds until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between redraws with --watch.")] = 5.0,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a cluster, a gateway, Prometheus or the monitor "
                                                         "may take to answer one read.")] = TIMEOUT_S,
    monitor_url: Annotated[Optional[str], typer.Option(
        "--monitor-url", help="Read alerts, last retrain, drift and quality from the fleet monitor's GET /models at "
                              "this URL (e.g. http://127.0.0.1:8090 through kubectl port-forward) instead of the "
                              "local workspaces; default: monitor.url.")] = None,
) -> None:
    """One row per model: team, champion and canary, replicas, error rate and p99, drift, quality, open alerts,
    last retrain -- what needs attention first (open alerts, rolled back, degraded). A model whose workspace
    cannot be read, or whose cluster cannot be reached, says so in its row; the others are still shown. The exit
    code is 0 whenever the view is shown (an unreachable cluster included: see ``clusters`` in --json), 2 for a
    bad configuration or --model."""
    from driftloop.app.fleet_cli import fleet_from
    from driftloop.core.console import console

    fleet = fleet_from(config, params)
    models = fleet.select(model)
    if monitor_url is not None and not re.match(MONITOR_URL, monitor_url):
        raise ConfigError(f"--monitor-url {monitor_url!r}: expected an http:// or https:// URL, e.g. "
                          "http://127.0.0.1:8090")

    def render() -> Any:  # noqa: ANN401 (a rich renderable or a JSON line)
        rows, clusters, monitors = status_read(models, timeout=timeout, monitor_url=monitor_url)
        if as_json:
            return json.dumps({"source": str(fleet.source) if fleet.source else None, "clusters": clusters,
                               "monitors": monitors, "models": rows}, default=str)
        return status_table(rows)

    if not watch:
        out = render()
        typer.echo(out) if as_json else console.print(out)
        return
    try:
        while True:
            out = render()
            if as_json:
                typer.echo(out)
            else:
                console.clear()
                console.print(out)
                console.print(f"[dim]every {interval:g}s · Ctrl-C to stop[/]")
            time.sleep(interval)
    except KeyboardInterrupt:
        return


def register(app: typer.Typer) -> None:
    app.command("status")(status_cmd)
