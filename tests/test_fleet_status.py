"""``driftloop status`` (driftloop/app/status_cli.py): a row per model read from its own workspace, what
needs attention first, a broken workspace named in its row without hiding the others, ``--model``, ``--json``,
80 columns."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from driftloop.core.fleet import load_fleet
from tests.test_trust_workspace import run_cli

FLEET = """\
workspace: ws
defaults:
  data: {source: data.parquet}
models:
  fresh: {team: growth}
  steady: {team: growth}
  drifting: {team: planning}
  rolled: {team: planning}
  alerting: {}
  broken: {}
"""


def _champion(settings, tags: dict[str, str] | None = None) -> None:
    """A registered version of the model with alias champion (no artifact: status reads the registry only)."""
    from mlflow.tracking import MlflowClient

    settings.workspace_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    name = settings.mlflow.model_name
    client.create_registered_model(name)
    version = client.create_model_version(name, source="file:///nowhere", tags=tags or {})
    client.set_registered_model_alias(name, "champion", version.version)


def _history(settings, record: dict) -> None:
    from driftloop.core.history import HistoryWorkspace, history_target

    HistoryWorkspace(history_target(settings)).add({"model": settings.mlflow.model_name, "version": "1",
                                                    "time": dt.datetime.now(dt.UTC).isoformat(), **record})


def _quality(settings) -> None:
    """A quality check of the champion as the monitor records it (monitoring.history.quality_records)."""
    from driftloop.core.history import HistoryWorkspace, history_target
    from monitoring.history import quality_records

    outcome = {"checked_at": dt.datetime.now(dt.UTC).isoformat(), "versions": {"1": {
        "verdict": "ok", "window": {"id": "w7", "rows": 400}, "live": {"accuracy": 0.742, "f1": 0.70},
        "holdout": {"accuracy": 0.755, "f1": 0.71},
        "verdicts": [{"metric": "accuracy", "limit": 0.705, "rule": "holdout - 0.05", "degraded": False}],
        "estimated_latest": {"accuracy": 0.748, "rows": 900}}}}
    for record in quality_records(outcome, settings.mlflow.model_name):
        HistoryWorkspace(history_target(settings)).add(record)


@pytest.fixture(scope="module")
def fleet_file(tmp_path_factory) -> Path:
    """Six models: one never trained, one healthy, one drifting, one whose canary was rolled back, one with an
    open drift episode, one whose alert store is not a database."""
    from monitoring.alerts import Alert, AlertStore
    from serving.rollout import RolloutState, RolloutStore

    root = tmp_path_factory.mktemp("fleet")
    path = root / "fleet.yaml"
    # one MLflow store for the fleet (as one tracking server would be): each model its own registered name
    path.write_text(FLEET.replace("defaults:\n", f"defaults:\n  mlflow: {{tracking_uri: 'sqlite:///{root}/mlflow.db'}}\n"))
    m = {x.name: x.settings for x in load_fleet(path, environ={}).models}
    for name in ("steady", "drifting", "rolled", "alerting", "broken"):
        _champion(m[name], {"driftloop.trigger": "manual"})
    _history(m["drifting"], {"kind": "drift", "verdict": "drift", "share": 0.6, "rows": 500})
    _history(m["steady"], {"kind": "drift", "verdict": "no drift", "share": 0.1, "rows": 500})
    _quality(m["steady"])
    RolloutStore(m["rolled"].workspace_dir / "rollout", "rolled").save(
        RolloutState("rolled", "2", "1", status="rolled_back", weight=0, reason="error rate 0.2 > 0.05"))
    store = AlertStore.from_settings(m["rolled"])
    store.insert(Alert("drift-1", "drift", created=time.time() - 3600))
    store.update("drift-1", decision="started", started=time.time() - 3500, finished=time.time() - 3000,
                 run_state="SUCCEEDED", outcome="rolled_back")
    store.close()
    store = AlertStore.from_settings(m["alerting"])
    store.record_verdict("alerting", "drift", "1", failed=True, window="w1", now=time.time(), resolve_after=3)
    store.close()
    (m["broken"].workspace_dir / "monitor").mkdir(parents=True)
    (m["broken"].workspace_dir / "monitor" / "alerts.db").write_bytes(b"this is not a database" * 100)
    return path


def test_a_row_per_model_what_needs_attention_first(fleet_file):
    from driftloop.app.status_cli import status_rows

    rows = status_rows(list(load_fleet(fleet_file, environ={}).models))
    by = {r["model"]: r for r in rows}
    assert [r["model"] for r in rows] == ["broken", "alerting", "rolled", "drifting", "steady", "fresh"]
    assert [r["attention"]["reason"] for r in rows[1:]] == ["1 open alert", "rolled back", "drift", "ok",
                                                            "not trained yet"]
    assert by["broken"]["attention"]["reason"].startswith("unreadable: alerts: file is not a database")
    assert by["broken"]["champion"] == "1"  # the parts that can be read still are
    assert by["steady"]["champion"] == "1" and by["fresh"]["champion"] is None
    assert by["steady"]["team"] == "growth" and by["alerting"]["team"] is None
    assert by["drifting"]["drift"]["verdict"] == "drift" and by["drifting"]["drift"]["share"] == 0.6
    assert by["rolled"]["rollout"]["status"] == "rolled_back" and by["rolled"]["rollout"]["canary_version"] == "2"
    assert by["rolled"]["last_retrain"]["outcome"] == "rolled_back"
    assert by["alerting"]["open_alerts"] == 1 and by["alerting"]["open"][0].startswith("drift episode since")
    assert by["steady"]["newest_version"] == {"version": "1", "trigger": "manual", "gate": None, "rollout": None}
    quality = by["steady"]["quality"]  # realised, holdout, limit and the estimate, read back from the history
    assert quality["verdict"] == "ok" and quality["estimated"] == 0.748 and quality["degraded"] == []
    assert quality["metrics"][0] == {"metric": "accuracy", "live": 0.742, "holdout": 0.755, "limit": 0.705,
                                     "degraded": False}
    assert not (fleet_file.parent / "ws" / "models" / "fresh").exists()  # status made no workspace


def _render(table) -> str:
    out = io.StringIO()
    Console(file=out, width=80, highlight=False).print(table)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "[dim]" not in text
    return text


def test_the_table_fits_80_columns_and_names_each_state(fleet_file):
    from driftloop.app.status_cli import status_rows, status_table

    rows = status_rows(list(load_fleet(fleet_file, environ={}).models))
    text = _render(status_table(rows))
    for word in ("broken", "unreadable", "rolled back", "0.60", "not trained", "planning", "1 open alert",
                 "acc 0.742", "hold", "0.755", "lim", "0.705", "est", "0.748"):
        assert word in text, word
    long = {**rows[0], "model": "churn-propensity-gradient-boosted-eu-west-1", "team": "growth-and-retention-emea",
            "errors": ["alerts: " + "a long reason " * 8], "open_alerts": 3,
            "rollout": {"status": "progressing", "canary_version": "1234", "weight": 60}}
    long["attention"] = {"rank": 0, "reason": "unreadable: " + long["errors"][0]}
    text = _render(status_table([long, *rows]))
    assert "churn-pro" in text and "canary" in text and "v1234" in text and "alerts" in text


def test_status_json_and_model_filter(fleet_file, monkeypatch, capsys):
    code, out, err = run_cli(["status", "-c", str(fleet_file), "--json"], monkeypatch, capsys)
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert [r["model"] for r in doc["models"]][:2] == ["broken", "alerting"] and len(doc["models"]) == 6
    code, out, err = run_cli(["status", "-c", str(fleet_file), "--json", "--model", "rolled"], monkeypatch, capsys)
    assert code == 0 and [r["model"] for r in json.loads(out)["models"]] == ["rolled"]
    code, out, err = run_cli(["status", "-c", str(fleet_file), "--model", "nope"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: --model 'nope': no such model in ") and err.count("\n") == 1
    assert "models: fresh, steady, drifting, rolled, alerting, broken" in err


def test_status_of_a_one_model_configuration_is_one_row(tmp_path, monkeypatch, capsys):
    (tmp_path / "one.yaml").write_text("workspace: ws\nmlflow: {model_name: solo}\n")
    code, out, err = run_cli(["status", "-c", str(tmp_path / "one.yaml"), "--json"], monkeypatch, capsys)
    assert code == 0
    rows = json.loads(out)["models"]
    assert [(r["model"], r["attention"]["reason"]) for r in rows] == [("solo", "not trained yet")]


def test_status_on_a_bad_fleet_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "f.yaml").write_text(FLEET + "  fresh: {}\n")
    code, out, err = run_cli(["status", "-c", str(tmp_path / "f.yaml")], monkeypatch, capsys)
    assert code == 2 and out == ""
    assert err == (f"error: models.fresh: model 'fresh' is declared twice (lines 5 and 11 of {tmp_path / 'f.yaml'}); "
                   "model names must be unique\n")
