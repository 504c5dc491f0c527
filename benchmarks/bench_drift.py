"""Drift check speed and memory: Evidently's DataDriftPreset vs the monitor's fast path.

Same data for both, per size: a reference sample of ``--reference-rows`` rows (the champion's
reference, > 1000 rows: Wasserstein / Jensen-Shannon regime) and a current window of N rows ×
20 columns (16 numeric, 4 categorical) in which 4 numeric and 1 categorical columns drift.
Each measurement runs in a fresh subprocess so the peak resident memory (``ru_maxrss``) is its
own; "peak MB" is that peak minus the resident size after the data was generated. The fast path
time is the window check alone (the reference profile is built once per champion; its build time
is printed separately).

    python benchmarks/bench_drift.py                     # 10k, 100k, 1M rows (Evidently at 1M: ~2 min, 2+ GB)
    python benchmarks/bench_drift.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N_NUMERIC, N_CATEGORICAL = 16, 4
NUMERIC = [f"n{i}" for i in range(N_NUMERIC)]
CATEGORICAL = [f"c{i}" for i in range(N_CATEGORICAL)]
LEVELS = np.array(["a", "b", "c", "d", "e"], dtype=object)


def make(rows: int, *, drift: bool, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data: dict[str, np.ndarray] = {}
    for i, col in enumerate(NUMERIC):
        shift = 0.3 if drift and i < 4 else 0.0
        data[col] = rng.normal(10.0 + shift * 2.0, 2.0, rows)
    for i, col in enumerate(CATEGORICAL):
        p = [0.4, 0.3, 0.15, 0.1, 0.05] if not (drift and i == 0) else [0.1, 0.15, 0.15, 0.3, 0.3]
        data[col] = LEVELS[rng.choice(5, rows, p=p)]
    return pd.DataFrame(data)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(engine: str, rows: int, reference_rows: int) -> dict:
    from monitoring.drift import DriftOptions, ReferenceProfile, evidently_report, fast_check

    reference = make(reference_rows, drift=False, seed=1)
    current = make(rows, drift=True, seed=2)
    options = DriftOptions()
    out: dict = {}
    # warm up (imports, first calls) on a small window so both engines are timed in steady state
    warm = make(2000, drift=True, seed=3)
    if engine == "fast":
        fast_check(ReferenceProfile.build(reference, NUMERIC, CATEGORICAL), warm, options)
    else:
        evidently_report(reference, warm, NUMERIC, CATEGORICAL, options)
    if engine == "fast":
        t0 = time.perf_counter()
        profile = ReferenceProfile.build(reference, NUMERIC, CATEGORICAL)
        out["profile_seconds"] = time.perf_counter() - t0
        base = _rss_mb()
        t0 = time.perf_counter()
        result = fast_check(profile, current, options)
    else:
        base = _rss_mb()
        t0 = time.perf_counter()
        _, result = evidently_report(reference, current, NUMERIC, CATEGORICAL, options)
    out.update(seconds=time.perf_counter() - t0, peak_mb=max(0.0, _rss_mb() - base),
               drifted=sorted(result.drifted_columns),
               methods={c.column: c.method for c in result.columns},
               scores={c.column: c.score for c in result.columns})
    return out


def measure(engine: str, rows: int, reference_rows: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--rows", str(rows), "--reference-rows", str(reference_rows)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine} at {rows} rows failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


MIN_SPEEDUP = 50.0
MAX_SECONDS_1M = 0.5


def _goals(rows: int, fast: dict, ev: dict) -> str:
    """'met', or what missed: the speed-up, the 1M time, or a verdict that differs."""
    missed = []
    if ev["seconds"] / fast["seconds"] < MIN_SPEEDUP:
        missed.append("speed-up")
    if rows >= 1_000_000 and fast["seconds"] > MAX_SECONDS_1M:
        missed.append("time")
    if fast["drifted"] != ev["drifted"] or fast["methods"] != ev["methods"]:
        missed.append("verdicts")
    return "met" if not missed else "MISSED: " + ", ".join(missed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--reference-rows", type=int, default=5000)
    p.add_argument("--worker", choices=["fast", "evidently"])
    p.add_argument("--rows", type=int)
    args = p.parse_args()
    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(worker(args.worker, args.rows, args.reference_rows)))
        return
    print(f"drift check, {N_NUMERIC} numeric + {N_CATEGORICAL} categorical columns, "
          f"reference {args.reference_rows} rows; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    header = (f"{'rows':>9} | {'Evidently s':>11} {'peak MB':>8} | {'fast s':>8} {'peak MB':>8} | "
              f"{'speed-up':>8} | same columns | same methods | max |Δscore| | load | "
              f"goals (≥ {MIN_SPEEDUP:.0f}x, ≤ {MAX_SECONDS_1M} s at 1M)")
    print(header)
    print("-" * len(header))
    for rows in [int(s) for s in args.sizes.split(",") if s]:
        fast = measure("fast", rows, args.reference_rows)
        ev = measure("evidently", rows, args.reference_rows)
        delta = max(abs(fast["scores"][c] - ev["scores"][c]) for c in fast["scores"])
        print(f"{rows:>9} | {ev['seconds']:>11.2f} {ev['peak_mb']:>8.0f} | {fast['seconds']:>8.3f} {fast['peak_mb']:>8.0f} | "
              f"{ev['seconds'] / fast['seconds']:>7.0f}x | {fast['drifted'] == ev['drifted']!s:>12} | "
              f"{fast['methods'] == ev['methods']!s:>12} | {delta:>11.1e} | {os.getloadavg()[0]:>4.1f} | "
              f"{_goals(rows, fast, ev)}", flush=True)
        if fast["drifted"] != ev["drifted"]:
            print(f"  fast: {fast['drifted']}\n  evidently: {ev['drifted']}")
    print(f"(fast path reference profile, built once per champion: {fast['profile_seconds'] * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
