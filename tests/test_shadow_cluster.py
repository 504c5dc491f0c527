"""The shadow phase on a cluster, and the shadow phase in `rollout status` and `lineage`.

No cluster: the shadow InferenceService and the Istio mirror are checked by what would be sent —
kserve's model classes and the pinned VirtualService schema of the infra check — and the backend
is driven with recording stand-ins for KServeClient and the kubernetes client's CustomObjectsApi
that keep every call, serialized as the Kubernetes client puts it on the wire.
"""

import copy
import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes.client import ApiClient as K8sApiClient
from kubernetes.client.exceptions import ApiException
from typer.testing import CliRunner

from driftloop.app.infra_check import check_objects
from driftloop.core.errors import ServingError
from serving import inference_service as isvcs
from serving.kserve_backend import KServeBackend
from serving.rollout import (PROGRESSING, ROLLED_BACK, SHADOW, KServeTarget, PrometheusMetrics, RolloutController,
                             RolloutStore)
from tests.conftest import make_settings

NS = "ml"


def settings_at(workspace: Path, **overrides):
    base = {"serving.name": "churn", "serving.namespace": NS, "rollout.step_weights": [20, 50],
            "rollout.interval_seconds": 0.05, "rollout.shadow_seconds": 0.01, "rollout.shadow_min_requests": 50}
    base.update(overrides)
    return make_settings(workspace, workspace / "none.parquet", **base)


def wire(obj):
    return K8sApiClient().sanitize_for_serialization(obj)


# -- recording stand-ins (test-only) ------------------------------------------------------------
def _not_found(name):
    return RuntimeError(f"Exception when calling CustomObjectsApi->get_namespaced_custom_object: (404)\n"
                        f"Reason: Not Found: {name}")


class RecordingKServeClient:
    """What KServeClient would be called with, per InferenceService name; a created one becomes ready."""

    def __init__(self, existing: dict | None = None):
        self.calls: list[tuple] = []
        self.stored: dict[str, dict] = {}
        if existing is not None:
            self.stored[existing["metadata"]["name"]] = existing

    def get(self, name, namespace=None, **_):
        self.calls.append(("get", name, namespace))
        if name not in self.stored:
            raise _not_found(name)
        return copy.deepcopy(self.stored[name])

    def _ready(self, body):
        name = body["metadata"]["name"]
        return dict(body, status={"conditions": [{"type": "Ready", "status": "True"}],
                                  "components": {"predictor": {"latestReadyRevision": f"{name}-predictor-00001"}}})

    def create(self, isvc, namespace=None, **_):
        body = wire(isvc)
        self.calls.append(("create", body, namespace))
        self.stored[body["metadata"]["name"]] = self._ready(body)
        return self.stored[body["metadata"]["name"]]

    def replace(self, name, isvc, namespace=None, **_):
        body = wire(isvc)
        self.calls.append(("replace", name, body, namespace))
        self.stored[name] = dict(body, status=self.stored.get(name, {}).get("status", {}))
        return self.stored[name]

    def patch(self, name, isvc, namespace=None, **_):
        body = wire(isvc)
        self.calls.append(("patch", name, body, namespace))
        self.stored[name]["spec"]["predictor"].update(body["spec"]["predictor"])
        return self.stored[name]

    def delete(self, name, namespace=None, **_):
        self.calls.append(("delete", name, namespace))
        if self.stored.pop(name, None) is None:
            raise _not_found(name)

    def wait_isvc_ready(self, name, namespace=None, timeout_seconds=600, polling_interval=10, **_):
        self.calls.append(("wait_isvc_ready", name, namespace))

    def changes(self):
        return [c for c in self.calls if c[0] != "get"]


class RecordingCustomObjects:
    """What kubernetes.client.CustomObjectsApi would be sent for the VirtualService."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple] = []
        self.stored: dict[str, dict] = {}
        self.fail = fail

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", group, version, namespace, plural, name))
        if name not in self.stored:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.stored[name])

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.fail:
            raise self.fail
        self.calls.append(("create", group, version, namespace, plural, copy.deepcopy(body)))
        self.stored[body["metadata"]["name"]] = dict(body, metadata=dict(body["metadata"], resourceVersion="7"))
        return self.stored[body["metadata"]["name"]]

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.calls.append(("replace", group, version, namespace, plural, name, copy.deepcopy(body)))
        self.stored[name] = copy.deepcopy(body)
        return self.stored[name]

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", group, version, namespace, plural, name))
        if self.stored.pop(name, None) is None:
            raise ApiException(status=404, reason="Not Found")

    def changes(self):
        return [c for c in self.calls if c[0] != "get"]


def production(settings):
    """The production InferenceService as the cluster returns it: the candidate's revision is out dark (0 %)."""
    body = wire(isvcs.with_canary(isvcs.build_inference_service(settings), "models:/churn/2", 0))
    body["metadata"]["resourceVersion"] = "3"
    body["status"] = {"conditions": [{"type": "Ready", "status": "True"}],
                      "components": {"predictor": {"latestReadyRevision": "churn-predictor-00002",
                                                   "latestRolledoutRevision": "churn-predictor-00001"}}}
    return body


