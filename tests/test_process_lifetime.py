"""Every process driftloop starts dies with the process that started it, however that one ends.

``processes.spawn`` on its own (SIGKILL and SIGTERM of the parent; a shell's grandchild; a
child started from a thread; a child owned by another process), then the real commands: a
SIGKILLed / SIGTERMed ``driftloop serve`` leaves no model server or gateway behind, and a
SIGKILLed ``driftloop monitor`` takes its retraining worker and the pipeline's task processes
with it, the in-flight guard marking the run LOST at the next start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from driftloop.core.processes import process_alive
from tests.conftest import free_port, make_settings

TOKEN = "lifetime-token"


def _children(pid: int) -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(name))
    return tree


def descendants(pid: int) -> set[int]:
    """Live pids below ``pid`` (children, grandchildren, ...)."""
    tree, out, todo = _children(pid), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return {p for p in out if process_alive(p)}


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_gone(pids: set[int], timeout: float = 20.0) -> set[int]:
    """The pids still alive after ``timeout`` (empty when all are gone)."""
    deadline = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < deadline:
        left = {p for p in left if process_alive(p)}
        time.sleep(0.1)
    return left


def kill_all(pids: set[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


PARENT = textwrap.dedent("""
    import os, sys, threading, time
    from driftloop.core.processes import spawn
    kids = [spawn(["sleep", "300"]),                                    # direct child
            spawn(["sh", "-c", "sleep 300; true"], kill_group=True)]  # a shell and its grandchild
    out = []
    t = threading.Thread(target=lambda: out.append(spawn(["sleep", "300"])))  # from a thread that ends
    t.start(); t.join()
    kids += out
    owner = int(sys.argv[1])
    kids.append(spawn(["sleep", "300"], owner_pid=owner))  # owned by another process
    print(" ".join(str(k.pid) for k in kids), flush=True)
    time.sleep(300)
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_spawned_children_die_with_the_parent(sig):
    owner = subprocess.Popen(["sleep", "300"])
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(owner.pid)], stdout=subprocess.PIPE, text=True)
    try:
        leaders = [int(p) for p in parent.stdout.readline().split()]
        time.sleep(0.5)
        below = descendants(parent.pid)
        assert len(below) >= 7, [cmdline(p) for p in below]  # 4 leaders, 2 watchers' commands, sh's sleep
        assert all(process_alive(p) for p in leaders)
        owned = leaders[-1]
        owned_tree = {owned} | descendants(owned)
        parent.send_signal(sig)
        parent.wait(10)
        left = wait_gone(below - owned_tree, 10)
        assert not left, [cmdline(p) for p in left]
        # the child owned by another process outlives the parent, and goes when its owner does
        assert all(process_alive(p) for p in owned_tree)
        owner.kill()
        owner.wait()
        left = wait_gone(owned_tree, 10)
        assert not left, [cmdline(p) for p in left]
    finally:
        for proc in (parent, owner):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kill_all(descendants(os.getpid()) - {parent.pid, owner.pid})


def _env(settings) -> dict[str, str]:
    return {**os.environ, "DRIFTLOOP_WORKSPACE": str(settings.workspace_dir),
            "DRIFTLOOP_MLFLOW__TRACKING_URI": settings.tracking_uri, "DRIFTLOOP_MLFLOW__MODEL_NAME": "churn",
            "DRIFTLOOP_MLFLOW__EXPERIMENT": "test", "DRIFTLOOP_DATA__SOURCE": str(settings.data.source),
            "DRIFTLOOP_DATA__TIME_COLUMN": "event_time", "DRIFTLOOP_SERVING__NAME": "churn"}


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout:.0f}s")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_driftloop_serve_leaves_no_server_running(tmp_path, trained, sig):
    base, _ = trained
    settings = make_settings(tmp_path / "ws", base.data.source, **{"mlflow.tracking_uri": base.tracking_uri})
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "driftloop.app.cli", "serve", "--port", str(port), "--no-rollout"],
                            env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    below: set[int] = set()
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        below = descendants(proc.pid)
        assert any("serving.gateway" in cmdline(p) for p in below)
        assert any("serving.predictor" in cmdline(p) for p in below)
        proc.send_signal(sig)
        proc.wait(30)
        left = wait_gone(below, 20)
        assert not left, [cmdline(p) for p in left]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(below)


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def test_killing_the_monitor_takes_its_retraining_worker_and_tasks(tmp_path, scenario_path):
    from monitoring.alerts import AlertStore
    from monitoring.trigger import Trigger

    settings = make_settings(tmp_path / "ws", scenario_path, **{"trigger.min_samples": 0})
    port = free_port()
    env = {**_env(settings), "DRIFTLOOP_WEBHOOK_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "driftloop.app.cli", "monitor", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    below: set[int] = set()
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        payload = {"receiver": "driftloop", "status": "firing", "alerts": [
            {"status": "firing", "fingerprint": "f1", "startsAt": "2026-01-31T00:00:00Z", "labels": {}}]}
        r = httpx.post(f"http://127.0.0.1:{port}/alerts/alertmanager", json=payload,
                       headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 200 and r.json()["decisions"][0]["decision"] == "started", r.text
        alert_id = r.json()["decisions"][0]["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until a pipeline task runs under the worker
            below = descendants(proc.pid)
            # a task: a fresh executor, or a child forked by the run's task server (pipelines/task_server.py)
            if any("kfp.dsl.executor_main" in cmdline(p) or "ephemeral_component" in cmdline(p)
                   or ("task_server.py" in cmdline(p) and "task_server.py" in cmdline(_ppid(p))) for p in below):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no pipeline task started: {[cmdline(p) for p in below]}")
        assert any("pipelines.retrain" in cmdline(p) for p in below)
        proc.kill()
        proc.wait(10)
        left = wait_gone(below, 20)
        assert not left, [cmdline(p) for p in left]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(below)
    # the next monitor does not forget the run: the in-flight guard marks it LOST, and a new alert may start
    alerts = AlertStore.from_settings(settings)
    try:
        trig = Trigger(settings, alerts, runner=None)
        assert trig.refresh() is None
        assert alerts.get(alert_id)["run_state"] == "LOST"
    finally:
        alerts.close()
