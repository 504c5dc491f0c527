"""Every table of the CLI fits an 80-column terminal (a pipe's width), and ``--json`` carries every field.

Each command reads data written here directly (no server, no pipeline run), with realistic long
values: long model and schedule names, long reasons and URIs. A table must keep every line within
80 columns, fold free text instead of cutting it, and still show the values a person looks for.
``driftloop alerts`` has its own test in ``tests/test_progress.py``, beside the run ids it shows.
"""

from __future__ import annotations

import json
import os
import types
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import make_settings

MODEL = "churn-propensity-gradient-boosted-eu-west"


@pytest.fixture()
def narrow(monkeypatch):
    """The CLI's console as an 80-column terminal; returns a runner of ``driftloop …``."""
    from driftloop.app.cli import app
    from driftloop.core.console import console

    monkeypatch.setattr(console, "width", 80)

    def invoke(*args: str):
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    return invoke


def fits(output: str) -> str:
    assert max(len(line) for line in output.splitlines()) <= 80, output
    return output


def column(output: str, index: int, columns: int) -> str:
    """The text of one table column, its folded and wrapped lines joined (spaces dropped)."""
    cells = [line.split("│")[index + 1] for line in output.splitlines() if line.count("│") == columns + 1]
    return "".join("".join(cells).split())


def test_schedule_list(tmp_path, monkeypatch, narrow):
    from pipelines.schedule import LocalSchedules, Schedule

    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet")
    monkeypatch.setenv("DRIFTLOOP_WORKSPACE", str(settings.workspace_dir))
    store = LocalSchedules.from_settings(settings)
    now = datetime(2026, 1, 30, 12, tzinfo=timezone.utc)
    source = "s3://driftloop-data/exports/churn/eu-west/daily/latest.parquet"
    store.create(Schedule("nightly-retrain-churn-propensity-eu-west", "0 3 * * *",
                          {"data.source": source, "model.params.max_iter": "500"}, 30, 2, False), now=now)
    store.create(Schedule("weekly-score", "15 4 * * 1", {"score.input": "s3://b/in.parquet",
                                                          "score.output": "s3://b/out.parquet"},
                          paused=True, pipeline="score"), now=now)

    table = fits(narrow("schedule", "list"))
    assert "nightly-retrain-churn-propensity-eu-west" in column(table, 0, 4) and "0 3 * * *" in table
    assert "active" in table and "paused" in table and "window 30 d" in table and "no catch-up" in table
    assert f"data.source={source}" in column(table, 3, 4)  # folded, not cut

    doc = json.loads(narrow("schedule", "list", "--json"))
    assert doc["home"] == "local"
    nightly, weekly = sorted(doc["schedules"], key=lambda s: s["name"])
    assert nightly["params"] == {"data.source": source, "model.params.max_iter": "500"}
    assert (nightly["window_days"], nightly["max_concurrency"], nightly["catchup"]) == (30, 2, False)
    assert nightly["state"] == "active" and datetime.fromisoformat(nightly["next_run"]).hour == 3
    assert nightly["note"] == "no slot yet"
    assert (weekly["pipeline"], weekly["state"], weekly["next_run"]) == ("score", "paused", None)


def test_tenant_list(tmp_path, narrow):
    from driftloop.app.tenants import add_tenant

    infra, name = tmp_path / "infra", "fraud-detection-payments-europe-west-1"
    add_tenant(infra, name, gpu=2, borrow=2, pool_gpus=8, source="s3://fraud-data/events.parquet")
    add_tenant(infra, "team-b", gpu=1, profile=True, owner="lead-b@example.com")

    table = fits(narrow("tenant", "list", "--infra", str(infra)))
    assert name in column(table, 0, 5) and "lead-b@example.com" in column(table, 0, 5)
    assert "2 + 2" in table and "16 / 64Gi" in table and "3 of 8 GPUs given" in table

    doc = json.loads(narrow("tenant", "list", "--infra", str(infra), "--json"))
    assert doc["pool"]["gpus"] == 8 and doc["gpus_given"] == 3
    fraud = next(t for t in doc["tenants"] if t["name"] == name)
    assert (fraud["gpu"], fraud["borrow"], fraud["namespace"], fraud["queue"]) == (2, 2, name, name)
    assert fraud["model_name"] == f"{name}-model" and fraud["source"] == "s3://fraud-data/events.parquet"
    assert fraud["gateway_port"] + 1 == fraud["monitor_port"] and fraud["cluster_queue"] == f"driftloop-{name}"


