"""``driftloop serve`` supervises its processes like a kubelet, and a restarted serve resumes the rollout.

Each test runs the real CLI (``python -m tests.fake_serve serve``: the real serve, gateway,
supervisor and rollout controller; only the model servers are ``tests.fake_model_server``) against a
real MLflow registry, with a thread sending requests through the gateway the whole time and a
recording sink as the inference log. Everything a test starts goes through
``driftloop.core.processes.spawn`` (it dies with the test process) and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from components.deploy import deploy_canary
from driftloop.core.processes import process_alive, spawn, stop_process, stop_processes
from driftloop.core.registry import CHAMPION, Registry
from serving.local_backend import LocalBackend
from serving.rollout import PROGRESSING, ROLLED_BACK, GatewayTarget, RolloutController
from tests.conftest import make_settings
from tests.fake_serve import _fake_argv
from tests.serving_helpers import RecordingSink, row, serve_app

ROOT = Path(__file__).resolve().parent.parent


# -- helpers ------------------------------------------------------------------------------------
def _settings(tmp_path: Path, sink_port: int, **extra):
    return make_settings(tmp_path / "ws", tmp_path / "x.parquet", **{
        "serving.gateway_port": 0, "serving.name": "churn", "rollout.step_weights": [50],
        "rollout.interval_seconds": 3600.0, "monitor.port": sink_port, **extra})


def _registry(settings, tmp_path: Path) -> Registry:
    reg = Registry.from_settings(settings)
    reg.client.create_registered_model("churn")
    for i in (1, 2):
        reg.client.create_model_version("churn", source=str(tmp_path / f"m{i}"))
    reg.set_alias("churn", CHAMPION, "1")
    reg.set_alias("churn", "challenger", "2")
    return reg


class Serve:
    """One ``driftloop serve`` process (fake model servers), its output in a file."""

    def __init__(self, settings, out: Path) -> None:
        self.settings, self.out = settings, out
        self.backend = LocalBackend(settings)
        args = ["-p", f"workspace={settings.workspace_dir}", "-p", "mlflow.model_name=churn",
                "-p", "mlflow.experiment=test", "-p", "serving.name=churn", "-p", "rollout.step_weights=[50]",
                "-p", "rollout.interval_seconds=3600", "-p", f"monitor.port={settings.monitor.port}"]
        env = {k: v for k, v in os.environ.items() if k not in ("DRIFTLOOP_GATEWAY_TOKEN", "DRIFTLOOP_INGEST_TOKEN")}
        with open(out, "ab") as fh:
            self.proc = spawn([sys.executable, "-m", "tests.fake_serve", "serve", "--port", "0", *args],
                              stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT), env=env)

    def wait_serving(self, canary: bool = True, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            state = self.backend.status()
            if state.get("gateway") and state.get("owner") == self.proc.pid and (state.get("canary") or not canary):
                gw = httpx.get(state["gateway"]["url"] + "/admin/status", timeout=5).json()
                if not canary or gw["canary_percent"] == state["canary_percent"]:
                    return state
            time.sleep(0.2)
        raise AssertionError(f"serve did not come up:\n{self.output()}")

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def all_pids(self) -> list[int]:
        state = self.backend.status()
        return [e["pid"] for e in [state.get(r) for r in ("gateway", "primary", "canary")] + state["replicas"] if e]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc.pid, 1.0)


class Traffic:
    """A thread posting requests through the gateway continuously; every answer kept (time, status, id)."""

    def __init__(self, url: str) -> None:
        self.url, self.answers = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                i += 1
                rid = f"t-{i}"
                try:
                    r = client.post("/v1/models/churn:predict", json={"instances": [row(i)]},
                                    headers={"x-request-id": rid})
                    self.answers.append((time.monotonic(), r.status_code, rid, r.headers.get("x-serving-role")))
                except httpx.HTTPError:
                    self.answers.append((time.monotonic(), 0, rid, None))
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def ok_after(self, t: float) -> list[tuple]:
        return [a for a in self.answers if a[0] > t and a[1] == 200]


def _leaf(pid: int) -> int:
    """The model server itself under ``pid`` (a watcher leads the group of a server another process started)."""
    while True:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return pid
        if not kids:
            return pid
        pid = int(kids[0])


def _wait(cond, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A serve with the champion v1, the canary v2 at 50 % (a pending rollout) and a recording sink."""
    monkeypatch.setattr(LocalBackend, "model_server_argv", _fake_argv)  # replicas this process starts
    for var in ("DRIFTLOOP_GATEWAY_TOKEN", "DRIFTLOOP_INGEST_TOKEN"):  # the workspace's own token files decide
        monkeypatch.delenv(var, raising=False)
    sink = RecordingSink()
    started: list[Serve] = []
    with serve_app(sink.app) as sink_url:
        s = _settings(tmp_path, int(sink_url.rsplit(":", 1)[1]))
        reg = _registry(s, tmp_path)
        assert deploy_canary(s, version="2", registry=reg).action == "pending"

        def start() -> Serve:
            started.append(Serve(s, tmp_path / "serve.out"))
            return started[-1]

        try:
            yield s, reg, sink, start
        finally:
            for srv in started:
                srv.stop()
            LocalBackend(s).stop()
            assert not any(process_alive(srv.proc.pid) for srv in started)


