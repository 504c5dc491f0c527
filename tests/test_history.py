"""The model's history: every check of the monitor a snapshot in its Evidently project, read back by
``driftloop history``; a broken history never slows or breaks a check; the monitor's loop quiet by default.

What Evidently's UI plots is read here through Evidently's own storage (the code behind its
dashboard API); tests/test_evidently_ui_browser.py opens the same dashboard in Chromium.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time

import pytest
from starlette.testclient import TestClient

from driftloop.core.history import HistoryWorkspace, history_target
from monitoring.history import CheckHistory
from monitoring.loglines import LoopLines
from driftloop.app.scenario import SCENARIOS, generate
from tests.conftest import free_port, make_settings
from tests.test_quality import _serve_and_label, _service, champion_sklearn  # noqa: F401 (fixture)


#: MLflow runs (the alerts' reports) of these tests in an experiment of their own: the shared tracking server
#: holds tests/test_quality.py's too, which count the runs of the same alert ids (the same windows of v1)
OWN_RUNS = {"mlflow.experiment": "history-tests"}


def panel_series(target: str, model: str) -> dict[str, list[tuple[dict[str, str], list[float]]]]:
    """Panel title -> (series params, values) as the Evidently UI's dashboard API answers them."""
    from evidently.ui.service.base import SeriesFilter
    from evidently.ui.service.storage.local.base import InMemoryDataStorage, LocalState
    from evidently.ui.workspace import Workspace

    ws = Workspace(target)
    project = ws.search_project(model)[0].id
    storage = InMemoryDataStorage(target, LocalState.load(target, None))
    out = {}
    for panel in ws.get_dashboard(project).panels:
        filters = [SeriesFilter(tags=v.tags, metadata=v.metadata, metric=v.metric, metric_labels=v.metric_labels)
                   for v in panel.values]
        if filters:
            answer = asyncio.run(storage.get_data_series(project, filters, None, None))
            out[panel.title] = [(s.params, s.values) for s in answer.series]
    return out


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from driftloop.app.cli import main

    monkeypatch.setattr(sys, "argv", ["driftloop", *args])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_check_is_a_snapshot_in_the_models_evidently_project(tmp_path, trained, champion_sklearn, monkeypatch,
                                                                   capsys):
    """Drift and quality checks, the alert and run a check started and the run's rollout outcome land in the
    model's project; the dashboard's series hold the numbers the monitor computed; ``driftloop history``
    prints the same timeline."""
    service, runner = _service(tmp_path, trained, monkeypatch, **OWN_RUNS)
    concept = generate(rows=600, drift_at=0.0, drift=SCENARIOS["concept"], seed=21)
    with TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        _serve_and_label(client, concept.iloc[:300], champion_sklearn)
        drift = client.post("/check").json()
        quality = client.post("/quality/check").json()["versions"]["1"]
        assert drift["verdict"] == "no drift" and quality["verdict"] == "degraded", (drift, quality)
        alert = quality["alert"]
        assert alert["decision"] == "started"
        service.trigger.wait(alert["id"], timeout=30)
        client.post("/quality/check")  # the same window judged alike: nothing new to record
        # the run's rollout, as the trigger records it when it follows the run (monitoring.outcomes)
        service.alerts.update(alert["id"], outcome="rolled_back", outcome_reason="v2 was rolled back: error rate",
                              followed=time.time(), model_version="2")
        service.history.rollouts(service.alerts)
        service.history.rollouts(service.alerts)  # once
        assert service.history.flush(60)
    assert service.history.failed == 0 and service.history.written == 3

    target = history_target(service.settings)
    assert target == str(service.settings.workspace_dir / "evidently")
    records = HistoryWorkspace(target).records("churn")
    assert [r["kind"] for r in records] == ["drift", "quality", "rollout"]
    d, q, r = records
    assert d["verdict"] == "no drift" and d["version"] == "1" and d["window"] == drift["window"]["id"]
    assert d["share"] == pytest.approx(drift["result"]["share"]) and d["rows"] == 300
    assert q["verdict"] == "degraded" and "accuracy" in q["degraded"] and q["alert"] == alert["id"]
    assert q["decision"] == "started" and q["events"] == ["alert", "run"] and q["run"] == alert["request_id"]
    assert f"accuracy {quality['live']['accuracy']:.4g}" in q["values"]
    assert r["outcome"] == "rolled_back" and r["alert"] == alert["id"] and r["events"] == ["rolled_back"]
    assert r["version"] == "2" and r["reason"] == "v2 was rolled back: error rate"

    series = panel_series(target, "churn")
    [(_, share)] = series["Share of drifted columns"]
    assert share == [pytest.approx(drift["result"]["share"])]
    scores = {p["column"]: v for p, v in series["Drift score per column (method's statistic)"]}
    assert scores.keys() == {c["column"] for c in drift["result"]["columns"]}
    assert all(scores[c["column"]] == [pytest.approx(c["score"])] for c in drift["result"]["columns"])
    limits = {p["value_type"]: v for p, v in series["accuracy: live against the holdout limit"]}
    verdict = next(v for v in quality["verdicts"] if v["metric"] == "accuracy")
    assert limits == {"live": [pytest.approx(verdict["live"])], "limit": [pytest.approx(verdict["limit"])]}
    events = {p["event"]: v for p, v in series["Alerts, retraining runs and rollouts"]}
    assert set(events) == {"alert", "run", "rolled_back"}

    ws = ["-p", f"workspace={service.settings.workspace_dir}", "-p", "mlflow.model_name=churn"]
    code, out, err = run_cli(["history", *ws], monkeypatch, capsys)
    assert code == 0, err
    assert 0 <= out.index("no drift") < out.index("degraded") < out.index("rolled_back")
    flat = "".join(out.split())  # 80 columns: a long id folds onto the row's next lines, never cropped
    assert alert["id"] in flat and "started" in out and "rolled_back" in out and "errorrate" in flat
    code, out, _ = run_cli(["history", *ws, "--json", "--since", "1h"], monkeypatch, capsys)
    assert [x["kind"] for x in json.loads(out)["records"]] == ["drift", "quality", "rollout"]
    code, out, _ = run_cli(["history", *ws, "--model", "other"], monkeypatch, capsys)
    assert code == 0 and "no history of other" in out and "models there: churn" in out


