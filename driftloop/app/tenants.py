"""Tenants: many teams on one install, each with its own loop and a fair share of the GPUs.

``driftloop tenant add`` renders ``infra/tenants/<name>/``, a kustomization a platform
engineer reviews and applies (``kubectl apply -k``); nothing is applied from here. A tenant
gets

* its namespace, or a Kubeflow ``Profile`` (the profile controller makes the namespace and
  its quota), with a ResourceQuota whose ``requests.nvidia.com/gpu`` covers its nominal plus
  borrowed GPUs;
* one ServiceAccount per role (pipeline steps, which also deploy; monitor; rollout
  controller), Roles and RoleBindings inside its namespace only, and a NetworkPolicy that
  admits traffic from its own namespace and the platform's (Knative, Istio, Prometheus)
  and from no other tenant;
* a Kueue ``LocalQueue`` (named like the tenant) pointing at its own ``ClusterQueue`` in the
  pool's cohort: ``nominalQuota`` GPUs of its own, ``borrowingLimit`` more while others idle;
  the ``ResourceFlavor`` is rendered once for all tenants (``infra/tenants/shared/``);
* its MLflow space: the workspace ``<name>`` on a tracking server with workspaces enabled,
  and in any case its own experiment and model names;
* its loop: monitor (with its own webhook token Secret, referenced, never written), rollout
  controller (which reads the monitor's ``GET /shadow`` with that token and may put up and take
  down the shadow phase's InferenceService and Istio mirror in the tenant's namespace),
  InferenceService, alert rule and route, and a driftloop configuration for the
  cluster (``config/driftloop.yaml``: namespace, ServiceAccount, queue, MLflow space) and one
  for the embedded default (``local.yaml``: own workspace folder, stores, ports, model name).

The pool (``infra/tenants/pool.yaml``: GPUs, cohort, flavor, MLflow server) is created by the
first ``add``. Bad input is refused with one line (:class:`TenantError`) before anything is
written; :func:`check_invariants` states what must hold over any set of tenants and is run by
the tests and by ``driftloop infra check``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from driftloop.core.config import DEFAULT_IMAGE, load_settings
from driftloop.core.errors import ConfigError, DriftloopError
from driftloop.core.shadow import REQUEST_ID_HEADER, shadow_name
from driftloop.app.tenant_crds import CLUSTER_SCOPED_KINDS

__all__ = [
    "TenantError",
    "Pool",
    "Tenant",
    "GPU",
    "QUEUE_LABEL",
    "PLATFORM_NAMESPACES",
    "DEPLOYER_VERBS",
    "RESERVED_NAMES",
    "tenants_dir",
    "load_pool",
    "load_tenants",
    "render_objects",
    "render_tenant",
    "cluster_config",
    "local_config",
    "quota_hard",
    "render_shared",
    "plan_add",
    "add_tenant",
    "remove_tenant",
    "check_invariants",
    "tenant_problems",
    "load_rendered",
]

GPU = "nvidia.com/gpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TENANT_LABEL = "driftloop.io/tenant"
NAME_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace
# Namespaces a tenant's pods accept traffic from besides their own: Knative's activator and
# Istio's ingress gateway (requests to the model servers), Prometheus and Alertmanager.
PLATFORM_NAMESPACES = ("istio-system", "knative-serving", "monitoring")
# What the pipeline's deploy step may do with InferenceServices in the tenant's namespace, as in infra/base: put
# the canary on the existing one (KServeClient.replace: get + update; patches for the canary). The tenant's
# InferenceService is created by its install (its kustomization), never by a pipeline, which deletes none either.
DEPLOYER_VERBS = ("get", "update", "patch")
# Names a tenant cannot take: platform namespaces, the single-loop namespace, the shared folder.
RESERVED_NAMES = frozenset({
    "shared", "default", "driftloop", "kubeflow", "kueue-system", "kserve", "cert-manager", "mlflow",
    "workspaces", "api", "ajax-api", "static-files", *PLATFORM_NAMESPACES,
})
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_MAX_NAME = 40  # leaves room for the prefixes and suffixes derived names get (63 at most)
DEFAULT_COHORT = "driftloop"
PORT_BASE = 8200  # embedded default: tenant k's gateway on 8200 + 10k, its monitor on 8201 + 10k
PORT_STEP = 10
PART_OF = "driftloop"
# The tenant's InferenceService (serving.name in its cluster config) and what its shadow phase adds
# beside it: serving.inference_service names them shadow_name() and <name>-mirror.
_MODEL_SERVER = "driftloop-model"
_SHADOW_SERVER = shadow_name(_MODEL_SERVER)
_MIRROR = f"{_MODEL_SERVER}-mirror"
# libyaml when present: the property tests render and read hundreds of files
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_HEADER = "# Rendered by `driftloop tenant add`; review, then `kubectl apply -k` this folder. Do not edit by hand:\n" \
          "# `driftloop tenant remove` + `add` renders it again.\n"
_CONFIG_HEADER = "# Rendered by `driftloop tenant add`. The team may tune data, model, gate, monitor and trigger\n" \
                 "# settings here; its namespace, queue, ServiceAccount and MLflow space are checked by `driftloop infra check`.\n"


class TenantError(DriftloopError):
    """A tenant request that cannot be honoured: bad name, duplicate, over the pool, no cohort."""


@dataclass(frozen=True)
class Pool:
    """The cluster's shared GPUs: one cohort, one flavor, one MLflow tracking server."""

    gpus: int
    cohort: str | None = DEFAULT_COHORT
    flavor: str = "driftloop-gpu"
    mlflow_uri: str = "http://mlflow.mlflow.svc.cluster.local:5000"
    mlflow_workspaces: bool = True  # the server runs `mlflow server --enable-workspaces`
    kfp_host: str = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    prometheus_url: str = "http://prometheus-operated.monitoring.svc.cluster.local:9090"  # canary metrics


