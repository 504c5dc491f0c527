"""Rollout controller against a live gateway, live upstreams with injected faults and a real MLflow registry;
the step rule (pass, fail, hold, wait) against a scripted target."""

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
from serving.rollout import (PROGRESSING, PROMOTED, ROLLED_BACK, Answers, GatewayTarget, PrometheusMetrics,
                             RolloutController, evaluate_checks, psi, weight_schedule)
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


class LabelledLog:
    """What the monitor's ``GET /labelled`` would answer: each labelled request the traffic sent — its
    features, the version that served it, that version's answer and the label."""

    def __init__(self) -> None:
        self._rows: list[dict] = []
        self._lock = threading.Lock()

    def add(self, features: dict, version: str, prediction, label) -> None:
        with self._lock:
            self._rows.append({"ts": time.time(), "features": features, "version": version, "prediction": prediction,
                               "label": label})

    def rows(self, since: float, *, model=None, limit: int = 50_000) -> list[dict]:
        with self._lock:
            return [r for r in self._rows if r["ts"] >= since][-limit:]


class ServerScorer:
    """Both versions' answers as the fake model servers give them (what RegistryScorer does for MLflow models)."""

    def __init__(self, servers: dict) -> None:
        self.servers = servers

    def answers(self, version: str, rows: list[dict]) -> Answers:
        return Answers(self.servers[version]._predict(rows))


@contextlib.contextmanager
def live_rollout(workspace, model, *, labels=False, **rollout):
    """Primary v1 + canary v2 behind a gateway, steady traffic (and labels) flowing through it."""
    settings = settings_for(workspace, model, **rollout)
    reg = register_two_versions(settings)
    primary, canary = FakeModelServer(model, "1"), FakeModelServer(model, "2")
    log = LabelledLog() if labels else None
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
                        if log is not None and r.status_code == 200:
                            c.post("/feedback", json={"id": r.headers["ce-id"], "label": truth(row(i))},
                                   headers={"authorization": f"Bearer {TOKEN}"})
                            log.add(row(i), r.headers["x-model-version"], r.json()["predictions"][0], truth(row(i)))

            workers = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
            for w in workers:
                w.start()
            try:
                RolloutController.begin(settings, canary_version="2", primary_version="1")
                scorer = ServerScorer({"1": primary, "2": canary})
                target = lambda: GatewayTarget(gw_url, token=TOKEN, labelled=log)  # noqa: E731
                ctl = RolloutController(settings, target(), reg, scorer=scorer)
                ctl.again = lambda: RolloutController(settings, target(), reg, scorer=scorer)
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
        # quality was judged on the passing steps, on the same labelled requests; the labels decide,
        # so the output distribution is not judged
        last = {c["name"]: c for c in state.history[-1]["checks"]}
        assert last["quality_delta"]["passed"] is True and "on the same" in last["quality_delta"]["detail"]
        assert last["prediction_psi"]["passed"] is None and "labelled requests decide" in last["prediction_psi"]["detail"]


def _assert_rolled_back(state, reg, model, elapsed, check_name):
    assert state.status == ROLLED_BACK, state.history[-1]
    decisions = [h["decision"] for h in state.history]
    assert decisions[0] == "start" and decisions[-1] == "rollback" and "advance" not in decisions
    # THRESHOLD failed analyses in a row: the first fail ..., the THRESHOLD-th rolls back
    assert decisions.count("fail") == THRESHOLD - 1, decisions
    first_failure = next(h["ts"] for h in state.history if h["decision"] in ("fail", "rollback"))
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
    with live_rollout(workspace, "worse", labels=True) as (settings, reg, ctl, canary, gw_url):
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
        again = ctl.again()
        del ctl
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


class TableScorer:
    """Each version's answer to a labelled request, looked up by the request's ``id`` feature."""

    def __init__(self, answers: dict[str, list]) -> None:
        self.table = answers
        self.asked: list[tuple[str, int]] = []

    def answers(self, version: str, rows: list[dict]) -> Answers:
        self.asked.append((version, len(rows)))
        return Answers([self.table[version][r["id"]] for r in rows])


