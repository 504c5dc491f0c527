"""Pipeline runs on the embedded default: what kfp.local costs a task, and a short pipeline against its peers.

1. **The training pipeline**, 100k rows x 20 features (16 numeric, 4 categorical, with gaps), same steps
   (ingest, validate, train, evaluate, register; kfp.local also runs the deploy task), fresh MLflow
   stores. Each variant runs in a process of its own, twice in one workspace (the second run has a
   champion to beat, in every variant alike): plain Python (the step functions in one process);
   kfp.local with every task a fresh interpreter (``DRIFTLOOP_TASK_SERVER=0``, kfp.local's own way;
   one run); kfp.local with the tasks forked from the task server (the default). *Cold* is from the
   process's start to the end of its first run (all imports paid, the task server started), *warm*
   the second run in the same process (what the scheduler, the retraining worker and the demo pay
   for every run after their first). Overhead a task = (kfp.local - plain) / 6.
2. **Six trivial steps** (``x + 1`` chained): stock kfp.local (``SubprocessRunner(use_venv=False)``,
   components with ``install_kfp_package=False`` as driftloop's own, so no ``pip install`` per task)
   vs driftloop's ``LocalRunner`` (task server, MLflow experiment, log file, progress) vs ZenML's
   local orchestrator (all steps in one process; ``zenml[local]``), cold and warm as above. Each
   tool's store (MLflow's, ZenML's) is made by an untimed first process, as on a user's second run.

ZenML cannot share the project's environment (it pins other pydantic, click and OpenTelemetry
versions), so the benchmark makes its own virtual environment for it once, with this machine's
``python3.11``::

    python3.11 -m venv ~/.cache/driftloop/bench-zenml
    ~/.cache/driftloop/bench-zenml/bin/pip install "zenml[local]==0.98.0"

(``--zenml-python`` points at another interpreter, ``--no-zenml`` leaves ZenML out: the output says so).
Prints each figure, the ratios and the load average before and after (the machine may be shared).

    python benchmarks/bench_pipeline.py [--rows 100000] [--repeat 2] [--only real|trivial]
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# ingest, validate, train, evaluate, register + deploy (the first model needs no canary, but the task runs)
STEPS = 6
TRIVIAL_STEPS = 6
ZENML_VENV = Path.home() / ".cache" / "driftloop" / "bench-zenml"
ZENML_REQUIREMENT = "zenml[local]==0.98.0"

# Every child: argv = [launch time (time.time() in the parent), workspace, runs, ...]; prints one JSON line
# {"first": seconds from launch to the end of the first run, "runs": [seconds of each run]}.
TIMING = r"""
import json, sys, time
launch, ws, runs = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def timed(run):
    out = []
    for i in range(runs):
        t = time.time()
        run(i)
        out.append(time.time() - t)
        if i == 0:
            first = time.time() - launch
    print(json.dumps({"first": first, "runs": out}), flush=True)
"""

PLAIN = TIMING + r"""
import dataclasses, warnings
warnings.filterwarnings("ignore")
from components.ingest import ingest, read_table
from components.validate import validate_frames
from components.train import train_model
from components.evaluate import evaluate_models
from components.register import RunContext, register_model
from driftloop.core.registry import CHAMPION, Registry
src = sys.argv[4]
def run(i):
    r = ingest(read_table(src), target="label", time_column="event_time", reference_size=5000)
    sch = validate_frames(r.train, r.test, target="label", task="classification", time_column="event_time")
    m = train_model(r.train, target="label", task="classification", numeric=sch["numeric"],
                    categorical=sch["categorical"]).model
    reg = Registry(f"sqlite:///{ws}/mlflow.db", experiment="bench", artifact_location=f"file://{ws}/artifacts")
    reg.experiment_id()
    champ = reg.version_by_alias("bench", CHAMPION)
    d = evaluate_models(m, reg.load_sklearn(champ.uri) if champ else None, r.test, target="label",
                        task="classification", numeric=sch["numeric"], categorical=sch["categorical"], metric="accuracy")
    ctx = RunContext("manual", "plain", f"plain-req-{i}", r.window, src, "hist_gradient_boosting", "classification",
                     "cpu", {})
    register_model(m, registry=reg, model_name="bench", train=r.train, test=r.test, reference=r.reference,
                   schema=sch, decision=dataclasses.asdict(d), ctx=ctx)  # a first model becomes the champion