@pytest.fixture
def cluster(tmp_path):
    s = settings_at(tmp_path, **{"rollout.shadow_percent": 10})
    client, custom = RecordingKServeClient(production(s)), RecordingCustomObjects()
    return s, KServeBackend(s, client=client, custom_api=custom), client, custom


# -- rendering ----------------------------------------------------------------------------------
@pytest.mark.parametrize("percent", [10, 100, 0.5])
def test_mirror_renders_and_validates(tmp_path, percent):
    s = settings_at(tmp_path, **{"serving.min_replicas": 0})
    shadow, mirror = isvcs.shadow_objects(s, "models:/churn/2", "2", percent)
    assert check_objects([shadow, mirror], {}, "test") == []  # kserve's classes + the pinned Istio schema
    assert mirror["apiVersion"] == "networking.istio.io/v1" and mirror["kind"] == "VirtualService"
    route = mirror["spec"]["http"][0]
    assert route["mirrorPercentage"] == {"value": float(percent)}
    assert route["mirror"]["host"] == f"churn-shadow-predictor-00001-private.{NS}.svc.cluster.local"
    assert mirror["spec"]["gateways"] == ["mesh"] and mirror["spec"]["hosts"] == [f"churn.{NS}.svc.cluster.local"]
    # users' requests still go to the production predictor's Knative route (its canary split untouched)
    assert route["route"][0]["headers"]["request"]["set"]["Host"] == f"churn-predictor.{NS}.svc.cluster.local"
    assert shadow["metadata"]["name"] == "churn-shadow"
    predictor = shadow["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor and predictor["minReplicas"] == 1  # never scaled to zero
    args = predictor["containers"][0]["args"]
    assert args[args.index("--model-uri") + 1] == "models:/churn/2"
    assert args[args.index("--model-name") + 1] == "churn"  # same path as the primary, so copies are answered
    assert shadow["metadata"]["annotations"]["driftloop.io/serving-role"] == "shadow"
    assert predictor["logger"]["metadataAnnotations"] == ["driftloop.io/model-version", "driftloop.io/serving-role"]
    # KServe's logger compares metadataHeaders with Go's canonical header names: "x-request-id" never matches
    assert predictor["logger"]["metadataHeaders"] == ["X-Request-Id"]


@pytest.mark.parametrize("bad", [0, -1, 100.5, True, "10", None])
def test_mirror_percent_outside_range_is_refused(tmp_path, bad):
    with pytest.raises(ServingError, match="mirror percent"):
        isvcs.build_mirror_virtual_service(settings_at(tmp_path), bad, "rev-00001")


def test_pinned_schema_refuses_a_wrong_mirror(tmp_path):
    _, mirror = isvcs.shadow_objects(settings_at(tmp_path), "models:/churn/2", "2", 10)
    route = mirror["spec"]["http"][0]
    route["mirrorPercentage"] = {"value": "10"}
    route["mirror"] = {"port": {"number": 80}}
    route["mirrorPercent"] = 10
    route["mirorPercentage"] = {"value": 10}
    problems = [p.message for p in check_objects([mirror], {}, "test")]
    assert "field spec.http[0].mirrorPercentage.value: must be number, got str" in problems
    assert "field spec.http[0].mirror.host: required by the CRD" in problems
    assert "field spec.http[0].mirorPercentage: unknown to the CRD" in problems
    assert len(problems) == 3, problems  # the deprecated integer mirrorPercent is still accepted


# -- the backend: exactly what would be sent ----------------------------------------------------
def test_backend_puts_up_shadow_then_mirror_changes_percent_and_removes_both(cluster):
    s, backend, client, custom = cluster
    sent = backend.set_shadow("models:/churn/2", "2", 10)
    created = [c for c in client.changes() if c[0] == "create"]
    assert [c[1]["metadata"]["name"] for c in created] == ["churn-shadow"]
    assert client.changes()[1] == ("wait_isvc_ready", "churn-shadow", NS)  # ready before the mirror names it
    (op, group, version, ns, plural, body), = custom.changes()
    assert (op, group, version, ns, plural) == ("create", "networking.istio.io", "v1", NS, "virtualservices")
    assert body == isvcs.build_mirror_virtual_service(s, 10, "churn-shadow-predictor-00001")
    assert sent["spec"]["http"][0]["mirrorPercentage"] == {"value": 10.0}
    assert client.stored["churn"]["spec"]["predictor"]["canaryTrafficPercent"] == 0  # production untouched

    backend.set_shadow("models:/churn/2", "2", 100)
    assert client.changes()[-2][0:2] == ("replace", "churn-shadow")
    op, *_, name, body = custom.changes()[-1]
    assert (op, name) == ("replace", "churn-mirror")
    assert body["metadata"]["resourceVersion"] == "7" and body["spec"]["http"][0]["mirrorPercentage"]["value"] == 100

    backend.set_shadow("models:/churn/2", "2", 0)
    assert custom.changes()[-1] == ("delete", "networking.istio.io", "v1", NS, "virtualservices", "churn-mirror")
    assert client.changes()[-1] == ("delete", "churn-shadow", NS)
    assert "churn-shadow" not in client.stored and "churn" in client.stored and not custom.stored
    backend.remove_shadow()  # already gone: nothing to do, no error


def test_backend_failures_are_one_serving_error(tmp_path):
    s = settings_at(tmp_path)
    custom = RecordingCustomObjects(fail=ApiException(status=403, reason="Forbidden"))
    backend = KServeBackend(s, client=RecordingKServeClient(production(s)), custom_api=custom)
    with pytest.raises(ServingError, match="cannot apply VirtualService ml/churn-mirror: .*403"):
        backend.set_shadow("models:/churn/2", "2", 10)
    with pytest.raises(ServingError, match="mirror percent"):
        backend.set_shadow("models:/churn/2", "2", 150)


# -- the controller on the cluster target -------------------------------------------------------
def prometheus(error_rate: float, requests: int = 80):
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        q = request.url.params["query"]
        asked.append(q)
        value = error_rate if "5xx" in q else 120.0 if "histogram_quantile" in q else requests
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [time.time(), str(value)]}]}})

    return PrometheusMetrics("http://prom:9090", NS, client=httpx.Client(transport=httpx.MockTransport(handler))), asked


