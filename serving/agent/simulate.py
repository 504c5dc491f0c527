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
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from serving.agent.decisions import DecisionLog
from serving.agent.forecast import Band, ForecastSelector
from serving.agent.policy import Action, Guard, Policy
from serving.agent.scaling import FloorPlanner, horizons
from serving.agent.traces import REAL, SYNTHETIC, Trace, load_trace, real, synthetic

__all__ = ["Trace", "ServiceModel", "SimResult", "synthetic", "SYNTHETIC", "real", "REAL", "load_trace", "simulate",
           "compare", "BASELINES", "plot"]

if TYPE_CHECKING:
    from driftloop.core.config import AgentConfig

DAY = 86400
BASELINES = ("hpa", "kpa", "static")
REACTIVE = ("own", "hpa", "kpa")  # who reacts to load for the agent: its own guard, or an autoscaler above its floor


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


class _Service:
    """The replicas (their ready-at times, ascending: a new one is never ready before an older one)
    and the queue of work the ready ones could not take."""

    def __init__(self, model: ServiceModel) -> None:
        self.m = model
        self.pods: list[float] = []
        self.backlog = 0.0

    def ready(self, now: float) -> int:
        return bisect_right(self.pods, now)

    def resize(self, now: float, want: int) -> None:
        if len(self.pods) < want:
            self.pods.extend([now + self.m.cold_start] * (want - len(self.pods)))
        elif len(self.pods) > want:
            del self.pods[want:]  # the last to be ready go first

    def serve(self, now: float, rate: float) -> tuple[float, float]:
        """One tick at ``rate``: the requests that arrived and the share of them slower than the SLO."""
        m = self.m
        ready = self.ready(now)
        arrivals = rate * m.tick
        self.backlog = max(0.0, self.backlog + arrivals - ready * m.capacity_rps * m.tick)
        if ready == 0:
            return arrivals, 1.0
        lam, mu = rate / ready, m.capacity_rps
        wait = self.backlog / (ready * mu)
        if lam >= mu or wait >= m.slo_p99:
            return arrivals, 1.0
        return arrivals, min(1.0, math.exp(-(mu - lam) * (m.slo_p99 - wait)))


