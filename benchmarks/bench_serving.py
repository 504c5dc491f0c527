"""Serving throughput: bare FastAPI vs the driftloop KServe predictor (V1, V2) vs the local gateway vs MLServer.

Serves the same registered model through

  (a) a bare FastAPI endpoint that calls the model's ``predict`` in-process (no validation), V1
      (``/predict``) and V2 (``/v2/predict``: one tensor per column in, an Open Inference Protocol
      answer out): it parses with ``orjson.loads`` and answers ``orjson.dumps`` in a plain
      ``Response`` with FastAPI's deprecation warnings filtered — the honest floor of each protocol
      (FastAPI's deprecated ``ORJSONResponse`` warns on every request, because scikit-learn resets
      the warning registry on each predict, and ``request.json()`` is the slow parser: together
      they halve (a)),
  (b) kserve's ModelServer with ``serving.predictor`` — V1 and V2 requests,
  (b') the same predictor with ``--kserve-v2-route``: V2 on kserve's own (pydantic) route, what
      the predictor's fast V2 path saves,
  (b+) the same predictor asked for class scores too (``x-driftloop-scores``), as the gateway
      asks when it logs (the quality estimate needs them): c/b+ is the gateway and sink alone,
  (c) the local gateway (``serving.gateway``) in front of (b), logging every request and
      response as CloudEvents to the real inference-log sink (``monitoring.sink``),
  (m) MLServer 1.7.1 + mlserver-sklearn, the peer a user would pick instead, V2 REST, stock
      (its defaults) and tuned (request log off, ``parallel_workers: 0``, httptools), serving the
      registered model written with joblib (its sklearn runtime reads joblib/pickle files; MLflow
      stores skops). MLServer pins ``fastapi<0.116``, which conflicts with kserve's, so it runs
      from a venv of its own that this script makes on first use, with pip's cache:
      ``~/.cache/driftloop/bench-mlserver`` (mlserver==1.7.1, mlserver-sklearn==1.7.1,
      uvloop==0.21.0 — stock 1.7.1 crashes at start with uvloop 0.23 —, and this venv's
      scikit-learn, numpy and pandas; httptools apart in ``httptools/``, on the tuned server's path
      only). ``--no-mlserver`` leaves it out; hgb model only,

for one of two models (``--model``):

  hgb       a HistGradientBoostingClassifier on 20 numeric columns — the model behind the
            targets; its predict is cheap, so the serving layers show;
  pipeline  what the training step registers: imputers + one-hot encoding + HistGradientBoosting
            on 16 numeric and 4 categorical raw columns (sklearn's own per-call overhead
            dominates: ~8 ms a call here);

and drives each with the same rows at batch 1 and 32 from a load generator with a fixed
concurrency (asyncio + aiohttp keep-alive connections over loopback). Servers are pinned to
``--server-cpus`` and the load generator to ``--client-cpus``; a warm-up is excluded; each
case runs for a bounded time and request count. Prints req/s, rows/s, p50 and p99 per case, each
case also as a fraction of in-process predict calls at the same batch size, the load average
while it ran, and the ratios against their targets, by req/s and by server CPU per request (the
steadier figure on a shared machine: under load a server with more processes — stock MLServer's
inference worker — gets more scheduler shares of the pinned core). Before timing, every case must
answer the same predictions for the same rows.

    python benchmarks/bench_serving.py [--model hgb|pipeline] [--seconds 8] [--concurrency 8]
                                       [--server-cpus 0] [--client-cpus 1] [--no-mlserver] [--no-kserve-route]

Model servers (and (a)) run one OpenMP thread per prediction, as ``serving.predictor`` does.

Not a test: numbers depend on the machine. Every response is checked to be a 200.
"""


