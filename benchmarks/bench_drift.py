"""Drift check speed and memory: Evidently's DataDriftPreset vs the monitor's fast path.

Same data for both, per size: a reference sample of ``--reference-rows`` rows (the champion's
reference, > 1000 rows: Wasserstein / Jensen-Shannon regime) and a current window of N rows ×
20 columns (16 numeric, 4 categorical) in which 4 numeric and 1 categorical columns drift.
Each engine runs in a fresh subprocess, warmed up on a small window first (imports, first calls).

Printed per size, with the load average (the machine is shared: the CPU seconds are printed next
to the wall-clock ones, and the ratios of both):

* Evidently: ``evidently_report`` (the preset on the cleaned window), median of ``--evidently-runs``
  runs (one at 1M rows: ~2 min);
* fast: ``fast_check`` on a profile built before (the monitor builds it once per champion),
  median of ``--runs`` runs; and "with build": ``ReferenceProfile.build`` plus the first check
  on that new profile (which builds the grids a window of that size needs), median too;
* memory: what the check itself allocates — the peak of the resident size sampled every
  millisecond during the check, less the resident size when it started (both engines), and for
  the fast path also tracemalloc's peak (numpy reports its buffers to tracemalloc);
* the same verdicts, methods, and the largest score difference (goal: ≤ 1e-12);
* below each row, the fast check of the same window with one string object per row in the
  categorical columns (what the monitor's store gives: its rows are decoded one by one), where
  the data above has a few shared objects (what ``pd.read_csv`` or pyarrow give).

    python benchmarks/bench_drift.py                     # 10k, 100k, 1M rows
    python benchmarks/bench_drift.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N_NUMERIC, N_CATEGORICAL = 16, 4
NUMERIC = [f"n{i}" for i in range(N_NUMERIC)]
CATEGORICAL = [f"c{i}" for i in range(N_CATEGORICAL)]
LEVELS = np.array(["a", "b", "c", "d", "e"], dtype=object)
PAGE = os.sysconf("SC_PAGE_SIZE")


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


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssPeak:
    """The resident size sampled every millisecond while the block runs: ``.mb`` is its peak less its
    size on entry (what the block itself held at once, not the process's all-time peak)."""

    def __enter__(self) -> RssPeak:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.mb = (self.peak - self.base) / 2**20


def _timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def worker(engine: str, rows: int, reference_rows: int, runs: int) -> dict:
    from monitoring.drift import DriftOptions, ReferenceProfile, evidently_report, fast_check

    reference = make(reference_rows, drift=False, seed=1)
    current = make(rows, drift=True, seed=2)
    options = DriftOptions()
    warm = make(2000, drift=True, seed=3)
    out: dict = {}
    if engine == "fast":
        fast_check(ReferenceProfile.build(reference, NUMERIC, CATEGORICAL), warm, options)
        built = []
        for _ in range(runs):  # the profile's build counted: build, then the first check on it
            built.append(_timed(lambda: fast_check(ReferenceProfile.build(reference, NUMERIC, CATEGORICAL), current,
                                                   options)))
        profile = ReferenceProfile.build(reference, NUMERIC, CATEGORICAL)
        fast_check(profile, current, options)
        timings = []
        for _ in range(runs):
            with RssPeak() as rss:
                timings.append(_timed(fast_check, profile, current, options))
        tracemalloc.start()
        fast_check(profile, current, options)
        out["traced_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        # the monitor's store decodes rows one by one: one string object per row, counted by value
        import orjson

        decoded = current.assign(**{c: np.array(orjson.loads(orjson.dumps(current[c].tolist())), dtype=object)
                                    for c in CATEGORICAL})
        out["decoded_seconds"] = statistics.median(_timed(fast_check, profile, decoded, options)[0]
                                                   for _ in range(runs))
        out.update(built_seconds=statistics.median(t[0] for t in built),
                   built_cpu=statistics.median(t[1] for t in built))
        result = timings[-1][2]
    else:
        evidently_report(reference, warm, NUMERIC, CATEGORICAL, options)
        timings = []
        for _ in range(runs):
            with RssPeak() as rss:
                timings.append(_timed(evidently_report, reference, current, NUMERIC, CATEGORICAL, options))
        result = timings[-1][2][1]
    out.update(seconds=statistics.median(t[0] for t in timings), cpu=statistics.median(t[1] for t in timings),
               rss_mb=rss.mb, drifted=sorted(result.drifted_columns),
               methods={c.column: c.method for c in result.columns},
               scores={c.column: c.score for c in result.columns})
    return out


def measure(engine: str, rows: int, reference_rows: int, runs: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--rows", str(rows), "--reference-rows", str(reference_rows),
           "--runs", str(runs)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine} at {rows} rows failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


MIN_SPEEDUP = 100.0  # per window, the profile built before
MIN_SPEEDUP_BUILT = 20.0  # with the profile's build counted
MAX_SECONDS_1M = 0.2
MAX_SCORE_DIFFERENCE = 1e-12


def _goals(rows: int, fast: dict, ev: dict, delta: float) -> str:
    """'met', or what missed: a speed-up, the 1M time, or verdicts/scores that differ."""
    missed = []
    if ev["seconds"] / fast["seconds"] < MIN_SPEEDUP:
        missed.append("speed-up")
    if ev["seconds"] / fast["built_seconds"] < MIN_SPEEDUP_BUILT:
        missed.append("speed-up with build")
    if rows >= 1_000_000 and fast["seconds"] > MAX_SECONDS_1M:
        missed.append("time")
    if fast["drifted"] != ev["drifted"] or fast["methods"] != ev["methods"]:
        missed.append("verdicts")
    if delta > MAX_SCORE_DIFFERENCE:
        missed.append("scores")
    return "met" if not missed else "MISSED: " + ", ".join(missed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--reference-rows", type=int, default=5000)
    p.add_argument("--runs", type=int, default=5, help="fast path runs per measurement (the median is printed)")
    p.add_argument("--evidently-runs", type=int, default=3, help="Evidently runs below 1M rows (one at 1M and above)")
    p.add_argument("--worker", choices=["fast", "evidently"])
    p.add_argument("--rows", type=int)
    args = p.parse_args()
    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(worker(args.worker, args.rows, args.reference_rows, args.runs)))
        return
    print(f"drift check, {N_NUMERIC} numeric + {N_CATEGORICAL} categorical columns, reference {args.reference_rows} "
          f"rows; {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("times: median wall seconds (CPU seconds); memory: MB held at once during the check (RSS sampled; "
          "fast: also tracemalloc's peak)")
    header = (f"{'rows':>9} | {'Evidently s (cpu)':>17} {'MB':>5} | {'fast s (cpu)':>15} {'MB':>4} {'traced':>6} "
              f"| {'with build':>15} | {'speed-up (cpu)':>14} | {'with build':>13} | same verdicts | max |Δscore| "
              "| load | "
              f"goals (≥ {MIN_SPEEDUP:.0f}x, ≥ {MIN_SPEEDUP_BUILT:.0f}x with build, ≤ {MAX_SECONDS_1M} s at 1M, "
              f"|Δ| ≤ {MAX_SCORE_DIFFERENCE:g})")
    print(header)
    print("-" * len(header))
    for rows in [int(s) for s in args.sizes.split(",") if s]:
        fast = measure("fast", rows, args.reference_rows, args.runs)
        ev = measure("evidently", rows, args.reference_rows, 1 if rows >= 1_000_000 else args.evidently_runs)
        delta = max(abs(fast["scores"][c] - ev["scores"][c]) for c in fast["scores"])
        same = fast["drifted"] == ev["drifted"] and fast["methods"] == ev["methods"]
        print(f"{rows:>9} | {ev['seconds']:>7.3f} ({ev['cpu']:>7.3f}) {ev['rss_mb']:>5.0f} | "
              f"{fast['seconds']:>6.4f} ({fast['cpu']:>6.4f}) {fast['rss_mb']:>4.0f} {fast['traced_mb']:>6.1f} | "
              f"{fast['built_seconds']:>6.4f} ({fast['built_cpu']:>6.4f}) | "
              f"{ev['seconds'] / fast['seconds']:>5.0f}x ({ev['cpu'] / fast['cpu']:>5.0f}x) | "
              f"{ev['seconds'] / fast['built_seconds']:>4.0f}x ({ev['cpu'] / fast['built_cpu']:>4.0f}x) | "
              f"{same!s:>13} | {delta:>12.1e} | {os.getloadavg()[0]:>4.1f} | {_goals(rows, fast, ev, delta)}",
              flush=True)
        print(f"{'':>9}   fast with one string object per row (as the monitor's store decodes a window): "
              f"{fast['decoded_seconds']:.4f} s, {ev['seconds'] / fast['decoded_seconds']:.0f}x", flush=True)
        if fast["drifted"] != ev["drifted"]:
            print(f"  fast: {fast['drifted']}\n  evidently: {ev['drifted']}")


if __name__ == "__main__":
    main()