def run_shadow(settings, backend, error_rate):
    metrics, asked = prometheus(error_rate)
    RolloutController.begin(settings, canary_version="2", primary_version="1", canary_uri="models:/churn/2")
    ctl = RolloutController(settings, KServeTarget(backend, metrics))
    first = ctl.step()
    assert first["decision"] == "shadow_start" and ctl.state().status == SHADOW
    time.sleep(0.02)
    second = ctl.step()
    return ctl, first, second, asked


def test_controller_runs_the_shadow_phase_on_the_cluster_then_the_canary(cluster):
    s, backend, client, custom = cluster
    ctl, first, second, asked = run_shadow(s, backend, error_rate=0.0)
    assert first["shadow_percent"] == 10
    assert all('revision_name="churn-shadow-predictor-00001"' in q for q in asked)  # the shadow's own revision
    assert second["decision"] == "start" and ctl.state().status == PROGRESSING
    assert [h["decision"] for h in ctl.state().history] == ["shadow_start", "shadow_pass", "start"]
    assert "churn-shadow" not in client.stored and not custom.stored  # mirror and shadow are gone
    patches = [c[2]["spec"]["predictor"]["canaryTrafficPercent"] for c in client.changes() if c[0] == "patch"]
    assert patches == [0, 20]  # dark during the shadow phase, then the first canary weight


def test_failing_shadow_on_the_cluster_is_rolled_back_before_any_user_sees_it(cluster):
    s, backend, client, custom = cluster
    ctl, _, second, _ = run_shadow(s, backend, error_rate=0.5)
    assert second["decision"] == "rollback" and ctl.state().status == ROLLED_BACK
    assert "shadow_error_rate" in second["reason"]
    patches = [c[2]["spec"]["predictor"]["canaryTrafficPercent"] for c in client.changes() if c[0] == "patch"]
    assert patches and set(patches) == {0}  # never above 0 %
    assert "churn-shadow" not in client.stored and not custom.stored


