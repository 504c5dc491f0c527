"""Serving memory of a fleet: models packed into shared KServe ModelServer processes vs one process each.

Builds ``--models`` (default 50) small generated models — different columns (2 to 9 numeric, some
with a categorical column) and learners (logistic regression, ridge, a decision tree, a 5-tree
random forest, 10 rounds of HistGradientBoosting, a one-hot pipeline) — saved as MLflow models
(skops, as the training step stores them) in a temporary folder, and measures the resident memory
(RSS, summed over each server's process tree) of

  (a) ``serving.model_pack``: one process per group that ``pack()`` plans (``--max-models``,
      default 50, and ``--max-bytes`` of model files per process), every model answering one V1
      request before the measure;
  (b) one ``serving.predictor`` process per model, the way a one-model loop serves: a sample of
      ``--baseline-sample`` (default 5) processes is started and measured, and their mean RSS is
      multiplied by the number of models (printed as sampled).

Prints the memory per model of both, their ratio, and the load average. Every process started
here dies with this script (``driftloop.core.processes.spawn``; stopped in ``finally``).

    python benchmarks/bench_fleet_memory.py [--models 50] [--max-models 50] [--max-bytes 268435456]
                                            [--baseline-sample 5]

Not a test: numbers depend on the machine and the libraries' versions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from driftloop.core.processes import free_port, spawn, stop_processes  # noqa: E402
from serving.model_pack import pack  # noqa: E402

MB = 1024 * 1024
LEARNERS = ("logistic", "ridge", "tree", "forest", "hgb", "onehot")


# -- the models -------------------------------------------------------------------------------------
def make_model(i: int, rows: int = 200) -> tuple[Any, pd.DataFrame]:
    """Model ``i``: its learner and columns vary with ``i``; returns (fitted model, its training frame)."""
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    from sklearn.tree import DecisionTreeRegressor

    rng = np.random.default_rng(i)
    kind = LEARNERS[i % len(LEARNERS)]
    frame = pd.DataFrame({f"m{i}_x{j}": rng.normal(size=rows) for j in range(2 + i % 8)})
    score = frame.iloc[:, 0] - 0.5 * frame.iloc[:, 1]
    label = (score > 0).astype(int)
    if kind == "logistic":
        return LogisticRegression().fit(frame, label), frame
    if kind == "ridge":
        return Ridge().fit(frame, score), frame
    if kind == "tree":
        return DecisionTreeRegressor(max_depth=4, random_state=i).fit(frame, score), frame
    if kind == "forest":
        return RandomForestClassifier(n_estimators=5, max_depth=4, random_state=i).fit(frame, label), frame
    if kind == "hgb":
        return HistGradientBoostingClassifier(max_iter=10, random_state=i).fit(frame, label), frame
    frame[f"m{i}_kind"] = rng.choice(["a", "b", "c"], size=rows).astype(object)
    pipe = make_pipeline(make_column_transformer((OneHotEncoder(handle_unknown="ignore"), [f"m{i}_kind"]),
                                                 remainder="passthrough"), LogisticRegression())
    return pipe.fit(frame, label), frame


def save_models(n: int, home: Path) -> dict[str, tuple[Path, dict[str, Any], int]]:
    """Saves ``n`` models under ``home``; name -> (path, one row to ask it about, model-file bytes)."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from components.register import trusted_types

    out = {}
    for i in range(n):
        model, frame = make_model(i)
        name, path = f"fleet-{i:03d}", home / f"fleet-{i:03d}"
        mlflow.sklearn.save_model(model, str(path), signature=infer_signature(frame, model.predict(frame)),
                                  pip_requirements=["scikit-learn"], skops_trusted_types=trusted_types(model))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        out[name] = (path, frame.iloc[0].to_dict(), size)
    return out


# -- the servers ------------------------------------------------------------------------------------
def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:
        return _proc_tree_rss(pid)
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _proc_tree_rss(pid: int) -> int:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        frontier = [c for c, p in parents.items() if p in frontier and c not in tree]
        tree.update(frontier)
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for p in tree:
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError):
            continue
    return total