def test_rollout_status(tmp_path, narrow):
    from serving.rollout import PROGRESSING, RolloutController, RolloutStore

    settings = make_settings(tmp_path, tmp_path / "none.parquet", **{"mlflow.model_name": MODEL})
    state = RolloutController.begin(settings, canary_version="12", primary_version="11")
    checks = [{"name": "requests", "value": 1234, "limit": 50, "passed": True, "detail": ""},
              {"name": "error_rate", "value": 0.0123, "limit": 0.05, "passed": True, "detail": ""},
              {"name": "p99_ms", "value": 812.5, "limit": 500.0, "passed": False, "detail": ""},
              {"name": "prediction_psi", "value": 0.0213, "limit": 0.25, "passed": True, "detail": ""},
              {"name": "quality_delta", "value": None, "limit": -0.05, "passed": None, "detail": "no labels yet"}]
    hold = ("p99_ms 812.5 breaks limit 500 (1 of 2 failing intervals before a rollback); "
            "holding at 20% until the next interval")
    state.history += [
        {"time": "2026-11-30T10:00:00+00:00", "ts": 1_780_000_000.0, "weight": 0, "decision": "shadow_start",
         "checks": [], "reason": "candidate v12 gets a copy of 5% of requests", "shadow_percent": 5.0},
        {"time": "2026-11-30T10:01:00+00:00", "ts": 1_780_000_060.0, "weight": 0, "decision": "shadow_pass",
         "checks": [{"name": "shadow_requests", "value": 120, "limit": 50, "passed": True, "detail": ""},
                    {"name": "agreement", "value": 0.96, "limit": 0.9, "passed": True, "detail": "equal labels"}],
         "reason": "shadow phase passed on 120 mirrored requests"},
        {"time": "2026-11-30T10:02:00+00:00", "ts": 1_780_000_120.0, "weight": 20, "decision": "start",
         "checks": [], "reason": "canary v12 at 20%"},
        {"time": "2026-11-30T10:03:00+00:00", "ts": 1_780_000_180.0, "weight": 20, "decision": "hold",
         "checks": checks, "reason": hold}]
    state.status, state.weight, state.failed_checks = PROGRESSING, 20, 1
    RolloutStore(settings.workspace_dir / "rollout", MODEL).save(state)
    args = ("-p", f"workspace={tmp_path}", "-p", f"mlflow.model_name={MODEL}")

    table = fits(narrow("rollout", "status", *args))
    assert "canary v12 vs primary v11" in table and "progressing" in table and "shadow phase: passed" in table
    assert "812 fail" in table and "1234 ok" in table and "0.0123 ok" in table and "n/a" in table
    steps = table[table.index("rollout steps"):]
    assert "".join(hold.split()) in column(steps, 2, 3)  # folded under the decision, nothing cut
    assert "hold" in column(steps, 2, 3) and "20%" in column(steps, 0, 3)

    doc = json.loads(narrow("rollout", "status", *args, "--json"))
    assert (doc["status"], doc["canary_version"], doc["weight"], doc["failed_checks"]) == ("progressing", "12", 20, 1)
    assert doc["failed_checks_limit"] >= 1 and doc["shadow"]["verdict"] == "passed"
    assert doc["history"][-1]["reason"] == hold and doc["history"][-1]["checks"] == checks


