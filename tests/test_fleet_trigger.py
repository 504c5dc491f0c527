"""The fleet's limits at run time for retraining runs (monitoring/fleet_runs.py, hooked into the trigger):
three models of one fleet, each with its own alert store and trigger; runs beyond the fleet's limits are
queued and start from the follow path when a slot frees, oldest first; the daily pool; the GPU budget;
a dead holder's slot; two processes racing for the last slot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from driftloop.core.fleet import load_fleet
from driftloop.core.processes import spawn, stop_process
from monitoring.alerts import Alert, AlertStore, drift_alert_id
from monitoring.fleet_runs import FleetRuns
from monitoring.trigger import Trigger
from pipelines.runner import RunResult
from tests.conftest import make_settings
from tests.test_trigger import Clock

ROOT = Path(__file__).resolve().parent.parent

FLEET = """\
workspace: ws
fleet: {{{limits}}}
defaults:
  data: {{source: none.parquet}}
  trigger: {{cooldown_seconds: 0, daily_budget: 100, min_samples: 10}}
models:
  churn: {{team: growth{churn}}}
  demand: {{team: planning{demand}}}
  upsell: {{team: growth{upsell}}}
"""


class Runs:
    """What the fleet's runners share: how many run at once, and the most that ever did."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0


class BlockingRunner:
    """Test double: a run that stays in flight until ``release`` is set."""

    def __init__(self, runs: Runs, *, hold: bool = True) -> None:
        self.runs = runs
        self.release = threading.Event()
        self.requests = []
        if not hold:
            self.release.set()

    def run_training(self, request, *, wait: bool = True) -> RunResult:
        self.requests.append(request)
        with self.runs.lock:
            self.runs.now += 1
            self.runs.most = max(self.runs.most, self.runs.now)
        try:
            self.release.wait(30)
        finally:
            with self.runs.lock:
                self.runs.now -= 1
        return RunResult(request.request_id, f"run-{len(self.requests)}", "SUCCEEDED", "local")


