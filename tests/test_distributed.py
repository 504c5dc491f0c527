"""Distributed training: XGBoost's collective over N local worker processes (the same entrypoint
a Kubeflow Trainer TrainJob's nodes run), the TrainJob the cluster launcher renders and drives,
and the pipeline's train step as a launcher.

The local runs are real: separate processes, a RabitTracker on 127.0.0.1, allreduce over TCP.
The cluster side is checked by what would be sent: the TrainJob parsed by the
``kubeflow-trainer-api`` models, and the launcher against a recording stand-in for
``CustomObjectsApi`` that answers scripted statuses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.distributed import launch_local, shard_bounds
from components.trainjob import QUEUE_LABEL, TrainJobLauncher, TrainJobSpec, render_trainjob, trainer_models_check
from components.train import train_model
from components.validate import infer_schema
from driftloop.core.errors import TrainingError
from driftloop.core.processes import process_alive
from tests.conftest import make_settings

FEATURES_DROP = ["label", "event_time"]


def _split(df: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    test = df.sample(frac=0.25, random_state=seed)
    return df.drop(test.index).reset_index(drop=True), test.reset_index(drop=True)


def _write(tmp: Path, train: pd.DataFrame, task: str, target: str = "label") -> tuple[str, str, dict]:
    schema = infer_schema(train, target, task, "event_time" if "event_time" in train.columns else None)
    train.to_parquet(tmp / "train.parquet", index=False)
    (tmp / "schema.json").write_text(json.dumps(schema, default=str))
    return str(tmp / "train.parquet"), str(tmp / "schema.json"), json.loads((tmp / "schema.json").read_text())


@pytest.fixture(scope="module")
def churn():
    from driftloop.app.scenario import generate

    df = generate("classification", 4000)
    df = df[df["event_time"] < df["event_time"].min() + pd.Timedelta(days=30)]  # before the drift
    df.loc[df.sample(frac=0.05, random_state=1).index, "region"] = None  # gaps in a categorical column too
    return _split(df.reset_index(drop=True))


# --- the collective on local processes --------------------------------------------------------------
def test_shards_are_contiguous_disjoint_and_never_empty():
    for rows, world in [(10, 3), (7, 7), (1_000_001, 4)]:
        bounds = [shard_bounds(rows, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(end > start for start, end in bounds)


def test_a_worker_reads_only_the_row_groups_of_its_shard(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from components.distributed import read_shard

    df = pd.DataFrame({"x": np.arange(1000, dtype="float64"), "label": np.arange(1000) % 2})
    df.to_parquet(tmp_path / "t.parquet", index=False, row_group_size=100)
    read: list[int] = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: read.append(i) or original(self, i, *a, **k))
    shard, total = read_shard(str(tmp_path / "t.parquet"), 1, 3)  # rows 333..665
    assert total == 1000 and shard["x"].tolist() == list(map(float, range(333, 666)))
    assert read == [3, 4, 5, 6]


def test_two_workers_match_one_process_and_end_with_identical_boosters(tmp_path, churn):
    from sklearn.metrics import roc_auc_score

    train, test = churn
    path, schema_path, schema = _write(tmp_path, train, "classification")
    params = {"n_estimators": 60, "max_depth": 4, "learning_rate": 0.1}
    lines: list[str] = []
    result = launch_local(train=path, schema_uri=schema_path, work_dir=tmp_path / "work", workers=2, target="label",
                          task="classification", params=params, checkpoint_rounds=20,
                          checkpoints=str(tmp_path / "ckpt"), rank_boosters=True, echo=lines.append)
    single = train_model(train, target="label", task="classification", numeric=schema["numeric"],
                         categorical=schema["categorical"], learner="xgboost", params=params, device="cpu")
    X = test.drop(columns=FEATURES_DROP)
    auc_dist = roc_auc_score(test["label"], result.model.predict_proba(X)[:, 1])
    auc_single = roc_auc_score(test["label"], single.model.predict_proba(X)[:, 1])
    assert auc_dist > 0.7 and abs(auc_dist - auc_single) <= 0.01, (auc_dist, auc_single)

    # every rank ends with the very same booster; each trained on its own half of the rows
    boosters = tmp_path / "work" / "boosters"
    assert (boosters / "rank-0.ubj").read_bytes() == (boosters / "rank-1.ubj").read_bytes()
    rec = result.record
    assert rec["workers"] == 2 and rec["devices"] == ["cpu", "cpu"] and rec["rounds"] == 60
    assert rec["rows"] == [len(train) // 2, len(train) - len(train) // 2]
    assert len(rec["round_seconds"]) == 60 and all(s > 0 for s in rec["round_seconds"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["round-000020.ubj", "round-000040.ubj",
                                                                     "round-000060.ubj"]
    assert any(line.startswith("[worker 1] ") for line in lines)

    # the model takes raw rows like today's: gaps, an unseen level, columns as serving sends them
    raw = X.head(3).copy()
    raw.loc[raw.index[0], "monthly_spend"] = None
    raw.loc[raw.index[1], "region"] = "atlantis"
    raw.loc[raw.index[2], "plan"] = None
    proba = result.model.predict_proba(raw)
    assert proba.shape == (3, 2) and np.isfinite(proba).all()


def test_regression_two_workers_within_one_percent_rmse(tmp_path):
    from sklearn.metrics import mean_squared_error

    from driftloop.app.scenario import generate

    df = generate("regression", 8000).drop(columns=["event_time"])
    target = [c for c in df.columns if c not in {"tenure", "monthly_spend", "sessions", "support_calls", "latency_ms",
                                                 "region", "plan"}][0]
    train, test = _split(df)
    path, schema_path, schema = _write(tmp_path, train, "regression", target)
    params = {"n_estimators": 100, "max_depth": 4, "learning_rate": 0.1}
    result = launch_local(train=path, schema_uri=schema_path, work_dir=tmp_path / "work", workers=2, target=target,
                          task="regression", params=params, echo=lambda _: None)
    single = train_model(train, target=target, task="regression", numeric=schema["numeric"],
                         categorical=schema["categorical"], learner="xgboost", params=params, device="cpu")
    X = test.drop(columns=[target])
    rmse_dist = mean_squared_error(test[target], result.model.predict(X)) ** 0.5
    rmse_single = mean_squared_error(test[target], single.model.predict(X)) ** 0.5
    assert abs(rmse_dist - rmse_single) / rmse_single <= 0.01, (rmse_dist, rmse_single)


def test_killed_worker_fails_cleanly_and_a_rerun_resumes_from_the_checkpoint(tmp_path, churn):
    train, _ = churn
    path, schema_path, _ = _write(tmp_path, train, "classification")
    ckpt = tmp_path / "ckpt"
    common = dict(train=path, schema_uri=schema_path, workers=2, target="label", task="classification",
                  params={"n_estimators": 1500, "max_depth": 3}, checkpoint_rounds=25, checkpoints=str(ckpt),
                  echo=lambda _: None)
    pids: list[int] = []
    killed = threading.Event()

    def kill_rank_1_after_a_checkpoint(procs):
        pids.extend(p.pid for p in procs)

        def killer():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(ckpt.glob("round-*.ubj")):
                time.sleep(0.005)
            os.kill(procs[1].pid, signal.SIGKILL)
            killed.set()

        threading.Thread(target=killer, daemon=True).start()

    with pytest.raises(TrainingError) as err:
        launch_local(work_dir=tmp_path / "w1", on_started=kill_rank_1_after_a_checkpoint, **common)
    assert killed.is_set()
    assert "worker 1 of 2 killed by SIGKILL" in str(err.value) and "nothing was registered" in str(err.value)
    assert not (tmp_path / "w1" / "out" / "model.joblib").exists()
    time.sleep(0.5)
    assert not [p for p in pids if process_alive(p)], "a worker outlived the failed run"
    saved = sorted(int(p.stem.split("-")[1]) for p in ckpt.glob("round-*.ubj"))
    assert saved and saved[-1] < 1500

    result = launch_local(work_dir=tmp_path / "w2", **common)
    assert result.record["resumed_from_round"] == saved[-1]
    assert result.record["rounds"] == 1500  # the same final number of rounds
    assert len(result.record["round_seconds"]) == 1500 - saved[-1]


def test_bad_runs_fail_with_one_clear_error(tmp_path, churn):
    train, _ = churn
    path, schema_path, _ = _write(tmp_path, train.head(3), "classification")
    base = dict(schema_uri=schema_path, target="label", task="classification", params={"n_estimators": 5},
                echo=lambda _: None)
    with pytest.raises(TrainingError, match=r"workers=4 is more than the 3 training rows"):
        launch_local(train=path, work_dir=tmp_path / "a", workers=4, **base)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TrainingError, match=rf"tracker port 127.0.0.1:{port} is taken"):
            launch_local(train=path, work_dir=tmp_path / "b", workers=2, tracker_port=port, **base)

    # a shard with no labelled row: every worker says so, nothing is written
    rows = train.head(40).copy()
    rows["label"] = rows["label"].astype("float64")
    rows.loc[rows.index[20:], "label"] = np.nan
    path, schema_path, _ = _write(tmp_path, rows, "classification")
    with pytest.raises(TrainingError, match=r"the shard of worker 1 is empty"):
        launch_local(train=path, work_dir=tmp_path / "c", workers=2, **{**base, "schema_uri": schema_path})
    assert not (tmp_path / "c" / "out" / "model.joblib").exists()


def _children_of(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_workers_die_with_a_killed_launcher(tmp_path, churn):
    train, _ = churn
    path, schema_path, _ = _write(tmp_path, train, "classification")
    pid_file = tmp_path / "pids.json"
    script = textwrap.dedent(f"""
        import json
        from components.distributed import launch_local
        def started(procs):
            open({str(pid_file)!r}, "w").write(json.dumps([p.pid for p in procs]))
        launch_local(train={path!r}, schema_uri={schema_path!r}, work_dir={str(tmp_path / "w")!r}, workers=2,
                     target="label", task="classification", params={{"n_estimators": 100000}},
                     on_started=started, echo=lambda _: None)
    """)
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = json.loads(pid_file.read_text())
        pids = _children_of(launcher.pid)  # the tracker and the workers
        assert set(workers) < set(pids) and len(pids) == 3 and all(process_alive(p) for p in pids)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if process_alive(p)], "the tracker or a worker outlived the launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_trainjob_nodes_run_the_entrypoint_with_node_0_hosting_the_tracker(tmp_path, churn):
    """What each TrainJob node runs, with only the variables the runtime sets (no local launcher)."""
    from components.distributed import load_record, worker_command
    from driftloop.core.processes import free_port, spawn, stop_process

    train, _ = churn
    path, schema_path, _ = _write(tmp_path, train, "classification")
    cmd = worker_command(train=path, schema_uri=schema_path, out=str(tmp_path / "out"), checkpoints=None,
                         target="label", task="classification", params={"n_estimators": 10}, device="auto",
                         checkpoint_rounds=5, python=sys.executable)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "DRIFTLOOP_TRACKER"))}
    env.update(DMLC_TRACKER_URI="127.0.0.1", DMLC_TRACKER_PORT=str(port), DMLC_NUM_WORKER="2",
               DRIFTLOOP_TRACKER_BIND="127.0.0.1", OMP_NUM_THREADS="1")
    procs = [spawn(cmd, env={**env, "DMLC_TASK_ID": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in (1, 0)]  # the node without the tracker may start first
    try:
        outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                stop_process(p.pid)
    assert [p.returncode for p in procs] == [0, 0], outs
    model, record = load_record(str(tmp_path / "out"))
    assert record["workers"] == 2 and record["rounds"] == 10 and sum(record["rows"]) == len(train)
    assert model.predict(train.drop(columns=FEATURES_DROP).head(2)).shape == (2,)


# --- the pipeline: the train step becomes a launcher ----------------------------------------------
def test_pipeline_with_two_workers_makes_one_run_and_one_version_with_the_record(tmp_path, scenario_path):
    from driftloop.core.registry import Registry
    from pipelines.runner import LocalRunner, RunRequest
    from pipelines.training import run_training

    settings = make_settings(tmp_path / "ws", scenario_path, **{
        "model.learner": "xgboost", "model.params": {"n_estimators": 40, "max_depth": 4},
        "model.distributed.workers": 2, "model.distributed.checkpoint_rounds": 10, "mlflow.model_name": "dist"})
    result = run_training(LocalRunner(settings), RunRequest(window_end="2026-01-31"))
    assert result.state == "SUCCEEDED", result.error
    assert result.summary["gate"] == "passed" and result.summary["model_version"] == "1"
    registry = Registry.from_settings(settings)
    assert len(registry.list_versions("dist")) == 1
    runs = registry.find_runs("attributes.status = 'FINISHED'")
    assert len(runs) == 1
    run = registry.run(runs[0].info.run_id)
    assert run.data.params["distributed.workers"] == "2"
    assert run.data.params["distributed.devices"] == "cpu,cpu"
    assert run.data.tags["driftloop.workers"] == "2"
    history = registry.client.get_metric_history(run.info.run_id, "distributed.round_seconds")
    assert sorted(m.step for m in history) == list(range(1, 41))
    # the registered model takes raw rows like today's (the predictor and the monitor see no change)
    model = registry.load_sklearn(registry.resolve("dist@champion").uri)
    rows = pd.read_parquet(scenario_path).drop(columns=["label", "event_time"]).head(5)
    rows.loc[rows.index[0], "region"] = None
    assert model.predict_proba(rows).shape == (5, 2)
    # the checkpoints of a finished run are gone: a rerun starts afresh
    assert not list((tmp_path / "ws").rglob("round-*.ubj"))


def test_compiled_yaml_train_step_is_the_launcher(tmp_path):
    from pipelines.training import compile_pipeline

    settings = make_settings(tmp_path, tmp_path / "x.parquet", **{
        "model.learner": "xgboost", "model.params": {"n_estimators": 40}, "model.gpu": True, "model.distributed.workers": 4,
        "model.distributed.gpus_per_worker": 1, "kfp.queue_name": "team-a"})
    docs = list(yaml.safe_load_all(compile_pipeline(settings, tmp_path / "train.yaml").read_text()))
    spec, platform = docs[0], docs[1]
    execs = spec["deploymentSpec"]["executors"]
    assert "exec-train-op" not in execs
    launcher = execs["exec-train-distributed-op"]["container"]
    assert "train_distributed" in " ".join(launcher["command"] + launcher.get("args", []))
    assert "accelerator" not in launcher.get("resources", {})  # the TrainJob's nodes get the GPUs
    task = spec["root"]["dag"]["tasks"]["train-distributed-op"]
    dist = task["inputs"]["parameters"]["distributed"]["runtimeValue"]["constant"]
    assert dist["workers"] == 4 and dist["gpus_per_worker"] == 1 and dist["runtime"] == "xgboost-distributed"
    assert dist["queue_name"] == "team-a" and dist["secret"] == "driftloop-mlflow"
    assert spec["root"]["dag"]["tasks"]["evaluate-op"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"][
        "producerTask"] == "train-distributed-op"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train-distributed-op"]["secretAsEnv"][0]["secretName"] == "driftloop-mlflow"


def test_more_than_one_worker_needs_the_xgboost_learner(tmp_path):
    from driftloop.core.errors import ConfigError

    with pytest.raises(ConfigError, match="model.distributed.workers=2 needs model.learner 'xgboost'"):
        make_settings(tmp_path, tmp_path / "x.parquet", **{"model.distributed.workers": 2})


# --- the TrainJob ---------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes", [1, 2, 4])
@pytest.mark.parametrize("gpus", [0, 1])
def test_trainjob_parses_with_the_trainer_api_models(nodes, gpus):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    body = render_trainjob(TrainJobSpec(
        name="driftloop-train-abc", namespace="kubeflow", image="ghcr.io/driftloop/driftloop:0.1.0",
        command=["python", "-m", "components.distributed", "worker"], nodes=nodes, gpus_per_node=gpus,
        queue_name="team-a" if gpus else None, secret="driftloop-mlflow", active_deadline_seconds=900,
        toleration_key="nvidia.com/gpu", node_selector={"gpu": "h100"}))
    job = TrainerV1alpha1TrainJob.from_dict(body)
    assert job.to_dict() == body  # nothing the Trainer API does not know
    assert job.kind == "TrainJob" and job.api_version == "trainer.kubeflow.org/v1alpha1"
    assert job.spec.runtime_ref.name == "xgboost-distributed" and job.spec.trainer.num_nodes == nodes
    assert job.spec.active_deadline_seconds == 900
    res = job.spec.trainer.resources_per_node
    if gpus:
        gpu = [q["nvidia.com/gpu"].actual_instance for q in (res.limits, res.requests)]
        assert gpu == ["1", "1"]  # a limit too: a request alone gets the JobSet rejected (trainer#2363)
        assert job.metadata.labels[QUEUE_LABEL] == "team-a"
        pod = job.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0].template.spec.template.spec
        assert pod.tolerations[0].key == "nvidia.com/gpu" and pod.node_selector == {"gpu": "h100"}
    else:
        assert "nvidia.com/gpu" not in res.limits and QUEUE_LABEL not in job.metadata.labels
        assert job.spec.runtime_patches is None
    secret_env = [e for e in job.spec.trainer.env if e.value_from is not None]
    assert {e.name for e in secret_env} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_on_kubernetes_the_step_launches_a_trainjob_on_its_artifacts(tmp_path, churn, monkeypatch):
    """The launcher step inside a pipeline pod: the TrainJob it sends and where it reads rank 0's model."""
    import components.distributed as dist
    import components.trainjob as tj

    train, _ = churn
    path, schema_path, _ = _write(tmp_path, train, "classification")
    api = RecordingCustomObjects([_cond("Complete")])
    sent: list[dict] = []
    original_run = TrainJobLauncher.run
    monkeypatch.setattr(TrainJobLauncher, "in_cluster", classmethod(lambda cls, **kw: cls(api, None, poll_seconds=0, **kw)))
    monkeypatch.setattr(TrainJobLauncher, "run", lambda self, body, **kw: sent.append(body) or original_run(self, body, **kw))
    monkeypatch.setattr(tj, "in_cluster_namespace", lambda default="kubeflow": "team-a")
    read: list[str] = []
    record = {"workers": 4, "devices": ["cuda"] * 4, "rows": [1] * 4, "rounds": 5, "round_seconds": [0.1] * 5,
              "seconds": 0.5}
    monkeypatch.setattr(dist, "load_record", lambda out: read.append(out) or ("model", record))
    dropped: list[str] = []
    monkeypatch.setattr(dist, "_drop_checkpoints", dropped.append)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    root = "minio://mlpipeline/v2/artifacts/driftloop-train/run-1"
    result = dist.train_distributed(
        train_uri=f"{root}/ingest/1/train", train_path=path, schema_uri=f"{root}/validate/2/schema",
        schema_path=schema_path, model_path=str(tmp_path / "model"), model_uri=f"{root}/train/3/model",
        target="label", task="classification", learner="xgboost", params={"n_estimators": 5}, device="auto",
        distributed={"workers": 4, "gpus_per_worker": 1, "runtime": "xgboost-distributed", "timeout_seconds": 900,
                     "queue_name": "gpu-queue", "secret": "driftloop-mlflow", "checkpoint_rounds": 2})
    assert result.device == "cuda" and result.model == "model"
    (body,) = sent
    trainer_models_check(body)
    assert body["metadata"]["namespace"] == "team-a" and body["metadata"]["labels"][QUEUE_LABEL] == "gpu-queue"
    assert body["spec"]["runtimeRef"]["kind"] == "ClusterTrainingRuntime"  # no namespaced runtime of that name
    assert body["spec"]["activeDeadlineSeconds"] == 900 and body["spec"]["trainer"]["numNodes"] == 4
    cmd = body["spec"]["trainer"]["command"]
    assert cmd[:4] == ["python", "-m", "components.distributed", "worker"]
    s3 = "s3://mlpipeline/v2/artifacts/driftloop-train/run-1"
    assert cmd[cmd.index("--train") + 1] == f"{s3}/ingest/1/train"
    assert cmd[cmd.index("--out") + 1] == f"{s3}/train/3/model.distributed" == read[0]
    assert cmd[cmd.index("--checkpoints") + 1].startswith("s3://mlpipeline/driftloop-checkpoints/")
    assert dropped == [cmd[cmd.index("--checkpoints") + 1].replace("s3://", "minio://")]  # the finished run's


