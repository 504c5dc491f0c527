"""The alert path through a real Prometheus and Alertmanager, with the rules and routing from infra/.

monitor /metrics → Prometheus (the PrometheusRule's own expressions) → Alertmanager (the
AlertmanagerConfig's receiver: /alerts/alertmanager, bearer token from a file) → the monitor's
webhook → the trigger, which knows Alertmanager's alert as the duplicate of the monitor's own
drift alert → one real kfp.local retraining run. And promtool on the same rules.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid

import httpx
import pandas as pd
import pytest
import yaml

from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC, generate
from driftloop.core.registry import TAG, Registry
from monitoring.service import WEBHOOK_TOKEN_ENV, MonitorService
from tests.ce_events import structured
from tests.conftest import free_port
from tests.servers import (
    RULE_TESTS,
    alertmanager,
    alertmanager_config,
    binary,
    prometheus,
    promtool,
    rule_groups,
    wait_until,
)

pytestmark = pytest.mark.slow

FEATURES = [*FEATURES_NUMERIC, *FEATURES_CATEGORICAL]
TOKEN = "am-webhook-token"
ALERT = "DriftloopDatasetDrift"


def _write_rules(directory, **kw):
    """infra/'s PrometheusRule spec as the plain rule file the rule-test file names, plus that test file."""
    directory.mkdir(parents=True, exist_ok=True)
    rules = directory / yaml.safe_load(RULE_TESTS.read_text())["rule_files"][0]
    rules.write_text(yaml.safe_dump(rule_groups(**kw), sort_keys=False))
    shutil.copy(RULE_TESTS, directory / RULE_TESTS.name)
    return rules, directory / RULE_TESTS.name


def test_promtool_checks_and_tests_the_rules_from_infra(tmp_path):
    rules, tests = _write_rules(tmp_path / "ok")
    n_rules = sum(len(g["rules"]) for g in rule_groups()["groups"])
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0 and f"SUCCESS: {n_rules} rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = promtool("test", "rules", tests.name, cwd=tests.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # The rule tests do hold the rules to their `for:`: one minute less and the 11th minute already fires.
    _, short = _write_rules(tmp_path / "short", rule_for={ALERT: "9m"})
    failed = promtool("test", "rules", short.name, cwd=short.parent)
    assert failed.returncode != 0 and "time: 11m" in failed.stdout + failed.stderr, failed.stdout + failed.stderr