@dataclass
class _Meter:
    """SLO-violation minutes, replica-seconds and scale changes over the evaluated span."""

    replica_seconds: float = 0.0
    changes: int = 0
    minutes: int = 0
    violation_minutes: int = 0
    minute: int | None = None
    requests: float = 0.0
    slow: float = 0.0
    last_want: int | None = None

    def count(self, now: float, want: int, replicas: int, arrivals: float, slow_share: float, tick: float,
              evaluated: bool) -> None:
        if self.last_want is not None and want != self.last_want and evaluated:
            self.changes += 1
        self.last_want = want
        if not evaluated:
            return
        self.replica_seconds += replicas * tick
        m = int(now // 60)
        if self.minute is None:
            self.minute = m
        if m != self.minute:
            self._close()
            self.minute = m
        self.requests += arrivals
        self.slow += arrivals * slow_share

    def _close(self) -> None:
        self.minutes += 1
        if self.requests > 0 and self.slow / self.requests > 0.01:
            self.violation_minutes += 1
        self.requests = self.slow = 0.0

    def finish(self) -> None:
        if self.requests > 0:
            self._close()


def _agent_policy(agent: AgentConfig | Policy | None, model: ServiceModel) -> Policy:
    if agent is None:
        return Policy(mode="full", floor=model.min_replicas, ceiling=model.max_replicas, max_step=50,
                      cooldown_seconds=600.0, max_actions_per_hour=30)
    return agent if isinstance(agent, Policy) else Policy.from_config(agent, mode="full")


class _Agent:
    """The agent inside the simulator: its forecast updated every step, the planner every ``interval``,
    owning the count its reactive guard every ``guard_seconds`` on the load seen since it last looked --
    every change checked by the same :class:`Guard` as ``agent run``. Its forecasts for the last
    horizon are scored as they come true (MASE, interval coverage)."""

    def __init__(self, trace: Trace, model: ServiceModel, policy: Policy, *, interval: float, lead: float,
                 target_utilisation: float, plan: float, down_hysteresis: float, level: float, engine: str,
                 owns: bool, guard_seconds: float, log: DecisionLog | None,
                 planner_options: dict[str, Any] | None) -> None:
        step, first = trace.step, trace.warmup_steps
        history = trace.rate[:first]
        if len(history) < 3:
            raise ValueError("the agent needs a warm-up history in the trace (warmup_steps)")
        self.trace, self.owns, self.log, self.guard_seconds = trace, owns, log, guard_seconds
        _, self.h_last = horizons(lead, interval, step)
        self.selector = ForecastSelector(history, season_candidates=[int(DAY / step), int(7 * DAY / step)],
                                         horizon=self.h_last, level=level, engine=engine,
                                         error_window=int(DAY / step))
        self.guard = Guard(policy)
        lowest = policy.bounds("sim")[0]
        self.planner = FloorPlanner("sim", model.capacity_rps, target_utilisation, lead, interval, step,
                                    floor=lowest, down_hysteresis=down_hysteresis, plan_seconds=plan, owns=owns,
                                    **(planner_options or {}))
        self.floor = max(model.min_replicas, lowest)
        self.decide_every = max(1, int(round(interval / model.tick)))
        self.guard_next = -math.inf
        self.observed: list[float] = []
        self.pending: deque[tuple[int, float, float, float]] = deque()  # (step due, point, lower, upper)
        self.abs_err: list[float] = []
        self.covered: list[bool] = []
        self.decisions = self.refused = self.floor_changes = 0

    def step(self, s: int) -> Band:
        """Step ``s`` of the evaluated span begins: the one before it is known; forecast ``h_last`` ahead."""
        rate, first = self.trace.rate, self.trace.warmup_steps
        if s > first:
            self.selector.update(float(rate[s - 1]))
        while self.pending and self.pending[0][0] <= s - 1:
            due, point, lo, hi = self.pending.popleft()
            actual = float(rate[due])
            self.abs_err.append(abs(actual - point))
            self.covered.append(lo <= actual <= hi)
        band = self.selector.band(self.h_last)
        self.pending.append((s - 1 + self.h_last, band.point, band.lower, band.upper))
        return band

    def tick(self, now: float, rate: float, tick_no: int, evaluated: bool) -> None:
        """The agent's loop at one tick; owning the count it also runs through the warm-up hour,
        reactively (no forecast yet)."""
        sel = self.selector if evaluated else None
        self.observed.append(rate)
        if tick_no % self.decide_every == 0:
            self._judge(self.planner.propose(sel, self.floor, rate if self.owns else None), now, evaluated)
        if self.owns and now >= self.guard_next:
            self.guard_next = now + self.guard_seconds
            seen = sum(self.observed) / len(self.observed)
            self.observed = []
            self._judge(self.planner.react(sel, self.floor, seen, now=now), now, evaluated)

    def _judge(self, action: Action | None, now: float, counted: bool) -> None:
        if action is None:
            return
        decision = self.guard.check(action, now)
        allowed = decision.allowed and decision.applied is not None
        if allowed:
            self.floor = int(decision.applied)
        if counted:
            if self.log is not None:
                self.log.record(decision)
            self.decisions += 1
            self.floor_changes += allowed
            self.refused += not allowed

    def fill(self, result: SimResult) -> None:
        result.decisions, result.refused, result.floor_changes = self.decisions, self.refused, self.floor_changes
        if self.abs_err:
            result.mase = float(np.mean(self.abs_err)) / self.selector.seasonal_scale
            result.coverage = float(np.mean(self.covered))


def _check(trace: Trace, policy: str, reactive: str) -> None:
    if policy not in ("agent", *BASELINES):
        raise ValueError(f"unknown policy {policy!r} (agent, {', '.join(BASELINES)})")
    if reactive not in REACTIVE:
        raise ValueError(f"the agent's reactive part is one of {', '.join(REACTIVE)}, got {reactive!r}")


def simulate(trace: Trace, policy: str, model: ServiceModel = ServiceModel(), *,
             agent: AgentConfig | Policy | None = None, interval: float = 60.0, lead: float | None = None,
             target_utilisation: float = 0.75, plan: float = 600.0, down_hysteresis: float = 0.1,
             level: float = 0.9, engine: str = "auto", keep_series: bool = False,
             log: DecisionLog | None = None, reactive: str = "own", guard_seconds: float = 15.0,
             planner_options: dict[str, Any] | None = None,
             progress: Callable[[float], None] | None = None) -> SimResult:
    """Run ``policy`` (``agent``, ``hpa``, ``kpa`` or ``static``) over the evaluated span of ``trace``.

    ``agent``: a :class:`Policy` (or ``AgentConfig``) for the agent's guard; default: full mode,
    floors between the model's min and max replicas. ``reactive``: the autoscaler above the agent's
    floor, ``hpa`` (Standard mode) or ``kpa`` (Serverless mode). ``progress`` is called with the share
    done (0..1) about a hundred times.
    """
    _check(trace, policy, reactive)
    step, tick, first = trace.step, model.tick, trace.warmup_steps
    per_step = max(1, int(round(step / tick)))
    begin = max(0, first - int(3600 / step))  # an hour of warm-up for the autoscalers' own state
    static_n = max(model.min_replicas,
                   math.ceil(float(trace.rate[first:].max()) / (model.capacity_rps * model.reactive_target)))
    owns = policy == "agent" and reactive == "own"
    scaler = _HPA(model) if policy == "hpa" or (policy == "agent" and reactive == "hpa") else _KPA(model)
    bot = None
    if policy == "agent":
        bot = _Agent(trace, model, _agent_policy(agent, model), interval=interval,
                     lead=model.cold_start + 30.0 if lead is None else lead, target_utilisation=target_utilisation,
                     plan=plan, down_hysteresis=down_hysteresis, level=level, engine=engine, owns=owns,
                     guard_seconds=guard_seconds, log=log, planner_options=planner_options)
    floor = static_n if policy == "static" else (bot.floor if bot else model.min_replicas)
    service, meter = _Service(model), _Meter()
    series: dict[str, list[float]] = {k: [] for k in SERIES}
    report_every = max(1, (len(trace.rate) - begin) // 100)
    tick_no = 0
    for s in range(begin, len(trace.rate)):
        rate, evaluated = float(trace.rate[s]), s >= first
        band = bot.step(s) if bot is not None and evaluated else None
        step_req = step_slow = 0.0
        for k in range(per_step):
            now = trace.start + s * step + k * tick
            if bot is not None and (evaluated or owns):
                bot.tick(now, rate, tick_no, evaluated)
                floor = bot.floor
            tick_no += 1
            if policy == "static" or owns:
                want = floor
            else:
                want = scaler.desired(now, rate, service.ready(now), len(service.pods), floor)
            service.resize(now, want)
            arrivals, slow_share = service.serve(now, rate)
            meter.count(now, want, len(service.pods), arrivals, slow_share, tick, evaluated)
            step_req += arrivals
            step_slow += arrivals * slow_share
        if keep_series and evaluated:
            _record(series, trace.start + s * step, rate, len(service.pods), floor, band,
                    step_slow / step_req if step_req else 0.0)
        if progress is not None and (s - begin) % report_every == 0:
            progress((s - begin) / (len(trace.rate) - begin))
    meter.finish()
    result = SimResult(policy, meter.violation_minutes, meter.replica_seconds, meter.changes, meter.minutes,
                       series=series if keep_series else {})
    if bot is not None:
        bot.fill(result)
    return result


SERIES = ("t", "rate", "replicas", "floor", "point", "lower", "upper", "slow")


def _record(series: dict[str, list[float]], t: float, rate: float, replicas: int, floor: int, band: Band | None,
            slow: float) -> None:
    """One evaluated step of the series a plot draws (``slow``: the share of its requests slower than the SLO)."""
    for key, value in (("t", t), ("rate", rate), ("replicas", replicas), ("floor", floor), ("slow", slow)):
        series[key].append(value)
    if band is not None:
        series["point"].append(band.point)
        series["lower"].append(band.lower)
        series["upper"].append(band.upper)


def compare(trace: Trace, policies: Sequence[str] = ("agent", *BASELINES), model: ServiceModel = ServiceModel(),
            progress: Callable[[float], None] | None = None, **kwargs: Any) -> dict[str, SimResult]:
    """Every policy over the same trace; ``progress`` gets the share of all of them done (the agent,
    forecasting and planning every step, weighs as much as the baselines together)."""
    weights = [len(policies) if p == "agent" else 1 for p in policies]
    out: dict[str, SimResult] = {}
    done = 0.0
    for p, w in zip(policies, weights):
        report = None
        if progress is not None:
            report = (lambda share, done=done, w=w: progress((done + w * share) / sum(weights)))
        out[p] = simulate(trace, p, model, progress=report, **kwargs)
        done += w
    if progress is not None:
        progress(1.0)
    return out


def plot(results: dict[str, SimResult], path: str | Path, title: str = "", *, days_per_panel: float = 7.0) -> Path:
    """A PNG of traffic, the agent's forecast band and replicas per policy over time (needs matplotlib):
    one panel per ``days_per_panel`` (a week) with dates on the x-axis, so months stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    agent = results.get("agent")
    base = agent or next(iter(results.values()))
    if not base.series:
        raise ValueError("the results hold no series; simulate with keep_series=True")
    t = np.asarray(base.series["t"], dtype=float)
    when = np.asarray(t * 1000, dtype="datetime64[ms]")
    span = days_per_panel * DAY
    panels = max(1, math.ceil((t[-1] - t[0] + 1) / span))
    fig, axes = plt.subplots(panels, 1, figsize=(13, 1.2 + 2.6 * panels), squeeze=False)
    for p, ax in enumerate(axes[:, 0]):
        part = slice(*np.searchsorted(t, [t[0] + p * span, t[0] + (p + 1) * span]))
        _panel(ax, when[part], part, results, agent, legend=p == 0)
        ax.set_xlim(when[part][0], when[part][0] + np.timedelta64(int(span * 1000), "ms"))
        locator = mdates.AutoDateLocator(minticks=5, maxticks=10)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _panel(ax: Any, when: np.ndarray, part: slice, results: dict[str, SimResult], agent: SimResult | None,
           legend: bool) -> None:
    """One panel: requests/s and the agent's band on the left axis, replicas per policy on the right."""
    base = agent or next(iter(results.values()))
    ax.plot(when, base.series["rate"][part], lw=0.6, color="black", label="requests/s")
    if agent is not None and agent.series.get("upper"):
        ax.fill_between(when, agent.series["lower"][part], agent.series["upper"][part], color="tab:blue",
                        alpha=0.25, label="agent's 90 % band")
    ax.set_ylabel("requests/s")
    right = ax.twinx()
    for name, res in results.items():
        if res.series and name != "static":
            right.step(when, res.series["replicas"][part], where="post", lw=0.8, label=f"{name} replicas")
    right.set_ylabel("replicas")
    right.set_ylim(bottom=0)
    ax.set_ylim(bottom=0)
    if legend:
        lines = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", ncol=5, fontsize="small")
