"""Training pipeline: kfp.local (embedded default) vs the same step functions in one process.

Same data (100k rows x 20 features: 16 numeric, 4 categorical, with gaps), same steps
(ingest, validate, train, evaluate, register; kfp.local also runs the deploy task), fresh MLflow stores. Each variant runs in
its own Python process, timed from process start, so all pay their imports. Three variants:
plain Python; kfp.local with every task a fresh interpreter (``DRIFTLOOP_TASK_SERVER=0``, kfp.local's
own way); kfp.local with the tasks forked from the run's task server (the default). Prints the
times, the per-task overhead of both kfp.local variants and the load average (the machine may be shared).

    python benchmarks/bench_pipeline.py [--rows 100000] [--repeat 1]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# ingest, validate, train, evaluate, register + deploy (the first model needs no canary, but the task runs)
STEPS = 6

PLAIN = r"""
import dataclasses, json, sys, warnings
warnings.filterwarnings("ignore")
from components.ingest import ingest, read_table
from components.validate import validate_frames
from components.train import train_model
from components.evaluate import evaluate_models
from components.register import RunContext, register_model
from driftloop.core.registry import CHAMPION, Registry
src, ws = sys.argv[1], sys.argv[2]
r = ingest(read_table(src), target="label", time_column="event_time", reference_size=5000)
sch = validate_frames(r.train, r.test, target="label", task="classification", time_column="event_time")
m = train_model(r.train, target="label", task="classification", numeric=sch["numeric"], categorical=sch["categorical"]).model
reg = Registry(f"sqlite:///{ws}/mlflow.db", experiment="bench", artifact_location=f"file://{ws}/artifacts")
reg.experiment_id()
champ = reg.version_by_alias("bench", CHAMPION)
d = evaluate_models(m, reg.load_sklearn(champ.uri) if champ else None, r.test, target="label", task="classification",
                    numeric=sch["numeric"], categorical=sch["categorical"], metric="accuracy")
ctx = RunContext("manual", "plain", "plain-req", r.window, src, "hist_gradient_boosting", "classification", "cpu", {})
register_model(m, registry=reg, model_name="bench", train=r.train, test=r.test, reference=r.reference, schema=sch,
               decision=dataclasses.asdict(d), ctx=ctx)
"""

KFP = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from driftloop.core.config import load_settings
from pipelines.runner import LocalRunner, RunRequest
from pipelines.training import run_training
src, ws = sys.argv[1], sys.argv[2]
s = load_settings(overrides={"workspace": ws, "data.source": src, "data.time_column": "event_time",
                             "mlflow.model_name": "bench", "mlflow.experiment": "bench"}, environ={})
res = run_training(LocalRunner(s), RunRequest())
assert res.state == "SUCCEEDED", res.error
"""


def make_data(rows: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({f"x{i}": rng.normal(size=rows) for i in range(16)})
    for i in range(4):
        df[f"c{i}"] = rng.choice(list("abcdef"), rows)
    df.loc[rng.random(rows) < 0.02, "x0"] = np.nan
    logit = df[[f"x{i}" for i in range(8)]].fillna(0).sum(axis=1) + (df["c0"] == "a") * 1.5
    df["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    df.insert(0, "event_time", pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(rows), unit="min"))
    df.to_parquet(path, index=False)


def timed(code: str, src: Path, ws: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(src), str(ws)], check=True, capture_output=True,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "data.parquet"
        make_data(args.rows, src)
        plain, fresh, forked = [], [], []
        load_before = os.getloadavg()
        for i in range(args.repeat):
            plain.append(timed(PLAIN, src, tmp / f"plain{i}"))
            fresh.append(timed(KFP, src, tmp / f"fresh{i}", {"DRIFTLOOP_TASK_SERVER": "0"}))
            forked.append(timed(KFP, src, tmp / f"kfp{i}"))
        load_after = os.getloadavg()
    p, f, k = min(plain), min(fresh), min(forked)
    print(json.dumps({"rows": args.rows, "features": 20, "steps": STEPS, "plain_s": round(p, 2),
                      "kfp_local_fresh_s": round(f, 2), "kfp_local_s": round(k, 2),
                      "overhead_per_step_fresh_s": round((f - p) / STEPS, 2),
                      "overhead_per_step_s": round((k - p) / STEPS, 2), "ratio": round(k / p, 2),
                      "load_avg_1m": [round(load_before[0], 2), round(load_after[0], 2)], "cpus": os.cpu_count()}))
    print(f"plain Python {p:.2f} s | kfp.local, fresh interpreters {f:.2f} s ({(f - p) / STEPS:.2f} s a task) | "
          f"kfp.local, task server {k:.2f} s: overhead {(k - p) / STEPS:.2f} s a task (target <= 0.5); "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
