"""``driftloop agent``: simulate prints the figures (table, JSON, plot), recommend reports right-sizing,
decisions shows the log, patch renders the InferenceService patch; bad input is one clear error."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from driftloop.app import cli
from driftloop.app.cli import app
from driftloop.core.errors import DriftloopError
from serving.agent.recommend import parse_cpu, parse_memory, recommend

runner = CliRunner()


def args(tmp_path) -> list[str]:
    return ["-p", f"workspace={tmp_path}", "-p", "agent.forecast_engine=numpy"]


def test_simulate_json_and_plot(tmp_path) -> None:
    png = tmp_path / "daily.png"
    out = runner.invoke(app, ["agent", "simulate", "--synthetic", "growth", "--baseline", "hpa,static", "--json",
                              "--plot", str(png), *args(tmp_path)])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)  # the JSON alone on stdout, whatever a library logs (stderr)
    rows = {r["policy"]: r for r in doc["results"]}
    assert set(rows) == {"agent", "hpa", "static"}
    assert rows["agent"]["slo_violation_minutes"] < rows["hpa"]["slo_violation_minutes"]
    assert 0.85 <= rows["agent"]["interval_coverage"] <= 0.95
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_a_trace_file_prints_the_table(tmp_path) -> None:
    t = np.arange(4 * 1440) * 60
    rate = 50 + 150 * np.exp(-(((t / 60) % 1440 - 720) / 180.0) ** 2)
    trace = tmp_path / "trace.parquet"
    pd.DataFrame({"timestamp": t + 1_700_000_000, "requests": np.round(rate * 60)}).to_parquet(trace)
    out = runner.invoke(app, ["agent", "simulate", "--trace", str(trace), "--baseline", "kpa", *args(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "agent" in out.output and "kpa" in out.output and "SLO" in out.output


def test_simulate_a_real_trace_slice(tmp_path) -> None:
    out = runner.invoke(app, ["agent", "simulate", "--real", "bank-calls", "--history-days", "15", "--eval-days", "1",
                              "--baseline", "kpa", "--json", *args(tmp_path)])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)  # the JSON alone on stdout, whatever a library logs (stderr)
    rows = {r["policy"]: r for r in doc["results"]}
    assert doc["trace"] == "bank-calls" and rows["agent"]["minutes"] == 1440
    assert rows["agent"]["slo_violation_minutes"] <= rows["kpa"]["slo_violation_minutes"]


@pytest.mark.parametrize("argv, message", [
    (["agent", "simulate", "--real", "taxis"], "--real must be one of"),
    (["agent", "simulate", "--synthetic", "daily", "--eval-days", "2"], "cut a --real trace"),
    (["agent", "simulate"], "exactly one of --trace"),
    (["agent", "simulate", "--synthetic", "hourly"], "--synthetic must be one of"),
    (["agent", "simulate", "--synthetic", "daily", "--baseline", "vpa"], "unknown baseline(s) vpa"),
    (["agent", "simulate", "--trace", "/no/such.csv"], "trace file not found"),
    (["agent", "run", "--mode", "yolo"], "--mode must be one of"),
    (["agent", "recommend", "--usage", "/no/such.csv"], "usage file not found"),
])
def test_bad_input_is_one_clear_error(tmp_path, monkeypatch, capsys, argv, message) -> None:
    monkeypatch.setattr("sys.argv", ["driftloop", *argv, *args(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_trace_without_timestamps_is_refused_by_name(tmp_path) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("when,requests\n1,2\n2,3\n")
    out = runner.invoke(app, ["agent", "simulate", "--trace", str(bad), *args(tmp_path)])
    assert isinstance(out.exception, DriftloopError) and "'timestamp' column" in str(out.exception)


def test_recommend_is_a_report_with_margin_and_idle_models(tmp_path) -> None:
    rng = np.random.default_rng(0)
    n = 2000
    usage = pd.DataFrame({
        "timestamp": np.tile(np.arange(n) * 60.0, 2),
        "model": ["fraud"] * n + ["legacy"] * n,
        "cpu": np.concatenate([rng.uniform(0.1, 0.3, n), rng.uniform(0.0, 0.01, n)]),
        "memory": np.concatenate([rng.uniform(300, 400, n) * 2**20, np.full(n, 200 * 2**20)]),
        "rps": np.concatenate([rng.uniform(20, 40, n), np.zeros(n)]),
    })
    recs = {r.model: r for r in recommend(usage, current={"fraud": ("1", "1Gi")})}
    fraud = recs["fraud"]
    assert 0.27 * 1.15 <= parse_cpu(fraud.cpu_request) <= 0.3 * 1.15 + 0.002  # p90 + 15 %
    assert parse_memory(fraud.memory_request) == pytest.approx(400 * 2**20 * 1.15, rel=0.01)
    assert fraud.memory_limit == fraud.memory_request and not fraud.idle and "cpu -" in fraud.note
    assert recs["legacy"].idle and "consolidate" in recs["legacy"].note
    path = tmp_path / "usage.csv"
    usage.to_csv(path, index=False)
    out = runner.invoke(app, ["agent", "recommend", "--usage", str(path), "--json", *args(tmp_path)])
    assert out.exit_code == 0, out.output
    assert {r["model"] for r in json.loads(out.output)} == {"fraud", "legacy"}
    with pytest.raises(ValueError, match="column"):
        recommend(usage.drop(columns=["memory"]))


def test_decisions_and_patch(tmp_path) -> None:
    from serving.agent.agent import agent_paths
    from serving.agent.decisions import DecisionLog
    from serving.agent.policy import SET_FLOOR, Action, Guard, Policy
    from driftloop.core.config import load_settings

    s = load_settings(overrides=[f"workspace={tmp_path}"], environ={})
    log = DecisionLog(agent_paths(s)["decisions"])
    log.record(Guard(Policy(mode="observe")).check(Action(SET_FLOOR, "m", 4, 1, "ramp ahead"), 1_780_000_000))
    out = runner.invoke(app, ["agent", "decisions", *args(tmp_path)])
    assert out.exit_code == 0 and "observe mode" in out.output and "set_floor 1->4" in out.output
    out = runner.invoke(app, ["agent", "patch", "--replicas", "4", *args(tmp_path)])
    assert out.exit_code == 0 and "minReplicas: 4" in out.output and "kind: InferenceService" in out.output
