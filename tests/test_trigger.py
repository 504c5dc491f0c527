"""Alerts and the retraining trigger: guardrails with a recording runner, and one real pipeline run."""

from __future__ import annotations

import datetime as dt
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
    """One run at a time: the monitor's own alerts are attached to the run in flight and judged again when it
    ends; Alertmanager's are held."""
    runner = RecordingRunner(hold=True)
    trig, _ = _trigger(tmp_path, runner=runner)
    assert trig.submit(_alert(1)).decision == "started"
    busy = trig.submit(_alert(2))
    assert busy.decision == "attached" and _alert(1).id in busy.reason
    assert trig.alerts.get(_alert(2).id)["attached_to"] == _alert(1).id
    held = _deliver(trig, _am("f1", trig.clock(), alertname="SomethingElse"))[0]
    assert held.decision == "in_flight" and _alert(1).id in held.reason
    runner.release.set()
    _finish(trig, _alert(1).id)
    trig.follow()  # the run has an outcome (registered; no registry to follow its rollout): attached alerts re-checked
    rechecked = trig.alerts.get(_alert(2).id)
    assert rechecked["decision"] == "started" and rechecked["reason"].startswith(f"re-checked after the run of alert "
                                                                                 f"{_alert(1).id} (registered)")
    assert [d["decision"] for d in trig.alerts.decisions(_alert(2).id)] == ["attached", "started"]
    _finish(trig, _alert(2).id)
    assert trig.submit(_alert(3)).decision == "started"
    assert len(runner.requests) == 3
    assert trig.alerts.get(held.alert_id)["decision"] == "in_flight"  # Alertmanager's: held, as before


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
        assert restarted.submit(_alert(2)).decision == "attached"
    finally:
        worker.kill()
        worker.wait()
    assert not worker_alive(worker.pid)
    restarted.follow()  # the run it waited for is gone: LOST, failed; the attached alert is judged again
    lost = restarted.alerts.get(alert.id)
    assert (lost["run_state"], lost["outcome"]) == ("LOST", "failed")
    assert restarted.alerts.get(_alert(2).id)["decision"] == "started"


def _historical(path) -> str:
    """A source whose event times end years ago: a row every 6 hours of 2014, the last at 18:00 on 31 December."""
    import pandas as pd

    times = pd.date_range("2014-01-01", "2014-12-31T18:00", freq="6h", tz="UTC")
    pd.DataFrame({"event_time": times, "x": range(len(times)), "label": [i % 2 for i in range(len(times))]}
                 ).to_parquet(path)
    return str(path)


def test_retrain_window_is_in_the_datas_time_not_the_wall_clocks(tmp_path):
    """Data whose times end on 31 December 2014: recent_days counts back from there, and the exclusive end
    keeps the newest day in the window (today's wall clock would give an empty window)."""
    from components.ingest import ingest

    source = _historical(tmp_path / "history.parquet")
    settings = make_settings(tmp_path, source, **{"trigger.recent_days": 7})
    start, end = retrain_window(settings)
    assert (start, end) == ("2014-12-24T18:00:01+00:00", "2014-12-31T18:00:01+00:00")
    import pandas as pd

    cut = ingest(pd.read_parquet(source), target="label", time_column="event_time", window_start=start,
                 window_end=end, test_size=0.2)
    times = pd.concat([cut.train, cut.test])["event_time"]
    assert len(times) == 7 * 4 and times.max() == pd.Timestamp("2014-12-31T18:00:00Z")  # 31 December is in
    plain = make_settings(tmp_path, source)
    assert retrain_window(plain) == (None, "2014-12-31T18:00:01+00:00")  # every row up to the data's end
    untimed = make_settings(tmp_path, source, **{"data.time_column": None})
    assert retrain_window(untimed) == (None, None)


