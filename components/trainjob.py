"""The cluster launcher of distributed training: a Kubeflow Trainer v2 ``TrainJob``.

The pipeline's train step, on Kubeflow with ``model.distributed.workers > 1``, renders a
``TrainJob`` (``trainer.kubeflow.org/v1alpha1``) on the ``xgboost-distributed`` runtime with N
nodes that each run the worker entrypoint of :mod:`components.distributed`, creates it with the
``kubernetes`` client's ``CustomObjectsApi``, waits for it, shows each node's log in the step's
log and fails with one line when the job fails, runs past ``activeDeadlineSeconds`` or cannot be
created. The object is built from and checked against the ``kubeflow-trainer-api`` models.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from driftloop.core.errors import TrainingError

__all__ = ["GROUP", "VERSION", "PLURAL", "QUEUE_LABEL", "TrainJobSpec", "render_trainjob", "TrainJobLauncher",
           "trainer_models_check", "in_cluster_namespace"]

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
RUNTIMES = "trainingruntimes"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Pods of a TrainJob: JobSet labels its pods with the JobSet (= TrainJob) name; the trainer's
# replicated job is "node" and its index is the node's rank.
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
NODE_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
GPU_RESOURCE = "nvidia.com/gpu"
NODE_JOB = "node"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN")


@dataclass(frozen=True)
class TrainJobSpec:
    """What a TrainJob for one distributed train step needs."""

    name: str
    namespace: str
    image: str
    command: list[str]
    nodes: int
    gpus_per_node: int = 0
    runtime: str = "xgboost-distributed"
    runtime_kind: str = "ClusterTrainingRuntime"
    queue_name: str | None = None
    active_deadline_seconds: int = 3600
    cpu: str = "2"
    memory: str = "4G"
    secret: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    toleration_key: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def render_trainjob(spec: TrainJobSpec) -> dict[str, Any]:
    """The TrainJob as the API server receives it (camelCase JSON), checked by the Trainer API models."""
    if spec.nodes < 1:
        raise TrainingError(f"a TrainJob needs at least one node, not {spec.nodes}")
    if spec.gpus_per_node not in (0, 1):
        raise TrainingError("the xgboost-distributed runtime starts one worker per node: gpus_per_worker is 0 or 1")
    limits: dict[str, str] = {"cpu": spec.cpu, "memory": spec.memory}
    requests = dict(limits)
    if spec.gpus_per_node:
        # A GPU request without a limit gets the TrainJob's JobSet rejected: set both.
        limits[GPU_RESOURCE] = requests[GPU_RESOURCE] = str(spec.gpus_per_node)
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    if spec.secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": spec.secret, "key": key, "optional": True}}}
                for key in SECRET_KEYS]
    labels = {"app.kubernetes.io/part-of": "driftloop", "app.kubernetes.io/component": "distributed-train",
              **spec.labels}
    if spec.queue_name:
        labels[QUEUE_LABEL] = spec.queue_name
    obj: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": spec.runtime, "apiGroup": GROUP, "kind": spec.runtime_kind},
            "activeDeadlineSeconds": int(spec.active_deadline_seconds),
            "trainer": {
                "image": spec.image,
                "command": list(spec.command),
                "numNodes": int(spec.nodes),
                "resourcesPerNode": {"limits": limits, "requests": requests},
                "env": env,
            },
        },
    }
    pod: dict[str, Any] = {}
    if spec.gpus_per_node and spec.toleration_key:
        pod["tolerations"] = [{"key": spec.toleration_key, "operator": "Exists", "effect": "NoSchedule"}]
    if spec.gpus_per_node and spec.node_selector:
        pod["nodeSelector"] = dict(sorted(spec.node_selector.items()))
    if pod:
        obj["spec"]["runtimePatches"] = [{"manager": "driftloop", "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": NODE_JOB, "template": {"spec": {"template": {"spec": pod}}}}]}}}}]
    trainer_models_check(obj)
    return obj


def trainer_models_check(obj: dict[str, Any]) -> Any:
    """Parse with the ``kubeflow-trainer-api`` models; a field they do not know (dropped on parse) is an error."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    try:
        parsed = TrainerV1alpha1TrainJob.from_dict(obj)
    except Exception as exc:  # pydantic's ValidationError
        raise TrainingError(f"invalid TrainJob: {exc}") from exc
    again = parsed.to_dict()
    if _normalise(again) != _normalise(obj):
        raise TrainingError(f"TrainJob has fields the Trainer API does not know: "
                            f"{json.dumps(_diff(obj, again))[:300]}")
    return parsed


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in a:
            out += [f"{path}.{k}"] if k not in b else _diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def in_cluster_namespace(default: str = "kubeflow") -> str:
    """The namespace this pod runs in (the ServiceAccount token's), else ``default``."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as fh:
            return fh.read().strip() or default
    except OSError:
        return default


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def _api_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    try:
        return json.loads(body).get("message", "") if body else str(getattr(exc, "reason", exc))
    except (ValueError, AttributeError):
        return str(body)[:300]


class TrainJobLauncher:
    """Create a TrainJob, wait for it, show its nodes' logs, fail with one clear line.

    ``custom_api`` is a ``kubernetes.client.CustomObjectsApi``; ``core_api`` (optional) a
    ``CoreV1Api`` for the nodes' logs.
    """

    def __init__(self, custom_api: Any, core_api: Any = None, *, poll_seconds: float = 5.0,
                 echo: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, watch: bool = False, watch_seconds: int = 60):
        """``watch``: wait with a watch on the TrainJob (resumed from the last version seen each time it
        ends, read afresh when that version is too old to watch from) instead of a get every
        ``poll_seconds``; ``poll_seconds`` then only spaces the retries while the API server is away."""
        self.api, self.core = custom_api, core_api
        self.poll, self.echo, self.clock, self.sleep = poll_seconds, echo, clock, sleep
        self.watch, self.watch_seconds = watch, max(1, int(watch_seconds))
        self.expired = 0  # watches that could not resume (410 Gone) and started again from now

    @classmethod
    def in_cluster(cls, **kwargs: Any) -> "TrainJobLauncher":
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.CustomObjectsApi(), client.CoreV1Api(), **{"watch": True, **kwargs})

    def runtime_kind(self, namespace: str, runtime: str) -> str:
        """``TrainingRuntime`` when the namespace has one of that name, else the cluster-wide kind."""
        try:
            self.api.get_namespaced_custom_object(GROUP, VERSION, namespace, RUNTIMES, runtime)
            return "TrainingRuntime"
        except Exception as exc:  # noqa: BLE001 - kubernetes ApiException
            status = getattr(exc, "status", None)
            if status == 404:
                return "ClusterTrainingRuntime"
            if status == 403:
                raise TrainingError(f"the pipeline's ServiceAccount may not read training runtimes in namespace "
                                    f"{namespace!r} (RBAC: infra/base/rbac.yaml, role driftloop-pipeline-trainer)") from exc
            raise TrainingError(f"cannot look up training runtime {runtime!r}: {_api_message(exc)}") from exc

    def run(self, body: dict[str, Any], *, grace_seconds: float = 120.0) -> dict[str, Any]:
        """Create ``body`` and wait until it completes; returns its last status object."""
        meta = body["metadata"]
        name, ns = meta["name"], meta["namespace"]
        runtime = body["spec"]["runtimeRef"]["name"]
        deadline_s = int(body["spec"].get("activeDeadlineSeconds") or 3600)
        try:
            created = self.api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        except Exception as exc:  # noqa: BLE001 - kubernetes ApiException
            status, message = getattr(exc, "status", None), _api_message(exc)
            if status == 403 and "denied" not in message:
                raise TrainingError(f"cannot create TrainJob {name!r}: the pipeline's ServiceAccount may not create "
                                    f"trainjobs in namespace {ns!r} (RBAC: infra/base/rbac.yaml)") from exc
            if status == 404 and "trainjobs" in message.lower() or status == 404 and not message:
                raise TrainingError(f"cannot create TrainJob {name!r}: the TrainJob API ({GROUP}/{VERSION}) is not "
                                    "installed; install Kubeflow Trainer v2") from exc
            if "not found" in message and runtime in message:
                raise TrainingError(f"cannot create TrainJob {name!r}: training runtime {runtime!r} is not installed "
                                    "(model.distributed.runtime)") from exc
            raise TrainingError(f"cannot create TrainJob {name!r}: {message or exc}") from exc
        self.echo(f"TrainJob {ns}/{name}: {body['spec']['trainer']['numNodes']} nodes on runtime {runtime!r}")
        give_up = self.clock() + deadline_s + grace_seconds
        obj: dict[str, Any] = created if self.watch and isinstance(created, dict) else {}
        try:
            while True:
                obj = self._observe(ns, name, obj, give_up)
                done = _condition(obj, "Complete")
                failed = _condition(obj, "Failed")
                if done or failed:
                    self._show_logs(ns, name, int(body["spec"]["trainer"]["numNodes"]))
                if done:
                    self.echo(f"TrainJob {ns}/{name} complete")
                    return obj
                if failed:
                    reason, message = failed.get("reason", ""), failed.get("message", "")
                    if reason == "DeadlineExceeded":
                        raise TrainingError(f"TrainJob {ns}/{name} timed out after {deadline_s} s "
                                            f"(activeDeadlineSeconds, model.distributed.timeout_seconds): {message}")
                    raise TrainingError(f"TrainJob {ns}/{name} failed ({reason or 'Failed'}): {message}")
                if self.clock() > give_up:
                    self._delete(ns, name)
                    raise TrainingError(f"TrainJob {ns}/{name} did not finish within {deadline_s} s "
                                        "(model.distributed.timeout_seconds); deleted it")
                if not self.watch:
                    self.sleep(self.poll)
        except KeyboardInterrupt:
            self._delete(ns, name)
            raise

    def _observe(self, ns: str, name: str, last: dict[str, Any], give_up: float) -> dict[str, Any]:
        """The TrainJob now: read (polling), or its next change since ``last`` (watching). A failed read
        is logged and answered with ``{}`` (read afresh next time): the API server may be away a while."""
        try:
            if self.watch and (last.get("metadata") or {}).get("resourceVersion"):
                return self._next_change(ns, name, last, give_up)
            return self.api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except TrainingError:
            raise
        except Exception as exc:  # noqa: BLE001 - kubernetes ApiException, connection errors
            if getattr(exc, "status", None) == 404:
                raise TrainingError(f"TrainJob {ns}/{name} was deleted while the step waited for it") from exc
            log.warning("TrainJob %s: status read failed (%s); retrying", name, _api_message(exc))
            if self.watch:
                self.sleep(self.poll)
            return {}

    def _next_change(self, ns: str, name: str, last: dict[str, Any], give_up: float) -> dict[str, Any]:
        """Watch the TrainJob from the version last seen until it changes or the watch ends (at most
        ``watch_seconds``); the object as it is then. When that version is gone from the API server's
        history (410 Gone: the watch expired) the watch starts again from now, whose first event is the
        object as it is (only ``watch`` is granted, not ``list``)."""
        from kubernetes import watch

        seconds = int(max(1, min(self.watch_seconds, give_up - self.clock() + 1)))
        seen = last["metadata"]["resourceVersion"]
        since: str | None = seen
        while True:
            stream = watch.Watch()
            where = {"resource_version": since} if since else {}
            try:
                for event in stream.stream(self.api.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                                           field_selector=f"metadata.name={name}", timeout_seconds=seconds, **where):
                    if event["type"] == "DELETED":
                        raise TrainingError(f"TrainJob {ns}/{name} was deleted while the step waited for it")
                    version = ((event["object"] or {}).get("metadata") or {}).get("resourceVersion")
                    if event["type"] in ("ADDED", "MODIFIED") and version != seen:
                        return event["object"]
                return last  # the watch ended with no change: resume from the same version
            except TrainingError:
                raise
            except Exception as exc:  # noqa: BLE001 - kubernetes ApiException
                if getattr(exc, "status", None) != 410 or since is None:
                    raise
                self.expired += 1
                log.info("TrainJob %s: the watch expired (%s); watching again from now", name, _api_message(exc))
                since = None
            finally:
                stream.stop()

    def _delete(self, ns: str, name: str) -> None:
        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not delete TrainJob %s/%s: %s", ns, name, _api_message(exc))

    def _show_logs(self, ns: str, name: str, nodes: int) -> None:
        if self.core is None:
            return
        try:
            pods = self.core.list_namespaced_pod(ns, label_selector=f"{JOBSET_LABEL}={name}").items
        except Exception as exc:  # noqa: BLE001
            self.echo(f"(node logs unavailable: {_api_message(exc)})")
            return
        def index(p: Any) -> int:
            return int((p.metadata.labels or {}).get(NODE_INDEX_LABEL, nodes))
        for pod in sorted(pods, key=index):
            try:
                text = self.core.read_namespaced_pod_log(pod.metadata.name, ns, tail_lines=200)
            except Exception as exc:  # noqa: BLE001
                text = f"(log unavailable: {_api_message(exc)})"
            for line in str(text).splitlines():
                self.echo(f"[node {index(pod)}] {line}")
