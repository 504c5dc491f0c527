"""The serving adapter: one small interface, two homes, chosen by configuration.

:func:`backend_for` is the one place that maps ``rollout.deploy`` (:func:`serving_home`) to a
:class:`ServingBackend`: local model-server processes behind the local gateway
(:class:`~serving.local_backend.LocalBackend`) on the embedded default, an ``InferenceService``
(:class:`~serving.kserve_backend.KServeBackend`) on a cluster. Callers — the deploy step, the
rollout commands — ask it for what they need (put a canary out, the rollout's target) and never
branch on the home. A new home is one class with these methods and one entry in ``_HOMES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from driftloop.core.errors import ServingError

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["CanaryOut", "ServingBackend", "LocalServing", "KServeServing", "backend_for", "serving_home"]


@dataclass(frozen=True)
class CanaryOut:
    """What putting a canary out did: ``canary`` (it takes its share now) or ``pending`` (it starts with serving)."""

    action: str
    message: str


class ServingBackend(Protocol):
    """Where models are served: what the deploy step and the rollout controller need of it."""

    home: str  # the ``rollout.deploy`` value naming it

    def deploy_canary(self, version: str, model_uri: str, percent: int) -> CanaryOut:
        """Put ``model_uri`` (``version`` of the model) out as a canary with ``percent`` % of traffic."""
        ...

    def rollout_target(self) -> Any:
        """The :class:`~serving.rollout.RolloutTarget` the rollout controller moves traffic on."""
        ...


class LocalServing:
    """The embedded default: KServe ``ModelServer`` processes behind the local gateway."""

    home = "local"

    def __init__(self, settings: Settings, processes: Any | None = None) -> None:
        """``processes``: the :class:`~serving.local_backend.LocalBackend` to use (default: this workspace's;
        a fleet's model: :class:`~serving.fleet_backend.FleetModelBackend`, its part of the fleet gateway)."""
        from serving.local_backend import LocalBackend

        self.settings = settings
        if processes is None and settings.fleet is not None:
            from serving.fleet_backend import FleetModelBackend

            processes = FleetModelBackend(settings)
        self.processes = processes or LocalBackend(settings)

    def deploy_canary(self, version: str, model_uri: str, percent: int) -> CanaryOut:
        message = self.processes.deploy_canary(version, model_uri, percent)
        return CanaryOut("canary" if self.processes.status().get("canary") else "pending", message)

    def rollout_target(self) -> Any:
        from serving.rollout import GatewayTarget

        url = self.processes.gateway_url
        if url is None:
            raise ServingError("nothing is being served in this workspace; start it with `driftloop serve`")
        return GatewayTarget(url, backend=self.processes, token=self.processes.admin_token())


class KServeServing:
    """A cluster: one ``InferenceService``, its canary split and KServe logger."""

    home = "kserve"

    def __init__(self, settings: Settings, inference_service: Any | None = None) -> None:
        """``inference_service``: the :class:`~serving.kserve_backend.KServeBackend` to use (default: a new client)."""
        from serving.kserve_backend import KServeBackend

        self.settings = settings
        self.inference_service = inference_service or KServeBackend(settings)

    def deploy_canary(self, version: str, model_uri: str, percent: int) -> CanaryOut:
        self.inference_service.set_canary(model_uri, percent)
        s = self.settings.serving
        return CanaryOut("canary", f"InferenceService {s.namespace}/{s.name}: canary v{version} at {percent}%")

    def rollout_target(self) -> Any:
        import os

        from serving.rollout import KServeTarget, MonitorQuality, MonitorShadow, PrometheusMetrics

        settings = self.settings
        if not settings.rollout.prometheus_url:
            raise ServingError("rollout.prometheus_url is not set; the controller reads canary metrics from Prometheus")
        monitor = settings.serving.logger_url.removesuffix("/events")
        # the monitor's GET /shadow asks for the token its webhook takes (Secret driftloop-webhook)
        token = os.environ.get("DRIFTLOOP_WEBHOOK_TOKEN") or None
        return KServeTarget(self.inference_service,
                            PrometheusMetrics(settings.rollout.prometheus_url, settings.serving.namespace),
                            MonitorQuality(monitor, settings.model.task), MonitorShadow(monitor, token=token))


# rollout.deploy value -> the backend serving there. ``none`` only keeps the pipeline from deploying:
# what `driftloop serve` puts out by hand is still served (and rolled out) on this machine.
_HOMES: dict[str, type[LocalServing] | type[KServeServing]] = {"local": LocalServing, "none": LocalServing,
                                                               "kserve": KServeServing}
_CLUSTER_HOME = "kserve"  # what ``auto`` means where the pipeline runs on a cluster


def serving_home(settings: Settings, *, cluster: bool | None = None) -> str:
    """``kserve``, ``local`` or ``none`` from ``rollout.deploy`` (auto: kserve on a cluster).

    ``cluster`` overrides where it runs (compiled YAML always runs on Kubeflow).
    """
    home = settings.rollout.deploy
    if home == "auto":
        on_cluster = settings.is_cluster if cluster is None else cluster
        return _CLUSTER_HOME if on_cluster else "local"
    return home


def backend_for(settings: Settings, home: str | None = None, *, using: Any | None = None) -> ServingBackend:
    """The serving backend of ``home`` (default: :func:`serving_home` of ``settings``).

    ``using``: the home's own client to drive (a ``LocalBackend`` or ``KServeBackend``), else a new one.
    """
    home = home or serving_home(settings)
    try:
        backend = _HOMES[home]
    except KeyError:
        raise ServingError(f"nothing serves models with rollout.deploy={home}; "
                           f"serving homes are {', '.join(sorted(set(_HOMES) - {'none'}))}") from None
    return backend(settings, using)
