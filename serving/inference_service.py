"""The InferenceService (serving.kserve.io/v1beta1) that serves a model on a cluster.

Built from configuration with kserve's own model classes, so what is rendered or
sent is exactly what KServeClient would send. Two predictor kinds:

* the project's predictor image (``serving.image``) running
  ``python -m serving.predictor --model-uri models:/name@alias``, with MLflow
  settings from a Secret (``kfp.mlflow_secret``) — the default;
* KServe's ``mlflow`` model format with a ``storageUri`` (``serving.use_mlflow_runtime``).

Canary rollouts (Serverless mode) map to the predictor like this:

* canary: the predictor's model changes and ``canaryTrafficPercent: N`` sends N %
  to the new revision, the rest to the last rolled-out one;
* rollback: ``canaryTrafficPercent: 0`` — the previous revision keeps all traffic;
* promotion: the field is removed with the new version as the predictor — 100 %.

The shadow phase (``rollout.shadow_percent`` > 0) adds two objects beside it, removed again when
the phase ends (see docs/rollouts.md, "Shadow phase on a cluster", for why this shape):

* a shadow InferenceService ``<name>-shadow`` serving the candidate (never more than mirrored
  copies reach it), whose own logger marks its events (``metadataAnnotations`` →
  ``driftloop.io/serving-role: shadow``, ``driftloop.io/model-version``);
* an Istio ``VirtualService`` ``<name>-mirror`` on the mesh for the InferenceService's
  cluster-local host: every request still goes to the predictor's Knative route (through the
  Knative local gateway, so the canary split is untouched) and ``mirrorPercentage`` of them
  are copied, fire-and-forget, to the shadow's ready revision.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import ServingError
from driftloop.core.shadow import REQUEST_ID_HEADER, ROLE_ANNOTATION, SHADOW_ROLE, VERSION_ANNOTATION
from driftloop.core.shadow import shadow_name as _shadow_name

if TYPE_CHECKING:
    from driftloop.core.config import ServingConfig, Settings

__all__ = [
    "API_VERSION",
    "KIND",
    "CONTAINER_NAME",
    "PREDICTOR_PORT",
    "check_percent",
    "default_model_uri",
    "build_inference_service",
    "canary_patch",
    "with_model",
    "with_canary",
    "promote",
    "rollback",
    "model_uri_of",
    "to_dict",
    "to_yaml",
    "from_dict",
    "SHADOW_ROLE",
    "ROLE_ANNOTATION",
    "VERSION_ANNOTATION",
    "VS_GROUP",
    "VS_VERSION",
    "VS_PLURAL",
    "shadow_name",
    "mirror_name",
    "first_revision",
    "check_mirror_percent",
    "build_shadow_inference_service",
    "build_mirror_virtual_service",
    "shadow_objects",
]

log = logging.getLogger(__name__)

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
CONTAINER_NAME = "kserve-container"  # the name KServe expects for a custom predictor container
PREDICTOR_PORT = 8080
GPU_RESOURCE = "nvidia.com/gpu"
MODEL_URI_ANNOTATION = "driftloop.io/model-uri"


def check_percent(percent: Any) -> int:
    """A canary percentage, or ServingError before anything changes."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ServingError(f"canary traffic percent must be an integer between 0 and 100, got {percent!r}")
    return percent


def default_model_uri(settings: Settings) -> str:
    from driftloop.core.registry import CHAMPION

    return f"models:/{settings.mlflow.model_name}@{CHAMPION}"


def _resources(serving: ServingConfig) -> Any:
    from kubernetes.client import V1ResourceRequirements

    requests = {"cpu": serving.cpu_request, "memory": serving.memory_request}
    limits = {"cpu": serving.cpu_limit, "memory": serving.memory_limit}
    if serving.gpu:
        limits[GPU_RESOURCE] = str(serving.gpu)  # extended resources: the request defaults to the limit
    return V1ResourceRequirements(requests=requests, limits=limits)