def test_trainjob_check_rejects_a_field_the_api_does_not_know():
    body = render_trainjob(TrainJobSpec(name="t", namespace="ns", image="i", command=["c"], nodes=2))
    body["spec"]["trainer"]["replicas"] = 2
    with pytest.raises(TrainingError, match=r"\.spec\.trainer\.replicas"):
        trainer_models_check(body)
    with pytest.raises(TrainingError, match="gpus_per_worker is 0 or 1"):
        render_trainjob(TrainJobSpec(name="t", namespace="ns", image="i", command=["c"], nodes=2, gpus_per_node=2))


class ApiError(Exception):
    """Shaped like kubernetes.client.ApiException: status, reason, JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.reason, self.body = status, message, json.dumps({"message": message})


class RecordingCustomObjects:
    """Test-only stand-in for CustomObjectsApi: records every call, answers scripted statuses."""

    def __init__(self, statuses=(), create_error=None, runtime_error=None):
        self.calls: list[tuple] = []
        self.statuses = list(statuses)
        self.create_error, self.runtime_error = create_error, runtime_error

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        if self.create_error:
            raise self.create_error
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", plural, name))
        if plural == "trainingruntimes":
            raise self.runtime_error or ApiError(404, f'trainingruntimes "{name}" not found')
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"metadata": {"name": name}, "status": status}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", plural, name))


class RecordingCore:
    def __init__(self, nodes):
        self.nodes = nodes

    def list_namespaced_pod(self, namespace, label_selector):
        from types import SimpleNamespace as NS

        assert label_selector == "jobset.sigs.k8s.io/jobset-name=tj"
        return NS(items=[NS(metadata=NS(name=f"tj-node-0-{i}", labels={"batch.kubernetes.io/job-completion-index": str(i)}))
                         for i in reversed(range(self.nodes))])

    def read_namespaced_pod_log(self, name, namespace, tail_lines):
        return f"hello from {name}\nround done"


def _cond(kind, reason="", message=""):
    return {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message,
                            "lastTransitionTime": "2026-11-30T00:00:00Z"}]}


def _body(nodes=2, deadline=600):
    return render_trainjob(TrainJobSpec(name="tj", namespace="kubeflow", image="i", command=["c"], nodes=nodes,
                                        active_deadline_seconds=deadline))


def _launcher(api, core=None, clock=None):
    lines: list[str] = []
    ticks = iter(range(0, 10**9, 30))
    return TrainJobLauncher(api, core, poll_seconds=0, echo=lines.append, sleep=lambda _: None,
                            clock=clock or (lambda: float(next(ticks)))), lines


def test_launcher_waits_for_complete_and_shows_each_nodes_log():
    api = RecordingCustomObjects([{}, {"conditions": [{"type": "Created", "status": "True"}]}, _cond("Complete")])
    launcher, lines = _launcher(api, RecordingCore(2))
    assert launcher.runtime_kind("kubeflow", "xgboost-distributed") == "ClusterTrainingRuntime"
    launcher.run(_body())
    assert api.calls[1] == ("create", "trainer.kubeflow.org", "v1alpha1", "kubeflow", "trainjobs", "tj")
    assert [c[0] for c in api.calls].count("get") == 4 and ("delete", "trainjobs", "tj") not in api.calls
    assert lines.index("[node 0] hello from tj-node-0-0") < lines.index("[node 1] hello from tj-node-0-1")
    assert lines[-1] == "TrainJob kubeflow/tj complete"


def test_launcher_fails_with_one_line_on_failed_deadline_and_its_own_timeout():
    api = RecordingCustomObjects([{}, _cond("Failed", "JobFailed", "worker 1 exited with code 3")])
    launcher, _ = _launcher(api)
    with pytest.raises(TrainingError, match=r"TrainJob kubeflow/tj failed \(JobFailed\): worker 1 exited with code 3"):
        launcher.run(_body())

    api = RecordingCustomObjects([_cond("Failed", "DeadlineExceeded", "Job was active longer than specified")])
    launcher, _ = _launcher(api)
    with pytest.raises(TrainingError, match=r"timed out after 600 s \(activeDeadlineSeconds"):
        launcher.run(_body(deadline=600))

    api = RecordingCustomObjects([{}])  # never a terminal condition: the launcher gives up and deletes it
    launcher, _ = _launcher(api)
    with pytest.raises(TrainingError, match=r"did not finish within 60 s .* deleted it"):
        launcher.run(_body(deadline=60), grace_seconds=30)
    assert api.calls[-1] == ("delete", "trainjobs", "tj")


def test_launcher_translates_create_errors():
    cases = [
        (ApiError(403, 'trainjobs.trainer.kubeflow.org is forbidden: User "system:serviceaccount:kubeflow:'
                       'driftloop-pipeline" cannot create resource "trainjobs"'), r"may not create trainjobs.*RBAC"),
        (ApiError(422, 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: '
                       'ClusterTrainingRuntime.trainer.kubeflow.org "xgboost-distributed" not found'),
         r"training runtime 'xgboost-distributed' is not installed"),
        (ApiError(404, "the server could not find the requested resource (trainjobs)"), r"Kubeflow Trainer v2"),
    ]
    for error, pattern in cases:
        api = RecordingCustomObjects([{}], create_error=error)
        launcher, _ = _launcher(api)
        with pytest.raises(TrainingError, match=pattern):
            launcher.run(_body())
    launcher, _ = _launcher(RecordingCustomObjects([{}], runtime_error=ApiError(403, "forbidden")))
    with pytest.raises(TrainingError, match="may not read training runtimes"):
        launcher.runtime_kind("kubeflow", "xgboost-distributed")


def test_the_pipeline_account_may_do_what_the_launcher_does_and_no_more():
    docs = [d for d in yaml.safe_load_all((Path(__file__).resolve().parents[1] / "infra/base/rbac.yaml").read_text()) if d]
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "driftloop-pipeline-trainer")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "driftloop-pipeline", "namespace": "kubeflow"}]
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == binding["roleRef"]["name"])
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert {(g, r) for g, r, _ in granted} == {("trainer.kubeflow.org", "trainjobs"),
                                              ("trainer.kubeflow.org", "trainingruntimes"), ("", "pods"), ("", "pods/log")}
    # every call a launcher makes, on success and on timeout, is granted
    api = RecordingCustomObjects([{}])
    launcher, _ = _launcher(api, RecordingCore(2))
    launcher.runtime_kind("kubeflow", "xgboost-distributed")
    with pytest.raises(TrainingError):
        launcher.run(_body(deadline=60), grace_seconds=0)
    verb = {"create": "create", "get": "get", "delete": "delete"}
    used = {("trainer.kubeflow.org", c[4] if c[0] == "create" else c[1], verb[c[0]]) for c in api.calls}
    used |= {("", "pods", "list"), ("", "pods/log", "get")}
    assert used <= granted
    assert ("trainer.kubeflow.org", "trainjobs", "watch") in granted