def test_agent_decisions(tmp_path, narrow):
    from serving.agent.agent import agent_paths
    from serving.agent.decisions import DecisionLog
    from serving.agent.policy import SET_FLOOR, Action, Decision

    settings = make_settings(tmp_path, tmp_path / "none.parquet")
    log = DecisionLog(agent_paths(settings)["decisions"])
    ramp = Action(SET_FLOOR, MODEL, 14, 10, "forecast p90 of 137 req/s in 5 minutes needs 14 replicas")
    refused = ("scale-up refused: the last change was 240 s ago and agent.cooldown_seconds is 600; "
               "the floor stays at 10 replicas")
    log.record(Decision(1_780_000_000.0, "scale-up", ramp, False, refused))
    log.record(Decision(1_780_000_700.0, "scale-up", ramp, True, "forecast p90 of 137 req/s in 5 minutes "
                        "needs 14 replicas at 70 % utilisation", applied=14), result="minReplicas 14")
    args = ("-p", f"workspace={tmp_path}")

    table = fits(narrow("agent", "decisions", *args))
    assert "set_floor 10->14" in table and "scale-up" in table and "2026-05-28 20:26:40" in table
    assert "refused" in table and "allowed: minReplicas 14" in table and MODEL[:15] in table
    assert "".join(refused.split()) in column(table, 2, 3)  # folded, nothing cut

    lines = narrow("agent", "decisions", *args, "--json").splitlines()  # JSON lines, as before
    first, second = map(json.loads, lines)
    assert first["allowed"] is False and first["reason"] == refused and first["action"]["model"] == MODEL
    assert second["applied"] == 14 and second["result"] == "minReplicas 14" and second["action"]["target"] == 14


def test_agent_recommend_and_simulate(tmp_path, narrow):
    n = 120
    rng = np.random.default_rng(3)
    usage = pd.DataFrame({"timestamp": np.tile(np.arange(n) * 60.0, 2), "model": [MODEL] * n + ["legacy"] * n,
                          "cpu": np.concatenate([rng.uniform(0.1, 0.3, n), np.full(n, 0.001)]),
                          "memory": np.full(2 * n, 300 * 2**20), "rps": np.concatenate([np.full(n, 30.0), np.zeros(n)])})
    usage.to_csv(tmp_path / "usage.csv", index=False)
    args = ("-p", f"workspace={tmp_path}", "-p", "agent.forecast_engine=numpy")

    table = fits(narrow("agent", "recommend", "--usage", str(tmp_path / "usage.csv"), *args))
    assert MODEL in column(table, 0, 5) and "consolidate" in table and "Mi /" in table

    t = np.arange(1440) * 60
    trace = tmp_path / "trace.csv"
    pd.DataFrame({"timestamp": t + 1_700_000_000, "requests": 600 + 300 * np.sin(t / 14_400.0)}).to_csv(trace)
    table = fits(narrow("agent", "simulate", "--trace", str(trace), "--baseline", "static", *args))
    assert "agent" in table and "static" in table and "coverage" in table and "…" not in table


def test_training_run_summary_folds_long_paths(capsys, monkeypatch):
    from driftloop.app.cli import print_run_result
    from driftloop.core.console import console

    monkeypatch.setattr(console, "width", 80)
    tracking = "sqlite:////var/lib/driftloop/workspaces/team-fraud-detection/mlflow/mlflow-tracking.db"
    settings = types.SimpleNamespace(tracking_uri=tracking, mlflow=types.SimpleNamespace(model_name=MODEL))
    summary = {"trigger": "drift:drift-0123456789abcdef", "window": "2026-01-01T00:00:00+00:00 .. 2026-01-31",
               "train_rows": 3000, "test_rows": 1000, "device": "cpu", "metrics": {"accuracy": 0.81, "f1": 0.7},
               "gate": "passed", "reason": "accuracy 0.8100 >= champion 0.7900 + margin 0.0000",
               "model_version": "12", "aliases": ["challenger"], "mlflow_run_id": "0a1b2c3d4e5f60718293a4b5c6d7e8f9"}
    run_id = "4f1c2d9e8b7a6f5e4d3c2b1a00112233"
    print_run_result(settings, types.SimpleNamespace(state="SUCCEEDED", summary=summary, run_id=run_id))
    table = fits(capsys.readouterr().out)
    assert tracking in column(table, 1, 2) and f"{MODEL}v12" in column(table, 1, 2) and "…" not in table
    assert run_id in column(table, 1, 2)  # the pipeline run, the id its log file and lineage name