def _predictor_container(settings: Settings, model_uri: str) -> Any:
    from kubernetes.client import (V1Container, V1ContainerPort, V1EnvFromSource, V1EnvVar, V1HTTPGetAction,
                                   V1Probe, V1SecretEnvSource)

    serving = settings.serving
    env = []
    if settings.mlflow.tracking_uri:
        env.append(V1EnvVar(name="MLFLOW_TRACKING_URI", value=settings.mlflow.tracking_uri))
    if settings.mlflow.registry_uri:
        env.append(V1EnvVar(name="MLFLOW_REGISTRY_URI", value=settings.mlflow.registry_uri))
    if settings.mlflow.workspace:  # a tenant's models live in its MLflow workspace, not the default one
        env.append(V1EnvVar(name="MLFLOW_WORKSPACE", value=settings.mlflow.workspace))
    # KServe's logger logs the body as the predictor returns it: with this the class scores are in
    # it (read by serving.predictor.wants_scores), as the local gateway logs them.
    env.append(V1EnvVar(name="DRIFTLOOP_LOG_SCORES", value="1"))
    env_from = None
    if settings.kfp.mlflow_secret:  # credentials (and possibly the tracking URI) live only in the Secret
        env_from = [V1EnvFromSource(secret_ref=V1SecretEnvSource(name=settings.kfp.mlflow_secret))]
    return V1Container(
        name=CONTAINER_NAME,
        image=serving.image,
        command=["python", "-m", "serving.predictor"],
        args=["--model-name", serving.name, "--model-uri", model_uri, "--http-port", str(PREDICTOR_PORT),
              "--host", "0.0.0.0", "--max-payload-bytes", str(serving.max_payload_bytes)],
        env=env or None,
        env_from=env_from,
        ports=[V1ContainerPort(container_port=PREDICTOR_PORT, protocol="TCP")],
        readiness_probe=V1Probe(http_get=V1HTTPGetAction(path="/v2/health/ready", port=PREDICTOR_PORT)),
        resources=_resources(serving),
    )


def _mlflow_model(settings: Settings, storage_uri: str | None) -> Any:
    from kserve import V1beta1ModelFormat, V1beta1ModelSpec

    storage = storage_uri or settings.serving.storage_uri
    if not storage:
        raise ServingError("serving.use_mlflow_runtime needs a storage URI (serving.storage_uri or --storage-uri): "
                           "KServe's mlflow runtime reads the model files, not the registry")
    return V1beta1ModelSpec(model_format=V1beta1ModelFormat(name="mlflow"), storage_uri=storage,
                            protocol_version="v2", resources=_resources(settings.serving))


def _logger(settings: Settings, **extra: Any) -> Any:
    """The predictor's inference logger: every request and response to the monitor, each event
    carrying the request's ``X-Request-Id`` in its ``metadata`` extension. Envoy gives every mesh
    request one and a mirrored copy keeps it, so the monitor can join a shadow's answer with the
    primary's (their ``ce-id`` differ: each pod's logger makes its own)."""
    from kserve import V1beta1LoggerSpec

    return V1beta1LoggerSpec(mode=settings.serving.logger_mode, url=settings.serving.logger_url,
                             metadata_headers=[REQUEST_ID_HEADER], **extra)