@dataclass(frozen=True)
class Tenant:
    """One team: its name (= namespace), GPU share and the resources of its namespace."""

    name: str
    gpu: int = 0
    borrow: int = 0
    cpu: str = "16"
    memory: str = "64Gi"
    profile: bool = False
    owner: str | None = None
    port_block: int = 0
    source: str = ""

    @property
    def namespace(self) -> str:
        return self.name

    @property
    def cluster_queue(self) -> str:
        return f"driftloop-{self.name}"

    @property
    def queue(self) -> str:
        return self.name

    @property
    def model_name(self) -> str:
        return f"{self.name}-model"

    @property
    def gateway_port(self) -> int:
        return PORT_BASE + PORT_STEP * self.port_block

    @property
    def monitor_port(self) -> int:
        return PORT_BASE + PORT_STEP * self.port_block + 1


# --- files and where they live ------------------------------------------------------------------
def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def tenants_dir(infra: Path) -> Path:
    return Path(infra) / "tenants"


def _dump(docs: list[dict[str, Any]], comment: str = "", header: str = _HEADER) -> str:
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120) for d in docs)
    return header + (comment if comment else "") + body


def load_pool(infra: Path) -> Pool | None:
    path = tenants_dir(infra) / "pool.yaml"
    if not path.is_file():
        return None
    try:
        data = _load(path.read_text()) or {}
        return Pool(**data)
    except (yaml.YAMLError, TypeError) as exc:
        raise TenantError(f"{path}: not a pool file ({exc})") from exc


def load_tenants(infra: Path) -> list[Tenant]:
    """The tenants rendered under ``infra/tenants`` (one folder with a tenant.yaml each), by name."""
    root = tenants_dir(infra)
    out = []
    for spec in sorted(root.glob("*/tenant.yaml")) if root.is_dir() else []:
        try:
            data = _load(spec.read_text()) or {}
            out.append(Tenant(**data))
        except (yaml.YAMLError, TypeError) as exc:
            raise TenantError(f"{spec}: not a tenant file ({exc})") from exc
    return out


# --- rendering ------------------------------------------------------------------------------------
def _labels(t: Tenant, component: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/part-of": PART_OF, TENANT_LABEL: t.name}
    if component:
        labels["app.kubernetes.io/component"] = component
    return labels


def _meta(t: Tenant, name: str, component: str | None = None, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespaced:
        meta["namespace"] = t.namespace
    meta["labels"] = _labels(t, component)
    return meta


def quota_hard(t: Tenant) -> dict[str, str]:
    """The namespace's quota: GPUs cover the nominal share plus what it may borrow."""
    return {
        "requests.cpu": t.cpu,
        "requests.memory": t.memory,
        f"requests.{GPU}": str(t.gpu + t.borrow),
        "persistentvolumeclaims": "5",
        "pods": "50",
    }


def _namespace_docs(t: Tenant) -> list[dict[str, Any]]:
    if t.profile:
        return [{"apiVersion": "kubeflow.org/v1", "kind": "Profile", "metadata": _meta(t, t.namespace, namespaced=False),
                 "spec": {"owner": {"kind": "User", "name": t.owner}, "resourceQuotaSpec": {"hard": quota_hard(t)}}}]
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(t, t.namespace, namespaced=False)}]


def _quota_docs(t: Tenant) -> list[dict[str, Any]]:
    docs = []
    if not t.profile:  # a Profile's resourceQuotaSpec becomes the namespace's quota
        docs.append({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": _meta(t, "driftloop"),
                     "spec": {"hard": quota_hard(t)}})
    docs.append({"apiVersion": "v1", "kind": "LimitRange", "metadata": _meta(t, "driftloop"), "spec": {"limits": [{
        "type": "Container",
        "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
        "default": {"cpu": "500m", "memory": "512Mi"},
    }]}})
    return docs


def _role(t: Tenant, name: str, rules: list[dict[str, Any]], sa: str) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(t, name), "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(t, name),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": t.namespace}]},
    ]


def _rbac_docs(t: Tenant) -> list[dict[str, Any]]:
    def sa(name: str, component: str, automount: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(t, name, component)}
        if not automount:
            doc["automountServiceAccountToken"] = False
        return doc

    def rule(group: str, resource: str, verbs: list[str], names: list[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"apiGroups": [group], "resources": [resource]}  # fresh lists: no YAML anchors
        if names:
            out["resourceNames"] = names
        return {**out, "verbs": verbs}

    isvc = {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"]}
    return [
        sa("driftloop-pipeline", "pipeline"),
        sa("driftloop-monitor", "monitor", automount=False),
        sa("driftloop-rollout", "rollout-controller"),
        # pipeline runner: the Argo executor reports step outputs through workflowtaskresults
        *_role(t, "driftloop-pipeline-executor",
               [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]}],
               "driftloop-pipeline"),
        # deployer: the deploy step (a pipeline step) puts the canary on the tenant's InferenceService
        *_role(t, "driftloop-pipeline-deploy", [{**isvc, "verbs": list(DEPLOYER_VERBS)}], "driftloop-pipeline"),
        # distributed train step (model.distributed.workers > 1): a Kubeflow Trainer TrainJob in the tenant's
        # namespace (queued like the train step's pod), its nodes' logs, deleted on timeout; as infra/base
        *_role(t, "driftloop-pipeline-trainer", [
            rule("trainer.kubeflow.org", "trainjobs", ["create", "get", "watch", "delete"]),
            rule("trainer.kubeflow.org", "trainingruntimes", ["get", "list"]),
            rule("", "pods", ["get", "list"]),
            rule("", "pods/log", ["get"]),
        ], "driftloop-pipeline"),
        # monitor: its trigger starts runs through the KFP API (multi-user Kubeflow authorizes in this namespace)
        *_role(t, "driftloop-trigger-kfp", [
            {"apiGroups": ["pipelines.kubeflow.org"], "resources": ["runs", "experiments"], "verbs": ["create", "get", "list"]},
            {"apiGroups": ["pipelines.kubeflow.org"], "resources": ["pipelines", "pipelines/versions"], "verbs": ["get", "list"]},
        ], "driftloop-monitor"),
        # rollout controller: moves traffic on the tenant's InferenceService; the shadow phase creates the
        # shadow InferenceService and the Istio mirror and deletes them again, delete limited to those two
        # names (create cannot be limited by name in RBAC); as infra/base/rbac.yaml, in this namespace only
        *_role(t, "driftloop-rollout", [
            rule("serving.kserve.io", "inferenceservices", ["get", "watch", "patch", "update"]),
            rule("serving.kserve.io", "inferenceservices", ["create"]),
            rule("serving.kserve.io", "inferenceservices", ["delete"], [_SHADOW_SERVER]),
            rule("networking.istio.io", "virtualservices", ["get", "create"]),
            rule("networking.istio.io", "virtualservices", ["update", "delete"], [_MIRROR]),
        ], "driftloop-rollout"),
    ]


