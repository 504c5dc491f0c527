"""The monitor's checks into the model's history, an Evidently workspace — off the checks' path.

:class:`CheckHistory` turns what each check returned into a record (:mod:`driftloop.core.history`)
and hands it to a writer thread: a check only builds a small dict and puts it on a bounded queue,
so a slow or absent Evidently service, a full disk or a broken workspace never slows or breaks a
check. A failed write is logged once (until writes succeed again) and counted in
``driftloop_monitor_history_writes_total{result="failed"}``; a record that finds the queue full is
counted as ``dropped``.

What is recorded:

* each drift check with a verdict (a cached re-check of a tumbling window and "insufficient data"
  measured nothing new and are left out);
* each quality check's verdict per version and labelled window (the same window re-checked with
  the same verdict and alert once);
* what the loop did: the alert a check raised (event ``alert``), the retraining run it started
  (event ``run``), and each run's rollout outcome once the trigger has followed it
  (:meth:`CheckHistory.rollouts`, events ``promoted``, ``rolled_back``, ``not_registered``,
  ``no_rollout``, ``failed``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from driftloop.core.history import SECRET_ENV, HistoryWorkspace, history_target
from monitoring.quality import TASK_METRICS

if TYPE_CHECKING:
    from driftloop.core.config import Settings
    from monitoring.alerts import AlertStore
    from monitoring.metrics import MonitorMetrics

__all__ = ["CheckHistory", "drift_record", "quality_records", "rollout_record"]

log = logging.getLogger(__name__)

_STOP = object()
_COLUMN_KEYS = ("column", "method", "score", "threshold", "drifted")


def _alert_fields(alert: dict[str, Any] | None) -> dict[str, Any]:
    if not alert:
        return {}
    return {"alert": alert.get("id"), "decision": alert.get("decision"), "reason": alert.get("reason"),
            "run": alert.get("request_id"), "report": alert.get("report_uri") or alert.get("report"),
            "_counted": "episode_windows" in alert}


def drift_record(outcome: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a drift check's outcome (:meth:`monitoring.drift_check.DriftMonitor.check`); None when
    it measured nothing new (no verdict, or a tumbling window's cached outcome)."""
    result = outcome.get("result")
    if result is None or outcome.get("verdict_cached"):
        return None
    model, _, version = str(outcome["champion"]).rpartition(" v")
    window = outcome.get("window") or {}
    return {"kind": "drift", "model": model, "version": version, "time": outcome["checked_at"],
            "window": window.get("id"), "window_start": window.get("start"), "window_end": window.get("end"),
            "rows": window.get("rows"), "verdict": outcome["verdict"], "share": result["share"],
            "drift_share": result["drift_share"], "drifted_columns": list(result["drifted_columns"]),
            "columns": [{k: c[k] for k in _COLUMN_KEYS} for c in result["columns"]],
            **_alert_fields(outcome.get("alert"))}


