"""From a forecast to a replica count: what the agent proposes for one model (before the policy).

The level must cover the upper bound of the prediction interval, at the measured per-replica
capacity and target utilisation, from the moment new replicas could be ready (``lead``: cold
start + model load) onwards. Within that constraint the planner chooses the level that costs
least over the next ``horizon`` seconds, where every change costs ``change_cost`` replica-seconds
on top of the replicas themselves (a dynamic programme over the forecast path, re-solved at
every decision: model-predictive control). So a ramp is met in a few large steps, a dip shorter
than the cost of two changes is held through, and the level changes rarely. It is lowered only
when the need over the next ``plan`` seconds is ``down_hysteresis`` (and at least one replica)
below it, so noise in the forecast does not make it hop.

Two ways to use the level (``agent.reactive``):

* ``own`` (default): the level **is** the replica count -- nothing else moves it. The planner
  runs every decision interval; :meth:`FloorPlanner.react`, the reactive guard, runs every few
  seconds on the load measured since it last looked: load more than the count serves at the
  target utilisation (``react_tolerance`` over) is met by one urgent raise covering that load
  and what the forecast says may come within the lead. The count is lowered only through the
  planner, never below what the load now needs.
* ``hpa``: the level is a floor (``minReplicas``) under a reactive autoscaler that moves the
  count above it (KServe's HPA in Standard mode, the KPA in Serverless mode).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.agent.forecast import Band, ForecastSelector
from serving.agent.policy import SET_FLOOR, Action

__all__ = ["FloorPlanner", "horizons", "cheapest_first_level"]


def horizons(lead_seconds: float, ahead_seconds: float, step_seconds: float) -> tuple[int, int]:
    """The first and last forecast step (1-based) a floor must cover."""
    first = max(1, math.ceil(lead_seconds / step_seconds))
    last = max(first, math.ceil((lead_seconds + ahead_seconds) / step_seconds))
    return first, last


def cheapest_first_level(needs: np.ndarray, current: int, change_cost: float) -> int:
    """The level to hold now on the cheapest path of replica levels over ``needs`` (one per step).

    A path costs its levels summed over the steps plus ``change_cost`` (in replica-steps) for every
    change, starting from ``current``, and never goes below a step's need. Solved exactly by a
    dynamic programme over (run of equal needs, level): a path changes level only where a run begins
    (a lower level is cheaper from a run's first step on, a higher one is needed only by a later run),
    so O(runs x levels).
    """
    needs = np.asarray(needs, dtype=int)
    if len(needs) == 0:
        return current
    starts = np.flatnonzero(np.r_[True, needs[1:] != needs[:-1]])
    lengths = np.diff(np.r_[starts, len(needs)])
    top = int(max(needs.max(), current)) + 1
    levels = np.arange(top)
    cost = np.where(levels == current, 0.0, np.inf)
    came_from = np.empty((len(starts), top), dtype=int)  # the level of the run before
    for j, (need, length) in enumerate(zip(needs[starts].tolist(), lengths.tolist())):
        best = int(np.argmin(cost))
        switch = cost[best] + change_cost
        stay = cost <= switch
        came_from[j] = np.where(stay, levels, best)
        cost = np.where(stay, cost, switch) + levels * length
        cost[:need] = np.inf
    level = int(np.argmin(cost))
    for j in range(len(starts) - 1, 0, -1):
        level = int(came_from[j, level])
    return level


@dataclass
class FloorPlanner:
    model: str
    capacity_rps: float
    target_utilisation: float
    lead_seconds: float
    interval_seconds: float
    step_seconds: float
    floor: int = 1
    down_hysteresis: float = 0.2
    plan_seconds: float = 600.0
    horizon_seconds: float = 3600.0
    change_cost: float = 3600.0  # replica-seconds a change must save to be worth making
    raise_tolerance: float = 0.03  # a raise this close is left to the reactive part (guard or HPA)
    owns: bool = False  # the agent owns the replica count (no HPA moving it): see ``react``
    react_tolerance: float = 0.03  # owning the count: the guard raises when the load now is this much over target
    # (or when the load's trend reaches the target within the lead)
    trend_seconds: float = 300.0  # the guard's trend of the load: a least-squares line over this long
    _seen: deque[tuple[float, float]] = field(default_factory=deque, repr=False)  # the guard's looks

    def _need(self, upper: np.ndarray | float) -> np.ndarray:
        per_replica = self.capacity_rps * self.target_utilisation
        return np.maximum(0, np.ceil(np.asarray(upper) / per_replica - 1e-9)).astype(int)

    def need(self, selector: ForecastSelector, ahead: float | None = None) -> tuple[int, Band]:
        """Replicas the forecast asks for over ``ahead`` seconds after the lead (default: the decision
        interval), and the band that decided it (the highest upper bound)."""
        ahead = self.interval_seconds if ahead is None else max(ahead, self.interval_seconds)
        first, last = horizons(self.lead_seconds, ahead, self.step_seconds)
        band = max((selector.band(h) for h in range(first, last + 1)), key=lambda b: b.upper)
        return int(self._need(band.upper)), band

    def propose(self, selector: ForecastSelector | None, current: int,
                observed_rps: float | None = None) -> Action | None:
        """A change for the policy to judge, or None (no change worth making). ``observed_rps``: the
        load now; when the agent owns the count (``owns``), it is never lowered below what that needs,
        and without a forecast (no history yet, or no season) it follows that load down."""
        need_obs = int(self._need(observed_rps)) if observed_rps is not None else 0
        if selector is None or selector.reactive:
            if self.owns:
                if observed_rps is None:
                    return None
                want = max(self.floor, need_obs)
                if want <= current * (1 - self.down_hysteresis) and want <= current - 1:
                    why = "no forecast yet" if selector is None else "no season found in the traffic"
                    return Action(SET_FLOOR, self.model, want, current,
                                  f"{why}: following the load, {observed_rps:.1f} req/s needs {want} replicas",
                                  {"observed_rps": round(observed_rps, 2)})
                return None
            if selector is None:
                return None
            if current > self.floor:
                return Action(SET_FLOOR, self.model, self.floor, current,
                              "no season found in the traffic: staying reactive (floor back to the policy's)")
            return None
        first, last = horizons(self.lead_seconds, self.interval_seconds, self.step_seconds)
        _, end = horizons(self.lead_seconds, self.horizon_seconds, self.step_seconds)
        _, plan_end = horizons(self.lead_seconds, self.plan_seconds, self.step_seconds)
        point, lower, upper = selector.bands(first, max(end, plan_end))
        needs = np.maximum(self._need(upper), self.floor)
        need_now = int(needs[:last - first + 1].max())
        needs[:last - first + 1] = need_now  # what is set now must hold until the next decision can act
        need_plan = int(needs[:plan_end - first + 1].max())
        at = int(np.argmax(upper[:last - first + 1]))
        detail = {"forecast_rps": round(float(point[at]), 2), "upper_rps": round(float(upper[at]), 2),
                  "lower_rps": round(float(lower[at]), 2), "forecaster": selector.model_name,
                  "needed_next_interval": need_now, "needed_next_plan": need_plan}
        if observed_rps is not None:
            detail["observed_rps"] = round(observed_rps, 2)
        target = cheapest_first_level(needs, current, self.change_cost / self.step_seconds)
        if target > current and self.raise_tolerance > 0:
            per = self.capacity_rps * self.target_utilisation * (1 + self.raise_tolerance)
            if float(upper[:last - first + 1].max()) <= current * per:
                target = current
        if target > current:
            return Action(SET_FLOOR, self.model, target, current,
                          f"forecast upper bound {upper[at]:.1f} req/s from {self.lead_seconds:g} s ahead needs "
                          f"{need_now} replicas; {target} is the cheapest level over the next "
                          f"{self.horizon_seconds:g} s", detail)
        # owning the count, a lowering leaves the load now a hysteresis share of headroom, so the
        # guard does not raise it again at the next look
        keep = int(self._need(observed_rps * (1 + self.down_hysteresis))) if self.owns and observed_rps else 0
        low = max(target, need_plan, keep)
        if target < current and low <= current * (1 - self.down_hysteresis) and low <= current - 1:
            return Action(SET_FLOOR, self.model, low, current,
                          f"forecast upper bound over the next {self.plan_seconds:g} s needs only {need_plan} "
                          f"replicas; {low} is the cheapest level over the next "
                          f"{self.horizon_seconds:g} s", detail)
        return None

    def _projected(self, now: float | None, observed_rps: float) -> float:
        """The load a lead from now on its recent trend: a least-squares line through what the guard saw
        over the last ``trend_seconds``, at ``now + lead`` when it rises (at ``now`` when it falls); a
        line, not the last look, so a one-look blip -- over before a new replica could serve -- does not
        count. The last look itself until there are three."""
        if now is None:
            return observed_rps
        seen = self._seen
        seen.append((now, observed_rps))
        while seen and now - seen[0][0] > self.trend_seconds:
            seen.popleft()
        if len(seen) < 3:
            return observed_rps
        t = np.array([p[0] for p in seen]) - now
        y = np.array([p[1] for p in seen])
        dt = t - t.mean()
        slope = float((dt * (y - y.mean())).sum() / ((dt * dt).sum() or 1.0))
        at_now = float(y.mean() - slope * t.mean())
        return at_now + max(0.0, slope) * self.lead_seconds

    def react(self, selector: ForecastSelector | None, current: int, observed_rps: float, *,
              now: float | None = None) -> Action | None:
        """The reactive guard (when the agent owns the count), run every few seconds (``now``: the time it
        looks, for the trend of the load). A replica asked for now serves a cold start later, so the guard
        judges the load it will meet then (:meth:`_projected`): when that is more than ``current``
        replicas serve at the target utilisation -- below the knee of the latency curve -- or the load now
        is ``react_tolerance`` over it (a jump), one urgent raise covers both and what the forecast says
        may come within the lead (its upper bound, and the rise it expects from now to then on top of
        the load now): one step, not the HPA's several."""
        per = self.capacity_rps * self.target_utilisation
        projected = self._projected(now, observed_rps)
        if projected <= current * per and observed_rps <= current * per * (1 + self.react_tolerance):
            return None
        want = max(min(projected, observed_rps * (1 + self.react_tolerance)), observed_rps)
        detail: dict[str, Any] = {"observed_rps": round(observed_rps, 2), "projected_rps": round(projected, 2)}
        if selector is not None and not selector.reactive:
            first, last = horizons(self.lead_seconds, self.interval_seconds, self.step_seconds)
            point, _, upper = selector.bands(1, last)
            ahead = float(upper[first - 1:].max())
            rise = max(0.0, ahead - float(point[0]))  # what the forecast expects on top of now, within the lead
            want = max(projected, observed_rps + rise, ahead)
            detail.update({"upper_rps": round(ahead, 2), "rise_rps": round(rise, 2)})
        target = max(int(self._need(want)), current + 1, self.floor)
        self._seen.clear()  # the trend so far is what this raise covers: a jump's slope is not a ramp's
        return Action(SET_FLOOR, self.model, target, current,
                      f"load {observed_rps:.1f} req/s, {projected:.1f} a lead ({self.lead_seconds:g} s) on at its "
                      f"trend, is over what {current} replicas serve at {self.target_utilisation:.0%}: {target} "
                      f"cover it and the forecast's upper bound then", detail, urgent=True)
