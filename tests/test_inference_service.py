"""The InferenceService builder and the cluster backend: what KServeClient would be sent.

No cluster: objects are checked by round-tripping them through kserve's own model
classes, and the backend is driven with a recording stand-in for KServeClient that
keeps what it was sent, serialized as the Kubernetes client puts it on the wire.
"""

import copy
from pathlib import Path

import pytest
import yaml
from kubernetes.client import ApiClient as K8sApiClient

from driftloop.core.errors import ServingError
from serving import inference_service as isvcs
from serving.kserve_backend import KServeBackend
from tests.conftest import make_settings


def settings_with(**overrides):
    return make_settings(Path("/tmp/driftloop-isvc-ws"), Path("/tmp/none.parquet"), **overrides)


def wire(obj):
    """What the Kubernetes client sends for an object (its own serializer)."""
    return K8sApiClient().sanitize_for_serialization(obj)


def predictor_of(isvc):
    return isvcs.to_dict(isvc)["spec"]["predictor"]


# -- builder ------------------------------------------------------------------------------------
def test_predictor_image_object_round_trips_through_kserve_classes():
    s = settings_with(**{"serving.name": "churn-svc", "serving.namespace": "ml", "mlflow.tracking_uri": "http://mlflow:5000",
                         "serving.cpu_limit": "3", "serving.memory_request": "3Gi"})
    isvc = isvcs.build_inference_service(s, canary_traffic_percent=10)
    as_dict = isvcs.to_dict(isvc)
    back = isvcs.from_dict(as_dict)
    assert back == isvc
    assert isvcs.to_dict(back) == as_dict == wire(isvc)
    assert as_dict["apiVersion"] == "serving.kserve.io/v1beta1" and as_dict["kind"] == "InferenceService"
    assert as_dict["metadata"]["name"] == "churn-svc" and as_dict["metadata"]["namespace"] == "ml"
    assert as_dict["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    pred = as_dict["spec"]["predictor"]
    assert pred["canaryTrafficPercent"] == 10
    assert pred["logger"] == {"mode": "all", "url": s.serving.logger_url, "metadataHeaders": ["X-Request-Id"]}
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == (1, 3, "concurrency", 10)
    (container,) = pred["containers"]
    assert container["name"] == "kserve-container" and container["image"] == s.serving.image
    assert container["command"] == ["python", "-m", "serving.predictor"]
    args = container["args"]
    assert args[args.index("--model-uri") + 1] == "models:/churn@champion"
    assert args[args.index("--model-name") + 1] == "churn-svc"
    assert args[args.index("--host") + 1] == "0.0.0.0"  # in a pod the server must answer the Knative proxy
    assert container["envFrom"] == [{"secretRef": {"name": s.kfp.mlflow_secret}}]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in container["env"]
    assert not any("PASSWORD" in e["name"] or "TOKEN" in e["name"] for e in container["env"])
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "3Gi"}, "limits": {"cpu": "3", "memory": "2Gi"}}
    assert "tolerations" not in pred