# -- 1. a model server (or the gateway) killed under load is noticed, routed around and restarted -------
KILLS = [
    pytest.param("primary", signal.SIGKILL, id="primary-kill-9"),
    pytest.param("canary", signal.SIGKILL, id="canary-kill-9"),
    pytest.param("replica-1", signal.SIGKILL, id="replica-kill-9"),
    pytest.param("gateway", signal.SIGKILL, id="gateway-kill-9"),
    pytest.param("canary", signal.SIGSTOP, id="canary-hung-fails-readiness"),
]


@pytest.mark.parametrize(("role", "sig"), KILLS)
def test_a_killed_process_is_restarted_and_traffic_flows_again(served, role, sig):
    s, reg, sink, start = served
    srv = start()
    state = srv.wait_serving()
    url = state["gateway"]["url"]
    assert LocalBackend(s).set_replicas(2) == 2
    state = srv.backend.status()
    before = {"replica-1" if role == "replica-1" else role: state["replicas"][0] if role == "replica-1" else state[role]}
    old_pid = before[role]["pid"]
    traffic = Traffic(url)
    try:
        _wait(lambda: len(traffic.ok_after(0)) >= 20, 30, "traffic before the kill")
        killed_at = time.monotonic()
        os.kill(_leaf(old_pid), sig)

        def restarted():  # noqa: ANN202
            st = srv.backend.status()
            entry = st[role] if role in ("gateway", "primary", "canary") else next(
                (r for r in st["replicas"] if r["role"] == role), None)
            return st if entry and entry["pid"] != old_pid and (st.get("restarts") or {}).get(role) == 1 \
                and not st.get("down") else None

        st = _wait(restarted, 45, f"{role} restarted")
        recovered = _wait(lambda: traffic.ok_after(time.monotonic() - 0.5), 30, "200s again")
        assert recovered[0][0] - killed_at < 40

        def routed_as_before():  # noqa: ANN202 (a replica a killed gateway took with it is restarted too)
            st = srv.backend.status()
            gw = httpx.get(url + "/admin/status", timeout=5).json()
            return (not st.get("down") and len(st["replicas"]) == 1 and gw["canary_percent"] == 50
                    and gw["canary"]["url"] == st["canary"]["url"]
                    and {u["url"] for u in [gw["primary"], *gw["replicas"]]}
                    == {e["url"] for e in [st["primary"], *st["replicas"]]})

        _wait(routed_as_before, 45, "the gateway to route as before")
        settled = time.monotonic()
        _wait(lambda: len(traffic.ok_after(settled)) >= 30, 30, "traffic after the restart")
        roles_after = {a[3] for a in traffic.answers if a[0] > settled and a[1] == 200}
        assert roles_after == {"primary", "canary"}  # both served again, at the rollout's split
        assert all(a[1] == 200 for a in traffic.answers if a[0] > settled)
    finally:
        traffic.stop()
    if sig == signal.SIGSTOP and process_alive(old_pid):
        stop_process(old_pid, 1.0)
    # every answered request is in the inference log, nothing the gateway acknowledged was lost (a gateway
    # killed with SIGKILL loses the events still in its memory queue: from it, those answered after its restart)
    ok_ids = {a[2] for a in traffic.answers if a[1] == 200 and (role != "gateway" or a[0] > settled)}
    deadline = time.monotonic() + 30
    while not ok_ids <= (logged := {e["headers"].get("ce-id") for e in list(sink.events)}) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ok_ids <= logged, f"{len(ok_ids - logged)} answered requests missing from the log"
    out = srv.output()
    assert f"{role} v" in out and "is down" in out and "restarted " + role in out and "next back-off" in out
    # serve status shows the restart count (the state file is where serve counts it)
    status = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "serve", "status", "--json", "-p",
                             f"workspace={s.workspace_dir}"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert json.loads(status.stdout)["restarts"][role] == 1
    metrics = httpx.get(url + "/metrics", timeout=5).text  # and Prometheus sees it on the gateway
    assert f'driftloop_serve_restarts_total{{role="{role}"}} 1.0' in metrics, metrics
    assert f'driftloop_serve_down{{role="{role}"}} 0.0' in metrics