def _network_docs(t: Tenant) -> list[dict[str, Any]]:
    # The first rule admits every pod of the tenant's namespace and no other tenant's: among them what
    # reaches the monitor — the predictor's and the shadow's pods (KServe's logger), the rollout
    # controller (GET /quality, /shadow with the token) and pipeline steps (a batch's drift alert).
    return [{
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(t, "driftloop-tenant-ingress"),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {}}]},  # this namespace's own pods
                {"from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": NAME_LABEL, "operator": "In", "values": list(PLATFORM_NAMESPACES)}]}}]},
            ],
        },
    }]


def _queue_docs(t: Tenant, pool: Pool) -> list[dict[str, Any]]:
    gpu: dict[str, Any] = {"name": GPU, "nominalQuota": t.gpu}
    cpu: dict[str, Any] = {"name": "cpu", "nominalQuota": t.cpu}
    memory: dict[str, Any] = {"name": "memory", "nominalQuota": t.memory}
    spec: dict[str, Any] = {"namespaceSelector": {"matchLabels": {NAME_LABEL: t.namespace}}}
    if pool.cohort:
        spec["cohort"] = pool.cohort
        gpu["borrowingLimit"] = t.borrow
        cpu["borrowingLimit"] = 0  # only GPUs are shared; CPU and memory stay the team's own
        memory["borrowingLimit"] = 0
    spec.update({
        "queueingStrategy": "BestEffortFIFO",
        "resourceGroups": [{"coveredResources": ["cpu", "memory", GPU],
                            "flavors": [{"name": pool.flavor, "resources": [cpu, memory, gpu]}]}],
        # what a team lent comes back: its jobs may preempt borrowers in the cohort
        "preemption": {"reclaimWithinCohort": "Any", "borrowWithinCohort": {"policy": "Never"},
                       "withinClusterQueue": "LowerPriority"},
    })
    return [
        {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ClusterQueue",
         "metadata": _meta(t, t.cluster_queue, namespaced=False), "spec": spec},
        {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue", "metadata": _meta(t, t.queue),
         "spec": {"clusterQueue": t.cluster_queue}},
    ]


_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                 "seccompProfile": {"type": "RuntimeDefault"}}


def _pvc(t: Tenant, name: str, component: str, size: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(t, name, component),
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}}


def _deployment(t: Tenant, name: str, component: str, sa: str, container: dict[str, Any],
                volumes: list[dict[str, Any]], automount: bool = True) -> dict[str, Any]:
    selector = {"app.kubernetes.io/name": "driftloop", "app.kubernetes.io/component": component, TENANT_LABEL: t.name}
    pod: dict[str, Any] = {"serviceAccountName": sa}
    if not automount:
        pod["automountServiceAccountToken"] = False
    pod.update({"securityContext": _POD_SECURITY, "containers": [container], "volumes": volumes})
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {**_meta(t, name, component), "labels": {**_labels(t, component), "app.kubernetes.io/name": "driftloop"}},
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": {**selector, "app.kubernetes.io/part-of": PART_OF}},
                                  "spec": pod}}}


def _env_from() -> list[dict[str, Any]]:
    return [{"configMapRef": {"name": "driftloop-env"}},
            {"secretRef": {"name": "driftloop-mlflow", "optional": True}}]


def _config_volumes(data_claim: str, tmp: str) -> list[dict[str, Any]]:
    return [{"name": "config", "configMap": {"name": "driftloop-config"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": data_claim}},
            {"name": "tmp", "emptyDir": {"sizeLimit": tmp}}]


def _loop_docs(t: Tenant) -> list[dict[str, Any]]:
    mounts = [{"name": "config", "mountPath": "/etc/driftloop", "readOnly": True},
              {"name": "data", "mountPath": "/var/lib/driftloop"}, {"name": "tmp", "mountPath": "/tmp"}]
    base_env = [{"name": "DRIFTLOOP_CONFIG", "value": "/etc/driftloop/config.yaml"}, {"name": "HOME", "value": "/tmp"}]
    # the tenant's own webhook token: a Secret in its namespace, created with kubectl, never committed. The
    # monitor checks it; the rollout controller sends it to the monitor's GET /shadow (the shadow phase's join)
    webhook_token = {"name": "DRIFTLOOP_WEBHOOK_TOKEN",
                     "valueFrom": {"secretKeyRef": {"name": "driftloop-webhook", "key": "token"}}}
    monitor = {
        "name": "monitor", "image": DEFAULT_IMAGE, "args": ["monitor"],
        "ports": [{"name": "http", "containerPort": 8090, "protocol": "TCP"}],
        "env": base_env + [
            {"name": "KF_PIPELINES_SA_TOKEN_PATH", "value": "/var/run/secrets/kubeflow/pipelines/token"},
            webhook_token,
            # KServe's logger sends no header: /events without a token is accepted (the NetworkPolicy is the
            # boundary), a wrong one is refused; /feedback and the checks need the tenant's ingest token
            {"name": "DRIFTLOOP_EVENTS_AUTH", "value": "network"},
            {"name": "DRIFTLOOP_INGEST_TOKEN",
             "valueFrom": {"secretKeyRef": {"name": "driftloop-ingest", "key": "token", "optional": True}}},
        ],
        "envFrom": _env_from(),
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 15, "failureThreshold": 4},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
        "securityContext": _SECURITY,
        "volumeMounts": mounts + [{"name": "kfp-token", "mountPath": "/var/run/secrets/kubeflow/pipelines", "readOnly": True}],
    }
    kfp_token = {"name": "kfp-token", "projected": {"sources": [{"serviceAccountToken": {
        "path": "token", "audience": "pipelines.kubeflow.org", "expirationSeconds": 7200}}]}}
    rollout = {
        "name": "rollout", "image": DEFAULT_IMAGE, "command": ["/bin/sh", "-c"],
        "args": ['trap \'kill -TERM "$pid" 2>/dev/null; wait "$pid"; exit 0\' TERM INT\n'
                 'while :; do\n  driftloop rollout run & pid=$!; wait "$pid"\n'
                 '  sleep "$ROLLOUT_POLL_SECONDS" & pid=$!; wait "$pid"\ndone\n'],
        "env": base_env + [{"name": "ROLLOUT_POLL_SECONDS", "value": "30"}, webhook_token],
        "envFrom": _env_from(),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "1Gi"}},
        "securityContext": _SECURITY,
        "volumeMounts": mounts,
    }
    selector = {"app.kubernetes.io/name": "driftloop", "app.kubernetes.io/component": "monitor", TENANT_LABEL: t.name}
    return [
        _pvc(t, "driftloop-monitor-data", "monitor", "10Gi"),
        _pvc(t, "driftloop-rollout-state", "rollout-controller", "1Gi"),
        _deployment(t, "driftloop-monitor", "monitor", "driftloop-monitor", monitor,
                    _config_volumes("driftloop-monitor-data", "1Gi") + [kfp_token], automount=False),
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {**_meta(t, "driftloop-monitor", "monitor"),
                      "labels": {**_labels(t, "monitor"), "app.kubernetes.io/name": "driftloop"}},
         "spec": {"selector": selector, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}},
        _deployment(t, "driftloop-rollout", "rollout-controller", "driftloop-rollout", rollout,
                    _config_volumes("driftloop-rollout-state", "256Mi")),
    ]


