"""Quality check speed: Evidently's RegressionPreset / ClassificationPreset vs the monitor's fast path,
and how well the CBPE estimate follows the realised accuracy under covariate shift.

Speed (default): N labelled rows — a regression window (truth, prediction) and a binary
classification window (truth, predicted label, class scores) — through
``monitoring.quality.quality_metrics`` (the fast path) and ``monitoring.quality.evidently_quality``
(the presets, the report of record), both warmed up on a small window first. Prints both times
(wall, and CPU in parentheses: the machine may be shared), their ratio against the goal (≥ 20×
for classification, ≥ 45× for regression), the load average, and the largest difference between
the two sets of values (they must be the same metrics).

    python benchmarks/bench_quality.py --rows 1000000     # Evidently at 1M rows takes minutes: run it once
    python benchmarks/bench_quality.py --rows 100000

Estimate (``--cbpe``): the built-in ``covariate`` scenario (inputs shift, relation holds) — a
HistGradientBoosting model trained and calibrated (isotonic, on its holdout, as registration does)
on the first half; the second half cut into windows of ``--window`` rows; per window the estimated
accuracy (``monitoring.estimate``) beside the realised one, and their mean absolute error. The
``concept`` scenario is printed too: there the estimate cannot see the drop (only labels can).

    python benchmarks/bench_quality.py --cbpe
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")


def _timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


GOALS = {"regression": 45.0, "classification": 20.0}  # at least this many times Evidently's time at 1M rows


def speed(rows: int, runs: int) -> None:
    import os
    import statistics

    from monitoring.quality import evidently_quality, quality_metrics

    rng = np.random.default_rng(0)
    y = rng.normal(100, 20, rows)
    pred = 0.8 * y + rng.normal(10, 15, rows)
    truth = rng.integers(0, 2, rows)
    p1 = np.clip(0.4 * truth + 0.6 * rng.random(rows), 0, 1)
    scores = np.column_stack([1 - p1, p1])
    labels = (p1 > 0.5).astype(int)
    print(f"quality metrics, {rows:,} rows; {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; fast: median of {runs} runs, Evidently: one run; "
          "times wall (CPU)")
    for task, args in (("regression", (y, pred)), ("classification", (truth, labels, scores, [0, 1]))):
        small = tuple(a[:2000] if isinstance(a, np.ndarray) else a for a in args)
        quality_metrics(task, *small)  # warm up both (imports, first calls)
        evidently_quality(task, *small)
        fast_runs = [_timed(quality_metrics, task, *args) for _ in range(runs)]
        t_fast, c_fast, fast = (statistics.median(r[0] for r in fast_runs), statistics.median(r[1] for r in fast_runs),
                                fast_runs[-1][2])
        t_ev, c_ev, (_, judged) = _timed(evidently_quality, task, *args)
        diff = max(abs(fast[k] - v) for k, v in judged.items())
        goal = GOALS[task]
        verdict = "met" if t_ev / t_fast >= goal and diff <= 1e-12 else "MISSED"
        print(f"{task:<15} fast {t_fast * 1000:8.1f} ms ({c_fast * 1000:7.1f})  evidently {t_ev:8.2f} s ({c_ev:7.2f})  "
              f"ratio {t_ev / t_fast:6.1f}x ({c_ev / c_fast:6.1f}x cpu)  metrics {sorted(judged)}  "
              f"max |difference| {diff:.1e}  load {os.getloadavg()[0]:.1f}  goal ≥ {goal:.0f}x: {verdict}",
              flush=True)


def cbpe(window: int) -> None:
    from components.evaluate import calibration_map
    from components.train import prepare_features, train_model
    from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC, SCENARIOS, generate
    from monitoring.estimate import Calibration, estimate_performance

    for name in ("covariate", "concept"):
        df = generate(rows=40_000, drift_at=0.5, drift=SCENARIOS[name], seed=5)
        half = len(df) // 2
        train, hold, live = df.iloc[: half - 4000], df.iloc[half - 4000: half], df.iloc[half:]
        X = lambda d: prepare_features(d, FEATURES_NUMERIC, FEATURES_CATEGORICAL)  # noqa: E731
        model = train_model(train, target="label", task="classification", numeric=FEATURES_NUMERIC,
                            categorical=FEATURES_CATEGORICAL, params={"max_iter": 100}).model
        classes = list(model.classes_)
        cal = Calibration.from_holdout({"classes": classes, "calibration": calibration_map(
            hold["label"].to_numpy(), model.predict_proba(X(hold)), classes)})
        errors, lines = [], []
        for start in range(0, len(live) - window + 1, window):
            part = live.iloc[start:start + window]
            scores = model.predict_proba(X(part))
            est = estimate_performance(scores, cal).accuracy
            real = float(np.mean(model.predict(X(part)) == part["label"].to_numpy()))
            errors.append(abs(est - real))
            lines.append(f"{est:.3f}/{real:.3f}")
        hold_acc = float(np.mean(model.predict(X(hold)) == hold["label"].to_numpy()))
        print(f"{name:<10} holdout accuracy {hold_acc:.3f}; {len(errors)} windows of {window}: "
              f"estimated/realised {' '.join(lines[:8])}{' ...' if len(lines) > 8 else ''}")
        print(f"{'':<10} mean |estimate - realised| = {np.mean(errors):.4f} (max {np.max(errors):.4f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--cbpe", action="store_true", help="estimate vs realised accuracy on the scenarios instead")
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5, help="fast path runs (the median is printed)")
    args = p.parse_args()
    if args.cbpe:
        cbpe(args.window)
    else:
        speed(args.rows, args.runs)


if __name__ == "__main__":
    main()