# -- 1b. a canary that keeps dying is rolled back through the rollout --------------------------------
def test_a_canary_killed_three_times_is_rolled_back(served):
    s, reg, sink, start = served
    srv = start()
    state = srv.wait_serving()
    url = state["gateway"]["url"]
    traffic = Traffic(url)
    try:
        for n in (1, 2):
            pid = srv.backend.status()["canary"]["pid"]
            os.kill(_leaf(pid), signal.SIGKILL)
            _wait(lambda: (srv.backend.status().get("restarts") or {}).get("canary") == n
                  and not srv.backend.status().get("down"), 45, f"canary restart {n}")
        os.kill(_leaf(srv.backend.status()["canary"]["pid"]), signal.SIGKILL)
        st = _wait(lambda: (lambda x: x if x["canary"] is None else None)(srv.backend.status()), 45, "rollback")
        t = time.monotonic()
        _wait(lambda: len(traffic.ok_after(t)) >= 20, 30, "traffic after the rollback")
        assert {a[3] for a in traffic.ok_after(t)} == {"primary"}
        assert all(a[1] == 200 for a in traffic.answers if a[0] > t)
    finally:
        traffic.stop()
    assert st["canary_percent"] == 0 and st["pending_canary"] is None
    rollout = RolloutController(s, target=None).store.load()
    assert rollout.status == ROLLED_BACK and "died 3 times" in rollout.reason
    assert rollout.history[-1]["decision"] == "rollback"
    assert httpx.get(url + "/admin/status", timeout=5).json()["canary"] is None
    out = srv.output()
    assert "restart in 1 s" in out and "restart in 2 s" in out and "rolled back" in out
    assert srv.proc.poll() is None  # serving goes on


