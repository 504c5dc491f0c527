"""Distributed XGBoost training: the worker entrypoint and the local launcher.

Every worker runs :func:`run_worker` (``python -m components.distributed worker ...``): on a
cluster each node of a Kubeflow Trainer ``TrainJob`` (the ``xgboost-distributed`` runtime sets
``DMLC_TRACKER_URI``, ``DMLC_TRACKER_PORT``, ``DMLC_TASK_ID``, ``DMLC_NUM_WORKER``; the node with
task id 0 hosts the tracker), on the embedded default N local processes started by
:func:`launch_local` around a tracker process on 127.0.0.1. The workers join XGBoost's own
collective (``xgboost.collective.CommunicatorContext``): each reads only its shard of the
training rows, the quantile sketch and the gradient histograms of every round are allreduced
over TCP, and every rank ends with the same booster.

Encoding comes from the validate step's schema, not from the data a worker sees: numeric
columns pass through (XGBoost learns where gaps go), categorical columns are ordinal codes of
the schema's levels (unknown levels and gaps are missing) fed to XGBoost's native categorical
splits. The result is the same kind of model as the single-process train step: a scikit-learn
Pipeline taking raw rows, gaps included.

Rank 0 alone writes: checkpoints every ``checkpoint_rounds`` rounds, and at the end the model
(``model.joblib``) and the training record (``record.json``: workers, each worker's device and
rows, seconds per round) that the pipeline puts on the run's one MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from driftloop.core.errors import DriftloopError, TrainingError

__all__ = ["WORKER_MODULE", "DistributedResult", "build_encoder", "shard_bounds", "read_shard", "xgb_params",
           "run_worker", "launch_local", "train_distributed", "worker_command", "checkpoint_key", "load_record", "record_on_run",
           "MODEL_FILE", "RECORD_FILE"]

log = logging.getLogger(__name__)

WORKER_MODULE = "components.distributed"
MODEL_FILE = "model.joblib"
RECORD_FILE = "record.json"
# Set by the local launcher, which runs the tracker itself; on a TrainJob node 0 hosts it.
TRACKER_ENV = "DRIFTLOOP_TRACKER"
TRACKER_BIND_ENV = "DRIFTLOOP_TRACKER_BIND"  # where node 0's tracker listens; default every interface
DMLC_ENV = ("DMLC_TRACKER_URI", "DMLC_TRACKER_PORT", "DMLC_TASK_ID", "DMLC_NUM_WORKER")
EXIT_USER_ERROR = 3


# --- storage: local paths or fsspec URIs (s3://, gs://; KFP's minio:// is S3) ----------------
def _uri(uri: str) -> str:
    return "s3://" + uri[len("minio://"):] if uri.startswith("minio://") else uri


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _fs(uri: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(_uri(uri))
    return fs, path


def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = _fs(uri)
    parent = path.rsplit("/", 1)[0]
    with contextlib.suppress(Exception):
        fs.makedirs(parent, exist_ok=True)
    tmp = path + ".part"
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)  # a reader never sees half a file


def _read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    with fs.open(path, "rb") as fh:
        return fh.read()


# --- data ------------------------------------------------------------------------------------
def shard_bounds(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) of a rank: contiguous, sizes differ by at most one, none empty when rows >= world."""
    return rank * rows // world, (rank + 1) * rows // world


def read_shard(uri: str, rank: int, world: int) -> tuple[pd.DataFrame, int]:
    """This rank's rows of a parquet file, reading only the row groups that hold them. Returns (shard, total rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = _fs(uri)
    try:
        pf = pq.ParquetFile(fs.open(path, "rb"))
    except (OSError, pa.ArrowException) as exc:
        raise TrainingError(f"cannot read the training data {uri!r}: {exc}") from exc
    total = pf.metadata.num_rows
    start, end = shard_bounds(total, rank, world)
    pieces, offset = [], 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < end and offset + n > start:
            table = pf.read_row_group(g)
            pieces.append(table.slice(max(start - offset, 0), min(end, offset + n) - max(start, offset)))
        offset += n
    if not pieces:
        return pf.schema_arrow.empty_table().to_pandas(), total
    return pa.concat_tables(pieces).to_pandas(), total


def build_encoder(schema: dict[str, Any]):
    """The feature encoder every worker builds alike from the schema (fitted on no data of its own)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OrdinalEncoder

    numeric, categorical = list(schema["numeric"]), list(schema["categorical"])
    parts: list[tuple[str, Any, list[str]]] = []
    if numeric:
        parts.append(("num", "passthrough", numeric))
    if categorical:
        levels = [list(map(str, schema.get("levels", {}).get(c, []))) or ["__none__"] for c in categorical]
        parts.append(("cat", OrdinalEncoder(categories=levels, handle_unknown="use_encoded_value", unknown_value=np.nan,
                                            encoded_missing_value=np.nan, dtype=np.float64), categorical))
    enc = ColumnTransformer(parts, remainder="drop", verbose_feature_names_out=False)
    blank = {c: pd.Series([np.nan], dtype="float64") for c in numeric}
    blank.update({c: pd.Series([None], dtype=object) for c in categorical})
    return enc.fit(pd.DataFrame(blank))


