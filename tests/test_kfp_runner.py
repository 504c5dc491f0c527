"""Kubeflow submission: what KfpRunner sends to kfp.Client, and its errors."""

import sys

import pytest

from driftloop.core.errors import PipelineRunError
from pipelines.runner import KfpRunner, RunRequest, runner_for
from pipelines.training import pipeline_arguments, run_training, training_pipeline_for
from tests.conftest import free_port, make_settings
from tests.kfp_recording import RecordingKfpClient

TRACKING = {"mlflow.tracking_uri": "http://mlflow.example:5000"}


@pytest.fixture
def cluster_settings(tmp_path, scenario_path):
    return make_settings(tmp_path / "ws", scenario_path, **{"kfp.host": "http://kfp.example:8888",
                                                            "kfp.experiment": "churn-retrain", **TRACKING})


def test_runner_for_picks_kubeflow_when_a_host_is_set(cluster_settings, tmp_path, scenario_path):
    assert isinstance(runner_for(cluster_settings), KfpRunner)
    assert not isinstance(runner_for(make_settings(tmp_path / "local", scenario_path)), KfpRunner)


def test_first_submission_uploads_a_version_creates_the_experiment_and_starts_the_run(cluster_settings):
    client = RecordingKfpClient()
    request = RunRequest(trigger="drift:alert-7", window_start="2026-01-05", window_end="2026-01-31")

    result = run_training(KfpRunner(cluster_settings, client=client), request)

    assert client.names() == ["get_pipeline_id", "upload_pipeline", "list_pipeline_versions",
                              "upload_pipeline_version", "get_experiment", "create_experiment", "run_pipeline"]
    assert client.of("upload_pipeline")[0]["pipeline_name"] == "driftloop-train"
    version_name = client.of("upload_pipeline_version")[0]["pipeline_version_name"]
    assert version_name.startswith("driftloop-train-") and len(version_name) == len("driftloop-train-") + 12
    pipeline_id = client.pipelines["driftloop-train"].pipeline_id
    version = client.versions[pipeline_id][-1]
    assert version.display_name == version_name
    assert client.of("create_experiment")[0]["name"] == "churn-retrain"

    (run,) = client.of("run_pipeline")
    assert run["experiment_id"] == client.experiments["churn-retrain"].experiment_id
    assert run["pipeline_id"] == pipeline_id and run["version_id"] == version.pipeline_version_id
    assert run["params"] == pipeline_arguments(cluster_settings, trigger="drift:alert-7", request_id=request.request_id,
                                               window_start="2026-01-05", window_end="2026-01-31")
    assert run["params"]["trigger"] == "drift:alert-7" and run["params"]["window_end"] == "2026-01-31"
    assert run["service_account"] == "driftloop-pipeline"
    assert request.request_id[:8] in run["job_name"]
    assert result.state == "SUBMITTED" and result.home == "kubeflow"
    assert result.run_id == client.runs[-1].run_id
    assert result.url == f"http://kfp.example:8888/#/runs/details/{result.run_id}"


def _compiled_tasks(settings, tmp_path):
    """Every task of the package KfpRunner uploads (top level and inside the gate's branches), by name."""
    import yaml

    package = training_pipeline_for(settings).compile(tmp_path)
    spec = next(yaml.safe_load_all(package.read_text()))
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def test_the_uploaded_pipeline_caches_no_step(cluster_settings, tmp_path):
    """Runs by version id ignore the client's enable_caching, so the package itself must not cache:
    a recurring run with the same parameters would otherwise reuse yesterday's data and model."""
    tasks = _compiled_tasks(cluster_settings, tmp_path)
    assert {"ingest-op", "train-op", "evaluate-op", "register-op", "reject-op"} <= set(tasks)
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())


def test_the_kfp_run_id_reaches_the_mlflow_steps_as_a_task_argument(cluster_settings, tmp_path):
    """The KFP backend resolves {{$.pipeline_job_uuid}} in task arguments (not in component defaults);
    register/reject record it in MLflow and use it as the request id of scheduled runs."""
    from kfp import dsl

    steps = _compiled_tasks(cluster_settings, tmp_path)
    for step in ("register-op", "reject-op"):
        arg = steps[step]["inputs"]["parameters"]["pipeline_run_id"]
        assert arg == {"runtimeValue": {"constant": dsl.PIPELINE_JOB_ID_PLACEHOLDER}}


def test_resubmitting_the_same_pipeline_reuses_its_version_and_experiment(cluster_settings):
    client = RecordingKfpClient()
    runner = KfpRunner(cluster_settings, client=client)
    run_training(runner, RunRequest())
    client.calls.clear()

    run_training(runner, RunRequest())

    assert client.names() == ["get_pipeline_id", "list_pipeline_versions", "get_experiment", "run_pipeline"]
    first, second = client.runs
    assert client.of("run_pipeline")[0]["version_id"] == client.versions[client.pipelines["driftloop-train"].pipeline_id][-1].pipeline_version_id
    assert first.run_id != second.run_id


