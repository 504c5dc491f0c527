"""The serving columns of ``driftloop status``: replicas, error rate and p99 of each model, read from what
serves it (docs/fleet.md, "The view").

Each model is read through its serving backend (:func:`serving.backend.backend_for`):

* the embedded default: the model's serving state (its model-server processes: primary, its replicas and a
  canary) and the running gateway's ``GET /admin/stats`` over the last :data:`WINDOW_S` seconds, read by the
  rollout controller's own reader (:class:`serving.rollout.GatewayTarget`);
* a cluster: the InferenceService (``status.components.predictor``, parsed by
  :func:`serving.kserve_backend.parse_status`), the ready replicas of the Knative revisions that take its
  traffic (``status.actualReplicas``; in RawDeployment mode the ``<name>-predictor`` Deployment's
  ``status.readyReplicas``), and error rate and p99 from the Prometheus queries the rollout controller uses
  (:class:`serving.rollout.PrometheusMetrics`) where ``rollout.prometheus_url`` is set.

Cluster reads are grouped by kube context (``serving.kube_context``; None: the kubeconfig's current one):
one ``kubernetes`` ApiClient per context, no retries, every call bounded by the caller's timeout, each
context in a thread of its own. A context that cannot be reached (unknown context, connection refused, TLS,
no answer in time) marks each of its models ``cluster <context> unreachable: <reason>``; every other model
is still read. A model nothing serves is ``not served``, not an error.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from driftloop.core.fleet import FleetModel

__all__ = ["WINDOW_S", "TIMEOUT_S", "CURRENT_CONTEXT", "context_name", "serving_cell", "serving_view",
           "unreachable_reason"]

log = logging.getLogger(__name__)

#: the window (seconds) error rate and p99 are read over
WINDOW_S = 300.0
#: default seconds a cluster, a gateway or Prometheus may take to answer one read
TIMEOUT_S = 3.0
#: the ``clusters`` key of models that name no context where the kubeconfig has no current one
CURRENT_CONTEXT = "(current context)"

_KNATIVE = ("serving.knative.dev", "v1", "revisions")
_RAW_DEPLOYMENT = "RawDeployment"
_DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"


def _fields(**kw: Any) -> dict[str, Any]:
    row = {"replicas": None, "error_rate": None, "p99_ms": None, "requests": None, "serving_error": None,
           "served": False, "home": None, "kube_context": None}
    row.update(kw)
    return row


def _bound(timeout: float) -> tuple[float, float]:
    """A kubernetes client ``_request_timeout``: (connect, read); a plain number (urllib3's ``total``) does
    not bound a TLS handshake that never answers."""
    return (timeout, timeout)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _combine(sides: Iterable[dict[str, Any] | None]) -> tuple[int, float | None, float | None]:
    """(requests, error rate, p99 ms) over versions or revisions: errors over all requests, the highest p99."""
    sides = [s for s in sides if s]
    requests = sum(int(s.get("requests") or 0) for s in sides)
    errors = sum((s.get("error_rate") or 0.0) * int(s.get("requests") or 0) for s in sides)
    p99 = max((float(s["p99_ms"]) for s in sides if s.get("p99_ms") is not None), default=None)
    return requests, (errors / requests if requests else None), p99


# -- the embedded default ------------------------------------------------------------------------------------
def _read_local(model: FleetModel, backend: Any, timeout: float, now: float) -> dict[str, Any]:
    from serving.rollout import GatewayTarget

    s = model.settings
    processes = backend.processes
    if not (s.workspace_dir / "serving" / "state.json").is_file():  # never served: read without writing
        return _fields(home=backend.home, replicas=0)
    state = processes.status()
    gateway, primary, canary = state.get("gateway"), state.get("primary"), state.get("canary")
    if not gateway or not primary:
        return _fields(home=backend.home, replicas=0)
    replicas = 1 + len(state.get("replicas") or []) + (1 if canary else 0)
    target = GatewayTarget(gateway["url"], timeout=timeout, token=processes.admin_token())
    try:
        canary_stats, primary_stats = target.stats(now - WINDOW_S, (canary or primary)["version"],
                                                   primary["version"])
    finally:
        target._http.close()  # noqa: SLF001 - the target's one HTTP client, made for this read
    requests, error_rate, p99 = _combine([primary_stats, canary_stats if canary else None])
    return _fields(home=backend.home, served=True, replicas=replicas, requests=requests, error_rate=error_rate,
                   p99_ms=p99)


# -- clusters ------------------------------------------------------------------------------------------------
class _InferenceServices:
    """What :class:`serving.kserve_backend.KServeBackend` reads of a ``KServeClient`` (``get``), on one
    context's ApiClient with a timeout (``KServeClient`` loads the process-wide default configuration)."""

    def __init__(self, custom: Any, timeout: float) -> None:
        self.custom = custom
        self.timeout = timeout

    def get(self, name: str, namespace: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object("serving.kserve.io", "v1beta1", namespace,
                                                        "inferenceservices", name, _request_timeout=_bound(self.timeout))


def _api_client(context: str | None) -> Any:
    """One ApiClient for ``context`` (None: the current one), without retries, not writing the kubeconfig."""
    from kubernetes import client, config

    cfg = client.Configuration()
    cfg.retries = False
    return config.new_client_from_config(config_file=_kubeconfig(), context=context, persist_config=False,
                                         client_configuration=cfg)


def _kubeconfig() -> str | None:
    """``KUBECONFIG`` as it is now (the kubernetes client reads it once, at import)."""
    return os.environ.get("KUBECONFIG") or None


def context_name(context: str | None) -> str:
    """The ``clusters`` key of a context: its name; the current context's name for None."""
    if context is not None:
        return context
    try:
        from kubernetes import config

        return config.list_kube_config_contexts(config_file=_kubeconfig())[1]["name"]
    except Exception:  # noqa: BLE001 - no kubeconfig: the read itself says why
        return CURRENT_CONTEXT


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """``exc``, what urllib3's MaxRetryError names as its ``reason``, and their causes."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in (getattr(e, "reason", None), e.__cause__, e.__context__) if isinstance(x, BaseException)]


def unreachable_reason(exc: BaseException, timeout: float, *, otherwise: bool = True) -> str | None:
    """Why a cluster cannot be reached, on one short line; None when it answered (an HTTP status: an
    ``ApiException`` anywhere in the chain). An error of no known kind is ``exc``'s own line, or None
    without ``otherwise``."""
    import ssl

    import urllib3
    from kubernetes.config import ConfigException

    chain = list(_chain(exc))
    if any(hasattr(e, "status") and hasattr(e, "body") for e in chain):  # the API server answered
        return None
    if isinstance(exc, ConfigException):
        return f"kubeconfig: {_one_line(exc)[:200]}"
    if any(isinstance(e, ConnectionRefusedError) or "connection refused" in str(e).lower() for e in chain):
        return "connection refused"
    for e in chain:
        if isinstance(e, (ssl.SSLError, urllib3.exceptions.SSLError)):
            return "TLS: " + _one_line(e)[:160]
    if any(isinstance(e, (TimeoutError, urllib3.exceptions.TimeoutError)) for e in chain):
        return f"no answer within {timeout:g}s"
    return _one_line(exc)[:200] if otherwise else None


def _revision_replicas(api: Any, namespace: str, revisions: list[str], timeout: float) -> int | None:
    """Ready replicas of the Knative revisions (``status.actualReplicas``); None where none is reported."""
    from kubernetes import client

    custom, found = client.CustomObjectsApi(api), []
    for revision in revisions:
        try:
            obj = custom.get_namespaced_custom_object(*_KNATIVE[:2], namespace, _KNATIVE[2], revision,
                                                      _request_timeout=_bound(timeout))
        except client.ApiException as exc:
            if exc.status == 404:
                continue
            raise
        n = (obj.get("status") or {}).get("actualReplicas")
        if n is not None:
            found.append(int(n))
    return sum(found) if found else None


def _deployment_replicas(api: Any, namespace: str, name: str, timeout: float) -> int | None:
    """Ready replicas of a RawDeployment predictor (Deployment ``<name>-predictor``)."""
    from kubernetes import client

    try:
        dep = client.AppsV1Api(api).read_namespaced_deployment(f"{name}-predictor", namespace,
                                                               _request_timeout=_bound(timeout))
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return int(dep.status.ready_replicas or 0) if dep.status else 0


def _read_isvc(model: FleetModel, api: Any, timeout: float) -> dict[str, Any]:
    from kubernetes import client

    from serving.backend import backend_for
    from serving.kserve_backend import KServeBackend, parse_status
    from serving.rollout import PrometheusMetrics

    s = model.settings
    ns = s.serving.namespace
    isvc = KServeBackend(s, client=_InferenceServices(client.CustomObjectsApi(api), timeout))
    obj = backend_for(s, "kserve", using=isvc).inference_service.get()
    if obj is None:
        return _fields(replicas=0)
    status = parse_status(obj)
    revisions = [t.revision for t in status.traffic if t.percent and t.revision] or \
        [r for r in (status.latest_ready_revision,) if r]
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    if annotations.get(_DEPLOYMENT_MODE) == _RAW_DEPLOYMENT or not revisions:
        replicas = _deployment_replicas(api, ns, s.serving.name, timeout)
    else:
        replicas = _revision_replicas(api, ns, revisions, timeout)
    out = _fields(served=True, replicas=replicas)
    if s.rollout.prometheus_url and revisions:
        try:
            prometheus = PrometheusMetrics(s.rollout.prometheus_url, ns, timeout=timeout)
            out["requests"], out["error_rate"], out["p99_ms"] = _combine(
                prometheus.revision_stats(r, WINDOW_S) for r in revisions)
        except Exception as exc:  # noqa: BLE001 - replicas still shown
            out["serving_error"] = _one_line(exc)
    return out


def _read_cluster(context: str | None, models: list[FleetModel], timeout: float
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """({"reachable", "error"}, {model: serving fields}) of one context."""
    from kubernetes import client

    name = context_name(context)
    api, reason = None, None
    try:
        api = _api_client(context)
        client.VersionApi(api).get_code(_request_timeout=_bound(timeout))
    except Exception as exc:  # noqa: BLE001 - unreachable, or it answered (401, 403: the reads say what)
        reason = unreachable_reason(exc, timeout)
    if reason is not None:
        if api is not None:
            api.close()
        log.debug("cluster %s unreachable: %s", name, reason)
        error = f"cluster {name} unreachable: {reason}"
        return ({"reachable": False, "error": reason},
                {m.name: _fields(serving_error=error, kube_context=name) for m in models})
    rows: dict[str, dict[str, Any]] = {}
    try:
        for m in models:
            try:
                rows[m.name] = _read_isvc(m, api, timeout)
            except Exception as exc:  # noqa: BLE001 - one model's failure is its row's
                why = unreachable_reason(exc, timeout, otherwise=False)
                rows[m.name] = _fields(serving_error=f"cluster {name} unreachable: {why}" if why else
                                       f"cluster {name}: {_one_line(exc)[:200]}")
            rows[m.name]["kube_context"] = name
    finally:
        api.close()
    return {"reachable": True, "error": None}, rows


# -- the view ------------------------------------------------------------------------------------------------
def serving_view(models: list[FleetModel], *, timeout: float = TIMEOUT_S, now: float | None = None
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """({model: replicas, error_rate, p99_ms, requests, serving_error, served, home, kube_context},
    {context: {"reachable", "error"}}): every model read, clusters and gateways at once."""
    from serving.backend import backend_for

    now = time.time() if now is None else now
    rows: dict[str, dict[str, Any]] = {}
    local: list[tuple[FleetModel, Any]] = []
    contexts: dict[str | None, list[FleetModel]] = {}
    for m in models:
        try:
            backend = backend_for(m.settings)
        except Exception as exc:  # noqa: BLE001 - e.g. a home nothing serves
            rows[m.name] = _fields(serving_error=_one_line(exc))
            continue
        if backend.home == "kserve":
            contexts.setdefault(m.settings.serving.kube_context, []).append(m)
        else:
            local.append((m, backend))
    clusters: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(local) + len(contexts)))) as pool:
        local_reads = {m.name: (backend, pool.submit(_read_local, m, backend, timeout, now)) for m, backend in local}
        cluster_reads = [(context, pool.submit(_read_cluster, context, members, timeout))
                         for context, members in contexts.items()]
        for name, (backend, future) in local_reads.items():
            try:
                rows[name] = future.result()
            except Exception as exc:  # noqa: BLE001 - one gateway's failure is its row's
                rows[name] = _fields(home=backend.home, serving_error=_one_line(exc))
        for context, future in cluster_reads:
            reach, found = future.result()
            clusters[context_name(context)] = reach
            for name, row in found.items():
                rows[name] = {**row, "home": "kserve"}
    return rows, clusters


def serving_cell(row: dict[str, Any]) -> str:
    """``3 rep`` / ``0.4% err`` / ``p99 41ms`` on lines of their own (the column folds); ``not served``."""
    if row.get("serving_error"):
        return "unreachable" if "unreachable" in row["serving_error"] else "unreadable"
    if not row.get("served"):
        return "not served"
    lines = [f"{row['replicas']} rep" if row.get("replicas") is not None else "? rep"]
    if row.get("requests") == 0:
        lines.append("no requests")
    if row.get("error_rate") is not None:
        lines.append(f"{row['error_rate'] * 100:.1f}% err")
    if row.get("p99_ms") is not None:
        lines.append(f"p99 {row['p99_ms']:.0f}ms")
    return "\n".join(lines)
