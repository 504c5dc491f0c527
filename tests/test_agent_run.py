"""The agent's loop end to end over recorded traffic: observe mode only records, full mode acts
through the actuator, kill switch and anomalies; the InferenceService actuator sends a
server-side dry run and then exactly a minReplicas merge patch (checked by what would be sent)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from driftloop.core.config import load_settings
from driftloop.core.errors import ServingError
from serving.agent.actions import KServeActuator, floor_patch
from serving.agent.agent import ServingAgent, agent_paths
from serving.inference_service import from_dict, to_dict

STEP = 60.0
DAY = 86400


class RecordingActuator:
    """The actuator interface over an in-memory floor, recording every call."""

    def __init__(self, floor: int = 2, canary: bool = False) -> None:
        self.floor, self.canary, self.calls = floor, canary, []

    def current_floor(self, model: str) -> int:
        return self.floor

    def set_floor(self, model: str, replicas: int) -> str:
        self.calls.append(("set_floor", replicas))
        self.floor = replicas
        return f"floor {replicas}"

    def rollback(self, model: str) -> str:
        self.calls.append(("rollback",))
        self.canary = False
        return "rolled back"

    def canary_in_flight(self, model: str) -> bool:
        return self.canary

    def paused(self, model: str) -> str | None:
        return None


def traffic(days: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(days * DAY / STEP)) * STEP
    h = (t % DAY) / 3600
    return (20 + 180 / (1 + np.exp(-(h - 8.5) / 0.2)) / (1 + np.exp((h - 18) / 0.5))) * rng.lognormal(0, 0.05, len(t))


def settings_for(tmp_path, mode: str, **extra: str):
    return load_settings(overrides=[f"workspace={tmp_path}", f"agent.mode={mode}", "agent.forecast_engine=numpy",
                                    "agent.ceiling=30", "agent.floor=2", "agent.max_step=10",
                                    *[f"{k}={v}" for k, v in extra.items()]], environ={})


def with_history(settings, rates: np.ndarray) -> None:
    path = agent_paths(settings)["samples"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"t": i * STEP, "rps": float(r), "latency_p99_ms": 80.0, "error_rate": 0.001})
                            + "\n" for i, r in enumerate(rates)))


def run_day_part(agent: ServingAgent, rates: np.ndarray, start_step: int, steps: int) -> None:
    for i in range(start_step, start_step + steps):
        agent.round(i * STEP, {"rps": float(rates[i]), "latency_p99_ms": 80.0, "error_rate": 0.001})


def test_observe_mode_records_every_action_and_runs_none(tmp_path) -> None:
    rates = traffic(3)
    s = settings_for(tmp_path, "observe")
    with_history(s, rates[: 2 * 1440 + 7 * 60])
    actuator = RecordingActuator()
    agent = ServingAgent(s, actuator)
    run_day_part(agent, rates, 2 * 1440 + 7 * 60, 120)  # 07:00-09:00: the morning ramp
    assert actuator.calls == []
    records = [json.loads(x) for x in agent_paths(s)["decisions"].read_text().splitlines()]
    assert records and all(not r["allowed"] and r["reason"].startswith(("observe mode", "mode observe"))
                           for r in records)
    assert max(r["applied"] for r in records if r["action"]["kind"] == "set_floor") > 5  # what it would have done


def test_full_mode_raises_the_floor_ahead_of_the_ramp_and_the_kill_switch_holds(tmp_path) -> None:
    rates = traffic(3)
    s = settings_for(tmp_path, "full")
    with_history(s, rates[: 2 * 1440 + 7 * 60])
    actuator = RecordingActuator()
    agent = ServingAgent(s, actuator)
    run_day_part(agent, rates, 2 * 1440 + 7 * 60, 80)  # 07:00-08:20
    ramp_floor = actuator.floor
    assert ramp_floor * 20 * 0.75 >= rates[2 * 1440 + 8 * 60 + 25]  # 08:25's traffic is covered by 08:20
    assert all(2 <= c[1] <= 30 for c in actuator.calls)
    agent_paths(s)["kill_switch"].write_text("")
    before = len(actuator.calls)
    run_day_part(agent, rates, 2 * 1440 + 8 * 60 + 20, 60)
    assert len(actuator.calls) == before
    last = [json.loads(x) for x in agent_paths(s)["decisions"].read_text().splitlines()][-1]
    assert not last["allowed"] and last["reason"].startswith("kill switch")


def test_an_error_burst_during_a_canary_rolls_it_back_in_full_mode_only(tmp_path) -> None:
    for mode, rolled in (("scale-up", False), ("full", True)):
        s = settings_for(tmp_path / mode, mode)
        actuator = RecordingActuator(canary=True)
        agent = ServingAgent(s, actuator, alert=lambda doc: None)
        for i in range(100):
            agent.round(i * STEP, {"rps": 50.0, "latency_p99_ms": 80.0, "error_rate": 0.001 * (1 + (i % 3))})
        for i in range(100, 104):
            agent.round(i * STEP, {"rps": 50.0, "latency_p99_ms": 80.0, "error_rate": 0.2})
        assert (("rollback",) in actuator.calls) is rolled
        kinds = {(r["action"]["kind"], r["allowed"]) for r in
                 (json.loads(x) for x in agent_paths(s)["decisions"].read_text().splitlines())}
        assert ("alert", True) in kinds
        assert ("rollback_canary", rolled) in kinds


# -- the InferenceService actuator ----------------------------------------------------------------------
class RecordingKubeApi:
    def __init__(self) -> None:
        self.calls = []

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kw):  # noqa: ANN001
        self.calls.append({"group": group, "version": version, "namespace": namespace, "plural": plural,
                           "name": name, "body": body, **kw})
        return body


class RecordingKServeClient:
    """Stands in for kserve.KServeClient: returns a stored object, records what would be sent."""

    def __init__(self, obj: dict) -> None:
        self.obj = obj
        self.api_instance = RecordingKubeApi()
        self.patched = []

    def get(self, name, namespace=None):  # noqa: ANN001
        return self.obj

    def patch(self, name, isvc, namespace=None):  # noqa: ANN001
        self.patched.append(to_dict(isvc))
        return self.obj


def test_the_inference_service_patch_is_a_dry_run_then_only_min_replicas(tmp_path) -> None:
    from serving.inference_service import build_inference_service

    s = settings_for(tmp_path, "full")
    obj = to_dict(build_inference_service(s, model_uri="models:/driftloop-model@champion"))
    client = RecordingKServeClient(obj)
    actuator = KServeActuator(s, client=client)
    assert actuator.current_floor("m") == s.serving.min_replicas
    actuator.set_floor("m", 3)
    dry = client.api_instance.calls
    assert len(dry) == 1 and dry[0]["dry_run"] == "All" and dry[0]["plural"] == "inferenceservices"
    assert dry[0]["group"] == "serving.kserve.io" and dry[0]["namespace"] == s.serving.namespace
    assert client.patched == [dry[0]["body"]]
    body = client.patched[0]
    assert body["spec"] == {"predictor": {"minReplicas": 3}}
    parsed = from_dict(body)  # kserve's own model classes read it back
    assert parsed.spec.predictor.min_replicas == 3
    with pytest.raises(ServingError, match="maxReplicas"):
        actuator.set_floor("m", s.serving.max_replicas + 1)
    assert len(client.patched) == 1
    obj["metadata"]["annotations"] = {s.agent.kill_switch_annotation: "true"}
    assert "annotation" in actuator.paused("m")
    assert to_dict(floor_patch("a", "b", 0))["spec"]["predictor"]["minReplicas"] == 0


def test_owning_the_count_patches_min_and_max_replicas_and_hands_back_the_range(tmp_path) -> None:
    from serving.inference_service import build_inference_service

    s = settings_for(tmp_path, "full", **{"serving.max_replicas": "8"})
    obj = to_dict(build_inference_service(s, model_uri="models:/driftloop-model@champion"))
    client = RecordingKServeClient(obj)
    KServeActuator(s, client=client, owns=True).set_floor("m", 3)
    body = client.patched[0]
    assert body["spec"] == {"predictor": {"minReplicas": 3, "maxReplicas": 3}}
    assert client.api_instance.calls[0]["dry_run"] == "All" and client.api_instance.calls[0]["body"] == body
    parsed = from_dict(body)  # kserve's own model classes read it back
    assert (parsed.spec.predictor.min_replicas, parsed.spec.predictor.max_replicas) == (3, 3)
    # owning the count, the configured maximum (not the live maxReplicas = the count) is the limit
    obj["spec"]["predictor"].update(minReplicas=3, maxReplicas=3)
    KServeActuator(s, client=client, owns=True).set_floor("m", s.serving.max_replicas)
    with pytest.raises(ServingError, match="maxReplicas"):
        KServeActuator(s, client=client, owns=True).set_floor("m", s.serving.max_replicas + 1)
    # a floor under the HPA again: the HPA gets its range back
    KServeActuator(s, client=client).set_floor("m", 2)
    assert client.patched[-1]["spec"] == {"predictor": {"minReplicas": 2, "maxReplicas": s.serving.max_replicas}}
    with pytest.raises(ServingError, match="below minReplicas"):
        floor_patch("a", "b", 3, 2)


def test_the_guard_raises_in_one_step_between_rounds_and_observe_mode_builds_on_what_it_would_do(tmp_path) -> None:
    from serving.agent.agent import merge_samples

    rates = traffic(3)
    start = 2 * 1440 + 12 * 60  # noon: a steady plateau
    for mode in ("full", "observe"):
        s = settings_for(tmp_path / mode, mode)
        with_history(s, rates[:start])
        actuator = RecordingActuator()
        agent = ServingAgent(s, actuator)
        assert agent.owns
        run_day_part(agent, rates, start, 20)
        level = agent._current()
        assert level * 15 >= rates[start + 19]
        burst = 2.2 * float(rates[start + 19])
        [rec] = agent.guard_round((start + 19.25) * STEP, burst)
        assert rec["action"]["urgent"] and rec["applied"] * 15 >= burst
        assert rec["allowed"] is (mode == "full")
        assert agent.guard_round((start + 19.5) * STEP, burst) == []  # covered now (or would be)
        assert agent._current() == rec["applied"]
        assert actuator.calls[-1:] == ([("set_floor", rec["applied"])] if mode == "full" else [])
    assert merge_samples([{"rps": 10.0, "latency_p99_ms": 80.0, "error_rate": 0.0},
                          {"rps": 30.0, "latency_p99_ms": 120.0, "error_rate": 0.1}]) == {
        "rps": 20.0, "latency_p99_ms": 120.0, "error_rate": 0.075}


def test_a_stopping_agent_hands_the_count_back_to_the_autoscaler_unless_the_kill_switch_is_on(tmp_path) -> None:
    from serving.inference_service import build_inference_service

    s = settings_for(tmp_path, "full", **{"serving.max_replicas": "8"})
    obj = to_dict(build_inference_service(s, model_uri="models:/driftloop-model@champion"))
    obj["spec"]["predictor"].update(minReplicas=5, maxReplicas=5)  # the agent owns the count
    client = RecordingKServeClient(obj)
    agent = ServingAgent(s, KServeActuator(s, client=client, owns=True))
    assert agent.owns
    rec = agent.hand_back(1000.0)
    # dry run first, then minReplicas = the count now and maxReplicas = serving.max_replicas again
    assert client.api_instance.calls[-1]["dry_run"] == "All"
    assert len(client.patched) == 1
    assert client.patched[0]["spec"] == {"predictor": {"minReplicas": 5, "maxReplicas": 8}}
    assert from_dict(client.patched[0]).spec.predictor.max_replicas == 8  # kserve's classes read it back
    assert rec["action"]["kind"] == "hand_back" and rec["allowed"] and "maxReplicas=8" in rec["result"]
    assert list(agent.log)[-1] == rec  # recorded like every decision
    # the range is the autoscaler's already: nothing to hand back, nothing recorded
    obj["spec"]["predictor"].update(minReplicas=5, maxReplicas=8)
    assert ServingAgent(s, KServeActuator(s, client=client, owns=True)).hand_back(1001.0) is None
    # the kill switch holds on the way out too: recorded, nothing patched
    obj["spec"]["predictor"].update(minReplicas=5, maxReplicas=5)
    obj["metadata"]["annotations"] = {s.agent.kill_switch_annotation: "true"}
    held = ServingAgent(s, KServeActuator(s, client=client, owns=True)).hand_back(1002.0)
    assert not held["allowed"] and f"annotation {s.agent.kill_switch_annotation}=true" in held["reason"]
    assert len(client.patched) == 1
    # observe mode never owned anything
    assert ServingAgent(settings_for(tmp_path / "o", "observe"), KServeActuator(s, client=client)).hand_back(1003.0) is None