def test_a_changed_pipeline_becomes_a_new_version_of_the_same_pipeline(cluster_settings, tmp_path, scenario_path):
    client = RecordingKfpClient()
    run_training(KfpRunner(cluster_settings, client=client), RunRequest())
    gpu = make_settings(tmp_path / "ws", scenario_path, **{"kfp.host": "http://kfp.example:8888",
                                                           "kfp.experiment": "churn-retrain", "model.gpu": True,
                                                           **TRACKING})
    client.calls.clear()

    run_training(KfpRunner(gpu, client=client), RunRequest())

    assert "upload_pipeline" not in client.names()
    (upload,) = client.of("upload_pipeline_version")
    pipeline_id = client.pipelines["driftloop-train"].pipeline_id
    assert upload["pipeline_id"] == pipeline_id
    hashed = [v for v in client.versions[pipeline_id] if v.display_name != "driftloop-train"]
    assert len(hashed) == 2 and len({client.version_digests[v.pipeline_version_id] for v in hashed}) == 2
    assert client.of("run_pipeline")[0]["version_id"] == hashed[-1].pipeline_version_id


def test_waiting_reports_the_final_state(cluster_settings):
    client = RecordingKfpClient()
    result = run_training(KfpRunner(cluster_settings, client=client), RunRequest(), wait=True, timeout=60)
    assert client.of("wait_for_run_completion")[0]["run_id"] == result.run_id
    assert result.state == "FAILED"


def test_an_ambiguous_experiment_name_is_an_error_not_a_new_experiment(cluster_settings):
    class TwoExperiments(RecordingKfpClient):
        def get_experiment(self, experiment_id=None, experiment_name=None, namespace=None):
            raise ValueError(f"Multiple experiments is found with name {experiment_name}.")

    client = TwoExperiments()
    with pytest.raises(PipelineRunError, match="Multiple experiments"):
        KfpRunner(cluster_settings, client=client).experiment_id()
    assert "create_experiment" not in client.names()


def test_the_embedded_mlflow_store_is_refused_for_cluster_runs(tmp_path, scenario_path):
    client = RecordingKfpClient()
    settings = make_settings(tmp_path / "ws", scenario_path, **{"kfp.host": "http://kfp.example:8888"})
    with pytest.raises(PipelineRunError, match="mlflow.tracking_uri is not set"):
        run_training(KfpRunner(settings, client=client), RunRequest())
    assert client.calls == []


def test_an_unreachable_host_is_a_clear_error(tmp_path, scenario_path):
    host = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(tmp_path / "ws", scenario_path, **{"kfp.host": host, **TRACKING})
    with pytest.raises(PipelineRunError, match=f"Kubeflow Pipelines at {host}"):
        run_training(KfpRunner(settings), RunRequest())


def test_cli_run_train_on_an_unreachable_host_prints_one_line(tmp_path, scenario_path, monkeypatch, capsys):
    from driftloop.app import cli

    host = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DRIFTLOOP_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setattr(sys, "argv", ["driftloop", "run", "train", "--kfp-host", host,
                                      "--param", f"data.source={scenario_path}",
                                      "--param", f"mlflow.tracking_uri={TRACKING['mlflow.tracking_uri']}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert host in err and "Traceback" not in err


def test_a_failed_local_run_prints_one_line_and_where_the_log_is(tmp_path, scenario_path):
    """kfp.local's executor output goes to the run's log file; the terminal gets the step and the error."""
    import os
    import re
    import subprocess

    import pandas as pd

    source = tmp_path / "no-time-column.parquet"
    pd.read_parquet(scenario_path).drop(columns=["event_time"]).to_parquet(source)
    env = {**os.environ, "DRIFTLOOP_WORKSPACE": str(tmp_path / "ws"), "DRIFTLOOP_DATA__SOURCE": str(source),
           "DRIFTLOOP_DATA__TIME_COLUMN": "event_time", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "run", "train"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) <= 5, "\n".join(lines)  # a header, where the log goes, the failure, what it means
    text = " ".join((proc.stdout + proc.stderr).split())  # the console may wrap a long line
    assert text.count("run failed") == 1
    assert "run failed: step 'ingest' failed: time column 'event_time' is not in the data" in text
    log_path = re.search(r"\(full log: (\S+)\)", text).group(1)
    log = open(log_path).read()
    assert "executor_main" in log or "Executing task" in log  # the executor's log is kept, just not printed


def test_the_training_runner_the_trigger_and_the_scheduler_get_submits_the_training_pipeline(cluster_settings):
    """``run_training`` on the runner the monitor and the scheduler are given; everything else is the runner's."""
    from pipelines.training import TrainingRunner, training_runner_for

    assert isinstance(training_runner_for(cluster_settings).runner, KfpRunner)
    client = RecordingKfpClient()
    runner = TrainingRunner(KfpRunner(cluster_settings, client=client))
    assert runner.client is client and runner.home == "kubeflow"
    result = runner.run_training(RunRequest(trigger="drift:alert-9"))
    assert result.state == "SUBMITTED"
    assert client.of("upload_pipeline")[0]["pipeline_name"] == "driftloop-train"
    assert client.of("run_pipeline")[0]["params"]["trigger"] == "drift:alert-9"
    with pytest.raises(PipelineRunError, match="trigger"):
        runner.run_training(RunRequest(trigger="cron"))
