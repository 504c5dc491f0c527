"""Alerts and the retraining trigger: guardrails with a recording runner, and one real pipeline run."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from pipelines.runner import RunResult
from monitoring.alerts import Alert, AlertStore, alertmanager_alerts, drift_alert_id, in_blackout
from monitoring.metrics import MonitorMetrics
from monitoring.trigger import Trigger, retrain_window, worker_alive
from tests.conftest import make_settings


class RecordingRunner:
    """Test double: records what the real runner would be asked to run; can hold a run 'in flight'."""

    def __init__(self, hold: bool = False) -> None:
        self.requests = []
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def run_training(self, request, *, wait: bool = True) -> RunResult:
        self.requests.append(request)
        self.release.wait(30)
        return RunResult(request.request_id, f"run-{len(self.requests)}", "SUCCEEDED", "local",
                         summary={"model_version": str(len(self.requests))})


class Clock:
    def __init__(self, now: float = 1_767_225_600.0) -> None:  # 2026-01-01 00:00 UTC
        self.now = now

    def __call__(self) -> float:
        return self.now


def _trigger(tmp_path, runner=None, clock=None, **trigger_cfg):
    cfg = {"trigger.cooldown_seconds": 0, "trigger.daily_budget": 100, "trigger.min_samples": 10}
    cfg.update({f"trigger.{k}": v for k, v in trigger_cfg.items()})
    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet", **cfg)
    metrics = MonitorMetrics()
    trig = Trigger(settings, AlertStore.from_settings(settings), runner=runner or RecordingRunner(),
                   metrics=metrics, clock=clock or Clock())
    return trig, metrics


def _alert(n: int, samples: int = 500) -> Alert:
    return Alert(drift_alert_id("churn", "1", n, n + 1), "drift", samples=samples,
                 window_end="2026-02-01T00:00:00+00:00")


def _finish(trig: Trigger, alert_id: str) -> dict:
    return trig.wait(alert_id, timeout=30)


def test_same_alert_twice_starts_one_run(tmp_path):
    trig, metrics = _trigger(tmp_path)
    first = trig.submit(_alert(1))
    rec = _finish(trig, first.alert_id)
    again = trig.submit(_alert(1))
    assert (first.decision, again.decision) == ("started", "duplicate")
    assert len(trig.runner.requests) == 1
    req = trig.runner.requests[0]
    assert req.trigger == f"drift:{first.alert_id}" and req.request_id == first.request_id
    assert rec["pipeline_run_id"] == "run-1" and rec["model_version"] == "1" and rec["run_state"] == "SUCCEEDED"
    assert trig.alerts.get(first.alert_id)["deliveries"] == 2 and rec["decision"] == "started"
    assert [d["decision"] for d in trig.alerts.decisions(first.alert_id)] == ["started", "duplicate"]
    assert metrics.trigger_decisions.labels(decision="duplicate")._value.get() == 1


def test_cooldown_and_daily_budget_hold(tmp_path):
    clock = Clock()
    trig, _ = _trigger(tmp_path, clock=clock, cooldown_seconds=600, daily_budget=2)
    assert trig.submit(_alert(1)).decision == "started"
    _finish(trig, _alert(1).id)
    clock.now += 300
    refused = trig.submit(_alert(2))
    assert refused.decision == "cooldown" and "300s left" in refused.reason
    clock.now += 301
    assert trig.submit(_alert(3)).decision == "started"
    _finish(trig, _alert(3).id)
    clock.now += 3600
    budget = trig.submit(_alert(4))
    assert budget.decision == "budget" and "daily_budget=2" in budget.reason
    clock.now += 86400  # a day after the first run: one slot free again
    assert trig.submit(_alert(5)).decision == "started"
    assert len(trig.runner.requests) == 3


def test_blackout_and_min_samples_hold(tmp_path):
    clock = Clock(1_767_225_600.0 + 23 * 3600)  # 23:00 UTC
    trig, _ = _trigger(tmp_path, clock=clock, blackout=["22:00-06:00"])
    small = trig.submit(_alert(1, samples=5))
    assert small.decision == "insufficient_samples"
    dark = trig.submit(_alert(2))
    assert dark.decision == "blackout" and "22:00-06:00" in dark.reason
    clock.now += 8 * 3600  # 07:00
    assert trig.submit(_alert(3)).decision == "started"
    assert in_blackout(["09:00-10:00"], 1_767_225_600.0 + 9.5 * 3600) == "09:00-10:00"
    assert in_blackout(["09:00-10:00"], 1_767_225_600.0 + 10 * 3600) is None


def test_one_run_in_flight(tmp_path):
    runner = RecordingRunner(hold=True)
    trig, _ = _trigger(tmp_path, runner=runner)
    assert trig.submit(_alert(1)).decision == "started"
    busy = trig.submit(_alert(2))
    assert busy.decision == "in_flight" and _alert(1).id in busy.reason
    runner.release.set()
    _finish(trig, _alert(1).id)
    assert trig.submit(_alert(3)).decision == "started"
    assert len(runner.requests) == 2


def test_in_flight_guard_survives_a_monitor_restart(tmp_path):
    trig, _ = _trigger(tmp_path)
    alert = _alert(1)
    trig.alerts.insert(alert)
    # A worker left running by a monitor that was killed: its pid is in the store.
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "pipelines.retrain"])
    try:
        trig.alerts.record_decision(alert.id, "started", "guardrails passed", now=trig.clock())
        trig.alerts.update(alert.id, started=trig.clock(), worker_pid=worker.pid, run_state="RUNNING")
        assert worker_alive(worker.pid)
        restarted, _ = _trigger(tmp_path)  # a new monitor process on the same workspace
        assert restarted.submit(_alert(2)).decision == "in_flight"
    finally:
        worker.kill()
        worker.wait()
    assert not worker_alive(worker.pid)
    assert restarted.submit(_alert(3)).decision == "started"
    assert restarted.alerts.get(alert.id)["run_state"] == "LOST"


def test_retrain_window_from_recent_days(tmp_path):
    settings = make_settings(tmp_path, tmp_path / "x.parquet", **{"trigger.recent_days": 7})
    start, end = retrain_window(settings, "2026-02-01T00:00:00+00:00")
    assert (start, end) == ("2026-01-25T00:00:00+00:00", "2026-02-01T00:00:00+00:00")
    plain = make_settings(tmp_path, tmp_path / "x.parquet")
    assert retrain_window(plain, "2026-02-01T00:00:00Z") == (None, "2026-02-01T00:00:00+00:00")


def test_retrain_window_from_recent_rows(tmp_path, scenario_path):
    import pandas as pd

    settings = make_settings(tmp_path, scenario_path, **{"trigger.recent_rows": 500})
    start, end = retrain_window(settings, "2026-02-01T00:00:00Z")
    times = pd.read_parquet(scenario_path)["event_time"]
    inside = times[(times >= pd.Timestamp(start)) & (times < pd.Timestamp(end))]
    assert len(inside) == 500


def test_alertmanager_payload_parsing():
    payload = {"version": "4", "status": "firing", "receiver": "driftloop", "alerts": [
        {"status": "firing", "labels": {"alertname": "DriftHigh"}, "fingerprint": "abc", "startsAt": "2026-02-01T10:00:00Z"},
        {"status": "resolved", "labels": {}, "fingerprint": "def", "startsAt": "2026-02-01T09:00:00Z"},
    ]}
    alerts = alertmanager_alerts(payload)
    assert len(alerts) == 1 and alerts[0].source == "alertmanager"
    assert alerts[0].id == alertmanager_alerts(payload)[0].id  # same fingerprint + startsAt → same id
    assert alerts[0].window_end == "2026-02-01T10:00:00+00:00"
    for bad, msg in [([], "JSON object"), ({"alerts": []}, "no 'alerts'"),
                     ({"alerts": [{"startsAt": "2026-02-01T10:00:00Z"}]}, "no 'fingerprint'"),
                     ({"alerts": [{"fingerprint": "a", "startsAt": "yesterday"}]}, "not an RFC 3339")]:
        with pytest.raises(ValueError, match=msg):
            alertmanager_alerts(bad)


def test_triggered_run_carries_the_alert_id(tmp_path, scenario_path):
    """The real pipeline, started by the background worker through the LocalRunner."""
    from driftloop.core.registry import TAG, Registry

    settings = make_settings(tmp_path / "ws", scenario_path, **{"trigger.min_samples": 10})
    trig = Trigger(settings, AlertStore.from_settings(settings))
    alert = Alert(drift_alert_id("churn", "0", 0, 1), "drift", samples=1000, window_end="2026-01-31T00:00:00Z")
    decision = trig.submit(alert)
    assert decision.decision == "started"
    assert trig.submit(alert).decision == "duplicate"
    t0 = time.monotonic()
    rec = trig.wait(alert.id, timeout=240)
    log = (settings.workspace_dir / "monitor" / "runs" / f"{alert.id}.log").read_text()
    assert rec["run_state"] == "SUCCEEDED", log[-3000:]
    assert time.monotonic() - t0 < 240
    version = Registry.from_settings(settings).get_version("churn", rec["model_version"])
    assert version.tags[TAG.ALERT] == alert.id
    assert version.tags[TAG.TRIGGER] == f"drift:{alert.id}"
    assert version.tags[TAG.REQUEST] == decision.request_id
    last_row = version.tags[TAG.WINDOW].split(" .. ")[1]  # the data window ended at the alert's window end
    assert "2026-01-30" <= last_row < "2026-01-31"


class RecordingKfpRunner:
    """Test double of KfpRunner: records submissions; ``client.get_run`` answers a settable state."""

    def __init__(self) -> None:
        self.requests = []
        self.state = "RUNNING"
        runner = self

        class Client:
            def get_run(self, run_id):
                return type("Run", (), {"run_id": run_id, "state": runner.state})()

        self.client = Client()

    def run_training(self, request, *, wait: bool = False) -> RunResult:
        assert wait is False  # the monitor never blocks on a cluster run
        self.requests.append(request)
        return RunResult(request.request_id, f"kfp-{len(self.requests)}", "SUBMITTED", "kubeflow")


def test_cluster_runs_are_submitted_and_followed_through_kubeflow(tmp_path):
    runner = RecordingKfpRunner()
    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet", **{
        "kfp.host": "http://kfp.example:8888", "trigger.cooldown_seconds": 0, "trigger.min_samples": 1})
    trig = Trigger(settings, AlertStore.from_settings(settings), runner=runner, clock=Clock())
    first = trig.submit(_alert(1))
    rec = trig.alerts.get(first.alert_id)
    assert first.decision == "started" and rec["pipeline_run_id"] == "kfp-1" and rec["run_state"] == "SUBMITTED"
    assert trig.submit(_alert(2)).decision == "in_flight"  # Kubeflow says RUNNING
    runner.state = "SUCCEEDED"
    assert trig.submit(_alert(3)).decision == "started"
    assert trig.alerts.get(first.alert_id)["run_state"] == "SUCCEEDED"
    assert [r.trigger for r in runner.requests] == [f"drift:{_alert(1).id}", f"drift:{_alert(3).id}"]