def _monitor_url(t: Tenant, path: str) -> str:
    return f"http://driftloop-monitor.{t.namespace}.svc.cluster.local{path}"


def _isvc_docs(t: Tenant, pool: Pool) -> list[dict[str, Any]]:
    uri = f"models:/{t.model_name}@champion"
    env = [{"name": "MLFLOW_TRACKING_URI", "value": pool.mlflow_uri}]
    if pool.mlflow_workspaces:
        env.append({"name": "MLFLOW_WORKSPACE", "value": t.name})
    env.append({"name": "DRIFTLOOP_LOG_SCORES", "value": "1"})  # class scores in the logged answers
    return [{
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {**_meta(t, _MODEL_SERVER, "predictor"),
                     "annotations": {"serving.kserve.io/deploymentMode": "Serverless", "driftloop.io/model-uri": uri}},
        "spec": {"predictor": {
            "minReplicas": 1, "maxReplicas": 3, "scaleMetric": "concurrency", "scaleTarget": 10,
            # the request id in each event's metadata: the key of the shadow phase's join in the monitor
            "logger": {"mode": "all", "url": _monitor_url(t, "/events"), "metadataHeaders": [REQUEST_ID_HEADER]},
            "containers": [{
                "name": "kserve-container", "image": DEFAULT_IMAGE, "command": ["python", "-m", "serving.predictor"],
                "args": ["--model-name", _MODEL_SERVER, "--model-uri", uri, "--http-port", "8080",
                         "--host", "0.0.0.0", "--max-payload-bytes", "8388608"],
                "env": env,
                "envFrom": [{"secretRef": {"name": "driftloop-mlflow", "optional": True}}],
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8080}},
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        }},
    }]


def _monitoring_docs(t: Tenant) -> list[dict[str, Any]]:
    ns = t.namespace
    labels = {**_labels(t), "release": "kube-prometheus-stack"}
    return [
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
         "metadata": {**_meta(t, "driftloop-monitor"), "labels": labels},
         "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "driftloop", "app.kubernetes.io/component": "monitor",
                                               TENANT_LABEL: t.name}},
                  "namespaceSelector": {"matchNames": [ns]},
                  "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
         "metadata": {**_meta(t, "driftloop"), "labels": labels},
         "spec": {"groups": [{"name": f"driftloop.{t.name}.drift", "rules": [{
             "alert": "DriftloopDatasetDrift",
             "expr": f'max by (namespace, model) (driftloop_monitor_dataset_drift_share{{namespace="{ns}"}}) >= 0.5',
             "for": "10m",
             "labels": {"severity": "warning", "driftloop_action": "retrain"},
             "annotations": {"summary": f"Input drift on the served model of {t.name}"}}]},
             # the monitor's own needs-attention (a retrain left the degraded champion in place) goes to
             # people, never back to the trigger (infra/base/monitoring/prometheus-rule.yaml has the same)
             {"name": f"driftloop.{t.name}.loop", "rules": [{
                 "alert": "DriftloopNeedsAttention",
                 "expr": f'max by (namespace, model) (driftloop_monitor_needs_attention{{namespace="{ns}"}}) == 1',
                 "labels": {"severity": "critical", "driftloop_action": "notify"},
                 "annotations": {"summary": f"A retrain did not replace the degraded champion of {t.name}"}}]}]}},
        # The Prometheus Operator adds a namespace="<ns>" matcher to this route: only this
        # tenant's alerts reach this tenant's monitor, with this tenant's token.
        {"apiVersion": "monitoring.coreos.com/v1alpha1", "kind": "AlertmanagerConfig",
         "metadata": {**_meta(t, "driftloop-trigger"), "labels": {**_labels(t), "alertmanagerConfig": "driftloop"}},
         "spec": {"route": {"receiver": "driftloop-trigger", "groupBy": ["alertname", "namespace"], "groupWait": "30s",
                            "groupInterval": "5m", "repeatInterval": "6h",
                            "matchers": [{"name": "driftloop_action", "value": "retrain"}]},
                  "receivers": [{"name": "driftloop-trigger", "webhookConfigs": [{
                      "url": _monitor_url(t, "/alerts/alertmanager"), "sendResolved": False, "maxAlerts": 10,
                      "httpConfig": {"authorization": {"type": "Bearer",
                                                       "credentials": {"name": "driftloop-webhook", "key": "token"}}}}]}]}},
    ]