def labelled_rows(labels: list, served: list[str], answers: dict[str, list]) -> list[dict]:
    """Rows as the monitor's GET /labelled answers them: features, the version that served, its answer, label."""
    return [{"request_id": f"r{i}", "row_index": 0, "ts": 1.0 + i, "version": v, "features": {"id": i},
             "prediction": answers[v][i], "label": y} for i, (y, v) in enumerate(zip(labels, served))]


def _monitor_labelled(rows: list[dict], seen: list | None = None):
    """The monitor's GET /labelled (mock transport)."""
    from serving.rollout import MonitorLabelled

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/labelled" and request.headers["authorization"] == "Bearer t"
        if seen is not None:
            seen.append(dict(request.url.params))
        return httpx.Response(200, json={"since": 0, "rows": rows})

    return MonitorLabelled("http://monitor", client=httpx.Client(transport=httpx.MockTransport(handler)), token="t")


@pytest.mark.parametrize("canary_errors, outcome", [(0.0, PROMOTED), (0.3, ROLLED_BACK)])
def test_inference_service_target_driven_by_prometheus(workspace, canary_errors, outcome):
    from serving.rollout import KServeTarget

    model = f"isvc-{outcome.replace('_', '-')}"  # a DNS-1123 label, as a served model name must be
    s = settings_for(workspace, model, step_weights=[10, 50])
    values = {"requests:00002": 200, "error_rate:00002": canary_errors, "p99_ms:00002": 40.0,
              "requests:00001": 900, "error_rate:00001": 0.0, "p99_ms:00001": 35.0}
    backend = _RecordingKServeBackend()
    # 300 labelled requests, 90 served by the canary: the champion right on 80 %, the canary on 95 %
    labels = [i % 2 for i in range(300)]
    answers = {"1": [y if i % 5 else 1 - y for i, y in enumerate(labels)],
               "2": [y if i % 20 else 1 - y for i, y in enumerate(labels)]}
    rows, seen = labelled_rows(labels, ["2" if i % 10 < 3 else "1" for i in range(300)], answers), []
    RolloutController.begin(s, canary_version="2", primary_version="1", canary_uri="models:/churn/2")
    target = KServeTarget(backend, _prometheus(values), _monitor_quality(), labelled=_monitor_labelled(rows, seen))
    ctl = RolloutController(s, target, None, scorer=TableScorer(answers))
    for _ in range(4):
        ctl.step()
    state = ctl.state()
    assert state.status == outcome
    quality = {c["name"]: c for c in state.history[1]["checks"]}["quality_delta"]
    assert quality["passed"] is True and quality["value"] == pytest.approx(0.15)  # on all 300, whoever served
    assert seen[0]["model"] == s.serving.name and float(seen[0]["since"]) == state.quality_since
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


# -- the step rule, against a scripted target --------------------------------------------------
HEALTHY = {"requests": 100, "error_rate": 0.0, "p99_ms": 10.0, "labels": 0}


class ScriptedTarget:
    """A canary target whose numbers the test sets before each interval: per-version stats (as the gateway
    or Prometheus report them), the champion's latest answers and the rollout's labelled requests."""

    def __init__(self, labelled=None, champion=()) -> None:
        self.canary, self.primary = dict(HEALTHY), dict(HEALTHY)
        self.labelled = labelled  # rows, None (no monitor) or an exception to raise
        self.champion = list(champion)
        self.calls: list[tuple] = []

    def set_weight(self, percent):
        self.calls.append(("weight", percent))

    def stats(self, since, canary_version, primary_version):
        return dict(self.canary), dict(self.primary)

    def champion_predictions(self, version, limit):
        return self.champion[-limit:]

    def labelled_rows(self, since, model):
        if isinstance(self.labelled, Exception):
            raise self.labelled
        return self.labelled

    def promote(self, state):
        self.calls.append(("promote",))

    def rollback(self, state):
        self.calls.append(("rollback",))