# -- the CLI: deploy --dry-run, rollout status, lineage -----------------------------------------
def cli(*args):
    from driftloop.app.cli import app

    return CliRunner().invoke(app, list(args), terminal_width=250)


def test_deploy_dry_run_prints_the_mirror_only_with_a_shadow_percent(tmp_path):
    ws = ["-p", f"workspace={tmp_path}", "-p", "serving.name=churn", "-p", "mlflow.model_name=churn"]
    out = cli("deploy", "--dry-run", *ws, "-p", "rollout.shadow_percent=25")
    assert out.exit_code == 0, out.output
    docs = [d for d in yaml.safe_load_all(out.output) if d]
    assert [d["kind"] for d in docs] == ["InferenceService", "InferenceService", "VirtualService"]
    assert docs[1]["metadata"]["name"] == "churn-shadow"
    assert "models:/churn@challenger" in docs[1]["spec"]["predictor"]["containers"][0]["args"]
    assert docs[2]["spec"]["http"][0]["mirrorPercentage"] == {"value": 25.0}
    plain = cli("deploy", "--dry-run", *ws)
    assert plain.exit_code == 0 and "VirtualService" not in plain.output and "churn-shadow" not in plain.output


def test_rollout_status_shows_the_shadow_phase(cluster):
    s, backend, client, custom = cluster
    run_shadow(s, backend, error_rate=0.5)
    out = cli("rollout", "status", "-p", f"workspace={s.workspace_dir}", "-p", "mlflow.model_name=churn",
              "-p", "mlflow.experiment=test")
    assert out.exit_code == 0, out.output
    text = out.output
    assert "shadow phase: failed at 10% mirrored" in text
    assert "mirrored requests: 80 (limit 50) ok" in text
    assert "errors (share): 0.5 (limit 0.05) fail" in text
    assert "p99 ms: 120 (limit 500) ok" in text
    assert "shadow_start" in text and "rollback" in text


def test_rollout_status_shows_a_passed_shadow_phase_with_agreement_psi_and_quality(tmp_path):
    s = settings_at(tmp_path)
    state = RolloutController.begin(s, canary_version="2", primary_version="1")
    checks = [{"name": "shadow_requests", "value": 120, "limit": 50, "passed": True, "detail": ""},
              {"name": "shadow_error_rate", "value": 0.0, "limit": 0.05, "passed": True, "detail": ""},
              {"name": "shadow_p99_ms", "value": 31.5, "limit": 500.0, "passed": True, "detail": ""},
              {"name": "agreement", "value": 0.96, "limit": 0.9, "passed": True, "detail": "share of equal labels"},
              {"name": "shadow_prediction_psi", "value": 0.02, "limit": 0.25, "passed": True, "detail": ""},
              {"name": "shadow_quality_delta", "value": 0.01, "limit": -0.05, "passed": True,
               "detail": "accuracy: shadow 0.8100 vs primary 0.8000 on the same 40 labelled rows"}]
    state.history += [
        {"time": "2026-11-30T10:00:00+00:00", "ts": 1.0, "weight": 0, "decision": "shadow_start", "checks": [],
         "reason": "candidate v2 gets a copy of 5% of requests", "shadow_percent": 5.0},
        {"time": "2026-11-30T10:01:00+00:00", "ts": 2.0, "weight": 0, "decision": "shadow_pass", "checks": checks,
         "reason": "shadow phase passed on 120 mirrored requests"},
        {"time": "2026-11-30T10:01:00+00:00", "ts": 2.1, "weight": 20, "decision": "start", "checks": [],
         "reason": "canary v2 at 20%"}]
    state.status, state.weight = PROGRESSING, 20
    RolloutStore(s.workspace_dir / "rollout", "churn").save(state)
    out = cli("rollout", "status", "-p", f"workspace={tmp_path}", "-p", "mlflow.model_name=churn")
    assert out.exit_code == 0, out.output
    assert "shadow phase: passed at 5% mirrored" in out.output
    assert "agreement with the primary: 0.96 (limit 0.9) ok" in out.output
    assert "output PSI: 0.02 (limit 0.25) ok" in out.output
    assert "on the same 40 labelled rows" in out.output


