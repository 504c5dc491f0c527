"""The monitor service: real CloudEvents into the sink, drift checks against the trained champion,
alerts, the Alertmanager webhook, reports in MLflow, metrics; and ``driftloop monitor`` stopping on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pandas as pd
import pytest
from starlette.testclient import TestClient

from driftloop.core.registry import Registry
from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC, generate
from monitoring.service import WEBHOOK_TOKEN_ENV, MonitorService
from tests.ce_events import structured
from tests.conftest import free_port, make_settings
from tests.test_trigger import RecordingRunner

FEATURES = [*FEATURES_NUMERIC, *FEATURES_CATEGORICAL]
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def champion_model(trained):
    settings, _ = trained
    return Registry.from_settings(settings).load_pyfunc("models:/churn@champion")


def _settings(tmp_path, trained, **extra):
    base, _ = trained
    cfg = {"mlflow.tracking_uri": base.tracking_uri, "monitor.window_rows": 300, "monitor.min_samples": 200,
           "monitor.min_requests": 2,
           "monitor.check_interval_seconds": 3600, "trigger.cooldown_seconds": 0, "trigger.min_samples": 100,
           "serving.name": "churn"}
    cfg.update(extra)
    return make_settings(tmp_path / "ws", base.data.source, **cfg)


def _service(tmp_path, trained, monkeypatch, **extra):
    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, TOKEN)
    runner = RecordingRunner()
    return MonitorService(_settings(tmp_path, trained, **extra), runner=runner), runner


def _auth(service: MonitorService) -> dict[str, str]:
    """The ingest token the monitor's /events, /feedback and checks require."""
    return {"authorization": f"Bearer {service.ingest_token}"}