import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The columns of the selected model (set by use_model).
NUMERIC: list[str] = []
CATEGORICAL: list[str] = []
MODELS = {"hgb": (20, []), "pipeline": (16, ["region", "plan", "device", "channel"])}
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
    score = df["x00"].fillna(0) + 0.5 * df["x01"] - 0.3 * df["x02"]
    if CATEGORICAL:
        df.loc[rng.random(n) < 0.03, "plan"] = None
        score = score + (df["region"] == "north") * 0.8
    df["label"] = (score + rng.normal(scale=0.5, size=n) > 0.3).astype(int)
    return df


def use_model(kind: str) -> None:
    n_numeric, categorical = MODELS[kind]
    NUMERIC[:] = [f"x{i:02d}" for i in range(n_numeric)]
    CATEGORICAL[:] = categorical


def fit_model(kind: str, data: pd.DataFrame) -> Any:
    """The plain HistGradientBoosting model, or the training step's pipeline."""
    from components.train import prepare_features, train_model

    if kind == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(
            prepare_features(data, NUMERIC, []), data["label"])
    return train_model(data, target="label", task="classification", numeric=NUMERIC, categorical=CATEGORICAL,
                       learner="hist_gradient_boosting", params={"max_iter": 100}).model


def register_bench_model(tracking_uri: str, kind: str) -> tuple[str, Any]:
    """Train the benchmark model and register it; returns its registry URI and the model."""
    import warnings

    import mlflow
    from mlflow.models import infer_signature

    from components.register import model_requirements, trusted_types
    from components.train import prepare_features

    warnings.filterwarnings("ignore")
    data = make_rows(5000)
    model = fit_model(kind, data)
    features = prepare_features(data.head(5), NUMERIC, CATEGORICAL)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model, name="model", signature=infer_signature(features, model.predict(features)),
            registered_model_name=MODEL_NAME, skops_trusted_types=trusted_types(model),
            pip_requirements=model_requirements(model))
    return f"models:/{MODEL_NAME}/{info.registered_model_version}", model


def inprocess_rate(model: Any, rows: list[dict[str, Any]], seconds: float = 2.0) -> float:
    """predict calls/s on a ready DataFrame, one thread: the ceiling no server can pass."""
    from threadpoolctl import threadpool_limits

    from components.train import prepare_features

    frame = prepare_features(pd.DataFrame(rows), NUMERIC, CATEGORICAL)
    with threadpool_limits(limits=1):
        model.predict(frame)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.predict(frame)
            calls += 1
    return calls / (time.perf_counter() - start)


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

    import warnings

    import mlflow
    import orjson
    import uvicorn
    from fastapi import FastAPI, Request, Response
    from fastapi.exceptions import FastAPIDeprecationWarning

    from threadpoolctl import threadpool_limits

    warnings.filterwarnings("ignore", category=FastAPIDeprecationWarning)  # as serving.predictor does
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.sklearn.load_model(model_uri)
    threadpool_limits(limits=1)  # after loading, as the predictor does: (a) and (b) compare like for like
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        body = orjson.loads(await request.body())
        frame = pd.DataFrame(body["instances"])
        return Response(orjson.dumps({"predictions": model.predict(frame).tolist()}), media_type="application/json")

    @app.post("/v2/predict")
    async def predict_v2(request: Request) -> Response:
        """The V2 floor: one tensor per column in, an Open Inference Protocol answer out, no checks."""
        body = orjson.loads(await request.body())
        frame = pd.DataFrame({t["name"]: t["data"] for t in body["inputs"]})
        preds = model.predict(frame)
        out = {"model_name": "bench", "id": body.get("id"), "outputs": [
            {"name": "predictions", "shape": [len(preds)], "datatype": "INT64", "data": preds.tolist()}]}
        return Response(orjson.dumps(out), media_type="application/json")

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

    def __init__(self, cmd: list[str], cpu_set: set[int], ready_url: str, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        from driftloop.core.processes import die_with_parent

        self.log = open(log_path, "wb")
        dies = die_with_parent()

        def pin_and_tie() -> None:  # pinned to its CPUs, and gone when the benchmark is
            dies()
            os.sched_setaffinity(0, cpu_set)

        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                  preexec_fn=pin_and_tie)
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


