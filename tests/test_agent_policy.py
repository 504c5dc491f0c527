"""The serving agent's guardrails: never violated, observe mode only records, blackout and kill
switch hold, every decision lands in the log with its reason."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from driftloop.core.config import load_settings
from driftloop.core.errors import ConfigError
from serving.agent.decisions import DecisionLog
from serving.agent.policy import ALERT, ROLLBACK, SET_FLOOR, Action, Guard, Policy, in_blackout, urgent_step

_fast = hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOON = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc).timestamp()


def floor_action(target: int, current: int, model: str = "m", urgent: bool = False) -> Action:
    return Action(SET_FLOOR, model, target, current, "test", urgent=urgent)


@st.composite
def policies(draw) -> Policy:
    floor = draw(st.integers(0, 10))
    ceiling = draw(st.integers(max(1, floor), 40))
    per_model = draw(st.booleans())
    models = {}
    if per_model:
        lo = draw(st.integers(0, 10))
        models["m"] = (lo, draw(st.integers(max(1, lo), 40)))
    return Policy(mode=draw(st.sampled_from(["observe", "scale-up", "full"])), floor=floor, ceiling=ceiling,
                  max_step=draw(st.integers(1, 6)), cooldown_seconds=draw(st.sampled_from([0.0, 60.0, 600.0])),
                  max_actions_per_hour=draw(st.integers(0, 10)),
                  blackout=tuple(draw(st.sampled_from([[], ["02:00-03:00"], ["23:00-01:00"]]))), models=models)


@_fast
@given(policy=policies(), steps=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 900),
                                                   st.sampled_from([SET_FLOOR, SET_FLOOR, SET_FLOOR, ROLLBACK, ALERT]),
                                                   st.booleans()),
                                         min_size=1, max_size=60),
       start=st.integers(0, 86400 * 2))
def test_the_policy_is_never_violated(policy: Policy, steps, start: int) -> None:
    """Random policies and random wanted counts over time, planned or urgent (the reactive guard's):
    what is applied stays within floor and ceiling, moves at most max_step from an in-bounds count
    (an urgent raise: at most double or +4 when that is more), never lowers outside full mode or
    within the cooldown, never acts in observe mode, in a blackout window, or beyond the hourly budget."""
    guard = Guard(policy)
    lo, hi = policy.bounds("m")
    current = lo
    now = float(start)
    allowed_times: list[float] = []
    last_change: float | None = None
    for target, dt, kind, urgent in steps:
        now += dt
        action = floor_action(target, current, urgent=urgent) if kind == SET_FLOOR else Action(kind, "m", reason="test")
        d = guard.check(action, now)
        if d.allowed:
            assert policy.mode != "observe"
            assert in_blackout(policy.blackout, now) is None
            assert sum(1 for t in allowed_times if now - t < 3600) < policy.max_actions_per_hour
            allowed_times.append(now)
            if kind == ROLLBACK:
                assert policy.mode == "full"
            if kind == SET_FLOOR:
                assert lo <= d.applied <= hi
                assert d.applied != current
                if lo <= current <= hi:
                    largest = urgent_step(policy.max_step, current) if urgent and d.applied > current else policy.max_step
                    assert abs(d.applied - current) <= largest
                if d.applied < current:
                    assert policy.mode == "full"
                    assert last_change is None or now - last_change >= policy.cooldown_seconds
                current = d.applied
                last_change = now
        else:
            assert d.reason  # every refusal says why


def test_observe_mode_only_records(tmp_path) -> None:
    log = DecisionLog(tmp_path / "decisions.jsonl")
    guard = Guard(Policy(mode="observe", floor=1, ceiling=10))
    actions = [floor_action(5, 1), floor_action(1, 5), Action(ROLLBACK, "m", reason="canary errors"),
               Action(ALERT, "m", reason="latency")]
    for i, a in enumerate(actions):
        d = guard.check(a, NOON + i)
        log.record(d)
        assert not d.allowed and d.reason.startswith(("observe mode", "mode observe"))
    lines = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert [x["action"]["kind"] for x in lines] == [SET_FLOOR, SET_FLOOR, ROLLBACK, ALERT]
    assert all(x["allowed"] is False and x["mode"] == "observe" and x["reason"] for x in lines)
    assert lines[0]["applied"] == 5  # what would have been set is recorded too


def test_scale_up_mode_raises_but_never_lowers_or_rolls_back() -> None:
    guard = Guard(Policy(mode="scale-up", floor=1, ceiling=10, max_step=10))
    assert guard.check(floor_action(6, 2), NOON).allowed
    lowered = guard.check(floor_action(2, 6), NOON + 3600)
    assert not lowered.allowed and "may not lower" in lowered.reason
    assert not guard.check(Action(ROLLBACK, "m"), NOON + 3700).allowed
    assert guard.check(Action(ALERT, "m", reason="error burst"), NOON + 3800).allowed


def test_floor_ceiling_step_and_per_model_bounds() -> None:
    guard = Guard(Policy(mode="full", floor=2, ceiling=8, max_step=3, cooldown_seconds=0,
                         models={"big": (4, 20)}))
    d = guard.check(floor_action(50, 2), NOON)
    assert d.allowed and d.applied == 5 and "policy allows 5" in d.reason  # step of 3
    d = guard.check(floor_action(0, 5), NOON + 10)
    assert d.allowed and d.applied == 2  # never below the floor
    d = guard.check(floor_action(0, 2), NOON + 20)
    assert not d.allowed and "floor" in d.reason
    d = guard.check(floor_action(15, 10, model="big"), NOON + 30)
    assert d.allowed and d.applied == 13  # the model's own ceiling (20), step 3


def test_an_urgent_raise_may_double_but_not_pass_the_ceiling_or_skip_the_other_rules() -> None:
    guard = Guard(Policy(mode="full", floor=1, ceiling=30, max_step=4, cooldown_seconds=0,
                         blackout=("02:00-03:00",)))
    assert guard.check(floor_action(40, 10), NOON).applied == 14  # planned: max_step
    d = guard.check(floor_action(40, 10, urgent=True), NOON + 10)
    assert d.allowed and d.applied == 20  # observed load: double, as the HPA may
    assert guard.check(floor_action(40, 20, urgent=True), NOON + 20).applied == 30  # never past the ceiling
    night = datetime(2026, 11, 30, 2, 30, tzinfo=timezone.utc).timestamp()
    d = guard.check(floor_action(20, 10, urgent=True), night)
    assert not d.allowed and "blackout" in d.reason
    d = Guard(Policy(mode="scale-up", floor=1, ceiling=30)).check(floor_action(2, 10, urgent=True), NOON)
    assert not d.allowed and "may not lower" in d.reason


def test_cooldown_delays_lowering_not_raising() -> None:
    guard = Guard(Policy(mode="full", floor=1, ceiling=20, max_step=20, cooldown_seconds=600))
    assert guard.check(floor_action(10, 2), NOON).allowed
    assert guard.check(floor_action(12, 10), NOON + 30).allowed  # raising is never delayed
    d = guard.check(floor_action(4, 12), NOON + 60)
    assert not d.allowed and "cooldown" in d.reason
    assert guard.check(floor_action(4, 12), NOON + 700).allowed


def test_blackout_window_holds_and_wraps_midnight() -> None:
    guard = Guard(Policy(mode="full", floor=1, ceiling=20, blackout=("23:00-01:00",)))
    late = datetime(2026, 11, 30, 23, 30, tzinfo=timezone.utc).timestamp()
    early = datetime(2026, 12, 1, 0, 30, tzinfo=timezone.utc).timestamp()
    for when in (late, early):
        d = guard.check(floor_action(8, 2), when)
        assert not d.allowed and "blackout window 23:00-01:00" in d.reason
    assert guard.check(floor_action(8, 2), datetime(2026, 12, 1, 1, 0, tzinfo=timezone.utc).timestamp()).allowed


def test_kill_switch_holds(tmp_path) -> None:
    stop = tmp_path / "STOP"

    def switch(model: str) -> str | None:
        return f"{stop} exists" if stop.exists() else None

    guard = Guard(Policy(mode="full", floor=1, ceiling=20), kill_switch=switch)
    stop.write_text("")
    for action in (floor_action(8, 2), Action(ROLLBACK, "m"), Action(ALERT, "m")):
        d = guard.check(action, NOON)
        assert not d.allowed and d.reason.startswith("kill switch")
    stop.unlink()
    assert guard.check(floor_action(8, 2), NOON + 1).allowed


def test_actions_per_hour_budget() -> None:
    guard = Guard(Policy(mode="full", floor=1, ceiling=100, max_step=100, max_actions_per_hour=2))
    assert guard.check(floor_action(5, 1), NOON).allowed
    assert guard.check(floor_action(9, 5), NOON + 60).allowed
    d = guard.check(floor_action(12, 9), NOON + 120)
    assert not d.allowed and "budget" in d.reason
    assert guard.check(floor_action(12, 9), NOON + 3601).allowed


def test_decision_log_skips_a_torn_line(tmp_path) -> None:
    log = DecisionLog(tmp_path / "d.jsonl")
    guard = Guard(Policy(mode="full", floor=1, ceiling=10))
    log.record(guard.check(floor_action(4, 1), NOON))
    with open(tmp_path / "d.jsonl", "a") as fh:
        fh.write('{"time": 1, "mo')  # a crash mid-write
    assert [d["applied"] for d in log] == [4]


def test_agent_config_is_validated_by_name() -> None:
    s = load_settings(overrides=["agent.mode=scale-up", "agent.models.fraud.floor=3"], environ={})
    policy = Policy.from_config(s.agent)
    assert policy.mode == "scale-up" and policy.bounds("fraud") == (3, 10) and policy.bounds("other") == (1, 10)
    with pytest.raises(ConfigError, match="agent.mode"):
        load_settings(overrides=["agent.mode=yolo"], environ={})
    with pytest.raises(ConfigError, match="agent.models.fraud: ceiling 2 is below floor 3"):
        load_settings(overrides=["agent.models.fraud.floor=3", "agent.models.fraud.ceiling=2"], environ={})
    with pytest.raises(ConfigError, match="blackout window"):
        load_settings(overrides=["agent.blackout=[25:00-01:00]"], environ={})
