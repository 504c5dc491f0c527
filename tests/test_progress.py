"""The progress view of a run, the task server behind kfp.local, and what the Kubeflow UI shows.

`driftloop run train` prints one line per task (not the executors' hundreds of lines), keeps the
full log in a file, streams it with ``-v``; every task runs KFP's executor in a process forked
from the run's task server; the gate decision and the data summary are Markdown artifacts, in the
compiled YAML and in a kfp.local run's outputs.
"""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import make_settings

STEPS = ("ingest", "validate", "train", "evaluate", "register", "deploy")


def _config(tmp_path: Path, source: Path) -> Path:
    cfg = tmp_path / "driftloop.yaml"
    cfg.write_text(yaml.safe_dump({
        "workspace": str(tmp_path / "ws"),
        "data": {"source": str(source), "time_column": "event_time", "reference_size": 1000},
        "mlflow": {"model_name": "churn", "experiment": "test"},
        "model": {"params": {"max_iter": 50}},
    }))
    return cfg


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, scenario_path):
    """One `driftloop run train` through the CLI (in process), with the task server."""
    from driftloop.app.cli import app

    tmp = tmp_path_factory.mktemp("progress")
    cfg = _config(tmp, scenario_path)
    out = CliRunner().invoke(app, ["run", "train", "-c", str(cfg), "--window-end", "2026-01-31"])
    return tmp, out


def test_run_train_prints_one_line_per_task_and_where_the_full_log_is(cli_run):
    tmp, out = cli_run
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    for step in STEPS:
        task_lines = [line for line in lines if re.match(rf"^\S+ {step}\s+succeeded\s+\d+\.\d+s", line)]
        assert len(task_lines) == 1, (step, out.output)
    assert re.search(r"^\S+ ingest\s+succeeded\s+\d+\.\d+s\s+\d+ rows", out.output, re.M), out.output
    assert re.search(r"^\S+ evaluate\s+succeeded .*gate PASS", out.output, re.M), out.output
    assert re.search(r"^\S+ register\s+succeeded .*version 1", out.output, re.M), out.output
    # the executors' output is in the log file, not on the terminal
    assert "KFP Executor" not in out.output and "executor_input" not in out.output
    log_path = Path(re.search(r"task output: (\S+\.log)", out.output).group(1))
    log = log_path.read_text()
    assert log.count("KFP Executor") > 20 and "Wrote executor output file" in log
    assert len(lines) < 40, out.output  # header, log path, six task lines, the summary table


def test_every_task_ran_kfps_executor_and_the_task_server_stays_warm_until_closed(cli_run):
    tmp, out = cli_run
    log = Path(re.search(r"task output: (\S+\.log)", out.output).group(1)).read_text()
    # kfp.dsl.executor_main ran for each task: it logs where it loaded the component from
    assert log.count("Loading KFP component") == len(STEPS)
    assert "ephemeral_component.py" in log
    from driftloop.core.processes import process_alive
    from pipelines.runner import _warm

    server_log = (tmp / "ws" / "pipeline-root" / "logs" / "task-server.log").read_text()
    (pid,) = re.findall(r"task server (\d+): ready", server_log)
    _warm.close()  # what the process does on its way out (atexit); it also dies with the process
    assert not process_alive(int(pid)), "the task server outlived its close"


def test_the_gate_decision_and_data_summary_are_markdown_outputs_of_a_local_run(cli_run):
    tmp, out = cli_run
    root = tmp / "ws" / "pipeline-root"
    (gate,) = [p for p in root.rglob("gate_report") if p.is_file()]
    text = gate.read_text()
    assert text.startswith("# Gate: PASSED")
    assert "first model passes by the bootstrap rule" in text and "| **accuracy** |" in text
    (summary,) = [p for p in root.rglob("data_summary") if p.is_file()]
    text = summary.read_text()
    assert "| column | kind | missing (train / test) | range / levels | unseen in test |" in text
    assert re.search(r"\| `\w+` \| numeric \| \d+\.\d% / \d+\.\d% \| -?[\d.e+-]+ \.\. -?[\d.e+-]+ \| \|", text), text
    assert re.search(r"\| `\w+` \| categorical \| \d+\.\d% / \d+\.\d% \| .+ \| none \|", text), text