def test_alertmanager_config_rendered_from_infra_is_valid(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    cfg = tmp_path / "alertmanager.yml"
    cfg.write_text(yaml.safe_dump(alertmanager_config("http://127.0.0.1:9", token, group_wait="30s",
                                                      group_interval="5m")))
    checked = __import__("subprocess").run([binary("amtool"), "check-config", str(cfg)], capture_output=True, text=True,
                                           timeout=60)
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    route = yaml.safe_load(cfg.read_text())["route"]["routes"][0]
    assert 'driftloop_action="retrain"' in route["matchers"] and route["repeat_interval"] == "6h"


class _ServedMonitor:
    """The monitor's Starlette app under uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, service: MonitorService) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="monitor", daemon=True)

    def __enter__(self) -> "_ServedMonitor":
        self.thread.start()
        wait_until(lambda: httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200, timeout=30,
                   what="monitor")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _send(url: str, rows: pd.DataFrame, model) -> None:
    features = rows[FEATURES]
    preds = [int(p) for p in model.predict(features)]
    instances = json.loads(features.to_json(orient="records"))
    events = []
    for i in range(0, len(rows), 20):  # many small requests, as clients send them
        ce_id = uuid.uuid4().hex
        events.append(structured(ce_id, "request", {"instances": instances[i:i + 20]}))
        events.append(structured(ce_id, "response", {"predictions": preds[i:i + 20]}, version="1", role="champion"))
    r = httpx.post(f"{url}/events", content=json.dumps(events), timeout=30,
                   headers={"content-type": "application/cloudevents-batch+json",
                            "authorization": f"Bearer {os.environ['DRIFTLOOP_INGEST_TOKEN']}"})
    assert r.status_code == 200, r.text


def _firing(prom_url: str) -> list[dict]:
    alerts = httpx.get(f"{prom_url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == ALERT and a["state"] == "firing"]


def _query(prom_url: str, expr: str) -> list[dict]:
    return httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=5).json()["data"]["result"]


def _metric(url: str, name: str) -> float:
    """Sum of a metric's samples whose line starts with ``name`` on a /metrics page."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _alerts_json(settings, monkeypatch) -> list[dict]:
    """What ``driftloop alerts --json`` prints for the workspace."""
    from typer.testing import CliRunner

    from driftloop.app.cli import app

    for key, value in {"WORKSPACE": str(settings.workspace_dir), "MLFLOW__TRACKING_URI": settings.tracking_uri,
                       "MLFLOW__MODEL_NAME": "churn", "MLFLOW__EXPERIMENT": settings.mlflow.experiment}.items():
        monkeypatch.setenv(f"DRIFTLOOP_{key}", value)
    result = CliRunner().invoke(app, ["alerts", "--json", "--limit", "50"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["alerts"]


def test_drift_fires_through_prometheus_and_alertmanager_and_starts_one_run(tmp_path, monkeypatch, tracking):
    """Against the session's real MLflow server (basic auth, artifacts on S3): its champion learnt the
    first 30 days of a scenario that ends today and drifts from day 30 on. Both paths are live: the
    monitor's own alert starts the run, Alertmanager's alert for the same drift is its duplicate."""
    for key, value in tracking.env.items():
        monkeypatch.setenv(key, value)
    settings = tracking.settings(tmp_path / "ws", **{
        "serving.name": "churn", "monitor.window_rows": 300, "monitor.min_samples": 200,
        "monitor.check_interval_seconds": 1, "trigger.cooldown_seconds": 0, "trigger.recent_days": 20,
        "trigger.min_samples": 200})
    registry = Registry.from_settings(settings)
    model = registry.load_pyfunc("models:/churn@champion")

    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, TOKEN)
    monkeypatch.setenv("DRIFTLOOP_INGEST_TOKEN", "ingest-token")  # what _send posts /events with
    token_file = tmp_path / "webhook-token"  # where the Secret driftloop-webhook would be mounted
    token_file.write_text("not-the-token")
    service = MonitorService(settings)
    service.start_checks()
    # Only the durations are the test's: scrape/evaluation every 1 s, the rule's `for: 10m` rewritten
    # to 2s when loaded (its expression, labels and annotations are infra/'s), group_wait/interval 1 s.
    rules = rule_groups(rule_for={ALERT: "2s"})
    try:
        with _ServedMonitor(service) as monitor, \
                alertmanager(tmp_path / "am", alertmanager_config(monitor.url, token_file, group_wait="1s",
                                                                  group_interval="1s")) as am, \
                prometheus(tmp_path / "prom", targets=[f"127.0.0.1:{monitor.port}"], rules=rules,
                           target_labels={"namespace": "driftloop", "service": "driftloop-monitor"},
                           alertmanager_url=am.url) as prom:
            # Traffic like the training data: scraped, evaluated, silent.
            _send(monitor.url, generate(rows=300, drift_at=None, seed=5), model)
            share = 'driftloop_monitor_dataset_drift_share{namespace="driftloop"}'
            wait_until(lambda: (service.last_outcome or {}).get("verdict") == "no drift", timeout=60,
                       what="the monitor's no-drift verdict")
            wait_until(lambda: _query(prom.url, f"{share} and driftloop_monitor_window_rows >= 300"), timeout=30,
                       what="the no-drift check scraped by Prometheus")
            time.sleep(3)  # longer than the rule's shortened `for:` at 1 s evaluations
            assert float(_query(prom.url, share)[0]["value"][1]) < 0.5
            assert _query(prom.url, f'ALERTS{{alertname="{ALERT}"}}') == []

            # Drifted traffic: the rule fires, Alertmanager posts with the wrong token, again and again.
            _send(monitor.url, generate(rows=300, drift_at=0.0, seed=6), model)
            try:
                fired = wait_until(lambda: _firing(prom.url), timeout=60, what=f"{ALERT} firing in Prometheus")
            except AssertionError as exc:
                outcome = {k: v for k, v in (service.last_outcome or {}).items() if k != "result"}
                raise AssertionError(f"{exc}\nPrometheus has {_query(prom.url, share)}; last check: {outcome}") from None
            assert fired[0]["labels"]["driftloop_action"] == "retrain" and fired[0]["labels"]["namespace"] == "driftloop"
            refused = 'driftloop_monitor_events_rejected_total{reason="webhook_unauthorized"}'
            wait_until(lambda: _metric(monitor.url, refused) >= 3, timeout=60,
                       what="three refused deliveries from Alertmanager", log=am.log)

            def attempts() -> tuple[float, float]:
                return (_metric(am.url, 'alertmanager_notifications_failed_total{integration="webhook"}'),
                        _metric(am.url, 'alertmanager_notifications_total{integration="webhook"}'))

            # every attempt refused (401), none accepted; a delivery in flight is counted as sent before it fails
            wait_until(lambda: (lambda failed, sent: failed >= 3 and failed == sent)(*attempts()), timeout=30,
                       what="every delivery counted as failed (failed == sent)", log=am.log)
            assert not [a for a in service.alerts.recent(50) if a["source"] == "alertmanager"]
            # Meanwhile the monitor's own alert for the drifted window started the run.
            own = wait_until(lambda: [a for a in service.alerts.recent(50) if a["source"] == "drift" and a["decision"]],
                             timeout=60, what="the monitor's own drift alert")
            assert [a["decision"] for a in own] == ["started"], own
            alert = own[0]

            # The right token in the mounted file: Alertmanager's next delivery is the same drift.
            token_file.write_text(TOKEN)
            # (judged: the record is stored a moment before the trigger's decision on it)
            delivered = wait_until(lambda: [a for a in service.alerts.recent(50)
                                            if a["source"] == "alertmanager" and a["decision"]],
                                   timeout=60, what="the Alertmanager alert at the monitor", log=am.log)
            assert len(delivered) == 1, delivered
            dup = delivered[0]
            assert dup["details"]["labels"]["alertname"] == ALERT
            assert (dup["decision"], dup["duplicate_of"]) == ("duplicate", alert["id"]), dup
            assert dup["reason"].startswith(f"duplicate of {alert['id']}"), dup["reason"]
            assert dup["request_id"] is None and dup["started"] is None
            rec = service.trigger.wait(alert["id"], timeout=240)
            log = (settings.workspace_dir / "monitor" / "runs" / f"{alert['id']}.log")
            assert rec["run_state"] == "SUCCEEDED", log.read_text()[-3000:] if log.exists() else rec
            time.sleep(2)  # Alertmanager keeps evaluating; a second delivery would be a duplicate, not a run
            runs = [a for a in service.alerts.recent(50) if a.get("pipeline_run_id") or a.get("started")]
            assert [a["id"] for a in runs] == [alert["id"]]
            assert 'driftloop_monitor_trigger_decisions_total{decision="started"} 1.0' in httpx.get(
                f"{monitor.url}/metrics", timeout=5).text
    finally:
        service.stop_checks()
        service.store.close()
        service.alerts.close()
    version = registry.get_version("churn", rec["model_version"])
    assert version.tags[TAG.ALERT] == alert["id"] and version.tags[TAG.TRIGGER] == f"drift:{alert['id']}"
    carrying = [v.version for v in registry.list_versions("churn") if v.tags.get(TAG.ALERT) == alert["id"]]
    assert carrying == [version.version]
    assert not [v for v in registry.list_versions("churn") if v.tags.get(TAG.ALERT) == dup["id"]]
    # What a person sees: one alert that started a run, and Alertmanager's as its duplicate.
    listed = {a["id"]: a for a in _alerts_json(settings, monkeypatch)}
    assert listed[alert["id"]]["decision"] == "started" and listed[alert["id"]]["model_version"] == rec["model_version"]
    assert listed[dup["id"]]["decision"] == "duplicate" and listed[dup["id"]]["duplicate_of"] == alert["id"]
    assert listed[dup["id"]]["reason"].startswith(f"duplicate of {alert['id']}")
    assert [a["id"] for a in listed.values() if a["decision"] == "started"] == [alert["id"]]


def test_needs_attention_reaches_alertmanager_for_people_not_the_retrain_route(tmp_path, monkeypatch):
    """A retrain rolled back while the champion's drift episode is open: the monitor's needs-attention gauge
    → infra's DriftloopNeedsAttention in a real Prometheus → a real Alertmanager, labelled for people
    (driftloop_action=notify): the webhook route to the trigger never sees it. Resolved, it ends."""
    from monitoring.alerts import Alert
    from monitoring.episodes import EpisodeAlerts
    from tests.conftest import make_settings
    from tests.test_episodes import Versions
    from tests.test_trigger import RecordingRunner

    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, TOKEN)
    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet", **{
        "trigger.min_samples": 1, "monitor.check_interval_seconds": 3600, "monitor.resolve_windows": 1})
    service = MonitorService(settings, runner=RecordingRunner())
    versions = Versions()
    service.trigger.outcomes.registry = versions  # what the rollout controller leaves in MLflow
    drift = EpisodeAlerts(service.alerts, service.trigger, kind="drift", resolve_after=1)
    step = drift.verdict("churn", "1", failed=True, window="tumbling:0-300", now=time.time())
    started = service.trigger.submit(Alert("drift-0", "drift", samples=300))
    drift.bind(step, "drift-0")
    service.trigger.wait("drift-0", timeout=30)
    service.alerts.update("drift-0", model_version="2")
    versions.tag("2", "rolled_back", "canary error rate 9 % > 5 %")
    service.trigger.follow()
    assert started.decision == "started"
    token_file = tmp_path / "webhook-token"
    token_file.write_text(TOKEN)

    def am_alerts(url: str) -> list[dict]:
        return [a for a in httpx.get(f"{url}/api/v2/alerts", timeout=5).json()
                if a["labels"]["alertname"] == "DriftloopNeedsAttention"]

    try:
        with _ServedMonitor(service) as monitor, \
                alertmanager(tmp_path / "am", alertmanager_config(monitor.url, token_file, group_wait="1s",
                                                                  group_interval="1s")) as am, \
                prometheus(tmp_path / "prom", targets=[f"127.0.0.1:{monitor.port}"], rules=rule_groups(),
                           target_labels={"namespace": "driftloop", "service": "driftloop-monitor"},
                           alertmanager_url=am.url):
            assert 'driftloop_monitor_needs_attention{model="churn"} 1.0' in httpx.get(f"{monitor.url}/metrics").text
            [fired] = wait_until(lambda: am_alerts(am.url), timeout=60, what="DriftloopNeedsAttention in Alertmanager",
                                 log=am.log)
            assert {k: fired["labels"][k] for k in ("severity", "driftloop_action", "namespace", "model")} == {
                "severity": "critical", "driftloop_action": "notify", "namespace": "driftloop", "model": "churn"}
            assert fired["annotations"]["description"].startswith("Model churn: the champion is still degraded")
            assert [r["name"] for r in fired["receivers"]] == ["null"]  # not the retrain webhook's route
            # the champion recovers: the episode ends, the gauge drops, the alert resolves in Alertmanager
            drift.verdict("churn", "1", failed=False, window="tumbling:300-600", now=time.time())
            service.trigger.follow()
            wait_until(lambda: not [a for a in am_alerts(am.url) if a["status"]["state"] == "active"], timeout=60,
                       what="DriftloopNeedsAttention resolved", log=am.log)
        assert not [a for a in service.alerts.recent(50) if a["source"] == "alertmanager"]
        assert [a["decision"] for a in service.alerts.recent(50) if a["source"] == "needs-attention"] == ["resolved"]
    finally:
        service.store.close()
        service.alerts.close()