def test_a_triggered_run_gets_the_datas_window_and_the_alert_keeps_it(tmp_path):
    source = _historical(tmp_path / "history.parquet")
    trig, _ = _trigger(tmp_path, **{"recent_days": 30})
    trig.settings = make_settings(tmp_path / "ws", source, **{"trigger.recent_days": 30, "trigger.cooldown_seconds": 0,
                                                              "trigger.min_samples": 10})
    decision = trig.submit(_alert(1))  # the alert's own window ends at the wall-clock time of its rows
    _finish(trig, decision.alert_id)
    request = trig.runner.requests[0]
    assert (request.window_start, request.window_end) == ("2014-12-01T18:00:01+00:00", "2014-12-31T18:00:01+00:00")
    rec = trig.alerts.get(decision.alert_id)
    assert (rec["window_start"], rec["window_end"]) == (request.window_start, request.window_end)


def test_recent_days_on_a_source_the_monitor_cannot_read_fails_the_start_naming_it(tmp_path):
    trig, _ = _trigger(tmp_path, recent_days=7)
    failed = trig.submit(_alert(1))
    assert failed.decision == "failed" and "trigger.recent_days needs the times in data.source" in failed.reason
    assert "none.parquet" in failed.reason and trig.runner.requests == []
    open_window, _ = _trigger(tmp_path / "default")  # no recency asked: the run reads up to the data's end itself
    started = open_window.submit(_alert(2))
    _finish(open_window, started.alert_id)
    assert started.decision == "started"
    assert (open_window.runner.requests[0].window_start, open_window.runner.requests[0].window_end) == (None, None)


def test_retrain_window_from_recent_rows(tmp_path, scenario_path):
    import pandas as pd

    settings = make_settings(tmp_path, scenario_path, **{"trigger.recent_rows": 500})
    start, end = retrain_window(settings)
    times = pd.read_parquet(scenario_path)["event_time"]
    inside = times[(times >= pd.Timestamp(start)) & (times < pd.Timestamp(end))]
    assert len(inside) == 500 and times.max() < pd.Timestamp(end)


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
    import pandas as pd

    newest = pd.read_parquet(scenario_path)["event_time"].max()  # the data's end, not the alert's wall clock
    assert rec["window_end"] == (newest.floor("s") + pd.Timedelta(seconds=1)).isoformat()
    assert newest.isoformat() in version.tags[TAG.WINDOW]


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
    assert trig.submit(_alert(2)).decision == "attached"  # Kubeflow says RUNNING
    runner.state = "SUCCEEDED"
    assert trig.submit(_alert(3)).decision == "started"
    assert trig.alerts.get(first.alert_id)["run_state"] == "SUCCEEDED"
    # the attached alert was judged again when the first run ended, before the new one
    assert trig.alerts.get(_alert(2).id)["decision"] == "started"
    assert [r.trigger for r in runner.requests] == [f"drift:{_alert(i).id}" for i in (1, 2, 3)]


# -- one drift, one alert: Alertmanager's alert for a drift the monitor raised itself ------------------

RULE = "DriftloopDatasetDrift"


