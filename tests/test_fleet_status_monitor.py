"""``driftloop status`` read from the fleet monitor's API (``--monitor-url`` / ``monitor.url``), and the history's
newest records read without the whole history (``HistoryWorkspace.latest``).

A real fleet monitor (:class:`monitoring.fleet_service.FleetMonitor`, served by uvicorn on a free port) over the
workspaces of four models: ``alerting`` (an open drift episode, a drift verdict), ``steady`` (no drift, a quality
record, a retrain that was promoted), ``quiet`` (never checked) and ``elsewhere`` (in the fleet file, not on the
monitor). ``status --json --monitor-url`` over HTTP shows what the local read of the same workspaces shows.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time

import pytest

from driftloop.core.fleet import load_fleet
from driftloop.core.history import INDEX_DIR, HistoryWorkspace
from monitoring.model_summary import MONITOR_FIELDS
from tests.serving_helpers import free_port, serve_app
from tests.test_fleet_status import _champion, _history, _quality
from tests.test_trigger import RecordingRunner
from tests.test_trust_workspace import run_cli

FLEET = """\
workspace: ws
defaults:
  data: {source: data.parquet}
models:
  alerting: {team: growth}
  steady: {team: growth}
  quiet: {team: planning}
  elsewhere: {team: planning}
"""
ON_MONITOR = ("alerting", "steady", "quiet")


@pytest.fixture(scope="module")
def fleet_file(tmp_path_factory):
    from monitoring.alerts import Alert, AlertStore

    root = tmp_path_factory.mktemp("fleet-monitor-status")
    path = root / "fleet.yaml"
    path.write_text(FLEET.replace("defaults:\n", f"defaults:\n  mlflow: {{tracking_uri: 'sqlite:///{root}/mlflow.db'}}\n"))
    m = {x.name: x.settings for x in load_fleet(path, environ={}).models}
    for name in m:
        _champion(m[name], {"driftloop.trigger": "manual"})
    _history(m["alerting"], {"kind": "drift", "verdict": "drift", "share": 0.6, "rows": 500})
    store = AlertStore.from_settings(m["alerting"])
    store.record_verdict("alerting", "drift", "1", failed=True, window="w1", now=time.time(), resolve_after=3)
    store.close()
    _history(m["steady"], {"kind": "drift", "verdict": "no drift", "share": 0.1, "rows": 500})
    _quality(m["steady"])
    store = AlertStore.from_settings(m["steady"])
    store.insert(Alert("drift-7", "drift", created=time.time() - 3600))
    store.update("drift-7", decision="started", started=time.time() - 3500, finished=time.time() - 3000,
                 run_state="SUCCEEDED", outcome="promoted", pipeline_run_id="run-7")
    store.close()
    return path


@pytest.fixture(scope="module")
def monitor_url(fleet_file):
    """The fleet's monitor over three of its four models, on a free 127.0.0.1 port (no check loop: the
    workspaces hold what the fixture wrote)."""
    from monitoring.fleet_service import FleetMonitor
    from monitoring.service import MonitorService

    models = [m for m in load_fleet(fleet_file, environ={}).models if m.name in ON_MONITOR]
    fleet = FleetMonitor(models, service=lambda m: MonitorService(m.settings, runner=RecordingRunner()))
    try:
        with serve_app(fleet) as url:
            yield url
    finally:
        fleet.close()


def _status(args, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = run_cli(["status", *args], monkeypatch, capsys)
    return code, out, err


def test_status_reads_the_monitors_api_and_shows_what_the_local_read_shows(fleet_file, monitor_url, monkeypatch,
                                                                        capsys):
    import httpx

    listed = {e["name"]: e for e in httpx.get(f"{monitor_url}/models", timeout=5).json()["models"]}
    assert set(listed) == set(ON_MONITOR)
    assert listed["alerting"]["drift"]["champion"] == "alerting v1" and listed["alerting"]["state"] == "not checked yet"
    assert listed["steady"]["last_retrain"]["outcome"] == "promoted" and listed["quiet"]["drift"] is None

    code, out, err = _status(["-c", str(fleet_file), "--json"], monkeypatch, capsys)
    assert code == 0, err
    local = {r["model"]: r for r in json.loads(out)["models"]}
    code, out, err = _status(["-c", str(fleet_file), "--json", "--monitor-url", monitor_url], monkeypatch, capsys)
    assert code == 0, err
    doc = json.loads(out)
    remote = {r["model"]: r for r in doc["models"]}
    assert doc["monitors"] == {monitor_url: {"reachable": True, "error": None}}

    for name in ON_MONITOR:
        assert {k: remote[name][k] for k in MONITOR_FIELDS} == {k: local[name][k] for k in MONITOR_FIELDS}, name
        assert remote[name]["attention"] == local[name]["attention"], name
        assert remote[name]["monitor_url"] == monitor_url and remote[name]["monitor_error"] is None
        assert remote[name]["champion"] == "1"  # the registry is read as without a monitor
    assert remote["alerting"]["open_alerts"] == 1 and remote["alerting"]["open"][0].startswith("drift episode since")
    assert remote["alerting"]["drift"]["verdict"] == "drift" and remote["alerting"]["drift"]["share"] == 0.6
    quality = remote["steady"]["quality"]
    assert quality["verdict"] == "ok" and quality["estimated"] == 0.748 and quality["metrics"][0]["limit"] == 0.705
    assert remote["steady"]["last_retrain"] == {"alert": "drift-7", "started": local["steady"]["last_retrain"]["started"],
                                                "run": "run-7", "outcome": "promoted"}
    assert remote["quiet"]["drift"] is None and remote["quiet"]["attention"]["reason"] == "ok"

    # a model the monitor does not list is named in its row; its registry part is still read
    elsewhere = remote["elsewhere"]
    assert elsewhere["monitor_error"].startswith(f"monitor {monitor_url}: no model 'elsewhere' there")
    assert elsewhere["attention"]["reason"] == elsewhere["monitor_error"] and elsewhere["champion"] == "1"


def test_a_monitor_that_cannot_be_reached_is_one_line_and_the_rest_still_shows(fleet_file, monkeypatch, capsys):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DRIFTLOOP_MONITOR__URL", closed)  # monitor.url, through the environment
    code, out, err = _status(["-c", str(fleet_file), "--json", "--timeout", "2"], monkeypatch, capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["monitors"] == {closed: {"reachable": False, "error": "connection refused"}}
    for row in doc["models"]:
        assert row["monitor_error"] == f"monitor {closed} unreachable: connection refused", row
        assert row["attention"]["reason"] == row["monitor_error"] and row["champion"] == "1"
        assert row["drift"] is None and row["open_alerts"] == 0  # not read from the local workspace either

    code, out, err = _status(["-c", str(fleet_file), "--model", "steady"], monkeypatch, capsys)
    assert code == 0 and err == ""
    for word in ("unreachable", "refused", "v1 manual", "not served"):  # (the needs column folds)
        assert word in out, (word, out)

    code, out, err = _status(["-c", str(fleet_file), "--monitor-url", "ftp://monitor"], monkeypatch, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "--monitor-url 'ftp://monitor'" in err


def test_latest_is_what_the_whole_history_ends_with(tmp_path, monkeypatch):
    """The newest record of each kind, by the index or by reading the newest snapshots, equals the last of each
    kind in the whole history; only a few snapshots are read (each record timed when it is written, as the
    monitor's are)."""
    target = str(tmp_path / "evidently")
    writer = HistoryWorkspace(target)
    kinds = ["drift", "quality", "drift", "rollout", "quality", "drift", "quality", "rollout", "drift"]
    for i, kind in enumerate(kinds):
        record = {"kind": kind, "model": "m", "version": str(1 + i // 4), "time": dt.datetime.now(dt.UTC).isoformat(),
                  "verdict": {"drift": "drift" if i % 2 else "no drift", "quality": "ok" if i < 6 else "degraded",
                              "rollout": "promoted"}[kind], "share": i / 10}
        if kind == "quality":
            record["metrics"] = [{"metric": "accuracy", "live": 0.7 - i / 100, "holdout": 0.75, "limit": 0.7,
                                  "degraded": i >= 6}]
        writer.add(record)
        # the monitor's records are seconds apart; Evidently's UUIDv7 ids (uuid6) run ahead of the clock by a
        # millisecond per id made within the same one (~10 ms after a burst of writes), so back-to-back records
        # would make every snapshot look written after the next record and all of them be read (still correct)
        time.sleep(0.05)
    for i in range(3):  # a model without labels: drift records only
        writer.add({"kind": "drift", "model": "n", "version": "1", "time": dt.datetime.now(dt.UTC).isoformat(),
                    "verdict": "no drift", "share": i / 10})

    whole = HistoryWorkspace(target).records("m")
    expected = {}
    for record in whole:
        if record["kind"] in ("drift", "quality"):
            expected[record["kind"]] = record
    assert expected["drift"]["share"] == 0.8 and expected["quality"]["verdict"] == "degraded"

    def counted() -> tuple[HistoryWorkspace, list[str]]:
        ws, reads = HistoryWorkspace(target), []
        evidently = ws._open()
        real = evidently.get_run
        monkeypatch.setattr(evidently, "get_run", lambda p, s: reads.append(s) or real(p, s))
        return ws, reads

    ws, reads = counted()
    assert ws.latest("m") == expected and len(reads) == 2  # by the index: one snapshot a kind
    assert ws.latest("m") == expected and len(reads) == 2  # read again: nothing new to read
    assert ws.latest("n") == {"drift": HistoryWorkspace(target).records("n")[-1]} and len(reads) == 3  # no quality

    shutil.rmtree(tmp_path / "evidently" / INDEX_DIR)  # a history written before the index: the newest snapshots
    ws, reads = counted()
    assert ws.latest("m") == expected and len(reads) == 3  # the newest, down to the newest quality record
    assert ws.latest("m", ("drift",), accept=lambda r: r["verdict"] == "no drift") == \
        {"drift": [r for r in whole if r["kind"] == "drift" and r["verdict"] == "no drift"][-1]}
    assert HistoryWorkspace(target).latest("nobody") == {}
