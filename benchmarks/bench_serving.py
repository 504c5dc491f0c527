"""Serving throughput: bare FastAPI vs the driftloop KServe predictor (V1, V2) vs the local gateway.

Serves the same registered model (a HistGradientBoosting pipeline on 16 numeric and 4
categorical raw columns) through

  (a) a bare FastAPI endpoint that calls the model's ``predict`` in-process (no validation),
  (b) kserve's ModelServer with ``serving.predictor`` — V1 and V2 requests,
  (c) the local gateway (``serving.gateway``) in front of (b), logging every request and
      response as CloudEvents to the real inference-log sink (``monitoring.sink``),

and drives each with the same rows at batch 1 and 32 from a load generator with a fixed
concurrency (asyncio + aiohttp keep-alive connections over loopback). Servers are pinned to
``--server-cpus`` and the load generator to ``--client-cpus``; a warm-up is excluded; each
case runs for a bounded time and request count. Prints req/s, rows/s, p50 and p99 per case,
and the ratios b/a and c/b.

    python benchmarks/bench_serving.py [--seconds 8] [--concurrency 8] [--server-cpus 0] [--client-cpus 1]

Not a test: numbers depend on the machine. Every response is checked to be a 200.
"""


import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUMERIC = [f"x{i:02d}" for i in range(16)]
CATEGORICAL = ["region", "plan", "device", "channel"]
LEVELS = {"region": ["north", "south", "east", "west"], "plan": ["basic", "pro", "team"],
          "device": ["ios", "android", "web"], "channel": ["ads", "organic", "referral", "partner", "email"]}
MODEL_NAME = "bench"


# -- data and model ---------------------------------------------------------------------------------
def make_rows(n: int, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({c: rng.normal(size=n) for c in NUMERIC})
    for c in CATEGORICAL:
        df[c] = rng.choice(LEVELS[c], size=n).astype(object)
    df.loc[rng.random(n) < 0.03, "x03"] = np.nan
    df.loc[rng.random(n) < 0.03, "plan"] = None
    score = df["x00"].fillna(0) + 0.5 * df["x01"] - 0.3 * df["x02"] + (df["region"] == "north") * 0.8
    df["label"] = (score + rng.normal(scale=0.5, size=n) > 0.3).astype(int)
    return df


def register_bench_model(tracking_uri: str) -> str:
    """Train the benchmark model with the project's train step and register it; returns its registry URI."""
    import warnings

    import mlflow
    from mlflow.models import infer_signature

    from components.register import model_requirements, trusted_types
    from components.train import prepare_features, train_model

    warnings.filterwarnings("ignore")
    data = make_rows(5000)
    result = train_model(data, target="label", task="classification", numeric=NUMERIC, categorical=CATEGORICAL,
                         learner="hist_gradient_boosting", params={"max_iter": 100})
    features = prepare_features(data.head(5), NUMERIC, CATEGORICAL)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            result.model, name="model", signature=infer_signature(features, result.model.predict(features)),
            registered_model_name=MODEL_NAME, skops_trusted_types=trusted_types(result.model),
            pip_requirements=model_requirements(result.model))
    return f"models:/{MODEL_NAME}/{info.registered_model_version}"


def request_rows(batch: int) -> list[dict[str, Any]]:
    from components.train import prepare_features

    df = prepare_features(make_rows(batch, seed=11), NUMERIC, CATEGORICAL).astype(object)
    return df.where(df.notna(), None).to_dict("records")


def v1_body(rows: list[dict[str, Any]]) -> bytes:
    return json.dumps({"instances": rows}).encode()


def v2_body(rows: list[dict[str, Any]]) -> bytes:
    inputs = [{"name": c, "shape": [len(rows)], "datatype": "BYTES" if c in CATEGORICAL else "FP64",
               "data": [r[c] for r in rows]} for c in NUMERIC + CATEGORICAL]
    return json.dumps({"id": "bench", "inputs": inputs}).encode()


