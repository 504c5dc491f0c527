"""One agent for a fleet: the allocation of ``fleet.replicas`` (binding or not; idle models lowered
first; the model about to breach its SLO raised first; every model inside its own floor and ceiling;
floors over the budget kept with one line), the fleet loop with each model's own agent over recorded
actuators (a replica moved from an idle model to a busy one; a model whose metrics or backend fail
does not stop the others) and ``driftloop agent`` on a fleet file with and without ``--model``."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import yaml
from typer.testing import CliRunner

from driftloop.app import cli
from driftloop.app.cli import app
from driftloop.core.errors import ServingError
from driftloop.core.fleet import load_fleet
from serving.agent.agent import ServingAgent, agent_paths
from serving.agent.decisions import DecisionLog
from serving.agent.fleet import Claim, FleetAgent, Member, allocate
from serving.agent.policy import SET_FLOOR, Action, Guard, Policy

runner = CliRunner()
PER = 15.0  # req/s a replica serves at the target utilisation (20 x 0.75, the defaults)


def claim(model: str, current: int, desired: int, load: float, floor: int = 1, ceiling: int = 6) -> Claim:
    return Claim(model, current, desired, floor, ceiling, load, PER)


# -- the allocation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("claims, budget, expected", [
    # not binding: every model gets its own decision
    ([claim("churn", 3, 3, 5.0), claim("demand", 2, 3, 40.0)], None, {"churn": 3, "demand": 3}),
    ([claim("churn", 3, 2, 5.0), claim("demand", 2, 4, 50.0)], 6, {"churn": 2, "demand": 4}),
    # binding: the busy model's raise is taken from the idle one (not from the one at 0.8 of target)
    ([claim("churn", 3, 3, 5.0), claim("upsell", 2, 2, 24.0), claim("demand", 2, 3, 40.0)], 7,
     {"churn": 2, "upsell": 2, "demand": 3}),
    # one free replica goes to the model nearest to breaching first
    ([claim("a", 2, 3, 33.0), claim("b", 2, 3, 45.0)], 5, {"a": 2, "b": 3}),
    # the idle model gives down to its floor, never below; the busy one stops at its ceiling
    ([claim("churn", 3, 3, 1.0, floor=2), claim("demand", 2, 6, 200.0, ceiling=4)], 5, {"churn": 2, "demand": 3}),
    ([claim("churn", 1, 1, 1.0), claim("demand", 3, 8, 200.0, ceiling=4)], 9, {"churn": 1, "demand": 4}),
    # no replica moves from a busier model to an idler one
    ([claim("a", 3, 3, 40.0), claim("b", 2, 3, 25.0)], 5, {"a": 3, "b": 2}),
    # the fleet holds more than the budget: the idlest gives back first
    ([claim("a", 4, 4, 50.0), claim("b", 3, 3, 2.0)], 5, {"a": 4, "b": 1}),
])
def test_the_allocation_table(claims, budget, expected) -> None:
    got = allocate(claims, budget)
    assert got.replicas == expected
    assert got.note is None
    if budget is not None:
        assert sum(got.replicas.values()) <= budget
    for c in claims:
        assert c.floor <= got.replicas[c.model] <= c.ceiling


def test_each_change_the_budget_makes_says_why() -> None:
    got = allocate([claim("churn", 3, 3, 4.0), claim("demand", 2, 3, 45.0)], 5)
    assert got.replicas == {"churn": 2, "demand": 3}
    assert got.reasons["churn"] == ("churn 3→2: idle (0.1 of target) — 1 replica to demand, about to breach its "
                                    "p99 SLO (1.5 of target)")
    assert got.reasons["demand"].startswith("demand 2→3: about to breach its p99 SLO (1.5 of target) — 1 replica "
                                            "from churn, idle (0.1 of target)")
    denied = allocate([claim("a", 3, 3, 40.0), claim("b", 2, 3, 25.0)], 5)
    assert "wanted 3: fleet.replicas 5 is spent" in denied.reasons["b"] and "a" not in denied.reasons


def test_floors_over_the_budget_are_kept_with_one_line() -> None:
    got = allocate([claim("churn", 3, 3, 5.0, floor=2), claim("demand", 3, 5, 80.0, floor=3)], 4)
    assert got.replicas == {"churn": 2, "demand": 3}
    assert got.note == ("fleet.replicas 4 cannot cover the models' floors (5: churn 2, demand 3): each model is "
                        "kept at its floor")
    assert "\n" not in got.note


# -- the fleet loop ---------------------------------------------------------------------------------------
class RecordingActuator:
    """The actuator interface over an in-memory count; every call lands in ``calls`` (shared, in order)."""

    def __init__(self, name: str, replicas: int, calls: list, *, broken: bool = False) -> None:
        self.name, self.replicas, self.calls, self.broken = name, replicas, calls, broken

    def current_floor(self, model: str) -> int:
        return self.replicas

    def set_floor(self, model: str, replicas: int) -> str:
        if self.broken:
            raise ServingError("the backend refused the change")
        self.calls.append((self.name, replicas))
        self.replicas = replicas
        return f"{replicas} replicas"

    def rollback(self, model: str) -> str:
        return "rolled back"

    def canary_in_flight(self, model: str) -> bool:
        return False

    def paused(self, model: str) -> str | None:
        return None


class Steady:
    """A sampler with one request rate (None: its metrics cannot be read)."""

    def __init__(self, rps: float | None) -> None:
        self.rps = rps

    def sample(self, now: float) -> dict[str, float] | None:
        if self.rps is None:
            raise OSError("gateway unreachable")
        return {"rps": self.rps, "latency_p99_ms": 80.0, "error_rate": 0.0}


class NoWait(threading.Event):
    """The loop's pause, without waiting (the clock is the test's)."""

    def wait(self, timeout: float | None = None) -> bool:
        return self.is_set()


def write_fleet(tmp_path, budget: int = 5, **models: dict) -> str:
    doc = {"workspace": str(tmp_path / "ws"), "fleet": {"replicas": budget},
           "defaults": {"agent": {"mode": "full", "forecast_engine": "numpy", "floor": 1, "ceiling": 4}},
           "models": {name: {"team": "growth", **own} for name, own in models.items()}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def members(path: str, start: dict[str, int], rps: dict[str, float | None], calls: list,
            broken: tuple[str, ...] = ()) -> list[Member]:
    out = []
    for m in load_fleet(path, environ={}).models:
        actuator = RecordingActuator(m.name, start[m.name], calls, broken=m.name in broken)
        out.append(Member(m.name, ServingAgent(m.settings, actuator, alert=lambda doc: None), Steady(rps[m.name])))
    return out


def run(fleet: FleetAgent, rounds: int = 1) -> list:
    clock = iter(1_000_000.0 + 15.0 * i for i in range(10_000))
    seen = []
    fleet.run(NoWait(), clock=lambda: next(clock), rounds=rounds, on_round=seen.append)
    return seen


def decisions(path: str, name: str) -> list[dict]:
    return list(DecisionLog(agent_paths(load_fleet(path, environ={}).model(name).settings)["decisions"]))


def test_the_fleet_moves_a_replica_from_the_idle_model_to_the_busy_one(tmp_path) -> None:
    # idle keeps its count by its own policy (hysteresis); busy's guard asks for a third replica;
    # the budget (5) is full: the replica comes from idle, lowered before busy is raised
    path = write_fleet(tmp_path, idle={"agent": {"down_hysteresis": 0.7}}, busy={})
    calls: list = []
    fleet = FleetAgent(members(path, {"idle": 3, "busy": 2}, {"idle": 5.0, "busy": 44.0}, calls), 5)
    run(fleet)
    assert calls == [("idle", 2), ("busy", 3)]
    [lowered] = [r for r in decisions(path, "idle") if r["action"]["kind"] == SET_FLOOR]
    assert lowered["allowed"] and lowered["applied"] == 2
    assert lowered["reason"].startswith("fleet.replicas 5: idle 3→2: idle (0.1 of target) — 1 replica to busy, "
                                        "about to breach its p99 SLO")
    [raised] = [r for r in decisions(path, "busy") if r["action"]["kind"] == SET_FLOOR]
    assert raised["allowed"] and raised["applied"] == 3 and "1 replica from idle" in raised["reason"]
    assert raised["action"]["urgent"]  # the guard's raise for load already seen
    # each stays inside its own policy: heavier load, and idle stops at its floor, busy at its ceiling
    calls.clear()
    fleet = FleetAgent(members(path, {"idle": 2, "busy": 3}, {"idle": 1.0, "busy": 200.0}, calls), 5)
    run(fleet)
    assert dict(calls) == {"idle": 1, "busy": 4}


def test_a_raise_the_budget_cannot_give_is_recorded_as_refused(tmp_path) -> None:
    path = write_fleet(tmp_path, budget=4, idle={"agent": {"floor": 2, "down_hysteresis": 0.7}}, busy={})
    calls: list = []
    run(FleetAgent(members(path, {"idle": 2, "busy": 2}, {"idle": 5.0, "busy": 44.0}, calls), 4))
    assert calls == []  # idle is at its floor: nothing to give
    refused = [r for r in decisions(path, "busy") if r["action"]["kind"] == SET_FLOOR]
    assert refused and not refused[0]["allowed"] and refused[0]["applied"] == 2
    assert "wanted 3: fleet.replicas 4 is spent" in refused[0]["reason"]


def test_without_a_budget_each_model_has_its_own_decision(tmp_path) -> None:
    path = write_fleet(tmp_path, idle={"agent": {"down_hysteresis": 0.7}}, busy={})
    calls: list = []
    fleet = FleetAgent(members(path, {"idle": 3, "busy": 2}, {"idle": 5.0, "busy": 44.0}, calls), None)
    run(fleet)
    assert calls == [("busy", 3)]


def test_a_model_that_fails_does_not_stop_the_others(tmp_path, caplog) -> None:
    path = write_fleet(tmp_path, budget=6, blind={}, broken={}, busy={})
    calls: list = []
    fleet = FleetAgent(members(path, {"blind": 2, "broken": 1, "busy": 2}, {"blind": None, "broken": 60.0,
                                                                                "busy": 44.0},
                               calls, broken=("broken",)), 6)
    with caplog.at_level(logging.WARNING, logger="serving.agent.fleet"):
        seen = run(fleet)
    # blind holds its 2 (counted), broken's raise failed: busy gets the one free replica
    assert calls == [("busy", 3)]
    assert any("agent blind: metrics unreadable: OSError: gateway unreachable" in r.getMessage()
               for r in caplog.records)
    assert "blind" in seen[0].failures and "busy" not in seen[0].failures
    failed = [r for r in decisions(path, "broken") if r["action"]["kind"] == SET_FLOOR]
    assert failed and failed[0]["result"] == "failed" and "refused the change" in failed[0]["error"]


def test_observe_mode_records_the_moves_and_makes_none(tmp_path) -> None:
    path = write_fleet(tmp_path, idle={"agent": {"down_hysteresis": 0.7}}, busy={})
    calls: list = []
    fleet = FleetAgent(members(path, {"idle": 3, "busy": 2}, {"idle": 5.0, "busy": 44.0}, calls), 5)
    for m in fleet.members:
        m.agent.policy = Policy(**{**m.agent.policy.__dict__, "mode": "observe"})
        m.agent.guard = Guard(m.agent.policy)
    run(fleet)
    assert calls == []
    [idle] = decisions(path, "idle")  # the guard's refusal, with the fleet's move as its action
    assert not idle["allowed"] and idle["applied"] == 2 and "1 replica to busy" in idle["action"]["reason"]
    [busy] = decisions(path, "busy")
    assert busy["reason"] == "observe mode: recorded only" and "1 replica from idle" in busy["action"]["reason"]
    assert [m.agent.current() for m in fleet.members] == [2, 3]  # what it would hold, built on next


# -- the CLI ----------------------------------------------------------------------------------------------
def test_the_cli_on_a_fleet_file_with_and_without_model(tmp_path) -> None:
    path = write_fleet(tmp_path, idle={}, busy={})
    out = runner.invoke(app, ["agent", "patch", "--replicas", "3", "-c", path])
    assert out.exit_code == 0, out.output
    docs = list(yaml.safe_load_all(out.output))
    assert [d["metadata"]["name"] for d in docs] == ["idle", "busy"]
    out = runner.invoke(app, ["agent", "patch", "--replicas", "3", "-c", path, "--model", "busy"])
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(out.output)] == ["busy"]
    fleet = load_fleet(path, environ={})
    for i, m in enumerate(fleet.models):
        log = DecisionLog(agent_paths(m.settings)["decisions"])
        log.record(Guard(Policy(mode="full")).check(Action(SET_FLOOR, m.name, 2 + i, 1, f"ramp of {m.name}"),
                                                    1_780_000_000 + i))
    out = runner.invoke(app, ["agent", "decisions", "--json", "-c", path])
    assert [json.loads(x)["action"]["model"] for x in out.output.splitlines()] == ["idle", "busy"]
    out = runner.invoke(app, ["agent", "decisions", "--json", "-c", path, "--model", "idle"])
    assert [json.loads(x)["action"]["model"] for x in out.output.splitlines()] == ["idle"]
    fast = ["-p", "agent.interval_seconds=0.05", "-p", "agent.guard_seconds=0.05"]
    out = runner.invoke(app, ["agent", "run", "-c", path, "--rounds", "1", "--local", *fast])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())  # rich folds lines at 80 columns
    assert "2 models, sharing fleet.replicas 5" in text and "· idle: full mode, 1..4 replicas" in text
    assert "· busy" in text
    out = runner.invoke(app, ["agent", "run", "-c", path, "--model", "busy", "--rounds", "1", "--local", *fast])
    assert out.exit_code == 0, out.output
    text = "".join(out.output.split())
    assert "driftloopagentinfullmode" in text and "models/busy/agent/decisions.jsonl" in text


@pytest.mark.parametrize("argv, message", [
    (["agent", "simulate", "--synthetic", "daily"], "is a fleet of 2 models: pass --model NAME (models: idle, busy)"),
    (["agent", "patch", "--replicas", "2", "--model", "nope"], "--model 'nope': no such model"),
    (["agent", "recommend", "--usage", "u.csv", "--mlflow"], "--mlflow logs to one model's MLflow: pass --model"),
])
def test_fleet_user_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message) -> None:
    path = write_fleet(tmp_path, idle={}, busy={})
    monkeypatch.setattr("sys.argv", ["driftloop", *argv, "-c", path])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
