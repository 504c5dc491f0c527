"""Rollout controller against a live gateway, live upstreams with injected faults and a real MLflow registry."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from driftloop.core.registry import CHAMPION, TAG, Registry
from serving.gateway import GatewayConfig, Upstream, create_gateway_app
from driftloop.core.errors import RolloutAborted
from serving.rollout import (PROMOTED, ROLLED_BACK, GatewayTarget, PrometheusMetrics, RolloutController, evaluate_checks,
                             psi, weight_schedule)
from tests.conftest import make_settings
from tests.serving_helpers import FakeModelServer, row, serve_app, truth

INTERVAL = 0.5
THRESHOLD = 2
TOKEN = "rollout-admin-token"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("rollout-ws")


def settings_for(workspace, model, **rollout):
    base = {"rollout.interval_seconds": INTERVAL, "rollout.threshold": THRESHOLD, "rollout.step_weights": [20, 50],
            "rollout.min_requests": 10, "rollout.min_labels": 10, "rollout.max_p99_latency_ms": 1000.0,
            "mlflow.model_name": model}
    base.update({f"rollout.{k}": v for k, v in rollout.items()})
    return make_settings(workspace, workspace / "unused.parquet", **base)


def register_two_versions(settings) -> Registry:
    """A real MLflow registry with v1 = champion and v2 = challenger (each with its own run)."""
    reg = Registry.from_settings(settings)
    name = settings.mlflow.model_name
    exp = reg.experiment_id()
    reg.client.create_registered_model(name)
    for _ in (1, 2):
        run = reg.client.create_run(exp)
        reg.client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
        reg.client.set_terminated(run.info.run_id)
    reg.set_alias(name, CHAMPION, "1")
    reg.set_alias(name, "challenger", "2")
    return reg


@contextlib.contextmanager
def live_rollout(workspace, model, *, labels=False, **rollout):
    """Primary v1 + canary v2 behind a gateway, steady traffic (and labels) flowing through it."""
    settings = settings_for(workspace, model, **rollout)
    reg = register_two_versions(settings)
    primary, canary = FakeModelServer(model, "1"), FakeModelServer(model, "2")
    with serve_app(primary.app) as p_url, serve_app(canary.app) as c_url:
        cfg = GatewayConfig(name=model, primary=Upstream(p_url, "1"), canary=Upstream(c_url, "2"), seed=1,
                            admin_token=TOKEN, ingest_token=TOKEN)
        with serve_app(create_gateway_app(cfg)) as gw_url:
            stop = threading.Event()

            def traffic() -> None:
                with httpx.Client(base_url=gw_url, timeout=10) as c:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        r = c.post(f"/v1/models/{model}:predict", json={"instances": [row(i)]})
                        if labels and r.status_code == 200:
                            c.post("/feedback", json={"id": r.headers["ce-id"], "label": truth(row(i))},
                                   headers={"authorization": f"Bearer {TOKEN}"})

            workers = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
            for w in workers:
                w.start()
            try:
                RolloutController.begin(settings, canary_version="2", primary_version="1")
                ctl = RolloutController(settings, GatewayTarget(gw_url, token=TOKEN), reg)
                yield settings, reg, ctl, canary, gw_url
            finally:
                stop.set()
                for w in workers:
                    w.join(10)


def run_timed(ctl):
    t0 = time.monotonic()
    state = ctl.run(until_done=True, max_steps=20)
    return state, time.monotonic() - t0


def test_healthy_canary_is_promoted(workspace):
    # a longer interval so that each step sees enough predictions for the distribution check
    with live_rollout(workspace, "healthy", labels=True, interval_seconds=1.2) as (settings, reg, ctl, canary, gw_url):
        state, _ = run_timed(ctl)
        assert state.status == PROMOTED, state.history[-1]
        decisions = [h["decision"] for h in state.history if h["decision"] in ("start", "advance", "promote")]
        assert decisions == ["start", "advance", "promote"]
        assert reg.version_by_alias("healthy", CHAMPION).version == "2"
        status = httpx.get(gw_url + "/admin/status").json()
        assert status["primary"]["version"] == "2" and status["canary"] is None
        tags = reg.get_version("healthy", "2").tags
        assert tags[TAG.ROLLOUT] == "promoted"
        run_id = reg.get_version("healthy", "2").run_id
        art = reg.download(run_id, "rollout/history.json")
        assert json.loads(art.read_text())["status"] == PROMOTED
        # quality and distribution were judged on the passing steps
        last = state.history[-1]["checks"]
        assert {c["name"]: c["passed"] for c in last}["quality_delta"] is True
        assert {c["name"]: c["passed"] for c in last}["prediction_psi"] is True


def _assert_rolled_back(state, reg, model, elapsed, check_name):
    assert state.status == ROLLED_BACK, state.history[-1]
    decisions = [h["decision"] for h in state.history]
    assert decisions[0] == "start" and decisions[-1] == "rollback" and "advance" not in decisions
    # THRESHOLD failing intervals in a row: the first holds ..., the THRESHOLD-th rolls back
    assert decisions.count("hold") == THRESHOLD - 1, decisions
    first_failure = next(h["ts"] for h in state.history if h["decision"] in ("hold", "rollback"))
    assert state.history[-1]["ts"] - first_failure <= (THRESHOLD - 1) * INTERVAL + 1.0
    assert elapsed <= (THRESHOLD + 1 + decisions.count("wait")) * INTERVAL + 5.0, elapsed  # loose: loaded CI
    assert check_name in state.reason
    assert reg.version_by_alias(model, CHAMPION).version == "1"
    tags = reg.get_version(model, "2").tags
    assert tags[TAG.ROLLOUT] == "rolled_back" and check_name in tags[TAG.ROLLOUT_REASON]


def test_canary_returning_5xx_is_rolled_back(workspace):
    with live_rollout(workspace, "errors") as (settings, reg, ctl, canary, gw_url):
        canary.fail = 0.5
        state, elapsed = run_timed(ctl)
        _assert_rolled_back(state, reg, "errors", elapsed, "error_rate")
        assert httpx.get(gw_url + "/admin/status").json()["canary_percent"] == 0
        # the CLI shows the step history; a finished rollout cannot be promoted by hand
        from typer.testing import CliRunner

        from driftloop.app.cli import app
        from driftloop.core.errors import RolloutAborted

        args = ["-p", f"workspace={settings.workspace_dir}", "-p", "mlflow.model_name=errors", "-p", "mlflow.experiment=test"]
        out = CliRunner().invoke(app, ["rollout", "status", *args], terminal_width=250)
        assert out.exit_code == 0, out.output
        assert "rolled_back" in out.output and "rollback" in out.output and "fail" in out.output
        assert "error_rate" in out.output and "start" in out.output
        promoted = CliRunner().invoke(app, ["rollout", "approve", *args])
        assert isinstance(promoted.exception, RolloutAborted) and "already rolled_back" in str(promoted.exception)


def test_slow_canary_is_rolled_back(workspace):
    with live_rollout(workspace, "slow", max_p99_latency_ms=100.0) as (settings, reg, ctl, canary, gw_url):
        canary.delay = 0.15
        state, elapsed = run_timed(ctl)
        _assert_rolled_back(state, reg, "slow", elapsed, "p99_ms")


def test_canary_with_worse_accuracy_on_feedback_is_rolled_back(workspace):
    # distribution check relaxed so that quality alone decides
    with live_rollout(workspace, "worse", labels=True, max_prediction_psi=50.0) as (settings, reg, ctl, canary, gw_url):
        canary.wrong = True
        state, elapsed = run_timed(ctl)
        _assert_rolled_back(state, reg, "worse", elapsed, "quality_delta")
        assert "error_rate" not in state.reason and "p99" not in state.reason


def test_state_survives_a_controller_restart(workspace):
    with live_rollout(workspace, "restart", labels=True) as (settings, reg, ctl, canary, gw_url):
        ctl.step()  # start at 20 %
        for _ in range(6):  # advance to 50 % (a slow machine may need an extra interval for enough requests)
            time.sleep(INTERVAL)
            if ctl.step()["decision"] == "advance":
                break
        before = ctl.state()
        assert before.weight == 50 and [h["decision"] for h in before.history][::len(before.history) - 1] == ["start", "advance"]
        del ctl
        again = RolloutController(settings, GatewayTarget(gw_url, token=TOKEN), reg)
        resumed = again.state()
        assert resumed.weight == 50 and resumed.history == before.history and resumed.step_index == 1
        time.sleep(INTERVAL)
        state = again.run(until_done=True, max_steps=10)
        assert state.status == PROMOTED
        assert state.history[: len(before.history)] == before.history
        assert (settings.workspace_dir / "rollout" / "restart" / "history.jsonl").read_text().count("\n") == len(state.history) + 1


def test_checks_and_schedule_units(workspace):
    s = settings_for(workspace, "units")
    assert weight_schedule(s.rollout) == [20, 50]
    s2 = make_settings(workspace, workspace / "x", **{"rollout.step_weight": 30, "rollout.max_weight": 80})
    assert weight_schedule(s2.rollout) == [30, 60, 80]
    assert psi([0, 1] * 50, [0, 1] * 50) == pytest.approx(0.0, abs=1e-9)
    assert psi([0] * 70 + [1] * 30, [0] * 30 + [1] * 70) > 0.25
    few = {"requests": 3, "error_rate": 1.0, "p99_ms": 5.0}
    checks = {c.name: c for c in evaluate_checks(few, None, s.rollout)}
    assert checks["requests"].passed is False and checks["error_rate"].passed is None


def test_prometheus_queries_and_parsing():
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.params["query"])
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector",
                                                                         "result": [{"metric": {}, "value": [0, "0.25"]}]}})

    prom = PrometheusMetrics("http://prom:9090", "prod", client=httpx.Client(transport=httpx.MockTransport(handler)))
    q = prom.queries("churn-predictor-00002", 30)
    assert q["error_rate"] == ('sum(rate(revision_app_request_count{namespace_name="prod",revision_name="churn-predictor-00002",'
                               'response_code_class="5xx"}[30s])) / sum(rate(revision_app_request_count{namespace_name="prod",'
                               'revision_name="churn-predictor-00002"}[30s]))')
    assert "histogram_quantile(0.99" in q["p99_ms"] and "revision_app_request_latencies_bucket" in q["p99_ms"]
    stats = prom.revision_stats("churn-predictor-00002", 30)
    assert stats["error_rate"] == 0.25 and set(sent) == set(q.values())


class _RecordingKServeBackend:
    """Records what the controller asks of the InferenceService (what KServeClient would be sent)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def status(self):
        from serving.kserve_backend import ServingStatus

        return ServingStatus(name="churn", namespace="prod", ready=True, canary_percent=10, model_uri="models:/churn/2",
                             latest_ready_revision="churn-predictor-00002", latest_rolledout_revision="churn-predictor-00001")

    def set_traffic(self, percent):
        self.calls.append(("set_traffic", percent))

    def rollback(self):
        self.calls.append(("rollback",))

    def promote(self, model_uri):
        self.calls.append(("promote", model_uri))