def test_compiled_yaml_declares_the_markdown_artifacts(tmp_path):
    from pipelines.training import compile_pipeline

    settings = make_settings(tmp_path, tmp_path / "x.parquet")
    spec = next(yaml.safe_load_all(compile_pipeline(settings, tmp_path / "train.yaml").read_text()))
    outputs = {name: comp.get("outputDefinitions", {}).get("artifacts", {}) for name, comp in spec["components"].items()}
    assert outputs["comp-evaluate-op"]["gate_report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert outputs["comp-validate-op"]["data_summary"]["artifactType"]["schemaTitle"] == "system.Markdown"


def test_decision_markdown_shows_both_models_the_delta_and_the_reason():
    from components.evaluate import decision_markdown, gate

    d = gate({"accuracy": 0.81, "f1": 0.7}, {"accuracy": 0.84, "f1": 0.72}, metric="accuracy", margin=0.01,
             champion_version="3")
    text = decision_markdown(d, margin=0.01)
    assert text.startswith("# Gate: REJECTED")
    assert "| metric | new model | champion v3 | delta |" in text
    assert "| **accuracy** | 0.8100 | 0.8400 | -0.0300 |" in text
    assert "| f1 | 0.7000 | 0.7200 | -0.0200 |" in text
    assert d.reason in text and "margin 0.01" in text


def test_data_summary_names_gaps_ranges_levels_and_unseen_levels():
    from components.validate import data_summary_markdown, validate_frames

    train = pd.DataFrame({"x": [1.0, None, 3.0, 4.0], "c": ["a", "b", "a", "b"], "label": [0, 1, 0, 1]})
    test = pd.DataFrame({"x": [2.0, 5.0], "c": ["a", "z"], "label": [1, 0]})
    schema = validate_frames(train, test, target="label", task="classification", max_unseen_share=1.0)
    text = data_summary_markdown(train, test, schema)
    assert "4 training rows, 2 test rows; target `label` (classification), classes 0, 1." in text
    assert "| `x` | numeric | 25.0% / 0.0% | 1 .. 4 | |" in text
    assert "| `c` | categorical | 0.0% / 0.0% | a, b | z (50.0% of rows) |" in text
    assert "Sparse columns" not in text  # 1 gap in 6 values: under the 30 % note


def test_verbose_streams_the_task_log_and_a_failure_is_one_task_line(tmp_path, scenario_path):
    from driftloop.app.cli import app

    source = tmp_path / "no-time-column.parquet"
    pd.read_parquet(scenario_path).drop(columns=["event_time"]).to_parquet(source)
    cfg = _config(tmp_path, source)
    quiet = CliRunner().invoke(app, ["run", "train", "-c", str(cfg)])
    assert quiet.exit_code == 1
    assert len(re.findall(r"^\S+ ingest\s+failed\s+\d+\.\d+s\s+time column 'event_time' is not in",
                          quiet.output, re.M)) == 1, quiet.output
    assert "KFP Executor" not in quiet.output
    loud = CliRunner().invoke(app, ["run", "train", "-c", str(cfg), "-v"])
    assert loud.exit_code == 1
    assert "KFP Executor" in loud.output and "Loading KFP component" in loud.output
    assert re.search(r"^\S+ ingest\s+failed", loud.output, re.M)


def test_step_detail_reads_each_training_steps_key_output():
    from pipelines.training import step_detail

    assert step_detail("ingest_op", {"parameterValues": {"rows": 4000, "window": "a .. b"}}) == "4000 rows, window a .. b"
    assert step_detail("evaluate_op", {"parameterValues": {"passed": False, "reason": "too weak"}}) == \
        "gate REJECT: too weak"
    assert step_detail("register_op", {"parameterValues": {"version": "2", "aliases": "challenger"}}) == \
        "version 2 (challenger)"
    meta = {"artifacts": {"schema": {"artifacts": [{"metadata": {"numeric": ["a", "b"], "categorical": ["c"]}}]}}}
    assert step_detail("validate_op", meta) == "2 numeric, 1 categorical columns"


def test_only_kfps_own_task_script_goes_to_the_task_server():
    import sys

    from pipelines.task_server import parse_task_command

    from components.ops import ingest_op

    container = ingest_op.component_spec.implementation.container
    cmd = [c.replace("python3", sys.executable) if i == 2 else c for i, c in enumerate(container.command)]
    cmd += ["--executor_input", "{}", "--function_to_execute", "ingest_op"]
    source, args = parse_task_command(cmd)
    assert "def ingest_op(" in source and args == ["--executor_input", "{}", "--function_to_execute", "ingest_op"]
    assert parse_task_command(["sh", "-ec", "rm -rf /", "x"]) is None
    assert parse_task_command([cmd[0], cmd[1], cmd[2].replace(sys.executable, "/usr/bin/other-python"), *cmd[3:]]) is None
    assert parse_task_command(["python3", "-m", "kfp.dsl.executor_main"]) is None
    json.dumps(cmd)  # what travels to the server is plain JSON


def test_run_train_wait_on_kubeflow_prints_one_line_per_task_from_the_runs_task_states(tmp_path, scenario_path,
                                                                                        monkeypatch):
    import datetime as dt

    import kfp_server_api as api

    import pipelines.runner as runner_mod
    from driftloop.app.cli import app
    from tests.kfp_recording import RecordingKfpClient

    t0 = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)

    def task(tid, name, state, start=0, end=None, error=None):
        return api.V2beta1PipelineTaskDetail(
            task_id=tid, display_name=name, state=state, start_time=t0 + dt.timedelta(seconds=start),
            end_time=None if end is None else t0 + dt.timedelta(seconds=end),
            error=api.GoogleRpcStatus(message=error) if error else None)

    snapshots = [
        ("RUNNING", [task("0", "root", "RUNNING"), task("1", "ingest-driver", "SUCCEEDED", 0, 1),
                     task("2", "ingest", "RUNNING", 1)]),
        ("RUNNING", [task("2", "ingest", "SUCCEEDED", 1, 13), task("3", "validate", "RUNNING", 13)]),
        ("FAILED", [task("2", "ingest", "SUCCEEDED", 1, 13),
                    task("3", "validate", "FAILED", 13, 20, "column 'tenure': 40.0% missing values")]),
    ]

    class Client(RecordingKfpClient):
        def get_run(self, run_id):
            self._record("get_run", run_id)
            state, tasks = snapshots.pop(0) if len(snapshots) > 1 else snapshots[0]
            run = next(r for r in self.runs if r.run_id == run_id)
            run.state, run.run_details = state, api.V2beta1RunDetails(task_details=tasks)
            return run

    client = Client()
    monkeypatch.setattr(runner_mod.KfpRunner, "client", property(lambda self: client))
    monkeypatch.setattr(runner_mod, "KFP_POLL_SECONDS", 0.0)
    monkeypatch.setenv("DRIFTLOOP_WORKSPACE", str(tmp_path / "ws"))
    out = CliRunner().invoke(app, ["run", "train", "--kfp-host", "http://kfp.example:8888", "--wait",
                                   "-p", f"data.source={scenario_path}",
                                   "-p", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    assert out.exit_code == 1, out.output
    assert "run failed: run run-" in out.output and "ended FAILED on Kubeflow" in out.output
    lines = out.output.splitlines()
    assert [line for line in lines if re.match(r"^\S+ ingest\s+succeeded\s+12\.0s", line)], out.output
    assert len([line for line in lines if re.match(r"^\S+ validate\s+failed\s+7\.0s\s+column 'tenure'", line)]) == 1
    assert not any("driver" in line or line.startswith("root") for line in lines), out.output
    assert [name for name, _ in client.calls].count("get_run") == 3
    assert "wait_for_run_completion" not in client.names()


def _alerts_column(output: str, index: int) -> str:
    """One column of the alerts table, its folded lines joined (spaces dropped)."""
    cells = [line.split("│")[index + 1] for line in output.splitlines() if line.count("│") == 4]
    return "".join("".join(cells).split())


def test_alerts_fit_80_columns_and_json_parses(tmp_path, monkeypatch):
    """In 80 columns (a pipe's width) every column stays on screen: the longest alert ids, a long model name
    and a full pipeline run id fold instead of pushing the right-hand columns off (issue: cropped when piped)."""
    from driftloop.app.cli import app, console
    from monitoring.alerts import Alert, AlertStore

    model = "churn-propensity-gradient-boosted-eu-west"
    run_id = "e75d1be132ef46c1ad1302f1b2502060"
    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet")
    store = AlertStore.from_settings(settings)
    store.insert(Alert("drift-0123456789abcdef", "drift", created=1_780_000_000.0, samples=500,
                       report_path=str(tmp_path / "ws" / "monitor" / "reports" / "drift-0123456789abcdef" / "drift.html")))
    store.record_decision("drift-0123456789abcdef", "started", "retraining run started for the drifted window "
                          "2026-01-01 .. 2026-01-31 (12 of 20 columns drifted)", now=1_780_000_001.0)
    store.update("drift-0123456789abcdef", pipeline_run_id=run_id, run_state="SUCCEEDED", model_version="7")
    store.insert(Alert("quality-82f8bd1b5ba58c63", "quality", created=1_780_000_050.0))
    store.record_decision("quality-82f8bd1b5ba58c63", "insufficient_samples", "100 rows < trigger.min_samples=300",
                          now=1_780_000_051.0)
    store.insert(Alert("am-fedcba9876543210", "alertmanager", created=1_780_000_100.0))
    store.record_decision("am-fedcba9876543210", "insufficient_samples", "only 12 samples in the window; "
                          "trigger.min_samples is 500", now=1_780_000_101.0)
    store.close()
    for key, value in {"WORKSPACE": str(settings.workspace_dir), "MLFLOW__MODEL_NAME": model,
                       "MLFLOW__EXPERIMENT": "test"}.items():
        monkeypatch.setenv(f"DRIFTLOOP_{key}", value)
    monkeypatch.setattr(console, "width", 80)
    table = CliRunner().invoke(app, ["alerts"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert max(len(line) for line in lines) <= 80, table.output
    assert all(line.endswith(("│", "╮", "╯", "┤")) for line in lines if line.startswith(("│", "╭", "╰", "├"))), \
        table.output  # the right-hand border is there: no column was cropped
    first = _alerts_column(table.output, 0)
    for alert_id in ("drift-0123456789abcdef", "quality-82f8bd1b5ba58c63", "am-fedcba9876543210"):
        assert alert_id in first, table.output
    assert "insufficient_samples" in table.output
    reasons = " ".join(line.split("│")[2].strip() for line in lines if line.count("│") == 4)
    assert "only 12 samples in the window; trigger.min_samples is 500" in reasons  # folded, nothing cut off
    runs = _alerts_column(table.output, 2)
    assert f"{run_id}{model}v7SUCCEEDED" in runs  # the whole run id, the model and the run's state
    as_json = CliRunner().invoke(app, ["alerts", "--json"])
    assert as_json.exit_code == 0, as_json.output
    alerts = {a["id"]: a for a in json.loads(as_json.output)["alerts"]}
    started = alerts["drift-0123456789abcdef"]
    assert started["decision"] == "started" and started["model_version"] == "7" and started["model"] == model
    assert started["pipeline_run_id"] == run_id and started["report_path"].endswith("drift.html")
    assert alerts["am-fedcba9876543210"]["reason"].endswith("trigger.min_samples is 500")


def test_one_run_id_names_the_log_file_the_lineage_and_the_alert(cli_run, monkeypatch):
    """The id a local run prints is the one its log file is named by, the one `driftloop lineage` shows as
    the pipeline run (kfp.local's own would be a random number) and the one `driftloop alerts` shows."""
    from driftloop.app.cli import app, console
    from monitoring.alerts import Alert, AlertStore
    from tests.conftest import make_settings as settings_for

    tmp, out = cli_run
    run_id = re.search(r"pipeline run\s+│ ([0-9a-f]{32})", out.output).group(1)
    log_path = Path(re.search(r"task output: (\S+\.log)", out.output).group(1))
    assert log_path.name == f"{run_id}.log"
    cfg = str(tmp / "driftloop.yaml")
    lineage = CliRunner().invoke(app, ["lineage", "churn@champion", "--json", "-c", cfg])
    assert lineage.exit_code == 0, lineage.output
    assert json.loads(lineage.output)["pipeline_run_id"] == run_id
    store = AlertStore.from_settings(settings_for(tmp / "ws", tmp / "none.parquet"))
    store.insert(Alert("drift-00112233445566aa", "drift", created=1_780_000_000.0))
    store.record_decision("drift-00112233445566aa", "started", "guardrails passed", now=1_780_000_001.0)
    store.update("drift-00112233445566aa", pipeline_run_id=run_id, run_state="SUCCEEDED", model_version="1")
    store.close()
    monkeypatch.setattr(console, "width", 80)
    table = CliRunner().invoke(app, ["alerts", "-c", cfg])
    assert table.exit_code == 0, table.output
    assert run_id in _alerts_column(table.output, 2), table.output


def test_a_local_runs_progress_lines_take_the_pipelines_own_step_names_and_details(tmp_path):
    """The runner knows no pipeline: a task is named and described by the pipeline being run."""
    from driftloop.core.runs import Pipeline
    from pipelines.runner import TaskEvent, _Watched

    output = tmp_path / "executor_output.json"
    output.write_text(json.dumps({"parameterValues": {"rows": 7}}))
    pipeline = Pipeline(name="p", description="", build=lambda: None, compile=lambda d: d, summarize=lambda r: {},
                        step_names={"count_op": "count rows"},
                        step_detail=lambda func, out: f"{func}: {out['parameterValues']['rows']} rows")

    class Finished:
        returncode = 0

        def wait(self, timeout=None):
            return 0

    events: list[TaskEvent] = []
    _Watched(Finished(), "count_op", str(output), events.append, pipeline).wait()
    _Watched(Finished(), "other_op", str(output), events.append, Pipeline("q", "", lambda: None, lambda d: d,
                                                                           lambda r: {})).wait()
    assert [(e.task, e.state, e.detail) for e in events] == [
        ("count rows", "running", ""), ("count rows", "succeeded", "count_op: 7 rows"),
        ("other_op", "running", ""), ("other_op", "succeeded", "")]


def test_every_step_of_both_pipelines_has_a_name_in_the_progress_lines(tmp_path):
    from pipelines.scoring import scoring_pipeline_for
    from pipelines.training import training_pipeline_for

    one = make_settings(tmp_path, tmp_path / "x.parquet")
    many = make_settings(tmp_path, tmp_path / "x.parquet", **{"model.learner": "xgboost",
                                                             "model.params": {"n_estimators": 10},
                                                             "model.distributed.workers": 2})
    for pipeline in (training_pipeline_for(one), training_pipeline_for(many), scoring_pipeline_for(one)):
        spec = next(yaml.safe_load_all(pipeline.compile(tmp_path / pipeline.name).read_text()))
        functions = set()
        for executor in spec["deploymentSpec"]["executors"].values():
            args = executor["container"]["args"]
            functions.add(args[args.index("--function_to_execute") + 1])
        assert functions and functions <= set(pipeline.step_names), (pipeline.name, functions)
