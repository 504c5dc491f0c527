"""Batch scoring: rows/s of the scoring steps against in-process predict, and peak memory on a big input.

    python benchmarks/bench_score.py [--rows 3000000] [--chunks N] [--batch-rows 50000] [--format csv]

* baseline: read the whole parquet file, ``model.predict`` all rows in one process;
* batch: the scoring pipeline's step functions as its pods run them — one process per chunk
  (``components.score.score_chunk``, default one chunk per core), then ``write_predictions``;
  the time includes every process start, the model load, streaming, the parts and the final file.
  kfp.local adds its own fixed cost per task on top (see the pipeline benchmark);
* memory: each chunk process's peak RSS (VmHWM) above its own RSS after imports and the model
  load, against a cap of one fifth of the input's in-memory size (pandas, deep): the input is ~5×
  the cap, so a reader that loaded its chunk (half the input at two chunks) whole would cross it.
  Also Arrow's allocator peak, the part of it Arrow itself held.

Prints rows/s and the ratio (goal ≥ 0.7× in-process at one chunk per core), the memory figures and
whether each goal was met. ``--format csv`` measures the csv reader (byte ranges, reader chunks).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    return _status_mb("VmRSS:")


def _peak_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: that one keeps the high-water mark of the process before exec
    # (a spawned worker would report the parent's memory at fork time).
    return _status_mb("VmHWM:")


def _chunk_worker(args: tuple) -> tuple[int, float, float, float]:
    import joblib
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401 (imported before the baseline RSS is taken)

    from components.score import score_chunk

    model_path, uri, fmt, chunk, numeric, categorical, part, sample, batch_rows = args
    model = joblib.load(model_path)
    base = _rss_mb()
    rows = score_chunk(model, uri=uri, fmt=fmt, chunk=chunk, numeric=numeric, categorical=categorical,
                       id_column="id", version="1", part_path=part, sample_path=sample, sample_rows=50_000,
                       batch_rows=batch_rows)
    peak = _peak_mb()
    return rows, base, peak, pa.default_memory_pool().max_memory() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--cap-mb", type=float, default=0.0, help="memory cap per chunk process; default: a fifth of "
                                                             "the input's in-memory size")
    ap.add_argument("--chunks", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--batch-rows", type=int, default=50_000)
    ap.add_argument("--format", choices=["parquet", "csv"], default="parquet", help="the input file's format")
    args = ap.parse_args()

    import joblib

    from components.score import plan_chunks, score_frame, write_predictions
    from components.train import train_model
    from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC, generate

    numeric, categorical = list(FEATURES_NUMERIC), list(FEATURES_CATEGORICAL)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = generate(rows=20_000, drift_at=None, seed=1)
        model = train_model(train, target="label", task="classification", numeric=numeric,
                            categorical=categorical, params={"max_iter": 100}).model
        joblib.dump(model, tmp / "model.joblib")
        frame = generate(rows=args.rows, drift_at=None, seed=2).drop(columns=["label"])
        frame.insert(0, "id", np.arange(len(frame)))
        src = tmp / f"input.{args.format}"
        if args.format == "csv":
            frame.to_csv(src, index=False)
        else:
            frame.to_parquet(src, index=False, row_group_size=50_000)
        in_memory_mb = frame.memory_usage(deep=True).sum() / 2**20
        del frame

        # baseline: everything in one process, the whole table in memory
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        whole = pd.read_csv(src) if args.format == "csv" else pd.read_parquet(src)
        expected = score_frame(model, whole, numeric, categorical)
        base_s = time.perf_counter() - t
        del whole

        # batch: one process per chunk, then the final write
        t = time.perf_counter()
        plan, _, _ = plan_chunks(str(src), args.format, args.chunks)
        jobs = [(str(tmp / "model.joblib"), str(src), args.format, c, numeric, categorical,
                 str(tmp / f"part{c['index']}.parquet"), str(tmp / f"sample{c['index']}.parquet"), args.batch_rows)
                for c in plan]
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.map(_chunk_worker, jobs)
        out = tmp / "predictions.parquet"
        written = write_predictions([j[6] for j in jobs], str(out))
        batch_s = time.perf_counter() - t
        rows = sum(r[0] for r in results)
        got = pd.read_parquet(out, columns=["prediction"])["prediction"].to_numpy()
        assert written == rows == len(expected) and np.array_equal(got, expected), \
            "batch predictions differ from in-process predict"

    cap_mb = args.cap_mb or in_memory_mb / 5
    growth = [peak - base for _, base, peak, _ in results]
    print(f"rows: {rows:,}  format: {args.format}  chunks: {len(plan)}  batch rows: {args.batch_rows:,}  "
          f"cores: {os.cpu_count()}  load average: {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"in-process predict : {rows / base_s:12,.0f} rows/s  ({base_s:.2f} s)")
    print(f"batch scoring steps: {rows / batch_s:12,.0f} rows/s  ({batch_s:.2f} s)  ratio {base_s / batch_s:.2f} "
          f"(goal >= 0.7: {'met' if base_s / batch_s >= 0.7 else 'MISSED'})")
    print(f"input in memory {in_memory_mb:.0f} MB; cap {cap_mb:.0f} MB a chunk process (input = "
          f"{in_memory_mb / cap_mb:.1f}x the cap)")
    print(f"per chunk process: peak RSS {', '.join(f'{p:.0f}' for _, _, p, _ in results)} MB, above its start "
          f"{', '.join(f'{g:.0f}' for g in growth)} MB (of which Arrow's allocator at most "
          f"{', '.join(f'{a:.0f}' for *_, a in results)} MB) -> cap "
          f"{'met' if max(growth) <= cap_mb else 'MISSED'}")


if __name__ == "__main__":
    main()
