"""What every model of a rendered install needs from the manifests beside it (used by :mod:`driftloop.app.infra_check`).

The configuration ConfigMap of a build holds a one-model file or a fleet file (docs/fleet.md); either loads
as a :class:`~driftloop.core.fleet.Fleet` (a one-model file as a fleet of one). For each of its models:

* its namespace (``serving.namespace``, a team's namespace on a fleet) is in the render, as a Namespace or
  a Kubeflow Profile;
* its inference logger (``serving.logger_url``), when it names a Service of the cluster
  (``<service>.<namespace>.svc[.cluster.local]``), names one of the render, on one of its ports, at the
  model's path on that monitor (``monitor.base_path`` + ``/events``);
* the NetworkPolicies of that Service's namespace admit the model's predictor pods (and its shadow's,
  during a shadow phase) to the monitor's port: KServe's logger sends no token, so the policy is the
  boundary, and a model it leaves out loses its whole inference log without an error anywhere.

Each problem is one line naming the key of the configuration it comes from (``models.<name>.…`` in a
fleet file).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from driftloop.core.errors import ConfigError
from driftloop.core.fleet import Fleet, FleetModel, load_fleet
from driftloop.core.shadow import shadow_name

__all__ = ["fleet_from_text", "model_problems", "selector_matches"]

NAME_LABEL = "kubernetes.io/metadata.name"
ISVC_LABEL = "serving.kserve.io/inferenceservice"  # KServe labels an InferenceService's pods with its name


def fleet_from_text(key: str, text: str, environ: dict[str, str]) -> Fleet:
    """Load the configuration file ``key`` of a ConfigMap (its ``text``) as a fleet; a ConfigError names ``key``,
    never the temporary file it was read from."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / key
        path.write_text(text)
        try:
            return load_fleet(path, environ=environ)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(path), key).replace(tmp, ".")) from exc


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (``matchLabels``, ``matchExpressions``) against ``labels``; ``{}`` matches all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}.get(op, False)
        if not ok:
            return False
    return True


