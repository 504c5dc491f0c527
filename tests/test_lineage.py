"""Lineage: the chain from trigger to rollout, read back from what the loop recorded."""

import pytest
from typer.testing import CliRunner

from driftloop.core.errors import RegistryError
from driftloop.app.lineage import build_lineage


def test_lineage_of_champion(trained):
    settings, result = trained
    lin = build_lineage(settings, "churn@champion")
    assert lin.version == result.summary["model_version"]
    assert set(lin.aliases) >= {"champion"}
    assert lin.trigger == "manual"
    assert lin.mlflow_run_id == result.summary["mlflow_run_id"]
    assert lin.pipeline_run_id and "2026-01" in lin.data_window
    assert lin.gate == "passed" and "bootstrap" in lin.gate_reason
    assert lin.metrics["accuracy"] == pytest.approx(result.summary["metrics"]["accuracy"])
    assert lin.rollout_outcome == "bootstrap"
    assert build_lineage(settings, "churn").version == lin.version
    assert build_lineage(settings, f"churn/{lin.version}").mlflow_run_id == lin.mlflow_run_id


def test_lineage_unknown_version_is_a_clear_error(trained):
    settings, _ = trained
    with pytest.raises(RegistryError, match="not found"):
        build_lineage(settings, "churn/999")
    with pytest.raises(RegistryError, match="no alias 'blue'"):
        build_lineage(settings, "churn@blue")


def test_lineage_cli(trained):
    from driftloop.app.cli import app

    settings, _ = trained
    out = CliRunner().invoke(app, ["lineage", "churn@champion", "-p", f"workspace={settings.workspace_dir}",
                                   "-p", "mlflow.experiment=test"])
    assert out.exit_code == 0, out.output
    assert "trigger: manual" in out.output and "gate: passed" in out.output
