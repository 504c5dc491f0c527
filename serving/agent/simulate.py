"""Replay a traffic trace through a model of the service under the agent and reactive baselines.

The service model (time-stepped, ``tick`` seconds): replicas each serve ``capacity_rps``; a new
replica serves only ``cold_start`` seconds after it was asked for; requests beyond what the
ready replicas serve queue up. Each replica is an M/M/1 queue, so the share of a tick's
requests slower than the SLO is ``exp(-(mu - lambda) * (slo - wait))`` (``wait``: the queue
left over from earlier ticks); a minute violates the SLO when more than 1 % of its requests
are slower (its p99 is over the SLO).

Policies:

* ``hpa`` -- Kubernetes HPA on CPU utilisation: ``desired = ceil(ready * u / target)`` every 15 s,
  10 % tolerance, unready pods counted at 0 % for scale-up, scale-down stabilisation 300 s,
  scale-up at most doubling (or +4) per period;
* ``kpa`` -- Knative KPA on requests/s: 60 s stable window, 6 s panic window entered at 2x
  the target, no scale-down while panicking, scale-down at most halving;
* ``static`` -- a floor sized for the trace's peak, never changed;
* ``agent`` -- the agent's predictive floor (``minReplicas``) with a reactive autoscaler above
  it: by default the same HPA as the baseline (KServe's Standard/RawDeployment mode, where the
  agent patches ``minReplicas`` of the HPA KServe made), ``reactive="kpa"`` the KPA (Serverless
  mode). Every floor change is proposed by the same
  :class:`~serving.agent.scaling.FloorPlanner` and checked by the same
  :class:`~serving.agent.policy.Guard` that ``agent run`` uses.

Metrics per policy (over the evaluated span, after the warm-up history): SLO-violation minutes,
replica-seconds (every replica that exists, starting or ready), scale changes (changes of the
desired count; for the agent also its floor changes alone -- in Serverless mode each is a new
Knative revision), and for the agent MASE of its forecasts (scaled by the in-sample seasonal-naive
error) and the coverage of its prediction interval.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serving.agent.decisions import DecisionLog
from serving.agent.forecast import ForecastSelector
from serving.agent.policy import Guard, Policy
from serving.agent.scaling import FloorPlanner, horizons

__all__ = ["Trace", "ServiceModel", "SimResult", "synthetic", "SYNTHETIC", "load_trace", "simulate", "compare",
           "BASELINES", "plot"]

DAY = 86400
BASELINES = ("hpa", "kpa", "static")
REACTIVE = ("own", "hpa", "kpa")  # who reacts to load for the agent: its own guard, or an autoscaler above its floor
SYNTHETIC = ("daily", "weekly", "growth", "bursts")


@dataclass
class Trace:
    """Requests per second, one value per ``step`` seconds from ``start`` (epoch seconds)."""

    name: str
    rate: np.ndarray
    step: float = 60.0
    start: float = 0.0
    warmup_steps: int = 0  # history the agent may learn from before the evaluated span
    faults: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rate = np.asarray(self.rate, dtype=float)
        if self.rate.ndim != 1 or len(self.rate) < 2:
            raise ValueError(f"trace {self.name!r} needs at least two values")
        if not np.all(np.isfinite(self.rate)) or (self.rate < 0).any():
            raise ValueError(f"trace {self.name!r} has negative or non-finite request rates")


# -- traces ---------------------------------------------------------------------------------
def _business_day(minute_of_day: np.ndarray) -> np.ndarray:
    """0..1 shape of a working day: a steep morning ramp, a lunch bump, an evening decline."""
    h = minute_of_day / 60.0
    ramp_up = 1 / (1 + np.exp(-(h - 8.5) / 0.2))
    ramp_down = 1 / (1 + np.exp((h - 18.0) / 0.5))
    lunch = 0.25 * np.exp(-((h - 12.5) / 0.6) ** 2)
    evening = 0.2 * np.exp(-((h - 21.0) / 1.0) ** 2)
    return 0.12 + 0.88 * (ramp_up * ramp_down * (0.8 + lunch)) + evening


def synthetic(kind: str, *, seed: int = 0, peak_rps: float = 400.0, step: float = 60.0,
              days: int | None = None, eval_days: float = 1.0) -> Trace:
    """A synthetic trace: ``daily`` (working-day cycle), ``weekly`` (quiet weekends), ``growth``
    (+15 % a day) or ``bursts`` (the daily cycle plus unannounced 1.8-2.5x bursts). Counts are
    Poisson over a rate with 6 % multiplicative noise per step."""
    if kind not in SYNTHETIC:
        raise ValueError(f"unknown synthetic trace {kind!r} (one of {', '.join(SYNTHETIC)})")
    rng = np.random.default_rng(seed)
    history_days = 14 if kind == "weekly" else 3
    total_days = days or history_days + eval_days
    n = int(round(total_days * DAY / step))
    t = np.arange(n) * step
    minute = (t % DAY) / 60.0
    base = _business_day(minute)
    if kind == "weekly":
        weekday = (t // DAY).astype(int) % 7
        base = np.where(weekday >= 5, 0.35 * base + 0.03, base)
    if kind == "growth":
        base = base * np.power(1.15, t / DAY)
    rate = peak_rps * base
    faults: list[dict[str, Any]] = []
    if kind == "bursts":
        per_day = 4
        for d in range(int(math.ceil(total_days))):
            for _ in range(per_day):
                begin = d * DAY + rng.uniform(7 * 3600, 21 * 3600)
                length = rng.uniform(300, 1200)
                factor = rng.uniform(1.8, 2.5)
                mask = (t >= begin) & (t < begin + length)
                rate[mask] *= factor
                faults.append({"kind": "burst", "start": float(begin), "end": float(begin + length),
                               "factor": round(float(factor), 2)})
    rate = rate * rng.lognormal(0.0, 0.06, n)
    counts = rng.poisson(rate * step)
    warmup = int(round(history_days * DAY / step)) if days is None else int(round((total_days - eval_days) * DAY / step))
    return Trace(kind, counts / step, step=step, start=0.0, warmup_steps=max(0, min(warmup, n - 2)), faults=faults)


def load_trace(path: str | Path, *, step: float = 60.0, warmup_fraction: float = 0.75) -> Trace:
    """A trace from csv/parquet: ``timestamp`` plus ``requests`` (count per row), ``rate`` (per second);
    or only ``timestamp`` (one row per request, e.g. an export of the inference log)."""
    import pandas as pd

    from driftloop.core.tables import read_table

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"trace file not found: {p}")
    try:
        df = read_table(str(p))
    except Exception as exc:  # noqa: BLE001 (any reader failure is the file's problem)
        raise ValueError(f"cannot read trace {p}: {exc}") from exc
    cols = {c.lower(): c for c in df.columns}
    ts_col = cols.get("timestamp") or cols.get("time") or cols.get("ts")
    if ts_col is None:
        raise ValueError(f"trace {p} needs a 'timestamp' column (has: {', '.join(map(str, df.columns))})")
    ts = df[ts_col]
    if pd.api.types.is_numeric_dtype(ts):
        seconds = ts.astype(float).to_numpy()
    else:
        parsed = pd.to_datetime(ts, utc=True, errors="coerce")
        if parsed.isna().any():
            bad = ts[parsed.isna()].iloc[0]
            raise ValueError(f"trace {p}: timestamp {bad!r} is neither epoch seconds nor an ISO time")
        seconds = (parsed.astype("int64") // 10**9).to_numpy().astype(float)
    if len(seconds) == 0:
        raise ValueError(f"trace {p} is empty")
    value_col = cols.get("requests") or cols.get("count") or cols.get("rate")
    if value_col is not None and not pd.api.types.is_numeric_dtype(df[value_col]):
        raise ValueError(f"trace {p}: column {value_col!r} must be numeric")
    start = float(np.floor(seconds.min() / step) * step)
    idx = ((seconds - start) // step).astype(int)
    n = int(idx.max()) + 1
    if n < 2:
        raise ValueError(f"trace {p} spans less than two steps of {step:g} s")
    if value_col is None:
        counts = np.bincount(idx, minlength=n).astype(float)
    else:
        values = df[value_col].astype(float).to_numpy()
        if not np.all(np.isfinite(values)) or (values < 0).any():
            raise ValueError(f"trace {p}: column {value_col!r} has negative or missing values")
        if value_col == cols.get("rate"):
            values = values * step
        counts = np.bincount(idx, weights=values, minlength=n)
    return Trace(p.stem, counts / step, step=step, start=start, warmup_steps=int(n * warmup_fraction))


# -- the service ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceModel:
    capacity_rps: float = 20.0
    cold_start: float = 60.0
    slo_p99: float = 1.0
    tick: float = 10.0
    reactive_target: float = 0.7  # HPA CPU target / KPA target utilisation
    min_replicas: int = 1
    max_replicas: int = 200


class _HPA:
    def __init__(self, m: ServiceModel, period: float = 15.0, tolerance: float = 0.1, stabilise: float = 300.0):
        self.m, self.period, self.tol, self.stabilise = m, period, tolerance, stabilise
        self.recs: deque[tuple[float, int]] = deque()
        self.next_at = 0.0
        self.util: list[float] = []

    def desired(self, now: float, rate: float, ready: int, total: int, floor: int) -> int:
        self.util.append(min(1.0, rate / (ready * self.m.capacity_rps)) if ready else 1.0)
        if now < self.next_at:
            return total
        self.next_at = now + self.period
        u = sum(self.util) / len(self.util)
        self.util = []
        usage = u * ready  # unready pods count as 0 %
        ratio = usage / (max(total, 1) * self.m.reactive_target)
        rec = total if abs(ratio - 1) <= self.tol else math.ceil(usage / self.m.reactive_target - 1e-9)
        if rec > total:
            rec = min(rec, max(2 * total, total + 4))
        self.recs.append((now, rec))
        while self.recs and now - self.recs[0][0] > self.stabilise:
            self.recs.popleft()
        out = rec if rec >= total else max(r for _, r in self.recs)
        return min(max(out, self.m.min_replicas, floor), self.m.max_replicas)


class _KPA:
    def __init__(self, m: ServiceModel, stable: float = 60.0, panic: float = 6.0, threshold: float = 2.0,
                 max_down: float = 2.0):
        self.m = m
        self.stable_n = max(1, round(stable / m.tick))
        self.panic_n = max(1, round(panic / m.tick))
        self.threshold, self.max_down = threshold, max_down
        self.window: deque[float] = deque(maxlen=self.stable_n)
        self.panic_until = -math.inf
        self.current = m.min_replicas

    def desired(self, now: float, rate: float, ready: int, total: int, floor: int) -> int:
        self.window.append(rate)
        per = self.m.capacity_rps * self.m.reactive_target
        stable = math.ceil(sum(self.window) / len(self.window) / per - 1e-9)
        recent = list(self.window)[-self.panic_n:]
        panic = math.ceil(sum(recent) / len(recent) / per - 1e-9)
        if ready and panic / ready >= self.threshold:
            self.panic_until = now + self.stable_n * self.m.tick
        if now < self.panic_until:
            want = max(self.current, panic, stable)
        else:
            want = max(stable, math.ceil(ready / self.max_down)) if stable < ready else stable
        self.current = min(max(want, self.m.min_replicas, floor), self.m.max_replicas)
        return self.current


@dataclass
class SimResult:
    policy: str
    violation_minutes: int
    replica_seconds: float
    scale_changes: int
    minutes: int
    mase: float | None = None
    coverage: float | None = None
    decisions: int = 0
    refused: int = 0
    floor_changes: int = 0
    series: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def row(self) -> dict[str, Any]:
        return {"policy": self.policy, "slo_violation_minutes": self.violation_minutes,
                "replica_seconds": round(self.replica_seconds), "scale_changes": self.scale_changes,
                "mase": None if self.mase is None else round(self.mase, 3),
                "interval_coverage": None if self.coverage is None else round(self.coverage, 3),
                "floor_changes": self.floor_changes, "minutes": self.minutes}


def _agent_policy(agent: Any, model: ServiceModel) -> Policy:
    if agent is None:
        return Policy(mode="full", floor=model.min_replicas, ceiling=model.max_replicas, max_step=50,
                      cooldown_seconds=600.0, max_actions_per_hour=30)
    return Policy.from_config(agent, mode="full") if not isinstance(agent, Policy) else agent


def simulate(trace: Trace, policy: str, model: ServiceModel = ServiceModel(), *, agent: Any = None,
             interval: float = 60.0, lead: float | None = None, target_utilisation: float = 0.75,
             plan: float = 600.0, down_hysteresis: float = 0.1,
             level: float = 0.9, engine: str = "auto", keep_series: bool = False,
             log: DecisionLog | None = None, reactive: str = "own", guard_seconds: float = 15.0,
             planner_options: dict[str, Any] | None = None) -> SimResult:
    """Run ``policy`` (``agent``, ``hpa``, ``kpa`` or ``static``) over the evaluated span of ``trace``.

    ``agent``: a :class:`Policy` (or ``AgentConfig``) for the agent's guard; default: full mode,
    floors between the model's min and max replicas. ``reactive``: the autoscaler above the agent's
    floor, ``hpa`` (Standard mode) or ``kpa`` (Serverless mode).
    """
    if policy not in ("agent", *BASELINES):
        raise ValueError(f"unknown policy {policy!r} (agent, {', '.join(BASELINES)})")
    step, tick = trace.step, model.tick
    per_step = max(1, int(round(step / tick)))
    lead = model.cold_start + 30.0 if lead is None else lead
    first = trace.warmup_steps
    begin = max(0, first - int(3600 / step))  # an hour of warm-up for the autoscalers' own state
    peak = float(trace.rate[first:].max())
    static_n = max(model.min_replicas, math.ceil(peak / (model.capacity_rps * model.reactive_target)))
    if reactive not in REACTIVE:
        raise ValueError(f"the agent's reactive part is one of {', '.join(REACTIVE)}, got {reactive!r}")
    owns = policy == "agent" and reactive == "own"
    scaler: Any = _HPA(model) if policy == "hpa" or (policy == "agent" and reactive == "hpa") else _KPA(model)
    floor = static_n if policy == "static" else model.min_replicas

    selector = planner = guard = None
    h_first, h_last = horizons(lead, interval, step)
    pending: deque[tuple[int, float, float, float]] = deque()  # (step due, point, lower, upper)
    abs_err: list[float] = []
    covered: list[bool] = []
    decisions = refused = floor_changes = 0
    if policy == "agent":
        history = trace.rate[:first]
        if len(history) < 3:
            raise ValueError("the agent needs a warm-up history in the trace (warmup_steps)")
        candidates = [int(DAY / step), int(7 * DAY / step)]
        selector = ForecastSelector(history, season_candidates=candidates, horizon=h_last, level=level,
                                    engine=engine, error_window=int(DAY / step))
        pol = _agent_policy(agent, model)
        guard = Guard(pol)
        planner = FloorPlanner("sim", model.capacity_rps, target_utilisation, lead, interval, step,
                               floor=pol.bounds("sim")[0], down_hysteresis=down_hysteresis, plan_seconds=plan,
                               owns=owns, **(planner_options or {}))
        floor = max(floor, pol.bounds("sim")[0])
        scale = selector._seasonal_scale
    decide_every = max(1, int(round(interval / tick)))
    guard_next = -math.inf
    observed: list[float] = []

    def judge(action: Any, now: float, counted: bool) -> None:
        nonlocal floor, decisions, floor_changes, refused
        decision = guard.check(action, now)
        if log is not None and counted:
            log.record(decision)
        allowed = decision.allowed and decision.applied is not None
        if allowed:
            floor = decision.applied
        if counted:
            decisions += 1
            floor_changes += allowed
            refused += not allowed

    pods: list[float] = []  # ready-at times
    backlog = 0.0
    desired_prev = None
    changes = 0
    replica_seconds = 0.0
    minute_req = minute_slow = 0.0
    minute_start = None
    violation_minutes = minutes = 0
    series: dict[str, list[float]] = {k: [] for k in ("t", "rate", "replicas", "floor", "point", "lower", "upper",
                                                      "slow")}
    tick_no = 0
    for s in range(begin, len(trace.rate)):
        step_req = step_slow = 0.0
        rate = float(trace.rate[s])
        evaluated = s >= first
        if selector is not None and s >= first:
            if s > first:
                selector.update(float(trace.rate[s - 1]))  # the step that just completed
            while pending and pending[0][0] <= s - 1:
                due, point, lo, hi = pending.popleft()
                actual = float(trace.rate[due])
                abs_err.append(abs(actual - point))
                covered.append(lo <= actual <= hi)
            band = selector.band(h_last)
            pending.append((s - 1 + h_last, band.point, band.lower, band.upper))
            if keep_series:
                series["point"].append(band.point)
                series["lower"].append(band.lower)
                series["upper"].append(band.upper)
        for k in range(per_step):
            now = trace.start + s * step + k * tick
            if policy == "agent" and (evaluated or owns):
                # the agent's loop: the planner every interval, the reactive guard every guard_seconds
                # (owning the count), on the load measured since the guard last looked; owning the
                # count, it also runs through the warm-up hour, reactively (no forecast yet)
                sel = selector if evaluated else None
                observed.append(rate)
                if tick_no % decide_every == 0:
                    action = planner.propose(sel, floor, rate if owns else None)
                    if action is not None:
                        judge(action, now, evaluated)
                if owns and now >= guard_next:
                    guard_next = now + guard_seconds
                    seen = sum(observed) / len(observed)
                    observed = []
                    action = planner.react(sel, floor, seen)
                    if action is not None:
                        judge(action, now, evaluated)
            tick_no += 1
            ready = sum(1 for r in pods if r <= now)
            if policy == "static":
                want = static_n
            elif owns:
                want = floor
            else:
                want = scaler.desired(now, rate, ready, len(pods), floor)
            if len(pods) < want:
                pods.extend([now + model.cold_start] * (want - len(pods)))
            elif len(pods) > want:
                pods.sort()
                del pods[want:]  # the last to be ready go first
            if desired_prev is not None and want != desired_prev and evaluated:
                changes += 1
            desired_prev = want
            ready = sum(1 for r in pods if r <= now)
            arrivals = rate * tick
            capacity = ready * model.capacity_rps * tick
            backlog = max(0.0, backlog + arrivals - capacity)
            if ready == 0:
                slow_share = 1.0
            else:
                lam = rate / ready
                mu = model.capacity_rps
                wait = backlog / (ready * mu)
                slow_share = 1.0 if lam >= mu or wait >= model.slo_p99 else min(
                    1.0, math.exp(-(mu - lam) * (model.slo_p99 - wait)))
            if evaluated:
                replica_seconds += len(pods) * tick
                m = int(now // 60)
                if minute_start is None:
                    minute_start = m
                if m != minute_start:
                    minutes += 1
                    if minute_req > 0 and minute_slow / minute_req > 0.01:
                        violation_minutes += 1
                    minute_req = minute_slow = 0.0
                    minute_start = m
                minute_req += arrivals
                minute_slow += arrivals * slow_share
                step_req += arrivals
                step_slow += arrivals * slow_share
        if keep_series and evaluated:
            series["t"].append(trace.start + s * step)
            series["rate"].append(rate)
            series["replicas"].append(len(pods))
            series["floor"].append(floor)
            series["slow"].append(step_slow / step_req if step_req else 0.0)  # share slower than the SLO
    if minute_req > 0:
        minutes += 1
        if minute_slow / minute_req > 0.01:
            violation_minutes += 1
    result = SimResult(policy, violation_minutes, replica_seconds, changes, minutes, decisions=decisions,
                       refused=refused, floor_changes=floor_changes, series=series if keep_series else {})
    if selector is not None and abs_err:
        result.mase = float(np.mean(abs_err)) / scale
        result.coverage = float(np.mean(covered))
    return result


def compare(trace: Trace, policies: Sequence[str] = ("agent", *BASELINES), model: ServiceModel = ServiceModel(),
            **kwargs: Any) -> dict[str, SimResult]:
    return {p: simulate(trace, p, model, **kwargs) for p in policies}


def plot(results: dict[str, SimResult], path: str | Path, title: str = "") -> Path:
    """A PNG of traffic, the agent's forecast band and replicas per policy over time (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agent = results.get("agent")
    base = agent or next(iter(results.values()))
    if not base.series:
        raise ValueError("the results hold no series; simulate with keep_series=True")
    hours = (np.asarray(base.series["t"]) - base.series["t"][0]) / 3600.0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True)
    ax1.plot(hours, base.series["rate"], lw=0.6, color="black", label="requests/s")
    if agent is not None and agent.series.get("upper"):
        n = min(len(hours), len(agent.series["upper"]))
        ax1.fill_between(hours[:n], agent.series["lower"][:n], agent.series["upper"][:n], color="tab:blue",
                         alpha=0.25, label="agent's 90 % band (next steps)")
    ax1.set_ylabel("requests/s")
    ax1.legend(loc="upper left")
    for name, res in results.items():
        if res.series:
            ax2.step(hours, res.series["replicas"], where="post", lw=0.9, label=name)
    ax2.set_ylabel("replicas")
    ax2.set_xlabel("hours")
    ax2.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
