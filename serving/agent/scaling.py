"""From a forecast to a replica floor: what the agent proposes for one model (before the policy).

The floor must hold from the moment new replicas could be ready (``lead``: cold start + model
load) until the agent decides again, so it covers the upper bound of the prediction interval
over the steps ``ceil(lead/step) .. ceil((lead + interval)/step)`` at the measured per-replica
capacity and target utilisation. A raise is due as soon as that need exceeds the floor, and
then goes as far as the need over the next ``plan`` seconds, so a ramp is met in a few large
steps; a floor is lowered only when the need over the whole planning window is clearly below
it (hysteresis). The floor -- and, in Serverless mode, the Knative revisions each change makes
-- therefore changes rarely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving.agent.forecast import Band, ForecastSelector
from serving.agent.policy import SET_FLOOR, Action

__all__ = ["FloorPlanner", "horizons"]


def horizons(lead_seconds: float, ahead_seconds: float, step_seconds: float) -> tuple[int, int]:
    """The first and last forecast step (1-based) a floor must cover."""
    first = max(1, math.ceil(lead_seconds / step_seconds))
    last = max(first, math.ceil((lead_seconds + ahead_seconds) / step_seconds))
    return first, last


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

    def need(self, selector: ForecastSelector, ahead: float | None = None) -> tuple[int, Band]:
        """Replicas the forecast asks for over ``ahead`` seconds after the lead (default: the decision
        interval), and the band that decided it (the highest upper bound)."""
        ahead = self.interval_seconds if ahead is None else max(ahead, self.interval_seconds)
        first, last = horizons(self.lead_seconds, ahead, self.step_seconds)
        band = max((selector.band(h) for h in range(first, last + 1)), key=lambda b: b.upper)
        per_replica = self.capacity_rps * self.target_utilisation
        return max(0, math.ceil(band.upper / per_replica - 1e-9)), band

    def propose(self, selector: ForecastSelector, current: int) -> Action | None:
        """A floor change for the policy to judge, or None (no change worth making)."""
        if selector.reactive:
            if current > self.floor:
                return Action(SET_FLOOR, self.model, self.floor, current,
                              "no season found in the traffic: staying reactive (floor back to the policy's)")
            return None
        need_now, band_now = self.need(selector)
        need, band = self.need(selector, self.plan_seconds)
        detail = {"forecast_rps": round(band.point, 2), "upper_rps": round(band.upper, 2),
                  "lower_rps": round(band.lower, 2), "forecaster": band.model, "needed_next_interval": need_now}
        if need_now > current:
            target = max(need, need_now)
            return Action(SET_FLOOR, self.model, target, current,
                          f"forecast upper bound {band_now.upper:.1f} req/s from {self.lead_seconds:g} s ahead "
                          f"needs {need_now} replicas; {target} cover the next {self.plan_seconds:g} s", detail)
        if need < current and need <= current * (1 - self.down_hysteresis) and need <= current - 1:
            return Action(SET_FLOOR, self.model, need, current,
                          f"forecast upper bound {band.upper:.1f} req/s over the next {self.plan_seconds:g} s "
                          f"needs only {need} replicas", detail)
        return None