def scripted(tmp_path, target, scorer=None, *, task="classification", **rollout):
    base = {"rollout.step_weights": [20, 60, 80], "rollout.threshold": 2, "rollout.min_requests": 10,
            "rollout.min_labels": 100, "model.task": task}
    base.update({f"rollout.{k}": v for k, v in rollout.items()})
    s = make_settings(tmp_path, tmp_path / "unused.parquet", **base)
    RolloutController.begin(s, canary_version="2", primary_version="1")
    ctl = RolloutController(s, target, None, scorer=scorer)
    assert ctl.step()["decision"] == "start"
    return ctl


def checks_of(record: dict) -> dict[str, dict]:
    return {c["name"]: c for c in record["checks"]}


def test_a_retrained_regressor_that_corrects_the_champion_is_promoted_on_labels(tmp_path):
    """The issue's first case: the champion under-predicts heavily (RMSE ~133), the retrained model does
    not (RMSE ~71), so every answer differs — the output PSI is far beyond any fixed limit. With labels the
    same 150 requests scored by both decide, scale-free, and the candidate is promoted."""
    import numpy as np

    rng = np.random.default_rng(1)
    y = rng.lognormal(5.5, 0.4, 150)
    answers = {"1": list(0.5 * y + rng.normal(0, 60, 150)), "2": list(y + rng.normal(0, 70, 150))}
    rows = labelled_rows(list(y), ["1" if i % 4 else "2" for i in range(150)], answers)
    target = ScriptedTarget(rows)
    target.canary["predictions"], target.primary["predictions"] = answers["2"], answers["1"]
    ctl = scripted(tmp_path, target, TableScorer(answers), task="regression")
    first = ctl.step()
    quality = checks_of(first)["quality_delta"]
    assert first["decision"] == "advance" and quality["passed"] is True
    assert 0.3 < quality["value"] < 0.6 and "rmse" in quality["detail"] and "relative" in quality["detail"]
    assert psi(answers["1"], answers["2"]) > 0.5  # what the fixed 0.25 limit rolled back on
    assert checks_of(first)["prediction_psi"]["passed"] is None  # labels decide
    while not ctl.state().done:
        ctl.step()
    assert ctl.state().status == PROMOTED and target.calls[-1] == ("promote",)


def test_a_canary_worse_on_the_labels_is_rolled_back_after_threshold_failed_analyses(tmp_path):
    labels = [i % 3 for i in range(200)]
    answers = {"1": labels, "2": [y if i % 4 else (y + 1) % 3 for i, y in enumerate(labels)]}  # 25 % wrong
    target = ScriptedTarget(labelled_rows(labels, ["1"] * 200, answers))
    ctl = scripted(tmp_path, target, TableScorer(answers))
    first, second = ctl.step(), ctl.step()
    assert first["decision"] == "fail" and checks_of(first)["quality_delta"]["passed"] is False
    assert "worse than the champion" in checks_of(first)["quality_delta"]["detail"]
    assert second["decision"] == "rollback" and "2 failed analyses in a row: quality_delta=-0.25" in second["reason"]
    assert ctl.state().status == ROLLED_BACK


def test_a_noisy_step_between_passing_ones_is_not_a_rollback(tmp_path):
    """The issue's second case: failed checks used to add up over the whole rollout, so one bad interval
    at one weight and another later rolled a good canary back. Failed analyses count in a row only; a
    failure restarts the window so the next analysis judges fresh requests."""
    target = ScriptedTarget(None)
    ctl = scripted(tmp_path, target)
    assert ctl.step()["decision"] == "advance"  # 60 %
    target.canary["error_rate"] = 0.3
    failed = ctl.step()
    assert failed["decision"] == "fail" and ctl.state().failed_checks == 1
    assert ctl.state().window_start >= failed["ts"] - 1.0
    target.canary["error_rate"] = 0.0
    assert ctl.step()["decision"] == "advance" and ctl.state().failed_checks == 0  # 80 %
    target.canary["error_rate"] = 0.3
    assert ctl.step()["decision"] == "fail"
    target.canary["requests"] = 3  # too few requests: nothing judged, the row stays as it is
    assert ctl.step()["decision"] == "wait" and ctl.state().failed_checks == 1
    target.canary["requests"] = 100
    last = ctl.step()
    assert last["decision"] == "rollback" and "2 failed analyses in a row: error_rate=0.3" in last["reason"]