# -- 2. serve killed with SIGKILL and started again resumes the rollout where it was ----------------
@pytest.mark.parametrize("weight", [None, 30], ids=["at-first-weight", "after-a-weight-change"])
def test_serve_killed_and_restarted_resumes_canary_weight_and_token(served, weight):
    s, reg, sink, start = served
    srv = start()
    state = srv.wait_serving()
    token = (s.workspace_dir / "serving" / "gateway.token").read_text()
    store = RolloutController(s, target=None).store
    _wait(lambda: store.load().status == PROGRESSING, 30, "serve's controller to start the rollout")
    if weight is not None:  # the rollout moves the weight (through the backend, as serve's controller does)
        GatewayTarget(state["gateway"]["url"], backend=LocalBackend(s), token=token).set_weight(weight)
    expected = weight or 50
    gw = httpx.get(state["gateway"]["url"] + "/admin/status", timeout=5).json()
    assert srv.backend.status()["canary_percent"] == gw["canary_percent"] == expected
    pids = srv.all_pids()
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)
    _wait(lambda: not any(process_alive(p) for p in pids), 30, "the killed serve's children to go")
    again = start()
    state2 = again.wait_serving()
    assert state2["canary"]["version"] == "2" and state2["canary_percent"] == expected
    assert state2["pending_canary"] is None
    assert (s.workspace_dir / "serving" / "gateway.token").read_text() == token
    url = state2["gateway"]["url"]
    gw2 = httpx.get(url + "/admin/status", timeout=5).json()
    assert gw2["canary_percent"] == expected and gw2["canary"]["version"] == "2"
    ok = httpx.put(url + "/admin/split", json={"canary_percent": expected},
                   headers={"authorization": f"Bearer {token}"}, timeout=5)
    assert ok.status_code == 200, ok.text  # the same token still drives the gateway
    assert "dropping stale canary" not in again.output()
    r = httpx.post(url + "/v1/models/churn:predict", json={"instances": [row(1)]}, timeout=10)
    assert r.status_code == 200
    rollout = RolloutController(s, target=None).store.load()
    assert rollout.canary_version == "2" and not rollout.done


# -- 3. tokens and files: the gateway gets the ingest token; serving files are owner-only -----------
FILES = [
    pytest.param("serving/state.json", 0o600, id="state-file"),
    pytest.param("serving/gateway.token", 0o600, id="gateway-token"),
    pytest.param("monitor/ingest.token", 0o600, id="ingest-token"),
    pytest.param("serving", 0o700, id="serving-folder"),
    pytest.param("serving/logs/gateway.log", 0o600, id="gateway-log"),
]


@pytest.fixture(scope="module")
def one_serve(tmp_path_factory):
    """One serve for the read-only checks (files and the gateway's environment)."""
    tmp = tmp_path_factory.mktemp("files")
    with serve_app(RecordingSink().app) as sink_url:
        s = _settings(tmp, int(sink_url.rsplit(":", 1)[1]))
        assert deploy_canary(s, version="2", registry=_registry(s, tmp)).action == "pending"
        srv = Serve(s, tmp / "serve.out")
        try:
            yield s, srv.wait_serving()
        finally:
            srv.stop()
            assert not process_alive(srv.proc.pid)


@pytest.mark.parametrize(("rel", "mode"), FILES)
def test_serving_files_are_owner_only_and_the_gateway_has_the_ingest_token(one_serve, rel, mode):
    s, state = one_serve
    assert stat.S_IMODE((s.workspace_dir / rel).stat().st_mode) == mode
    env = dict(kv.split("=", 1) for kv in
               Path(f"/proc/{state['gateway']['pid']}/environ").read_text().split("\0") if "=" in kv)
    assert env["DRIFTLOOP_INGEST_TOKEN"] == (s.workspace_dir / "monitor" / "ingest.token").read_text().strip()
    assert httpx.get(state["gateway"]["url"] + "/healthz", timeout=5).status_code == 200


# -- 5. stopping is fast and bounded: all at once, SIGKILL after one shared grace period -------------
@pytest.mark.parametrize("n", [1, 4], ids=["one-stubborn-child", "four-stubborn-children"])
def test_stopping_children_that_ignore_sigterm_is_bounded(n):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"
    procs = [spawn([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == b"up"
    t = time.monotonic()
    stop_processes([p.pid for p in procs], timeout=1.0)
    took = time.monotonic() - t
    assert took < 4.0, took  # one grace period for all of them, not one each
    assert took >= 1.0  # they had their grace period, then SIGKILL
    assert not any(process_alive(p.pid) for p in procs)
