"""``--model`` on the commands of a fleet file (docs/fleet.md): a command that acts on one model refuses a
fleet file without it (one line naming the models); compile, config show and the schedules act on every model
by default; one scheduler for the fleet ticks each due model in a child process, ``fleet.max_concurrent_runs``
at once, the others waiting their turn."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from driftloop.core.config import load_settings
from driftloop.core.fleet import load_fleet
from tests.test_trust_workspace import run_cli

FLEET = """\
workspace: ws
fleet: {max_concurrent_runs: 2}
defaults:
  data: {source: data.parquet}
  schedule: {tick_seconds: 1}
models:
  churn: {team: growth}
  demand:
    model: {task: regression}
  spend: {}
"""


@pytest.fixture
def fleet_file(tmp_path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    return path


def test_a_one_model_command_refuses_a_fleet_without_model_naming_the_models(fleet_file, monkeypatch, capsys):
    code, _, err = run_cli(["history", "-c", str(fleet_file)], monkeypatch, capsys)
    assert code != 0 and "is a fleet of 3 models: pass --model NAME (models: churn, demand, spend)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["history", "-c", str(fleet_file), "--model", "nope"], monkeypatch, capsys)
    assert code != 0 and "--model 'nope': no such model" in err and "(models: churn, demand, spend)" in err


def test_settings_from_picks_the_fleet_model_and_a_one_model_file_needs_its_own_name(fleet_file, tmp_path):
    from driftloop.core.console import settings_from
    from driftloop.core.errors import ConfigError

    s = settings_from(fleet_file, ["gate.margin=0.2"], model="demand")
    assert s.model.task == "regression" and s.mlflow.model_name == "demand" and s.gate.margin == 0.2
    assert s.workspace_dir == (tmp_path / "ws" / "models" / "demand").resolve()
    one = tmp_path / "one.yaml"
    one.write_text("mlflow: {model_name: churn}\n")
    assert settings_from(one, model="churn") == load_settings(one)
    with pytest.raises(ConfigError, match=r"--model 'other': no such model in .*one.yaml \(models: churn\)"):
        settings_from(one, model="other")


def test_config_show_prints_every_models_configuration_or_one(fleet_file, monkeypatch, capsys):
    code, out, _ = run_cli(["config", "show", "-c", str(fleet_file)], monkeypatch, capsys)
    doc = yaml.safe_load(out)
    assert code == 0 and list(doc) == ["churn", "demand", "spend"]
    assert doc["demand"]["model"]["task"] == "regression" and doc["churn"]["fleet"]["team"] == "growth"
    code, out, _ = run_cli(["config", "show", "-c", str(fleet_file), "--model", "spend"], monkeypatch, capsys)
    assert code == 0 and yaml.safe_load(out)["mlflow"]["model_name"] == "spend"


def test_compile_writes_each_models_pipelines_in_a_folder_of_its_own(fleet_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "compiled"
    code, _, err = run_cli(["compile", "-c", str(fleet_file), "-o", str(out), "--model", "churn"], monkeypatch, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["churn"]
    assert {p.suffix for p in (out / "churn").iterdir()} == {".yaml"} and len(list((out / "churn").iterdir())) == 2


def test_schedules_of_a_fleet_are_created_listed_updated_and_deleted_on_every_model(fleet_file, monkeypatch, capsys):
    args = ["-c", str(fleet_file)]
    code, out, err = run_cli(["schedule", "create", "--name", "nightly", "--cron", "0 3 * * *", *args],
                             monkeypatch, capsys)
    assert code == 0, err
    assert [ln.split(":")[0] for ln in out.splitlines() if "created" in ln] == ["churn", "demand", "spend"]
    code, out, err = run_cli(["schedule", "create", "--name", "hourly", "--cron", "0 * * * *", *args,
                              "--model", "demand"], monkeypatch, capsys)
    assert code == 0, err
    code, out, _ = run_cli(["schedule", "list", "--json", *args], monkeypatch, capsys)
    doc = json.loads(out)
    assert [(m["model"], sorted(s["name"] for s in m["schedules"])) for m in doc["models"]] == [
        ("churn", ["nightly"]), ("demand", ["hourly", "nightly"]), ("spend", ["nightly"])]
    code, out, _ = run_cli(["schedule", "list", "--json", *args, "--model", "churn"], monkeypatch, capsys)
    assert [m["model"] for m in json.loads(out)["models"]] == ["churn"]
    # a schedule only one model has: updated there, the others passed over in one line each
    code, out, err = run_cli(["schedule", "update", "hourly", "--paused", *args], monkeypatch, capsys)
    assert code == 0, err
    assert "demand: updated schedule hourly (0 * * * *, paused)" in out
    assert out.count("no schedule") + out.count("not found") + out.count("unknown") >= 2
    code, out, err = run_cli(["schedule", "delete", "nightly", *args], monkeypatch, capsys)
    assert code == 0 and out.count("deleted schedule nightly") == 3
    code, _, err = run_cli(["schedule", "delete", "nightly", *args], monkeypatch, capsys)
    assert code != 0 and "schedule 'nightly' deleted on no model" in err and "Traceback" not in err


def _create(settings, cron: str = "* * * * *", name: str = "often") -> None:
    """A schedule created ten minutes ago: its latest slot is due now (catch-up)."""
    import datetime as dt

    from pipelines.schedule import LocalSchedules, Schedule

    ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    LocalSchedules.from_settings(settings).create(Schedule(name, cron, {}), now=ago)


def test_one_scheduler_ticks_each_due_model_in_a_child_at_most_the_fleet_limit_at_once(fleet_file, tmp_path):
    from driftloop.app.fleet_scheduler import FleetScheduler

    fleet = load_fleet(fleet_file, environ={})
    for m in fleet.models:
        _create(m.settings)
    marks = tmp_path / "marks"
    marks.mkdir()
    # each tick writes when it started and ended; a tick lasts 1 s
    script = ("import sys, time, pathlib; d = pathlib.Path(sys.argv[1]); "
              "(d / (sys.argv[2] + '.start')).write_text(repr(time.time())); time.sleep(1.0); "
              "(d / (sys.argv[2] + '.end')).write_text(repr(time.time())); print('often 2026-12-07T03:00:00: succeeded')")
    lines: list[str] = []
    scheduler = FleetScheduler(fleet, command=lambda name: [sys.executable, "-c", script, str(marks), name],
                               say=lines.append)
    assert all(s.has_due() for s in scheduler.schedulers.values())
    ticks = scheduler.run_once(poll_seconds=0.05)
    assert sorted(t.model for t in ticks) == ["churn", "demand", "spend"] and all(t.code == 0 for t in ticks)
    spans = {n: (float((marks / f"{n}.start").read_text()), float((marks / f"{n}.end").read_text()))
             for n in fleet.names}
    # never more than two at once: the third started only after one of the first two ended
    for t in [s for s, _ in spans.values()]:
        assert sum(1 for s, e in spans.values() if s <= t < e) <= 2
    first_two_end = min(e for n, (s, e) in spans.items() if n != "spend")
    assert spans["spend"][0] >= first_two_end  # file order: spend waited its turn
    assert [ln for ln in lines if ln.endswith("succeeded")] == [
        f"{t.model}: often 2026-12-07T03:00:00: succeeded" for t in ticks]


def test_a_model_with_nothing_due_gets_no_tick_and_a_failing_tick_stops_no_other(fleet_file, tmp_path):
    from driftloop.app.fleet_scheduler import FleetScheduler

    fleet = load_fleet(fleet_file, environ={})
    churn, demand, spend = (m.settings for m in fleet.models)
    _create(churn)
    _create(spend)
    _create(demand, "0 0 1 1 *")  # once a year: not due now
    lines: list[str] = []
    cmd = {"churn": [sys.executable, "-c", "raise SystemExit(3)"],
           "spend": [sys.executable, "-c", "print('often 2026-12-07T03:00:00: succeeded')"]}
    scheduler = FleetScheduler(fleet, command=cmd.__getitem__, say=lines.append)
    assert not scheduler.schedulers["demand"].has_due()
    ticks = {t.model: t.code for t in scheduler.run_once(poll_seconds=0.05)}
    assert ticks == {"churn": 3, "spend": 0}
    assert any(ln.startswith("churn: tick failed (exit 3") for ln in lines)
    assert "spend: often 2026-12-07T03:00:00: succeeded" in lines


def test_a_models_tick_is_the_one_model_scheduler_of_that_model(fleet_file):
    """The child a model's tick runs is ``driftloop scheduler --once -c FLEET --model NAME`` with the command's
    overrides; run for real on a model with nothing due, it exits 0 and prints no slot."""
    import subprocess

    from driftloop.app.fleet_scheduler import FleetScheduler

    fleet = load_fleet(fleet_file, environ={})
    _create(fleet.models[1].settings, "0 0 1 1 *")
    cmd = FleetScheduler(fleet, ["gate.margin=0.1"])._tick_command("demand")
    assert cmd[1:] == ["-m", "driftloop.app.cli", "scheduler", "--once", "-c", str(fleet_file), "--model", "demand",
                       "--param", "gate.margin=0.1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "often" not in done.stdout and "Traceback" not in done.stderr


def test_a_fleets_history_is_one_evidently_workspace_with_a_project_per_model(fleet_file, monkeypatch, capsys):
    import datetime as dt

    from driftloop.core.history import HistoryWorkspace, history_target

    fleet = load_fleet(fleet_file, environ={})
    targets = {history_target(m.settings) for m in fleet.models}
    assert targets == {str(fleet.models[0].settings.fleet.root / "evidently")}
    target = targets.pop()
    for m in fleet.models[:2]:
        HistoryWorkspace(target).add({"kind": "drift", "model": m.name, "version": "1", "verdict": "no drift",
                                      "share": 0.1, "time": dt.datetime.now(dt.timezone.utc).isoformat()})
    assert sorted(HistoryWorkspace(target).models()) == ["churn", "demand"]
    code, out, err = run_cli(["history", "-c", str(fleet_file), "--model", "demand", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert {r["model"] for r in json.loads(out)["records"]} == {"demand"}