def cluster_config(t: Tenant, pool: Pool) -> dict[str, Any]:
    """The tenant's driftloop configuration on the cluster (mounted as driftloop-config)."""
    mlflow: dict[str, Any] = {"tracking_uri": pool.mlflow_uri, "experiment": t.name, "model_name": t.model_name}
    if pool.mlflow_workspaces:
        mlflow["workspace"] = t.name
    cfg: dict[str, Any] = {
        "project": t.name,
        "workspace": "/var/lib/driftloop",
        "data": {"source": t.source},
        "mlflow": mlflow,
        "kfp": {"host": pool.kfp_host, "namespace": t.namespace, "experiment": t.name, "pipeline_name": "driftloop-train",
                "mlflow_secret": "driftloop-mlflow", "service_account": "driftloop-pipeline", "queue_name": t.queue},
        "serving": {"name": _MODEL_SERVER, "namespace": t.namespace, "logger_url": _monitor_url(t, "/events")},
        "rollout": {"prometheus_url": pool.prometheus_url},
        "monitor": {"host": "0.0.0.0", "port": 8090, "store": "/var/lib/driftloop/monitor/inference.db"},
    }
    if t.gpu + t.borrow > 0:
        cfg["model"] = {"learner": "xgboost", "gpu": True, "accelerator_limit": 1}
    return cfg


def local_config(t: Tenant, tenant_dir: Path, repo_root: Path) -> dict[str, Any]:
    """The tenant's loop on the embedded default: own workspace (MLflow store, monitor and
    schedule stores inside it), own ports, own model name."""
    workspace = os.path.relpath(repo_root / ".driftloop" / "tenants" / t.name, tenant_dir)
    cfg: dict[str, Any] = {
        "project": t.name,
        "workspace": workspace,
        "mlflow": {"experiment": t.name, "model_name": t.model_name},
        "serving": {"name": t.model_name, "gateway_port": t.gateway_port},
        "monitor": {"port": t.monitor_port},
    }
    if t.source:
        cfg["data"] = {"source": t.source}
    return cfg


def _kustomization(t: Tenant, pool: Pool) -> dict[str, Any]:
    env = [f"DRIFTLOOP_SERVING__NAMESPACE={t.namespace}"]
    if pool.mlflow_workspaces:
        env.append(f"MLFLOW_WORKSPACE={t.name}")
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": list(_RESOURCE_FILES),
        "configMapGenerator": [
            {"name": "driftloop-config", "namespace": t.namespace, "files": ["config.yaml=config/driftloop.yaml"]},
            {"name": "driftloop-env", "namespace": t.namespace, "literals": env},
        ],
    }


_RESOURCE_FILES = ("namespace.yaml", "quota.yaml", "rbac.yaml", "network-policy.yaml", "queue.yaml", "loop.yaml",
                   "inference-service.yaml", "monitoring.yaml")


def render_objects(t: Tenant, pool: Pool) -> dict[str, list[dict[str, Any]]]:
    """The tenant's Kubernetes objects by file name (before kustomize adds the ConfigMaps)."""
    return {
        "namespace.yaml": _namespace_docs(t),
        "quota.yaml": _quota_docs(t),
        "rbac.yaml": _rbac_docs(t),
        "network-policy.yaml": _network_docs(t),
        "queue.yaml": _queue_docs(t, pool),
        "loop.yaml": _loop_docs(t),
        "inference-service.yaml": _isvc_docs(t, pool),
        "monitoring.yaml": _monitoring_docs(t),
    }


def render_tenant(t: Tenant, pool: Pool, tenant_dir: Path, repo_root: Path) -> dict[str, str]:
    """Every file of ``infra/tenants/<name>/``: relative path → text."""
    files = {name: _dump(docs) for name, docs in render_objects(t, pool).items()}
    files["kustomization.yaml"] = _dump([_kustomization(t, pool)])
    files["config/driftloop.yaml"] = _dump(
        [cluster_config(t, pool)],
        header=_CONFIG_HEADER,
        comment="# driftloop configuration of this tenant on the cluster (driftloop-config). No secrets: MLflow\n"
                "# credentials come from the Secret driftloop-mlflow, the webhook token from driftloop-webhook.\n")
    files["local.yaml"] = _dump(
        [local_config(t, tenant_dir, repo_root)],
        header=_CONFIG_HEADER,
        comment="# This tenant's loop on the embedded default (no cluster): `driftloop run train|serve|monitor -c <this file>`.\n"
                "# Its own workspace (MLflow store, inference log, schedules), ports and model name.\n")
    spec = asdict(t)
    files["tenant.yaml"] = _dump([spec], "# What `driftloop tenant add` was asked for (read by `tenant list` and the checks).\n")
    return files


def render_shared(pool: Pool) -> dict[str, str]:
    """``infra/tenants/shared/``: the ResourceFlavor every tenant's ClusterQueue names, rendered once."""
    flavor = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ResourceFlavor",
              "metadata": {"name": pool.flavor, "labels": {"app.kubernetes.io/part-of": PART_OF}},
              "spec": {"nodeLabels": {}}}
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": ["resource-flavor.yaml"]}
    return {"resource-flavor.yaml": _dump([flavor]), "kustomization.yaml": _dump([kustomization])}


def _pool_text(pool: Pool) -> str:
    return ("# The cluster's GPU pool shared by the tenants (driftloop tenant add --pool-gpus/--cohort made it).\n"
            "# gpus: nominal quotas of all tenants together may not exceed it; cohort: the Kueue cohort in which\n"
            "# tenants borrow idle GPUs (null: no borrowing); mlflow_workspaces: the tracking server runs with\n"
            "# --enable-workspaces (else tenants are kept apart by experiment and model names and MLflow permissions).\n"
            + yaml.safe_dump(asdict(pool), sort_keys=False))