class _StuckWorkspace:
    """A history that hangs (a service that accepts and never answers) until released."""

    target = "http://stuck.invalid"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def add(self, record, *, quality_metrics=()):
        self.calls += 1
        self.release.wait(30)
        return "id"


def test_a_stuck_or_broken_history_neither_slows_nor_breaks_a_check(tmp_path, trained, champion_sklearn, monkeypatch,
                                                                   caplog):
    stuck = _StuckWorkspace()
    service, _ = _service(tmp_path, trained, monkeypatch, **OWN_RUNS)
    service.history = CheckHistory(service.settings, workspace=stuck)
    calm = generate(rows=2000, drift_at=None, seed=33)
    with TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        _serve_and_label(client, calm.iloc[:300], champion_sklearn)
        client.post("/check")  # the first check pays for imports and the reference; the next ones are timed
        _serve_and_label(client, calm.iloc[300:600], champion_sklearn)
        started = time.perf_counter()
        assert client.post("/check").json()["verdict"] == "no drift"
        assert time.perf_counter() - started < 5  # the writer still hangs on the first record
        assert stuck.calls == 1
        stuck.release.set()
        assert service.history.flush(30) and service.history.written == 2

    # an Evidently service that is not there: every check still answers; one warning; failures counted
    settings = make_settings(tmp_path / "ws2", trained[0].data.source, **{
        "mlflow.tracking_uri": trained[0].tracking_uri, "monitor.window_rows": 300, "monitor.min_samples": 200,
        "monitor.check_interval_seconds": 3600, "serving.name": "churn",
        "monitor.history_url": f"http://127.0.0.1:{free_port()}", **OWN_RUNS})
    from monitoring.service import MonitorService

    service = MonitorService(settings, runner=object())
    with caplog.at_level(logging.WARNING, logger="monitoring.history"), \
            TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        for rows in (calm.iloc[:300], calm.iloc[300:600], calm.iloc[600:900]):
            _serve_and_label(client, rows, champion_sklearn)
            assert client.post("/check").json()["verdict"] == "no drift"
            assert service.history.flush(60)
        metrics = client.get("/metrics").text
    assert service.history.failed == 3 and service.history.written == 0
    assert 'driftloop_monitor_history_writes_total{result="failed"} 3.0' in metrics
    warnings = [r.getMessage() for r in caplog.records if r.name == "monitoring.history"]
    assert len(warnings) == 1 and settings.monitor.history_url in warnings[0], warnings