def _iso_at(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # as Alertmanager writes it


def _am(fingerprint: str, starts: float, *, status: str = "firing", alertname: str = RULE, **labels) -> dict:
    """A webhook payload with one alert, labelled as infra's PrometheusRule labels it."""
    labels = {"alertname": alertname, "namespace": "driftloop", "severity": "warning", "driftloop_action": "retrain",
              **labels}
    return {"version": "4", "status": status, "receiver": "driftloop-trigger", "groupKey": "{}:{alertname=\"x\"}",
            "alerts": [{"status": status, "labels": labels, "annotations": {"summary": "Input drift"},
                        "fingerprint": fingerprint, "startsAt": _iso_at(starts),
                        "endsAt": "0001-01-01T00:00:00Z"}]}


def _deliver(trig: Trigger, payload: dict) -> list:
    return [trig.submit(a) for a in alertmanager_alerts(payload, now=trig.clock())]


def _own(trig: Trigger, n: int, samples: int = 500, version: str = "1") -> Alert:
    """The monitor's own drift alert as its check raises it: the verdict first, then the alert."""
    trig.observe_drift("churn", True)
    return Alert(drift_alert_id("churn", version, n, n + 1), "drift", samples=samples, created=trig.clock(),
                 details={"champion_version": version}, window_end="2026-02-01T00:00:00+00:00")


def test_alertmanager_alert_for_the_monitors_drift_is_its_duplicate(tmp_path):
    clock = Clock()
    trig, metrics = _trigger(tmp_path, clock=clock, cooldown_seconds=600)
    own = trig.submit(_own(trig, 1))
    assert own.decision == "started"
    _finish(trig, own.alert_id)
    t0 = clock.now
    for minute in range(1, 12):  # the drift goes on; a tumbling window's verdict is cached in between
        clock.now = t0 + 60 * minute
        trig.observe_drift("churn", True)
    # `for: 10m` after Prometheus first saw the gauge, Alertmanager posts (group_wait 30 s later)
    clock.now = t0 + 660
    [dup] = _deliver(trig, _am("f1ngerpr1nt", t0 + 630))
    assert dup.decision == "duplicate" and dup.duplicate_of == own.alert_id and dup.request_id is None
    assert dup.reason.startswith(f"duplicate of {own.alert_id}: the monitor raised this drift of churn itself")
    row = trig.alerts.get(dup.alert_id)
    assert row["duplicate_of"] == own.alert_id and row["decision"] == "duplicate" and row["source"] == "alertmanager"
    # Alertmanager's repeat notifications (same fingerprint and startsAt), long after the cooldown
    clock.now += 6 * 3600
    [again] = _deliver(trig, _am("f1ngerpr1nt", t0 + 630))
    assert (again.alert_id, again.decision, again.duplicate_of) == (dup.alert_id, "duplicate", own.alert_id)
    assert again.reason.startswith(f"duplicate of {own.alert_id}: alert {dup.alert_id} was already received")
    assert trig.alerts.get(dup.alert_id)["deliveries"] == 2
    # a resolved notification closes nothing and starts nothing; the episode is still the monitor's
    assert alertmanager_alerts(_am("f1ngerpr1nt", t0 + 630, status="resolved")) == []
    # the same fingerprint with a new startsAt (Prometheus restarted) while the drift goes on: the same episode
    clock.now += 60
    trig.observe_drift("churn", True)
    [later] = _deliver(trig, _am("f1ngerpr1nt", clock.now - 30))
    assert later.decision == "duplicate" and later.duplicate_of == own.alert_id and later.alert_id != dup.alert_id
    assert len(trig.runner.requests) == 1
    assert [d["decision"] for d in trig.alerts.decisions(dup.alert_id)] == ["duplicate", "duplicate"]
    assert metrics.trigger_decisions.labels(decision="duplicate")._value.get() == 3
    assert metrics.trigger_decisions.labels(decision="started")._value.get() == 1


def test_the_run_of_the_episode_is_the_original_and_a_held_alert_still_counts(tmp_path):
    clock = Clock()
    trig, _ = _trigger(tmp_path, clock=clock, cooldown_seconds=3600)
    first = trig.submit(_own(trig, 1))
    _finish(trig, first.alert_id)
    clock.now += 60
    held = trig.submit(_own(trig, 2))  # the next window, same episode: held by the cooldown
    assert held.decision == "cooldown"
    clock.now += 600
    [dup] = _deliver(trig, _am("aa", clock.now - 30))
    assert dup.duplicate_of == first.alert_id  # the alert that started the episode's run, not the latest

    # A drift the monitor raised but its guardrails held (too few rows): Alertmanager's alert is the
    # same drift, so it is held too — the monitor's next window raises it again.
    trig2, _ = _trigger(tmp_path / "second", clock=clock)
    small = trig2.submit(_own(trig2, 1, samples=5))
    assert small.decision == "insufficient_samples"
    clock.now += 630
    [dup2] = _deliver(trig2, _am("bb", clock.now - 30))
    assert (dup2.decision, dup2.duplicate_of) == ("duplicate", small.alert_id)
    assert trig2.runner.requests == []


def test_alertmanager_alert_without_an_own_alert_of_its_episode_goes_through_the_guardrails(tmp_path):
    clock = Clock()
    trig, _ = _trigger(tmp_path, clock=clock)
    # Drift only Prometheus saw (no episode of the monitor at startsAt): a run, as before.
    [alone] = _deliver(trig, _am("p1", clock.now - 30))
    assert alone.decision == "started" and alone.duplicate_of is None
    _finish(trig, alone.alert_id)
    assert trig.alerts.get(alone.alert_id)["duplicate_of"] is None

    # The monitor raised a drift that then ended (a check found none); a later drift fires in Prometheus.
    clock.now += 3600
    own = trig.submit(_own(trig, 1))
    _finish(trig, own.alert_id)
    clock.now += 120
    trig.observe_drift("churn", False)
    clock.now += 1800
    [after] = _deliver(trig, _am("p2", clock.now - 30))
    assert after.decision == "started" and after.duplicate_of is None
    _finish(trig, after.alert_id)

    # An episode whose drift Evidently did not confirm: no own alert went to the trigger.
    clock.now += 3600
    trig.observe_drift("churn", True)
    unconfirmed = Alert(drift_alert_id("churn", "1", 7, 8), "drift", samples=500, details={"champion_version": "1"})
    trig.alerts.insert(unconfirmed)
    trig.alerts.record_decision(unconfirmed.id, "not_confirmed", "Evidently found no dataset drift", now=clock.now)
    clock.now += 630
    [unseen] = _deliver(trig, _am("p3", clock.now - 30))
    assert unseen.decision == "started" and unseen.duplicate_of is None
    _finish(trig, unseen.alert_id)

    # While that episode lasts: another namespace's drift, a batch's drift, another version are not this drift.
    clock.now += 60
    own2 = trig.submit(_own(trig, 3))
    _finish(trig, own2.alert_id)
    clock.now += 630
    others = [_am("q1", clock.now - 30, namespace="team-b"), _am("q2", clock.now - 30, alertname="DriftloopBatchDrift"),
              _am("q3", clock.now - 30, version="2"), _am("q4", clock.now - 30, model="another-model")]
    for payload in others:
        [d] = _deliver(trig, payload)
        assert d.duplicate_of is None and d.decision == "started", (payload["alerts"][0]["labels"], d)
        _finish(trig, d.alert_id)
    [same] = _deliver(trig, _am("q5", clock.now - 30, version="1", model="churn"))
    assert same.duplicate_of == own2.alert_id
    assert len(trig.runner.requests) == 3 + 1 + 1 + 4


def test_same_fingerprint_again_in_one_episode_starts_no_second_run(tmp_path):
    """No own alert in the episode (not confirmed): the first Alertmanager alert is the episode's."""
    clock = Clock()
    trig, _ = _trigger(tmp_path, clock=clock)
    trig.observe_drift("churn", True)
    clock.now += 630
    [first] = _deliver(trig, _am("fp", clock.now - 30))
    assert first.decision == "started"
    _finish(trig, first.alert_id)
    clock.now += 7200  # Prometheus restarted and fired again, Alertmanager lost the old startsAt
    trig.observe_drift("churn", True)
    [second] = _deliver(trig, _am("fp", clock.now - 30))
    assert (second.decision, second.duplicate_of) == ("duplicate", first.alert_id)
    assert second.reason.startswith(f"duplicate of {first.alert_id}: Alertmanager alert fp again")
    # the drift ends and comes back: a new episode, a new run
    trig.observe_drift("churn", False)
    clock.now += 3600
    trig.observe_drift("churn", True)
    clock.now += 630
    [third] = _deliver(trig, _am("fp", clock.now - 30))
    assert third.decision == "started" and third.duplicate_of is None
    assert len(trig.runner.requests) == 2


def test_a_monitor_restart_ends_its_drift_episode(tmp_path):
    clock = Clock()
    trig, _ = _trigger(tmp_path, clock=clock)
    own = trig.submit(_own(trig, 1))
    _finish(trig, own.alert_id)
    before = clock.now + 600  # Prometheus fired before the restart; Alertmanager delivers after it
    clock.now += 1200
    restarted, _ = _trigger(tmp_path, clock=clock)  # a new monitor process: its gauge reads 0 until its check
    clock.now += 1200
    restarted.observe_drift("churn", True)  # its first check finds the drift again (its alert not raised yet)
    [late] = _deliver(restarted, _am("r1", before))
    assert late.duplicate_of == own.alert_id
    clock.now += 630
    [fresh] = _deliver(restarted, _am("r2", clock.now - 30))  # fired on the new process's gauge
    assert fresh.decision == "started" and fresh.duplicate_of is None
    episodes = restarted.alerts.drift_episodes("churn", since=0, until=clock.now)
    assert [e["closed"] for e in episodes] == [restarted._born, None]


def test_alerts_written_by_an_earlier_release_are_read_and_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "alerts.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE alerts (id TEXT PRIMARY KEY, source TEXT NOT NULL, created REAL NOT NULL, details TEXT NOT NULL,
            samples INTEGER, window_start TEXT, window_end TEXT, report_path TEXT, report_uri TEXT, decision TEXT,
            reason TEXT, request_id TEXT, pipeline_run_id TEXT, model_version TEXT, run_state TEXT, worker_pid INTEGER,
            started REAL, finished REAL, deliveries INTEGER NOT NULL DEFAULT 1);
        CREATE TABLE decisions (seq INTEGER PRIMARY KEY, alert_id TEXT NOT NULL, ts REAL NOT NULL,
            decision TEXT NOT NULL, reason TEXT NOT NULL);
        INSERT INTO alerts (id, source, created, details, decision) VALUES ('drift-old', 'drift', 1.0, '{}', 'started');
    """)
    db.close()
    first, second = AlertStore(path), AlertStore(path)  # two processes opening it at once
    try:
        assert first.get("drift-old")["duplicate_of"] is None
        second.update("drift-old", duplicate_of="drift-other")
        assert first.get("drift-old")["duplicate_of"] == "drift-other"
    finally:
        first.close()
        second.close()


def test_the_rule_that_reports_the_monitors_drift_is_the_one_the_trigger_knows():
    """infra's PrometheusRule and each tenant's: the retraining alert is a DRIFT_ALERTNAMES alert on the
    monitor's gauge, grouped by namespace and model, in the namespace the loop's config serves."""
    import re
    from pathlib import Path

    import yaml

    from driftloop.app import tenants
    from monitoring.trigger import DRIFT_ALERTNAMES

    infra = Path(__file__).resolve().parent.parent / "infra" / "base"
    rule_doc = yaml.safe_load((infra / "monitoring" / "prometheus-rule.yaml").read_text())
    config = yaml.safe_load((infra / "config" / "driftloop.yaml").read_text())
    team = tenants.Tenant("team-b")
    tenant_rule = next(d for d in tenants._monitoring_docs(team) if d["kind"] == "PrometheusRule")
    homes = [(rule_doc, config["serving"]["namespace"]),
             (tenant_rule, tenants.cluster_config(team, tenants.Pool(gpus=0))["serving"]["namespace"])]
    for doc, namespace in homes:
        rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
        retrain = [r for r in rules if r.get("labels", {}).get("driftloop_action") == "retrain"]
        assert {r["alert"] for r in retrain} == DRIFT_ALERTNAMES
        for rule in retrain:
            assert "driftloop_monitor_dataset_drift_share" in rule["expr"]
            assert re.search(r"max by \(namespace, model\)", rule["expr"])  # the labels it keeps: namespace, model
            assert f'namespace="{namespace}"' in rule["expr"]