def feature_types(schema: dict[str, Any]) -> list[str]:
    return ["q"] * len(schema["numeric"]) + ["c"] * len(schema["categorical"])


def xgb_params(task: str, params: dict[str, Any], n_classes: int, device: str) -> tuple[dict[str, Any], int]:
    """Booster parameters and number of rounds from the learner's (sklearn-style) parameters."""
    params = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (params or {}).items()}
    rounds = int(params.pop("n_estimators", 200))
    seed = params.pop("random_state", 0)
    params.pop("n_jobs", None)
    out: dict[str, Any] = {"tree_method": "hist", "device": device, "seed": seed, **params}
    if task == "classification":
        if n_classes > 2:
            out.setdefault("objective", "multi:softprob")
            out["num_class"] = n_classes
        else:
            out.setdefault("objective", "binary:logistic")
    else:
        out.setdefault("objective", "reg:squarederror")
    return out, rounds


def _labels(y: pd.Series, task: str, schema: dict[str, Any], target: str) -> tuple[np.ndarray, int]:
    if task != "classification":
        return pd.to_numeric(y, errors="coerce").to_numpy(dtype=np.float64), 0
    classes = list(schema.get("classes") or [])
    if classes != list(range(len(classes))):
        raise TrainingError(f"learner 'xgboost' needs class labels 0..n-1; target {target!r} has {classes[:10]}")
    return y.to_numpy(dtype=np.float64), len(classes)


