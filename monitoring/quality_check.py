"""The monitor's quality check: labelled windows per version → verdicts, metrics, alerts.

For every model version with labelled predictions in the log it takes the latest complete
tumbling block (:func:`monitoring.quality.tumbling_block`), computes the metrics on the fast
path, compares them with the version's holdout baseline, estimates accuracy from calibrated
scores (classifiers, CBPE) on the same rows and on the latest predictions (labelled or not),
and exports all of it to Prometheus. Only complete blocks are judged. The CHAMPION's verdicts go
to its quality episode (:mod:`monitoring.episodes`): the first degraded block of an episode raises
a ``quality`` alert — Evidently's preset runs on the block (the report of record, HTML + JSON,
saved with the alert and logged to MLflow), its values decide, and the alert goes through the same
trigger and guardrails as a drift alert (``trigger=quality:<alert-id>``); each later degraded
block of the episode is counted on that alert, not raised again, until
``monitor.quality.resolve_windows`` blocks in a row pass. A quality alert that arrives while a run
is in flight is attached to it and re-checked when its rollout ends (:mod:`monitoring.trigger`).

With ``monitor.quality.estimate_alerts``, a drop of the ESTIMATED accuracy of the champion's
latest predictions below the accuracy rule raises an alert too, before any label arrives (episodes
of their own, kind ``estimate``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from driftloop.core.errors import MonitorError
from monitoring.alerts import Alert
from monitoring.episodes import EpisodeAlerts
from monitoring.estimate import estimate_performance, finite_rows
from monitoring.labels import labelled_count, labelled_window, score_matrix, scored_window, versions_seen
from monitoring.quality import (Block, BaselineCache, clean_labelled, compare, evidently_quality, quality_alert_id,
                                quality_metrics, tumbling_block, verdicts_dict)

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["QualityMonitor"]

log = logging.getLogger(__name__)

REPORT_ARTIFACT_DIR = "quality_report"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


class QualityMonitor:
    """Runs the quality check for one monitor (store, registry, alerts, trigger, metrics)."""

    def __init__(self, settings: Settings, *, store_path: Any, registry: Any, alerts: Any, trigger: Any, metrics: Any,
                 reports_dir: Any) -> None:
        self.settings = settings
        self.cfg = settings.monitor.quality
        self.store_path = store_path
        self.registry = registry
        self.alerts = alerts
        self.trigger = trigger
        self.metrics = metrics
        self.reports_dir = reports_dir
        self.task = settings.model.task
        self.model = settings.mlflow.model_name
        self.baselines = BaselineCache(registry, self.model, self.task)
        self.episodes = EpisodeAlerts(alerts, trigger, kind="quality", resolve_after=self.cfg.resolve_windows,
                                      metrics=metrics)
        self.estimates = EpisodeAlerts(alerts, trigger, kind="estimate", resolve_after=self.cfg.resolve_windows,
                                       metrics=metrics)
        self.last_outcome: dict[str, Any] | None = None

    def _champion(self) -> str | None:
        from driftloop.core.registry import CHAMPION

        info = self.registry.version_by_alias(self.model, CHAMPION)
        return info.version if info else None

    def check(self, *, now: float | None = None) -> dict[str, Any]:
        """Check every version with labelled rows; returns ``{"checked_at", "champion", "versions": {...}}``."""
        now = time.time() if now is None else now
        champion = self._champion()
        if champion is not None:
            self.alerts.close_superseded(self.model, champion, now=now)  # earlier champions' episodes end
        outcome: dict[str, Any] = {"checked_at": _iso(now), "champion": champion, "task": self.task, "versions": {}}
        for version in versions_seen(self.store_path):
            try:
                outcome["versions"][version] = self._check_version(version, champion, now)
            except MonitorError as exc:
                outcome["versions"][version] = {"verdict": "error", "reason": str(exc)}
                log.warning("quality check of v%s: %s", version, exc)
        self.last_outcome = outcome
        return outcome

    def _check_version(self, version: str, champion: str | None, now: float) -> dict[str, Any]:
        cfg = self.cfg
        baseline = self.baselines.get(version)
        n_labelled = labelled_count(self.store_path, version=version)
        m = self.metrics
        m.quality_labelled_rows.labels(version=version).set(n_labelled)
        for metric, value in baseline.metrics.items():
            m.quality_holdout.labels(version=version, metric=metric).set(value)
        out: dict[str, Any] = {"role": "champion" if version == champion else "other", "labelled_rows": n_labelled,
                               "holdout": baseline.metrics, "baseline_source": baseline.source}
        estimate = self._estimate_latest(version, baseline, now)
        if estimate is not None:
            out["estimated_latest"] = estimate
            m.quality_estimated.labels(version=version, metric="accuracy").set(estimate["accuracy"])
        block = self._block(version, n_labelled, now)
        left_out = 0 if block is None else int(block.rows.attrs.get("skipped_labels", 0))  # by the store's reader
        if left_out:
            out["skipped"] = {"label does not fit the predictions": left_out}
        if block is None or not block.complete or len(block.rows) < cfg.min_labels:
            n = 0 if block is None else block.extra.get("n", len(block.rows))
            out.update(verdict="insufficient labels",
                       reason=f"{n} labelled rows in the current window < monitor.quality.min_labels={cfg.min_labels}"
                       if block is None or block.complete else
                       f"window incomplete ({n} of {cfg.window_rows} labelled rows)")
            if estimate is not None and version == champion and cfg.estimate_alerts:
                out["estimate_alert"] = self._estimate_alert(version, baseline, estimate, now)
            return out
        classes = baseline.classes
        rows, skipped = clean_labelled(self.task, block.rows, classes)  # stored labels are not trusted
        if left_out:
            skipped = {"label does not fit the predictions": left_out, **skipped}
        n_skipped = sum(skipped.values())
        if skipped:
            out["skipped"] = skipped
        if len(rows) < cfg.min_labels:
            out.update(verdict="insufficient labels", reason=f"{len(rows)} usable labelled rows in the current window "
                       f"< monitor.quality.min_labels={cfg.min_labels} ({n_skipped} skipped: {skipped})")
            return out
        scores = score_matrix(rows) if self.task == "classification" else None
        live = quality_metrics(self.task, rows["label"], rows["prediction"], scores, classes)
        verdicts = compare(live, baseline.metrics, cfg)
        degraded = [v for v in verdicts if v.degraded]
        for metric, value in live.items():
            m.quality_metric.labels(version=version, metric=metric).set(value)
        m.quality_degraded.labels(version=version).set(1.0 if degraded else 0.0)
        out.update(window={"id": block.key, "rows": len(rows), "skipped": n_skipped, "start": _iso(block.start_ts), "end": _iso(block.end_ts)},
                   live=live, verdicts=verdicts_dict(verdicts), verdict="degraded" if degraded else "ok")
        if scores is not None and baseline.calibration is not None and cfg.estimate:
            est = estimate_performance(scores, baseline.calibration)
            out["estimated"] = {"accuracy": est.accuracy, "confusion": est.confusion, "classes": est.classes}
        if version != champion:
            return out
        step = self.episodes.verdict(self.model, version, failed=bool(degraded), window=block.key, now=now)
        out["episode"] = self.episodes.summary(step)
        if degraded:
            out["alert"] = self.episodes.counted(step, samples=len(rows), now=now) or self._raise(
                version, block, rows, scores, classes, baseline, live, verdicts, now, step)
        elif cfg.estimate_alerts and estimate is not None:
            out["estimate_alert"] = self._estimate_alert(version, baseline, estimate, now)
        return out

    def _block(self, version: str, n_labelled: int, now: float) -> Block | None:
        """The latest complete tumbling block of the version's labelled rows, read alone from the store
        (by count: ``[k*rows, (k+1)*rows)`` in prediction-time order; by time: the last two intervals)."""
        cfg = self.cfg
        scores = self.task == "classification"
        if n_labelled == 0:
            return None
        if cfg.window_seconds is None:
            k = n_labelled // cfg.window_rows
            if k == 0:
                return Block("rows:0", pd.DataFrame(), None, None, False, {"n": n_labelled})
            rows = labelled_window(self.store_path, version=version, offset=(k - 1) * cfg.window_rows,
                                   limit=cfg.window_rows, scores=scores)
            return Block(f"rows:{k - 1}", rows, float(rows["ts"].iloc[0]), float(rows["ts"].iloc[-1]), True)
        since = (now // cfg.window_seconds - 1) * cfg.window_seconds
        recent = labelled_window(self.store_path, version=version, since=since, scores=scores)
        return tumbling_block(recent, rows=cfg.window_rows, seconds=cfg.window_seconds, now=now)

    def _estimate_latest(self, version: str, baseline: Any, now: float) -> dict[str, Any] | None:
        """CBPE on the latest predictions of the version (labelled or not; within ``window_seconds`` of now)."""
        if self.task != "classification" or baseline.calibration is None or not self.cfg.estimate:
            return None
        seconds = self.cfg.window_seconds
        since = now - seconds if seconds else None
        frame = scored_window(self.store_path, version=version, since=since, limit=self.cfg.window_rows)
        scores = score_matrix(frame.dropna(subset=["scores"])) if not frame.empty else None
        scores = None if scores is None else finite_rows(scores)
        if scores is None or len(scores) < self.cfg.min_labels:
            return None
        est = estimate_performance(scores, baseline.calibration)
        return {"accuracy": est.accuracy, "rows": est.rows, "confusion": est.confusion, "classes": est.classes}

    # -- alerts ---------------------------------------------------------------------------------
    def _raise(self, version: str, block: Any, rows: Any, scores: np.ndarray | None, classes: Any, baseline: Any,
               live: dict[str, float], verdicts: list, now: float, step: Any) -> dict[str, Any]:
        alert_id = quality_alert_id(self.model, version, block.key)
        if self.alerts.get(alert_id) is not None:  # the same block re-checked: the trigger records a duplicate
            d = self.trigger.submit(Alert(alert_id, "quality", samples=len(rows)))
            return {"id": alert_id, "decision": d.decision, "reason": d.reason}
        sample = rows
        if len(sample) > self.cfg.report_sample_rows:
            sample = rows.sample(n=self.cfg.report_sample_rows, random_state=0)
            scores = score_matrix(sample) if scores is not None else None
        snapshot, judged = evidently_quality(self.task, sample["label"], sample["prediction"], scores, classes)
        judged_verdicts = compare({**live, **judged}, baseline.metrics, self.cfg)
        directory = self.reports_dir / alert_id
        directory.mkdir(parents=True, exist_ok=True)
        html, js = directory / "quality.html", directory / "quality.json"
        snapshot.save_html(str(html))
        snapshot.save_json(str(js))
        uri = self._log_to_mlflow(alert_id, version, [html, js], judged, len(rows))
        degraded = [v.metric for v in judged_verdicts if v.degraded]
        details = {"version": version, "champion_version": version, "window": block.key, "live": live,
                   "evidently": judged, "holdout": baseline.metrics, "degraded_metrics": degraded,
                   "verdicts": verdicts_dict(judged_verdicts), "labelled_rows": len(rows)}
        alert = Alert(alert_id, "quality", created=now, details=details, samples=len(rows),
                      window_start=_iso(block.start_ts), window_end=_iso(block.end_ts), report_path=str(html),
                      report_uri=uri)
        if not degraded:
            self.alerts.insert(alert)
            self.alerts.record_decision(alert_id, "not_confirmed", "Evidently's preset finds no metric beyond its "
                                        "rule on this window", now=now)
            return {"id": alert_id, "decision": "not_confirmed", "report": f"/reports/{alert_id}"}
        self.metrics.alerts.labels(source="quality").inc()
        d = self.trigger.submit(alert)
        self.episodes.bind(step, alert_id)
        return {"id": alert_id, "decision": d.decision, "reason": d.reason, "request_id": d.request_id,
                "degraded_metrics": degraded, "report": f"/reports/{alert_id}", "report_uri": uri}

    def _estimate_alert(self, version: str, baseline: Any, estimate: dict[str, Any], now: float) -> dict[str, Any] | None:
        verdicts = compare({"accuracy": estimate["accuracy"]}, baseline.metrics, self.cfg)
        degraded = any(v.degraded for v in verdicts)
        block = f"estimate:{int(now // max(self.cfg.window_seconds or 3600.0, 1.0))}"
        step = self.estimates.verdict(self.model, version, failed=degraded, window=block, now=now)
        if not degraded:
            return None
        counted = self.estimates.counted(step, samples=estimate["rows"], now=now)
        if counted is not None:
            return counted
        alert_id = quality_alert_id(self.model, version, block)
        fresh = self.alerts.get(alert_id) is None
        details = {"version": version, "champion_version": version, "estimated": True, "window": block,
                   "estimated_accuracy": estimate["accuracy"], "holdout": baseline.metrics,
                   "degraded_metrics": ["accuracy (estimated)"], "verdicts": verdicts_dict(verdicts)}
        alert = Alert(alert_id, "quality", created=now, details=details, samples=estimate["rows"], window_end=_iso(now))
        if fresh:  # a re-check of the same window is the trigger's duplicate, not another alert
            self.metrics.alerts.labels(source="quality_estimate").inc()
        d = self.trigger.submit(alert)
        if fresh:
            self.estimates.bind(step, alert_id)
        return {"id": alert_id, "decision": d.decision, "reason": d.reason}

    def _log_to_mlflow(self, alert_id: str, version: str, files: list, judged: dict[str, float], rows: int) -> str | None:
        try:
            client = self.registry.client
            run = client.create_run(self.registry.experiment_id(), run_name=f"quality-{alert_id}", tags={
                "driftloop.alert_id": alert_id, "driftloop.champion_version": version, "driftloop.model": self.model,
                "driftloop.kind": "quality-report"})
            run_id = run.info.run_id
            for key, value in judged.items():
                if not np.isnan(value):
                    client.log_metric(run_id, key, value)
            client.log_metric(run_id, "labelled_rows", rows)
            for path in files:
                client.log_artifact(run_id, str(path), REPORT_ARTIFACT_DIR)
            client.set_terminated(run_id)
            return f"runs:/{run_id}/{REPORT_ARTIFACT_DIR}/{files[0].name}"
        except Exception as exc:  # noqa: BLE001 - MLflow down: the report stays local, the alert is still raised
            log.warning("quality report for %s not logged to MLflow: %s", alert_id, exc)
            return None
