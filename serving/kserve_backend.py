"""The cluster serving adapter: the InferenceService applied and changed through KServeClient.

Every change is one call of the real client (``create``, ``patch`` — a JSON merge
patch —, ``replace``); readiness is KServe's own ``wait_isvc_ready``. Canary,
traffic steps, promotion and rollback are the InferenceService field changes the
KServe controller acts on (see :mod:`serving.inference_service`). Percentages
are checked before anything is sent; client failures become ServingError.

The shadow phase puts up a second InferenceService (``<name>-shadow``, through the same
client) and the Istio mirror (a ``VirtualService``, through the kubernetes client's
``CustomObjectsApi`` — the one KServeClient holds), and takes both down again:
:meth:`KServeBackend.set_shadow`, :meth:`KServeBackend.remove_shadow`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import ServingError
from serving import inference_service as isvcs

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["KServeBackend", "ServingStatus", "TrafficTarget", "api_error_line"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrafficTarget:
    revision: str | None
    percent: int
    latest: bool
    tag: str | None = None


@dataclass(frozen=True)
class ServingStatus:
    """What the controller reports in ``status.components.predictor`` (plus readiness and the spec's split)."""

    name: str
    namespace: str
    ready: bool
    canary_percent: int | None
    model_uri: str | None
    url: str | None = None
    latest_ready_revision: str | None = None
    latest_rolledout_revision: str | None = None
    previous_rolledout_revision: str | None = None
    traffic: tuple[TrafficTarget, ...] = field(default_factory=tuple)


def _is_not_found(exc: Exception) -> bool:
    text = str(exc)
    return "(404)" in text or "Not Found" in text


def _api_exception(exc: BaseException) -> Any:
    """The kubernetes ``ApiException`` behind ``exc`` (KServeClient wraps it in a RuntimeError), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if hasattr(seen, "status") and hasattr(seen, "body"):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _status(exc: BaseException) -> int | None:
    api = _api_exception(exc)
    return getattr(api, "status", None) if api is not None else None


def api_error_line(exc: BaseException) -> str:
    """What the API server said, on one line: ``403 Forbidden: <its message>`` (not the client's dump of
    headers and body); other errors (connection refused, …) as their own text, folded onto one line."""
    api = _api_exception(exc)
    if api is not None:
        message = ""
        try:
            message = json.loads(api.body or "{}").get("message", "")
        except (ValueError, AttributeError, TypeError):
            message = str(api.body or "")
        return " ".join(f"{api.status} {api.reason or ''}: {message or ''}".split()).rstrip(": ")
    return " ".join(str(exc).split())


def parse_status(obj: dict[str, Any]) -> ServingStatus:
    """Read the status a cluster returns for an InferenceService (a plain dict from KServeClient.get)."""
    meta = obj.get("metadata") or {}
    spec_predictor = (obj.get("spec") or {}).get("predictor") or {}
    status = obj.get("status") or {}
    predictor = (status.get("components") or {}).get("predictor") or {}
    ready = any(c.get("type") == "Ready" and str(c.get("status")).lower() == "true"
                for c in status.get("conditions") or [])
    model_uri = (meta.get("annotations") or {}).get(isvcs.MODEL_URI_ANNOTATION)
    traffic = tuple(
        TrafficTarget(revision=t.get("revisionName"), percent=int(t.get("percent") or 0),
                      latest=bool(t.get("latestRevision")), tag=t.get("tag"))
        for t in predictor.get("traffic") or [])
    return ServingStatus(
        name=meta.get("name", ""), namespace=meta.get("namespace", ""), ready=ready,
        canary_percent=spec_predictor.get("canaryTrafficPercent"), model_uri=model_uri,
        url=predictor.get("url") or status.get("url"),
        latest_ready_revision=predictor.get("latestReadyRevision"),
        latest_rolledout_revision=predictor.get("latestRolledoutRevision"),
        previous_rolledout_revision=predictor.get("previousRolledoutRevision"),
        traffic=traffic,
    )


class KServeBackend:
    """One InferenceService on a cluster, driven through ``kserve.KServeClient``."""

    def __init__(self, settings: Settings, client: Any | None = None, *, custom_api: Any | None = None) -> None:
        """``custom_api``: a ``kubernetes.client.CustomObjectsApi`` (default: the one ``client`` holds)."""
        self.settings = settings
        self.name = settings.serving.name
        self.namespace = settings.serving.namespace
        self._client = client
        self._custom_api = custom_api

    @property
    def client(self) -> Any:
        if self._client is None:
            from kserve import KServeClient

            context = self.settings.serving.kube_context  # None: the kubeconfig's current context
            try:
                self._client = KServeClient(context=context)
            except Exception as exc:  # kubeconfig missing or unreadable, or no such context: say so, once
                where = f" (kube context {context})" if context else ""
                raise ServingError(f"cannot connect to the Kubernetes cluster{where}: "
                                   f"{' '.join(str(exc).split())}") from exc
        return self._client

    @property
    def custom_api(self) -> Any:
        """The kubernetes client's CustomObjectsApi for the Istio VirtualService of the shadow mirror."""
        if self._custom_api is None:
            self._custom_api = self.client.api_instance  # KServeClient's CustomObjectsApi, same kubeconfig
        return self._custom_api

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ServingError:
            raise
        except Exception as exc:  # KServeClient wraps every ApiException in RuntimeError
            raise ServingError(f"{what} InferenceService {self.namespace}/{self.name}: {api_error_line(exc)}") from exc

    # -- reading ----------------------------------------------------------------------------
    def get(self) -> dict[str, Any] | None:
        """The current object as the cluster returns it, or None when it does not exist."""
        try:
            return self.client.get(self.name, namespace=self.namespace)
        except ServingError:
            raise
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise ServingError(f"cannot read InferenceService {self.namespace}/{self.name}: {api_error_line(exc)}") from exc

    def current(self) -> Any:
        """The current object parsed into kserve's model classes; ServingError when it is not there."""
        obj = self.get()
        if obj is None:
            raise ServingError(f"InferenceService {self.namespace}/{self.name} does not exist; deploy it first")
        return isvcs.from_dict(obj)

    def status(self) -> ServingStatus:
        obj = self.get()
        if obj is None:
            raise ServingError(f"InferenceService {self.namespace}/{self.name} does not exist; deploy it first")
        return parse_status(obj)

    # -- changing ---------------------------------------------------------------------------
    def apply(self, isvc: Any) -> dict[str, Any]:
        """Create the InferenceService, or replace the existing one with this spec."""
        name = isvc.metadata.name
        if self.get() is None:
            log.info("creating InferenceService %s/%s", self.namespace, name)
            return self._call("cannot create", self.client.create, isvc, namespace=self.namespace)
        log.info("replacing InferenceService %s/%s", self.namespace, name)
        return self._call("cannot replace", self.client.replace, name, isvc, namespace=self.namespace)

    def set_canary(self, model_uri: str, percent: int) -> dict[str, Any]:
        """Put ``model_uri`` out as a canary with ``percent`` % of traffic (a new predictor revision)."""
        isvcs.check_percent(percent)
        ref = self._model_ref(model_uri)
        return self._update(lambda current: isvcs.with_canary(current, ref, percent))

    def set_traffic(self, percent: int) -> dict[str, Any]:
        """Move the split between the rolled-out and the canary revision (no new revision)."""
        patch = isvcs.canary_patch(percent, name=self.name, namespace=self.namespace)
        return self._call("cannot patch", self.client.patch, self.name, patch, namespace=self.namespace)

    def rollback(self) -> dict[str, Any]:
        """``canaryTrafficPercent: 0``: the last rolled-out revision takes all traffic again."""
        return self.set_traffic(0)

    def promote(self, model_uri: str) -> dict[str, Any]:
        """The new model as the predictor without ``canaryTrafficPercent``: it takes 100 %."""
        ref = self._model_ref(model_uri)
        return self._update(lambda current: isvcs.promote(current, ref))

    def wait_ready(self, timeout: float = 600.0, polling_interval: float = 10.0) -> None:
        interval = max(1, min(int(polling_interval), int(timeout) or 1))
        self._call("timed out waiting for", self.client.wait_isvc_ready, self.name, namespace=self.namespace,
                   timeout_seconds=int(timeout), polling_interval=interval)

    # -- shadow phase -----------------------------------------------------------------------
    def shadow_status(self) -> ServingStatus | None:
        """The shadow InferenceService's status, or None when there is none."""
        name = isvcs.shadow_name(self.settings)
        try:
            obj = self.client.get(name, namespace=self.namespace)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise ServingError(f"cannot read InferenceService {self.namespace}/{name}: {api_error_line(exc)}") from exc
        return parse_status(obj)

    def mirror(self) -> dict[str, Any] | None:
        """The mirror VirtualService as the cluster returns it, or None when there is none."""
        name = isvcs.mirror_name(self.settings)
        try:
            return self.custom_api.get_namespaced_custom_object(isvcs.VS_GROUP, isvcs.VS_VERSION, self.namespace,
                                                                isvcs.VS_PLURAL, name)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise ServingError(f"cannot read VirtualService {self.namespace}/{name}: {api_error_line(exc)}") from exc

    def set_shadow(self, model_uri: str, version: str | None, percent: float, *,
                   ready_timeout: float = 600.0) -> dict[str, Any] | None:
        """Mirror ``percent`` % of requests to ``model_uri`` served by ``<name>-shadow``; 0 removes both.

        Order matters: the shadow InferenceService is applied and must be ready before the mirror
        names its revision, so no copy is ever sent to a revision that is not serving. Returns the
        VirtualService the cluster accepted (None when the mirror was removed).
        """
        if percent == 0:
            self.remove_shadow()
            return None
        percent = isvcs.check_mirror_percent(percent)
        shadow = isvcs.build_shadow_inference_service(self.settings, self._model_ref(model_uri), version)
        name = shadow.metadata.name
        if self.shadow_status() is None:
            log.info("creating shadow InferenceService %s/%s for %s", self.namespace, name, model_uri)
            self._call("cannot create shadow", self.client.create, shadow, namespace=self.namespace)
        else:
            log.info("replacing shadow InferenceService %s/%s with %s", self.namespace, name, model_uri)
            self._call("cannot replace shadow", self.client.replace, name, shadow, namespace=self.namespace)
        interval = max(1, min(10, int(ready_timeout) or 1))
        self._call("timed out waiting for shadow", self.client.wait_isvc_ready, name, namespace=self.namespace,
                   timeout_seconds=int(ready_timeout), polling_interval=interval)
        status = self.shadow_status()
        revision = status.latest_ready_revision if status is not None else None
        if not revision:
            raise ServingError(f"shadow InferenceService {self.namespace}/{name} is ready but reports no "
                               "latestReadyRevision; is it in Serverless mode?")
        return self.apply_mirror(isvcs.build_mirror_virtual_service(self.settings, percent, revision))

    def apply_mirror(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create the mirror VirtualService, or replace the existing one (keeping its resourceVersion)."""
        api, name = self.custom_api, body["metadata"]["name"]
        args = (isvcs.VS_GROUP, isvcs.VS_VERSION, self.namespace, isvcs.VS_PLURAL)
        current = self.mirror()
        try:
            if current is None:
                log.info("creating VirtualService %s/%s", self.namespace, name)
                return api.create_namespaced_custom_object(*args, body)
            body = {**body, "metadata": {**body["metadata"],
                                         "resourceVersion": (current.get("metadata") or {}).get("resourceVersion")}}
            log.info("replacing VirtualService %s/%s", self.namespace, name)
            return api.replace_namespaced_custom_object(*args, name, body)
        except Exception as exc:  # kubernetes.client ApiException and connection errors
            raise ServingError(f"cannot apply VirtualService {self.namespace}/{name}: {api_error_line(exc)}") from exc

    def remove_shadow(self) -> None:
        """Delete the mirror first (no copy goes out any more), then the shadow InferenceService; gone is fine."""
        vs = isvcs.mirror_name(self.settings)
        try:
            self.custom_api.delete_namespaced_custom_object(isvcs.VS_GROUP, isvcs.VS_VERSION, self.namespace,
                                                            isvcs.VS_PLURAL, vs)
            log.info("deleted VirtualService %s/%s", self.namespace, vs)
        except Exception as exc:
            if not _is_not_found(exc):
                raise ServingError(f"cannot delete VirtualService {self.namespace}/{vs}: {api_error_line(exc)}") from exc
        shadow = isvcs.shadow_name(self.settings)
        try:
            self.client.delete(shadow, namespace=self.namespace)
            log.info("deleted shadow InferenceService %s/%s", self.namespace, shadow)
        except Exception as exc:
            if not _is_not_found(exc):
                raise ServingError(f"cannot delete InferenceService {self.namespace}/{shadow}: {api_error_line(exc)}") from exc

    # -- helpers ----------------------------------------------------------------------------
    def _update(self, change: Any, attempts: int = 3) -> dict[str, Any]:
        """Read the object, ``change`` it, write it back with the resourceVersion that was read. A write by
        someone else in between (the agent's minReplicas, a person's annotation) makes the API server
        answer 409 Conflict instead of losing that write; the change is then made again on a fresh read."""
        attempt = 1
        while True:
            desired = change(self.current())  # keeps metadata.resource_version of this read
            try:
                return self.client.replace(self.name, desired, namespace=self.namespace)
            except Exception as exc:  # KServeClient wraps every ApiException in RuntimeError
                if _status(exc) != 409 or attempt >= attempts:
                    raise ServingError(f"cannot replace InferenceService {self.namespace}/{self.name}: "
                                       f"{api_error_line(exc)}") from exc
            attempt += 1
            log.info("InferenceService %s/%s changed since it was read (409 Conflict); reading it again",
                     self.namespace, self.name)

    def _model_ref(self, model_uri: str) -> str:
        """The predictor image takes registry URIs; KServe's mlflow runtime needs the version's files."""
        if not (self.settings.serving.use_mlflow_runtime and model_uri.startswith("models:/")):
            return model_uri
        from mlflow.exceptions import MlflowException

        from driftloop.core.registry import Registry

        registry = Registry.from_settings(self.settings)
        info = registry.resolve(model_uri)
        try:
            return registry.client.get_model_version_download_uri(info.name, info.version)
        except MlflowException as exc:
            raise ServingError(f"cannot find the files of {model_uri}: {exc}") from exc
