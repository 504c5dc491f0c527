"""A fleet's one monitor: every model's monitor in one app on one port, one check loop for all of them.

Three models share the session's trained champion (its version copied to each model's name in a copy of
its MLflow store) and a fourth has no champion yet; each keeps its own store, alerts, trigger and token."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
import time

import pytest
from mlflow.tracking import MlflowClient
from starlette.testclient import TestClient
from typer.testing import CliRunner

from driftloop.core.fleet import load_fleet
from monitoring.fleet_service import WAITING, FleetChecks, FleetMonitor
from monitoring.service import MonitorService
from tests.test_monitor_service import _rows, _send, champion_model  # noqa: F401 (a fixture)
from tests.test_trigger import RecordingRunner

MODELS = ("alpha", "beta", "gamma")  # each with a champion; "delta" has none yet


@pytest.fixture(scope="module")
def fleet_file(tmp_path_factory, trained):
    """A fleet file of four models over a copy of the trained MLflow store (the session's stays as it is)."""
    base, _ = trained
    root = tmp_path_factory.mktemp("fleet")
    db = root / "mlflow.db"
    shutil.copy(base.tracking_uri.removeprefix("sqlite:///"), db)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    for name in MODELS:
        version = client.copy_model_version("models:/churn/1", name)
        client.set_registered_model_alias(name, "champion", version.version)
    path = root / "fleet.yaml"
    path.write_text(f"""\
workspace: {root / "ws"}
defaults:
  data: {{source: {base.data.source}, time_column: event_time, reference_size: 1000}}
  mlflow: {{tracking_uri: "sqlite:///{db}", experiment: test}}
  monitor: {{window_rows: 300, min_samples: 200, min_requests: 2, check_interval_seconds: 3600}}
  trigger: {{cooldown_seconds: 0, min_samples: 100}}
models:
  alpha: {{team: growth}}
  beta: {{team: growth}}
  gamma: {{team: planning}}
  delta: {{team: planning}}
""")
    return path


def _as(client: TestClient, fleet: FleetMonitor, name: str) -> None:
    """The client speaks with model ``name``'s ingest token from now on."""
    client.headers["authorization"] = f"Bearer {fleet.services[name].ingest_token}"


def test_one_monitor_keeps_each_model_apart(fleet_file, champion_model):
    runners = {name: RecordingRunner() for name in (*MODELS, "delta")}
    fleet = FleetMonitor(load_fleet(fleet_file).models,
                         service=lambda m: MonitorService(m.settings, runner=runners[m.name]))
    with TestClient(fleet) as client:
        for name in MODELS:  # drifted traffic on beta only
            _as(client, fleet, name)
            _send(client, _rows(drift=name == "beta", seed=3), champion_model, isvc=name,
                  path=f"/models/{name}/events")
        counts = {name: fleet.services[name].store.count() for name in MODELS}
        assert counts == dict.fromkeys(MODELS, 300)  # each model's events in its own store only
        assert fleet.services["delta"].store.count() == 0

        fleet.checks.round_all()  # the fleet's pool: every model's round
        alert = fleet.services["beta"].last_outcome["alert"]
        assert alert["decision"] == "started"
        fleet.services["beta"].trigger.wait(alert["id"], timeout=30)
        assert [r.trigger for r in runners["beta"].requests] == [f"drift:{alert['id']}"]
        assert all(not runners[n].requests for n in ("alpha", "gamma", "delta"))
        states = {row["name"]: row for row in client.get("/models").json()["models"]}
        assert states["beta"]["state"] == "drift" and states["beta"]["open_alerts"] == 1
        assert [states[n]["state"] for n in ("alpha", "gamma")] == ["no drift", "no drift"]
        assert states["alpha"]["open_alerts"] == 0 and states["alpha"]["last_check"] is not None
        assert states["delta"]["state"] == WAITING and states["delta"]["error"] is None
        assert client.get("/models/beta/alerts").json()["alerts"][0]["id"] == alert["id"]
        assert client.get("/models/alpha/alerts").json()["alerts"] == []

        metrics = client.get("/metrics").text
        assert 'driftloop_monitor_dataset_drift{model="beta"} 1.0' in metrics
        assert 'driftloop_monitor_dataset_drift{model="alpha"} 0.0' in metrics
        assert 'driftloop_monitor_rows_stored_total{model="gamma"} 300.0' in metrics
        assert metrics.count("# TYPE driftloop_monitor_dataset_drift gauge") == 1  # one family, every model

        # an unknown model is a 404 naming it; another model's token, or none, is refused as today
        missing = client.post("/models/nope/events", content=b"[]")
        assert missing.status_code == 404 and "'nope'" in missing.json()["error"]
        _as(client, fleet, "beta")
        wrong = client.post("/models/alpha/events", content=b"{}",
                            headers={"content-type": "application/cloudevents+json"})
        assert wrong.status_code == 401
        del client.headers["authorization"]
        assert client.post("/models/alpha/check").status_code == 401
        assert client.get("/openapi.json").json()["paths"]["/models/{model}/events"]["post"]

        # a corrupt store stops its own model's checks only
        store = fleet.services["gamma"].store.path
        with contextlib.closing(sqlite3.connect(store)) as db:  # every page in the file itself: else a reader
            assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # finds them in the WAL
        store.write_bytes(b"this is no database" * 512)
        before = {n: fleet.services[n].last_round for n in MODELS}
        fleet.checks.round_all()
        states = {row["name"]: row for row in client.get("/models").json()["models"]}
        assert states["gamma"]["state"] in ("check failing", "check skipped"), states["gamma"]
        assert "database" in states["gamma"]["error"]
        assert all(fleet.services[n].last_round > before[n] for n in ("alpha", "beta"))
        assert states["alpha"]["state"] == "no drift" and states["beta"]["state"] == "drift"
    # a fleet's model run alone answers on the same path (the gateway's sink URL works either way)
    with TestClient(fleet.services["alpha"].served_app) as alone:
        _as(alone, fleet, "alpha")
        _send(alone, _rows(drift=False, n=50, seed=9), champion_model, isvc="alpha", path="/models/alpha/events")
        assert alone.post("/events").status_code == 404
    assert fleet.services["alpha"].store.count() == 350
    fleet.close()


def _own_workspace(fleet_file, tmp_path):
    """The fleet's models with a workspace of their own: the module's other tests keep theirs."""
    moved = tmp_path / "fleet.yaml"
    moved.write_text(fleet_file.read_text().replace(str(fleet_file.parent / "ws"), str(tmp_path / "ws")))
    return load_fleet(moved).models


def test_a_failing_intake_journal_makes_the_fleet_unready_and_refuses_events(fleet_file, champion_model, tmp_path):
    models = _own_workspace(fleet_file, tmp_path)
    fleet = FleetMonitor(models, intake=tmp_path / "intake.db",
                         service=lambda m: MonitorService(m.settings, runner=RecordingRunner()))
    try:
        with TestClient(fleet) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["intake"] == "ready"
            (tmp_path / "other.db").write_bytes((tmp_path / "intake.db").read_bytes())
            os.replace(tmp_path / "other.db", tmp_path / "intake.db")  # the journal replaced under the monitor
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "intake.db was replaced" in ready.json()["intake"], ready.json()
            assert ready.json()["models"]["alpha"].startswith("intake journal unavailable")
            _as(client, fleet, "alpha")
            with pytest.raises(AssertionError, match="intake journal"):
                _send(client, _rows(drift=False, n=50, seed=9), champion_model, isvc="alpha",
                      path="/models/alpha/events")
            assert fleet.services["alpha"].store.count() == 0  # nothing acknowledged, nothing stored
    finally:
        fleet.close()


def test_the_fleets_intake_journal_serves_the_same_loop(fleet_file, champion_model, tmp_path):
    """The monitor command's fleet path: every model's events through one intake journal. Each model's store
    holds its own traffic (a read moves what waits), the checks judge it, a kill loses nothing."""
    models = _own_workspace(fleet_file, tmp_path)
    runners = {m.name: RecordingRunner() for m in models}
    build = lambda m: MonitorService(m.settings, runner=runners[m.name])  # noqa: E731
    fleet = FleetMonitor(models, intake=tmp_path / "intake.db", service=build)
    assert fleet.intake is not None and fleet.intake.drain_seconds > 0
    with TestClient(fleet) as client:
        for name in MODELS:
            _as(client, fleet, name)
            _send(client, _rows(drift=name == "beta", seed=3), champion_model, isvc=name,
                  path=f"/models/{name}/events")
        assert {name: fleet.services[name].store.count() for name in MODELS} == dict.fromkeys(MODELS, 300)
        fleet.checks.round_all()
        alert = fleet.services["beta"].last_outcome["alert"]
        assert alert["decision"] == "started"
        assert all(fleet.services[n].last_outcome["verdict"] == "no drift" for n in ("alpha", "gamma"))
        assert "driftloop_fleet_intake_waiting_events 0.0" in client.get("/metrics").text
        # acknowledged and not yet moved when the process goes away (the journal as a kill leaves it) ...
        fleet.intake.drain_seconds = 3600
        fleet.intake.drain()  # the next one in an hour
        _as(client, fleet, "alpha")
        _send(client, _rows(drift=False, n=50, seed=9), champion_model, isvc="alpha", path="/models/alpha/events")
        assert fleet.intake.waiting == 2  # events: one request and one response of 50 rows
        fleet.intake._waiting.clear()
        fleet.intake._counts.clear()
    fleet.close()
    # ... a monitor of alpha alone (a one-model monitor of the fleet file) moves them into alpha's store
    alone = FleetMonitor([m for m in models if m.name == "alpha"], intake=tmp_path / "intake.db", service=build)
    try:
        assert alone.intake is None and alone.services["alpha"].store.count() == 350
    finally:
        alone.close()


class _Stub:
    """What the loop uses of a model's monitor: its interval and its round."""

    def __init__(self, interval: float, fail: bool = False) -> None:
        self.settings = type("S", (), {"monitor": type("M", (), {"check_interval_seconds": interval})()})()
        self.rounds = 0
        self.fail = fail
        self.done = threading.Event()

    def _round(self, lines) -> None:
        self.rounds += 1
        if self.rounds >= 2:
            self.done.set()
        if self.fail:
            raise RuntimeError("store is garbage")


def test_the_loop_honours_each_interval_and_survives_a_failing_round():
    stubs = {"fast": _Stub(0.02), "slow": _Stub(0.2), "broken": _Stub(0.02, fail=True)}
    checks = FleetChecks(stubs, workers=2)
    checks.start()
    try:
        assert stubs["slow"].done.wait(30) and stubs["broken"].done.wait(30)
    finally:
        checks.stop()
    assert stubs["fast"].rounds > stubs["slow"].rounds >= 2  # the broken one's failures stopped nothing
    ran = stubs["fast"].rounds
    time.sleep(0.1)
    assert stubs["fast"].rounds == ran  # stopped


def test_monitor_command_on_a_fleet(fleet_file, monkeypatch):
    from driftloop.app.cli import app

    served = []
    def run(self, host, port):
        served.append((list(self.models), port))
        assert (self.intake is not None) == (len(self.models) > 1)  # the journal when it hosts two models or more
        self.close()

    monkeypatch.setattr(FleetMonitor, "run", run)
    result = CliRunner().invoke(app, ["monitor", "-c", str(fleet_file), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert served == [(["alpha", "beta", "gamma", "delta"], 0)]
    result = CliRunner().invoke(app, ["monitor", "-c", str(fleet_file), "--model", "gamma", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert served[-1] == (["gamma"], 0)
    refused = CliRunner().invoke(app, ["alerts", "-c", str(fleet_file)])
    assert refused.exit_code != 0 and "pass --model NAME (models: alpha, beta, gamma, delta)" in str(refused.exception)
    listed = CliRunner().invoke(app, ["alerts", "-c", str(fleet_file), "--model", "delta", "--json"])
    assert listed.exit_code == 0 and '"alerts"' in listed.output


def _am_alert(fingerprint: str, **labels: str) -> dict:
    return {"status": "firing", "fingerprint": fingerprint, "startsAt": "2026-12-07T06:00:00Z",
            "labels": {"alertname": "DriftloopDatasetDrift", "driftloop_action": "retrain", **labels}}


def test_the_fleets_alertmanager_webhook_hands_each_alert_to_its_model(fleet_file, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_WEBHOOK_TOKEN", "am-token")
    runners = {name: RecordingRunner() for name in (*MODELS, "delta")}
    fleet = FleetMonitor(load_fleet(fleet_file).models,
                         service=lambda m: MonitorService(m.settings, runner=runners[m.name]))

    def stored(name: str) -> list[dict]:
        return [a for a in fleet.services[name].alerts.recent(50) if a["source"] == "alertmanager"]

    with TestClient(fleet) as client:
        payload = {"receiver": "driftloop-trigger", "status": "firing",
                   "alerts": [_am_alert("f-alpha", model="alpha"), _am_alert("f-beta", model="beta")]}
        assert client.post("/alerts/alertmanager", json=payload).status_code == 401  # no token
        auth = {"authorization": "Bearer am-token"}
        # a bogus alert refuses the whole delivery, naming it, before any model sees the others
        bad = {**payload, "alerts": [payload["alerts"][0], _am_alert("f-none", namespace="growth")]}
        r = client.post("/alerts/alertmanager", json=bad, headers=auth)
        assert r.status_code == 400 and "alerts[1] has no 'model' label" in r.json()["error"]
        r = client.post("/alerts/alertmanager", json={**payload, "alerts": [_am_alert("f-x", model="nope")]},
                        headers=auth)
        assert r.status_code == 400 and "'nope'" in r.json()["error"]
        assert client.post("/alerts/alertmanager", content=b"{", headers=auth).status_code == 400
        assert all(stored(n) == [] for n in fleet.services)

        r = client.post("/alerts/alertmanager", json=payload, headers=auth)
        assert r.status_code == 200, r.text
        decisions = {d["model"]: d for d in r.json()["decisions"]}
        assert set(decisions) == {"alpha", "beta"} and decisions["alpha"]["decision"] == "started"
        assert [a["id"] for a in stored("alpha")] == [decisions["alpha"]["id"]]
        assert [a["id"] for a in stored("beta")] == [decisions["beta"]["id"]]
        assert stored("delta") == []
        fleet.services["alpha"].trigger.wait(decisions["alpha"]["id"], timeout=30)
        assert [r.trigger for r in runners["alpha"].requests] == [f"drift:{decisions['alpha']['id']}"]
        assert not runners["delta"].requests
        # Alertmanager's retry of the same delivery starts nothing new
        again = client.post("/alerts/alertmanager", json=payload, headers=auth).json()["decisions"]
        assert all(d["decision"] != "started" for d in again), again
        assert client.get("/openapi.json").json()["paths"]["/alerts/alertmanager"]["post"]
        metrics = client.get("/metrics").text
        assert 'driftloop_fleet_webhook_rejected_total{reason="webhook_malformed"} 3.0' in metrics
        assert 'driftloop_fleet_webhook_rejected_total{reason="webhook_unauthorized"} 1.0' in metrics
    fleet.close()
