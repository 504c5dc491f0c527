"""Train the GPU learner through the real train step and print what it used.

Run on a machine with an NVIDIA GPU (``python benchmarks/gpu_check.py``): it trains
XGBoost with ``model.device=auto`` (CUDA when visible) and ``cpu`` on the same data and
prints device, time and accuracy of each. On a machine without a GPU, ``auto`` falls back
to the CPU and ``--require-cuda`` makes it fail the way the pipeline does.

Then the distributed path (``model.distributed``): the worker entrypoint through the local
launcher with world size 1 — the XGBoost collective with its tracker on 127.0.0.1, one
worker process that sees the GPU — and prints the device the worker reports and whether the
model matches the single-process one. Without a GPU it runs on the CPU and says so.
(``--skip-distributed`` leaves it out.)
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from components.evaluate import score
from components.train import cuda_visible, train_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--require-cuda", action="store_true")
    ap.add_argument("--skip-distributed", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    df = pd.DataFrame({f"x{i}": rng.normal(size=args.rows) for i in range(20)})
    df["c0"] = rng.choice(list("abcd"), args.rows)
    logit = df[[f"x{i}" for i in range(6)]].sum(axis=1) + (df["c0"] == "a")
    df["label"] = (rng.random(args.rows) < 1 / (1 + np.exp(-logit))).astype(int)
    train, test = df.iloc[: int(0.8 * args.rows)], df.iloc[int(0.8 * args.rows):]
    numeric, categorical = [f"x{i}" for i in range(20)], ["c0"]
    print(json.dumps({"cuda_visible": cuda_visible()}))
    for device in (["cuda"] if args.require_cuda else ["auto"]) + ["cpu"]:
        start = time.perf_counter()
        result = train_model(train, target="label", task="classification", numeric=numeric, categorical=categorical,
                             learner="xgboost", params={"n_estimators": 300, "max_depth": 8}, device=device)
        seconds = time.perf_counter() - start
        acc = score(result.model, test, target="label", task="classification", numeric=numeric, categorical=categorical)
        booster = result.model.named_steps["model"].get_booster()
        print(json.dumps({"asked": device, "used": result.device, "booster_device": json.loads(booster.save_config())
                          ["learner"]["generic_param"].get("device"), "train_s": round(seconds, 2),
                          "accuracy": round(acc["accuracy"], 4)}))
    if not args.skip_distributed:
        distributed_check(train, test, numeric, categorical, require_cuda=args.require_cuda)


def distributed_check(train: pd.DataFrame, test: pd.DataFrame, numeric: list[str], categorical: list[str], *,
                      require_cuda: bool) -> None:
    """World size 1 through the distributed worker entrypoint: the device it used, and its accuracy."""
    from components.distributed import launch_local
    from components.validate import infer_schema

    gpu = cuda_visible()
    if not gpu:
        print("distributed: no GPU visible - running world size 1 on the CPU", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path, schema_path = Path(tmp) / "train.parquet", Path(tmp) / "schema.json"
        train.to_parquet(path, index=False)
        schema = infer_schema(train, "label", "classification")
        schema_path.write_text(json.dumps(schema, default=str))
        start = time.perf_counter()
        result = launch_local(train=str(path), schema_uri=str(schema_path), work_dir=Path(tmp) / "work", workers=1,
                              target="label", task="classification", params={"n_estimators": 300, "max_depth": 8},
                              device="cuda" if require_cuda else "auto", echo=lambda _: None)
        seconds = time.perf_counter() - start
    acc = score(result.model, test, target="label", task="classification", numeric=numeric, categorical=categorical)
    rec = result.record
    print(json.dumps({"distributed_world_size": rec["workers"], "worker_devices": rec["devices"],
                      "gpu_visible": gpu, "wall_s": round(seconds, 2), "boosting_s": round(rec["seconds"], 2),
                      "round_median_s": round(sorted(rec["round_seconds"])[len(rec["round_seconds"]) // 2], 4),
                      "accuracy": round(acc["accuracy"], 4)}), flush=True)
    if gpu and rec["devices"] != ["cuda"]:
        sys.exit("distributed: a GPU is visible but the worker trained on " + ",".join(rec["devices"]))


if __name__ == "__main__":
    main()
