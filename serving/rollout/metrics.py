"""What the controller reads about a canary: Prometheus by revision, the monitor by version.

:class:`PrometheusMetrics` gives requests, error rate and p99 latency per Knative revision; the
monitor's read-only API gives labelled quality (:class:`MonitorQuality`), both versions' answers
(:class:`MonitorPredictions`), the shadow phase's join by request id (:class:`MonitorShadow`) and the
labelled requests themselves, features and label (:class:`MonitorLabelled`), which the canary's
quality check scores with both versions (:mod:`serving.rollout.paired`) in both homes.
A source that cannot be read raises ``ServingError``: the interval is then unavailable.
"""

from __future__ import annotations

import math
from typing import Any

from driftloop.core.errors import ServingError

__all__ = ["PrometheusMetrics", "MonitorClient", "MonitorQuality", "MonitorShadow", "MonitorPredictions",
           "MonitorLabelled", "LABELLED_LIMIT"]

_MAX_DISTRIBUTION_SAMPLES = 2_000  # per version, as the local gateway's /admin/stats keeps them
LABELLED_LIMIT = 50_000  # labelled requests a quality check scores at most (the latest of the window)


class PrometheusMetrics:
    """Canary/primary numbers for an InferenceService from Prometheus (Knative revision metrics).

    In Serverless mode each InferenceService revision is a Knative revision; the queue-proxy
    exports ``revision_app_request_count`` and ``revision_app_request_latencies_bucket``
    labelled by ``namespace_name``, ``revision_name`` and ``response_code_class``.
    """

    def __init__(self, url: str, namespace: str, *, timeout: float = 10.0, client: Any | None = None) -> None:
        self.url = url.rstrip("/")
        self.namespace = namespace
        self.timeout = timeout
        self._client = client

    def queries(self, revision: str, window_seconds: float) -> dict[str, str]:
        sel = f'namespace_name="{self.namespace}",revision_name="{revision}"'
        w = f"{max(int(math.ceil(window_seconds)), 1)}s"
        return {
            "requests": f"sum(increase(revision_app_request_count{{{sel}}}[{w}]))",
            "error_rate": (f'sum(rate(revision_app_request_count{{{sel},response_code_class="5xx"}}[{w}]))'
                           f" / sum(rate(revision_app_request_count{{{sel}}}[{w}]))"),
            "p99_ms": f"histogram_quantile(0.99, sum by (le) (rate(revision_app_request_latencies_bucket{{{sel}}}[{w}])))",
        }

    def query(self, promql: str) -> float | None:
        import httpx

        if self._client is None:  # one client for every query: making one loads the CA bundle (tens of ms)
            self._client = httpx.Client(timeout=self.timeout)
        client = self._client
        try:
            resp = client.get(f"{self.url}/api/v1/query", params={"query": promql})
            resp.raise_for_status()
            result = resp.json()["data"]["result"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise ServingError(f"Prometheus query failed at {self.url}: {exc}") from exc
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def revision_stats(self, revision: str, window_seconds: float) -> dict[str, Any]:
        out: dict[str, Any] = {k: self.query(q) for k, q in self.queries(revision, window_seconds).items()}
        out["requests"] = int(out["requests"] or 0)
        return out


class MonitorClient:
    """What the rollout controller reads from the monitor (``GET`` only), with the monitor's bearer
    token where it asks for one (``DRIFTLOOP_WEBHOOK_TOKEN``, the token the monitor checks)."""

    def __init__(self, url: str, *, timeout: float = 10.0, client: Any | None = None,
                 token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._client = client
        self._token = token

    def _get(self, path: str, params: dict[str, Any], what: str, *, missing_ok: bool = False) -> dict[str, Any] | None:
        """The JSON answer; None for a 404 with ``missing_ok`` (a monitor without that route)."""
        import httpx

        if self._client is None:  # one client for every query: making one loads the CA bundle (tens of ms)
            self._client = httpx.Client(timeout=self.timeout)
        client = self._client
        headers = {"authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            resp = client.get(f"{self.url}{path}", params=params, headers=headers)
            if missing_ok and resp.status_code == 404:
                return None
            resp.raise_for_status()
            return resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ServingError(f"monitor {what} query failed at {self.url}: {exc}") from exc

    @property
    def token(self) -> str | None:
        return self._token

    def sibling(self, cls: type[MonitorClient]) -> MonitorClient:
        """A client of another kind for the same monitor: URL, timeout, HTTP client and token."""
        return cls(self.url, timeout=self.timeout, client=self._client, token=self._token)


class MonitorQuality(MonitorClient):
    """Labelled quality per model version from the monitor's ``GET /quality`` (its inference log)."""

    def __init__(self, url: str, task: str = "classification", *, timeout: float = 10.0,
                 client: Any | None = None) -> None:
        super().__init__(url, timeout=timeout, client=client)
        self.task = task

    def versions(self, since: float) -> dict[str, dict[str, Any]]:
        """``{version: {"labels", "quality", "quality_metric"}}``; quality is higher-is-better."""
        try:
            found = self._get("/quality", {"since": since, "task": self.task}, "quality")["versions"]
        except (KeyError, TypeError) as exc:
            raise ServingError(f"monitor quality query at {self.url} answered without versions: {exc}") from exc
        out = {}
        for version, q in found.items():
            if self.task == "classification":
                value, metric = q.get("accuracy"), "accuracy"
            else:
                value, metric = (-q["mae"] if q.get("mae") is not None else None), "neg_mae"
            out[str(version)] = {"labels": int(q.get("n") or 0), "quality": value, "quality_metric": metric}
        return out


class MonitorShadow(MonitorClient):
    """A shadow phase on a cluster: the shadow's and the primary's logged answers joined by request id
    in the monitor (``GET /shadow``) — agreement or difference, both prediction samples, quality on the
    same labelled rows — the numbers the local gateway reports for its own join."""

    def summary(self, since: float, version: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"since": since}
        if version is not None:
            params["version"] = version
        stats = self._get("/shadow", params, "shadow").get("stats")
        if not isinstance(stats, dict):
            raise ServingError(f"monitor shadow query at {self.url} answered without stats")
        return stats


class MonitorPredictions(MonitorClient):
    """What the canary and the primary answered users, per model version, from the monitor's
    ``GET /predictions`` (its inference log; KServe's logger logs both revisions and the model
    server names its version in every response) — the samples of the ``prediction_psi`` check."""

    def samples(self, since: float, versions: list[str], limit: int = _MAX_DISTRIBUTION_SAMPLES
                ) -> dict[str, list[Any]]:
        """``{version: [prediction, ...]}``: the latest ``limit`` of each version since ``since``."""
        found = self._get("/predictions", {"since": since, "versions": ",".join(versions), "limit": limit},
                          "predictions")
        by_version = found.get("versions") if isinstance(found, dict) else None
        if not isinstance(by_version, dict):
            raise ServingError(f"monitor predictions query at {self.url} answered without versions")
        return {str(v): list((d or {}).get("predictions") or []) for v, d in by_version.items()}



class MonitorLabelled(MonitorClient):
    """The labelled requests of a window from the monitor's ``GET /labelled`` (its inference log joined
    with the labels posted for it): per row the features as the model server received them, the
    version that answered, what it answered and the label — so both versions can be scored on the same
    requests (:mod:`serving.rollout.paired`), whichever of them served each one."""

    def rows(self, since: float, *, model: str | None = None, limit: int = LABELLED_LIMIT
             ) -> list[dict[str, Any]] | None:
        """The latest ``limit`` labelled rows served since ``since``, oldest first, shadow rows left out
        (``request_id, row_index, ts, version, features, prediction, label``); None when the monitor
        has no such route (a monitor older than the paired quality check)."""
        params: dict[str, Any] = {"since": since, "limit": limit}
        if model:
            params["model"] = model
        found = self._get("/labelled", params, "labelled requests", missing_ok=True)
        if found is None:
            return None
        rows = found.get("rows") if isinstance(found, dict) else None
        if not isinstance(rows, list):
            raise ServingError(f"monitor labelled query at {self.url} answered without rows")
        return rows