# --- validation and the operations -----------------------------------------------------------------
def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name or ""):
        raise TenantError(f"tenant name {name!r} is not a DNS label (lowercase letters, digits and '-', "
                          "starting and ending with a letter or digit)")
    if len(name) < 2 or len(name) > _MAX_NAME:
        raise TenantError(f"tenant name {name!r} must have 2 to {_MAX_NAME} characters")
    if name in RESERVED_NAMES or name.startswith("kube-") or name.startswith("openshift"):
        raise TenantError(f"tenant name {name!r} is reserved (a platform namespace or driftloop's own)")


def plan_add(infra: Path, name: str, *, gpu: int = 0, borrow: int = 0, cpu: str = "16", memory: str = "64Gi",
             profile: bool = False, owner: str | None = None, source: str = "", pool_gpus: int | None = None,
             cohort: str | None = None) -> tuple[Pool, Tenant, bool]:
    """Validate an ``add`` against what exists; (pool, tenant, pool is new). Writes nothing.

    ``pool_gpus`` and ``cohort`` describe the pool on the first add only (cohort None: the default
    cohort "driftloop"; "": no cohort, so no borrowing)."""
    _check_name(name)
    if gpu < 0 or borrow < 0:
        raise TenantError(f"--gpu and --borrow must be >= 0, got {gpu} and {borrow}")
    for flag, value in (("--cpu", cpu), ("--memory", memory)):
        if not _QUANTITY.fullmatch(str(value)):
            raise TenantError(f"{flag} {value!r} is not a Kubernetes quantity like 16, 500m or 64Gi")
    if profile and not (owner and owner.strip()):
        raise TenantError("--profile needs --owner (the Kubeflow user who owns the profile, e.g. an email)")
    if owner and not profile:
        raise TenantError("--owner is only used with --profile")
    existing = load_tenants(infra)
    if any(t.name == name for t in existing) or (tenants_dir(infra) / name).exists():
        raise TenantError(f"tenant {name!r} already exists ({tenants_dir(infra) / name}); remove it first")
    pool = load_pool(infra)
    new_pool = pool is None
    if pool is None:
        if pool_gpus is None:
            raise TenantError("no GPU pool yet: the first `tenant add` needs --pool-gpus N (the cluster's shared GPUs)")
        if pool_gpus < 0:
            raise TenantError(f"--pool-gpus must be >= 0, got {pool_gpus}")
        cohort = DEFAULT_COHORT if cohort is None else cohort
        if cohort and not _DNS_LABEL.fullmatch(cohort):
            raise TenantError(f"cohort {cohort!r} is not a DNS label")
        pool = Pool(gpus=pool_gpus, cohort=cohort or None)
    elif pool_gpus is not None and pool_gpus != pool.gpus:
        raise TenantError(f"the pool already has {pool.gpus} GPUs ({tenants_dir(infra) / 'pool.yaml'}); "
                          "--pool-gpus is only for the first tenant")
    elif cohort is not None and (cohort or None) != pool.cohort:
        raise TenantError(f"the pool's cohort is {pool.cohort!r} ({tenants_dir(infra) / 'pool.yaml'}); "
                          "--cohort is only for the first tenant")
    if borrow > 0 and not pool.cohort:
        raise TenantError(f"--borrow {borrow} needs a cohort to borrow from, and the pool has none "
                          f"(set cohort in {tenants_dir(infra) / 'pool.yaml'})")
    used = sum(t.gpu for t in existing)
    if used + gpu > pool.gpus:
        raise TenantError(f"--gpu {gpu} does not fit the pool: {pool.gpus} GPUs, {used} already given to "
                          f"{len(existing)} tenant(s), {pool.gpus - used} left")
    if gpu + borrow > pool.gpus:
        raise TenantError(f"--gpu {gpu} plus --borrow {borrow} exceeds the pool of {pool.gpus} GPUs")
    taken = {t.port_block for t in existing}
    block = next(k for k in range(len(taken) + 1) if k not in taken)
    tenant = Tenant(name=name, gpu=gpu, borrow=borrow, cpu=str(cpu), memory=str(memory), profile=profile,
                    owner=owner if profile else None, port_block=block, source=source)
    return pool, tenant, new_pool