def _drift_outcome(window: str, verdict: str, alert: dict | None = None) -> dict:
    result = {"share": 0.5 if verdict == "drift" else 0.0, "drift_share": 0.5, "drifted_columns": ["x"] if
              verdict == "drift" else [], "columns": [{"column": "x", "kind": "num", "method": "ks", "score": 0.01,
                                                      "threshold": 0.05, "drifted": verdict == "drift"}]}
    out = {"checked_at": "2026-12-01T10:00:00+00:00", "champion": "churn v1", "verdict": verdict, "result": result,
           "window": {"id": window, "rows": 300, "start": None, "end": None}}
    return {**out, "alert": alert} if alert else out


class _Recording:
    target = "memory"

    def __init__(self) -> None:
        self.records: list[dict] = []

    def add(self, record, *, quality_metrics=()):
        self.records.append(record)
        return str(len(self.records))


def test_a_window_is_recorded_once_and_an_alert_or_run_is_one_event(tmp_path, scenario_path):
    rec = _Recording()
    history = CheckHistory(make_settings(tmp_path, scenario_path), workspace=rec)
    started = {"id": "drift-1", "decision": "started", "request_id": "r1"}
    history.drift(_drift_outcome("tumbling:0-300", "no drift"))
    history.drift(_drift_outcome("tumbling:0-300", "no drift"))  # forced re-check of the same window
    history.drift({**_drift_outcome("tumbling:0-300", "no drift"), "verdict_cached": True})
    history.drift({"checked_at": "x", "champion": "churn v1", "verdict": "insufficient data", "window": {}})
    history.drift(_drift_outcome("tumbling:300-600", "drift", started))
    history.drift(_drift_outcome("tumbling:300-600", "drift", {**started, "decision": "duplicate"}))  # judged again
    history.drift(_drift_outcome("tumbling:600-900", "drift", {"id": "drift-1", "decision": "counted",
                                                                "episode_windows": 2}))
    history.drift(_drift_outcome("tumbling:900-1200", "drift", {"id": "drift-2", "decision": "cooldown"}))
    assert history.flush(10)
    assert [(r["window"], r.get("events")) for r in rec.records] == [
        ("tumbling:0-300", []), ("tumbling:300-600", ["alert", "run"]), ("tumbling:600-900", []),
        ("tumbling:900-1200", ["alert"])]


def test_the_loop_says_what_changed_once_and_sums_up_at_most_every_minute(caplog):
    now = [0.0]
    lines = LoopLines(logging.getLogger("test.loop"), every=60, clock=lambda: now[0])
    calm, drifted = _drift_outcome("w1", "no drift"), _drift_outcome("w2", "drift")
    with caplog.at_level(logging.DEBUG, logger="test.loop"):
        for outcome in (calm, calm, calm, drifted, drifted, calm):
            now[0] += 3
            lines.drift(outcome)
            lines.summary()
        for _ in range(3):
            lines.skipped("quality", RuntimeError("no champion yet"))
        now[0] = 61
        assert lines.summary("history: 6 written")
        assert not lines.summary()  # nothing since
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert [m.split(":")[0] for m in info] == ["drift check of churn v1", "drift check of churn v1",
                                              "drift check of churn v1", "quality check skipped", "monitor, last 61s"]
    assert "drift, share 0.50 of 1 columns (x)" in info[1] and "no drift" in info[2]
    assert "checks 2 drift, 4 no drift, 3 quality skipped" in info[-1] and "3 quality skipped" in info[-1] and "history: 6 written" in info[-1]
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 5  # the repeats, with -v


def test_a_repeated_alert_is_no_news_at_the_default_level(tmp_path, trained, monkeypatch, caplog):
    from monitoring.alerts import Alert

    service, runner = _service(tmp_path, trained, monkeypatch, **OWN_RUNS)
    with caplog.at_level(logging.INFO, logger="monitoring.trigger"):
        first = service.trigger.submit(Alert("am-1", "alertmanager", samples=500))
        again = service.trigger.submit(Alert("am-1", "alertmanager", samples=500))
        held = service.trigger.submit(Alert("am-2", "alertmanager", samples=500))  # a run in flight or cooldown
        held_again = service.trigger.rejudge("am-2", why="its episode's next failing window")
    assert again.decision == "duplicate" and first.decision != "duplicate"
    assert held.decision not in ("started", "duplicate") and held_again.decision == held.decision
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name == "monitoring.trigger"]
    assert len(said) == 2 and "am-1" in said[0] and "already received" not in said[0] and "am-2" in said[1]


