"""Local replicas: the agent's floor scales real model-server processes behind the real gateway
up and down under load, and no request is dropped."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from driftloop.core.config import load_settings
from driftloop.core.errors import ServingError
from driftloop.core.processes import free_port, process_alive
from serving.agent.actions import LocalActuator
from serving.agent.decisions import DecisionLog
from serving.agent.policy import SET_FLOOR, Action, Guard, Policy
from serving.local_backend import LocalBackend


class FakeServerBackend(LocalBackend):
    """The real backend and gateway; model servers are tests.fake_model_server processes (no MLflow)."""

    def start_model_server(self, role: str, version: str, model_uri: str, port: int = 0):  # noqa: ANN201
        port = port or free_port("127.0.0.1")
        argv = ["tests.fake_model_server", "--model-name", self.settings.serving.name, "--version", version,
                "--http-port", str(port), "--delay", "0.02"]
        return self._spawn(role, argv, port, "/v2/health/ready", version=version, model_uri=model_uri)


@pytest.fixture
def backend(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_GATEWAY_TOKEN", "test-token")
    settings = load_settings(overrides=[f"workspace={tmp_path}", "serving.gateway_port=0",
                                        f"monitor.port={free_port('127.0.0.1')}"], environ={})
    b = FakeServerBackend(settings, ready_timeout=30.0, stop_timeout=5.0)
    b.serve("1")
    try:
        yield b
    finally:
        b.stop()


def test_replicas_scale_up_and_down_under_load_without_dropping_a_request(backend, tmp_path) -> None:
    url = backend.gateway_url + "/v1/models/driftloop-model:predict"
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10.0) as client:
            while not stop.is_set():
                try:
                    statuses.append(client.post(url, json={"instances": [{"tenure": 3}]}).status_code)
                except httpx.HTTPError:
                    statuses.append(-1)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        actuator = LocalActuator(backend, tmp_path / "STOP")
        guard = Guard(Policy(mode="full", floor=1, ceiling=3, max_step=2, cooldown_seconds=0))
        log = DecisionLog(tmp_path / "decisions.jsonl")
        now = time.time()
        decision = guard.check(Action(SET_FLOOR, "driftloop-model", 3, actuator.current_floor("m"), "test"), now)
        log.record(decision)
        assert decision.allowed
        actuator.set_floor("m", decision.applied)
        state = backend.status()
        assert backend.replica_count() == 3 and len(state["replicas"]) == 2
        time.sleep(1.0)
        counts = [httpx.get(r["url"] + "/count").json()["requests"] for r in [state["primary"], *state["replicas"]]]
        assert all(c > 5 for c in counts), counts  # the gateway balances over all three
        decision = guard.check(Action(SET_FLOOR, "driftloop-model", 1, 3, "test"), now + 60)
        assert decision.allowed and decision.applied == 1
        actuator.set_floor("m", decision.applied)
        assert backend.replica_count() == 1
        assert not any(process_alive(int(r["pid"])) for r in state["replicas"])
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert len(statuses) > 100
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


def test_replicas_refuse_bad_counts_and_the_gateway_refuses_bad_replica_lists(backend) -> None:
    with pytest.raises(ServingError, match="at least 1"):
        backend.set_replicas(0)
    gw = backend.gateway_url
    auth = {"authorization": "Bearer test-token"}
    r = httpx.put(gw + "/admin/replicas", json={"replicas": [{"url": "http://127.0.0.1:1", "version": "9"}]},
                  headers=auth)
    assert r.status_code == 400 and "serves version 9" in r.json()["error"]
    r = httpx.put(gw + "/admin/replicas", json={"replicas": []})
    assert r.status_code == 401
    r = httpx.put(gw + "/admin/replicas", json={"nodes": 3}, headers=auth)
    assert r.status_code == 400
    assert httpx.post(gw + "/v1/models/driftloop-model:predict", json={"instances": [{"tenure": 1}]}).status_code == 200


def test_nothing_served_is_one_clear_error(tmp_path) -> None:
    settings = load_settings(overrides=[f"workspace={tmp_path}"], environ={})
    with pytest.raises(ServingError, match="nothing is being served here"):
        LocalBackend(settings).set_replicas(2)


def test_the_agent_raises_local_replicas_ahead_of_a_forecast_peak(backend, tmp_path) -> None:
    """Two days of history with a daily peak starting in a few minutes: one round of the agent in
    full mode (forecast -> floor -> guard -> LocalActuator) starts model-server processes now."""
    import json

    import numpy as np

    from serving.agent.agent import GatewaySampler, ServingAgent, agent_paths

    settings = load_settings(overrides=[f"workspace={backend.settings.workspace_dir}", "agent.mode=full",
                                        "agent.forecast_engine=numpy", "agent.ceiling=3", "agent.capacity_rps=10"],
                             environ={})
    now = time.time()
    rng = np.random.default_rng(0)
    steps = np.arange(2 * 1440, 0, -1)
    t = now - steps * 60.0
    ahead = (t + 86400 - now) % 86400  # seconds from now's time of day to this sample's
    rates = np.where((ahead > 60) & (ahead < 1800), 60.0, 2.0) * rng.lognormal(0, 0.05, len(t))
    path = agent_paths(settings)["samples"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"t": float(a), "rps": float(b)}) + "\n" for a, b in zip(t, rates)))
    agent = ServingAgent(settings, LocalActuator(backend, agent_paths(settings)["kill_switch"]))
    sampler = GatewaySampler(backend.gateway_url)
    sampler.sample(now - 60)
    records = agent.round(now, sampler.sample(now) or {"rps": 2.0})
    floors = [r for r in records if r["action"]["kind"] == "set_floor"]
    assert floors and floors[0]["allowed"] and floors[0]["applied"] == 3, records
    assert floors[0]["result"].startswith("3 model-server processes")
    assert backend.replica_count() == 3