def test_lineage_shows_the_shadow_phase_in_text_and_json(cluster):
    from driftloop.app.lineage import build_lineage, render_lineage
    from driftloop.core.registry import Registry

    s, backend, client, custom = cluster
    reg = Registry.from_settings(s)
    reg.client.create_registered_model("churn")
    reg.client.create_model_version("churn", source=str(s.workspace_dir / "m1"))
    reg.client.create_model_version("churn", source=str(s.workspace_dir / "m2"))
    run_shadow(s, backend, error_rate=0.5)  # v2's rollout: a failed shadow phase, in the local rollout state

    lineage = build_lineage(s, "churn/2")
    assert lineage.shadow["verdict"] == "failed" and lineage.shadow["percent"] == 10
    assert {c["name"] for c in lineage.shadow["checks"]} >= {"shadow_requests", "shadow_error_rate", "shadow_p99_ms"}
    from rich.console import Console

    con = Console(record=True, width=250)
    con.print(render_lineage(lineage))
    text = con.export_text()
    assert "shadow phase: failed at 10% mirrored" in text and "errors (share): 0.5 (limit 0.05) fail" in text

    args = ["-p", f"workspace={s.workspace_dir}", "-p", "mlflow.model_name=churn", "-p", "mlflow.experiment=test"]
    out = cli("lineage", "churn/2", "--json", *args)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["shadow"]["verdict"] == "failed"
    assert [c["passed"] for c in doc["shadow"]["checks"] if c["name"] == "shadow_error_rate"] == [False]
    assert build_lineage(s, "churn/1").shadow is None  # v1 had no rollout here


def _registry_with_champion_and_candidate(s, tmp_path):
    """churn v1 (the champion) and v2 (the candidate) in the settings' registry."""
    from driftloop.core.registry import CHAMPION, Registry

    reg = Registry.from_settings(s)
    reg.client.create_registered_model("churn")
    for v in ("m1", "m2"):
        reg.client.create_model_version("churn", source=str(tmp_path / v))
    reg.set_alias("churn", CHAMPION, "1")
    return reg


