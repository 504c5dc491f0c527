"""What the monitor knows of one model, as a row of ``driftloop status`` shows it (docs/fleet.md, "The view").

Two readers, used by ``driftloop status`` on the local workspaces and by the fleet monitor's ``GET /models``
(:mod:`monitoring.fleet_service`), so that both say the same in the same shape:

* :func:`alerts_summary` — from the alert store: ``open_alerts`` (open drift and quality episodes, unresolved
  needs-attention), ``open`` (a line each) and ``last_retrain`` (the last run an alert started: ``alert``,
  ``started``, ``run``, ``outcome``);
* :func:`verdicts_summary` — from the history: the last drift verdict (``drift``: ``verdict``, ``share``,
  ``time``, ``version``) and the last quality verdict (``quality``: ``verdict``, ``time``, ``degraded``, ``metrics``,
  ``estimated``), read with :meth:`HistoryWorkspace.latest` (not the whole history).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from monitoring.alerts import ATTENTION, STARTED

if TYPE_CHECKING:
    from driftloop.core.history import HistoryWorkspace
    from monitoring.alerts import AlertStore

__all__ = ["DRIFT_FIELDS", "MONITOR_FIELDS", "alerts_summary", "iso", "verdicts_summary"]

#: the fields of a status row these readers fill
MONITOR_FIELDS = ("open_alerts", "open", "last_retrain", "drift", "quality")
#: the fields of a row's ``drift``
DRIFT_FIELDS = ("verdict", "share", "time", "version")
_QUALITY_VERDICTS = ("ok", "degraded")


def iso(ts: float | None) -> str | None:
    """A unix time as ISO 8601 in UTC, to the second."""
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def alerts_summary(store: AlertStore, model: str) -> dict[str, Any]:
    """Open alerts (open drift and quality episodes, unresolved needs-attention) and the last retrain."""
    episodes = store.open_episodes(model)
    attention = store.unresolved(ATTENTION)
    started = [a for a in store.recent(200) if a.get("decision") == STARTED]
    out: dict[str, Any] = {
        "open_alerts": len(episodes) + len(attention),
        "open": [f"{e.kind} episode since {iso(e.opened)} ({e.failing} windows)" for e in episodes]
        + [f"needs attention: {a.get('reason') or a['id']}" for a in attention],
        "last_retrain": None}
    if started:
        last = started[0]
        out["last_retrain"] = {"alert": last["id"], "started": iso(last.get("started")),
                               "run": last.get("pipeline_run_id") or last.get("request_id"),
                               "outcome": last.get("outcome") or _run_state(last)}
    return out


def _run_state(alert: dict[str, Any]) -> str:
    state = (alert.get("run_state") or "").lower()
    return {"failed": "failed", "": "running"}.get(state, state if alert.get("finished") else "running")


def verdicts_summary(workspace: HistoryWorkspace, model: str) -> dict[str, Any]:
    """The last drift and quality verdicts the monitor recorded in the model's history (None where none)."""
    latest = workspace.latest(model, ("drift", "quality"),
                              accept=lambda r: r["kind"] != "quality" or r.get("verdict") in _QUALITY_VERDICTS)
    out: dict[str, Any] = {"drift": None, "quality": None}
    if (record := latest.get("drift")) is not None:
        out["drift"] = {k: record.get(k) for k in DRIFT_FIELDS}
    if (record := latest.get("quality")) is not None:
        metrics = record.get("metrics") or []
        out["quality"] = {"verdict": record["verdict"], "time": record["time"],
                          "degraded": list(record.get("degraded") or [m["metric"] for m in metrics if m.get("degraded")]),
                          "metrics": metrics, "estimated": record.get("estimated")}
    return out
