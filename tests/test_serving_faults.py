"""Serving must never fall over and nothing accepted may be lost: regressions of reported faults.

Gateway faults run against live loopback upstreams (one of them a raw socket server that drops
pooled keep-alive connections); the serve/backend faults use stand-in processes (``sleep``) so
that no model server has to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from driftloop.core.errors import ServingError
from driftloop.core.processes import process_alive, stop_process
from serving.gateway import GatewayConfig, Upstream, create_gateway_app
from serving.local_backend import LocalBackend, ProcessInfo
from serving.rollout import PROGRESSING, RolloutController
from tests.conftest import make_settings
from tests.serving_helpers import FakeModelServer, row, serve_app

TOKEN = "faults-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


class DroppingUpstream:
    """A raw HTTP/1.1 model server that closes a keep-alive connection when the next request arrives on it,
    without answering — what a pooled client meets when the server closed the idle connection (e.g. after
    a 500) just as the request went out. ``always``: it never answers at all."""

    def __init__(self, always: bool = False) -> None:
        self.always = always
        self.answered = 0
        self.dropped = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf, served = b"", 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                if self.always or served >= 1:
                    self.dropped += 1
                    return  # closes the connection, no response byte
                served += 1
                self.answered += 1
                body = b'{"predictions": [1], "model_version": "1"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@contextlib.contextmanager
def gateway(primary_url: str, canary_url: str | None = None, pct: float = 0.0, **kw):
    kw.setdefault("admin_token", TOKEN)
    kw.setdefault("ingest_token", TOKEN)  # labels (POST /feedback) take the ingest token; one token in these tests
    cfg = GatewayConfig(name="churn", primary=Upstream(primary_url, "1"),
                        canary=Upstream(canary_url, "2") if canary_url else None, canary_percent=pct, **kw)
    with serve_app(create_gateway_app(cfg)) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield url, client


def predict(client: httpx.Client, i: int = 1, **headers: str) -> httpx.Response:
    return client.post("/v1/models/churn:predict", json={"instances": [row(i)]}, headers=headers)


@pytest.fixture(scope="module")
def upstream():
    fake = FakeModelServer("churn", "1")
    with serve_app(fake.app) as url:
        yield fake, url


# -- stale pooled connections ------------------------------------------------------------------
def test_a_dropped_pooled_connection_is_retried_and_never_reaches_the_client():
    dropping = DroppingUpstream()
    try:
        with gateway(dropping.url) as (_, c):
            codes = [predict(c, i).status_code for i in range(6)]
            assert codes == [200] * 6, codes
            assert dropping.dropped >= 1  # the stale connection really was met, and retried
            stats = c.get("/admin/stats").json()["versions"]["1"]
            assert stats["errors"] == 0 and stats["gateway_errors"] == 0
            assert "driftloop_gateway_upstream_retries_total 5.0" in c.get("/metrics").text
    finally:
        dropping.close()


def test_gateway_502s_from_dropped_connections_do_not_count_against_a_canary(upstream):
    _, p_url = upstream
    dropping = DroppingUpstream(always=True)
    dead = f"http://127.0.0.1:{_free_port()}"
    try:
        with gateway(p_url, dropping.url, 100) as (_, c):
            r = predict(c)
            assert r.status_code == 502 and "canary" in r.json()["error"]
            canary = c.get("/admin/stats").json()["versions"]["2"]
            assert canary["errors"] == 0 and canary["error_rate"] == 0.0 and canary["gateway_errors"] == 1
        with gateway(p_url, dead, 100) as (_, c):  # a canary that is not there at all does count
            assert predict(c).status_code == 502
            assert c.get("/admin/stats").json()["versions"]["2"]["errors"] == 1
    finally:
        dropping.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- feedback ------------------------------------------------------------------------------------
def test_nan_label_is_refused_and_stats_keep_answering(upstream):
    _, p_url = upstream
    with gateway(p_url) as (_, c):
        assert predict(c, 3, **{"x-request-id": "rq-nan"}).status_code == 200
        as_text = c.post("/feedback", content=b'{"id":"rq-nan","label":NaN}',
                         headers={**AUTH, "content-type": "text/plain"})
        assert as_text.status_code == 415 and "application/json" in as_text.json()["error"]
        as_json = c.post("/feedback", content=b'{"id":"rq-nan","label":NaN}',
                         headers={**AUTH, "content-type": "application/json"})
        assert as_json.status_code == 400 and "NaN" in as_json.json()["error"]
        for bad in ({"id": "rq-nan", "label": {"a": 1}}, {"id": "rq-nan", "label": None}, {"id": 7, "label": 1},
                    {"id": "rq-nan", "label": []}, {"id": "rq-nan", "label": 1, "extra": 2}):
            assert c.post("/feedback", json=bad, headers=AUTH).status_code == 400, bad
        stats = c.get("/admin/stats")
        assert stats.status_code == 200 and stats.json()["versions"]["1"]["labels"] == 0
        assert c.post("/feedback", json={"id": "rq-nan", "label": 1}, headers=AUTH).json()["accepted"] == 1
        assert c.get("/admin/stats").json()["versions"]["1"]["labels"] == 1


def test_one_label_per_request_id_so_no_client_can_tilt_a_comparison(upstream):
    _, p_url = upstream
    with gateway(p_url) as (_, c):
        ids = [predict(c, i).headers["x-request-id"] for i in range(3)]
        first = c.post("/feedback", json=[{"id": ids[0], "label": 1}, {"id": ids[0], "label": 0}], headers=AUTH)
        assert first.json() == {"accepted": 1, "unknown": [], "duplicate": [ids[0]]}
        for _ in range(5):
            again = c.post("/feedback", json={"id": ids[0], "label": 0}, headers=AUTH)
            assert again.status_code == 409 and ids[0] in again.json()["error"]
        mixed = c.post("/feedback", json=[{"id": ids[1], "label": 1}, {"id": ids[0], "label": 1}, {"id": "x", "label": 1}],
                       headers=AUTH)
        assert mixed.status_code == 200 and mixed.json() == {"accepted": 1, "unknown": ["x"], "duplicate": [ids[0]]}
        # a batch with a malformed item records nothing
        bad = c.post("/feedback", json=[{"id": ids[2], "label": 1}, {"id": ids[1], "label": {"x": 1}}], headers=AUTH)
        assert bad.status_code == 400 and "item 1" in bad.json()["error"]
        inf = c.post("/feedback", content=json.dumps([{"id": ids[2], "label": 1}, {"id": ids[2], "label": 1e999}]),
                     headers={**AUTH, "content-type": "application/json"})  # json.dumps writes Infinity
        assert inf.status_code == 400 and "Infinity" in inf.json()["error"]
        assert c.get("/admin/stats").json()["versions"]["1"]["labels"] == 2
        assert c.post("/feedback", json={"id": ids[2], "label": 1}, headers=AUTH).json()["accepted"] == 1


def test_feedback_body_has_a_limit(upstream):
    _, p_url = upstream
    with gateway(p_url, max_feedback_bytes=2048) as (_, c):
        rid = predict(c).headers["x-request-id"]
        big = [{"id": rid, "label": 1}] * 200
        r = c.post("/feedback", json=big, headers=AUTH)
        assert r.status_code == 413 and "2048" in r.json()["error"]
        assert c.post("/feedback", json={"id": rid, "label": 1}, headers=AUTH).json()["accepted"] == 1


def test_stats_stay_json_when_an_upstream_answered_nan():
    async def nan_model(request):
        return Response(b'{"predictions": [NaN, 1.5], "model_version": "1"}', media_type="application/json")

    app = Starlette(routes=[Route("/v1/models/{tail}", nan_model, methods=["POST"])])
    with serve_app(app) as url, gateway(url) as (_, c):
        assert predict(c).status_code == 200
        stats = c.get("/admin/stats")
        assert stats.status_code == 200
        assert json.loads(stats.text)["versions"]["1"]["predictions"] == [None, 1.5]


# -- admin ---------------------------------------------------------------------------------------
def test_admin_needs_the_token_and_valid_upstreams(upstream):
    _, p_url = upstream
    other = FakeModelServer("churn", "2")
    with serve_app(other.app) as c_url, gateway(p_url, c_url, 10) as (url, c):
        for path, body in (("/admin/split", {"canary_percent": 50}),
                           ("/admin/upstreams", {"canary": {"url": c_url, "version": "9"}})):
            assert c.put(path, json=body).status_code == 401
            wrong = c.put(path, json=body, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "token" in wrong.json()["error"]
        port = int(url.rsplit(":", 1)[1])
        bad = [({"canary": {"url": "file:///etc/passwd", "version": "2"}}, "http"),
               ({"canary": {"url": "not a url", "version": "2"}}, "http"),
               ({"canary": {"url": c_url, "version": 2}}, "version"),
               ({"canary": {"url": url, "version": "2"}}, "gateway itself"),
               ({"canary": {"url": f"http://localhost:{port}/", "version": "2"}}, "gateway itself"),
               ({"primary": {"url": "http://", "version": "1"}}, "host"),
               ({"canary": {"url": c_url, "version": "2", "extra": 1}}, "canary must be"),
               ({"canary": {"url": c_url, "version": "2"}, "canary_percent": float("nan")}, "NaN")]
        for body, message in bad:
            content = json.dumps(body).encode()  # json.dumps writes NaN, which the gateway must refuse
            r = c.put("/admin/upstreams", content=content, headers={**AUTH, "content-type": "application/json"})
            assert r.status_code == 400 and message in r.json()["error"], (body, r.text)
        status = c.get("/admin/status").json()
        assert status["canary"] == {"url": c_url, "version": "2"} and status["canary_percent"] == 10
        ok = c.put("/admin/upstreams", json={"canary": {"url": c_url, "version": "9"}}, headers=AUTH)
        assert ok.status_code == 200 and ok.json()["canary"]["version"] == "9"
        assert c.put("/admin/split", json={"canary_percent": 100}, headers=AUTH).status_code == 200
        assert predict(c).headers["x-model-version"] == "9"
    with gateway(p_url, admin_token=None) as (_, c):  # no token configured: admin is locked, not open
        r = c.put("/admin/split", json={"canary_percent": 0}, headers=AUTH)
        assert r.status_code == 401 and "DRIFTLOOP_GATEWAY_TOKEN" in r.json()["error"]


# -- rollout -------------------------------------------------------------------------------------
class _StatsFail:
    def __init__(self) -> None:
        self.weights: list[int] = []

    def set_weight(self, percent: int) -> None:
        self.weights.append(percent)

    def stats(self, since, canary_version, primary_version):  # noqa: ANN001, ANN201
        raise ServingError("gateway refused GET /admin/stats: 500 Internal Server Error")


def test_a_failing_stats_call_neither_fails_nor_strands_the_rollout(tmp_path):
    s = make_settings(tmp_path / "ws", tmp_path / "x.parquet", **{"rollout.step_weights": [20, 50],
                                                                   "rollout.threshold": 1})
    RolloutController.begin(s, canary_version="2", primary_version="1")
    target = _StatsFail()
    ctl = RolloutController(s, target)
    assert ctl.step()["decision"] == "start" and target.weights == [20]
    for _ in range(3):
        rec = ctl.step()
        assert rec["decision"] == "unavailable" and "500" in rec["reason"]
    state = ctl.state()
    assert state.status == PROGRESSING and state.weight == 20 and state.failed_checks == 0


# -- driftloop serve: a second one, and a takeover after a crash ------------------------------------
def _sleeper() -> int:
    return subprocess.Popen(["sleep", "120"], start_new_session=True).pid


def _write_state(s, owner: int, pids: dict[str, int]) -> None:
    path = s.workspace_dir / "serving" / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"owner": owner, "canary_percent": 20, "pending_canary": None, "canary": None}
    for role, pid in pids.items():
        state[role] = {"role": role, "pid": pid, "port": 1, "url": "http://127.0.0.1:1", "version": "1",
                       "model_uri": "models:/churn/1"}
    path.write_text(json.dumps(state))


@pytest.fixture
def sleepers():
    started: list[int] = []

    def make() -> int:
        started.append(_sleeper())
        return started[-1]

    yield make
    for pid in started:
        stop_process(pid, 2.0)


def test_a_second_serve_refuses_before_touching_the_first(tmp_path, sleepers):
    from typer.testing import CliRunner

    from driftloop.app.cli import app
    from driftloop.core.registry import CHAMPION, Registry

    s = make_settings(tmp_path / "ws", tmp_path / "x.parquet", **{"serving.name": "churn"})
    reg = Registry.from_settings(s)
    reg.client.create_registered_model("churn")
    reg.client.create_model_version("churn", source=str(tmp_path / "m1"))
    reg.set_alias("churn", CHAMPION, "1")
    first_serve, gateway_pid, primary_pid = sleepers(), sleepers(), sleepers()
    _write_state(s, first_serve, {"gateway": gateway_pid, "primary": primary_pid})
    args = ["-p", f"workspace={s.workspace_dir}", "-p", "mlflow.model_name=churn", "-p", "mlflow.experiment=test"]
    out = CliRunner().invoke(app, ["serve", "--port", "0", *args])
    assert isinstance(out.exception, ServingError) and "already serving" in str(out.exception)
    assert "stopped" not in out.output
    assert all(process_alive(p) for p in (first_serve, gateway_pid, primary_pid))
    state = LocalBackend(s).status()
    assert state["gateway"]["pid"] == gateway_pid and state["owner"] == first_serve
    assert LocalBackend(s).stop(owner=os.getpid()) is False and process_alive(gateway_pid)


def test_a_new_serve_takes_over_after_the_previous_one_was_killed(tmp_path, sleepers, monkeypatch):
    s = make_settings(tmp_path / "ws", tmp_path / "x.parquet")
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan_gateway, orphan_primary = sleepers(), sleepers()
    _write_state(s, dead.pid, {"gateway": orphan_gateway, "primary": orphan_primary})
    backend = LocalBackend(s)
    new = {}

    def fake_server(role, version, model_uri, port=0):  # noqa: ANN001, ANN202
        new[role] = sleepers()
        return ProcessInfo(role, new[role], 2, "http://127.0.0.1:2", version, model_uri)

    monkeypatch.setattr(backend, "start_model_server", fake_server)
    monkeypatch.setattr(backend, "start_gateway",
                        lambda p, c, pct: ProcessInfo("gateway", (new.setdefault("gateway", sleepers())), 3,
                                                      "http://127.0.0.1:3"))
    state = backend.serve("1")
    assert not process_alive(orphan_gateway) and not process_alive(orphan_primary)
    assert state["owner"] == os.getpid() and state["gateway"]["pid"] == new["gateway"]
    assert backend.stop(owner=os.getpid()) is True
    assert not process_alive(new["gateway"]) and not process_alive(new["primary"])


def test_stopping_serve_keeps_a_canary_still_out_as_pending(tmp_path, sleepers):
    s = make_settings(tmp_path / "ws", tmp_path / "x.parquet")
    _write_state(s, os.getpid(), {"gateway": sleepers(), "primary": sleepers(), "canary": sleepers()})
    backend = LocalBackend(s)
    assert backend.stop(owner=os.getpid())
    state = backend.status()
    assert state["gateway"] is None and state["canary"] is None
    assert state["pending_canary"] == {"version": "1", "model_uri": "models:/churn/1", "percent": 20}


def test_a_serve_without_a_token_shares_its_own_with_the_workspace_only(tmp_path, monkeypatch):
    """The deploy step of a retraining run (another process, no DRIFTLOOP_GATEWAY_TOKEN) finds the token
    a serve made, in the workspace, readable by this user only; the variable, when set, wins."""
    import stat

    monkeypatch.delenv("DRIFTLOOP_GATEWAY_TOKEN", raising=False)
    settings = make_settings(tmp_path / "ws", tmp_path / "unused.parquet")
    serving = LocalBackend(settings)
    assert serving.admin_token() is None
    serving._ensure_admin_token()
    made = os.environ["DRIFTLOOP_GATEWAY_TOKEN"]
    assert stat.S_IMODE(serving.token_path.stat().st_mode) == 0o600
    monkeypatch.delenv("DRIFTLOOP_GATEWAY_TOKEN")
    assert LocalBackend(settings).admin_token() == made  # another process of the same workspace
    assert LocalBackend(make_settings(tmp_path / "other", tmp_path / "unused.parquet")).admin_token() is None
    monkeypatch.setenv("DRIFTLOOP_GATEWAY_TOKEN", "from-env")
    assert LocalBackend(settings).admin_token() == "from-env"
