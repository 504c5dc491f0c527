"""The monitor's drift check: the current window against the champion's reference, and its alert.

:class:`DriftMonitor` takes the window the store gives (``monitor.window_*``), leaves out the
shadow's rows and caps each request's share, and below ``monitor.min_samples`` rows (or
``monitor.min_requests`` requests), or while a tumbling window is not complete yet, answers
"insufficient data" and raises nothing: only complete windows are judged. Otherwise the fast path
(:func:`monitoring.drift.fast_check`) judges the window and its numbers go to Prometheus, and the
verdict goes to the model's drift episode (:mod:`monitoring.episodes`). A drifted window of an
open episode is counted on the episode's alert; only a window that needs a new alert (the
episode's first) runs Evidently, the judge of record, on a sample of the window: its report is
saved under ``<workspace>/monitor/reports/<alert-id>/`` and logged to MLflow
(:func:`log_report_to_mlflow`), and a confirmed alert goes to the trigger. A complete tumbling
window is judged once per champion version: a re-check returns the cached outcome.
:class:`monitoring.service.MonitorService` runs it (periodically and on ``POST /check``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driftloop.core.shadow import SHADOW_ROLE
from monitoring.alerts import Alert, drift_alert_id
from monitoring.drift import DriftOptions, DriftResult, evidently_report, fast_check, save_report
from monitoring.episodes import EpisodeAlerts

if TYPE_CHECKING:
    from driftloop.core.config import Settings
    from driftloop.core.registry import Registry
    from monitoring.alert_episodes import EpisodeStep
    from monitoring.alerts import AlertStore
    from monitoring.metrics import MonitorMetrics
    from monitoring.reference import ChampionReference, ReferenceCache
    from monitoring.store import InferenceStore, Window
    from monitoring.trigger import Trigger

__all__ = ["REPORT_ARTIFACT_DIR", "DriftMonitor", "log_report_to_mlflow"]

log = logging.getLogger("monitoring.service")  # the check logs as part of the monitor service, as it always did

REPORT_ARTIFACT_DIR = "drift_report"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def log_report_to_mlflow(registry: Registry, files: list[Path], *, alert_id: str, champion: ChampionReference,
                         result: DriftResult) -> str:
    """Log the report files as artifacts of a monitoring run; returns the HTML's ``runs:/`` URI."""
    client = registry.client
    run = client.create_run(registry.experiment_id(), run_name=f"drift-{alert_id}", tags={
        "driftloop.alert_id": alert_id, "driftloop.champion_version": champion.version,
        "driftloop.model": champion.model, "driftloop.kind": "drift-report"})
    run_id = run.info.run_id
    client.log_metric(run_id, "drift_share", result.share)
    client.log_metric(run_id, "window_rows", result.n_current)
    for path in files:
        client.log_artifact(run_id, str(path), REPORT_ARTIFACT_DIR)
    client.set_terminated(run_id)
    return f"runs:/{run_id}/{REPORT_ARTIFACT_DIR}/{files[0].name}"