def test_the_loop_says_a_verdict_once_while_it_holds(tmp_path, trained, champion_sklearn, monkeypatch, caplog):
    service, _ = _service(tmp_path, trained, monkeypatch, **OWN_RUNS)
    lines = LoopLines(logging.getLogger("monitoring.service"))
    with TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        _serve_and_label(client, generate(rows=2000, drift_at=None, seed=33).iloc[:300], champion_sklearn)
        with caplog.at_level(logging.INFO, logger="monitoring.service"):
            for _ in range(3):
                service._round(lines)
    said = [r.getMessage() for r in caplog.records if r.name == "monitoring.service" and r.levelno >= logging.INFO]
    assert len(said) == 2, said
    assert said[0].startswith("drift check of churn v1: no drift") and "window tumbling:" in said[0]
    assert said[1].startswith("quality check of the champion: v1 ")  # ok or degraded: said once either way
    assert service.history.flush(30)
    kinds = [r["kind"] for r in HistoryWorkspace(history_target(service.settings)).records("churn")]
    assert kinds.count("drift") == 1 and kinds.count("quality") == 1  # one window each, recorded once


def test_on_a_cluster_the_monitor_writes_to_the_evidently_ui_service_with_its_secret():
    """infra/: the Evidently UI Deployment serves its volume's workspace with the write secret from Secret
    driftloop-evidently; the monitor's monitor.history_url is that Service and it holds the same secret; only
    the monitor and the scoring pipeline's drift step may reach it."""
    from pathlib import Path
    from urllib.parse import urlparse

    from driftloop.app.infra_check import build, objects_by_kind, settings_from_objects
    from driftloop.core.history import SECRET_ENV

    root = Path(__file__).resolve().parents[1]
    for env in ("dev", "prod"):
        objects = build(root / "infra" / "overlays" / env)
        settings = settings_from_objects(objects)

        def one(kind: str, name: str) -> dict:
            [found] = [o for o in objects_by_kind(objects, kind) if o["metadata"]["name"] == name]
            return found

        ui, service = one("Deployment", "evidently-ui"), one("Service", "evidently-ui")
        pod = ui["spec"]["template"]["spec"]
        [container] = pod["containers"]
        args = container["command"] + container["args"]
        workspace = args[args.index("--workspace") + 1]
        [mount] = [m for m in container["volumeMounts"] if workspace.startswith(m["mountPath"] + "/")]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert args[:2] == ["evidently", "ui"] and args[args.index("--host") + 1] == "0.0.0.0"
        secret = next(e for e in container["env"] if e["name"] == "EVIDENTLY_SECRET")["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "driftloop-evidently", "key": "secret"}

        url = urlparse(settings.monitor.history_url)
        assert url.hostname == "evidently-ui.driftloop.svc.cluster.local" and url.port == service["spec"]["ports"][0]["port"]
        monitor = one("Deployment", "driftloop-monitor")["spec"]["template"]
        mine = next(e for e in monitor["spec"]["containers"][0]["env"] if e["name"] == SECRET_ENV)
        assert {k: v for k, v in mine["valueFrom"]["secretKeyRef"].items() if k != "optional"} == secret

        policy = one("NetworkPolicy", "evidently-ui-ingress")
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= ui["spec"]["template"]["metadata"]["labels"].items()
        selectors = [f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for f in rule["from"]]
        assert any(s.items() <= monitor["metadata"]["labels"].items() for s in selectors)
        from pipelines.scoring import ALERT_POD_LABELS

        assert ALERT_POD_LABELS in selectors  # the batch drift step's pod
        assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [8000]


def test_each_batch_drift_check_is_a_snapshot_in_the_models_project(tmp_path, trained):
    """The scoring pipeline's drift step (kfp.local) writes the batch's check beside the monitor's; compiled for a
    cluster, the step gets the Evidently UI's write secret and the service's address as a parameter."""
    import pandas as pd
    import yaml

    from pipelines.scoring import ScoreRequest, compile_scoring_pipeline, run_scoring
    from tests.test_score import _batch

    base, _ = trained
    settings = make_settings(tmp_path / "ws", base.data.source, **{"mlflow.tracking_uri": base.tracking_uri,
                                                                    "score.batch_rows": 300, **OWN_RUNS})
    src = tmp_path / "batch.parquet"
    _batch(600, drifted=True).to_parquet(src, index=False)
    result = run_scoring(settings, ScoreRequest(input=str(src), output=str(tmp_path / "out.parquet"), chunks=1))
    assert result.state == "SUCCEEDED", result.error
    [record] = HistoryWorkspace(history_target(settings)).records("churn")
    s = result.summary
    assert record["kind"] == "batch" and record["verdict"] == "drift" and record["input"] == str(src)
    assert record["drifted_columns"] == s["drifted_columns"] and record["share"] == pytest.approx(s["drift_share"])
    assert record["rows"] == 600 and record["version"] == s["version"] and record["report"].startswith("runs:/")
    assert len(pd.read_parquet(tmp_path / "out.parquet")) == 600  # and the predictions, of course

    cluster = make_settings(tmp_path / "kws", base.data.source, **{
        "kfp.host": "http://kfp.example:8888", "mlflow.tracking_uri": "http://mlflow.example:5000",
        "monitor.history_url": "http://evidently-ui.driftloop.svc.cluster.local:8000"})
    spec, platform = yaml.safe_load_all(compile_scoring_pipeline(cluster, tmp_path / "score.yaml").read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["history"]["defaultValue"] == cluster.monitor.history_url
    drift_env = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-score-drift-op"]["secretAsEnv"]
    assert {"secretName": "driftloop-evidently", "key": "secret", "env": "DRIFTLOOP_EVIDENTLY_SECRET"} in [
        {"secretName": e["secretName"], "key": k["secretKey"], "env": k["envVar"]} for e in drift_env for k in e["keyToEnv"]]


def test_a_step_writing_its_record_says_why_not_and_never_waits_long():
    import socket

    from driftloop.core.history import write_record

    record = {"kind": "batch", "model": "churn", "time": "2026-12-01T10:00:00+00:00", "verdict": "no drift"}
    assert write_record(f"http://127.0.0.1:{free_port()}", record).startswith("not written: cannot write to the "
                                                                             "Evidently workspace http://127.0.0.1:")
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.perf_counter()
        assert write_record(url, record, timeout=1.0) == f"not written: {url} did not answer within 1s"
        assert time.perf_counter() - started < 3


def test_a_full_queue_drops_records_counts_them_and_says_so_once(tmp_path, scenario_path, caplog):
    stuck = _StuckWorkspace()
    history = CheckHistory(make_settings(tmp_path, scenario_path), workspace=stuck, max_pending=2)
    with caplog.at_level(logging.WARNING, logger="monitoring.history"):
        history.drift(_drift_outcome("tumbling:0", "no drift"))
        deadline = time.monotonic() + 10
        while stuck.calls == 0 and time.monotonic() < deadline:  # the writer holds the first
            time.sleep(0.01)
        for i in range(1, 6):  # two wait in the queue; three find no room
            history.drift(_drift_outcome(f"tumbling:{i}", "no drift"))
    stuck.release.set()
    assert history.flush(10) and (history.written, history.dropped) == (3, 3)
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1


def test_a_regression_metric_without_a_rule_still_makes_a_snapshot():
    """mean_error is measured but has no limit by default: the snapshot shows a dash, it is not lost (it was: a
    TypeError formatting the missing limit dropped every quality snapshot of a regression model)."""
    from driftloop.core.history_snapshots import record_metadata, record_snapshot
    from monitoring.history import quality_records

    outcome = {"checked_at": "2026-12-07T00:12:00+00:00", "versions": {"1": {
        "verdict": "degraded", "window": {"id": "tumbling:0-500", "start": "a", "end": "b", "rows": 500},
        "live": {"rmse": 31.5, "mae": 22.0, "mean_error": -4.0, "r2": None},
        "holdout": {"rmse": 20.0, "mae": 14.0, "mean_error": -1.0},
        "verdicts": [{"metric": "rmse", "limit": 24.0, "rule": "+20%", "degraded": True},
                     {"metric": "mae", "limit": 16.8, "rule": "+20%", "degraded": True}]}}}
    [record] = quality_records(outcome, "hotels")
    snapshot = record_snapshot(record)
    rows = {row[0]: row for w in snapshot.widgets for row in (w.params or {}).get("data", [])}
    assert rows["rmse"][1:4] == ["31.5", "20", "24"] and rows["rmse"][-1] == "yes"
    assert rows["mean_error"][1:4] == ["-4", "-1", "—"] and rows["mean_error"][-1] == "no"
    assert "r2" not in rows  # no live value: nothing to show
    assert record_metadata(record)["values"] == "rmse 31.5 (limit 24), mae 22 (limit 16.8), mean_error -4"