def _fleet_file(tmp_path: Path, limits: str, **own: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(textwrap.dedent(FLEET.format(limits=limits, **{m: own.get(m, "") for m in
                                                                    ("churn", "demand", "upsell")})))
    return path


def _triggers(tmp_path: Path, limits: str, *, hold: bool = True, clock=None, **own: str):
    fleet = load_fleet(_fleet_file(tmp_path, limits, **own), environ={})
    runs, clock = Runs(), clock or Clock()
    triggers = {m.name: Trigger(m.settings, AlertStore.from_settings(m.settings),
                                runner=BlockingRunner(runs, hold=hold), clock=clock) for m in fleet.models}
    return triggers, runs


def _alert(model: str, n: int = 0) -> Alert:
    return Alert(drift_alert_id(model, "1", n, n + 1), "drift", samples=500)


def _finish(trig: Trigger, model: str, n: int = 0) -> None:
    trig.runner.release.set()
    trig.wait(_alert(model, n).id, timeout=30)


def test_the_third_run_is_queued_and_starts_when_a_slot_frees(tmp_path):
    trig, runs = _triggers(tmp_path, "max_concurrent_runs: 2")
    decided = {name: t.submit(_alert(name)) for name, t in trig.items()}
    assert (decided["churn"].decision, decided["demand"].decision) == ("started", "started")
    queued = decided["upsell"]
    assert queued.decision == "queued"
    assert queued.reason == "fleet.max_concurrent_runs: 2 runs in flight (churn, demand)"
    assert trig["upsell"].alerts.get(queued.alert_id)["decision"] == "queued"
    ledger = trig["upsell"].fleet
    assert ledger.path == tmp_path / "ws" / "fleet" / "runs.db" and ledger.queued() == [queued.alert_id]

    trig["upsell"].follow()  # nothing freed yet: still queued, no decision added
    assert [d["decision"] for d in trig["upsell"].alerts.decisions(queued.alert_id)] == ["queued"]
    _finish(trig["churn"], "churn")  # its run ends: its slot frees
    assert ledger.in_flight() == [("demand", _alert("demand").id)]
    trig["upsell"].follow()  # the monitor's next round: the queue is drained
    rec = trig["upsell"].alerts.get(queued.alert_id)
    assert rec["decision"] == "started" and rec["reason"].startswith("a slot of the fleet is free: guardrails passed")
    assert [d["decision"] for d in trig["upsell"].alerts.decisions(queued.alert_id)] == ["queued", "started"]
    assert ledger.queued() == [] and len(ledger.in_flight()) == 2
    assert trig["churn"].submit(_alert("churn", 1)).decision == "queued"  # the fleet is full again
    _finish(trig["demand"], "demand")
    _finish(trig["upsell"], "upsell")
    trig["churn"].follow()
    assert trig["churn"].alerts.get(_alert("churn", 1).id)["decision"] == "started"
    _finish(trig["churn"], "churn", 1)
    assert runs.most == 2 and sum(len(t.runner.requests) for t in trig.values()) == 4


def test_a_free_slot_goes_to_the_oldest_queued_alert_of_the_fleet(tmp_path):
    trig, runs = _triggers(tmp_path, "max_concurrent_runs: 1")
    assert trig["churn"].submit(_alert("churn")).decision == "started"
    assert trig["demand"].submit(_alert("demand")).decision == "queued"  # first in the queue
    assert trig["upsell"].submit(_alert("upsell")).decision == "queued"
    _finish(trig["churn"], "churn")
    trig["upsell"].follow()  # upsell looks first, but demand was queued before it
    assert trig["upsell"].alerts.get(_alert("upsell").id)["decision"] == "queued"
    again = trig["upsell"].submit(_alert("upsell", 1))  # a new alert waits behind it too
    assert again.decision == "queued" and again.reason == (f"fleet.max_concurrent_runs: the free slot goes first to "
                                                           f"alert {_alert('demand').id} of demand, queued earlier")
    trig["demand"].follow()
    assert trig["demand"].alerts.get(_alert("demand").id)["decision"] == "started"
    _finish(trig["demand"], "demand")
    trig["upsell"].follow()  # its older alert starts; the newer one is attached to that run
    assert trig["upsell"].alerts.get(_alert("upsell").id)["decision"] == "started"
    assert trig["upsell"].alerts.get(_alert("upsell", 1).id)["decision"] == "attached"
    assert trig["upsell"].fleet.queued() == []
    _finish(trig["upsell"], "upsell")
    assert runs.most == 1


def test_a_queued_alert_whose_episode_ended_leaves_the_queue(tmp_path):
    trig, _ = _triggers(tmp_path, "max_concurrent_runs: 1")
    assert trig["churn"].submit(_alert("churn")).decision == "started"
    store, alert = trig["demand"].alerts, _alert("demand")
    step = store.record_verdict("demand", "drift", "1", failed=True, window="w1", now=1.0, resolve_after=1)
    assert trig["demand"].submit(alert).decision == "queued"
    store.bind_alert(step.episode.seq, alert.id)
    store.update(alert.id, episode=step.episode.seq)
    store.record_verdict("demand", "drift", "1", failed=False, window="w2", now=2.0, resolve_after=1)
    trig["demand"].follow()
    rec = store.get(alert.id)
    assert rec["decision"] == "resolved" and "episode ended while it was queued" in rec["reason"]
    assert trig["demand"].fleet.queued() == []
    _finish(trig["churn"], "churn")


def test_the_daily_pool_holds_the_third_run(tmp_path):
    clock = Clock()
    trig, _ = _triggers(tmp_path, "daily_runs: 2", hold=False, clock=clock)  # budgets of 100 each share 2
    for name in ("churn", "demand"):
        assert trig[name].submit(_alert(name)).decision == "started"
        trig[name].wait(_alert(name).id, timeout=30)
        trig[name].follow()
    held = trig["upsell"].submit(_alert("upsell"))
    assert held.decision == "budget"
    assert held.reason == ("fleet.daily_runs: 2 runs started across the fleet in the last 24h (churn, demand); "
                           "the fleet's pool is 2")
    assert trig["upsell"].fleet.queued() == []
    clock.now += 86400 + 1  # a day later the pool is free again
    assert trig["upsell"].submit(_alert("upsell", 1)).decision == "started"
    trig["upsell"].wait(_alert("upsell", 1).id, timeout=30)


def test_the_train_steps_stay_inside_the_gpu_budget(tmp_path):
    gpu = ", model: {gpu: true}"
    trig, runs = _triggers(tmp_path, "max_concurrent_runs: 3, gpus: 3", churn=gpu, demand=gpu,
                           upsell=gpu + ", serving: {gpu: 1, max_replicas: 1}")
    assert trig["churn"].submit(_alert("churn")).decision == "started"
    assert trig["demand"].submit(_alert("demand")).decision == "started"
    queued = trig["upsell"].submit(_alert("upsell"))
    assert queued.decision == "queued" and queued.reason == (
        "fleet.gpus: 2 of 2 GPUs (fleet.gpus=3 less 1 for serving) held by runs in flight (churn 1, demand 1); "
        "this run's train step needs 1")
    _finish(trig["demand"], "demand")
    trig["upsell"].follow()
    assert trig["upsell"].alerts.get(queued.alert_id)["decision"] == "started"
    _finish(trig["churn"], "churn")
    _finish(trig["upsell"], "upsell")
    assert runs.most == 2


def test_the_slot_of_a_dead_worker_is_freed(tmp_path):
    trig, _ = _triggers(tmp_path, "max_concurrent_runs: 2")
    assert trig["churn"].submit(_alert("churn")).decision == "started"
    assert trig["demand"].submit(_alert("demand")).decision == "started"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    trig["churn"].fleet.hold(_alert("churn").id, gone.pid)  # its worker, since died without a result
    decided = trig["upsell"].submit(_alert("upsell"))
    assert decided.decision == "started"
    assert trig["upsell"].fleet.in_flight() == [("demand", _alert("demand").id), ("upsell", _alert("upsell").id)]
    for name in trig:
        _finish(trig[name], name)
    assert trig["upsell"].fleet.in_flight() == []


RACER = """\
import json, pathlib, sys, threading, time
from driftloop.core.fleet import load_fleet
from monitoring.alerts import Alert, AlertStore, drift_alert_id
from monitoring.trigger import Trigger
from pipelines.runner import RunResult

path, name, go, done = sys.argv[1:5]
settings = load_fleet(path, environ={}).model(name).settings
gate = threading.Event()

class Runner:
    def run_training(self, request, *, wait=True):
        gate.wait(60)
        return RunResult(request.request_id, "run-1", "SUCCEEDED", "local")

trigger = Trigger(settings, AlertStore.from_settings(settings), runner=Runner())
print("ready", flush=True)
while not pathlib.Path(go).exists():
    time.sleep(0.005)
decision = trigger.submit(Alert(drift_alert_id(name, "1", 0, 1), "drift", samples=500))
print(json.dumps([decision.decision, decision.reason]), flush=True)
while not pathlib.Path(done).exists():
    time.sleep(0.02)
gate.set()
trigger.wait(decision.alert_id, timeout=30) if decision.decision == "started" else None
"""


def test_two_processes_racing_for_the_last_slot(tmp_path):
    path = _fleet_file(tmp_path, "max_concurrent_runs: 2")
    churn = load_fleet(path, environ={}).model("churn").settings
    here = Trigger(churn, AlertStore.from_settings(churn), runner=BlockingRunner(Runs()))
    assert here.submit(_alert("churn")).decision == "started"  # one slot of two left
    go, done = tmp_path / "go", tmp_path / "done"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    racers = [spawn([sys.executable, "-c", RACER, str(path), name, str(go), str(done)], cwd=ROOT, env=env,
                    stdout=subprocess.PIPE, text=True) for name in ("demand", "upsell")]
    try:
        assert [r.stdout.readline().strip() for r in racers] == ["ready", "ready"]
        go.touch()
        decided = {name: json.loads(r.stdout.readline()) for name, r in zip(("demand", "upsell"), racers)}
        assert sorted(d for d, _ in decided.values()) == ["queued", "started"]
        winner = next(name for name, (d, _) in decided.items() if d == "started")
        loser = next(name for name in decided if name != winner)
        assert decided[loser][1] == f"fleet.max_concurrent_runs: 2 runs in flight (churn, {winner})"
        assert [m for m, _ in here.fleet.in_flight()] == ["churn", winner]
        done.touch()
        for r in racers:
            assert r.wait(timeout=30) == 0
    finally:
        for r in racers:
            if r.poll() is None:
                stop_process(r.pid, timeout=5)
            r.stdout.close()
    assert [m for m, _ in here.fleet.in_flight()] == ["churn"]
    _finish(here, "churn")
    assert here.fleet.in_flight() == []


def test_a_one_model_configuration_has_no_fleet_ledger(tmp_path):
    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet", **{"trigger.cooldown_seconds": 0,
                                                                            "trigger.min_samples": 10})
    trig = Trigger(settings, AlertStore.from_settings(settings), runner=BlockingRunner(Runs(), hold=False),
                   clock=Clock())
    assert trig.fleet is None
    decided = trig.submit(_alert("churn"))
    assert (decided.decision, decided.reason) == ("started", "guardrails passed")
    trig.wait(decided.alert_id, timeout=30)
    assert trig.submit(_alert("churn", 1)).decision == "started"
    trig.wait(_alert("churn", 1).id, timeout=30)
    assert not (tmp_path / "ws" / "fleet").exists()