def test_deploy_step_puts_the_candidate_out_dark_when_a_shadow_phase_comes_first(tmp_path):
    from components.deploy import deploy_canary

    s = settings_at(tmp_path, **{"rollout.shadow_percent": 10})
    reg = _registry_with_champion_and_candidate(s, tmp_path)
    client = RecordingKServeClient(production(settings_at(tmp_path)))
    client.stored["churn"]["spec"]["predictor"].pop("canaryTrafficPercent")  # only the champion is served
    result = deploy_canary(s, version="2", home="kserve", registry=reg,
                           backend=KServeBackend(s, client=client, custom_api=RecordingCustomObjects()))
    assert result.percent == 0 and "at 0%" in result.message
    (op, name, body, _), = client.changes()
    assert (op, name) == ("replace", "churn") and body["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert "models:/churn/2" in body["spec"]["predictor"]["containers"][0]["args"]
    assert RolloutController(s, None).state().canary_version == "2"  # the controller starts with the shadow


def test_a_live_object_with_status_conditions_parses(tmp_path):
    """What a cluster returns carries status.conditions; kserve 0.21's status classes cannot parse them."""
    body = production(settings_at(tmp_path))
    assert body["status"]["conditions"]
    isvc = isvcs.from_dict(body)
    assert isvc.metadata.name == "churn" and isvc.spec.predictor.canary_traffic_percent == 0
    assert isvc.status is None  # read by parse_status, never sent back


def test_local_deploy_step_puts_the_candidate_out_dark_when_a_shadow_phase_comes_first(tmp_path):
    """On the embedded default too: no user request reaches the candidate before its shadow phase passed."""
    from components.deploy import deploy_canary

    class RecordingLocal:
        def __init__(self):
            self.calls = []

        def deploy_canary(self, version, uri, percent):
            self.calls.append((version, uri, percent))
            return f"canary v{version} at {percent}%"

        def status(self):
            return {"canary": {"version": self.calls[-1][0]}}

    s = settings_at(tmp_path, **{"rollout.shadow_percent": 10})
    reg = _registry_with_champion_and_candidate(s, tmp_path)
    local = RecordingLocal()
    result = deploy_canary(s, version="2", home="local", registry=reg, backend=local)
    assert local.calls == [("2", "models:/churn/2", 0)] and result.percent == 0
    assert RolloutController(s, None).state().canary_version == "2"


# -- the join on a cluster: KServe's loggers -> the monitor -> the controller --------------------
TOKEN = "monitor-token"


def test_both_loggers_carry_the_request_id_and_parse_with_kserves_classes(tmp_path):
    """Production's and the shadow's logger both copy X-Request-Id into the events' metadata."""
    from kserve import V1beta1LoggerSpec

    s = settings_at(tmp_path)
    for built in (isvcs.build_inference_service(s), isvcs.build_shadow_inference_service(s, "models:/churn/2", "2")):
        body = isvcs.to_dict(built)
        assert check_objects([body], {}, "test") == []
        parsed = isvcs.from_dict(body)  # kserve's own model classes
        logger = parsed.spec.predictor.logger
        assert isinstance(logger, V1beta1LoggerSpec) and logger.metadata_headers == ["X-Request-Id"]
        assert body["spec"]["predictor"]["logger"]["metadataHeaders"] == ["X-Request-Id"]
        assert logger.url == s.serving.logger_url and logger.mode == "all"
        env = {e["name"]: e.get("value") for e in body["spec"]["predictor"]["containers"][0]["env"]}
        assert env["DRIFTLOOP_LOG_SCORES"] == "1"  # class scores in the logged body, as the gateway logs them


def test_kserve_canonical_header_name():
    """What KServe's handler compares metadataHeaders with: Go's textproto.CanonicalMIMEHeaderKey."""
    from driftloop.core.shadow import REQUEST_ID_HEADER

    assert REQUEST_ID_HEADER == "-".join(part.capitalize() for part in "x-request-id".split("-"))


@pytest.fixture
def monitor(tmp_path, monkeypatch):
    """The monitor for real, in-process (its Starlette app: sink, store, GET /shadow)."""
    from starlette.testclient import TestClient

    from monitoring.service import WEBHOOK_TOKEN_ENV, MonitorService
    from tests.test_trigger import RecordingRunner

    monkeypatch.setenv(WEBHOOK_TOKEN_ENV, TOKEN)
    s = settings_at(tmp_path, **{"rollout.shadow_percent": 10})
    service = MonitorService(s, runner=RecordingRunner())
    with TestClient(service.app, headers={"authorization": f"Bearer {service.ingest_token}"}) as client:
        yield service, client


def log_mirrored(client, n: int, *, shadow_agrees: bool, metadata: bool = True, labels: bool = True,
                 start: int = 0, client_ce_id: bool = False) -> None:
    """``n`` requests answered by production (``churn``) and, mirrored by Envoy with the same
    X-Request-Id, by the shadow (``churn-shadow``, candidate v2); each pod's logger has its own ce-id."""
    import uuid

    from tests.ce_events import instance, kserve_logged

    shadow_annotations = {"driftloop.io/serving-role": "shadow", "driftloop.io/model-version": "2"}
    feedback = []
    for i in range(start, start + n):
        rid = f"req-{i}"
        rows = [instance(i), instance(i + 1)]
        primary_preds = [i % 2, (i + 1) % 2]
        shadow_preds = primary_preds if shadow_agrees else [1 - p for p in primary_preds]
        primary_id, shadow_id = str(uuid.uuid4()), str(uuid.uuid4())
        if client_ce_id:  # the client sent Ce-Id: both loggers take it, since Envoy mirrors the header too
            shadow_id = primary_id
        for isvc, ce_id, preds, annotations in (("churn", primary_id, primary_preds, None),
                                                ("churn-shadow", shadow_id, shadow_preds, shadow_annotations)):
            for kind, data in (("request", {"instances": rows}), ("response", {"predictions": preds})):
                headers, body = kserve_logged(kind, data, isvc=isvc, ce_id=ce_id, annotations=annotations,
                                              request_id=rid if metadata else None, namespace=NS)
                r = client.post("/events", content=body, headers=headers)
                assert r.status_code == 200, r.text
        feedback += [{"id": primary_id, "row_index": j, "label": p} for j, p in enumerate(primary_preds)]
    if labels:  # ground truth arrives for the primary's ce-id; it happens to be what production answered
        assert client.post("/feedback", json=feedback).status_code == 200


def shadow_phase(cluster, monitor, **traffic):
    """shadow_start, 60 mirrored requests logged (``log_mirrored``), then one judged interval on the
    cluster target, which reads the monitor's join."""
    from serving.rollout import MonitorShadow

    settings, backend, _, _ = cluster
    _, monitor_client = monitor
    metrics, _ = prometheus(0.0)
    RolloutController.begin(settings, canary_version="2", primary_version="1", canary_uri="models:/churn/2")
    target = KServeTarget(backend, metrics,
                          shadow=MonitorShadow("http://testserver", client=monitor_client, token=TOKEN))
    ctl = RolloutController(settings, target)
    assert ctl.step()["decision"] == "shadow_start"
    log_mirrored(monitor_client, 60, **traffic)
    time.sleep(0.02)
    return ctl, ctl.step()


def test_monitor_joins_kserve_logged_shadow_and_primary_answers_by_request_id(monitor):
    service, client = monitor
    log_mirrored(client, 20, shadow_agrees=True)
    log_mirrored(client, 10, shadow_agrees=False, start=20)
    assert client.get("/shadow").status_code == 401
    assert client.get("/shadow", headers={"authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/shadow", params={"since": 0, "version": "2"}, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    stats = r.json()["stats"]
    assert stats["joined_requests"] == 30 and stats["rows"] == 60 and stats["unjoined_rows"] == 0
    assert stats["agreement"] == pytest.approx(40 / 60)
    assert stats["labels"] == 60 and stats["quality_metric"] == "accuracy"
    assert stats["primary_quality"] == 1.0 and stats["shadow_quality"] == pytest.approx(40 / 60)
    assert len(stats["primary_predictions"]) == len(stats["shadow_predictions"]) == 60
    # another candidate's shadow rows are not this one's
    other = client.get("/shadow", params={"version": "3"}, headers={"authorization": f"Bearer {TOKEN}"}).json()
    assert other["stats"]["rows"] == 0 and "agreement" not in other["stats"]
    # the shadow's answers are kept apart from production's: stored as <ce-id>-shadow, role shadow
    rows = service.store.rows()
    assert set(rows.loc[rows["model_name"] == "churn-shadow", "role"]) == {"shadow"}
    assert rows.loc[rows["model_name"] == "churn", "role"].isna().all()
    assert service.store.window("sliding", rows=1000).without_role("shadow").n == 60


def test_a_client_set_ce_id_mirrored_to_the_shadow_does_not_make_its_events_duplicates(monitor):
    service, client = monitor
    log_mirrored(client, 5, shadow_agrees=False, client_ce_id=True)
    stats = service.shadow_summary(0.0, "2")
    assert stats["joined_requests"] == 5 and stats["rows"] == 10 and stats["agreement"] == 0.0
    assert service.store.counts()["events"] == 20  # 5 x (request, response) x (primary, shadow)


def test_the_local_gateways_shadow_events_join_by_their_ce_id(monitor):
    """The gateway logs a shadow answer as <request id>-shadow with ce-servingrole: shadow, no metadata."""
    from tests.ce_events import binary, instance

    service, client = monitor
    for i in range(3):
        rid = f"gw-{i}"
        for ce_id, role, version, pred in ((rid, "primary", "1", 1), (f"{rid}-shadow", "shadow", "2", i % 2)):
            for kind, data in (("request", {"instances": [instance(i)]}), ("response", {"predictions": [pred]})):
                headers, body = binary(ce_id, kind, data, version=version, role=role)
                assert client.post("/events", content=body, headers=headers).status_code == 200
    stats = service.shadow_summary(0.0, "2")
    assert stats["joined_requests"] == 3 and stats["agreement"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("metadata, key", [
    ('{"X-Request-Id":["r-1"]}', "r-1"),
    ('%7B%22X-Request-Id%22%3A%5B%22r-1%22%5D%7D', "r-1"),  # percent-encoded, as the HTTP binding allows
    ('{"x-request-id":"r-1"}', "r-1"),
    ('{"Foo":["bar"]}', None),
    ("{}", None),
    ("not json", None),
])
def test_request_id_from_the_metadata_extension(metadata, key):
    from monitoring.events import shadow_identity

    attrs = {"id": "ce-1", "metadata": metadata}
    assert shadow_identity(attrs) == ("ce-1", None, None, key)
    shadow = {**attrs, "annotations": '{"driftloop.io/model-version":"7","driftloop.io/serving-role":"shadow"}'}
    assert shadow_identity(shadow) == ("ce-1-shadow", "shadow", "7", key or "ce-1")


def test_a_disagreeing_shadow_on_the_cluster_is_rolled_back_on_the_monitors_join(cluster, monitor):
    s, _, client, custom = cluster
    ctl, second = shadow_phase(cluster, monitor, shadow_agrees=False)
    assert second["decision"] == "rollback" and ctl.state().status == ROLLED_BACK
    assert "agreement=0" in second["reason"] and "shadow_quality_delta" in second["reason"]
    checks = {c["name"]: c for c in second["checks"]}
    assert checks["agreement"]["limit"] == s.rollout.shadow_min_agreement  # the embedded default's limits
    assert checks["shadow_prediction_psi"]["passed"] is True  # same class shares, swapped: PSI cannot see it
    patches = [c[2]["spec"]["predictor"]["canaryTrafficPercent"] for c in client.changes() if c[0] == "patch"]
    assert set(patches) == {0}  # no user request ever reached the candidate
    assert "churn-shadow" not in client.stored and not custom.stored


def test_an_agreeing_shadow_on_the_cluster_passes_into_the_canary_steps(cluster, monitor):
    ctl, second = shadow_phase(cluster, monitor, shadow_agrees=True)
    assert second["decision"] == "start" and ctl.state().status == PROGRESSING
    passed = next(h for h in ctl.state().history if h["decision"] == "shadow_pass")
    checks = {c["name"]: c for c in passed["checks"]}
    assert checks["agreement"]["value"] == 1.0 and checks["agreement"]["passed"] is True
    assert checks["shadow_prediction_psi"]["value"] == pytest.approx(0.0, abs=1e-9)
    quality = checks["shadow_quality_delta"]
    assert quality["value"] == 0.0 and "on the same 120 labelled rows" in quality["detail"]


def test_without_the_request_id_the_cluster_shadow_phase_waits_instead_of_passing_blind(cluster, monitor):
    """A logger without metadataHeaders: nothing joins, so errors and latency alone never pass the phase."""
    ctl, second = shadow_phase(cluster, monitor, shadow_agrees=True, metadata=False)
    assert second["decision"] == "shadow_wait" and ctl.state().status == SHADOW
    assert "0 of 80 mirrored requests joined with the primary's answer by request id" in second["reason"]


def test_monitor_down_makes_the_cluster_shadow_interval_unavailable(cluster):
    from serving.rollout import MonitorShadow

    s, backend, client, custom = cluster
    metrics, _ = prometheus(0.0)

    def down(request):
        raise httpx.ConnectError("connection refused")

    RolloutController.begin(s, canary_version="2", primary_version="1", canary_uri="models:/churn/2")
    shadow = MonitorShadow("http://monitor", client=httpx.Client(transport=httpx.MockTransport(down)), token=TOKEN)
    ctl = RolloutController(s, KServeTarget(backend, metrics, shadow=shadow))
    ctl.step()
    second = ctl.step()
    assert second["decision"] == "unavailable" and "monitor shadow query failed" in second["reason"]
    assert ctl.state().status == SHADOW  # judged next interval, neither passed nor failed


def test_a_store_made_before_the_request_key_is_brought_up_to_date(tmp_path):
    """An inference log written by the previous version opens, keeps its events and joins new ones."""
    import sqlite3

    from monitoring.events import parse_binary
    from monitoring.store import InferenceStore
    from tests.ce_events import instance, kserve_logged

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, ce_id TEXT NOT NULL, kind TEXT NOT NULL, "
               "model_name TEXT NOT NULL, model_version TEXT, role TEXT, attributes TEXT NOT NULL, body BLOB NOT NULL, "
               "flat TEXT NOT NULL, received_at REAL NOT NULL, UNIQUE (ce_id, kind))")
    db.execute("INSERT INTO events (ce_id, kind, model_name, attributes, body, flat, received_at) "
               "VALUES ('old', 'request', 'churn', '{}', x'7b7d', '[]', 1.0)")
    db.commit()
    db.close()
    with InferenceStore(path) as store:
        events = []
        for isvc, ce_id, annotations in (("churn", "p-1", None),
                                         ("churn-shadow", "s-1", {"driftloop.io/serving-role": "shadow"})):
            for kind, data in (("request", {"instances": [instance(1)]}), ("response", {"predictions": [1]})):
                headers, body = kserve_logged(kind, data, isvc=isvc, ce_id=ce_id, request_id="r-1",
                                              annotations=annotations)
                events.append(parse_binary(headers, body))
        store.append_events(events)
        assert store.event_ids() == {"old", "p-1", "s-1-shadow"}
        pairs = store.shadow_pairs()
        assert pairs[["request_key", "primary_id"]].values.tolist() == [["r-1", "p-1"]]