timed(run)
"""

KFP = TIMING + r"""
import warnings
warnings.filterwarnings("ignore")
from driftloop.core.config import load_settings
from pipelines.runner import LocalRunner, RunRequest
from pipelines.training import run_training
s = load_settings(overrides={"workspace": ws, "data.source": sys.argv[4], "data.time_column": "event_time",
                             "mlflow.model_name": "bench", "mlflow.experiment": "bench"}, environ={})
def run(i):
    res = run_training(LocalRunner(s), RunRequest())
    assert res.state == "SUCCEEDED", res.error
timed(run)
"""

# Six trivial steps, as kfp components: the same definitions for stock kfp.local and driftloop's runner.
TRIVIAL_KFP = r"""
import warnings
warnings.filterwarnings("ignore")
from kfp import dsl

@dsl.component(install_kfp_package=False)
def first() -> int:
    return 1

@dsl.component(install_kfp_package=False)
def add(x: int) -> int:
    return x + 1

@dsl.pipeline(name="six-trivial-steps")
def six():
    x = first()
    for _ in range(5):
        x = add(x=x.output)
"""

STOCK = TIMING + TRIVIAL_KFP + r"""
import kfp.local
kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=ws + "/pipeline-root")
timed(lambda i: six())
"""

DRIFTLOOP = TIMING + TRIVIAL_KFP + r"""
from driftloop.core.config import load_settings
from driftloop.core.runs import Pipeline
from pipelines.runner import LocalRunner, RunRequest
s = load_settings(overrides={"workspace": ws, "data.source": ws + "/none.parquet"}, environ={})
p = Pipeline(name="six-trivial-steps", description="", build=lambda: six, compile=lambda d: d,
             summarize=lambda request_id: {})
def run(i):
    res = LocalRunner(s).run(p, {}, RunRequest())
    assert res.state == "SUCCEEDED", res.error
timed(run)
"""

ZENML = TIMING + r"""
import logging
from zenml import pipeline, step

@step(enable_cache=False)
def first() -> int:
    return 1

@step(enable_cache=False)
def add(x: int) -> int:
    return x + 1

@pipeline(enable_cache=False)
def six():
    x = first()
    for _ in range(5):
        x = add(x)

timed(lambda i: six())
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