def _send(client: TestClient, rows: pd.DataFrame, model, *, isvc: str = "churn", path: str = "/events") -> None:
    """The rows as request/response CloudEvents (one batch of structured events), predicted by ``model``,
    logged by InferenceService ``isvc``, posted to ``path``."""
    features = rows[FEATURES]
    preds = [int(p) for p in model.predict(features)]
    instances = json.loads(features.to_json(orient="records"))  # NaN -> null, as a JSON client sends it
    events = []
    for i in range(0, len(rows), 50):
        ce_id = uuid.uuid4().hex
        events.append(structured(ce_id, "request", {"instances": instances[i:i + 50]}, model=isvc))
        events.append(structured(ce_id, "response", {"predictions": preds[i:i + 50]}, model=isvc, version="1",
                                 role="champion"))
    r = client.post(path, content=json.dumps(events), headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 200, r.text


def _rows(drift: bool, n: int = 300, seed: int = 5) -> pd.DataFrame:
    return generate(rows=n, drift_at=0.0 if drift else None, seed=seed)


def test_drift_is_flagged_reported_and_triggers_one_run(tmp_path, trained, champion_model, monkeypatch):
    service, runner = _service(tmp_path, trained, monkeypatch)
    with TestClient(service.app, headers=_auth(service)) as client:
        _send(client, _rows(drift=True), champion_model)
        first = client.post("/check").json()
        assert first["verdict"] == "drift", first
        drifted = set(first["result"]["drifted_columns"])
        assert {"tenure", "monthly_spend", "sessions", "region"} <= drifted
        assert "plan" not in drifted and "latency_ms" not in drifted
        alert = first["alert"]
        assert alert["decision"] == "started"
        service.trigger.wait(alert["id"], timeout=30)
        # the same drift re-detected: same alert id, no second run
        again = client.post("/check").json()
        assert again["alert"]["id"] == alert["id"] and again["alert"]["decision"] == "duplicate"
        assert len(runner.requests) == 1 and runner.requests[0].trigger == f"drift:{alert['id']}"

        listed = client.get("/alerts").json()["alerts"]
        assert listed[0]["id"] == alert["id"] and listed[0]["decision"] == "started"
        assert listed[0]["model_version"] == "1" and listed[0]["samples"] == 300
        html = client.get(f"/reports/{alert['id']}")
        assert html.status_code == 200 and "<html" in html.text.lower()
        assert client.get("/reports/nope").status_code == 404

        metrics = client.get("/metrics").text
        assert 'driftloop_monitor_feature_drifted{feature="tenure",method="ks"} 1.0' in metrics
        assert "driftloop_monitor_window_rows 300.0" in metrics
        assert 'driftloop_monitor_trigger_decisions_total{decision="started"} 1.0' in metrics

    # the report is in MLflow, on a run tagged with the alert id and the champion version
    registry = Registry.from_settings(service.settings)
    runs = registry.find_runs(f"tags.`driftloop.alert_id` = '{alert['id']}'")
    assert len(runs) == 1 and runs[0].data.tags["driftloop.champion_version"] == "1"
    assert alert["report_uri"] == f"runs:/{runs[0].info.run_id}/drift_report/drift.html"
    artifacts = {a.path for a in registry.client.list_artifacts(runs[0].info.run_id, "drift_report")}
    assert artifacts == {"drift_report/drift.html", "drift_report/drift.json"}


def test_one_large_request_cannot_raise_an_alert_or_start_a_run(tmp_path, trained, champion_model, monkeypatch):
    """A single V1 request of many identical drifted rows fills no window: requests count, rows are capped."""
    service, runner = _service(tmp_path, trained, monkeypatch, **{"monitor.min_requests": 5,
                                                                  "monitor.max_rows_per_request": 40,
                                                                  "monitor.window_rows": 1500})
    with TestClient(service.app, headers=_auth(service)) as client:
        row = _rows(drift=True, n=1)
        _send_one_request(client, pd.concat([row] * 1500, ignore_index=True), champion_model)
        outcome = client.post("/check").json()
        assert outcome["verdict"] == "insufficient data", outcome
        assert outcome["window"]["rows"] == 40 and outcome["window"]["requests"] == 1
        assert "monitor.min_requests=5" in outcome["reason"] and "no run starts" in outcome["reason"]
        assert "alert" not in outcome and client.get("/alerts").json()["alerts"] == []
        # many requests, each capped, make the next window: the same drift is then judged and acted on
        for seed in range(6):
            _send_one_request(client, _rows(drift=True, n=250, seed=seed), champion_model)
        judged = client.post("/check").json()
        assert judged["verdict"] == "drift" and judged["window"]["requests"] == 6, judged
        assert judged["alert"]["decision"] == "started"
        service.trigger.wait(judged["alert"]["id"], timeout=30)
    assert len(runner.requests) == 1


def test_a_partial_window_is_never_judged(tmp_path, trained, champion_model, monkeypatch):
    """315 drifted rows of a 500-row window: no verdict, no alert, until the window is complete."""
    service, runner = _service(tmp_path, trained, monkeypatch, **{"monitor.window_rows": 500})
    with TestClient(service.app, headers=_auth(service)) as client:
        _send(client, _rows(drift=True, n=315), champion_model)
        partial = client.post("/check").json()
        assert partial["verdict"] == "insufficient data" and partial["window"]["complete"] is False, partial
        assert "not complete yet (315 rows so far; monitor.window_rows=500)" in partial["reason"]
        assert "alert" not in partial and client.get("/alerts").json()["alerts"] == []
        assert "driftloop_monitor_dataset_drift 0.0" in client.get("/metrics").text  # nothing judged, nothing set
        _send(client, _rows(drift=True, n=185, seed=7), champion_model)
        complete = client.post("/check").json()
        assert complete["verdict"] == "drift" and complete["window"]["rows"] == 500
        assert complete["alert"]["decision"] == "started"
        service.trigger.wait(complete["alert"]["id"], timeout=30)
    assert len(runner.requests) == 1


def test_a_drift_storm_raises_one_alert_per_episode(tmp_path, trained, champion_model, monkeypatch):
    """Window after drifted window: one alert, one report, one run; the others are counted on it. Calm
    windows end the episode (monitor.resolve_windows in a row), and drift after that is a new alert."""
    service, runner = _service(tmp_path, trained, monkeypatch, **{"monitor.resolve_windows": 2})
    with TestClient(service.app, headers=_auth(service)) as client:
        outcomes = []
        for seed in range(4):
            _send(client, _rows(drift=True, seed=20 + seed), champion_model)
            outcomes.append(client.post("/check").json())
        first = outcomes[0]["alert"]
        assert first["decision"] == "started" and all(o["verdict"] == "drift" for o in outcomes)
        assert [o["alert"]["id"] for o in outcomes] == [first["id"]] * 4
        assert [o["alert"]["decision"] for o in outcomes[1:]] == ["counted"] * 3
        assert outcomes[-1]["episode"]["failing_windows"] == 4 and outcomes[-1]["episode"]["alert"] == first["id"]
        service.trigger.wait(first["id"], timeout=30)
        listed = client.get("/alerts").json()["alerts"]
        assert [a["id"] for a in listed] == [first["id"]] and listed[0]["episode_windows"] == 4
        assert sorted(p.name for p in service.reports_dir.iterdir()) == [first["id"]]  # one Evidently report
        assert 'driftloop_monitor_alerts_total{source="drift"} 1.0' in client.get("/metrics").text
        for seed in range(2):
            _send(client, _rows(drift=False, seed=40 + seed), champion_model)
            calm = client.post("/check").json()
        assert calm["verdict"] == "no drift" and calm["episode"]["closed"] is not None
        _send(client, _rows(drift=True, seed=50), champion_model)
        again = client.post("/check").json()
        assert again["alert"]["id"] != first["id"] and again["episode"]["failing_windows"] == 1
    assert len(runner.requests) == 2


def _send_one_request(client: TestClient, rows: pd.DataFrame, model) -> None:
    features = rows[FEATURES]
    preds = [int(p) for p in model.predict(features)]
    ce_id = uuid.uuid4().hex
    instances = json.loads(features.to_json(orient="records"))
    events = [structured(ce_id, "request", {"instances": instances}),
              structured(ce_id, "response", {"predictions": preds}, version="1", role="champion")]
    r = client.post("/events", content=json.dumps(events), headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 200, r.text


def test_no_drift_and_insufficient_data(tmp_path, trained, champion_model, monkeypatch):
    service, runner = _service(tmp_path, trained, monkeypatch)
    with TestClient(service.app, headers=_auth(service)) as client:
        _send(client, _rows(drift=False, n=100), champion_model)
        thin = client.post("/check").json()
        assert thin["verdict"] == "insufficient data" and "100 rows" in thin["reason"]
        _send(client, _rows(drift=False, n=200, seed=6), champion_model)
        calm = client.post("/check").json()
        assert calm["verdict"] == "no drift", calm["result"]["drifted_columns"]
        assert "alert" not in calm and client.get("/alerts").json()["alerts"] == []
        assert "driftloop_monitor_dataset_drift 0.0" in client.get("/metrics").text
    assert runner.requests == []


def test_alertmanager_webhook_needs_the_token(tmp_path, trained, monkeypatch):
    service, runner = _service(tmp_path, trained, monkeypatch)
    payload = {"version": "4", "status": "firing", "receiver": "driftloop", "alerts": [
        {"status": "firing", "labels": {"alertname": "ChurnDrift"}, "fingerprint": "f00d",
         "startsAt": "2026-01-31T00:00:00Z"}]}
    with TestClient(service.app, headers=_auth(service)) as client:
        assert client.post("/alerts/alertmanager", json=payload).status_code == 401
        wrong = client.post("/alerts/alertmanager", json=payload, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "token" in wrong.json()["error"]
        auth = {"authorization": f"Bearer {TOKEN}"}
        bad = client.post("/alerts/alertmanager", content=b"{not json", headers=auth)
        assert bad.status_code == 400 and "not JSON" in bad.json()["error"]
        bad = client.post("/alerts/alertmanager", json={"alerts": [{"startsAt": "2026-01-31T00:00:00Z"}]}, headers=auth)
        assert bad.status_code == 400 and "fingerprint" in bad.json()["error"]
        ok = client.post("/alerts/alertmanager", json=payload, headers=auth).json()["decisions"]
        assert ok[0]["decision"] == "started"
        service.trigger.wait(ok[0]["id"], timeout=30)
        again = client.post("/alerts/alertmanager", json=payload, headers=auth).json()["decisions"]
        assert again[0] == {**again[0], "id": ok[0]["id"], "decision": "duplicate"}
        metrics = client.get("/metrics").text
        assert 'driftloop_monitor_events_rejected_total{reason="webhook_unauthorized"} 2.0' in metrics
        assert 'driftloop_monitor_events_rejected_total{reason="webhook_malformed"} 2.0' in metrics
    assert len(runner.requests) == 1
    newest = pd.read_parquet(service.settings.data.source)["event_time"].max()  # the data's end, not startsAt
    assert runner.requests[0].window_end == (newest.floor("s") + pd.Timedelta(seconds=1)).isoformat()


def test_missing_reference_is_an_error_not_a_pass(tmp_path, scenario_path, monkeypatch):
    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, TOKEN)
    settings = make_settings(tmp_path / "empty", scenario_path, **{"monitor.min_samples": 1})
    service = MonitorService(settings, runner=RecordingRunner())
    with TestClient(service.app, headers=_auth(service)) as client:
        r = client.post("/check")
        assert r.status_code == 409 and "no drift reference" in r.json()["error"]


def test_monitor_command_serves_and_stops_on_sigterm(tmp_path, trained):
    settings = _settings(tmp_path, trained)
    port = free_port()
    env = {**os.environ, "DRIFTLOOP_WORKSPACE": str(settings.workspace_dir),
           "DRIFTLOOP_MLFLOW__TRACKING_URI": settings.tracking_uri, "DRIFTLOOP_MLFLOW__MODEL_NAME": "churn",
           "DRIFTLOOP_MLFLOW__EXPERIMENT": "test"}
    proc = subprocess.Popen([sys.executable, "-m", "driftloop.app.cli", "monitor", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail(proc.communicate(timeout=5)[0].decode()[-2000:])
        assert httpx.get(f"http://127.0.0.1:{port}/alerts").json() == {"alerts": []}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_drift_check_command_prints_the_table_and_writes_reports(tmp_path):
    from typer.testing import CliRunner

    from driftloop.app.cli import app
    from driftloop.core.errors import DataSourceError

    ref, cur = tmp_path / "ref.parquet", tmp_path / "cur.csv"
    generate(rows=1500, drift_at=None, seed=1).to_parquet(ref)
    generate(rows=400, drift_at=0.0, seed=2).to_csv(cur, index=False)
    html, js = tmp_path / "out" / "report.html", tmp_path / "out" / "report.json"
    result = CliRunner().invoke(app, ["drift", "check", "--reference", str(ref), "--current", str(cur),
                                      "--html", str(html), "--json", str(js), "--exclude", "label"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 5}
    assert "wasserstein" in lines["tenure"] and "yes" in lines["tenure"]
    assert "jensenshannon" in lines["region"] and "yes" in lines["region"]
    assert "no" in lines["latency_ms"] and "label" not in lines and "event_time" not in lines
    assert "dataset drift" in result.output
    assert html.stat().st_size > 10_000 and json.loads(js.read_text())["metrics"]
    missing = CliRunner().invoke(app, ["drift", "check", "--reference", str(tmp_path / "nope.parquet"),
                                       "--current", str(cur)])
    assert isinstance(missing.exception, DataSourceError)


def test_alerts_command_lists_decisions_and_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from driftloop.app.cli import app, console
    from monitoring.alerts import Alert, AlertStore
    from monitoring.trigger import Trigger

    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet", **{"trigger.min_samples": 1})
    trig = Trigger(settings, AlertStore.from_settings(settings), runner=RecordingRunner())
    started = trig.submit(Alert("drift-aaaa", "drift", samples=500))
    trig.wait(started.alert_id, timeout=30)
    trig.submit(Alert("drift-bbbb", "drift", samples=500))  # in cooldown (default 1 h)
    for key, value in {"WORKSPACE": str(settings.workspace_dir), "MLFLOW__MODEL_NAME": "churn",
                       "MLFLOW__EXPERIMENT": "test"}.items():
        monkeypatch.setenv(f"DRIFTLOOP_{key}", value)
    monkeypatch.setattr(console, "width", 250)
    result = CliRunner().invoke(app, ["alerts"])
    assert result.exit_code == 0, result.output
    rows, block = {}, []  # each alert is one row of the table, folded over several lines
    for line in result.output.splitlines():
        if line.startswith(("├", "╰")):
            if block and "drift-" in block[0]:
                rows[block[0].split("│")[1].strip()] = " ".join(block)
            block = []
        elif line.startswith("│"):
            block.append(line)
    assert "started" in rows["drift-aaaa"] and "churn v1" in rows["drift-aaaa"] and "run-1" in rows["drift-aaaa"]
    assert "cooldown" in rows["drift-bbbb"] and "SUCCEEDED" not in rows["drift-bbbb"]


def test_sliding_window_and_report_on_request_on_a_bounded_sample(tmp_path, trained, champion_model, monkeypatch):
    service, runner = _service(tmp_path, trained, monkeypatch, **{
        "monitor.window_kind": "sliding", "monitor.window_rows": 250, "monitor.report_sample_rows": 100})
    with TestClient(service.app, headers=_auth(service)) as client:
        _send(client, _rows(drift=False, n=300, seed=8), champion_model)
        out = client.post("/check", params={"report": "true"}).json()
        assert out["window"]["kind"] == "sliding" and out["window"]["rows"] == 250
        assert out["verdict"] == "no drift" and out["alert"]["decision"] == "report_only"
        report = json.loads((service.reports_dir / out["alert"]["id"] / "drift.json").read_text())
        drift_metrics = [m for m in report["metrics"] if "ValueDrift" in m["config"]["type"]]
        assert len(drift_metrics) == len(FEATURES) + 1  # the features and the prediction
        assert client.get(f"/reports/{out['alert']['id']}").status_code == 200
        details = client.get("/alerts").json()["alerts"][0]["details"]
        assert details["evidently"]["n_current"] == 100 and details["fast_path"]["n_current"] == 250
    assert runner.requests == []
