"""The whole training pipeline under kfp.local, both gate branches, and the compiled YAML."""

import yaml
from typer.testing import CliRunner

from driftloop.core.registry import CHALLENGER, CHAMPION, TAG, Registry
from pipelines.runner import LocalRunner, RunRequest
from pipelines.training import run_training
from tests.conftest import make_settings


def test_first_run_registers_champion_and_challenger(trained):
    settings, result = trained
    s = result.summary
    assert s["gate"] == "passed" and "bootstrap" in s["reason"]
    assert s["model_version"] == "1" and set(s["aliases"]) == {CHAMPION, CHALLENGER}
    assert s["train_rows"] > 0 and s["test_rows"] > 0 and s["metrics"]["accuracy"] > 0.6
    registry = Registry.from_settings(settings)
    v = registry.resolve("churn@champion")
    assert v.tags[TAG.TRIGGER] == "manual" and v.tags[TAG.PIPELINE_RUN]
    assert "2026-01" in v.tags[TAG.WINDOW]
    run = registry.run(v.run_id)
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"train", "test"}
    assert len(registry.reference_sample("churn@champion")) == 1000
    schema = registry.schema("churn@champion")
    assert "region" in schema["categorical"]
    model = registry.load_pyfunc("models:/churn@champion")
    assert model.metadata.signature is not None


def test_gate_rejects_and_registry_is_unchanged(trained):
    settings, _ = trained
    strict = make_settings(settings.workspace_dir, settings.data.source, **{"gate.margin": 0.5})
    before = Registry.from_settings(strict).list_versions("churn")
    result = run_training(LocalRunner(strict), RunRequest(trigger="drift:alert-42", window_end="2026-01-31"))
    assert result.state == "SUCCEEDED"
    assert result.summary["gate"] == "rejected" and "does not beat" in result.summary["reason"]
    assert result.summary["trigger"] == "drift:alert-42"
    assert "model_version" not in result.summary
    registry = Registry.from_settings(strict)
    assert registry.list_versions("churn") == before
    assert registry.resolve("churn@champion").version == "1"


def test_regression_pipeline(tmp_path, scenario_path):
    from driftloop.app.scenario import write_scenario

    source = write_scenario(tmp_path / "reg.parquet", "regression", rows=3000)
    settings = make_settings(tmp_path / "ws", source, **{"model.task": "regression", "mlflow.model_name": "spend",
                                                         "gate.metric": "rmse"})
    result = run_training(LocalRunner(settings), RunRequest(trigger="schedule:nightly"))
    assert result.state == "SUCCEEDED", result.error
    assert result.summary["gate"] == "passed" and result.summary["model_version"] == "1"
    assert {"rmse", "mae", "r2"} <= set(result.summary["metrics"])
    v = Registry.from_settings(settings).resolve("spend@challenger")
    assert v.tags[TAG.SCHEDULE] == "nightly"


def test_bad_data_fails_clearly_and_registers_nothing(tmp_path, scenario_path):
    import pandas as pd

    df = pd.read_parquet(scenario_path).sort_values("event_time", kind="stable").reset_index(drop=True)
    df.loc[len(df) // 2 :, "tenure"] = None  # the feed broke half-way: the newest rows lost the column
    bad = tmp_path / "bad.parquet"
    df.to_parquet(bad)
    settings = make_settings(tmp_path / "ws", bad)
    result = run_training(LocalRunner(settings), RunRequest())
    assert result.state == "FAILED"
    assert "validate" in result.error and "'tenure'" in result.error and "max_missing_increase" in result.error
    assert Registry.from_settings(settings).list_versions("churn") == []


def test_compiled_yaml_has_gate_accelerator_toleration_and_secret(tmp_path):
    from pipelines.training import compile_pipeline

    settings = make_settings(tmp_path, tmp_path / "x.parquet", **{"model.gpu": True, "model.learner": "xgboost", "model.params": {"n_estimators": 40},
                                                                   "model.gpu_node_selector": {"gpu": "h100"}})
    path = compile_pipeline(settings, tmp_path / "train.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    spec, platform = docs[0], docs[1]
    train_exec = spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]
    assert train_exec["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert train_exec["resources"]["accelerator"]["resourceCount"] == "1"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train-op"]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert k8s["exec-train-op"]["nodeSelector"]["labels"] == {"gpu": "h100"}
    assert k8s["exec-register-op"]["secretAsEnv"][0]["secretName"] == "driftloop-mlflow"
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]
    conditions = [t["triggerPolicy"]["condition"] for t in branches.values()]
    assert any("evaluate-op-passed" in c and "== true" in c for c in conditions)
    assert spec["root"]["inputDefinitions"]["parameters"]["learner"]["defaultValue"] == "xgboost"
    # no per-task pip install of kfp on the embedded default or in the image
    assert "pip install" not in " ".join(train_exec["command"])


def test_cli_compile_and_user_errors_without_traceback(tmp_path):
    from driftloop.app.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["compile", "-o", str(tmp_path), "-p", f"workspace={tmp_path}"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "driftloop-train.yaml").exists()


def test_cli_reports_errors_as_one_line(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  learner: deep_forest\n")
    proc = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "run", "train", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.learner" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "run", "train", "-p", f"workspace={tmp_path}",
                           "-p", f"data.source={tmp_path / 'missing.parquet'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "data source not found" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_the_deploy_step_gets_only_its_part_of_the_configuration(tmp_path):
    """Not the whole settings document: the workspace, MLflow, serving and rollout sections, as one typed
    parameter; the compiled package still parses as the KFP backend parses an upload."""
    import json

    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from components.deploy import DeployConfig
    from pipelines.training import compile_pipeline

    settings = make_settings(tmp_path / "ws", tmp_path / "x.parquet", **{"rollout.step_weights": [10, 50],
                                                                         "rollout.shadow_percent": 5.0,
                                                                         "serving.canary_port": 9123})
    spec = next(yaml.safe_load_all(compile_pipeline(settings, tmp_path / "train.yaml").read_text()))
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # refuses an unknown field
    assert set(spec["components"]["comp-deploy-op"]["inputDefinitions"]["parameters"]) == {
        "version", "serving_home", "deploy_config"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "settings_json" not in params
    document = params["deploy_config"]["defaultValue"]
    assert set(json.loads(document)) == {"workspace", "mlflow", "serving", "rollout"}
    rebuilt = DeployConfig.model_validate_json(document).settings()
    assert rebuilt.workspace_dir == settings.workspace_dir and rebuilt.tracking_uri == settings.tracking_uri
    assert (rebuilt.mlflow, rebuilt.serving, rebuilt.rollout) == (settings.mlflow, settings.serving, settings.rollout)
