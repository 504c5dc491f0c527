"""Shadow traffic: the gateway mirrors a share of served requests to the candidate after answering from
the primary; the rollout controller judges the shadow phase before any user sees the candidate.
Real gateway, real KServe-protocol upstreams and a real sink on 127.0.0.1."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from serving.gateway import GatewayConfig, Upstream, create_gateway_app
from serving.rollout import PROGRESSING, ROLLED_BACK, SHADOW, GatewayTarget, RolloutController
from tests.conftest import make_settings
from tests.serving_helpers import FakeModelServer, RecordingSink, free_port, row, serve_app, truth

TOKEN = "shadow-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _gateway(p_url: str, s_url: str, *, shadow_percent: float = 100.0, sink_url: str | None = None,
             shadow_timeout: float = 0.3):
    cfg = GatewayConfig(name="churn", namespace="test", primary=Upstream(p_url, "1"), canary=Upstream(s_url, "2"),
                        canary_percent=0.0, admin_token=TOKEN, ingest_token=TOKEN, sink_url=sink_url, shadow_percent=shadow_percent,
                        shadow_timeout=shadow_timeout, seed=1)
    return serve_app(create_gateway_app(cfg))


def _wait_shadow(client: httpx.Client, n: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = client.get("/admin/shadow").json()["stats"] or {}
        if stats.get("requests", 0) >= n or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


@pytest.mark.parametrize("fault", ["slow", "erroring", "down"])
def test_a_slow_erroring_or_dead_shadow_never_changes_a_response_or_its_latency(fault):
    primary, shadow = FakeModelServer("churn", "1"), FakeModelServer("churn", "2")
    shadow.wrong = True  # its answers differ: none of them may reach a user
    shadow.delay = 2.0 if fault == "slow" else 0.0
    shadow.fail = 1.0 if fault == "erroring" else 0.0
    with serve_app(primary.app) as p_url, serve_app(shadow.app) as s_url:
        if fault == "down":
            s_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        with _gateway(p_url, s_url) as gw, httpx.Client(base_url=gw, timeout=10) as client:
            latencies = []
            for i in range(30):
                start = time.perf_counter()
                resp = client.post("/v1/models/churn:predict", json={"instances": [row(i)]})
                latencies.append(time.perf_counter() - start)
                assert resp.status_code == 200
                assert resp.json()["predictions"] == [truth(row(i))]  # the primary's answer, unchanged
                assert resp.headers["x-serving-role"] == "primary" and resp.headers["x-model-version"] == "1"
            stats = _wait_shadow(client, 30, timeout=15)
    # the latency budget: a 2 s shadow delay or a dead shadow never shows in the user's time
    assert sorted(latencies)[int(0.9 * len(latencies))] < 0.5, latencies
    assert stats["requests"] + stats["dropped"] == 30 and stats["errors"] == stats["requests"]
    assert stats["error_rate"] == 1.0


def test_shadow_answers_are_joined_with_the_primary_and_logged_as_shadow():
    primary, shadow = FakeModelServer("churn", "1"), FakeModelServer("churn", "2")
    sink = RecordingSink()
    with serve_app(primary.app) as p_url, serve_app(shadow.app) as s_url, serve_app(sink.app) as sink_url, \
            _gateway(p_url, s_url, sink_url=sink_url + "/events") as gw, httpx.Client(base_url=gw, timeout=10) as client:
        ids = []
        for i in range(60):
            resp = client.post("/v1/models/churn:predict", json={"instances": [row(i)]})
            ids.append(resp.headers["x-request-id"])
        stats = _wait_shadow(client, 60)
        labels = [{"id": rid, "label": truth(row(i)) if i % 4 else 1 - truth(row(i))} for i, rid in enumerate(ids)]
        assert client.post("/feedback", json=labels, headers=AUTH).status_code == 200
        stats = client.get("/admin/shadow").json()["stats"]
        events = sink.wait_for(60 * 2 * 2)
    assert stats["requests"] == 60 and stats["errors"] == 0 and stats["agreement"] == 1.0
    assert stats["labels"] == 60 and stats["shadow_quality"] == stats["primary_quality"] == 0.75  # same rows
    shadow_events = [e for e in events if e["headers"].get("ce-servingrole") == "shadow"]
    assert len(shadow_events) == 120  # request + response of every mirrored request
    assert {e["headers"]["ce-id"] for e in shadow_events} == {f"{rid}-shadow" for rid in ids}
    assert {e["headers"]["ce-modelversion"] for e in shadow_events} == {"2"}
    primary_ids = {e["headers"]["ce-id"] for e in events if e["headers"].get("ce-servingrole") == "primary"}
    assert primary_ids == set(ids)


def _controller(tmp_path, gw_url: str, **rollout):
    cfg = {"rollout.shadow_percent": 100, "rollout.shadow_seconds": 0.1, "rollout.shadow_min_requests": 40,
           "rollout.step_weight": 20, "rollout.min_requests": 5}
    cfg.update({f"rollout.{k}": v for k, v in rollout.items()})
    settings = make_settings(tmp_path / "ws", tmp_path / "unused.parquet", **cfg)
    RolloutController.begin(settings, canary_version="2", primary_version="1", model_name="churn")
    return RolloutController(settings, GatewayTarget(gw_url, token=TOKEN), model_name="churn")


def _serve_until(client: httpx.Client, n: int) -> list[str]:
    roles = []
    for i in range(n):
        resp = client.post("/v1/models/churn:predict", json={"instances": [row(i)]})
        assert resp.status_code == 200
        roles.append(resp.headers["x-serving-role"])
    _wait_shadow(client, n)
    return roles


def test_a_disagreeing_shadow_is_rolled_back_before_any_canary_step(tmp_path):
    primary, shadow = FakeModelServer("churn", "1"), FakeModelServer("churn", "2")
    shadow.wrong = True
    with serve_app(primary.app) as p_url, serve_app(shadow.app) as s_url, \
            _gateway(p_url, s_url, shadow_percent=0) as gw, httpx.Client(base_url=gw, timeout=10) as client:
        ctl = _controller(tmp_path, gw)
        assert ctl.step()["decision"] == "shadow_start"
        assert client.get("/admin/shadow").json()["percent"] == 100
        assert ctl.step()["decision"] == "shadow_wait"  # not enough mirrored requests yet: no verdict
        roles = _serve_until(client, 50)
        time.sleep(0.1)  # rollout.shadow_seconds has passed (50 requests may take less on a quiet machine)
        rec = ctl.step()
        status = client.get("/admin/status").json()
        shadow_after = client.get("/admin/shadow").json()
    assert rec["decision"] == "rollback" and "agreement=0 breaks limit 0.9" in rec["reason"]
    state = ctl.state()
    assert state.status == ROLLED_BACK
    assert [h["decision"] for h in state.history] == ["pending", "shadow_start", "shadow_wait", "rollback"] or \
        [h["decision"] for h in state.history] == ["shadow_start", "shadow_wait", "rollback"]
    assert set(roles) == {"primary"}  # not one user request was answered by the candidate
    assert status["canary"] is None and status["canary_percent"] == 0 and shadow_after["percent"] == 0


def test_a_good_shadow_moves_on_to_the_canary_steps(tmp_path):
    primary, shadow = FakeModelServer("churn", "1"), FakeModelServer("churn", "2")
    with serve_app(primary.app) as p_url, serve_app(shadow.app) as s_url, \
            _gateway(p_url, s_url, shadow_percent=0) as gw, httpx.Client(base_url=gw, timeout=10) as client:
        ctl = _controller(tmp_path, gw)
        assert ctl.step()["decision"] == "shadow_start"
        assert ctl.state().status == SHADOW
        roles = _serve_until(client, 50)
        time.sleep(0.1)  # rollout.shadow_seconds has passed (50 requests may take less on a quiet machine)
        rec = ctl.step()
        status = client.get("/admin/status").json()
        shadow_after = client.get("/admin/shadow").json()
    decisions = [h["decision"] for h in ctl.state().history]
    assert "shadow_pass" in decisions and rec["decision"] == "start"  # first canary weight set after the shadow
    passed = next(h for h in ctl.state().history if h["decision"] == "shadow_pass")
    assert {c["name"]: c["passed"] for c in passed["checks"]}["agreement"] is True
    assert ctl.state().status == PROGRESSING and status["canary_percent"] == 20
    assert set(roles) == {"primary"} and shadow_after["percent"] == 0  # the mirror stops when users meet it


def test_shadow_admin_needs_the_token_and_names_bad_input():
    primary = FakeModelServer("churn", "1")
    with serve_app(primary.app) as p_url, _gateway(p_url, p_url, shadow_percent=0) as gw, \
            httpx.Client(base_url=gw, timeout=10) as client:
        assert client.put("/admin/shadow", json={"percent": 50}).status_code == 401
        bad = client.put("/admin/shadow", json={"percent": 150}, headers=AUTH)
        assert bad.status_code == 400 and "between 0 and 100" in bad.json()["error"]
        bad = client.put("/admin/shadow", content=json.dumps({"pct": 5}), headers={**AUTH, "content-type": "application/json"})
        assert bad.status_code == 400 and "percent" in bad.json()["error"]
        assert client.get("/admin/shadow").json()["percent"] == 0  # nothing changed
        assert client.post("/v1/models/churn:predict", json={"instances": [row(1)]}).status_code == 200