class DriftMonitor:
    """Runs the drift check for one monitor (store, references, alerts, trigger, metrics, registry)."""

    def __init__(self, settings: Settings, *, store: InferenceStore, references: ReferenceCache, alerts: AlertStore,
                 trigger: Trigger, metrics: MonitorMetrics, registry: Registry, reports_dir: Path) -> None:
        self.settings = settings
        self.store = store
        self.references = references
        self.alerts = alerts
        self.trigger = trigger
        self.metrics = metrics
        self.registry = registry
        self.reports_dir = reports_dir
        self.options = DriftOptions.from_config(settings.monitor)
        self.episodes = EpisodeAlerts(alerts, trigger, kind="drift", resolve_after=settings.monitor.resolve_windows,
                                      metrics=metrics)
        self._checked: dict[str, dict[str, Any]] = {}

    def check(self, *, force: bool, report: bool) -> dict[str, Any]:
        """One drift check of the current window (the caller serialises checks); returns the outcome."""
        cfg = self.settings.monitor
        champion = self.references.get()
        self.alerts.close_superseded(champion.model, champion.version, now=time.time())  # earlier champions' episodes
        window = self.store.window(cfg.window_kind, rows=cfg.window_rows, seconds=cfg.window_seconds)
        window = window.without_role(SHADOW_ROLE)  # a candidate's answers to mirrored copies are not production's
        window = window.capped(cfg.max_rows_per_request)  # one request cannot fill the window
        self.metrics.window_size.set(window.n)
        info = {"id": window.id, "kind": window.kind, "rows": window.n, "start": _iso(window.start_ts),
                "end": _iso(window.end_ts), "complete": window.complete}
        base = {"checked_at": _iso(time.time()), "champion": f"{champion.model} v{champion.version}", "window": info}
        info["requests"] = window.requests
        if not window.complete:
            return {**base, "verdict": "insufficient data", "reason": self._incomplete(window)}
        if window.n < cfg.min_samples or window.requests < cfg.min_requests:
            return {**base, "verdict": "insufficient data", "reason": (
                f"{window.n} rows (at most monitor.max_rows_per_request={cfg.max_rows_per_request} of each request) "
                f"from {window.requests} requests; a verdict needs monitor.min_samples={cfg.min_samples} rows and "
                f"monitor.min_requests={cfg.min_requests} requests, so no alert is raised and no run starts")}
        key = f"{champion.version}:{window.id}"
        if window.kind == "tumbling" and key in self._checked and not (force or report):
            return {**self._checked[key], "verdict_cached": True}
        started = time.perf_counter()
        result = fast_check(champion.profile, window.rows, self.options)
        self._export(result, time.perf_counter() - started)
        self.trigger.observe_drift(champion.model, result.dataset_drift)  # the gauge's episode (monitoring.duplicates)
        step = self.episodes.verdict(champion.model, champion.version, failed=result.dataset_drift, window=window.id,
                                     now=time.time())
        outcome: dict[str, Any] = {**base, "verdict": "drift" if result.dataset_drift else "no drift",
                                   "result": result.to_dict(), "episode": self.episodes.summary(step)}
        alert_id = drift_alert_id(champion.model, champion.version, window.start_ts, window.end_ts)
        if result.dataset_drift:
            counted = self.episodes.counted(step, samples=window.n, now=time.time())
            outcome["alert"] = counted or self._raise(alert_id, champion, window, result, step)
        elif report:
            outcome["alert"] = self._raise(alert_id, champion, window, result, None)
        if window.kind == "tumbling":
            self._checked[key] = outcome
            while len(self._checked) > 64:  # only recent windows can come round again
                self._checked.pop(next(iter(self._checked)))
        return outcome

    def _incomplete(self, window: Window) -> str:
        cfg = self.settings.monitor
        size = f"monitor.window_rows={cfg.window_rows}" + (
            f", monitor.window_seconds={cfg.window_seconds:g}" if cfg.window_seconds else "")
        return (f"window {window.id} is not complete yet ({window.n} rows so far; {size}): only complete windows "
                "are judged, so no alert is raised and no run starts")

    def _export(self, result: DriftResult, seconds: float) -> None:
        m = self.metrics
        m.dataset_drift_share.set(result.share)
        m.dataset_drift.set(1.0 if result.dataset_drift else 0.0)
        for col in result.columns:
            m.feature_drift_score.labels(feature=col.column, method=col.method).set(col.score)
            m.feature_drifted.labels(feature=col.column, method=col.method).set(1.0 if col.drifted else 0.0)
        m.last_check_timestamp.set(time.time())
        m.check_seconds.observe(seconds)

    def _raise(self, alert_id: str, champion: ChampionReference, window: Window, fast: DriftResult,
               step: EpisodeStep | None) -> dict[str, Any]:
        known = self.alerts.get(alert_id)
        if known is not None:  # the same drift re-detected: no second report, the trigger records a duplicate
            alert = Alert(alert_id, "drift", samples=window.n)
            decision = self.trigger.submit(alert)
            return {"id": alert_id, "decision": decision.decision, "reason": decision.reason,
                    "report": f"/reports/{alert_id}"}
        rows = window.rows
        limit = self.settings.monitor.report_sample_rows
        if len(rows) > limit:
            rows = rows.sample(n=limit, random_state=0)
        snapshot, judged = evidently_report(champion.frame, rows, champion.numeric, champion.categorical, self.options)
        html, js = save_report(snapshot, self.reports_dir / alert_id)
        uri = None
        try:
            uri = log_report_to_mlflow(self.registry, [html, js], alert_id=alert_id, champion=champion, result=judged)
        except Exception as exc:  # noqa: BLE001 - MLflow down: the report stays local, the alert is still raised
            log.warning("drift report for %s not logged to MLflow: %s", alert_id, exc)
        details = {"champion_version": champion.version, "window": window.id,
                   "drifted_columns": judged.drifted_columns, "share": judged.share,
                   "fast_path": fast.to_dict(), "evidently": judged.to_dict()}
        alert = Alert(alert_id, "drift", details=details, samples=window.n, window_end=_iso(window.end_ts),
                      window_start=_iso(window.start_ts), report_path=str(html), report_uri=uri)
        if not judged.dataset_drift and not fast.dataset_drift:
            self.alerts.insert(alert)
            self.alerts.record_decision(alert_id, "report_only", "report requested; no dataset drift", now=time.time())
            return {"id": alert_id, "decision": "report_only", "report": f"/reports/{alert_id}", "report_uri": uri}
        if not judged.dataset_drift:
            self.alerts.insert(alert)
            self.alerts.record_decision(alert_id, "not_confirmed", "Evidently found no dataset drift on the "
                                        f"reported sample ({judged.share:.2f} of columns)", now=time.time())
            return {"id": alert_id, "decision": "not_confirmed", "report": f"/reports/{alert_id}", "report_uri": uri}
        self.metrics.alerts.labels(source="drift").inc()
        decision = self.trigger.submit(alert)
        if step is not None:
            self.episodes.bind(step, alert_id)
        return {"id": alert_id, "decision": decision.decision, "reason": decision.reason,
                "request_id": decision.request_id, "report": f"/reports/{alert_id}", "report_uri": uri}