def checkpoint_key(train_uri: str, schema: dict[str, Any], settings: dict[str, Any]) -> str:
    """Names a run's checkpoints by what it trains on: a rerun on the same data and settings resumes."""
    h = hashlib.sha256()
    fs, path = _fs(train_uri)
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps([schema, settings], sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


# --- the worker --------------------------------------------------------------------------------
def _checkpoints(base: str) -> list[tuple[int, str]]:
    fs, path = _fs(base)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        stem = str(name).rstrip("/").rsplit("/", 1)[-1]
        if stem.startswith("round-") and stem.endswith(".ubj"):
            found.append((int(stem[6:-4]), _join(base, stem)))
    return sorted(found)


class _RoundClock:
    """Wall time per round on every rank; rank 0 checkpoints every ``every`` rounds."""

    def __init__(self, rank: int, every: int, checkpoints: str | None):
        import xgboost as xgb

        clock = self

        class Callback(xgb.callback.TrainingCallback):
            def before_iteration(self, model, epoch, evals_log):  # noqa: ANN001
                clock.t0 = time.perf_counter()
                return False

            def after_iteration(self, model, epoch, evals_log):  # noqa: ANN001
                clock.seconds.append(time.perf_counter() - clock.t0)
                done = model.num_boosted_rounds()
                if rank == 0 and checkpoints and done % every == 0:
                    _write_bytes(_join(checkpoints, f"round-{done:06d}.ubj"), bytes(model.save_raw("ubj")))
                return False

        self.t0 = 0.0
        self.seconds: list[float] = []
        self.callback = Callback()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _tcp_bytes() -> tuple[int, int]:
    """Bytes acknowledged as sent and bytes received on this process's TCP sockets (Linux ``TCP_INFO``).

    The collective's sockets are XGBoost's own; they are found through ``/proc/self/fd``.
    """
    import socket
    import struct

    sent = received = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0, 0
    for name in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except OSError:
            continue
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            if len(info) >= 136:  # tcpi_bytes_acked at 120, tcpi_bytes_received at 128 (Linux >= 4.1)
                a, r = struct.unpack_from("QQ", info, 120)
                sent, received = sent + a, received + r
        except OSError:
            pass
        finally:
            s.close()  # closes the duplicate only
    return sent, received


def _host_tracker(world: int) -> Any:
    """Node 0 of a TrainJob hosts the tracker on the port the runtime gave every node (the others reach it
    at ``DMLC_TRACKER_URI``, node 0's address); it listens on every interface, as the runtime's guide does."""
    from xgboost.tracker import RabitTracker

    port = int(os.environ["DMLC_TRACKER_PORT"])
    bind = os.environ.get(TRACKER_BIND_ENV, "0.0.0.0")
    tracker = RabitTracker(n_workers=world, host_ip=bind, port=port, sortby="task")
    tracker.start()
    return tracker


def _dmlc_env() -> dict[str, str]:
    missing = [k for k in DMLC_ENV if not os.environ.get(k)]
    if missing:
        raise TrainingError(f"worker started without {', '.join(missing)} (set by the xgboost-distributed runtime "
                            "or the local launcher)")
    return {k: os.environ[k] for k in DMLC_ENV}


def run_worker(*, train: str, schema_uri: str, out: str, checkpoints: str | None, target: str, task: str,
               params: dict[str, Any], device: str, checkpoint_rounds: int, rank_boosters: str | None = None) -> None:
    """One rank of a distributed training run (see the module doc)."""
    from xgboost import collective

    from components.train import resolve_device

    env = _dmlc_env()
    world = int(env["DMLC_NUM_WORKER"])
    tracker = _host_tracker(world) if env["DMLC_TASK_ID"] == "0" and os.environ.get(TRACKER_ENV) != "external" else None
    schema = json.loads(_read_bytes(schema_uri))
    used = resolve_device("xgboost", device)
    args = {"dmlc_communicator": "rabit", "dmlc_tracker_uri": env["DMLC_TRACKER_URI"],
            "dmlc_tracker_port": int(env["DMLC_TRACKER_PORT"]), "dmlc_task_id": env["DMLC_TASK_ID"]}
    with collective.CommunicatorContext(**args):
        try:
            _train_in_group(train=train, schema=schema, out=out, checkpoints=checkpoints, target=target, task=task,
                            params=params, used=used, checkpoint_rounds=checkpoint_rounds, rank_boosters=rank_boosters)
        except BaseException as exc:  # noqa: BLE001
            # Leave at once: a rank that finalizes the group alone would wait for the others forever.
            _die(exc)
    if tracker is not None:
        tracker.wait_for(60)


def _die(exc: BaseException) -> None:
    rank = os.environ.get("DMLC_TASK_ID", "?")
    if isinstance(exc, DriftloopError):
        line, code = str(exc), EXIT_USER_ERROR
    else:
        text = str(exc).strip()
        line, code = f"{type(exc).__name__}: {(text.splitlines()[0] if text else '')[:300]}", 1
    print(f"driftloop worker {rank} failed: {line}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _train_in_group(*, train: str, schema: dict[str, Any], out: str, checkpoints: str | None, target: str, task: str,
                    params: dict[str, Any], used: str, checkpoint_rounds: int, rank_boosters: str | None) -> None:
    import xgboost as xgb
    from xgboost import collective

    from components.train import prepare_features

    rank, world = collective.get_rank(), collective.get_world_size()
    frame, sizes, on_gpu = _group_shard(train, target, used, rank, world)
    y, n_classes = _labels(frame[target], task, schema, target)
    encoder = build_encoder(schema)
    X = encoder.transform(prepare_features(frame, schema["numeric"], schema["categorical"]))
    del frame
    booster_params, rounds = xgb_params(task, params, n_classes, used)
    dtrain = xgb.QuantileDMatrix(X, label=y, feature_types=feature_types(schema), enable_categorical=True)
    del X
    start_model, done = _resume(checkpoints, rank, rounds)
    clock = _RoundClock(rank, checkpoint_rounds, checkpoints)
    sent0, received0 = _tcp_bytes()
    started = time.perf_counter()
    try:
        booster = xgb.train(booster_params, dtrain, num_boost_round=max(rounds - done, 0), xgb_model=start_model,
                            callbacks=[clock.callback])
    except xgb.core.XGBoostError as exc:
        raise TrainingError(f"training failed on worker {rank}: {str(exc).splitlines()[0]}") from exc
    seconds = time.perf_counter() - started
    sent1, received1 = _tcp_bytes()
    raw_model = bytes(booster.save_raw("ubj"))
    digest = _same_booster(raw_model, world)
    if rank_boosters:
        _write_bytes(_join(rank_boosters, f"rank-{rank}.ubj"), raw_model)
    per_round, stats = _group_stats(clock.seconds, rank, world, sent1 - sent0, received1 - received0)
    if rank == 0:
        record = {
            "workers": world,
            "devices": ["cuda" if on_gpu[r] else "cpu" for r in range(world)],
            "rows": [int(s) for s in sizes],
            "rounds": booster.num_boosted_rounds(),
            "resumed_from_round": done,
            "round_seconds": [float(v) for v in per_round.max(axis=0)][:len(clock.seconds)],
            "seconds": seconds,
            "booster_sha256": digest,
            # measured on each worker: peak resident memory, and bytes its TCP sockets sent/received per round
            "peak_rss_mb": [round(float(v), 1) for v in stats[:, 0]],
            "bytes_sent_per_round": [int(v) for v in stats[:, 1]],
            "bytes_received_per_round": [int(v) for v in stats[:, 2]],
        }
        _write_model(out, raw_model, encoder, schema, task, used, record)
        print(f"worker 0: {record['rounds']} rounds on {world} workers in {seconds:.2f}s", flush=True)


def _group_shard(train: str, target: str, used: str, rank: int, world: int
                 ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """This rank's labelled rows, and every rank's row count and device (1.0 = GPU), shared over the group."""
    from xgboost import collective

    frame, total = read_shard(train, rank, world)
    if total < world:
        raise TrainingError(f"{world} workers but only {total} training rows: each worker needs at least one row")
    frame = frame[frame[target].notna()] if target in frame.columns else frame
    sizes = np.zeros(world, dtype=np.float64)
    sizes[rank] = len(frame)
    on_gpu = np.zeros(world, dtype=np.float64)
    on_gpu[rank] = 1.0 if used == "cuda" else 0.0
    sizes = collective.allreduce(sizes, collective.Op.SUM)
    on_gpu = collective.allreduce(on_gpu, collective.Op.SUM)
    empty = [r for r in range(world) if sizes[r] == 0]
    if empty:
        raise TrainingError(f"the shard of worker {empty[0]} is empty ({total} rows over {world} workers, "
                            "none with a label): use fewer workers")
    if target not in frame.columns:
        raise TrainingError(f"target column {target!r} is not in the training data")
    return frame, sizes, on_gpu


def _resume(checkpoints: str | None, rank: int, rounds: int) -> tuple[Any, int]:
    """Rank 0 finds the last checkpoint and hands it to every rank: (booster to go on from or None, rounds done)."""
    import xgboost as xgb
    from xgboost import collective

    saved = _checkpoints(checkpoints) if rank == 0 and checkpoints else []
    latest = saved[-1] if saved else None
    raw = collective.broadcast(_read_bytes(latest[1]) if latest else b"", 0)
    start_model = xgb.Booster(model_file=bytearray(raw)) if raw else None
    done = start_model.num_boosted_rounds() if start_model is not None else 0
    if done:
        print(f"worker {rank}: resuming from the checkpoint at round {done} of {rounds}", flush=True)
    return start_model, done


def _same_booster(raw_model: bytes, world: int) -> str:
    """The booster's SHA-256, checked equal on every rank (else the collective is broken)."""
    from xgboost import collective

    digest = hashlib.sha256(raw_model).hexdigest()
    digests = [collective.broadcast(digest, r) for r in range(world)]
    if len(set(digests)) != 1:
        raise TrainingError(f"workers ended with different boosters ({digests}); the collective is broken")
    return digest


def _group_stats(round_seconds: list[float], rank: int, world: int, sent: int, received: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's seconds per round, and its peak memory and TCP bytes sent and received per round."""
    from xgboost import collective

    per_round = np.zeros((world, max(len(round_seconds), 1)), dtype=np.float64)
    per_round[rank, :len(round_seconds)] = round_seconds
    per_round = collective.allreduce(per_round, collective.Op.SUM).reshape(per_round.shape)
    n_rounds = max(len(round_seconds), 1)
    stats = np.zeros((world, 3), dtype=np.float64)
    stats[rank] = [_peak_rss_mb(), sent / n_rounds, received / n_rounds]
    stats = collective.allreduce(stats, collective.Op.SUM).reshape(stats.shape)
    return per_round, stats


def _write_model(out: str, raw_model: bytes, encoder: Any, schema: dict[str, Any], task: str, used: str,
                 record: dict[str, Any]) -> None:
    """Rank 0's model (the encoder and the booster as one scikit-learn Pipeline) and the training record."""
    import io

    import joblib
    import xgboost as xgb
    from sklearn.pipeline import Pipeline

    est = (xgb.XGBClassifier if task == "classification" else xgb.XGBRegressor)(
        feature_types=feature_types(schema), enable_categorical=True, device=used)
    est.load_model(bytearray(raw_model))
    model = Pipeline([("prepare", encoder), ("model", est)])
    buf = io.BytesIO()
    joblib.dump(model, buf)
    _write_bytes(_join(out, MODEL_FILE), buf.getvalue())
    _write_bytes(_join(out, RECORD_FILE), json.dumps(record).encode())


def worker_command(*, train: str, schema_uri: str, out: str, checkpoints: str | None, target: str, task: str,
                   params: dict[str, Any], device: str, checkpoint_rounds: int, rank_boosters: str | None = None,
                   python: str = "python") -> list[str]:
    """The worker's command line: what a TrainJob node and a local worker process both run."""
    cmd = [python, "-m", WORKER_MODULE, "worker", "--train", train, "--schema", schema_uri, "--out", out,
           "--target", target, "--task", task, "--params", json.dumps(params, sort_keys=True), "--device", device,
           "--checkpoint-rounds", str(checkpoint_rounds)]
    if checkpoints:
        cmd += ["--checkpoints", checkpoints]
    if rank_boosters:
        cmd += ["--rank-boosters", rank_boosters]
    return cmd


# --- the local launcher ------------------------------------------------------------------------
@dataclass
class DistributedResult:
    """What a distributed run produced: the model and its training record."""

    model: Any
    record: dict[str, Any]
    device: str
    seconds: float
    logs: dict[int, str] = field(default_factory=dict)


def load_record(out: str) -> tuple[Any, dict[str, Any]]:
    import io

    import joblib

    record = json.loads(_read_bytes(_join(out, RECORD_FILE)))
    return joblib.load(io.BytesIO(_read_bytes(_join(out, MODEL_FILE)))), record


def _parquet_rows(uri: str) -> int:
    import pyarrow.parquet as pq

    fs, path = _fs(uri)
    with fs.open(path, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def _port_taken(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _gpu_count() -> int:
    from components.train import cuda_visible

    if not cuda_visible():
        return 0
    import subprocess

    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU"))


def _why(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


def _last_error(log_path: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith("driftloop worker"):
            return ln.split(": ", 1)[-1]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[-300:]
    return lines[-1][-300:] if lines else ""


def launch_local(*, train: str, schema_uri: str, work_dir: str | Path, workers: int, target: str, task: str,
                 params: dict[str, Any], device: str = "auto", checkpoint_rounds: int = 10,
                 checkpoints: str | None = None, timeout: float = 3600.0, tracker_port: int = 0,
                 rank_boosters: bool = False, echo: Callable[[str], None] = print,
                 on_started: Callable[[list[Any]], None] | None = None) -> DistributedResult:
    """Train on ``workers`` local processes joined by XGBoost's collective around a tracker on 127.0.0.1.

    Every process started here dies with this one; a worker that fails stops the others and
    raises one :class:`TrainingError` naming the worker and why. Nothing is written to ``work_dir``'s
    model unless every worker finished.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    port, gpus = _check_local_launch(train, workers, tracker_port, device)
    out = str(work / "out")
    for stale in (work / "out" / MODEL_FILE, work / "out" / RECORD_FILE):
        stale.unlink(missing_ok=True)
    procs: list[Any] = []
    logs = {r: work / f"worker-{r}.log" for r in range(workers)}
    started = time.perf_counter()
    try:
        _start_tracker(procs, work / "tracker.log", workers, port, timeout)
        cmd = worker_command(train=train, schema_uri=schema_uri, out=out, checkpoints=checkpoints, target=target,
                             task=task, params=params, device=device, checkpoint_rounds=checkpoint_rounds,
                             rank_boosters=str(work / "boosters") if rank_boosters else None, python=sys.executable)
        workers_p = _start_workers(procs, cmd, logs, port, gpus)
        if on_started is not None:
            on_started(workers_p)
        _wait_workers(workers_p, logs, timeout)
        model, record = load_record(out)
    finally:
        texts = _stop_all(procs, logs, echo)
    devices = set(record["devices"])
    return DistributedResult(model, record, "cuda" if devices == {"cuda"} else ("mixed" if len(devices) > 1 else "cpu"),
                             time.perf_counter() - started, texts)


def _check_local_launch(train: str, workers: int, tracker_port: int, device: str) -> tuple[int, int]:
    """Refuse a local run that cannot work, before anything starts: (tracker port, GPUs to hand out)."""
    from driftloop.core.processes import free_port

    if workers < 1:
        raise TrainingError(f"model.distributed.workers must be at least 1, not {workers}")
    rows = _parquet_rows(train)
    if workers > rows:
        raise TrainingError(f"model.distributed.workers={workers} is more than the {rows} training rows")
    if tracker_port and _port_taken("127.0.0.1", tracker_port):
        raise TrainingError(f"tracker port 127.0.0.1:{tracker_port} is taken (model.distributed.tracker_port); "
                            "free it or set 0 for a free port")
    port = tracker_port or free_port()
    gpus = _gpu_count() if device in ("auto", "cuda") else 0
    if device == "cuda" and gpus < workers:
        raise TrainingError(f"model.device 'cuda' with {workers} local workers needs {workers} GPUs; {gpus} visible "
                            "(two ranks cannot share one GPU)")
    return port, gpus


def _start_tracker(procs: list[Any], log_path: Path, workers: int, port: int, timeout: float) -> None:
    """The collective's tracker process (added to ``procs``), once it listens on 127.0.0.1:``port``."""
    from driftloop.core.processes import spawn

    with open(log_path, "wb") as fh:
        tracker = spawn([sys.executable, "-m", WORKER_MODULE, "tracker", "--workers", str(workers),
                         "--port", str(port), "--timeout", str(int(timeout))], stdout=fh, stderr=subprocess_stdout())
    procs.append(tracker)
    deadline = time.monotonic() + 30
    while not _port_taken("127.0.0.1", port):
        if tracker.poll() is not None:
            raise TrainingError(f"the tracker could not listen on 127.0.0.1:{port} ({_why(tracker.returncode)}): "
                                f"{_last_error(log_path)}")
        if time.monotonic() > deadline:
            raise TrainingError(f"the tracker did not listen on 127.0.0.1:{port} within 30 s")
        time.sleep(0.02)


def _start_workers(procs: list[Any], cmd: list[str], logs: dict[int, Path], port: int, gpus: int) -> list[Any]:
    """One worker process per rank (each added to ``procs``), its output to ``logs[rank]``."""
    from driftloop.core.processes import spawn

    workers = len(logs)
    started = []
    for r in range(workers):
        env = {**os.environ, TRACKER_ENV: "external", "DMLC_TRACKER_URI": "127.0.0.1",
               "DMLC_TRACKER_PORT": str(port), "DMLC_TASK_ID": str(r), "DMLC_NUM_WORKER": str(workers),
               "PYTHONUNBUFFERED": "1",
               # share the cores: spinning OpenMP threads of N ranks on the same cores stall every allreduce
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
        if gpus:  # one GPU per rank; ranks beyond the GPUs run on the CPU
            env["CUDA_VISIBLE_DEVICES"] = str(r) if r < gpus else ""
        with open(logs[r], "wb") as fh:
            p = spawn(cmd, stdout=fh, stderr=subprocess_stdout(), env=env)
        started.append(p)
        procs.append(p)
    return started


def _wait_workers(workers_p: list[Any], logs: dict[int, Path], timeout: float) -> None:
    """Until every worker exits 0; the first failure (a killed rank before the ranks it broke) is raised."""
    workers = len(workers_p)
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in workers_p]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            # A rank killed by a signal is the cause; the others fail after it on a broken connection.
            r, code = sorted(failed, key=lambda rc: (rc[1] >= 0, rc[0]))[0]
            detail = _last_error(logs[r])
            raise TrainingError(f"distributed training failed: worker {r} of {workers} {_why(code)}"
                                + (f": {detail}" if detail and code > 0 else "") + "; nothing was registered")
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            raise TrainingError(f"distributed training did not finish within {timeout:.0f} s "
                                "(model.distributed.timeout_seconds)")
        time.sleep(0.05)


def _stop_all(procs: list[Any], logs: dict[int, Path], echo: Callable[[str], None]) -> dict[int, str]:
    """Stop what still runs; echo the last lines of each worker's log and return the logs."""
    from driftloop.core.processes import stop_process

    for p in procs:
        if p.poll() is None:
            stop_process(p.pid, timeout=5)
        with contextlib.suppress(Exception):
            p.wait(timeout=5)
    texts = {}
    for r, path in logs.items():
        with contextlib.suppress(OSError):
            texts[r] = path.read_text(errors="replace")
    for r, text in texts.items():
        for line in text.splitlines()[-20:]:
            echo(f"[worker {r}] {line}")
    return texts


def _default_checkpoints(model_path: str, model_uri: str, on_cluster: bool) -> str:
    """Where a run's checkpoints live unless ``model.distributed.checkpoint_uri`` says: beside the pipeline's
    artifacts, so that a rerun of the same training finds them."""
    if on_cluster:
        marker = "/v2/artifacts/"
        return (model_uri.split(marker, 1)[0] if marker in model_uri else model_uri.rsplit("/", 1)[0]) + \
            "/driftloop-checkpoints"
    # kfp.local: <pipeline_root>/<run>/<task>/<artifact>
    return str(Path(model_path).resolve().parents[2] / "driftloop-checkpoints")


def train_distributed(*, train_uri: str, train_path: str, schema_uri: str, schema_path: str, model_path: str,
                      model_uri: str, target: str, task: str, learner: str, params: dict[str, Any], device: str,
                      distributed: dict[str, Any], echo: Callable[[str], None] = print) -> DistributedResult:
    """The launcher the train step becomes when ``model.distributed.workers > 1``.

    On Kubernetes (inside a pipeline pod) a Kubeflow Trainer ``TrainJob``; on the embedded
    default N local worker processes. Either way the workers run :func:`run_worker`.
    """
    if learner != "xgboost":
        raise TrainingError(f"distributed training needs model.learner 'xgboost', not {learner!r}")
    workers = int(distributed.get("workers", 1))
    on_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    with open(schema_path) as fh:
        schema = json.load(fh)
    settings = {"workers": workers, "target": target, "task": task, "params": params, "device": device}
    key = checkpoint_key(train_path, schema, settings)
    base = str(distributed.get("checkpoint_uri") or "") or _default_checkpoints(model_path, model_uri, on_cluster)
    checkpoints = _join(base, key)
    rounds_every = int(distributed.get("checkpoint_rounds", 10))
    timeout = int(distributed.get("timeout_seconds", 3600))
    if on_cluster:
        result = _train_on_trainjob(train_uri=train_uri, schema_uri=schema_uri, model_uri=model_uri,
                                    checkpoints=checkpoints, key=key, target=target, task=task, params=params,
                                    device=device, distributed=distributed, echo=echo)
    else:
        result = launch_local(train=train_path, schema_uri=schema_path, work_dir=model_path + ".work", workers=workers,
                              target=target, task=task, params=params, device=device,
                              checkpoint_rounds=rounds_every, checkpoints=checkpoints, timeout=timeout,
                              tracker_port=int(distributed.get("tracker_port", 0)), echo=echo)
    _drop_checkpoints(checkpoints)  # done: a rerun starts afresh
    return result


def _drop_checkpoints(uri: str) -> None:
    try:
        fs, path = _fs(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as exc:  # noqa: BLE001 - leftovers only cost storage; the model is written
        log.warning("could not delete the checkpoints at %s: %s", uri, exc)


def _train_on_trainjob(*, train_uri: str, schema_uri: str, model_uri: str, checkpoints: str, key: str, target: str,
                       task: str, params: dict[str, Any], device: str, distributed: dict[str, Any],
                       echo: Callable[[str], None]) -> DistributedResult:
    import uuid

    from components.trainjob import TrainJobLauncher, TrainJobSpec, in_cluster_namespace, render_trainjob
    from driftloop.core.config import DEFAULT_IMAGE

    started = time.perf_counter()
    namespace = str(distributed.get("namespace") or "") or in_cluster_namespace()
    out = _uri(model_uri) + ".distributed"
    cmd = worker_command(train=_uri(train_uri), schema_uri=_uri(schema_uri), out=out, checkpoints=_uri(checkpoints),
                         target=target, task=task, params=params, device=device,
                         checkpoint_rounds=int(distributed.get("checkpoint_rounds", 10)))
    launcher = TrainJobLauncher.in_cluster(echo=echo)
    runtime = str(distributed.get("runtime") or "xgboost-distributed")
    passthrough = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                                               "MLFLOW_S3_ENDPOINT_URL") if os.environ.get(k)}
    spec = TrainJobSpec(
        name=f"driftloop-train-{key[:8]}-{uuid.uuid4().hex[:6]}", namespace=namespace,
        image=str(distributed.get("image") or DEFAULT_IMAGE), command=cmd, nodes=int(distributed["workers"]),
        gpus_per_node=int(distributed.get("gpus_per_worker", 0)), runtime=runtime,
        runtime_kind=launcher.runtime_kind(namespace, runtime), queue_name=distributed.get("queue_name") or None,
        active_deadline_seconds=int(distributed.get("timeout_seconds", 3600)),
        cpu=str(distributed.get("cpu", "2")), memory=str(distributed.get("memory", "4G")),
        secret=distributed.get("secret") or None, env=passthrough,
        toleration_key=distributed.get("toleration_key") or None,
        node_selector=dict(distributed.get("node_selector") or {}))
    launcher.run(render_trainjob(spec))
    model, record = load_record(out)
    devices = set(record["devices"])
    return DistributedResult(model, record, "cuda" if devices == {"cuda"} else ("mixed" if len(devices) > 1 else "cpu"),
                             time.perf_counter() - started)


def subprocess_stdout() -> int:
    import subprocess

    return subprocess.STDOUT


def record_on_run(tracking_uri: str, run_id: str, record: dict[str, Any]) -> None:
    """Put a distributed training record on the pipeline run's MLflow run: workers, devices, time per round."""
    from mlflow.entities import Metric, Param

    from driftloop.core.registry import Registry

    registry = Registry(tracking_uri)
    client = registry.client
    now = int(time.time() * 1000)
    base = int(record.get("resumed_from_round", 0))
    params = [Param("distributed.workers", str(int(record["workers"]))),
              Param("distributed.devices", ",".join(record["devices"])),
              Param("distributed.rows_per_worker", ",".join(str(int(r)) for r in record["rows"])),
              Param("distributed.resumed_from_round", str(base))]
    for key in ("peak_rss_mb", "bytes_sent_per_round"):
        if record.get(key):
            params.append(Param(f"distributed.{key}", ",".join(str(v) for v in record[key])))
    metrics = [Metric("distributed.round_seconds", float(v), now, base + i + 1)
               for i, v in enumerate(record["round_seconds"])]
    metrics.append(Metric("distributed.train_seconds", float(record["seconds"]), now, 0))
    with registry.translate_errors("cannot record the distributed training on the run"):
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i:i + 900], params=params if i == 0 else [])
        client.set_tag(run_id, "driftloop.workers", str(int(record["workers"])))


# --- command line: the worker and the local tracker -----------------------------------------------
def _tracker_main(workers: int, port: int, timeout: int) -> None:
    from xgboost.tracker import RabitTracker

    tracker = RabitTracker(n_workers=workers, host_ip="127.0.0.1", port=port, sortby="task")
    tracker.start()
    print(f"tracker listening on 127.0.0.1:{port} for {workers} workers", flush=True)
    tracker.wait_for(timeout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="one rank of a distributed training run (DMLC_* from the environment)")
    w.add_argument("--train", required=True)
    w.add_argument("--schema", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--checkpoints")
    w.add_argument("--target", required=True)
    w.add_argument("--task", required=True, choices=["classification", "regression"])
    w.add_argument("--params", default="{}")
    w.add_argument("--device", default="auto")
    w.add_argument("--checkpoint-rounds", type=int, default=10)
    w.add_argument("--rank-boosters")
    t = sub.add_parser("tracker", help="the collective's tracker on 127.0.0.1 (local runs)")
    t.add_argument("--workers", type=int, required=True)
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--timeout", type=int, default=3600)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if a.cmd == "tracker":
            _tracker_main(a.workers, a.port, a.timeout)
        else:
            run_worker(train=a.train, schema_uri=a.schema, out=a.out, checkpoints=a.checkpoints, target=a.target,
                       task=a.task, params=json.loads(a.params), device=a.device, checkpoint_rounds=a.checkpoint_rounds,
                       rank_boosters=a.rank_boosters)
    except DriftloopError as exc:
        rank = os.environ.get("DMLC_TASK_ID", "?")
        print(f"driftloop worker {rank} failed: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except Exception as exc:  # the collective's and XGBoost's own errors: one line, not a traceback
        rank = os.environ.get("DMLC_TASK_ID", "?")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"driftloop worker {rank} failed: {type(exc).__name__}: {first[:300]}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