def build_inference_service(settings: Settings, *, storage_uri: str | None = None, model_uri: str | None = None,
                            canary_traffic_percent: int | None = None) -> Any:
    """The InferenceService for ``settings.serving`` serving ``model_uri`` (default ``models:/<name>@champion``)."""
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    from kubernetes.client import V1ObjectMeta, V1Toleration

    if canary_traffic_percent is not None:
        check_percent(canary_traffic_percent)
    serving = settings.serving
    uri = model_uri or default_model_uri(settings)
    predictor = V1beta1PredictorSpec(
        min_replicas=serving.min_replicas,
        max_replicas=serving.max_replicas,
        scale_metric=serving.scale_metric,
        scale_target=serving.scale_target,
        canary_traffic_percent=canary_traffic_percent,
        logger=_logger(settings),
    )
    if serving.use_mlflow_runtime:
        predictor.model = _mlflow_model(settings, storage_uri)
        uri = predictor.model.storage_uri
    else:
        predictor.containers = [_predictor_container(settings, uri)]
    if serving.gpu:
        predictor.tolerations = [V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
    metadata = V1ObjectMeta(
        name=serving.name,
        namespace=serving.namespace,
        labels={"app.kubernetes.io/name": serving.name, "app.kubernetes.io/managed-by": "driftloop"},
        # canaryTrafficPercent only splits traffic in Serverless (Knative) mode.
        annotations={"serving.kserve.io/deploymentMode": "Serverless", MODEL_URI_ANNOTATION: uri},
    )
    return V1beta1InferenceService(api_version=API_VERSION, kind=KIND, metadata=metadata,
                                   spec=V1beta1InferenceServiceSpec(predictor=predictor))


# -- rollout changes ----------------------------------------------------------------------------
def canary_patch(percent: int, *, name: str | None = None, namespace: str | None = None) -> Any:
    """A merge patch that only sets ``spec.predictor.canaryTrafficPercent`` (0 = rollback)."""
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    from kubernetes.client import V1ObjectMeta

    check_percent(percent)
    return V1beta1InferenceService(
        api_version=API_VERSION, kind=KIND, metadata=V1ObjectMeta(name=name, namespace=namespace),
        spec=V1beta1InferenceServiceSpec(predictor=V1beta1PredictorSpec(canary_traffic_percent=percent)))


def model_uri_of(isvc: Any) -> str:
    """The model a built InferenceService serves (registry URI or storage URI)."""
    predictor = isvc.spec.predictor
    if predictor.model is not None:
        return predictor.model.storage_uri
    args = predictor.containers[0].args or []
    if "--model-uri" not in args:
        raise ServingError(f"InferenceService {isvc.metadata.name!r}: predictor container has no --model-uri")
    return args[args.index("--model-uri") + 1]


def with_model(isvc: Any, model_uri: str) -> Any:
    """A copy of ``isvc`` whose predictor serves ``model_uri`` (a new revision on the cluster)."""
    out = copy.deepcopy(isvc)
    predictor = out.spec.predictor
    if predictor.model is not None:
        if model_uri.startswith("models:/"):
            raise ServingError(f"the mlflow runtime needs a storage URI, not a registry URI: {model_uri}")
        predictor.model.storage_uri = model_uri
    else:
        container = predictor.containers[0]
        args = list(container.args or [])
        if "--model-uri" in args:
            args[args.index("--model-uri") + 1] = model_uri
        else:
            args += ["--model-uri", model_uri]
        container.args = args
    out.metadata.annotations = {**(out.metadata.annotations or {}), MODEL_URI_ANNOTATION: model_uri}
    return out


def with_canary(isvc: Any, model_uri: str, percent: int) -> Any:
    """Put ``model_uri`` out as a canary taking ``percent`` % of traffic."""
    check_percent(percent)
    out = with_model(isvc, model_uri)
    out.spec.predictor.canary_traffic_percent = percent
    return out


def promote(isvc: Any, new_model_uri: str) -> Any:
    """The promoted object: the new model as the predictor and no ``canaryTrafficPercent`` (100 %)."""
    out = with_model(isvc, new_model_uri)
    out.spec.predictor.canary_traffic_percent = None
    return out


def rollback(isvc: Any) -> Any:
    """The rolled-back object: ``canaryTrafficPercent: 0``, the last rolled-out revision keeps all traffic."""
    out = copy.deepcopy(isvc)
    out.spec.predictor.canary_traffic_percent = 0
    return out


# -- rendering ----------------------------------------------------------------------------------
def to_dict(isvc: Any) -> dict[str, Any]:
    """The JSON-ready object exactly as the Kubernetes client sends it (camelCase, no nulls)."""
    from kserve import ApiClient

    return ApiClient().sanitize_for_serialization(isvc)


def to_yaml(isvc: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(isvc), sort_keys=False)


class _Body:
    """What ApiClient.deserialize reads: a response with a JSON ``data`` attribute."""

    def __init__(self, data: str) -> None:
        self.data = data


def _api_client() -> Any:
    """kserve's ApiClient, able to parse the Kubernetes core types its models refer to (V1ObjectMeta, …).

    kserve's generated client looks every class name up in ``kserve.models`` only; the core
    types of a predictor (containers, resources, metadata) live in ``kubernetes.client.models``.
    """
    import kserve.models
    import kubernetes.client.models
    from kserve import ApiClient

    class _Client(ApiClient):
        def _ApiClient__deserialize(self, data: Any, klass: Any) -> Any:
            if isinstance(klass, str) and not hasattr(kserve.models, klass) and hasattr(kubernetes.client.models, klass):
                klass = getattr(kubernetes.client.models, klass)
            return super()._ApiClient__deserialize(data, klass)

    return _Client()


def from_dict(obj: dict[str, Any]) -> Any:
    """Parse a dict (e.g. what KServeClient.get returns) into ``V1beta1InferenceService``.

    ``status`` is left out: it belongs to the cluster (a replace never sends it), and kserve 0.21's
    generated status classes name types it does not ship (``KnativeCondition``, ``KnativeURL``), so
    a live object's status cannot be parsed by them. :func:`serving.kserve_backend.parse_status`
    reads it instead.
    """
    import json

    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != "status"}
    try:
        return _api_client().deserialize(_Body(json.dumps(obj)), "V1beta1InferenceService")
    except (ValueError, TypeError, AttributeError) as exc:
        raise ServingError(f"not an InferenceService: {exc}") from exc


# -- shadow phase: the shadow InferenceService and the Istio mirror ------------------------------
MIRROR_SUFFIX = "-mirror"
VS_GROUP, VS_VERSION, VS_PLURAL, VS_KIND = "networking.istio.io", "v1", "virtualservices", "VirtualService"
# Knative's cluster-local gateway (Knative Serving with net-istio, the KServe Serverless default)
KNATIVE_LOCAL_GATEWAY = "knative-local-gateway.istio-system.svc.cluster.local"
MESH_GATEWAY = "mesh"


