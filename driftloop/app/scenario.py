"""A built-in scenario generator: timestamped rows with a configurable drift.

Used by the demo and the tests, and written as parquet so ingest reads it like any
other source. Drift after ``drift_at`` (a fraction of the time span) can be a
covariate shift in numeric features, a changed categorical mix, and a concept
change (the relation between features and target moves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["SCENARIOS", "DriftSpec", "generate", "write_scenario", "FEATURES_NUMERIC", "FEATURES_CATEGORICAL", "TIME_COLUMN", "TARGET"]

FEATURES_NUMERIC = ["tenure", "monthly_spend", "sessions", "support_calls", "latency_ms"]
FEATURES_CATEGORICAL = ["region", "plan"]
TIME_COLUMN = "event_time"
TARGET = "label"

_REGIONS = ["north", "south", "east", "west"]
_PLANS = ["basic", "pro", "enterprise"]


@dataclass(frozen=True)
class DriftSpec:
    """What changes after the drift point."""

    numeric_shift: float = 1.5  # in standard deviations, on tenure/monthly_spend/sessions
    region_mix: tuple[float, ...] = (0.05, 0.05, 0.15, 0.75)  # was uniform
    concept: float = 1.0  # strength of the concept change (0 = none)


#: Named scenarios for ``driftloop data generate --scenario``: ``mixed`` (the default: inputs move
#: AND the relation flips), ``concept`` (pure concept drift: the inputs keep their distribution,
#: only the relation between features and label changes — input drift stays quiet, only labels
#: show it) and ``covariate`` (the inputs move, the relation holds — where an estimate from
#: calibrated scores follows the realised accuracy).
SCENARIOS: dict[str, DriftSpec] = {
    "mixed": DriftSpec(),
    "concept": DriftSpec(numeric_shift=0.0, region_mix=(0.25, 0.25, 0.25, 0.25), concept=1.0),
    "covariate": DriftSpec(numeric_shift=1.5, region_mix=(0.05, 0.05, 0.15, 0.75), concept=0.0),
}


def _features(rng: np.random.Generator, n: int, drifted: np.ndarray, spec: DriftSpec) -> pd.DataFrame:
    shift = np.where(drifted, spec.numeric_shift, 0.0)
    tenure = rng.normal(24, 8, n) + shift * 8
    spend = rng.normal(60, 15, n) + shift * 15
    sessions = rng.poisson(20, n).astype(float) + shift * 4.5
    calls = rng.poisson(2, n).astype(float)
    latency = rng.gamma(4.0, 30.0, n)
    base_mix = np.full(len(_REGIONS), 1 / len(_REGIONS))
    region = np.where(
        drifted,
        rng.choice(_REGIONS, n, p=np.asarray(spec.region_mix) / np.sum(spec.region_mix)),
        rng.choice(_REGIONS, n, p=base_mix),
    )
    plan = rng.choice(_PLANS, n, p=[0.5, 0.35, 0.15])
    df = pd.DataFrame({
        "tenure": tenure, "monthly_spend": spend, "sessions": sessions, "support_calls": calls,
        "latency_ms": latency, "region": region, "plan": plan,
    })
    # Ordinary gaps: a few missing values, as production data has.
    for col, share in (("monthly_spend", 0.02), ("latency_ms", 0.01), ("plan", 0.01)):
        df.loc[rng.random(n) < share, col] = None
    return df


def _signal(df: pd.DataFrame, drifted: np.ndarray, spec: DriftSpec) -> np.ndarray:
    z_tenure = (df["tenure"] - 24) / 8
    z_spend = (df["monthly_spend"].fillna(60) - 60) / 15
    z_sessions = (df["sessions"] - 20) / 4.5
    plan = df["plan"].map({"basic": -0.5, "pro": 0.3, "enterprise": 0.8}).fillna(0.0)
    region = df["region"].map({"north": 0.2, "south": -0.2, "east": 0.0, "west": 0.1})
    before = -1.2 * z_tenure + 0.9 * z_spend - 0.6 * z_sessions + 0.7 * df["support_calls"].sub(2) + plan + region
    # Concept change: after drift, spend and tenure act the other way round.
    after = 1.0 * z_tenure - 0.9 * z_spend - 0.6 * z_sessions + 0.7 * df["support_calls"].sub(2) - plan + region
    mix = np.where(drifted, spec.concept, 0.0)
    return ((1 - mix) * before + mix * after).to_numpy()


def generate(
    kind: str = "classification",
    rows: int = 20_000,
    *,
    start: str = "2026-01-01",
    days: float = 60.0,
    drift_at: float | None = 0.5,
    drift: DriftSpec = DriftSpec(),
    seed: int = 7,
) -> pd.DataFrame:
    """Timestamped rows, sorted by time; rows after ``drift_at`` of the span carry the drift."""
    if kind not in ("classification", "regression"):
        raise ValueError(f"unknown scenario kind {kind!r} (classification or regression)")
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.uniform(0, days * 86400, rows))
    times = pd.Timestamp(start, tz="UTC") + pd.to_timedelta(offsets, unit="s")
    drifted = offsets >= (days * 86400 * drift_at) if drift_at is not None else np.zeros(rows, bool)
    df = _features(rng, rows, drifted, drift)
    signal = _signal(df, drifted, drift)
    if kind == "classification":
        p = 1 / (1 + np.exp(-signal))
        df[TARGET] = (rng.random(rows) < p).astype(int)
    else:
        df[TARGET] = 100 + 12 * signal + rng.normal(0, 4, rows)
    df.insert(0, TIME_COLUMN, times)
    return df


def write_scenario(path: str | Path, kind: str = "classification", rows: int = 20_000, **kwargs) -> Path:
    """Generate and write a scenario as parquet; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generate(kind, rows, **kwargs).to_parquet(path, index=False)
    return path
