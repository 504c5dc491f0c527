"""Where the agent's allowed actions land: the model as it is served.

* On the embedded default, :class:`LocalActuator`: the floor is the number of model-server
  processes behind the local gateway (``LocalBackend.set_replicas``; there is no reactive
  autoscaler locally, so the floor is the replica count); the kill switch is a file.
* On a cluster, :class:`KServeActuator`: ``spec.predictor.minReplicas`` of the
  InferenceService -- and ``maxReplicas`` to the same value when the agent owns the count
  (``agent.reactive: own``; KServe's HPA then cannot move it) -- as a merge patch built from
  kserve's model classes, first sent as a server-side dry run (``dryRun=All``) and then through
  ``KServeClient.patch``. In Serverless mode every change makes a new Knative revision
  (``autoscaling.knative.dev/min-scale``/``max-scale``), which is why the planner changes the
  count rarely. The kill switch is an annotation on the object.

Rolling back an in-flight canary uses the serving backends' own rollback.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from driftloop.core.errors import ServingError

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["Actuator", "LocalActuator", "KServeActuator", "floor_patch"]

log = logging.getLogger(__name__)


class Actuator(Protocol):
    def current_floor(self, model: str) -> int: ...
    def set_floor(self, model: str, replicas: int) -> str: ...
    def rollback(self, model: str) -> str: ...
    def canary_in_flight(self, model: str) -> bool: ...
    def paused(self, model: str) -> str | None: ...


class LocalActuator:
    """Replicas of the local primary model server; the kill switch is ``kill_file``."""

    def __init__(self, backend: Any, kill_file: Path) -> None:
        self.backend = backend
        self.kill_file = Path(kill_file)

    def current_floor(self, model: str) -> int:
        n = self.backend.replica_count()
        if n == 0:
            raise ServingError("nothing is being served here; start it with `driftloop serve`")
        return n

    def set_floor(self, model: str, replicas: int) -> str:
        n = self.backend.set_replicas(max(1, int(replicas)))
        return f"{n} model-server processes behind the gateway"

    def hand_back(self, model: str) -> str | None:
        """Nothing to hand back here: no autoscaler runs beside the agent; the processes stay as they are."""
        return None

    def rollback(self, model: str) -> str:
        self.backend.rollback()
        return "canary rolled back (0 %), its server stopped"

    def canary_in_flight(self, model: str) -> bool:
        return bool(self.backend.status().get("canary"))

    def paused(self, model: str) -> str | None:
        return f"kill switch file {self.kill_file} exists" if self.kill_file.exists() else None


def floor_patch(name: str, namespace: str, replicas: int, max_replicas: int | None = None) -> Any:
    """A merge patch (kserve model classes) that sets ``spec.predictor.minReplicas`` and, when given,
    ``maxReplicas`` (the agent owning the count sets both to the same value; handing it back to the
    HPA restores the configured maximum) -- nothing else."""
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    from kubernetes.client import V1ObjectMeta

    from serving.inference_service import API_VERSION, KIND

    for field, value in (("minReplicas", replicas), ("maxReplicas", max_replicas)):
        if value is None and field == "maxReplicas":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ServingError(f"{field} must be a non-negative integer, got {value!r}")
    if max_replicas is not None and max_replicas < replicas:
        raise ServingError(f"maxReplicas {max_replicas} is below minReplicas {replicas}")
    return V1beta1InferenceService(
        api_version=API_VERSION, kind=KIND, metadata=V1ObjectMeta(name=name, namespace=namespace),
        spec=V1beta1InferenceServiceSpec(predictor=V1beta1PredictorSpec(min_replicas=replicas,
                                                                        max_replicas=max_replicas)))


class KServeActuator:
    """The replicas of one InferenceService through ``KServeClient`` (server-side dry run first):
    ``owns`` -- the agent owns the count, ``minReplicas = maxReplicas`` (KServe's HPA then cannot move
    it); otherwise only ``minReplicas``, a floor under KServe's HPA/KPA (and ``maxReplicas`` back to
    ``serving.max_replicas`` if the agent had owned the count before)."""

    def __init__(self, settings: Settings, client: Any | None = None, *, owns: bool = False) -> None:
        from serving.kserve_backend import KServeBackend

        self.settings = settings
        self.owns = owns
        self.backend = KServeBackend(settings, client)
        self.annotation = settings.agent.kill_switch_annotation

    @property
    def client(self) -> Any:
        return self.backend.client

    def _object(self) -> dict[str, Any]:
        obj = self.backend.get()
        if obj is None:
            raise ServingError(f"InferenceService {self.backend.namespace}/{self.backend.name} does not exist")
        return obj

    def current_floor(self, model: str) -> int:
        predictor = (self._object().get("spec") or {}).get("predictor") or {}
        return int(predictor.get("minReplicas", 1))

    def set_floor(self, model: str, replicas: int) -> str:
        from kserve import constants

        from serving.inference_service import API_VERSION, to_dict
        from serving.kserve_backend import api_error_line

        predictor = (self._object().get("spec") or {}).get("predictor") or {}
        configured = int(self.settings.serving.max_replicas)
        live_min, live_max = predictor.get("minReplicas"), predictor.get("maxReplicas")
        limit = configured if self.owns else int(live_max or configured)
        if replicas > limit:
            raise ServingError(f"{replicas} replicas would exceed the InferenceService's maxReplicas "
                               f"{limit}; lower agent.ceiling or raise serving.max_replicas")
        if self.owns:
            max_replicas: int | None = replicas
        elif live_max is not None and live_max == live_min and int(live_max) < configured:
            max_replicas = configured  # the agent owned the count before: the HPA gets its range back
        else:
            max_replicas = None
        name, namespace = self.backend.name, self.backend.namespace
        patch = floor_patch(name, namespace, replicas, max_replicas)
        version = API_VERSION.split("/")[1]
        try:  # what the API server would make of it, persisted nowhere
            self.client.api_instance.patch_namespaced_custom_object(
                constants.KSERVE_GROUP, version, namespace, constants.KSERVE_PLURAL_INFERENCESERVICE, name,
                to_dict(patch), dry_run="All")
        except Exception as exc:
            raise ServingError(f"the API server refused minReplicas={replicas} on {namespace}/{name} "
                               f"(dry run): {api_error_line(exc)}") from exc
        self.backend._call("cannot patch", self.client.patch, name, patch, namespace=namespace)
        extra = "" if max_replicas is None else f", maxReplicas={max_replicas}"
        return f"spec.predictor.minReplicas={replicas}{extra} on InferenceService {namespace}/{name}"

    def hand_back(self, model: str) -> str | None:
        """The agent stops while it owns the count: ``maxReplicas`` back to ``serving.max_replicas`` with
        the count now as ``minReplicas``, so KServe's autoscaler scales again without it (None: nothing
        to hand back). A crashed agent cannot do this; its Deployment restarts it."""
        if not self.owns:
            return None
        predictor = (self._object().get("spec") or {}).get("predictor") or {}
        live_min, live_max = predictor.get("minReplicas"), predictor.get("maxReplicas")
        if live_min is None or live_max != live_min or int(live_max) >= int(self.settings.serving.max_replicas):
            return None
        self.owns = False  # a floor under the autoscaler: set_floor restores the configured maximum
        return self.set_floor(model, int(live_min))

    def rollback(self, model: str) -> str:
        self.backend.rollback()
        return "canaryTrafficPercent: 0 (the last rolled-out revision takes all traffic)"

    def canary_in_flight(self, model: str) -> bool:
        predictor = (self._object().get("spec") or {}).get("predictor") or {}
        return predictor.get("canaryTrafficPercent") not in (None, 0)

    def paused(self, model: str) -> str | None:
        annotations = (self._object().get("metadata") or {}).get("annotations") or {}
        value = str(annotations.get(self.annotation, "")).lower()
        return f"annotation {self.annotation}={value}" if value in ("true", "1", "yes") else None
