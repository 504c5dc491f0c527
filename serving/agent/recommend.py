"""Right-sizing recommendations: CPU/memory requests and limits per model, and idle models.

VPA/KRR-style: usage samples are weighted by a decaying histogram (half-life 24 h, as the VPA
recommender does), CPU request = weighted p90 (VPA's target; KRR uses p95) and memory request =
the peak, each with a safety margin (+15 %); the memory limit equals its request (memory is not
compressible), the CPU limit is left to the cluster's policy unless asked for. Models that
served fewer than ``idle_rps`` requests/s over the window are reported for consolidation.

A report only -- nothing here changes what is served.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Recommendation", "recommend", "cpu_quantity", "memory_quantity", "parse_cpu", "parse_memory"]


@dataclass(frozen=True)
class Recommendation:
    model: str
    samples: int
    cpu_request: str
    cpu_limit: str | None
    memory_request: str
    memory_limit: str
    current_cpu_request: str | None
    current_memory_request: str | None
    mean_rps: float | None
    idle: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_quantity(cores: float) -> str:
    return f"{max(1, math.ceil(cores * 1000))}m"


def memory_quantity(nbytes: float) -> str:
    return f"{max(1, math.ceil(nbytes / 2**20))}Mi"


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_cpu(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def parse_memory(q: str) -> float:
    for s, f in _SUFFIX.items():
        if q.endswith(s):
            return float(q[: -len(s)]) * f
    return float(q)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    return float(v[min(len(v) - 1, int(np.searchsorted(cum, q * cum[-1])))])


def recommend(samples: Any, *, cpu_percentile: float = 0.9, margin: float = 0.15, half_life_hours: float = 24.0,
              idle_rps: float = 0.01, cpu_limit_factor: float | None = None,
              current: dict[str, tuple[str, str]] | None = None) -> list[Recommendation]:
    """Recommendations from a table of usage samples.

    ``samples``: a DataFrame with ``timestamp`` (epoch s), ``model``, ``cpu`` (cores) and
    ``memory`` (bytes), optionally ``rps``. ``current``: model -> (cpu request, memory request)
    to compare with.
    """
    import pandas as pd

    df = pd.DataFrame(samples)
    missing = {"timestamp", "model", "cpu", "memory"} - set(df.columns)
    if missing:
        raise ValueError(f"usage samples need the column(s) {', '.join(sorted(missing))}")
    if df.empty:
        raise ValueError("no usage samples to recommend from")
    for col in ("timestamp", "cpu", "memory"):
        if not pd.api.types.is_numeric_dtype(df[col]) or not np.isfinite(df[col].to_numpy(float)).all():
            raise ValueError(f"usage column {col!r} must hold finite numbers")
    if (df[["cpu", "memory"]] < 0).any().any():
        raise ValueError("usage samples cannot be negative")
    current = current or {}
    out = []
    end = float(df["timestamp"].max())
    for model, g in df.groupby("model", sort=True):
        age_h = (end - g["timestamp"].to_numpy(float)) / 3600.0
        w = np.power(0.5, age_h / half_life_hours)
        cpu = _weighted_quantile(g["cpu"].to_numpy(float), w, cpu_percentile) * (1 + margin)
        mem = float(g["memory"].max()) * (1 + margin)
        rps = float(g["rps"].mean()) if "rps" in g else None
        idle = rps is not None and rps < idle_rps
        cur = current.get(str(model))
        notes = []
        if cur:
            c, m = parse_cpu(cur[0]), parse_memory(cur[1])
            if c > 0:
                notes.append(f"cpu {cpu / c - 1:+.0%} vs {cur[0]}")
            if m > 0:
                notes.append(f"memory {mem / m - 1:+.0%} vs {cur[1]}")
        if idle:
            notes.append(f"idle ({rps:.3f} req/s): consolidate with another model or scale to zero")
        if len(g) < 100:
            notes.append(f"only {len(g)} samples: low confidence")
        out.append(Recommendation(
            model=str(model), samples=int(len(g)), cpu_request=cpu_quantity(cpu),
            cpu_limit=cpu_quantity(cpu * cpu_limit_factor) if cpu_limit_factor else None,
            memory_request=memory_quantity(mem), memory_limit=memory_quantity(mem),
            current_cpu_request=cur[0] if cur else None, current_memory_request=cur[1] if cur else None,
            mean_rps=None if rps is None else round(rps, 4), idle=idle, note="; ".join(notes)))
    return out
