"""Quality monitoring on delayed labels: the fast path against Evidently's presets, the degradation
rule against the version's own holdout, the CBPE estimate, and — on the trained champion — pure
concept drift that input drift cannot see, caught by the quality check and retrained once."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from starlette.testclient import TestClient

from components.evaluate import calibration_map
from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC, SCENARIOS, generate
from driftloop.core.registry import Registry
from monitoring.estimate import Calibration, estimate_performance
from monitoring.quality import compare, evidently_quality, quality_metrics
from monitoring.service import WEBHOOK_TOKEN_ENV, MonitorService
from tests.ce_events import structured
from tests.conftest import make_settings
from tests.test_trigger import RecordingRunner

FEATURES = [*FEATURES_NUMERIC, *FEATURES_CATEGORICAL]


# -- fast path = Evidently -------------------------------------------------------------------------
def test_fast_path_gives_evidentlys_values():
    rng = np.random.default_rng(3)
    y = rng.normal(100, 10, 600)
    pred = 0.9 * y + rng.normal(4, 6, 600)
    fast = quality_metrics("regression", y, list(pred))
    _, judged = evidently_quality("regression", y, list(pred))
    assert set(judged) == {"rmse", "mae", "r2", "mean_error"}
    for key, value in judged.items():
        assert fast[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert fast["mean_error"] < 0  # predictions below the truth: a negative bias

    truth = rng.integers(0, 2, 600)
    p1 = np.clip(0.35 * truth + 0.65 * rng.random(600), 0, 1)
    scores = np.column_stack([1 - p1, p1])
    labels = (p1 > 0.5).astype(int)
    fast = quality_metrics("classification", list(truth), [[int(v)] for v in labels], scores, [0, 1])
    _, judged = evidently_quality("classification", list(truth), [[int(v)] for v in labels], scores, [0, 1])
    assert set(judged) == {"accuracy", "f1", "roc_auc"}
    for key, value in judged.items():
        assert fast[key] == pytest.approx(value, rel=1e-12), key
    assert 0.0 <= fast["ece"] <= 1.0


def test_rule_compares_with_the_versions_own_holdout():
    cfg = SimpleNamespace(max_relative={"rmse": 0.25}, max_absolute={"accuracy": 0.05, "mean_error": 5.0})
    holdout = {"rmse": 55.0, "accuracy": 0.80, "mean_error": -1.0}
    verdicts = {v.metric: v for v in compare({"rmse": 140.0, "accuracy": 0.78, "mean_error": -51.0}, holdout, cfg)}
    assert verdicts["rmse"].degraded and verdicts["rmse"].limit == pytest.approx(68.75)
    assert not verdicts["accuracy"].degraded and verdicts["accuracy"].limit == pytest.approx(0.75)
    assert verdicts["mean_error"].degraded  # |bias| 51 against 1 + 5
    calm = compare({"rmse": 60.0, "accuracy": 0.76}, holdout, cfg)
    assert not any(v.degraded for v in calm)
    assert compare({"r2": 0.1}, {"r2": 0.9}, cfg) == []  # no rule for r2 here: not judged


def test_cbpe_estimate_follows_the_realised_accuracy_under_covariate_shift():
    """Scores calibrated on a holdout; then the score distribution moves (covariate shift) while the
    relation holds: the estimated accuracy follows the realised one, window by window."""
    rng = np.random.default_rng(11)

    def sample(n, shift):
        x = rng.normal(shift, 1.0, n)
        p_true = 1 / (1 + np.exp(-2.0 * x))
        y = (rng.random(n) < p_true).astype(int)
        raw = 1 / (1 + np.exp(-3.0 * x))  # overconfident: needs calibration
        return y, np.column_stack([1 - raw, raw])

    y_hold, s_hold = sample(4000, 0.0)
    cal = Calibration.from_holdout({"classes": [0, 1], "calibration": calibration_map(y_hold, s_hold, [0, 1])})
    errors = []
    for shift in (0.0, 0.5, 1.0, 1.5, 2.0):
        y, s = sample(2000, shift)
        est = estimate_performance(s, cal)
        realised = float(np.mean(s.argmax(axis=1) == y))
        errors.append(abs(est.accuracy - realised))
        assert np.sum(est.confusion) == pytest.approx(2000)
    assert np.mean(errors) < 0.02, errors
    # uncalibrated confidence would over-estimate: the calibration matters
    y, s = sample(2000, 0.0)
    assert np.mean(s.max(axis=1)) - np.mean(s.argmax(axis=1) == y) > 0.03


# -- on the trained champion -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def champion_sklearn(trained):
    settings, _ = trained
    return Registry.from_settings(settings).load_sklearn("models:/churn@champion")


def _service(tmp_path, trained, monkeypatch, **extra):
    base, _ = trained
    cfg = {"mlflow.tracking_uri": base.tracking_uri, "monitor.window_rows": 300, "monitor.min_samples": 200,
           "monitor.check_interval_seconds": 3600, "trigger.cooldown_seconds": 3600, "trigger.min_samples": 100,
           "serving.name": "churn", "monitor.quality.window_rows": 200, "monitor.quality.min_labels": 200}
    cfg.update(extra)
    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, "token")
    runner = RecordingRunner()
    return MonitorService(make_settings(tmp_path / "ws", base.data.source, **cfg), runner=runner), runner


def _serve_and_label(client: TestClient, rows: pd.DataFrame, model, *, batch: int = 25) -> None:
    """What the gateway logs (request + response with class scores), then the labels, by ce-id."""
    features = rows[FEATURES]
    preds = [int(p) for p in model.predict(features)]
    scores = model.predict_proba(features).tolist()
    classes = [int(c) for c in model.classes_]
    instances = json.loads(features.to_json(orient="records"))
    events, labels = [], []
    for i in range(0, len(rows), batch):
        ce_id = uuid.uuid4().hex
        events.append(structured(ce_id, "request", {"instances": instances[i:i + batch]}))
        events.append(structured(ce_id, "response", {"predictions": preds[i:i + batch], "scores": scores[i:i + batch],
                                                     "classes": classes}, version="1", role="primary"))
        labels += [{"id": ce_id, "row_index": j, "label": int(y)} for j, y in enumerate(rows["label"][i:i + batch])]
    r = client.post("/events", content=json.dumps(events), headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 200, r.text
    r = client.post("/feedback", content=json.dumps(labels), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_pure_concept_drift_raises_one_quality_alert_and_one_retraining_run(tmp_path, trained, champion_sklearn,
                                                                          monkeypatch):
    service, runner = _service(tmp_path, trained, monkeypatch)
    concept = generate(rows=600, drift_at=0.0, drift=SCENARIOS["concept"], seed=21)
    with TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        _serve_and_label(client, concept.iloc[:150], champion_sklearn)
        early = client.post("/quality/check").json()["versions"]["1"]
        assert early["verdict"] == "insufficient labels" and early["labelled_rows"] == 150
        assert runner.requests == []

        _serve_and_label(client, concept.iloc[150:300], champion_sklearn)
        drift = client.post("/check").json()
        assert drift["verdict"] == "no drift", drift["result"]["drifted_columns"]  # inputs did not move

        outcome = client.post("/quality/check").json()["versions"]["1"]
        assert outcome["verdict"] == "degraded", outcome
        assert outcome["live"]["accuracy"] < outcome["holdout"]["accuracy"] - 0.05
        alert = outcome["alert"]
        assert alert["decision"] == "started" and "accuracy" in alert["degraded_metrics"]
        service.trigger.wait(alert["id"], timeout=30)
        assert [r.trigger for r in runner.requests] == [f"quality:{alert['id']}"]
        # the estimate from calibrated scores stays near the holdout: only labels can see concept drift
        assert outcome["estimated"]["accuracy"] > outcome["live"]["accuracy"] + 0.1

        # the same window again, then the next degraded window: still one run
        assert client.post("/quality/check").json()["versions"]["1"]["alert"]["decision"] == "duplicate"
        _serve_and_label(client, concept.iloc[300:500], champion_sklearn)
        later = client.post("/quality/check").json()["versions"]["1"]
        assert later["verdict"] == "degraded" and later["alert"]["decision"] == "counted"
        assert later["alert"]["id"] == alert["id"] and later["episode"]["failing_windows"] == 2
        assert len(runner.requests) == 1

        listed = [a for a in client.get("/alerts").json()["alerts"] if a["source"] == "quality"]
        assert [a["id"] for a in listed] == [alert["id"]]
        assert listed[0]["details"]["evidently"]["accuracy"] == pytest.approx(outcome["live"]["accuracy"], rel=1e-12)
        report = client.get(f"/reports/{alert['id']}")
        assert report.status_code == 200 and "<html" in report.text.lower()

        metrics = client.get("/metrics").text
        assert 'driftloop_monitor_quality_degraded{version="1"} 1.0' in metrics
        assert 'driftloop_monitor_quality_labelled_rows{version="1"} 500.0' in metrics
        assert 'driftloop_monitor_quality_holdout{metric="accuracy",version="1"}' in metrics
        assert 'driftloop_monitor_quality_estimated{metric="accuracy",version="1"}' in metrics

    registry = Registry.from_settings(service.settings)
    runs = registry.find_runs(f"tags.`driftloop.alert_id` = '{alert['id']}'")
    assert len(runs) == 1 and runs[0].data.tags["driftloop.kind"] == "quality-report"


class RejectingRunner(RecordingRunner):
    """The retraining run succeeds and registers nothing: its gate rejects the model."""

    def run_training(self, request, *, wait: bool = True):
        from pipelines.runner import RunResult

        self.requests.append(request)
        self.release.wait(30)
        return RunResult(request.request_id, f"run-{len(self.requests)}", "SUCCEEDED", "local",
                         summary={"gate": "rejected", "reason": "accuracy 0.70 < champion's 0.78"})


def test_a_quality_alert_during_the_drift_run_is_attached_and_acted_on_when_it_ends(tmp_path, trained,
                                                                                   champion_sklearn, monkeypatch):
    """Drifted inputs and a broken relation together: the drift alert starts a run; the quality alert raised
    while it runs is attached to it, not dropped, and judged again when the run has an outcome. The run
    registered nothing, so the champion stays degraded: needs-attention, in /alerts and on /metrics."""
    base, _ = trained
    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, "token")
    runner = RejectingRunner(hold=True)
    settings = make_settings(tmp_path / "ws", base.data.source, **{
        "mlflow.tracking_uri": base.tracking_uri, "monitor.window_rows": 300, "monitor.min_samples": 200,
        "monitor.check_interval_seconds": 3600, "trigger.cooldown_seconds": 0, "trigger.min_samples": 100,
        "serving.name": "churn", "monitor.quality.window_rows": 200, "monitor.quality.min_labels": 200})
    service = MonitorService(settings, runner=runner)
    both = generate(rows=300, drift_at=0.0, seed=23)  # covariate and concept drift
    with TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        _serve_and_label(client, both, champion_sklearn)
        drift = client.post("/check").json()["alert"]
        assert drift["decision"] == "started"
        quality = client.post("/quality/check").json()["versions"]["1"]["alert"]
        assert quality["decision"] == "attached" and drift["id"] in quality["reason"], quality
        runner.release.set()
        service.trigger.wait(drift["id"], timeout=30)
        service.trigger.follow()
        rec = client.get("/alerts").json()["alerts"]
        by_id = {a["id"]: a for a in rec}
        assert by_id[drift["id"]]["outcome"] == "not_registered"
        assert by_id[drift["id"]]["outcome_reason"] == "gate rejected: accuracy 0.70 < champion's 0.78"
        assert by_id[quality["id"]]["decision"] == "started", by_id[quality["id"]]["reason"]
        assert [r.trigger for r in runner.requests] == [f"drift:{drift['id']}", f"quality:{quality['id']}"]
        [attention] = [a for a in rec if a["source"] == "needs-attention"]
        assert attention["decision"] == "notify" and "registered no model version" in attention["reason"]
        assert 'driftloop_monitor_needs_attention{model="churn"} 1.0' in client.get("/metrics").text
        service.trigger.wait(quality["id"], timeout=30)


def test_no_alert_while_the_relation_holds(tmp_path, trained, champion_sklearn, monkeypatch):
    service, runner = _service(tmp_path, trained, monkeypatch)
    calm = generate(rows=2000, drift_at=None, seed=33).iloc[-200:]
    with TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        _serve_and_label(client, calm, champion_sklearn)
        outcome = client.post("/quality/check").json()["versions"]["1"]
    assert outcome["verdict"] == "ok", outcome["verdicts"]
    assert "alert" not in outcome and runner.requests == []
    assert outcome["baseline_source"] == "quality/holdout.json"
    assert abs(outcome["estimated"]["accuracy"] - outcome["live"]["accuracy"]) < 0.08


def test_lineage_and_alerts_show_a_quality_alert(tmp_path, capsys):
    from driftloop.app.lineage import _alert_detail
    from driftloop.app.monitor_cli import alerts_cmd
    from monitoring.alerts import Alert, AlertStore, alerts_path

    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet")
    store = AlertStore(alerts_path(settings))
    details = {"version": "1", "labelled_rows": 200, "verdicts": [
        {"metric": "accuracy", "live": 0.41, "holdout": 0.78, "limit": 0.73, "rule": "-0.05", "degraded": True},
        {"metric": "roc_auc", "live": 0.8, "holdout": 0.82, "limit": 0.77, "rule": "-0.05", "degraded": False}]}
    store.insert(Alert("quality-abc", "quality", details=details, samples=200, report_path="/r/quality.html"))
    store.record_decision("quality-abc", "started", "guardrails passed", now=0.0)
    store.close()
    detail = _alert_detail(settings, "quality-abc")
    assert detail["source"] == "quality" and detail["degraded metrics"] == "accuracy 0.41 vs holdout 0.78 (limit 0.73)"
    assert detail["quality report"] == "/r/quality.html" and detail["decision"].startswith("started")
    alerts_cmd(params=[f"workspace={tmp_path / 'ws'}"])
    row = next(line for line in capsys.readouterr().out.splitlines() if "quality-abc" in line)
    assert [c.strip() for c in row.split("│")][1:3] == ["quality-abc", "started"]
    alerts_cmd(params=[f"workspace={tmp_path / 'ws'}"], as_json=True)
    (entry,) = json.loads(capsys.readouterr().out)["alerts"]
    assert (entry["source"], entry["decision"], entry["report_path"]) == ("quality", "started", "/r/quality.html")


def test_predictor_logs_class_scores_only_when_asked(trained, champion_sklearn):
    from kserve.protocol.infer_type import InferInput, InferRequest

    from serving.predictor import SCORES_HEADER, DriftloopModel

    settings, _ = trained
    model = DriftloopModel("churn", "models:/churn@champion", tracking_uri=settings.tracking_uri)
    model.load()
    rows = generate(rows=300, drift_at=None, seed=2).iloc[:3]
    instances = json.loads(rows[FEATURES].to_json(orient="records"))
    expected = champion_sklearn.predict_proba(rows[FEATURES]).tolist()

    plain = model.predict({"instances": instances}, headers={})
    assert set(plain) == {"predictions", "model_version"}  # what clients get unless they ask

    # With scores asked for (the gateway asks on every request it logs) the model runs once: the
    # predictions come from predict_proba's argmax, and equal predict's on every row.
    many = generate(rows=2000, drift_at=0.5, seed=5)[FEATURES]
    many_instances = json.loads(many.to_json(orient="records"))
    two_calls = model.predict({"instances": many_instances}, headers={})["predictions"]
    model._predict_frame = lambda frame: pytest.fail("predict ran beside predict_proba")
    one_call = model.predict({"instances": many_instances}, headers={SCORES_HEADER: "true"})["predictions"]
    assert one_call == two_calls == champion_sklearn.predict(many).tolist()
    del model._predict_frame
    scored = model.predict({"instances": instances}, headers={SCORES_HEADER: "true"})
    assert scored["classes"] == [0, 1] and scored["predictions"] == plain["predictions"]
    assert np.allclose(scored["scores"], expected)

    inputs = []
    for col in FEATURES:
        values = rows[col].tolist()
        if col in FEATURES_NUMERIC:
            inputs.append(InferInput(col, [3], "FP64", [float(v) for v in values]))
        else:
            inputs.append(InferInput(col, [3], "BYTES", [str(v) for v in values]))
    v2 = model.predict(InferRequest("churn", inputs, request_id="r1"), headers={SCORES_HEADER: "true"})
    names = [o.name for o in v2.outputs]
    assert names == ["predictions", "scores"]
    assert np.allclose(np.asarray(v2.outputs[1].data).reshape(3, 2), expected)
    assert json.loads(v2.outputs[1].parameters["classes"]) == [0, 1]
    assert [o.name for o in model.predict(InferRequest("churn", inputs, request_id="r2"), headers={}).outputs] == \
        ["predictions"]


def test_regression_that_undershoots_raises_a_quality_alert_on_rmse_and_bias(tmp_path):
    """The filed case: seasonal demand grew, the champion predicts 37 % too low; its holdout RMSE was
    55. The labelled window's RMSE is judged against that (the inputs are not looked at)."""
    import mlflow

    from monitoring.alerts import AlertStore
    from monitoring.metrics import MonitorMetrics
    from monitoring.quality_check import QualityMonitor
    from monitoring.store import InferenceStore
    from monitoring.trigger import Trigger
    from monitoring.events import parse_structured

    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet", **{
        "model.task": "regression", "mlflow.model_name": "demand", "monitor.quality.window_rows": 100,
        "monitor.quality.min_labels": 100, "monitor.quality.max_absolute": {"mean_error": 20.0},
        "trigger.min_samples": 50})
    registry = Registry.from_settings(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    with mlflow.start_run(experiment_id=registry.experiment_id()) as run:
        mlflow.log_dict({"task": "regression", "metrics": {"rmse": 55.0, "mae": 44.0, "r2": 0.8, "mean_error": 1.0}},
                        "quality/holdout.json")
    registry.client.create_registered_model("demand")
    registry.client.create_model_version("demand", f"runs:/{run.info.run_id}/model", run.info.run_id)
    registry.set_alias("demand", "champion", "1")

    rng = np.random.default_rng(4)
    truth = rng.normal(380, 60, 120)
    preds = truth * 0.63 + rng.normal(0, 10, 120)  # 37 % too low
    store = InferenceStore(tmp_path / "inference.db")
    events, labels = [], []
    for i in range(0, 120, 10):
        ce_id = f"req-{i}"
        events.append(parse_structured(structured(ce_id, "request", {"instances": [{"t": float(j)} for j in range(10)]},
                                                  model="demand")))
        events.append(parse_structured(structured(ce_id, "response", {"predictions": list(preds[i:i + 10])},
                                                  model="demand", version="1")))
        labels += [{"id": ce_id, "row_index": j, "label": float(truth[i + j])} for j in range(10)]
    store.append_events(events)
    store.add_labels(labels)
    runner = RecordingRunner()
    alerts = AlertStore(tmp_path / "alerts.db")
    metrics = MonitorMetrics()
    trigger = Trigger(settings, alerts, runner=runner, metrics=metrics)
    quality = QualityMonitor(settings, store_path=store.path, registry=registry, alerts=alerts, trigger=trigger,
                             metrics=metrics, reports_dir=tmp_path / "reports")
    try:
        outcome = quality.check()["versions"]["1"]
        assert outcome["verdict"] == "degraded", outcome
        degraded = {v["metric"] for v in outcome["verdicts"] if v["degraded"]}
        assert {"rmse", "mae", "mean_error"} <= degraded
        assert outcome["live"]["rmse"] > 2 * 55.0 and outcome["live"]["mean_error"] < -100
        alert = outcome["alert"]
        assert alert["decision"] == "started"
        trigger.wait(alert["id"], timeout=30)
        assert [r.trigger for r in runner.requests] == [f"quality:{alert['id']}"]
        assert (tmp_path / "reports" / alert["id"] / "quality.html").is_file()
    finally:
        store.close()
        alerts.close()


def test_tumbling_blocks_keep_their_id_as_labels_arrive():
    from monitoring.quality import tumbling_block

    frame = pd.DataFrame({"ts": np.arange(250, dtype=float), "request_id": [f"r{i}" for i in range(250)],
                          "row_index": 0, "label": 1, "prediction": 1})
    block = tumbling_block(frame, rows=100, seconds=None, now=1e9)
    assert block.key == "rows:1" and block.complete and list(block.rows["ts"])[:1] == [100.0]
    assert not tumbling_block(frame.iloc[:40], rows=100, seconds=None, now=1e9).complete
    # by time: the latest complete interval [100, 200) at now=250; the running one only while none is complete
    timed = tumbling_block(frame, rows=1000, seconds=100.0, now=250.0)
    assert timed.key == "t:100" and timed.complete and len(timed.rows) == 100
    running = tumbling_block(frame[frame["ts"] >= 200], rows=1000, seconds=100.0, now=250.0)
    assert running.key == "t:200" and not running.complete