def test_scoring_run_summary_folds_and_says_where_the_alert_went(capsys, monkeypatch):
    from driftloop.app.cli import score_table
    from driftloop.core.console import console

    monkeypatch.setattr(console, "width", 80)
    kept = ["customer_segment_code", "acquisition_channel_detail", "contract_start_date"]
    summary = {"model": MODEL, "version": "12", "input": "s3://driftloop-data/exports/churn/eu-west/2026-01-31.parquet",
               "output": "s3://driftloop-data/scored/churn/eu-west/2026-01-31/predictions.parquet", "rows": 3_000_000,
               "ids": "row number (column 'row', from 0)", "kept": kept, "drift": "drifted", "drift_share": 0.62,
               "drifted_columns": ["tenure", "monthly_spend", "sessions", "region", "support_calls"],
               "alert": "not sent: DRIFTLOOP_WEBHOOK_TOKEN is not set in the scoring step's environment (the "
                        "monitor's webhook needs it)",
               "report": "runs:/0a1b2c3d4e5f60718293a4b5c6d7e8f9/batch_drift/batch_drift.html",
               "log": "/var/lib/driftloop/workspaces/team-fraud/pipeline-root/logs/score-0a1b2c3d4e5f6071.log"}
    console.print(score_table("0a1b2c3d4e5f60718293a4b5c6d7e8f9", summary))
    table = fits(capsys.readouterr().out)
    values = column(table, 1, 2)
    for value in (summary["input"], summary["output"], summary["report"], summary["log"], ", ".join(kept),
                  summary["alert"], "0a1b2c3d4e5f60718293a4b5c6d7e8f9", summary["ids"]):
        assert "".join(value.split()) in values, value  # folded, nothing cut
    assert "…" not in table


def test_serve_status(tmp_path, narrow):
    from serving.local_state import ServingState

    settings = make_settings(tmp_path, tmp_path / "none.parquet")
    url = "http://serving-gateway.team-fraud-detection-payments.example.internal:31080"
    with ServingState(settings.workspace_dir / "serving").locked() as state:
        state.update({"gateway": {"role": "gateway", "pid": 4_194_301, "url": url},
                      "primary": {"role": "primary", "version": "12", "pid": 4_194_302, "url": f"{url}/primary"},
                      "canary": {"role": "canary", "version": "13", "pid": 4_194_303, "url": f"{url}/canary"},
                      "canary_percent": 20, "down": {"canary": "not ready"}, "restarts": {"canary": 3},
                      "owner": os.getpid()})  # a live serve owns them: entries kept as they are
    args = ("-p", f"workspace={tmp_path}")

    table = fits(narrow("serve", "status", *args))
    assert f"{url}/canary" in column(table, 3, 6) and "down" in table and "canary weight: 20%" in table
    assert "4194303" in column(table, 2, 6) and "…" not in table
    doc = json.loads(narrow("serve", "status", *args, "--json"))
    assert doc["canary"]["url"] == f"{url}/canary" and doc["restarts"] == {"canary": 3}


def test_drift_check(tmp_path, narrow):
    rng = np.random.default_rng(0)
    long_name = "average_monthly_spend_over_the_last_ninety_days_in_euros"
    ref = pd.DataFrame({long_name: rng.normal(0, 1, 400), "region": rng.choice(list("abc"), 400)})
    cur = pd.DataFrame({long_name: rng.normal(2, 1, 400), "region": rng.choice(list("abc"), 400)})
    ref.to_parquet(tmp_path / "ref.parquet")
    cur.to_parquet(tmp_path / "cur.parquet")

    table = fits(narrow("drift", "check", "--reference", str(tmp_path / "ref.parquet"), "--current",
                        str(tmp_path / "cur.parquet"), "-p", f"workspace={tmp_path}"))
    assert long_name in column(table, 0, 5) and "yes" in table and "…" not in table