def test_inconclusive_quality_holds_without_counting_as_failures_until_max_holds(tmp_path):
    labels = [i % 2 for i in range(120)]
    champion = [y if i % 4 else 1 - y for i, y in enumerate(labels)]  # 75 % right
    candidate = [y if i % 3 else 1 - y for i, y in enumerate(labels)]  # 67 % right, wrong elsewhere: undecided
    answers = {"1": champion, "2": candidate}
    target = ScriptedTarget(labelled_rows(labels, ["1"] * 120, answers))
    ctl = scripted(tmp_path, target, TableScorer(answers), max_holds=3)
    for k in (1, 2):
        held = ctl.step()
        assert held["decision"] == "hold" and checks_of(held)["quality_delta"]["passed"] is None
        assert ctl.state().failed_checks == 0 and ctl.state().holds == k and ctl.state().weight == 20
    assert "inconclusive" in held["reason"]
    gave_up = ctl.step()
    assert gave_up["decision"] == "rollback" and "not shown within rollout.quality_margin" in gave_up["reason"]


def test_where_labels_are_missing_the_psi_guard_judges_against_the_champions_own_spread(tmp_path):
    import numpy as np

    rng = np.random.default_rng(4)
    champion = list(rng.normal(100, 10, 2400))
    target = ScriptedTarget(labelled=[], champion=champion)  # a monitor, no labelled request yet
    target.canary["predictions"] = list(rng.normal(100, 10, 300))  # answers like the champion's
    ctl = scripted(tmp_path, target, task="regression")
    like = ctl.step()
    guard = checks_of(like)["prediction_psi"]
    assert like["decision"] == "advance" and guard["passed"] is True and guard["value"] <= guard["limit"]
    assert "19 earlier blocks of 60" in guard["detail"]
    assert "needs 100 labelled requests" in checks_of(like)["quality_delta"]["detail"]
    target.canary["predictions"] = list(rng.normal(115, 10, 300))  # a shifted canary
    unlike = ctl.step()
    assert unlike["decision"] == "fail" and checks_of(unlike)["prediction_psi"]["passed"] is False
    target.champion = champion[:1000]  # too little of the champion's own history: the guard cannot judge
    assert checks_of(ctl.step())["prediction_psi"]["passed"] is None


def test_a_monitor_that_cannot_be_read_is_unavailable_only_where_labels_came_in(tmp_path):
    from driftloop.core.errors import ServingError

    target = ScriptedTarget(ServingError("monitor labelled requests query failed: connection refused"))
    target.canary["labels"] = 5  # the gateway joined labels: the monitor holds them, judging without is wrong
    ctl = scripted(tmp_path, target)
    assert ctl.step()["decision"] == "unavailable" and ctl.state().status == PROGRESSING
    target.canary["labels"] = 0  # no label came in: the labels are missing, the interval is judged
    judged = ctl.step()
    assert judged["decision"] == "advance"
    assert "no labels reached" in checks_of(judged)["quality_delta"]["detail"]


def test_answers_the_log_does_not_hold_give_no_verdict(tmp_path):
    labels = [i % 2 for i in range(150)]
    answers = {"1": labels, "2": labels}
    rows = labelled_rows(labels, ["2"] * 150, answers)
    for r in rows[:10]:
        r["prediction"] = 1 - r["prediction"]  # the model server answered otherwise than the model re-scored
    ctl = scripted(tmp_path, ScriptedTarget(rows), TableScorer(answers))
    held = ctl.step()
    assert held["decision"] == "hold" and "10 of 150 re-scored answers differ" in checks_of(held)["quality_delta"]["detail"]