def quality_records(outcome: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """One record per version the quality check judged (:meth:`monitoring.quality_check.QualityMonitor.check`)."""
    out = []
    for version, entry in (outcome.get("versions") or {}).items():
        if entry.get("verdict") not in ("ok", "degraded") or not entry.get("window"):
            continue
        rules = {v["metric"]: v for v in entry.get("verdicts") or []}
        holdout = entry.get("holdout") or {}
        metrics = [{"metric": name, "live": live, "holdout": holdout.get(name),
                    "limit": rules.get(name, {}).get("limit"), "rule": rules.get(name, {}).get("rule", ""),
                    "degraded": bool(rules.get(name, {}).get("degraded"))}
                   for name, live in (entry.get("live") or {}).items() if live is not None]
        window = entry["window"]
        out.append({"kind": "quality", "model": model, "version": str(version), "time": outcome["checked_at"],
                    "window": window.get("id"), "window_start": window.get("start"), "window_end": window.get("end"),
                    "rows": window.get("rows"), "verdict": entry["verdict"], "metrics": metrics,
                    "degraded": [m["metric"] for m in metrics if m["degraded"]],
                    "estimated": (entry.get("estimated_latest") or {}).get("accuracy"),
                    **_alert_fields(entry.get("alert") or entry.get("estimate_alert"))})
    return out


def rollout_record(alert: dict[str, Any], model: str) -> dict[str, Any]:
    """The record of a retraining run's outcome, from its alert as the alert store has it once the trigger
    followed the run (:meth:`monitoring.trigger.Trigger.follow`: ``outcome``, ``outcome_reason``, ``followed``)."""
    return {"kind": "rollout", "model": model, "version": alert.get("model_version"),
            "time": dt.datetime.fromtimestamp(alert["followed"], dt.UTC).isoformat(), "verdict": alert["outcome"],
            "outcome": alert["outcome"], "reason": alert.get("outcome_reason"), "alert": alert["id"],
            "run": alert.get("request_id"), "events": [alert["outcome"]]}


class CheckHistory:
    """Records the monitor's checks in the model's Evidently project, from a writer thread of its own."""

    def __init__(self, settings: Settings, *, metrics: MonitorMetrics | None = None,
                 workspace: HistoryWorkspace | None = None, max_pending: int = 1000) -> None:
        self.model = settings.mlflow.model_name
        self.quality_metrics = TASK_METRICS.get(settings.model.task, ())
        self.workspace = workspace or HistoryWorkspace(history_target(settings), secret=os.environ.get(SECRET_ENV))
        self.written = self.failed = self.dropped = 0
        self._writes = None
        if metrics is not None:
            from prometheus_client import Counter

            self._writes = Counter("driftloop_monitor_history_writes", "Check records written to the Evidently "
                                   "history, by result (written, failed, dropped)", ["result"], registry=metrics.registry)
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._last: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self._events: OrderedDict[tuple[str, str], None] = OrderedDict()  # (event, alert id) already recorded
        self._failing = self._dropping = False
        self._since = time.time()  # outcomes followed before this process are not news
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- what the checks hand over (cheap: a dict on a queue) ------------------------------------
    def drift(self, outcome: dict[str, Any]) -> None:
        record = drift_record(outcome)
        if record is not None:
            self._put(record)

    def quality(self, outcome: dict[str, Any]) -> None:
        for record in quality_records(outcome, self.model):
            self._put(record)

    def rollouts(self, alerts: AlertStore, *, recent: int = 200) -> None:
        """Record the outcome of each run the trigger followed since this recorder started (whoever followed
        it: the loop, or a new alert's guardrails), once."""
        for alert in reversed(alerts.recent(recent)):
            if alert.get("outcome") and (alert.get("followed") or 0) >= self._since \
                    and ("outcome", alert["id"]) not in self._events:
                self._events[("outcome", alert["id"])] = None
                self._put(rollout_record(alert, self.model))

    def _put(self, record: dict[str, Any]) -> None:
        counted = record.pop("_counted", False)
        key = (record["kind"], record["model"], str(record.get("version")))
        state = (record.get("window"), record.get("verdict"), record.get("alert"))
        if record["kind"] != "rollout":
            if self._last.get(key) == state:
                return  # the same window judged alike again: nothing new to record
            self._last[key] = state
            record["events"] = self._new_events(record, counted)
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._count("dropped")
            if not self._dropping:  # once, until a write goes through again
                self._dropping = True
                log.warning("history: %d records wait to be written to %s; this one is dropped",
                            self._queue.qsize(), self.workspace.target)
            return
        self._start()

    def _new_events(self, record: dict[str, Any], counted: bool) -> list[str]:
        """``alert`` for an alert first raised here, ``run`` for a run it started — each once."""
        alert, decision = record.get("alert"), record.get("decision")
        wanted = []
        if alert and not counted and decision != "duplicate":
            wanted.append("alert")
        if alert and decision == "started":
            wanted.append("run")
        events = [e for e in wanted if (e, alert) not in self._events]
        for event in events:
            self._events[(event, alert)] = None
        while len(self._events) > 4096:
            self._events.popitem(last=False)
        return events

    # -- the writer thread -------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            try:
                if record is _STOP:
                    return
                self._write(record)
            finally:
                self._queue.task_done()

    def _write(self, record: dict[str, Any]) -> None:
        try:
            self.workspace.add(record, quality_metrics=self.quality_metrics)
        except Exception as exc:  # noqa: BLE001 - a failed write never reaches a check: logged once, counted
            self._count("failed")
            if not self._failing:
                self._failing = True
                log.warning("history: %s check of %s v%s not written (%s); the checks go on, failures are counted in "
                            "driftloop_monitor_history_writes_total", record["kind"], record["model"],
                            record.get("version"), exc)
            return
        self._count("written")
        self._dropping = False
        if self._failing:
            self._failing = False
            log.info("history: writing to %s again", self.workspace.target)

    def _count(self, result: str) -> None:
        setattr(self, result, getattr(self, result) + 1)
        if self._writes is not None:
            self._writes.labels(result=result).inc()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every record handed over so far is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending (at most ``timeout`` seconds), then stop the writer."""
        if self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=timeout)
            except queue.Full:
                return  # a daemon thread: what is still pending goes with the process
            self._thread.join(timeout)
