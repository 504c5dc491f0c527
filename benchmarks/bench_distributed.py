"""Distributed training on one machine: 1 vs N local workers joined by XGBoost's collective.

Writes ``--rows`` rows of the built-in churn scenario (default 1M) as parquet with its
schema, then trains the same XGBoost model through ``components.distributed.launch_local``
with 1 worker and with ``--workers`` workers (separate processes, RabitTracker on 127.0.0.1,
allreduce over TCP) and prints, per run:

* wall time of the whole launch (process start, shard read, encoding, training, model write)
  and of the boosting alone;
* seconds per round (median, p90);
* peak resident memory of each worker (``ru_maxrss``);
* bytes each worker's TCP sockets sent per round (Linux ``TCP_INFO``: the collective's traffic —
  the quantile sketch once, then the gradient histograms of every tree level);
* holdout ROC AUC, to show the models are the same.

It also prints the histogram size that the per-round traffic should track: built nodes per tree
x encoded features x bins x 16 bytes (a gradient/hessian pair of doubles).

    python benchmarks/bench_distributed.py                    # 1M rows, 1 vs 2 workers, 50 rounds
    python benchmarks/bench_distributed.py --rows 200000 --workers 4

Costs CPU for minutes on a shared machine: run it once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--max-depth", type=int, default=6)
    ap.add_argument("--max-bin", type=int, default=256)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import os

    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from components.distributed import launch_local
    from components.validate import infer_schema
    from driftloop.app.scenario import generate

    t0 = time.perf_counter()
    df = generate("classification", int(args.rows / 0.8) + 1).drop(columns=["event_time"])
    test = df.iloc[args.rows:].reset_index(drop=True)
    train = df.iloc[: args.rows].reset_index(drop=True)
    print(f"data: {len(train):,} training rows, {len(test):,} holdout rows, generated in "
          f"{time.perf_counter() - t0:.1f}s; {os.cpu_count()} CPU cores", flush=True)
    schema = infer_schema(train, "label", "classification")
    params = {"n_estimators": args.rounds, "max_depth": args.max_depth, "learning_rate": 0.1, "max_bin": args.max_bin}
    encoded = len(schema["numeric"]) + len(schema["categorical"])
    built = sum(2 ** max(d - 1, 0) for d in range(args.max_depth))  # subtraction trick: half the nodes per level
    hist_bytes = built * encoded * args.max_bin * 16
    print(f"model: {args.rounds} rounds, max_depth {args.max_depth}, {encoded} features, max_bin {args.max_bin}; "
          f"histograms built per tree <= {built} nodes x {encoded} x {args.max_bin} x 16 B = {hist_bytes / 1e6:.2f} MB",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path, schema_path = Path(tmp) / "train.parquet", Path(tmp) / "schema.json"
        train.to_parquet(path, index=False, row_group_size=64_000)
        schema_path.write_text(json.dumps(schema, default=str))
        for workers in (1, args.workers):
            start = time.perf_counter()
            r = launch_local(train=str(path), schema_uri=str(schema_path), work_dir=Path(tmp) / f"w{workers}",
                             workers=workers, target="label", task="classification", params=params,
                             checkpoint_rounds=10**9, echo=lambda _: None)
            wall = time.perf_counter() - start
            rec = r.record
            auc = roc_auc_score(test["label"], r.model.predict_proba(test.drop(columns=["label"]))[:, 1])
            rounds = sorted(rec["round_seconds"])
            row = {
                "workers": workers, "wall_s": round(wall, 2), "boosting_s": round(rec["seconds"], 2),
                "round_median_s": round(statistics.median(rounds), 4),
                "round_p90_s": round(rounds[int(0.9 * (len(rounds) - 1))], 4),
                "peak_rss_mb": rec["peak_rss_mb"], "bytes_sent_per_round": rec["bytes_sent_per_round"],
                "rows_per_worker": rec["rows"], "auc": round(auc, 4),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    one, many = results
    print(f"\n{args.workers} workers vs 1: wall x{many['wall_s'] / one['wall_s']:.2f}, boosting "
          f"x{many['boosting_s'] / one['boosting_s']:.2f}, per round x{many['round_median_s'] / one['round_median_s']:.2f}, "
          f"peak memory per worker {max(many['peak_rss_mb']):.0f} MB vs {max(one['peak_rss_mb']):.0f} MB, "
          f"sent per round per worker {max(many['bytes_sent_per_round']) / 1e6:.2f} MB, "
          f"AUC {many['auc']} vs {one['auc']}")
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, "params": params, "hist_bytes": hist_bytes,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