def _find(objects: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    for obj in objects:
        meta = obj.get("metadata") or {}
        if obj.get("kind") == kind and meta.get("name") == name and (namespace is None or meta.get("namespace") == namespace):
            return obj
    return None


def _namespace_labels(objects: list[dict[str, Any]], namespace: str) -> dict[str, str]:
    ns = _find(objects, "Namespace", namespace) or {}
    return {**((ns.get("metadata") or {}).get("labels") or {}), NAME_LABEL: namespace}


class _Monitor:
    """The Service a logger URL names, the pods behind it and the container port the URL reaches."""

    def __init__(self, service: dict[str, Any], objects: list[dict[str, Any]], url_port: int) -> None:
        self.namespace = service["metadata"].get("namespace")
        selector = (service.get("spec") or {}).get("selector") or {}
        ports = (service.get("spec") or {}).get("ports") or []
        entry = next((p for p in ports if p.get("port") == url_port), None)
        self.service_port = entry
        self.pod_labels: dict[str, str] | None = None
        self.ports: set[Any] = set()
        for obj in objects:
            template = (obj.get("spec") or {}).get("template") or {}
            labels = (template.get("metadata") or {}).get("labels") or {}
            if obj.get("kind") != "Deployment" or obj["metadata"].get("namespace") != self.namespace \
                    or not selector or not selector_matches({"matchLabels": selector}, labels):
                continue
            self.pod_labels = labels
            target = (entry or {}).get("targetPort", url_port)
            for c in (template.get("spec") or {}).get("containers") or []:
                for p in c.get("ports") or []:
                    if target in (p.get("name"), p.get("containerPort")):
                        self.ports = {p.get("name"), p.get("containerPort")} - {None}
            if not self.ports:
                self.ports = {target}

    def admits(self, objects: list[dict[str, Any]], namespace: str, pod_labels: dict[str, str]) -> bool:
        """Whether the NetworkPolicies of the monitor's namespace let these pods reach the monitor's port."""
        if self.pod_labels is None:
            return True  # no pods behind the Service in this render: nothing to judge
        policies = [p for p in objects if p.get("kind") == "NetworkPolicy"
                    and p["metadata"].get("namespace") == self.namespace
                    and "Ingress" in ((p.get("spec") or {}).get("policyTypes") or ["Ingress"])
                    and selector_matches((p.get("spec") or {}).get("podSelector"), self.pod_labels)]
        if not policies:
            return True  # no policy isolates the monitor's pods
        ns_labels = _namespace_labels(objects, namespace)
        for policy in policies:
            for rule in (policy.get("spec") or {}).get("ingress") or []:
                ports = rule.get("ports")
                if ports and not any(p.get("port") is None or p.get("port") in self.ports for p in ports):
                    continue
                peers = rule.get("from")
                if not peers or any(self._peer_admits(peer, namespace, ns_labels, pod_labels) for peer in peers):
                    return True
        return False

    def _peer_admits(self, peer: dict[str, Any], namespace: str, ns_labels: dict[str, str],
                     pod_labels: dict[str, str]) -> bool:
        if "ipBlock" in peer:
            return False
        if "namespaceSelector" in peer:
            if not selector_matches(peer["namespaceSelector"], ns_labels):
                return False
        elif namespace != self.namespace:
            return False  # a peer without namespaceSelector selects pods of the policy's own namespace
        return selector_matches(peer.get("podSelector"), pod_labels)


def _cluster_service(host: str) -> tuple[str, str] | None:
    """(service, namespace) of an in-cluster host name, None for any other host."""
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc" and (len(parts) == 3 or parts[3:] == ["cluster", "local"]):
        return parts[0], parts[1]
    return None


def _model_problems(m: FleetModel, key: str, objects: list[dict[str, Any]]) -> list[str]:
    s = m.settings
    ns = s.serving.namespace
    out = []
    if _find(objects, "Namespace", ns) is None and _find(objects, "Profile", ns) is None:
        out.append(f"{key}serving.namespace: namespace {ns} of model {m.name} is not in this render "
                   "(no Namespace or Profile of that name)")
    url = urlsplit(s.serving.logger_url)
    found = _cluster_service(url.hostname or "")
    if found is None:
        return out
    name, svc_ns = found
    service = _find(objects, "Service", name, svc_ns)
    if service is None:
        return out + [f"{key}serving.logger_url: {s.serving.logger_url} names Service {svc_ns}/{name}, which is not "
                      "in this render"]
    port = url.port or (443 if url.scheme == "https" else 80)
    monitor = _Monitor(service, objects, port)
    if monitor.service_port is None:
        out.append(f"{key}serving.logger_url: Service {svc_ns}/{name} has no port {port}")
    events = f"{s.monitor.base_path}/events"
    if url.path != events:
        out.append(f"{key}serving.logger_url: path {url.path or '/'} is not model {m.name}'s events path on the "
                   f"monitor ({events}, monitor.base_path + /events)")
    pods = [s.serving.name] + ([shadow_name(s.serving.name)] if s.rollout.shadow_percent > 0 else [])
    for pod in pods:
        if not monitor.admits(objects, ns, {ISVC_LABEL: pod}):
            out.append(f"{key}serving.logger_url: no NetworkPolicy of namespace {svc_ns} admits the predictor pods of "
                       f"{ns}/{pod} ({ISVC_LABEL}={pod}) to the monitor's port {'/'.join(map(str, sorted(monitor.ports, key=str)))}")
    return out


def model_problems(fleet: Fleet, objects: list[dict[str, Any]]) -> list[str]:
    """Every model's namespace, logger Service and path, and NetworkPolicy admission, against ``objects``."""
    out: list[str] = []
    for m in fleet.models:
        out += _model_problems(m, "" if fleet.single else f"models.{m.name}.", objects)
    return out