def test_the_registry_scorer_answers_as_the_model_servers_do(tmp_path):
    """Both versions loaded from MLflow by version, through the model server's own loading and predict path:
    a labelled request gets the answer the version's server gives, whichever version served it."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    from driftloop.core.registry import Registry
    from serving.predictor import DriftloopModel
    from serving.rollout import RegistryScorer, compare_versions

    s = make_settings(tmp_path, tmp_path / "unused.parquet", **{"mlflow.model_name": "scored"})
    reg = Registry.from_settings(s)
    rng = np.random.default_rng(3)
    X = pd.DataFrame({"tenure": rng.uniform(0, 48, 400), "charges": rng.uniform(10, 120, 400)})
    y = (X["tenure"] < 12).astype(int)
    with mlflow.start_run(experiment_id=reg.experiment_id()):
        for cols in (["charges"], ["tenure", "charges"]):  # v1 weak (no tenure weight), v2 strong
            model = LogisticRegression().fit(X[cols].assign(**{c: 0.0 for c in X if c not in cols})[list(X)], y)
            mlflow.sklearn.log_model(model, name=f"model-{len(cols)}", registered_model_name="scored",
                                     signature=infer_signature(X, y))
    rows = [{"version": "1", "features": r, "prediction": None, "label": int(t)}
            for r, t in zip(X.to_dict(orient="records"), y)]
    scorer = RegistryScorer("scored", s.tracking_uri)
    served = DriftloopModel("scored", "models:/scored/2", s.tracking_uri)
    served.load()
    expected = served.predict({"instances": [r["features"] for r in rows[:5]]})["predictions"]
    assert scorer.answers("2", [r["features"] for r in rows[:5]]).predictions == expected
    answers_1 = scorer.answers("1", [r["features"] for r in rows])
    assert answers_1.classes == [0, 1] and answers_1.scores.shape == (400, 2)
    for r, p in zip(rows, answers_1.predictions):
        r["prediction"] = p  # what v1's server logged
    pairing = compare_versions(rows, scorer, candidate="2", champion="1", metric="accuracy", task="classification")
    assert pairing.compared == 400 and pairing.mismatched == 0 and pairing.served == 400
    assert pairing.comparison.change > 0.1 and pairing.comparison.verdict(0.05) is True
    auc = compare_versions(rows, scorer, candidate="2", champion="1", metric="roc_auc", task="classification")
    assert auc.comparison.candidate > auc.comparison.champion
    bad = [{**r, "features": {"tenure": 1.0}} for r in rows[:3]]  # a column the signature needs is missing
    refused = compare_versions(bad, scorer, candidate="2", champion="1", metric="accuracy", task="classification")
    assert refused.comparison is None and "cannot answer the logged requests" in refused.problem


def test_a_controller_of_its_own_loads_both_versions_while_the_canary_starts(tmp_path):
    """``driftloop rollout run`` (preload): after the start step both versions load in the background, so the
    first analysis with enough labels finds them loaded; a version that cannot load is left to that analysis."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    from serving.rollout import RegistryScorer

    s = make_settings(tmp_path, tmp_path / "unused.parquet", **{"mlflow.model_name": "warm",
                                                               "rollout.step_weights": [20, 50]})
    reg = Registry.from_settings(s)
    X = pd.DataFrame({"tenure": np.arange(40.0), "charges": np.arange(40.0)[::-1]})
    y = (X["tenure"] < 12).astype(int)
    with mlflow.start_run(experiment_id=reg.experiment_id()):
        for _ in range(2):
            mlflow.sklearn.log_model(LogisticRegression().fit(X, y), name="model", registered_model_name="warm",
                                     signature=infer_signature(X, y))
    RolloutController.begin(s, canary_version="2", primary_version="1")
    ctl = RolloutController(s, ScriptedTarget([]), None, preload=True)
    assert ctl.run(max_steps=1).status == PROGRESSING
    scorer = ctl._scorer
    assert isinstance(scorer, RegistryScorer)
    loading = [t for t in threading.enumerate() if t.name == "preload-warm"]
    for t in loading:
        t.join(120)
    assert sorted(scorer._models) == ["1", "2"]
    assert scorer._models["2"].ready and scorer._models["1"].ready
    ctl.run(max_steps=1)  # the same pair: not loaded again
    assert not [t for t in threading.enumerate() if t.name == "preload-warm"]

    RolloutController.begin(s, canary_version="9", primary_version="1")  # a version the registry lacks
    missing = RolloutController(s, ScriptedTarget([]), None, preload=True)
    missing.run(max_steps=1)
    for t in [t for t in threading.enumerate() if t.name == "preload-warm"]:
        t.join(120)
    assert sorted(missing._scorer._models) == ["1"]  # v9 is the analysis's to report, the controller goes on
    quiet = RolloutController(s, ScriptedTarget([]), None)  # the gateway's own controller: nothing preloaded
    quiet.run(max_steps=1)
    assert quiet._scorer is None