def test_autoscaling_logger_and_gpu_from_config():
    s = settings_with(**{"serving.gpu": 2, "serving.min_replicas": 0, "serving.max_replicas": 7,
                         "serving.scale_metric": "rps", "serving.scale_target": 50, "serving.logger_mode": "request",
                         "serving.logger_url": "http://sink.monitoring/events"})
    pred = predictor_of(isvcs.build_inference_service(s))
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == (0, 7, "rps", 50)
    assert pred["logger"] == {"mode": "request", "url": "http://sink.monitoring/events",
                              "metadataHeaders": ["X-Request-Id"]}
    assert pred["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pred["tolerations"]
    assert "canaryTrafficPercent" not in pred


def test_mlflow_runtime_uses_model_format_and_storage_uri():
    s = settings_with(**{"serving.use_mlflow_runtime": True, "serving.storage_uri": "s3://models/churn/3"})
    isvc = isvcs.build_inference_service(s, canary_traffic_percent=25)
    pred = predictor_of(isvc)
    assert pred["model"]["modelFormat"] == {"name": "mlflow"}
    assert pred["model"]["storageUri"] == "s3://models/churn/3"
    assert pred["model"]["protocolVersion"] == "v2"
    assert pred["model"]["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert "containers" not in pred and pred["canaryTrafficPercent"] == 25
    assert isvcs.from_dict(isvcs.to_dict(isvc)) == isvc
    other = isvcs.build_inference_service(s, storage_uri="gs://b/m/4")
    assert predictor_of(other)["model"]["storageUri"] == "gs://b/m/4"
    with pytest.raises(ServingError, match="storage URI"):
        isvcs.build_inference_service(settings_with(**{"serving.use_mlflow_runtime": True}))


@pytest.mark.parametrize("bad", [101, -1, 50.5, True, "10"])
def test_canary_percent_outside_0_to_100_is_rejected(bad):
    s = settings_with()
    with pytest.raises(ServingError, match="between 0 and 100"):
        isvcs.build_inference_service(s, canary_traffic_percent=bad)
    with pytest.raises(ServingError, match="between 0 and 100"):
        isvcs.canary_patch(bad)
    with pytest.raises(ServingError, match="between 0 and 100"):
        isvcs.with_canary(isvcs.build_inference_service(s), "models:/churn/2", bad)


def test_canary_rollback_and_promotion_objects():
    s = settings_with()
    primary = isvcs.build_inference_service(s, model_uri="models:/churn/1")
    canary = isvcs.with_canary(primary, "models:/churn/2", 20)
    assert predictor_of(canary)["canaryTrafficPercent"] == 20
    assert isvcs.model_uri_of(canary) == "models:/churn/2"
    assert isvcs.model_uri_of(primary) == "models:/churn/1"  # the input object is left as it was

    rolled_back = isvcs.rollback(canary)
    assert predictor_of(rolled_back)["canaryTrafficPercent"] == 0
    assert isvcs.to_dict(isvcs.canary_patch(0, name="m")) == {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": "m"},
        "spec": {"predictor": {"canaryTrafficPercent": 0}}}

    promoted = isvcs.promote(canary, "models:/churn/2")
    pred = predictor_of(promoted)
    assert "canaryTrafficPercent" not in pred
    assert isvcs.model_uri_of(promoted) == "models:/churn/2"
    assert promoted.metadata.annotations[isvcs.MODEL_URI_ANNOTATION] == "models:/churn/2"
    assert isvcs.from_dict(isvcs.to_dict(promoted)) == promoted


def test_yaml_rendering_is_the_same_object():
    isvc = isvcs.build_inference_service(settings_with(), canary_traffic_percent=5)
    assert yaml.safe_load(isvcs.to_yaml(isvc)) == isvcs.to_dict(isvc)


def test_from_dict_rejects_what_is_not_an_inference_service():
    with pytest.raises(ServingError, match="not an InferenceService"):
        isvcs.from_dict({"spec": {"predictor": {"minReplicas": "many"}}, "metadata": []})


# -- backend with a recording KServeClient ----------------------------------------------------------
class RecordingKServeClient:
    """Records what KServeClient would be called with; keeps the object as the API server would."""

    def __init__(self, existing=None):
        self.calls = []
        self.stored = existing

    def get(self, name, namespace=None, **_):
        self.calls.append(("get", name, namespace))
        if self.stored is None:
            raise RuntimeError("Exception when calling CustomObjectsApi->get_namespaced_custom_object: (404)\n"
                               "Reason: Not Found")
        return copy.deepcopy(self.stored)

    def create(self, isvc, namespace=None, **_):
        body = wire(isvc)
        self.calls.append(("create", body, namespace))
        self.stored = dict(body, metadata=dict(body["metadata"], resourceVersion="1"))
        return self.stored

    def replace(self, name, isvc, namespace=None, **_):
        body = wire(isvc)
        self.calls.append(("replace", name, body, namespace))
        self.stored = dict(body, status=(self.stored or {}).get("status", {}))
        return self.stored

    def patch(self, name, isvc, namespace=None, **_):
        body = wire(isvc)
        self.calls.append(("patch", name, body, namespace))
        self.stored["spec"]["predictor"].update(body["spec"]["predictor"])  # merge patch of one field
        return self.stored

    def wait_isvc_ready(self, name, namespace=None, timeout_seconds=600, polling_interval=10, **_):
        self.calls.append(("wait_isvc_ready", name, namespace, timeout_seconds, polling_interval))
        ready = any(c["type"] == "Ready" and c["status"] == "True"
                    for c in (self.stored or {}).get("status", {}).get("conditions", []))
        if not ready:
            raise RuntimeError(f"Timeout to start the InferenceService {name}.")

    def changes(self):
        return [c for c in self.calls if c[0] != "get"]


STATUS = {
    "url": "http://churn.ml.example.com",
    "conditions": [{"type": "Ready", "status": "True"}],
    "components": {"predictor": {
        "latestReadyRevision": "churn-predictor-00002", "latestRolledoutRevision": "churn-predictor-00001",
        "previousRolledoutRevision": None, "url": "http://churn-predictor.ml.example.com",
        "traffic": [{"revisionName": "churn-predictor-00002", "percent": 20, "latestRevision": True, "tag": "latest"},
                    {"revisionName": "churn-predictor-00001", "percent": 80, "latestRevision": False, "tag": "prev"}]}},
}


@pytest.fixture
def backend_and_client():
    s = settings_with(**{"serving.name": "churn", "serving.namespace": "ml"})
    client = RecordingKServeClient()
    return s, KServeBackend(s, client=client), client


def test_apply_creates_when_absent_then_replaces(backend_and_client):
    s, backend, client = backend_and_client
    isvc = isvcs.build_inference_service(s)
    backend.apply(isvc)
    ((kind, body, namespace),) = client.changes()
    assert (kind, namespace) == ("create", "ml")
    assert isvcs.from_dict(body) == isvc
    backend.apply(isvcs.build_inference_service(s, model_uri="models:/churn/4"))
    kind, name, body, namespace = client.changes()[-1]
    assert (kind, name, namespace) == ("replace", "churn", "ml")
    assert isvcs.model_uri_of(isvcs.from_dict(body)) == "models:/churn/4"


def test_canary_steps_promotion_and_rollback_send_what_the_controller_expects(backend_and_client):
    s, backend, client = backend_and_client
    backend.apply(isvcs.build_inference_service(s, model_uri="models:/churn/1"))

    backend.set_canary("models:/churn/2", 10)
    kind, _, body, _ = client.changes()[-1]
    assert kind == "replace"
    sent = isvcs.from_dict(body)
    assert sent.spec.predictor.canary_traffic_percent == 10 and isvcs.model_uri_of(sent) == "models:/churn/2"
    assert sent.spec.predictor.logger.url == s.serving.logger_url  # the rest of the spec is kept

    backend.set_traffic(40)
    kind, name, body, _ = client.changes()[-1]
    assert (kind, name) == ("patch", "churn")
    assert body["spec"] == {"predictor": {"canaryTrafficPercent": 40}}
    assert isvcs.model_uri_of(backend.current()) == "models:/churn/2"

    backend.rollback()
    assert client.changes()[-1][2]["spec"] == {"predictor": {"canaryTrafficPercent": 0}}

    backend.set_canary("models:/churn/3", 10)
    backend.promote("models:/churn/3")
    kind, _, body, _ = client.changes()[-1]
    assert kind == "replace"
    assert "canaryTrafficPercent" not in body["spec"]["predictor"]
    assert isvcs.model_uri_of(isvcs.from_dict(body)) == "models:/churn/3"


@pytest.mark.parametrize("bad", [101, -1])
def test_bad_percent_sends_nothing(backend_and_client, bad):
    s, backend, client = backend_and_client
    backend.apply(isvcs.build_inference_service(s))
    before = list(client.changes())
    with pytest.raises(ServingError, match="between 0 and 100"):
        backend.set_canary("models:/churn/2", bad)
    with pytest.raises(ServingError, match="between 0 and 100"):
        backend.set_traffic(bad)
    assert client.changes() == before


def test_status_reads_predictor_traffic_and_revisions(backend_and_client):
    s, backend, client = backend_and_client
    backend.apply(isvcs.build_inference_service(s))
    backend.set_canary("models:/churn/2", 20)
    client.stored["status"] = STATUS
    st = backend.status()
    assert st.ready and st.canary_percent == 20 and st.model_uri == "models:/churn/2"
    assert st.latest_ready_revision == "churn-predictor-00002"
    assert st.latest_rolledout_revision == "churn-predictor-00001"
    assert [(t.revision, t.percent, t.latest) for t in st.traffic] == [
        ("churn-predictor-00002", 20, True), ("churn-predictor-00001", 80, False)]
    backend.wait_ready(timeout=30, polling_interval=2)
    assert client.calls[-1] == ("wait_isvc_ready", "churn", "ml", 30, 2)


def test_client_failures_become_serving_errors(backend_and_client):
    s, backend, client = backend_and_client
    with pytest.raises(ServingError, match="does not exist"):
        backend.status()
    with pytest.raises(ServingError, match="does not exist"):
        backend.promote("models:/churn/2")
    backend.apply(isvcs.build_inference_service(s))
    with pytest.raises(ServingError, match="churn"):
        backend.wait_ready(timeout=5, polling_interval=1)  # never became Ready


def test_resource_quantities_are_checked_at_load_naming_the_key():
    from driftloop.core.errors import ConfigError

    assert settings_with(**{"serving.cpu_limit": 3}).serving.cpu_limit == "3"  # a bare YAML number
    with pytest.raises(ConfigError, match="serving.memory_limit"):
        settings_with(**{"serving.memory_limit": "two gigs"})


def test_predictor_and_shadow_read_the_model_from_the_configured_mlflow_workspace():
    s = settings_with(**{"mlflow.workspace": "team-a"})
    for isvc in (isvcs.build_inference_service(s), isvcs.build_shadow_inference_service(s, "models:/churn/7", "7")):
        env = predictor_of(isvc)["containers"][0]["env"]
        assert {"name": "MLFLOW_WORKSPACE", "value": "team-a"} in env
    assert not any(e["name"] == "MLFLOW_WORKSPACE"
                   for e in predictor_of(isvcs.build_inference_service(settings_with()))["containers"][0]["env"])
