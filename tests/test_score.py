"""Batch scoring: the pipeline (kfp.local, ParallelFor over chunks) equals in-process predict row for
row, a drifted batch raises one alert through the monitor's trigger, bad input is one clear error and
no partial output ever looks complete."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from components.score import (MODEL_VERSION, PREDICTION, ROW, OutputExistsError, plan_chunks, plan_scoring,
                              score_chunk, score_frame, write_predictions)
from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC, generate
from driftloop.core.errors import DataSourceError, DataValidationError, RegistryError
from driftloop.core.registry import Registry
from tests.conftest import free_port, make_settings

TOKEN = "batch-token"


def _batch(rows: int, *, drifted: bool, seed: int = 11) -> pd.DataFrame:
    """Scenario rows with an id column: before the drift point (like the reference) or after it."""
    frame = generate(rows=rows, drift_at=0.0 if drifted else None, seed=seed)
    frame.insert(0, "id", np.arange(10_000, 10_000 + rows))
    return frame.drop(columns=["label"])


@pytest.fixture(scope="module")
def champion(trained):
    settings, _ = trained
    registry = Registry(settings.tracking_uri, experiment=settings.mlflow.experiment)
    info = registry.resolve("churn@champion")
    return settings, registry, info, registry.load_sklearn(info.uri)


def _expected(model, frame: pd.DataFrame) -> np.ndarray:
    return np.asarray(model.predict(frame[[*FEATURES_NUMERIC, *FEATURES_CATEGORICAL]]))


# -- plain functions -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_chunks_stream_in_batches_and_equal_in_process_predict(tmp_path, champion, fmt):
    _, registry, info, model = champion
    frame = _batch(2_300, drifted=False)
    src = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(src, index=False, row_group_size=400)  # chunk bounds fall inside row groups
    else:
        frame.to_csv(src, index=False)
    plan = plan_scoring(registry, model_ref="churn@champion", input_uri=str(src), output_uri=str(tmp_path / "o.parquet"),
                        chunks=4)
    assert len(plan.chunks) == 4 and plan.version == info.version
    parts = []
    for chunk in plan.chunks:
        part, sample = tmp_path / f"part{chunk['index']}.parquet", tmp_path / f"sample{chunk['index']}.parquet"
        score_chunk(model, uri=str(src), fmt=plan.fmt, chunk=chunk, numeric=plan.numeric, categorical=plan.categorical,
                    id_column="id", version=plan.version, part_path=part, sample_path=sample, sample_rows=100,
                    batch_rows=170)
        assert len(pd.read_parquet(sample)) == 100  # bounded sample of the chunk
        parts.append(part)
    out = tmp_path / "out.parquet"
    assert write_predictions(parts, str(out)) == len(frame)
    got = pd.read_parquet(out)
    assert got["id"].tolist() == frame["id"].tolist()  # every row once, in input order
    np.testing.assert_array_equal(got[PREDICTION].to_numpy(), _expected(model, frame))
    assert set(got[MODEL_VERSION]) == {info.version}


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_rows_without_an_id_are_scored_in_order_with_their_row_number_and_kept_columns(tmp_path, champion, fmt):
    """The scenario's own data has no id column: each prediction carries its row's position in the input,
    across chunks (a csv chunk cannot know its first row: the writer numbers on), and the columns asked for."""
    _, registry, info, model = champion
    frame = generate(rows=1_700, seed=5)  # event_time, the features, label: no id
    assert "id" not in frame.columns
    src = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(src, index=False, row_group_size=300)
    else:
        frame.to_csv(src, index=False)
    plan = plan_scoring(registry, model_ref="churn@champion", input_uri=str(src), output_uri=str(tmp_path / "o"),
                        chunks=3, keep_columns=["label", "event_time"])
    assert plan.id_column == "" and plan.keep == ["label", "event_time"] and len(plan.chunks) == 3
    parts = []
    for chunk in plan.chunks:
        parts.append(tmp_path / f"part{chunk['index']}.parquet")
        score_chunk(model, uri=str(src), fmt=plan.fmt, chunk=chunk, numeric=plan.numeric, categorical=plan.categorical,
                    id_column=plan.id_column, version=plan.version, part_path=parts[-1],
                    sample_path=tmp_path / f"s{chunk['index']}.parquet", sample_rows=50, batch_rows=130,
                    keep=plan.keep)
    out = tmp_path / f"out.{fmt}"
    assert write_predictions(parts, str(out)) == len(frame)
    got = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out)
    assert list(got.columns) == [ROW, PREDICTION, MODEL_VERSION, "label", "event_time"]
    assert got[ROW].tolist() == list(range(len(frame)))  # 0..n-1, in input order, once each
    np.testing.assert_array_equal(got[PREDICTION].to_numpy(), _expected(model, frame))
    assert got["label"].tolist() == frame["label"].tolist()
    assert set(got[MODEL_VERSION].astype(str)) == {info.version}


def test_csv_chunks_cut_at_line_ends_cover_every_row_once(tmp_path):
    frame = pd.DataFrame({"id": range(1000), "text": ["x" * (i % 37) for i in range(1000)]})
    src = tmp_path / "rows.csv"
    frame.to_csv(src, index=False)
    plan, columns, _ = plan_chunks(str(src), "csv", 7)
    assert columns == ["id", "text"] and len(plan) == 7
    from components.score import iter_chunk

    ids = [i for c in plan for f in iter_chunk(str(src), "csv", c, ["id"], 50) for i in f["id"]]
    assert ids == list(range(1000))


def test_bad_input_is_one_clear_error(tmp_path, champion):
    _, registry, _, _ = champion
    good = tmp_path / "in.parquet"
    _batch(300, drifted=False).to_parquet(good, index=False)
    out = str(tmp_path / "out.parquet")

    def plan(**kw):
        args = dict(model_ref="churn@champion", input_uri=str(good), output_uri=out, chunks=2)
        args.update(kw)
        return plan_scoring(registry, **args)

    with pytest.raises(RegistryError, match="has no alias 'nope'"):
        plan(model_ref="churn@nope")
    with pytest.raises(RegistryError, match="not found"):
        plan(model_ref="churn/999")
    no_spend = tmp_path / "no_spend.parquet"
    _batch(300, drifted=False).drop(columns=["monthly_spend"]).to_parquet(no_spend, index=False)
    with pytest.raises(DataValidationError, match="lacks column.*'monthly_spend'"):
        plan(input_uri=str(no_spend))
    # an id column the user named must be there; the sentence says what the input has and what to do
    with pytest.raises(DataValidationError, match=r"has no id column 'customer' \(it has: id, event_time, .*\); "
                                                  "name another with --id-column, or leave it out to number"):
        plan(id_column="customer", id_required=True)
    assert plan(id_column="customer").id_column == ""  # the default one missing: row numbers
    with pytest.raises(DataValidationError, match="--keep-columns names 'segment', which input .* lacks"):
        plan(keep_columns=["region", "segment"])
    with_prediction = tmp_path / "with_prediction.parquet"
    _batch(300, drifted=False).assign(prediction=1).to_parquet(with_prediction, index=False)
    with pytest.raises(DataValidationError, match="'prediction' cannot be kept: the output has a column of that name"):
        plan(input_uri=str(with_prediction), keep_columns=["*"])
    assert plan(keep_columns=["*"]).keep == [c for c in _batch(1, drifted=False).columns if c != "id"]
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataSourceError, match="cannot read .*corrupt.parquet as parquet"):
        plan(input_uri=str(corrupt))
    with pytest.raises(DataSourceError, match="input not found"):
        plan(input_uri=str(tmp_path / "missing.parquet"))
    Path(out).write_bytes(b"earlier predictions")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        plan()
    plan(overwrite=True)  # asked for: accepted


def test_unreadable_csv_rows_name_the_chunk(tmp_path, champion):
    _, registry, _, model = champion
    frame = _batch(200, drifted=False)
    src = tmp_path / "bad.csv"
    text = frame.to_csv(index=False).splitlines()
    text[150] = text[150] + ",1,2,3"  # a row with too many fields
    src.write_text("\n".join(text) + "\n")
    plan = plan_scoring(registry, model_ref="churn@champion", input_uri=str(src), output_uri=str(tmp_path / "o.parquet"),
                        chunks=1)
    with pytest.raises(DataSourceError, match=r"cannot read .*bad.csv \(bytes .*chunk 0\).*Expected"):
        score_chunk(model, uri=str(src), fmt="csv", chunk=plan.chunks[0], numeric=plan.numeric,
                    categorical=plan.categorical, id_column="id", version="1", part_path=tmp_path / "p.parquet",
                    sample_path=tmp_path / "s.parquet", sample_rows=100, batch_rows=1000)


# the writer is closed before its file: left to the garbage collector it wrote to a closed file
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_interrupted_write_leaves_no_complete_looking_output(tmp_path, champion, monkeypatch):
    _, _, _, model = champion
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}.parquet"
        pd.DataFrame({"id": [i], PREDICTION: [1], MODEL_VERSION: ["1"]}).to_parquet(part, index=False)
        parts.append(part)
    out = tmp_path / "preds" / "out.parquet"
    real = pq.ParquetFile

    def dying(path, *a, **kw):
        if str(getattr(path, "path", path)).endswith("part2.parquet"):  # a path or an open file
            raise KeyboardInterrupt  # the run is stopped while the last part is being written
        return real(path, *a, **kw)

    monkeypatch.setattr(pq, "ParquetFile", dying)
    with pytest.raises(KeyboardInterrupt):
        write_predictions(parts, str(out))
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # the temporary file is gone too
    monkeypatch.setattr(pq, "ParquetFile", real)
    # an existing output is never replaced by a half-written one either
    out.write_bytes(b"yesterday's predictions")
    monkeypatch.setattr(pq, "ParquetFile", dying)
    with pytest.raises(KeyboardInterrupt):
        write_predictions(parts, str(out), overwrite=True)
    assert out.read_bytes() == b"yesterday's predictions"
    monkeypatch.setattr(pq, "ParquetFile", real)
    assert write_predictions(parts, str(out), overwrite=True) == 3


# -- the pipeline under kfp.local, with a real monitor taking the alert ---------------------------------
class _Monitor:
    """The monitor's app served by uvicorn in a thread on a free port (the alert comes from a task process)."""

    def __init__(self, service) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Monitor":
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_drifted_batch_pipeline_scores_every_chunk_and_raises_one_alert(tmp_path, trained, champion, monkeypatch):
    from monitoring.service import WEBHOOK_TOKEN_ENV, MonitorService
    from pipelines.scoring import ScoreRequest, compile_scoring_pipeline, run_scoring
    from tests.test_trigger import RecordingRunner

    base, _ = trained
    _, registry, info, model = champion
    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, TOKEN)
    settings = make_settings(tmp_path / "ws", base.data.source, **{
        "mlflow.tracking_uri": base.tracking_uri, "trigger.cooldown_seconds": 0, "trigger.min_samples": 1,
        "serving.name": "churn", "score.batch_rows": 300, "monitor.check_interval_seconds": 3600})
    frame = _batch(1_500, drifted=True)
    src = tmp_path / "batch.parquet"
    frame.to_parquet(src, index=False, row_group_size=250)
    out = tmp_path / "scored" / "predictions.parquet"
    runner = RecordingRunner()
    service = MonitorService(settings, runner=runner)
    with _Monitor(service) as monitor:
        settings = settings.model_copy(update={"score": settings.score.model_copy(update={
            "alert_url": f"http://127.0.0.1:{monitor.port}/alerts/alertmanager"})})
        request = ScoreRequest(input=str(src), output=str(out), chunks=3)
        result = run_scoring(settings, request)
        assert result.state == "SUCCEEDED", result.error
        # scored: every row once, in order, equal to in-process predict, with the model version
        got = pd.read_parquet(out)
        assert got["id"].tolist() == frame["id"].tolist()
        np.testing.assert_array_equal(got[PREDICTION].to_numpy(), _expected(model, frame))
        assert set(got[MODEL_VERSION]) == {info.version}
        parts = sorted((settings.workspace_dir / "pipeline-root").rglob("part"))
        assert len(parts) == 3  # three chunk tasks ran
        s = result.summary
        assert s["rows"] == len(frame) and s["drift"] == "drifted" and s["version"] == info.version
        assert s["ids"] == "column 'id'" and s["kept"] == []
        # the summary says the alert reached the monitor, and what the monitor decided
        assert s["alert"] == f"sent to {settings.score.alert_url}: started (guardrails passed)", s["alert"]
        assert {"tenure", "monthly_spend", "sessions"} <= set(s["drifted_columns"])
        report = Registry(settings.tracking_uri).download(s["mlflow_run_id"], "batch_drift/batch_drift.html")
        assert report.stat().st_size > 10_000  # Evidently's report is in MLflow
        # one alert, through the monitor's trigger: one retraining run asked for
        alerts = service.alerts.recent()
        assert len(alerts) == 1 and alerts[0]["source"] == "alertmanager"
        assert alerts[0]["decision"] == "started" and len(runner.requests) == 1
        labels = yaml.safe_load(alerts[0]["details"]) if isinstance(alerts[0]["details"], str) else alerts[0]["details"]
        assert labels["labels"]["alertname"] == "DriftloopBatchDrift"
        # the same request delivered again (a retried step) is a duplicate, not a second run
        from components.score import alert_payload, send_alert

        verdict = {"drifted_columns": s["drifted_columns"], "share": s["drift_share"]}
        again = send_alert(settings.score.alert_url, alert_payload(
            model="churn", version=info.version, input_uri=str(src), request_id=request.request_id,
            started=request.started, verdict=verdict, rows=s["rows"], report_uri=None), token=TOKEN)
        assert again["decisions"][0]["decision"] == "duplicate" and len(runner.requests) == 1
        # without --overwrite a second run refuses before any task starts, and the output is untouched
        before = out.read_bytes()
        with pytest.raises(OutputExistsError):
            run_scoring(settings, ScoreRequest(input=str(src), output=str(out), chunks=2))
        assert out.read_bytes() == before
    # compiled like the training pipeline: one pod per chunk (ParallelFor), the webhook token from a Secret
    spec, platform = yaml.safe_load_all(compile_scoring_pipeline(settings, tmp_path / "score.yaml").read_text())
    loop = spec["root"]["dag"]["tasks"]["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--score-plan-op-Output"
    assert spec["root"]["inputDefinitions"]["parameters"]["model_ref"]["defaultValue"] == "churn@champion"
    drift_env = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-score-drift-op"]["secretAsEnv"]
    assert {"secretName": "driftloop-webhook", "key": "token", "env": "DRIFTLOOP_WEBHOOK_TOKEN"} in [
        {"secretName": e["secretName"], "key": k["secretKey"], "env": k["envVar"]} for e in drift_env for k in e["keyToEnv"]]


# -- schedules and the CLI ----------------------------------------------------------------------------
def test_score_schedules_run_the_scoring_pipeline_on_both_homes(tmp_path, scenario_path, monkeypatch):
    from datetime import datetime, timedelta, timezone

    import pipelines.scoring as scoring
    from driftloop.core.errors import ScheduleError
    from pipelines.runner import RunResult
    from pipelines.schedule import KfpSchedules, LocalSchedules, Schedule
    from pipelines.scheduler import Scheduler
    from tests.kfp_recording import RecordingKfpClient

    io = {"score.input": "s3://bucket/daily/in.parquet", "score.output": "s3://bucket/daily/scored.parquet",
          "score.overwrite": "true"}
    # Kubeflow: a recurring run of the uploaded driftloop-score pipeline, with the score section's parameters
    cluster = make_settings(tmp_path / "kws", scenario_path, **{"kfp.host": "http://kfp.example:8888",
                                                                "mlflow.tracking_uri": "http://mlflow.example:5000"})
    client = RecordingKfpClient()
    KfpSchedules(cluster, client=client).create(Schedule("daily-score", "0 4 * * *", io, pipeline="score"))
    (sent,) = client.of("create_recurring_run")
    pipeline_id = client.pipelines["driftloop-score"].pipeline_id
    assert sent["pipeline_id"] == pipeline_id and "driftloop-train" not in client.pipelines
    assert sent["params"]["input_uri"] == io["score.input"] and sent["params"]["overwrite"] is True
    assert sent["params"]["request_id"] == "" and sent["params"]["started"] == ""  # each run names itself
    assert sent["params"]["trigger"] == "schedule:daily-score"
    assert json.loads(sent["description"])["driftloop.schedule"]["pipeline"] == "score"
    # embedded default: the local scheduler runs the scoring pipeline for a due slot, never training
    settings = make_settings(tmp_path / "ws", scenario_path)
    store = LocalSchedules.from_settings(settings)
    t0 = datetime(2026, 1, 10, tzinfo=timezone.utc)
    store.create(Schedule("daily-score", "0 4 * * *", io, pipeline="score"), now=t0)
    assert store.get("daily-score")[0].pipeline == "score"
    ran = []
    monkeypatch.setattr(scoring, "run_scoring", lambda s, req, **kw: ran.append((s, req)) or RunResult(
        req.request_id, "score-run", "SUCCEEDED", "local"))

    def no_training(_settings):
        raise AssertionError("a scoring schedule started training")

    (outcome,) = Scheduler(settings, store, runner_factory=no_training, clock=lambda: t0 + timedelta(hours=4, seconds=5)).tick()
    assert outcome.state == "done" and outcome.run_id == "score-run"
    (used, request), = ran
    assert used.score.input == io["score.input"] and request.trigger == "schedule:daily-score"
    with pytest.raises(ScheduleError, match="--window-days applies to training"):
        Schedule("x", "0 4 * * *", pipeline="score", window_days=3)
    with pytest.raises(ScheduleError, match="pipeline 'predict' is not train or score"):
        Schedule("x", "0 4 * * *", pipeline="predict")


def test_cli_run_score_errors_are_one_line_and_compile_writes_both(tmp_path, trained):
    import subprocess
    import sys

    base, _ = trained
    src = tmp_path / "in.parquet"
    _batch(200, drifted=False).to_parquet(src, index=False)
    out = tmp_path / "out.parquet"
    out.write_bytes(b"earlier")
    env = {**__import__("os").environ, "DRIFTLOOP_WORKSPACE": str(base.workspace_dir),
           "DRIFTLOOP_MLFLOW__MODEL_NAME": "churn", "DRIFTLOOP_MLFLOW__EXPERIMENT": "test",
           "COLUMNS": "400"}  # one message, not wrapped by the terminal width
    cmd = [sys.executable, "-m", "driftloop.app.cli"]
    cases = [
        (["--model", "churn@nope", "--output", str(tmp_path / "new.parquet")], "model 'churn' has no alias 'nope'"),
        (["--output", str(out)], "already exists; pass --overwrite"),
    ]
    for extra, message in cases:
        proc = subprocess.run([*cmd, "run", "score", "--input", str(src), *extra], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert out.read_bytes() == b"earlier"
    proc = subprocess.run([*cmd, "compile", "-o", str(tmp_path / "compiled")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "compiled").iterdir()) == ["driftloop-score.yaml", "driftloop-train.yaml"]


def test_cli_run_score_without_ids_keeps_columns_and_says_the_alert_was_not_sent(tmp_path, trained):
    """The issue's case: scenario rows (no id column), a drifted batch, no webhook token where the step runs.
    The summary numbers the rows, names the columns kept and says the drift alert was not sent and why;
    the tasks' output is in the run's log file only, never on the terminal, during the run or after it."""
    import os
    import re
    import subprocess
    import sys

    base, _ = trained
    frame = generate(rows=1_500, drift_at=0.0, seed=3)  # event_time, features, label: no id
    src, out = tmp_path / "scenario.parquet", tmp_path / "scored.parquet"
    frame.to_parquet(src, index=False)
    env = {k: v for k, v in os.environ.items() if k != "DRIFTLOOP_WEBHOOK_TOKEN"}
    env.update({"DRIFTLOOP_WORKSPACE": str(base.workspace_dir), "DRIFTLOOP_MLFLOW__MODEL_NAME": "churn",
                "DRIFTLOOP_MLFLOW__EXPERIMENT": "test", "COLUMNS": "200"})
    proc = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "run", "score", "--input", str(src), "--output",
                           str(out), "--keep-columns", "label,event_time", "--chunks", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "identified by" in text and "row number (column 'row', from 0)" in text
    assert re.search(r"columns kept\s+│ label, event_time", text), text
    assert re.search(r"batch drift\s+│ drifted", text), text
    assert re.search(r"drift alert\s+│ not sent: DRIFTLOOP_WEBHOOK_TOKEN is not set in the scoring step's "
                     r"environment \(the monitor's webhook needs it\)", text), text
    got = pd.read_parquet(out)
    assert got["row"].tolist() == list(range(len(frame))) and got["label"].tolist() == frame["label"].tolist()
    # one run id: the summary's pipeline run names the log file, which holds every task's output
    run_id = re.search(r"pipeline run\s+│ ([0-9a-f]{32})", text).group(1)
    log = Path(re.search(r"task output\s+│ (\S+\.log)", text).group(1))
    assert log.name == f"score-{run_id}.log" and log.read_text().count("KFP Executor") >= 4
    for noise in ("KFP Executor", "executor_input", "Running pipeline", "Wrote executor output", "Task '"):
        assert noise not in text, text
    assert len(text.splitlines()) < 25, text