def test_on_the_embedded_default_the_labels_come_from_the_monitor_the_gateway_logs_to(tmp_path, monkeypatch):
    """The local wiring, all real but the model servers: the gateway logs to a monitor and forwards the labels
    posted to it; GatewayTarget finds that monitor in the gateway's status and reads its GET /labelled with the
    workspace's ingest token; a canary answering wrong is rolled back on the same labelled requests."""
    from monitoring.service import MonitorService
    from tests.test_trigger import RecordingRunner

    monkeypatch.setenv("DRIFTLOOP_INGEST_TOKEN", TOKEN)  # the workspace's ingest token, as serve hands it down
    monkeypatch.delenv("DRIFTLOOP_WEBHOOK_TOKEN", raising=False)  # the embedded default usually has none
    model = "wired"
    settings = make_settings(tmp_path, tmp_path / "unused.parquet", **{
        "mlflow.model_name": model, "serving.name": model, "rollout.step_weights": [50], "rollout.threshold": 2,
        "rollout.min_requests": 5, "rollout.min_labels": 40, "rollout.max_p99_latency_ms": 2000.0})
    monitor = MonitorService(settings, runner=RecordingRunner())
    primary, canary = FakeModelServer(model, "1"), FakeModelServer(model, "2")
    canary.wrong = True
    with serve_app(monitor.app) as monitor_url, serve_app(primary.app) as p_url, serve_app(canary.app) as c_url:
        cfg = GatewayConfig(name=model, primary=Upstream(p_url, "1"), canary=Upstream(c_url, "2"), canary_percent=50,
                            seed=3, admin_token=TOKEN, ingest_token=TOKEN, sink_url=f"{monitor_url}/events",
                            feedback_url=f"{monitor_url}/feedback", feedback_outbox=str(tmp_path / "outbox.db"))
        with serve_app(create_gateway_app(cfg)) as gw_url, httpx.Client(base_url=gw_url, timeout=10) as c:
            RolloutController.begin(settings, canary_version="2", primary_version="1")
            ctl = RolloutController(settings, GatewayTarget(gw_url, token=TOKEN), None,
                                    scorer=ServerScorer({"1": primary, "2": canary}))
            assert ctl.step()["decision"] == "start"
            auth = {"authorization": f"Bearer {TOKEN}"}
            for i in range(120):
                r = c.post(f"/v1/models/{model}:predict", json={"instances": [row(i)]})
                assert r.status_code == 200
                assert c.post("/feedback", json={"id": r.headers["ce-id"], "label": truth(row(i))},
                              headers=auth).status_code == 200
            deadline = time.monotonic() + 60  # generous: the suite must pass on a busy machine
            while len(monitor.store.labelled()) < 120 and time.monotonic() < deadline:
                time.sleep(0.1)  # events and labels reach the monitor in the background; both must be there
            first = ctl.step()
            second = ctl.step()
    quality = {c["name"]: c for c in first["checks"]}["quality_delta"]
    assert first["decision"] == "fail" and quality["passed"] is False and quality["value"] == pytest.approx(-1.0)
    assert "on the same 120 labelled requests" in quality["detail"]
    assert second["decision"] == "rollback" and ctl.state().status == ROLLED_BACK
    # no request reached the canary after the failure restarted the window: quality alone failed, and says so
    assert "quality_delta=-1" in second["reason"] and "requests=" not in second["reason"]