def add_tenant(infra: Path, name: str, **options: Any) -> Path:
    """Validate, render and write ``infra/tenants/<name>/`` (and the pool and shared folder when new)."""
    infra = Path(infra)
    pool, tenant, new_pool = plan_add(infra, name, **options)
    root = tenants_dir(infra)
    target = root / name
    files = render_tenant(tenant, pool, target, infra.resolve().parent)
    for rel, text in files.items():  # every file must load before any is written
        if rel.endswith("driftloop.yaml") or rel == "local.yaml":
            _check_config(text, target / rel)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        for rel, text in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text)
        if new_pool:
            (root / "pool.yaml").write_text(_pool_text(pool))
        shared = root / "shared"
        for rel, text in render_shared(pool).items():
            if not (shared / rel).exists() or new_pool:
                shared.mkdir(parents=True, exist_ok=True)
                (shared / rel).write_text(text)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _check_config(text: str, where: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / where.name
        path.write_text(text)
        try:
            load_settings(path, environ={})
        except ConfigError as exc:  # a bug of the renderer, never the user's
            raise TenantError(f"{where}: the rendered configuration does not load: {exc}") from exc


def remove_tenant(infra: Path, name: str) -> Path:
    """Delete ``infra/tenants/<name>/`` and nothing else (pool and shared folder stay)."""
    _check_name(name)
    target = tenants_dir(infra) / name
    if not (target / "tenant.yaml").is_file():
        raise TenantError(f"no tenant {name!r} in {tenants_dir(infra)}")
    shutil.rmtree(target)
    return target


# --- what must hold over any set of tenants -------------------------------------------------------
def load_rendered(infra: Path) -> dict[str, list[dict[str, Any]]]:
    """Each tenant's objects as written under ``infra/tenants/<name>/`` (what kustomize reads)."""
    out = {}
    for t in load_tenants(infra):
        folder = tenants_dir(infra) / t.name
        out[t.name] = [doc for f in _RESOURCE_FILES for doc in yaml.load_all((folder / f).read_text(), Loader=_Loader)
                       if isinstance(doc, dict)]
    return out


def _selects_only(selector: dict[str, Any] | None, allowed: set[str]) -> bool:
    """A namespaceSelector that can only match namespaces named in ``allowed``."""
    if not selector:
        return False  # {} selects every namespace
    names: set[str] | None = None
    if NAME_LABEL in (selector.get("matchLabels") or {}):
        names = {selector["matchLabels"][NAME_LABEL]}
    for expr in selector.get("matchExpressions") or []:
        if expr.get("key") == NAME_LABEL and expr.get("operator") == "In":
            values = set(expr.get("values") or [])
            names = values if names is None else names & values
    return names is not None and names <= allowed


class _Findings:
    """The problems found so far, and which tenant owns each thing that must be one tenant's alone."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._owners: dict[str, dict[Any, str]] = {}

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def unique(self, kind: str, key: Any, owner: str) -> None:
        other = self._owners.setdefault(kind, {}).get(key)
        if other is not None and other != owner:
            self.add(f"{kind} {key} is shared by tenants {other} and {owner}")
        self._owners[kind][key] = owner


def check_invariants(pool: Pool, tenants: list[Tenant], objects: dict[str, list[dict[str, Any]]],
                     configs: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Everything that keeps tenants apart and within the pool; one line per violation."""
    found = _Findings()
    nominal = sum(t.gpu for t in tenants)
    if nominal > pool.gpus:
        found.add(f"nominal GPU quotas add up to {nominal}, over the pool of {pool.gpus}")
    for t in tenants:
        objs = objects.get(t.name, [])
        if t.namespace in {o.name for o in tenants if o is not t}:
            found.add(f"{t.name}: namespace {t.namespace} is another tenant's")
        for obj in objs:
            _check_object(found, pool, t, obj)
        kinds = {o.get("kind") for o in objs}
        if objs and not {"LocalQueue", "ClusterQueue", "NetworkPolicy"} <= kinds:
            found.add(f"{t.name}: missing {sorted({'LocalQueue', 'ClusterQueue', 'NetworkPolicy'} - kinds)}")
        for flavor, cfg in (configs or {}).get(t.name, {}).items():
            _check_loop_config(found, t, flavor, cfg)
    return found.problems


def _check_object(found: _Findings, pool: Pool, t: Tenant, obj: dict[str, Any]) -> None:
    """One rendered object of tenant ``t``: its scope and label, its kind's rules, its containers, no Secret values."""
    ns = t.namespace
    kind, meta = obj.get("kind"), obj.get("metadata") or {}
    what = f"{t.name}: {kind} {meta.get('name')}"
    if kind in CLUSTER_SCOPED_KINDS:
        if "namespace" in meta:
            found.add(f"{what}: cluster-scoped kind with a namespace")
        found.unique(f"cluster-scoped {kind}", meta.get("name"), t.name)
        if kind in ("Namespace", "Profile") and meta.get("name") != ns:
            found.add(f"{what}: not the tenant's namespace {ns}")
    elif meta.get("namespace") != ns:
        found.add(f"{what}: in namespace {meta.get('namespace')}, not {ns}")
    if (meta.get("labels") or {}).get(TENANT_LABEL) != t.name:
        found.add(f"{what}: label {TENANT_LABEL} is not {t.name}")
    check = _KIND_CHECKS.get(kind)
    if check is not None:
        check(found, pool, t, obj, what)
    for path, container in _containers(obj):
        for env in container.get("env") or []:
            ref = ((env.get("valueFrom") or {}).get("secretKeyRef") or {})
            if env.get("name") == "DRIFTLOOP_WEBHOOK_TOKEN":
                found.unique("webhook token Secret", (ns, ref.get("name")), t.name)
            if env.get("name") == "MLFLOW_WORKSPACE" and env.get("value") != t.name:
                found.add(f"{what}: {path} uses MLflow workspace {env.get('value')}")
    if kind == "Secret" and (obj.get("data") or obj.get("stringData")):
        found.add(f"{what}: a Secret with values is rendered")


def _check_rbac(found: _Findings, pool: Pool, t: Tenant, obj: dict[str, Any], what: str) -> None:
    """ServiceAccounts are the tenant's own; RoleBindings bind a Role of its namespace to its ServiceAccounts;
    nothing cluster-wide."""
    kind, meta = obj.get("kind"), obj.get("metadata") or {}
    if kind == "ServiceAccount":
        found.unique("ServiceAccount", (meta.get("namespace"), meta.get("name")), t.name)
    elif kind == "RoleBinding":
        if (obj.get("roleRef") or {}).get("kind") != "Role":
            found.add(f"{what}: binds a {obj['roleRef'].get('kind')}, not a Role of its namespace")
        for s in obj.get("subjects") or []:
            if s.get("kind") != "ServiceAccount" or s.get("namespace") != t.namespace:
                found.add(f"{what}: subject {s.get('kind')} {s.get('namespace')}/{s.get('name')} "
                          f"is not a ServiceAccount of {t.namespace}")
    else:
        found.add(f"{what}: cluster-wide RBAC")


def _check_network_policy(found: _Findings, pool: Pool, t: Tenant, obj: dict[str, Any], what: str) -> None:
    """Peers are the tenant's namespace or the platform's, never an ipBlock."""
    spec = obj.get("spec") or {}
    allowed = {t.namespace, *PLATFORM_NAMESPACES}
    for rule in (spec.get("ingress") or []) + (spec.get("egress") or []):
        for peer in (rule.get("from") or []) + (rule.get("to") or []):
            if "ipBlock" in peer:
                found.add(f"{what}: ipBlock peers can reach other tenants")
            if "namespaceSelector" in peer and not _selects_only(peer["namespaceSelector"], allowed):
                found.add(f"{what}: a namespaceSelector that may match other tenants' namespaces")


def _check_cluster_queue(found: _Findings, pool: Pool, t: Tenant, obj: dict[str, Any], what: str) -> None:
    """The tenant's own ClusterQueue: its namespace only, the pool's cohort, its nominal and borrowed GPUs."""
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    found.unique("ClusterQueue", meta.get("name"), t.name)
    if spec.get("namespaceSelector") != {"matchLabels": {NAME_LABEL: t.namespace}}:
        found.add(f"{what}: namespaceSelector does not select exactly {t.namespace}")
    if spec.get("cohort") != pool.cohort:
        found.add(f"{what}: cohort {spec.get('cohort')} is not the pool's {pool.cohort}")
    for group in spec.get("resourceGroups") or []:
        for flavor in group.get("flavors") or []:
            for res in flavor.get("resources") or []:
                if res.get("name") != GPU:
                    continue
                if res.get("nominalQuota") != t.gpu:
                    found.add(f"{what}: GPU nominalQuota {res.get('nominalQuota')} != {t.gpu}")
                if res.get("borrowingLimit", 0) != t.borrow:
                    found.add(f"{what}: GPU borrowingLimit {res.get('borrowingLimit')} != {t.borrow}")
                if "borrowingLimit" in res and not pool.cohort:
                    found.add(f"{what}: borrowingLimit without a cohort")


def _check_local_queue(found: _Findings, pool: Pool, t: Tenant, obj: dict[str, Any], what: str) -> None:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    found.unique("LocalQueue", meta.get("name"), t.name)
    if spec.get("clusterQueue") != t.cluster_queue:
        found.add(f"{what}: points at ClusterQueue {spec.get('clusterQueue')}, not {t.cluster_queue}")


def _check_quota(found: _Findings, pool: Pool, t: Tenant, obj: dict[str, Any], what: str) -> None:
    """A ResourceQuota (or a Profile's) covers the tenant's nominal plus borrowed GPUs."""
    spec = obj.get("spec") or {}
    hard = (spec.get("resourceQuotaSpec") or {}).get("hard") if obj.get("kind") == "Profile" else spec.get("hard")
    gpus = int(str((hard or {}).get(f"requests.{GPU}", "0")))
    if gpus < t.gpu + t.borrow:
        found.add(f"{what}: quota of {gpus} GPUs does not cover nominal {t.gpu} + borrowed {t.borrow}")


def _check_monitoring(found: _Findings, pool: Pool, t: Tenant, obj: dict[str, Any], what: str) -> None:
    """Scrapes stay in the tenant's namespace; alerts go to its own monitor with its own token Secret."""
    ns, spec = t.namespace, obj.get("spec") or {}
    if obj.get("kind") == "ServiceMonitor":
        if (spec.get("namespaceSelector") or {}) != {"matchNames": [ns]}:
            found.add(f"{what}: scrapes outside {ns}")
        return
    for receiver in spec.get("receivers") or []:
        for hook in receiver.get("webhookConfigs") or []:
            if f".{ns}.svc" not in hook.get("url", ""):
                found.add(f"{what}: sends alerts to {hook.get('url')}, not to {ns}'s monitor")
            cred = ((hook.get("httpConfig") or {}).get("authorization") or {}).get("credentials") or {}
            found.unique("webhook token Secret", (ns, cred.get("name")), t.name)


# kind -> what must hold of an object of that kind (besides scope, label, containers and Secret values)
_KIND_CHECKS = {
    "ServiceAccount": _check_rbac, "RoleBinding": _check_rbac, "ClusterRole": _check_rbac,
    "ClusterRoleBinding": _check_rbac, "NetworkPolicy": _check_network_policy, "ClusterQueue": _check_cluster_queue,
    "LocalQueue": _check_local_queue, "ResourceQuota": _check_quota, "Profile": _check_quota,
    "ServiceMonitor": _check_monitoring, "AlertmanagerConfig": _check_monitoring,
}


def _check_loop_config(found: _Findings, t: Tenant, flavor: str, cfg: dict[str, Any]) -> None:
    """A tenant's driftloop configuration (``cluster`` or ``local``): its own MLflow space, model name,
    namespace and queue on the cluster, workspace folder and ports on the embedded default."""
    ns = t.namespace
    mlflow = cfg.get("mlflow") or {}
    found.unique(f"{flavor} MLflow experiment", (mlflow.get("tracking_uri"), mlflow.get("workspace"),
                                                 mlflow.get("experiment")), t.name)
    found.unique(f"{flavor} model name", mlflow.get("model_name"), t.name)
    if mlflow.get("workspace"):
        found.unique(f"{flavor} MLflow workspace", mlflow.get("workspace"), t.name)
    if flavor == "cluster":
        kfp = cfg.get("kfp") or {}
        if kfp.get("namespace") != ns or (cfg.get("serving") or {}).get("namespace") != ns:
            found.add(f"{t.name}: cluster config runs outside namespace {ns}")
        if kfp.get("queue_name") != t.queue:
            found.add(f"{t.name}: cluster config uses queue {kfp.get('queue_name')}, not {t.queue}")
    else:
        found.unique("local workspace", cfg.get("workspace"), t.name)
        found.unique("local port", (cfg.get("serving") or {}).get("gateway_port"), t.name)
        found.unique("local port", (cfg.get("monitor") or {}).get("port"), t.name)


def _containers(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = obj.get("spec") or {}
    out = []
    for base, pod in (("spec.template.spec", (spec.get("template") or {}).get("spec") or {}),
                      ("spec.predictor", spec.get("predictor") or {})):
        for i, c in enumerate(pod.get("containers") or []):
            out.append((f"{base}.containers[{i}]", c))
    return out


def tenant_problems(infra: Path) -> list[str]:
    """:func:`check_invariants` over the tenants written under ``infra/tenants`` (none: no problems)."""
    tenants = load_tenants(infra)
    if not tenants:
        return []
    pool = load_pool(infra)
    if pool is None:
        return [f"{tenants_dir(infra) / 'pool.yaml'}: missing (tenants exist)"]
    configs = {}
    for t in tenants:
        folder = tenants_dir(infra) / t.name
        configs[t.name] = {"cluster": _load((folder / "config" / "driftloop.yaml").read_text()) or {},
                           "local": _resolved_local(folder / "local.yaml")}
    return check_invariants(pool, tenants, load_rendered(infra), configs)


def _resolved_local(path: Path) -> dict[str, Any]:
    cfg = _load(path.read_text()) or {}
    if "workspace" in cfg:
        cfg["workspace"] = str((path.parent / cfg["workspace"]).resolve())
    return cfg
