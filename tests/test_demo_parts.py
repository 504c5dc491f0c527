"""The demo's parts that decide where it waits: phase timings, kept HTTP clients, services stopped together,
the rollout's traffic held until the controller has started the canary steps."""

import subprocess
import sys
import time

from driftloop.app.demo import _status
from driftloop.app.demo_processes import DemoProcesses, Service
from driftloop.app.demo_report import Narrator
from driftloop.app.demo_traffic import Traffic
from driftloop.core.processes import process_alive, spawn


class _Quiet:
    tty = False

    def __call__(self, share: float) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_narrator_times_each_phase_it_was_told_of(monkeypatch):
    now = [10.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    narrator = Narrator(phases={"data": 1.0, "train": 5.0}, progress=_Quiet())
    narrator.phase("data")
    now[0] += 1.5
    narrator.phase("train")
    now[0] += 4.25
    narrator.close()
    assert narrator.timings() == "data 1.5, train 4.2"  # 4.25 rounds half to even
    narrator.close()  # a second close changes nothing
    assert narrator.timings() == "data 1.5, train 4.2"


def test_traffic_keeps_its_http_clients_between_calls(tmp_path):
    traffic = Traffic(1, 2, lambda: tmp_path / "ingest.token")
    with traffic.client() as first:
        with traffic.client() as second:  # in use: another one
            assert second is not first
    with traffic.client() as again:
        assert again in (first, second)
    traffic.close()
    assert first.is_closed and second.is_closed
    # the ingest token is read once, then kept (the monitor makes the file; it does not change)
    token = traffic.monitor_auth()
    (tmp_path / "ingest.token").write_text("another")
    assert traffic.monitor_auth() == token


def test_the_demo_stops_every_service_and_forgets_their_pid_files(tmp_path):
    processes = DemoProcesses(tmp_path)
    # each takes a while to stop after SIGTERM, as a server draining its connections does
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.5), sys.exit(0))); time.sleep(120)"
    for name in ("monitor", "serve"):
        svc = Service(name, [], tmp_path / f"{name}.log")
        svc.proc = spawn([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
        processes.services.append(svc)
        (tmp_path / f"{name}.pid").write_text(str(svc.proc.pid))
    processes.stop()
    assert all(svc.proc.poll() is not None for svc in processes.services)
    assert not any(process_alive(svc.proc.pid) for svc in processes.services)
    assert not list(tmp_path.glob("*.pid"))


def test_the_rollout_traffic_waits_while_the_rollout_is_pending(tmp_path):
    from serving.rollout import PENDING, PROGRESSING, RolloutState, RolloutStore

    store = RolloutStore(tmp_path / "rollout", "churn")
    assert _status(store) == PENDING  # no rollout yet: the deploy step has not written one
    state = RolloutState(model_name="churn", canary_version="2", primary_version="1")
    store.save(state)
    assert _status(store) == PENDING  # deployed, the controller not started yet
    state.status = PROGRESSING
    store.save(state)
    assert _status(store) == PROGRESSING  # the canary steps began: traffic flows