def child(code: str, ws: Path, runs: int, *extra: str, env: dict | None = None, python: str = sys.executable) -> dict:
    """Run ``code`` in a fresh process; its timings (cold: launch to the end of the first run; each run)."""
    ws.mkdir(parents=True, exist_ok=True)
    script = ws.parent / f"bench-{hashlib.sha256(code.encode()).hexdigest()[:12]}.py"  # kfp reads its source
    script.write_text(code)
    launch = time.time()
    proc = subprocess.run([python, str(script), str(launch), str(ws), str(runs), *extra], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def zenml_python(given: str | None) -> tuple[str | None, str]:
    """The interpreter with ZenML, made once under ~/.cache/driftloop/bench-zenml; (None, why) if it cannot be had."""
    if given:
        return given, f"ZenML from {given}"
    python = ZENML_VENV / "bin" / "python"
    if not python.exists():
        base = shutil.which("python3.11") or sys.executable
        print(f"making ZenML's environment ({ZENML_REQUIREMENT}) in {ZENML_VENV} ...", file=sys.stderr, flush=True)
        made = subprocess.run([base, "-m", "venv", str(ZENML_VENV)], capture_output=True, text=True)
        if made.returncode == 0:
            made = subprocess.run([str(python), "-m", "pip", "install", "-q", ZENML_REQUIREMENT], capture_output=True,
                                  text=True)
        if made.returncode != 0:
            shutil.rmtree(ZENML_VENV, ignore_errors=True)
            return None, f"ZenML could not be installed here ({made.stderr.strip().splitlines()[-1:]})"
    version = subprocess.run([str(python), "-c", "import zenml; print(zenml.__version__)"], capture_output=True,
                             text=True)
    if version.returncode != 0:
        return None, f"ZenML in {ZENML_VENV} does not import: {version.stderr.strip()[-300:]}"
    return str(python), f"ZenML {version.stdout.strip()} ({ZENML_VENV})"


def span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if round(lo, 2) == round(hi, 2) else f"{lo:.2f}-{hi:.2f}"


def real_pipeline(tmp: Path, rows: int, repeat: int) -> dict:
    src = tmp / "data.parquet"
    make_data(rows, src)
    got: dict[str, list[dict]] = {"plain": [], "fresh": [], "forked": []}
    for i in range(repeat):
        got["plain"].append(child(PLAIN, tmp / f"plain{i}", 2, str(src)))
        got["fresh"].append(child(KFP, tmp / f"fresh{i}", 1, str(src), env={"DRIFTLOOP_TASK_SERVER": "0"}))
        got["forked"].append(child(KFP, tmp / f"kfp{i}", 2, str(src)))
    cold = {k: [r["first"] for r in v] for k, v in got.items()}
    warm = {k: [r["runs"][1] for r in v] for k, v in got.items() if k != "fresh"}
    per = {"cold": [(k - p) / STEPS for k, p in zip(cold["forked"], cold["plain"])],
           "warm": [(k - p) / STEPS for k, p in zip(warm["forked"], warm["plain"])],
           "fresh": [(f - p) / STEPS for f, p in zip(cold["fresh"], cold["plain"])]}
    print(f"training pipeline, {rows} rows x 20 features, {STEPS} tasks ({repeat} runs each, range):")
    print(f"  cold (process start -> end of first run): plain {span(cold['plain'])} s | kfp.local fresh interpreters "
          f"{span(cold['fresh'])} s ({span(per['fresh'])} s a task) | kfp.local task server {span(cold['forked'])} s: "
          f"overhead {span(per['cold'])} s a task")
    print(f"  warm (second run, same process):          plain {span(warm['plain'])} s | kfp.local task server "
          f"{span(warm['forked'])} s: overhead {span(per['warm'])} s a task (target <= 0.15)")
    return {"cold_s": cold, "warm_s": warm, "overhead_per_task_s": per}


def trivial_pipeline(tmp: Path, repeat: int, zen: str | None, zen_note: str) -> dict:
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    zenv = {"ZENML_CONFIG_PATH": str(tmp / "zenml-config"), "ZENML_ANALYTICS_OPT_IN": "false",
            "ZENML_LOGGING_VERBOSITY": "ERROR", "ZENML_ENABLE_RICH_TRACEBACK": "false"}
    variants = {"stock": (STOCK, env, sys.executable), "driftloop": (DRIFTLOOP, env, sys.executable)}
    if zen:
        variants["zenml"] = (ZENML, zenv, zen)
    for name, (code, venv, python) in variants.items():  # untimed: each tool makes its store once
        child(code, tmp / f"trivial-{name}", 1, env=venv, python=python)
    got: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, (code, venv, python) in variants.items():
            got[name].append(child(code, tmp / f"trivial-{name}", 2, env=venv, python=python))
    cold = {k: [r["first"] for r in v] for k, v in got.items()}
    warm = {k: [r["runs"][1] for r in v] for k, v in got.items()}
    print(f"{TRIVIAL_STEPS} trivial steps ({repeat} processes each, two runs in each; {zen_note}):")
    ratios = {}
    for label, times in (("cold", cold), ("warm", warm)):
        line = " | ".join(f"{k} {span(v)} s" for k, v in times.items())
        r = {f"driftloop/{k}": min(times["driftloop"]) / min(v) for k, v in times.items() if k != "driftloop"}
        ratios[label] = r
        print(f"  {label}: {line}; " + ", ".join(f"{k} {v:.2f}" for k, v in r.items())
              + " (targets: driftloop/stock <= 1.0, driftloop/zenml <= 1.5)")
    if not zen:
        print(f"  ZenML left out: {zen_note}; compared with stock kfp.local only")
    return {"cold_s": cold, "warm_s": warm, "ratios_of_best": ratios, "zenml": zen_note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", choices=["real", "trivial"])
    ap.add_argument("--zenml-python", help="an interpreter with zenml installed (default: the benchmark's own venv)")
    ap.add_argument("--no-zenml", action="store_true")
    args = ap.parse_args()
    zen, zen_note = (None, "--no-zenml given") if args.no_zenml or args.only == "real" else zenml_python(
        args.zenml_python)
    out: dict = {"cpus": os.cpu_count()}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "trivial":
            out["real"] = real_pipeline(Path(tmp), args.rows, args.repeat)
        if args.only != "real":
            out["trivial"] = trivial_pipeline(Path(tmp), args.repeat, zen, zen_note)
    load_after = os.getloadavg()
    out["load_avg_1m"] = [round(load_before[0], 2), round(load_after[0], 2)]
    print(f"load average {load_before[0]:.2f} -> {load_after[0]:.2f} on {os.cpu_count()} cores")
    print(json.dumps(rounded(out)))


def rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
