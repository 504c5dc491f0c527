"""Quality paths the main tests do not reach: multiclass models, time windows, alerts raised from the
label-free estimate, and the gateway's feedback outbox when the monitor refuses a queued label.

Real store, alert store, trigger, registry (local MLflow) and sink app; only the training run is
recorded (``RecordingRunner``)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import mlflow
import numpy as np
import pytest
import uvicorn

from components.evaluate import calibration_map
from driftloop.core.registry import Registry
from monitoring.alerts import AlertStore
from monitoring.estimate import Calibration, estimate_performance
from monitoring.events import parse_structured
from monitoring.metrics import MonitorMetrics
from monitoring.quality import evidently_quality, quality_metrics
from monitoring.quality_check import QualityMonitor
from monitoring.sink import create_sink_app
from monitoring.store import InferenceStore
from monitoring.trigger import Trigger
from serving.feedback import FeedbackForwarder
from tests.ce_events import structured
from tests.conftest import free_port, make_settings
from tests.test_trigger import RecordingRunner

IDENTITY = {"x": [0.0, 1.0], "y": [0.0, 1.0]}  # calibrated probability = raw score


class _Quality:
    """A QualityMonitor of model ``m`` whose version 1 (the champion) has the given holdout."""

    def __init__(self, tmp_path, holdout: dict, **cfg) -> None:
        self.settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet", **{
            "model.task": "classification", "mlflow.model_name": "m", "trigger.min_samples": 20,
            "trigger.cooldown_seconds": 86400, **cfg})
        self.registry = Registry.from_settings(self.settings)
        mlflow.set_tracking_uri(self.settings.tracking_uri)
        with mlflow.start_run(experiment_id=self.registry.experiment_id()) as run:
            mlflow.log_dict({"task": "classification", **holdout}, "quality/holdout.json")
        self.registry.client.create_registered_model("m")
        self.registry.client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        self.registry.set_alias("m", "champion", "1")
        self.store = InferenceStore(tmp_path / "inference.db")
        self.alerts = AlertStore(tmp_path / "alerts.db")
        self.metrics = MonitorMetrics()
        self.runner = RecordingRunner()
        self.trigger = Trigger(self.settings, self.alerts, runner=self.runner, metrics=self.metrics)
        self.monitor = QualityMonitor(self.settings, store_path=self.store.path, registry=self.registry,
                                      alerts=self.alerts, trigger=self.trigger, metrics=self.metrics,
                                      reports_dir=tmp_path / "reports")
        self._n = 0

    def log(self, ts: float, preds: list, scores: list | None = None, classes: list | None = None,
            labels: list | None = None) -> None:
        """One request of ``len(preds)`` rows received at ``ts``, its response (with scores) and labels."""
        self._n += 1
        ce_id = f"req-{self._n}"
        response = {"predictions": preds}
        if scores is not None:
            response.update(scores=scores, classes=classes)
        request = {"instances": [{"x": float(i)} for i in range(len(preds))]}
        events = [parse_structured(structured(ce_id, "request", request, model="m")),
                  parse_structured(structured(ce_id, "response", response, model="m", version="1"))]
        for ev in events:
            ev.received_at = ts
        self.store.append_events(events)
        if labels is not None:
            self.store.add_labels([{"id": ce_id, "row_index": j, "label": y} for j, y in enumerate(labels)])

    def alerts_counted(self, source: str) -> float:
        return self.metrics.alerts.labels(source=source)._value.get()

    def close(self) -> None:
        self.store.close()
        self.alerts.close()


@pytest.fixture
def quality(tmp_path):
    made = []

    def make(holdout, **cfg):
        made.append(_Quality(tmp_path, holdout, **cfg))
        return made[-1]

    yield make
    for q in made:
        q.close()


def _three_class_scores(rng, truth, n):
    raw = rng.random((n, 3))
    raw[np.arange(n), truth] += 0.8
    return raw / raw.sum(axis=1, keepdims=True)


# -- (1) multiclass ------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [[0, 1, 2], ["a", "b", "c"]])
def test_multiclass_fast_path_gives_evidentlys_values(classes):
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 600)
    scores = _three_class_scores(rng, truth, 600)
    labels = [classes[t] for t in truth]
    preds = [[classes[k]] for k in scores.argmax(axis=1)]
    fast = quality_metrics("classification", labels, preds, scores, classes)
    _, judged = evidently_quality("classification", labels, preds, scores, classes)
    assert set(judged) == {"accuracy", "f1", "roc_auc"}  # macro F1 and one-vs-rest AUC over three classes
    for key, value in judged.items():
        assert fast[key] == pytest.approx(value, rel=1e-12), key
    assert 0.0 <= fast["ece"] <= 1.0


def test_multiclass_estimate_follows_the_realised_accuracy_under_covariate_shift():
    """Three classes around a circle; the true P(class | x) stays, the model is overconfident (so it
    needs the per-class calibration), and the inputs move towards the middle, where it is less sure."""
    rng = np.random.default_rng(5)
    centres = np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])

    def sample(n, spread):
        x = rng.normal(0.0, spread, (n, 2))
        p_true = np.exp(2.0 * x @ centres.T)
        p_true /= p_true.sum(axis=1, keepdims=True)
        y = np.array([rng.choice(3, p=row) for row in p_true])
        raw = np.exp(4.0 * x @ centres.T)
        return y, raw / raw.sum(axis=1, keepdims=True)

    y_hold, s_hold = sample(6000, 1.0)
    cal = Calibration.from_holdout({"classes": [0, 1, 2], "calibration": calibration_map(y_hold, s_hold, [0, 1, 2])})
    assert not cal.binary and len(cal.maps) == 3
    assert np.allclose(cal.apply(s_hold[:50]).sum(axis=1), 1.0)
    estimates = []
    for spread in (1.0, 0.5):
        y, s = sample(3000, spread)
        est = estimate_performance(s, cal)
        realised = float(np.mean(s.argmax(axis=1) == y))
        assert abs(est.accuracy - realised) < 0.03, (spread, est.accuracy, realised)
        assert np.mean(s.max(axis=1)) - realised > 0.05  # the raw confidence alone would over-estimate
        confusion = np.asarray(est.confusion)
        assert confusion.shape == (3, 3) and confusion.sum() == pytest.approx(3000)
        assert list(confusion.sum(axis=0)) == pytest.approx(list(np.bincount(s.argmax(axis=1), minlength=3)))
        estimates.append(est.accuracy)
    assert estimates[1] < estimates[0] - 0.1  # the estimate goes down with the accuracy


def test_a_degraded_multiclass_champion_raises_an_alert_with_evidentlys_report(quality, tmp_path):
    classes = ["a", "b", "c"]
    q = quality({"metrics": {"accuracy": 0.9, "f1": 0.9}, "classes": classes,
                 "calibration": {"binary": False, "maps": [IDENTITY] * 3}},
                **{"monitor.quality.window_rows": 60, "monitor.quality.min_labels": 60})
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, 60)
    scores = _three_class_scores(rng, truth, 60)
    preds = [classes[k] for k in scores.argmax(axis=1)]
    labels = [classes[(t + 1) % 3] if i % 2 else classes[t] for i, t in enumerate(truth)]  # half now wrong
    for i in range(0, 60, 10):
        q.log(1000.0 + i, preds[i:i + 10], scores[i:i + 10].tolist(), classes, labels[i:i + 10])
    out = q.monitor.check(now=2000.0)["versions"]["1"]
    assert out["verdict"] == "degraded", out
    assert out["live"]["accuracy"] == pytest.approx(np.mean(np.array(preds) == np.array(labels)))
    assert out["estimated"]["classes"] == classes and np.asarray(out["estimated"]["confusion"]).shape == (3, 3)
    alert = out["alert"]
    assert alert["decision"] == "started" and set(alert["degraded_metrics"]) == {"accuracy", "f1"}
    q.trigger.wait(alert["id"], timeout=30)
    assert [r.trigger for r in q.runner.requests] == [f"quality:{alert['id']}"]
    details = q.alerts.get(alert["id"])["details"]
    assert details["evidently"]["accuracy"] == pytest.approx(out["live"]["accuracy"], rel=1e-12)
    assert (tmp_path / "reports" / alert["id"] / "quality.html").is_file()


# -- (2) time windows ----------------------------------------------------------------------------
def test_time_windows_judge_the_last_complete_interval_and_keep_its_id(quality):
    q = quality({"metrics": {"accuracy": 0.9}, "classes": [0, 1]},
                **{"monitor.quality.window_seconds": 100, "monitor.quality.window_rows": 1000,
                   "monitor.quality.min_labels": 20})
    q.log(1120.0, [1] * 30, labels=[0] * 20 + [1] * 10)  # accuracy 1/3, in the interval [1100, 1200)

    first = q.monitor.check(now=1150.0)["versions"]["1"]  # the interval is still running: no verdict yet
    assert first["verdict"] == "insufficient labels" and "window incomplete" in first["reason"], first
    assert "alert" not in first and q.runner.requests == []

    judged = q.monitor.check(now=1250.0)["versions"]["1"]
    assert judged["verdict"] == "degraded" and judged["window"]["id"] == "t:1100" and judged["window"]["rows"] == 30
    assert (judged["window"]["start"], judged["window"]["end"]) == ("1970-01-01T00:18:20+00:00",
                                                                    "1970-01-01T00:20:00+00:00")
    alert = judged["alert"]
    assert alert["decision"] == "started"
    q.trigger.wait(alert["id"], timeout=30)

    q.log(1199.0, [1] * 10, labels=[1] * 10)  # late labels for the same interval
    q.log(1200.0, [1] * 10, labels=[0] * 10)  # the next interval starts at 1200 (inclusive)
    again = q.monitor.check(now=1260.0)["versions"]["1"]
    assert again["window"]["id"] == "t:1100" and again["window"]["rows"] == 40
    assert again["alert"]["id"] == alert["id"] and again["alert"]["decision"] == "duplicate"
    assert len(q.runner.requests) == 1

    nxt = q.monitor.check(now=1350.0)["versions"]["1"]  # [1200, 1300): complete, 10 rows < min_labels
    assert nxt["verdict"] == "insufficient labels" and nxt["reason"].startswith("10 labelled rows"), nxt


# -- (3) alerts from the estimate ----------------------------------------------------------------
_BINARY = {"metrics": {"accuracy": 0.9}, "classes": [0, 1], "calibration": {"binary": True, "maps": [IDENTITY]}}
_ESTIMATE = {"monitor.quality.estimate_alerts": True, "monitor.quality.window_seconds": 3600,
             "monitor.quality.window_rows": 100, "monitor.quality.min_labels": 50}


def test_an_estimated_drop_raises_one_alert_per_window_before_any_label(quality):
    q = quality(_BINARY, **_ESTIMATE)
    q.log(7000.0, [1] * 100, [[0.02, 0.98]] * 100, [0, 1])  # sure of itself: estimated accuracy 0.98
    calm = q.monitor.check(now=7300.0)["versions"]["1"]
    assert calm["verdict"] == "insufficient labels" and calm["estimated_latest"]["accuracy"] == pytest.approx(0.98)
    assert calm["estimate_alert"] is None

    q.log(7100.0, [1] * 100, [[0.4, 0.6]] * 100, [0, 1])  # unsure: 0.6 < 0.9 - 0.05, and no label yet
    out = q.monitor.check(now=7300.0)["versions"]["1"]
    assert out["estimated_latest"]["accuracy"] == pytest.approx(0.6)
    alert = out["estimate_alert"]
    assert alert["decision"] == "started", alert
    q.trigger.wait(alert["id"], timeout=30)
    assert [r.trigger for r in q.runner.requests] == [f"quality:{alert['id']}"]
    rec = q.alerts.get(alert["id"])
    assert rec["source"] == "quality" and rec["samples"] == 100 and rec["decision"] == "started"
    assert rec["details"]["estimated"] is True and rec["details"]["window"] == "estimate:2"
    assert rec["details"]["estimated_accuracy"] == pytest.approx(0.6)
    assert rec["details"]["degraded_metrics"] == ["accuracy (estimated)"]

    # the same window checked again: a duplicate, counted once; the next window: counted on the same alert
    assert q.monitor.check(now=7500.0)["versions"]["1"]["estimate_alert"]["decision"] == "duplicate"
    assert q.alerts_counted("quality_estimate") == 1.0
    q.log(10850.0, [1] * 100, [[0.4, 0.6]] * 100, [0, 1])
    later = q.monitor.check(now=10900.0)["versions"]["1"]["estimate_alert"]
    assert (later["id"], later["decision"]) == (alert["id"], "counted") and len(q.runner.requests) == 1


def test_an_estimate_alert_goes_through_the_guardrails_and_is_off_by_default(quality, tmp_path):
    q = quality(_BINARY, **_ESTIMATE, **{"trigger.min_samples": 500})
    q.log(7000.0, [1] * 100, [[0.4, 0.6]] * 100, [0, 1])
    alert = q.monitor.check(now=7300.0)["versions"]["1"]["estimate_alert"]
    assert alert["decision"] == "insufficient_samples" and "100 rows < trigger.min_samples=500" in alert["reason"]
    assert q.alerts.get(alert["id"])["decision"] == "insufficient_samples" and q.runner.requests == []

    off = {k: v for k, v in _ESTIMATE.items() if k != "monitor.quality.estimate_alerts"}
    default = _Quality(tmp_path / "off", _BINARY, **off)
    try:
        default.log(7000.0, [1] * 100, [[0.4, 0.6]] * 100, [0, 1])
        out = default.monitor.check(now=7300.0)["versions"]["1"]
        assert out["estimated_latest"]["accuracy"] == pytest.approx(0.6) and "estimate_alert" not in out
        assert default.runner.requests == []
    finally:
        default.close()


# -- (4) the feedback outbox's dead letters ------------------------------------------------------
class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # not the main thread
        pass


def _serve(app, port: int) -> tuple[_Server, threading.Thread]:
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, thread


def test_a_label_the_monitor_refuses_from_the_outbox_is_set_aside_with_its_reason(tmp_path):
    port = free_port("127.0.0.1")
    outbox = tmp_path / "gateway" / "feedback-outbox.db"
    store = InferenceStore(tmp_path / "inference.db")
    good1, good2 = {"id": "r1", "row_index": 0, "label": 1}, {"id": "r3", "row_index": 0, "label": 0}
    bad = {"id": "r2", "row_index": 0, "label": 0, "ts": "later"}  # the monitor answers 422

    async def scenario() -> dict:
        fwd = FeedbackForwarder(f"http://127.0.0.1:{port}/feedback", outbox, timeout=1.0, retry_seconds=3600)
        fwd.start()
        seen = {}
        try:
            seen["down"] = (await fwd.forward([good1])).outcome  # no monitor: queued
            seen["retry"] = await fwd.flush()  # still none: retried, kept
            seen["behind"] = [(await fwd.forward(b)).outcome for b in ([bad], [good2])]
            with sqlite3.connect(outbox) as db:
                seen["waiting"] = db.execute("SELECT attempts, last_error FROM outbox ORDER BY seq").fetchall()
            server, thread = _serve(create_sink_app(store, metrics=MonitorMetrics()), port)
            try:
                await fwd.flush()  # (the background retry may have sent them first)
                seen["direct"] = await fwd.forward([bad])  # sent directly: refused to the caller, not queued
            finally:
                server.should_exit = True
                await asyncio.to_thread(thread.join, 10)
            seen["pending"], seen["dead"] = fwd.pending(), fwd.dead()
        finally:
            await fwd.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen["down"] == "queued" and seen["retry"] == 0 and seen["behind"] == ["queued", "queued"]
    assert seen["waiting"][0][0] >= 2 and "monitor unreachable" in seen["waiting"][0][1]  # retried, kept
    assert seen["pending"] == 0  # the good ones sent, in order; the refused one set aside, not lost
    assert seen["direct"].outcome == "refused" and seen["direct"].status == 422
    (dead,) = seen["dead"]
    assert dead["items"] == [bad] and dead["reason"].startswith("422") and "ts must be epoch seconds" in dead["reason"]
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT request_id FROM labels ORDER BY rowid").fetchall() == [("r1",), ("r3",)]
    db.close()
    store.close()
    reopened = FeedbackForwarder("http://127.0.0.1:1/feedback", outbox)  # the dead letter survives a restart
    try:
        assert [d["items"] for d in reopened.dead()] == [[bad]] and reopened.pending() == 0
        assert reopened.counts() == {"pending": 0, "dead": 1}  # what the gateway's metric reports
    finally:
        asyncio.run(reopened.close())