def shadow_name(settings: Settings) -> str:
    return _shadow_name(settings.serving.name)


def mirror_name(settings: Settings) -> str:
    return f"{settings.serving.name}{MIRROR_SUFFIX}"


def first_revision(isvc_name: str) -> str:
    """The Knative revision a new InferenceService's predictor starts with (``<name>-predictor-00001``)."""
    return f"{isvc_name}-predictor-00001"


def check_mirror_percent(percent: Any) -> float:
    """A mirror share: a number in (0, 100]; 0 means no mirror (the objects are removed, not rendered)."""
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 < percent <= 100:
        raise ServingError(f"mirror percent must be a number above 0 and at most 100, got {percent!r}")
    return float(percent)


def build_shadow_inference_service(settings: Settings, model_uri: str, version: str | None = None) -> Any:
    """The InferenceService ``<name>-shadow`` that serves the candidate to mirrored copies only.

    It is the production predictor with the candidate's model, never a canary (no split), at
    least one replica (the mirror reaches its pods directly, past Knative's activator, so a
    shadow scaled to zero would miss every copy), and a logger that marks each event as the
    shadow's (besides the request id every logger carries).
    """
    isvc = build_inference_service(settings, model_uri=model_uri)
    isvc.metadata.name = shadow_name(settings)
    isvc.metadata.labels = {**isvc.metadata.labels, "app.kubernetes.io/name": shadow_name(settings),
                            ROLE_ANNOTATION: SHADOW_ROLE}
    annotations = {ROLE_ANNOTATION: SHADOW_ROLE}
    if version is not None:
        annotations[VERSION_ANNOTATION] = str(version)
    isvc.metadata.annotations = {**isvc.metadata.annotations, **annotations}
    predictor = isvc.spec.predictor
    predictor.min_replicas = max(1, predictor.min_replicas or 0)
    predictor.max_replicas = max(predictor.max_replicas or 1, predictor.min_replicas)
    predictor.logger = _logger(settings, metadata_annotations=sorted(annotations))
    return isvc


def build_mirror_virtual_service(settings: Settings, percent: float, shadow_revision: str) -> dict[str, Any]:
    """The Istio VirtualService that copies ``percent`` % of the InferenceService's requests to the shadow.

    Bound to the ``mesh`` gateway only, for the InferenceService's cluster-local host: KServe's own
    top-level VirtualService for that host is bound to the Knative ingress and local gateways, so
    the two do not compete for the same listener. Requests are routed on, unchanged, to the
    predictor's Knative route through the Knative local gateway (which keeps doing the canary
    split); the copy goes to the shadow revision's private Kubernetes Service, because Envoy sends
    a mirrored request with ``-shadow`` appended to its Host, which host-routed Knative gateways
    would not match, while the private Service reaches the revision's queue-proxy directly.
    """
    percent = check_mirror_percent(percent)
    serving = settings.serving
    ns = serving.namespace
    return {
        "apiVersion": f"{VS_GROUP}/{VS_VERSION}",
        "kind": VS_KIND,
        "metadata": {
            "name": mirror_name(settings),
            "namespace": ns,
            "labels": {"app.kubernetes.io/name": serving.name, "app.kubernetes.io/managed-by": "driftloop",
                       ROLE_ANNOTATION: SHADOW_ROLE},
        },
        "spec": {
            "gateways": [MESH_GATEWAY],
            "hosts": [f"{serving.name}.{ns}.svc.cluster.local"],
            "http": [{
                "name": "primary-with-shadow-mirror",
                "route": [{
                    "destination": {"host": KNATIVE_LOCAL_GATEWAY, "port": {"number": 80}},
                    "headers": {"request": {"set": {"Host": f"{serving.name}-predictor.{ns}.svc.cluster.local"}}},
                }],
                "mirror": {"host": f"{shadow_revision}-private.{ns}.svc.cluster.local", "port": {"number": 80}},
                "mirrorPercentage": {"value": percent},
            }],
        },
    }


def shadow_objects(settings: Settings, model_uri: str, version: str | None, percent: float,
                   shadow_revision: str | None = None) -> list[dict[str, Any]]:
    """Both shadow objects as JSON-ready dicts (``deploy --dry-run``): the shadow InferenceService and
    the mirror. Without a known revision the mirror names the shadow's first one."""
    percent = check_mirror_percent(percent)
    isvc = build_shadow_inference_service(settings, model_uri, version)
    revision = shadow_revision or first_revision(isvc.metadata.name)
    return [to_dict(isvc), build_mirror_virtual_service(settings, percent, revision)]