def _prometheus(values: dict[str, float]) -> PrometheusMetrics:
    """Prometheus answering by revision and metric (a mock transport standing in for the HTTP API)."""

    def handler(request: httpx.Request) -> httpx.Response:
        q = request.url.params["query"]
        rev = "00002" if "00002" in q else "00001"
        kind = "error_rate" if "5xx" in q else "p99_ms" if "histogram_quantile" in q else "requests"
        result = [{"metric": {}, "value": [0, str(values[f"{kind}:{rev}"])]}]
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})

    return PrometheusMetrics("http://prom:9090", "prod", client=httpx.Client(transport=httpx.MockTransport(handler)))


def _monitor_quality():
    """The monitor's GET /quality answer (mock transport), as monitoring.sink shapes it."""
    from serving.rollout import MonitorQuality

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/quality" and request.url.params["task"] == "classification"
        return httpx.Response(200, json={"task": "classification", "since": 0, "versions": {
            "1": {"n": 40, "accuracy": 0.80}, "2": {"n": 35, "accuracy": 0.82}}})

    return MonitorQuality("http://monitor", client=httpx.Client(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize("canary_errors, outcome", [(0.0, PROMOTED), (0.3, ROLLED_BACK)])
def test_inference_service_target_driven_by_prometheus(workspace, canary_errors, outcome):
    from serving.rollout import KServeTarget

    model = f"isvc-{outcome.replace('_', '-')}"  # a DNS-1123 label, as a served model name must be
    s = settings_for(workspace, model, step_weights=[10, 50])
    values = {"requests:00002": 200, "error_rate:00002": canary_errors, "p99_ms:00002": 40.0,
              "requests:00001": 900, "error_rate:00001": 0.0, "p99_ms:00001": 35.0}
    backend = _RecordingKServeBackend()
    RolloutController.begin(s, canary_version="2", primary_version="1", canary_uri="models:/churn/2")
    ctl = RolloutController(s, KServeTarget(backend, _prometheus(values), _monitor_quality()), None)
    for _ in range(4):
        ctl.step()
    state = ctl.state()
    assert state.status == outcome
    quality = {c["name"]: c for c in state.history[1]["checks"]}["quality_delta"]
    assert quality["passed"] is True and quality["value"] == pytest.approx(0.02)
    if outcome == PROMOTED:
        assert backend.calls == [("set_traffic", 10), ("set_traffic", 50), ("promote", "models:/churn/2")]
    else:
        assert backend.calls == [("set_traffic", 10), ("rollback",)]
        assert "error_rate=0.3" in state.reason


def test_controller_adopts_a_canary_marked_pending_in_mlflow(workspace, tmp_path):
    """Cluster handover: the deploy step's pod and the controller share MLflow, not a disk."""
    from driftloop.core.registry import TAG
    from serving.rollout import KServeTarget, PENDING

    model = "handover"
    s = settings_for(workspace, model, step_weights=[10, 50])
    reg = register_two_versions(s)
    controller_settings = settings_for(tmp_path, model, step_weights=[10, 50])  # another machine's disk
    backend = _RecordingKServeBackend()
    values = {"requests:00002": 200, "error_rate:00002": 0.0, "p99_ms:00002": 40.0,
              "requests:00001": 900, "error_rate:00001": 0.0, "p99_ms:00001": 35.0}
    ctl = RolloutController(controller_settings, KServeTarget(backend, _prometheus(values), _monitor_quality()), reg)
    with pytest.raises(RolloutAborted):
        ctl.state()  # nothing pending yet
    reg.tag_version(model, "2", {TAG.ROLLOUT: PENDING})
    assert ctl.state().canary_version == "2" and ctl.state().primary_version == "1"
    for _ in range(4):
        ctl.step()
    assert ctl.state().status == PROMOTED
    assert reg.resolve(f"{model}@champion").version == "2"
    assert reg.get_version(model, "2").tags[TAG.ROLLOUT] == PROMOTED
    assert ctl.state().status == PROMOTED  # a finished rollout is not adopted again
    assert backend.calls == [("set_traffic", 10), ("set_traffic", 50), ("promote", "models:/handover/2")]