# -- (a) the bare FastAPI endpoint ------------------------------------------------------------------
def serve_fastapi(model_uri: str, tracking_uri: str, port: int) -> None:
    """The floor: FastAPI + the same model's predict, no validation, no framework around it."""
    import logging

    import mlflow
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import ORJSONResponse

    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # the same thread cap as the predictor, so (a) and (b) compare like for like
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.sklearn.load_model(model_uri)
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> ORJSONResponse:
        body = await request.json()
        frame = pd.DataFrame(body["instances"])
        return ORJSONResponse({"predictions": model.predict(frame).tolist()})

    @app.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- processes --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpus(spec: str) -> set[int]:
    return {int(c) for c in spec.split(",") if c.strip()}


class Proc:
    """A server subprocess pinned to some CPUs; always stopped."""

    def __init__(self, cmd: list[str], cpu_set: set[int], ready_url: str, log_path: Path) -> None:
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                  preexec_fn=lambda: os.sched_setaffinity(0, cpu_set))
        self.ready_url = ready_url
        self.log_path = log_path

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise SystemExit(f"server exited ({self.p.returncode}); see {self.log_path}:\n"
                                 + self.log_path.read_text()[-2000:])
            try:
                if httpx.get(self.ready_url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"server not ready after {timeout}s: {self.ready_url}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


# -- load generator ---------------------------------------------------------------------------------
@dataclass
class Result:
    case: str
    batch: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.batch


async def _drive(url: str, body: bytes, headers: dict[str, str], concurrency: int, warmup: float, seconds: float,
                 max_requests: int) -> tuple[list[float], int, float]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> bool:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status == 200

        # warm-up: connections opened, caches and lazy imports on the server side done
        end_warm = time.perf_counter() + warmup
        while time.perf_counter() < end_warm:
            if not all(await asyncio.gather(*(one() for _ in range(concurrency)))):
                raise SystemExit(f"warm-up request to {url} failed")
        start = time.perf_counter()
        stop_at = start + seconds
        sent = 0

        async def worker() -> None:
            nonlocal errors, sent
            while time.perf_counter() < stop_at and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                ok = await one()
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return latencies, errors, elapsed


def run_case(case: str, url: str, body: bytes, batch: int, args: argparse.Namespace) -> Result:
    headers = {"content-type": "application/json"}
    lat, errors, elapsed = asyncio.run(_drive(url, body, headers, args.concurrency, args.warmup, args.seconds,
                                              args.max_requests))
    arr = np.array(lat) * 1000
    res = Result(case, batch, len(lat), errors, elapsed, float(np.percentile(arr, 50)), float(np.percentile(arr, 99)))
    print(f"{case:<28} batch {batch:>3}  {res.rps:8.0f} req/s  {res.rows_per_s:9.0f} rows/s  "
          f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:6.2f} ms  ({res.requests} requests, {errors} errors)",
          flush=True)
    if errors:
        print(f"  WARNING: {errors} non-200 responses in {case}", flush=True)
    return res


