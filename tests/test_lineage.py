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
    assert lin.data_window.startswith("[-inf, 2026-01-31): rows 2026-01-01")  # asked half-open, then the rows read
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


def test_lineage_shows_the_alerts_run_window_half_open_in_data_time_and_its_outcome(tmp_path):
    """The alert behind a trigger: the window its run was given (the data's, not the wall clock's), printed
    half-open, the drifted windows counted on it and what became of its run."""
    from driftloop.app.lineage import _alert_detail
    from monitoring.alerts import Alert, AlertStore, alerts_path
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet")
    store = AlertStore(alerts_path(settings))
    try:
        store.insert(Alert("drift-1", "drift", details={"drifted_columns": ["tenure"], "share": 0.6}, samples=500))
        store.record_decision("drift-1", "started", "guardrails passed", now=1.0)
        store.update("drift-1", started=1.0, window_start="2014-12-24T18:00:01+00:00",
                     window_end="2014-12-31T18:00:01+00:00", outcome="rolled_back",
                     outcome_reason="v2 was rolled back: canary error rate 9 %")
        step = store.record_verdict("churn", "drift", "1", failed=True, window="w1", now=1.0, resolve_after=3)
        store.bind_alert(step.episode.seq, "drift-1")
        store.update("drift-1", episode=step.episode.seq)
        store.record_verdict("churn", "drift", "1", failed=True, window="w2", now=2.0, resolve_after=3)
    finally:
        store.close()
    detail = _alert_detail(settings, "drift-1")
    assert detail["data window"] == "[2014-12-24T18:00:01+00:00, 2014-12-31T18:00:01+00:00)"
    assert detail["drift windows"] == 2
    assert detail["run outcome"] == "rolled_back: v2 was rolled back: canary error rate 9 %"