def start(argv: list[str], logs: Path, label: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    err = open(logs / f"{label}.log", "w")  # a file, not a pipe: a full pipe would block the server
    proc = spawn([sys.executable, "-m", *argv, "--http-port", str(port), "--max-payload-bytes", str(MB)],
                 stdout=subprocess.DEVNULL, stderr=err, cwd=str(ROOT))
    err.close()
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(servers: list[tuple[subprocess.Popen, str]], timeout: float) -> None:
    import httpx

    deadline, waiting = time.monotonic() + timeout, list(servers)
    while waiting:
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(waiting)} server(s) not ready after {timeout:.0f} s")
        for proc, url in list(waiting):
            if proc.poll() is not None:
                raise SystemExit(f"server {url} exited with {proc.returncode}; see its log")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    waiting.remove((proc, url))
            except httpx.HTTPError:
                pass
        time.sleep(0.5)


def ask(url: str, name: str, row: dict[str, Any]) -> None:
    import httpx

    r = httpx.post(f"{url}/v1/models/{name}:predict", json={"instances": [row]}, timeout=60)
    if r.status_code != 200 or "predictions" not in r.json():
        raise SystemExit(f"{name} at {url} answered {r.status_code}: {r.text[:200]}")


# -- the run ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--max-models", type=int, default=50, help="models per packed process")
    parser.add_argument("--max-bytes", type=int, default=256 * MB, help="model-file bytes per packed process")
    parser.add_argument("--baseline-sample", type=int, default=5, help="one-model processes started and measured")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the servers to become ready")
    args = parser.parse_args(argv)

    started: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        home = Path(tmp)
        t0 = time.perf_counter()
        models = save_models(args.models, home)
        total_bytes = sum(size for _, _, size in models.values())
        groups = pack([(n, size) for n, (_, _, size) in models.items()], max_models=args.max_models,
                      max_bytes=args.max_bytes)
        print(f"{len(models)} models ({', '.join(LEARNERS)}; 2-9 columns), {total_bytes / MB:.1f} MB of model files, "
              f"saved in {time.perf_counter() - t0:.1f} s; packed into {len(groups)} process(es) of at most "
              f"{args.max_models} models / {args.max_bytes / MB:.0f} MB", flush=True)
        try:
            t0 = time.perf_counter()
            packed = []
            for i, group in enumerate(groups):
                given = [a for n in group for a in ("--model", f"{n}=1={models[n][0]}")]
                packed.append(start(["serving.model_pack", *given], home, f"pack-{i}"))
            started += [p for p, _ in packed]
            wait_ready(packed, args.timeout)
            for (_, url), group in zip(packed, groups):
                for name in group:
                    ask(url, name, models[name][1])
            pack_rss = sum(tree_rss(p.pid) for p, _ in packed)
            print(f"(a) packed      {len(packed):>3} process(es)  {pack_rss / MB:8.1f} MB RSS  "
                  f"{pack_rss / len(models) / MB:6.1f} MB a model  (ready and answering in "
                  f"{time.perf_counter() - t0:.1f} s)", flush=True)
            stop_processes([p.pid for p, _ in packed], timeout=20)

            t0 = time.perf_counter()
            sample = list(models)[:max(1, min(args.baseline_sample, len(models)))]
            single = [start(["serving.predictor", "--model-name", n, "--model-uri", str(models[n][0])], home, n)
                      for n in sample]
            started += [p for p, _ in single]
            wait_ready(single, args.timeout)
            for (_, url), name in zip(single, sample):
                ask(url, name, models[name][1])
            each = [tree_rss(p.pid) for p, _ in single]
            mean = sum(each) / len(each)
            baseline = mean * len(models)
            print(f"(b) one each    {len(models):>3} process(es)  {baseline / MB:8.1f} MB RSS  "
                  f"{mean / MB:6.1f} MB a model  (SAMPLED: mean of {len(each)} processes, "
                  f"{min(each) / MB:.1f}-{max(each) / MB:.1f} MB, times {len(models)}; ready in "
                  f"{time.perf_counter() - t0:.1f} s)", flush=True)
        finally:
            stop_processes([p.pid for p in started], timeout=20)
    print(f"\nratio (b)/(a): {baseline / pack_rss:.1f}x the memory for one process per model")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other work on the host slows the start, not the memory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