def run_kserve_cases(key: str, label: str, port: int, bodies: dict[int, list[dict[str, Any]]],
                     args: argparse.Namespace) -> dict[tuple[str, int], Result]:
    """V1 and V2 requests at every batch size against a KServe-protocol endpoint."""
    base = f"http://127.0.0.1:{port}"
    out = {}
    for b, rows in bodies.items():
        out[key + "1", b] = run_case(f"{label} V1", f"{base}/v1/models/{MODEL_NAME}:predict", v1_body(rows), b, args)
        out[key + "2", b] = run_case(f"{label} V2", f"{base}/v2/models/{MODEL_NAME}/infer", v2_body(rows), b, args)
    return out


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per case")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-requests", type=int, default=100_000, help="bound on requests per case")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--server-cpus", default="0", help="CPUs of the model server (and of the gateway by default)")
    p.add_argument("--gateway-cpus", default=None, help="CPUs of the gateway and the sink (default: --server-cpus)")
    p.add_argument("--client-cpus", default="1", help="CPUs of the load generator")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()

    server_cpus, client_cpus = cpus(args.server_cpus), cpus(args.client_cpus)
    gateway_cpus = cpus(args.gateway_cpus) if args.gateway_cpus else server_cpus
    available = os.sched_getaffinity(0)
    if not (server_cpus | client_cpus | gateway_cpus) <= available:
        raise SystemExit(f"CPUs {sorted(server_cpus | client_cpus | gateway_cpus)} not all available ({sorted(available)})")
    os.sched_setaffinity(0, client_cpus)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    model_uri = register_bench_model(tracking_uri)
    print(f"model {model_uri}: {len(NUMERIC)} numeric + {len(CATEGORICAL)} categorical columns; "
          f"server CPUs {sorted(server_cpus)}, gateway CPUs {sorted(gateway_cpus)}, load CPUs {sorted(client_cpus)}, "
          f"concurrency {args.concurrency}, {args.seconds:.0f} s per case; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    try:
        from serving import gateway as _gateway  # noqa: F401
        have_gateway = True
    except ImportError as exc:
        have_gateway = False
        print(f"note: case (c) skipped, the local gateway is not available ({exc})")

    py = sys.executable
    batches = [int(b) for b in args.batches.split(",")]
    bodies = {b: request_rows(b) for b in batches}
    results: dict[tuple[str, int], Result] = {}
    procs: list[Proc] = []
    try:
        pa, pb = free_port(), free_port()
        procs.append(Proc([py, str(Path(__file__).resolve()), "_fastapi", model_uri, tracking_uri, str(pa)],
                          server_cpus, f"http://127.0.0.1:{pa}/ready", work / "fastapi.log"))
        procs[-1].wait_ready()
        for b in batches:
            results["a", b] = run_case("(a) bare FastAPI", f"http://127.0.0.1:{pa}/predict", v1_body(bodies[b]), b, args)
        procs.pop().stop()

        procs.append(Proc([py, "-m", "serving.predictor", "--model-name", MODEL_NAME, "--model-uri", model_uri,
                           "--tracking-uri", tracking_uri, "--http-port", str(pb)],
                          server_cpus, f"http://127.0.0.1:{pb}/v2/health/ready", work / "predictor.log"))
        procs[-1].wait_ready()
        results.update(run_kserve_cases("b", "(b) KServe predictor", pb, bodies, args))
        if have_gateway:
            ps, pg = free_port(), free_port()
            procs.append(Proc([py, "-m", "monitoring.sink", "--store", str(work / "inference.db"), "--port", str(ps),
                               "--model", MODEL_NAME], gateway_cpus, f"http://127.0.0.1:{ps}/readyz", work / "sink.log"))
            procs[-1].wait_ready()
            procs.append(Proc([py, "-m", "serving.gateway", "--name", MODEL_NAME, "--port", str(pg),
                               "--primary-url", f"http://127.0.0.1:{pb}", "--primary-version", model_uri.rsplit("/", 1)[1],
                               "--sink-url", f"http://127.0.0.1:{ps}/events"],
                              gateway_cpus, f"http://127.0.0.1:{pg}/admin/status", work / "gateway.log"))
            procs[-1].wait_ready()
            results.update(run_kserve_cases("c", "(c) gateway+logging", pg, bodies, args))
            _report_logged(work / "inference.db", pg)
    finally:
        for proc in reversed(procs):
            proc.stop()

    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (other work on the host skews every case)")
    print("ratios (req/s)                    target")
    for b in batches:
        a = results["a", b].rps
        print(f"  batch {b:>3}  b/a V1 {results['b1', b].rps / a:5.2f}      >= 0.85")
        print(f"  batch {b:>3}  b/a V2 {results['b2', b].rps / a:5.2f}      >= 0.75")
        if have_gateway:
            print(f"  batch {b:>3}  c/b V1 {results['c1', b].rps / results['b1', b].rps:5.2f}      >= 0.60")
            print(f"  batch {b:>3}  c/b V2 {results['c2', b].rps / results['b2', b].rps:5.2f}      >= 0.60")


def _report_logged(store: Path, gateway_port: int) -> None:
    """How many events reached the sink, and how many the gateway dropped (a full queue drops, never blocks)."""
    import sqlite3

    import httpx

    time.sleep(1.0)
    try:
        stats = httpx.get(f"http://127.0.0.1:{gateway_port}/metrics", timeout=5).text
        dropped = [line for line in stats.splitlines() if "dropped" in line and not line.startswith("#")]
    except httpx.HTTPError:
        dropped = []
    with sqlite3.connect(store) as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        counts = {t: db.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
    print(f"  inference log: {counts}; gateway: {'; '.join(dropped) or 'no drop counter'}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_fastapi":
        serve_fastapi(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
