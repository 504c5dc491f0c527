"""Train the GPU learner through the real train step and print what it used.

Run on a machine with an NVIDIA GPU (``python benchmarks/gpu_check.py``): it trains
XGBoost with ``model.device=auto`` (CUDA when visible) and ``cpu`` on the same data and
prints device, time and accuracy of each. On a machine without a GPU, ``auto`` falls back
to the CPU and ``--require-cuda`` makes it fail the way the pipeline does.
"""

import argparse
import json
import time

import numpy as np
import pandas as pd

from components.evaluate import score
from components.train import cuda_visible, train_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--require-cuda", action="store_true")
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


if __name__ == "__main__":
    main()