# -- the peer: MLServer ------------------------------------------------------------------------------
MLSERVER_HOME = Path.home() / ".cache" / "driftloop" / "bench-mlserver"
# uvloop 0.23 crashes stock MLServer 1.7.1 at start; mlserver's fastapi<0.116 pin conflicts with
# kserve's fastapi, hence a venv of its own
MLSERVER_PINS = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0"]


def mlserver_home() -> Path:
    """The MLServer venv, made once (with pip's cache) and reused: mlserver + mlserver-sklearn with this
    venv's scikit-learn, numpy and pandas (the joblib file must load the same); httptools apart in
    ``httptools/``, on the path of the tuned server only (stock MLServer as pip installs it has none)."""
    from importlib.metadata import version

    pins = MLSERVER_PINS + [f"{d}=={version(d)}" for d in ("scikit-learn", "numpy", "pandas")]
    marker = MLSERVER_HOME / "driftloop-bench.txt"
    if marker.exists() and marker.read_text() == " ".join(pins):
        return MLSERVER_HOME
    print(f"setting up MLServer in {MLSERVER_HOME} (once): {' '.join(pins)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(MLSERVER_HOME)], check=True)
    pip = [str(MLSERVER_HOME / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *pins], check=True)
    subprocess.run([*pip, "--target", str(MLSERVER_HOME / "httptools"), f"httptools=={version('httptools')}"],
                   check=True)
    subprocess.run([str(MLSERVER_HOME / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "httptools"],
                   check=False)
    marker.write_text(" ".join(pins))
    return MLSERVER_HOME


def mlserver_proc(home: Path, work: Path, model_file: Path, tuned: bool, cpu_set: set[int]) -> tuple["Proc", int]:
    """MLServer serving ``model_file`` with its scikit-learn runtime on 127.0.0.1; stock settings, or
    tuned: request log off (``debug: false``), inference in the server process (``parallel_workers:
    0``), uvicorn on httptools."""
    variant = "tuned" if tuned else "stock"
    folder = work / f"mlserver-{variant}"
    (folder / MODEL_NAME).mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings: dict[str, Any] = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
                                "metrics_port": free_port()}
    if tuned:
        settings.update(debug=False, parallel_workers=0)
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / MODEL_NAME / "model-settings.json").write_text(json.dumps(
        {"name": MODEL_NAME, "implementation": "mlserver_sklearn.SKLearnModel", "parameters": {"uri": str(model_file)}}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread, like the others
    if tuned:
        env["PYTHONPATH"] = str(home / "httptools")
    return Proc([str(home / "bin" / "mlserver"), "start", str(folder)], cpu_set,
                f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/ready", work / f"mlserver-{variant}.log", env=env), port


def mlserver_body(rows: list[dict[str, Any]]) -> bytes:
    """MLServer's cheapest V2 form for the sklearn runtime: one 2-D FP64 tensor, row-major."""
    data = [r[c] for r in rows for c in NUMERIC]
    return json.dumps({"id": "bench", "inputs": [{"name": "input-0", "shape": [len(rows), len(NUMERIC)],
                                                  "datatype": "FP64", "data": data}]}).encode()


def _predictions(doc: dict[str, Any]) -> list[Any]:
    if "predictions" in doc:
        return list(doc["predictions"])
    data = doc["outputs"][0]["data"]
    return [x[0] if isinstance(x, list) else x for x in data]


def check_same_predictions(cases: list["Case"]) -> None:
    """One request per case: every server must answer the same predictions for the same rows."""
    import httpx

    for batch in sorted({c.batch for c in cases}):
        answers = {}
        for case in (c for c in cases if c.batch == batch):
            r = httpx.post(case.url, content=case.body, headers={"content-type": "application/json", **case.headers},
                           timeout=30)
            r.raise_for_status()
            answers[case.label] = [int(x) for x in _predictions(r.json())]
        first = next(iter(answers.values()))
        differ = [label for label, preds in answers.items() if preds != first]
        if differ:
            raise SystemExit(f"batch {batch}: predictions differ from {next(iter(answers))}: {differ}")
        print(f"batch {batch:>3}: the same {len(first)} predictions from all {len(answers)} cases", flush=True)


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
    cpu_ms: float  # server CPU time per request: what other load on the host cannot inflate much
    load: float  # the host's 1-minute load average while the case ran (mean over its slices)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.batch


async def _drive(url: str, body: bytes, headers: dict[str, str], concurrency: int, warmup: float, seconds: float,
                 max_requests: int, pids: list[int]) -> tuple[list[float], int, float, float]:
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
        cpu_before = server_cpu(pids)
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
        cpu = server_cpu(pids) - cpu_before
    return latencies, errors, elapsed, cpu


def server_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by the server processes of a case (user + system)."""
    import psutil

    total = 0.0
    for pid in pids:
        proc = psutil.Process(pid)
        for one in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = one.cpu_times()
                total += t.user + t.system
    return total


@dataclass
class Case:
    key: str
    label: str
    url: str
    body: bytes
    batch: int
    latencies: list[float]
    pids: list[int]
    errors: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # beyond content-type
    loads: list[float] = field(default_factory=list)  # load average after each slice of the case

    def result(self) -> Result:
        arr = np.array(self.latencies) * 1000
        return Result(self.label, self.batch, len(self.latencies), self.errors, self.seconds,
                      float(np.percentile(arr, 50)), float(np.percentile(arr, 99)),
                      self.cpu / max(len(self.latencies), 1) * 1000, float(np.mean(self.loads)))


def kserve_cases(key: str, label: str, port: int, bodies: dict[int, list[dict[str, Any]]],
                 pids: list[int], headers: dict[str, str] | None = None) -> list[Case]:
    """V1 and V2 requests at every batch size against a KServe-protocol endpoint."""
    base = f"http://127.0.0.1:{port}"
    out = []
    for b, rows in bodies.items():
        out.append(Case(key + "1", f"{label} V1", f"{base}/v1/models/{MODEL_NAME}:predict", v1_body(rows), b, [], pids,
                        headers=dict(headers or {})))
        out.append(Case(key + "2", f"{label} V2", f"{base}/v2/models/{MODEL_NAME}/infer", v2_body(rows), b, [],
                        pids, headers=dict(headers or {})))
    return out


def run_interleaved(cases: list[Case], args: argparse.Namespace,
                    inprocess: dict[int, float]) -> dict[tuple[str, int], Result]:
    """Every case in turn, ``--rounds`` times: a change in other load on the host hits all cases alike."""
    slice_s = args.seconds / args.rounds
    for r in range(args.rounds):
        for case in cases:
            headers = {"content-type": "application/json", **case.headers}
            lat, errors, elapsed, cpu = asyncio.run(_drive(case.url, case.body, headers, args.concurrency,
                                                           args.warmup if r == 0 else 0.2, slice_s,
                                                           args.max_requests // args.rounds, case.pids))
            case.latencies += lat
            case.errors += errors
            case.seconds += elapsed
            case.cpu += cpu
            case.loads.append(os.getloadavg()[0])
    results = {}
    for case in cases:
        res = results[case.key, case.batch] = case.result()
        print(f"{case.label:<28} batch {case.batch:>3}  {res.rps:8.0f} req/s  {res.rows_per_s:9.0f} rows/s  "
              f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:6.2f} ms  server CPU {res.cpu_ms:5.2f} ms/req  "
              f"{res.rps / inprocess[case.batch]:4.2f} of in-process  load {res.load:.1f}  "
              f"({res.requests} requests, {res.errors} errors)",
              flush=True)
        if res.errors:
            print(f"  WARNING: {res.errors} non-200 responses in {case.label}", flush=True)
    return results


# -- main -------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="hgb")
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per case (over all rounds)")
    p.add_argument("--rounds", type=int, default=4, help="cases are interleaved in this many rounds")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-requests", type=int, default=100_000, help="bound on requests per case")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--server-cpus", default="0", help="CPUs of the model server (and of the gateway by default)")
    p.add_argument("--gateway-cpus", default=None, help="CPUs of the gateway and the sink (default: --server-cpus)")
    p.add_argument("--client-cpus", default="1", help="CPUs of the load generator")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--no-mlserver", dest="mlserver", action="store_false",
                   help=f"leave out the MLServer peer (its venv: {MLSERVER_HOME}, made on first use)")
    p.add_argument("--no-kserve-route", dest="kserve_route", action="store_false",
                   help="leave out the predictor on kserve's own V2 route (what the fast V2 path saves)")
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
    use_model(args.model)
    model_uri, model = register_bench_model(tracking_uri, args.model)
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

    batches = [int(b) for b in args.batches.split(",")]
    bodies = {b: request_rows(b) for b in batches}
    inprocess = {}
    for b in batches:
        rate = inprocess[b] = inprocess_rate(model, bodies[b])
        print(f"{'in-process predict':<28} batch {b:>3}  {rate:8.0f} calls/s {rate * b:9.0f} rows/s", flush=True)
    procs: list[Proc] = []
    try:
        cases, gateway_port = start_servers(args, work, model_uri, tracking_uri, bodies, procs,
                                            (server_cpus, gateway_cpus), have_gateway)
        for proc in procs:
            proc.wait_ready()
        check_same_predictions(cases)
        results = run_interleaved(cases, args, inprocess)
        if gateway_port is not None:
            _report_logged(work / "inference.db", gateway_port)
    finally:
        for proc in reversed(procs):
            proc.stop()
    print_ratios(results, batches)


def start_servers(args: argparse.Namespace, work: Path, model_uri: str, tracking_uri: str,
                  bodies: dict[int, list[dict[str, Any]]], procs: list["Proc"], cpu_sets: tuple[set[int], set[int]],
                  have_gateway: bool) -> tuple[list["Case"], int | None]:
    """Start every server of the comparison (appended to ``procs`` as they start) and make the cases."""
    py, (server_cpus, gateway_cpus) = sys.executable, cpu_sets
    pa, pb, pk = free_port(), free_port(), free_port()
    procs.append(Proc([py, str(Path(__file__).resolve()), "_fastapi", model_uri, tracking_uri, str(pa)],
                      server_cpus, f"http://127.0.0.1:{pa}/ready", work / "fastapi.log"))
    predictor = [py, "-m", "serving.predictor", "--model-name", MODEL_NAME, "--model-uri", model_uri,
                 "--tracking-uri", tracking_uri]
    procs.append(Proc([*predictor, "--http-port", str(pb)], server_cpus, f"http://127.0.0.1:{pb}/v2/health/ready",
                      work / "predictor.log"))
    fastapi_pid, predictor_pid = procs[0].p.pid, procs[1].p.pid
    cases = []
    for b, rows in bodies.items():
        cases += [Case("a1", "(a) bare FastAPI V1", f"http://127.0.0.1:{pa}/predict", v1_body(rows), b, [], [fastapi_pid]),
                  Case("a2", "(a) bare FastAPI V2", f"http://127.0.0.1:{pa}/v2/predict", v2_body(rows), b, [],
                       [fastapi_pid])]
    cases += kserve_cases("b", "(b) KServe predictor", pb, bodies, [predictor_pid])
    if args.kserve_route:  # the same predictor with every V2 request on kserve's own (pydantic) route
        procs.append(Proc([*predictor, "--http-port", str(pk), "--kserve-v2-route"], server_cpus,
                          f"http://127.0.0.1:{pk}/v2/health/ready", work / "predictor-kserve-route.log"))
        cases += [c for c in kserve_cases("k", "(b') kserve's V2 route", pk, bodies, [procs[-1].p.pid])
                  if c.key == "k2"]
    # what the gateway asks of the predictor when it logs: the class scores too (for the quality estimate)
    cases += kserve_cases("s", "(b+) predictor + scores", pb, bodies, [predictor_pid],
                          headers={"x-driftloop-scores": "true"})
    gateway_port = None
    if have_gateway:
        ps, gateway_port = free_port(), free_port()
        os.environ["DRIFTLOOP_INGEST_TOKEN"] = "bench-serving-ingest"  # the sink refuses events without it
        procs.append(Proc([py, "-m", "monitoring.sink", "--store", str(work / "inference.db"), "--port", str(ps),
                           "--model", MODEL_NAME], gateway_cpus, f"http://127.0.0.1:{ps}/readyz", work / "sink.log"))
        procs.append(Proc([py, "-m", "serving.gateway", "--name", MODEL_NAME, "--port", str(gateway_port),
                           "--primary-url", f"http://127.0.0.1:{pb}", "--primary-version", model_uri.rsplit("/", 1)[1],
                           "--sink-url", f"http://127.0.0.1:{ps}/events"],
                          gateway_cpus, f"http://127.0.0.1:{gateway_port}/admin/status", work / "gateway.log"))
        cases += kserve_cases("c", "(c) gateway+logging", gateway_port, bodies,
                              [predictor_pid, procs[-2].p.pid, procs[-1].p.pid])
    if args.mlserver and CATEGORICAL:
        print("note: MLServer cases skipped: its sklearn runtime takes one numeric tensor (use --model hgb)")
    elif args.mlserver:
        import joblib
        import mlflow

        home = mlserver_home()
        model_file = work / "model.joblib"  # the registered model as MLflow loads it, in the runtime's format
        joblib.dump(mlflow.sklearn.load_model(model_uri), model_file)
        for key, tuned in (("m", False), ("t", True)):
            proc, port = mlserver_proc(home, work, model_file, tuned, server_cpus)
            procs.append(proc)
            label = f"(m) MLServer {'tuned' if tuned else 'stock'} V2"
            cases += [Case(key + "2", label, f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/infer",
                           mlserver_body(rows), b, [], [proc.p.pid]) for b, rows in bodies.items()]
    return cases, gateway_port


TARGETS = [("b/a V1", "b1", "a1", 0.90), ("b/a V2", "b2", "a2", 0.85), ("c/b V1", "c1", "b1", 0.80),
           ("c/b V2", "c2", "b2", 0.80), ("c/b+ V1", "c1", "s1", None), ("c/b+ V2", "c2", "s2", None),
           ("b2/b' (fast V2 path vs kserve's route)", "b2", "k2", None),
           ("b/MLServer tuned V2", "b2", "t2", 1.30), ("b/MLServer stock V2", "b2", "m2", None)]


def print_ratios(results: dict[tuple[str, int], "Result"], batches: list[int]) -> None:
    print(f"\nload average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other work on the host skews every case)")
    print("ratios            req/s   by server CPU per request   target")
    for b in batches:
        for name, num, den, target in TARGETS:
            if (num, b) not in results or (den, b) not in results:
                continue
            hi, lo = results[num, b], results[den, b]
            ratio = hi.rps / lo.rps
            verdict = "" if target is None else f">= {target:.2f}  {'met' if ratio >= target else 'MISSED'}"
            print(f"  batch {b:>3}  {name:<24}  {ratio:5.2f}   {lo.cpu_ms / hi.cpu_ms:5.2f}                       "
                  f"{verdict}")


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
    print(f"  inference log: {counts}; gateway: {'; '.join(dropped) or 'no event dropped'}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_fastapi":
        serve_fastapi(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
