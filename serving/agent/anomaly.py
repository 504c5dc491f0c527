"""Anomalies on serving metrics: latency, error rate, traffic and CPU.

Each metric has a :class:`Detector`: the residual of a value against what was expected (the
traffic forecast, or the rolling median of the metric's own recent past) is turned into a
robust z-score (median and MAD of recent residuals, so one outlier does not move the scale);
an anomaly needs ``k`` of the last ``n`` steps beyond the threshold in the metric's bad
direction **and** an absolute change of at least ``min_change`` (a 3-sigma wiggle on a quiet
metric is no incident). One alert per episode: a new one only after the metric was normal again.

The error rate is judged against the SLO as well: its burn rate (error rate / error budget)
over the short window must be high (``burn_rate``, 14.4 = a 30-day budget gone in 2 days).

:func:`fault_traces` and :func:`evaluate` measure precision, recall and false alerts per day
on traces with injected faults (latency step, error burst, traffic drop).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Detector", "AnomalyEvent", "default_detectors", "fault_traces", "evaluate"]

DAY = 86400


@dataclass(frozen=True)
class AnomalyEvent:
    metric: str
    time: float
    value: float
    expected: float
    z: float
    reason: str


@dataclass
class Detector:
    """Robust z-scores on residuals with a k-of-n rule and an absolute minimum change.

    ``direction``: ``up`` (latency, errors, CPU), ``down`` (a traffic drop) or ``both``.
    ``expected`` None in :meth:`update`: the rolling median of the last ``baseline`` values.
    """

    metric: str
    direction: str = "up"
    threshold: float = 4.0
    k: int = 3
    n: int = 5
    min_change: float = 0.0
    relative_change: float = 0.0  # minimum |value - expected| / expected
    window: int = 240  # residuals kept for the robust scale
    baseline: int = 60
    burn_rate: float | None = None  # error rate: also needs value / slo_budget >= burn_rate
    slo_budget: float = 0.01
    _resid: deque = field(default_factory=deque, repr=False)
    _values: deque = field(default_factory=deque, repr=False)
    _hits: deque = field(default_factory=deque, repr=False)
    _active: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("up", "down", "both"):
            raise ValueError(f"direction must be up, down or both, got {self.direction!r}")
        if not 1 <= self.k <= self.n:
            raise ValueError(f"k-of-n needs 1 <= k <= n, got {self.k} of {self.n}")

    def update(self, now: float, value: float, expected: float | None = None) -> AnomalyEvent | None:
        if expected is None:
            expected = float(np.median(self._values)) if len(self._values) >= 5 else value
        resid = value - expected
        z = 0.0
        if len(self._resid) >= 30:
            arr = np.fromiter(self._resid, float)
            med = float(np.median(arr))
            mad = float(np.median(np.abs(arr - med))) * 1.4826
            z = (resid - med) / max(mad, 1e-9)
        signed = z if self.direction == "up" else -z if self.direction == "down" else abs(z)
        change = abs(resid)
        big = (signed >= self.threshold and change >= self.min_change
               and change >= self.relative_change * max(abs(expected), 1e-9))
        if self.burn_rate is not None:
            big = big and value / self.slo_budget >= self.burn_rate
        self._hits.append(big)
        while len(self._hits) > self.n:
            self._hits.popleft()
        # The baseline learns only from normal values, so a long incident does not become "normal".
        if not big:
            self._resid.append(resid)
            self._values.append(value)
            while len(self._resid) > self.window:
                self._resid.popleft()
            while len(self._values) > self.baseline:
                self._values.popleft()
        firing = sum(self._hits) >= self.k
        if firing and not self._active:
            self._active = True
            what = {"up": "above", "down": "below", "both": "away from"}[self.direction]
            return AnomalyEvent(self.metric, now, value, expected, z,
                                f"{self.metric} {value:.4g} {what} expected {expected:.4g} (robust z {z:.1f}, "
                                f"{sum(self._hits)} of the last {self.n} steps)")
        if not any(self._hits):
            self._active = False
        return None


def default_detectors(slo_error_rate: float = 0.01) -> dict[str, Detector]:
    """The detectors the agent runs per model (one value per step, e.g. a minute)."""
    return {
        "latency_p99_ms": Detector("latency_p99_ms", "up", threshold=4.0, k=3, n=5, relative_change=0.25),
        "error_rate": Detector("error_rate", "up", threshold=4.0, k=2, n=3, min_change=0.005,
                               burn_rate=2.0, slo_budget=slo_error_rate),
        "traffic_rps": Detector("traffic_rps", "down", threshold=5.0, k=3, n=5, relative_change=0.25),
        "cpu": Detector("cpu", "up", threshold=4.0, k=3, n=5, min_change=0.15),
    }


def fault_traces(days: int = 3, *, seed: int = 0, step: float = 60.0, faults_per_day: int = 2
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict[str, Any]]]:
    """Synthetic per-step metrics with injected faults: ``(metrics, expected_traffic, faults)``.

    Faults: a latency step (x1.6 for 30-90 min), an error burst (5 % for 10-30 min) and a traffic
    drop (-50 % for 20-60 min), ``faults_per_day`` of each per day at random, non-overlapping times."""
    from serving.agent.traces import _business_day

    rng = np.random.default_rng(seed)
    n = int(days * DAY / step)
    t = np.arange(n) * step
    shape = _business_day((t % DAY) / 60.0)
    expected = 400.0 * shape
    traffic = rng.poisson(expected * rng.lognormal(0, 0.06, n) * step) / step
    latency = 80.0 * (1 + 0.2 * shape) * rng.lognormal(0, 0.08, n)
    errors = rng.binomial(np.maximum(1, (traffic * step).astype(int)), 0.002) / np.maximum(1, traffic * step)
    cpu = np.clip(0.55 + 0.1 * rng.standard_normal(n) * 0.3, 0, 1)
    faults: list[dict[str, Any]] = []
    taken = np.zeros(n, bool)
    specs = [("latency_p99_ms", 30, 90), ("error_rate", 10, 30), ("traffic_rps", 20, 60)]
    for _ in range(days * faults_per_day):
        for metric, lo, hi in specs:
            for _try in range(100):
                length = int(rng.uniform(lo, hi) * 60 / step)
                begin = int(rng.uniform(0.05 * n, n - length - 1))
                if not taken[max(0, begin - 120):begin + length + 120].any():
                    break
            taken[begin:begin + length] = True
            sl = slice(begin, begin + length)
            if metric == "latency_p99_ms":
                latency[sl] *= 1.6
            elif metric == "error_rate":
                errors[sl] = np.clip(0.05 + 0.01 * rng.standard_normal(length), 0, 1)
            else:
                traffic[sl] *= 0.5
            faults.append({"metric": metric, "start": float(t[begin]), "end": float(t[begin + length - 1])})
    return {"latency_p99_ms": latency, "error_rate": errors, "traffic_rps": traffic, "cpu": cpu}, expected, faults


def evaluate(metrics: dict[str, np.ndarray], expected_traffic: np.ndarray | None, faults: list[dict[str, Any]],
             *, step: float = 60.0, grace: float = 300.0, detectors: dict[str, Detector] | None = None
             ) -> dict[str, Any]:
    """Run the detectors over the traces; an alert is true when it falls in a fault of its metric
    (up to ``grace`` seconds after its end). Precision, recall, false alerts per day."""
    detectors = detectors or default_detectors()
    events: list[AnomalyEvent] = []
    n = len(next(iter(metrics.values())))
    for i in range(n):
        now = i * step
        for name, det in detectors.items():
            if name not in metrics:
                continue
            exp = float(expected_traffic[i]) if name == "traffic_rps" and expected_traffic is not None else None
            ev = det.update(now, float(metrics[name][i]), exp)
            if ev is not None:
                events.append(ev)
    true_alerts = 0
    found: set[int] = set()
    for ev in events:
        hit = [j for j, f in enumerate(faults) if f["metric"] == ev.metric and f["start"] <= ev.time <= f["end"] + grace]
        if hit:
            true_alerts += 1
            found.update(hit)
    days = n * step / DAY
    false = len(events) - true_alerts
    return {"alerts": len(events), "true_alerts": true_alerts, "false_alerts": false,
            "precision": true_alerts / len(events) if events else 1.0,
            "recall": len(found) / len(faults) if faults else 1.0,
            "false_alerts_per_day": false / days if days else math.nan,
            "events": events}
