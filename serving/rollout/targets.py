"""Where the canary runs: the local gateway (through its admin API) or an InferenceService (through ``KServeBackend``).

A target moves the traffic split, reports each version's numbers over a window, the champion's latest
answers (the output-PSI guard's reference) and the rollout's labelled requests (from the monitor its
inference log goes to), and promotes or rolls back; :class:`GatewayTarget` and :class:`KServeTarget`
also run the shadow phase.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from driftloop.core.errors import ServingError
from serving.rollout.metrics import (LABELLED_LIMIT, MonitorLabelled, MonitorPredictions, MonitorQuality, MonitorShadow,
                                    PrometheusMetrics)
from serving.rollout.state import RolloutState

__all__ = ["RolloutTarget", "GatewayTarget", "KServeTarget"]


class RolloutTarget(Protocol):
    """Where the canary runs: the local gateway or an InferenceService."""

    def set_weight(self, percent: int) -> None: ...

    def stats(self, since: float, canary_version: str, primary_version: str | None
              ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]: ...

    def champion_predictions(self, version: str, limit: int) -> list[Any]:
        """The latest ``limit`` answers ``version`` served, oldest first."""
        ...

    def labelled_rows(self, since: float, model: str) -> list[dict[str, Any]] | None:
        """The labelled requests served since ``since`` (:class:`MonitorLabelled`); None where no
        monitor holds them."""
        ...

    def promote(self, state: RolloutState) -> None: ...

    def rollback(self, state: RolloutState) -> None: ...


class GatewayTarget:
    """The local gateway, through its admin API; promotion/rollback optionally through a backend
    that also manages the model-server processes (``LocalBackend``)."""

    def __init__(self, admin_url: str, backend: Any | None = None, timeout: float = 10.0, *,
                 token: str | None = None, labelled: MonitorLabelled | None = None) -> None:
        """``token``: the gateway's admin bearer token (default: ``DRIFTLOOP_GATEWAY_TOKEN``).
        ``labelled``: where the labelled requests are read (default: the monitor the gateway logs to,
        :meth:`labelled_rows`)."""
        import httpx

        if token is None:
            token = os.environ.get("DRIFTLOOP_GATEWAY_TOKEN") or None
        self.admin_url = admin_url.rstrip("/")
        self.backend = backend
        self.timeout = timeout
        self._labelled = labelled
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.admin_url, timeout=timeout, headers=headers)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServingError(f"gateway at {self.admin_url} is unreachable: {exc}") from exc
        if resp.status_code >= 400:
            raise ServingError(f"gateway refused {method} {path}: {resp.status_code} {resp.text[:300]}")
        try:
            return resp.json()
        except ValueError as exc:
            raise ServingError(f"gateway answered {method} {path} with a body that is not JSON: {exc}") from exc

    def set_weight(self, percent: int) -> None:
        if self.backend is not None:  # the serving state records the weight the gateway accepted
            self.backend.set_split(percent)
            return
        self._call("PUT", "/admin/split", json={"canary_percent": percent})

    def set_shadow(self, percent: float, state: RolloutState | None = None) -> None:
        """Mirror ``percent`` % to the gateway's canary upstream (the candidate); ``state`` is not needed here."""
        self._call("PUT", "/admin/shadow", json={"percent": percent})

    def shadow_stats(self, since: float, version: str | None = None) -> dict[str, Any]:
        """The gateway's own join (it mirrors to its one canary upstream, so ``version`` is not needed)."""
        return self._call("GET", "/admin/shadow", params={"since": since}).get("stats") or {}

    def stats(self, since: float, canary_version: str, primary_version: str | None):  # noqa: ANN201
        versions = self._call("GET", "/admin/stats", params={"since": since})["versions"]
        return versions.get(str(canary_version)), versions.get(str(primary_version)) if primary_version else None

    def champion_predictions(self, version: str, limit: int) -> list[Any]:
        """What the gateway keeps of ``version``'s latest answers (up to 2,000), oldest first."""
        found = self._call("GET", "/admin/stats")["versions"].get(str(version)) or {}
        return list(reversed(found.get("predictions") or []))[-limit:]  # the gateway lists the newest first

    def labelled_rows(self, since: float, model: str) -> list[dict[str, Any]] | None:
        """From the monitor the gateway sends its inference log to (``/admin/status``'s ``sink_url``),
        with the workspace's ingest token (the backend's) or ``DRIFTLOOP_WEBHOOK_TOKEN``; None when the
        gateway logs nowhere."""
        if self._labelled is None:
            sink = self._call("GET", "/admin/status").get("sink_url")
            if not sink:
                return None
            token = (self.backend.ingest_token() if hasattr(self.backend, "ingest_token") else None) or \
                os.environ.get("DRIFTLOOP_WEBHOOK_TOKEN") or os.environ.get("DRIFTLOOP_INGEST_TOKEN") or None
            self._labelled = MonitorLabelled(sink.rstrip("/").removesuffix("/events"), timeout=self.timeout,
                                             token=token)
        return self._labelled.rows(since, model=model, limit=LABELLED_LIMIT)

    def promote(self, state: RolloutState) -> None:
        if self.backend is not None:
            self.backend.promote()
            return
        status = self._call("GET", "/admin/status")
        self._call("PUT", "/admin/upstreams", json={"primary": status["canary"], "canary": None})

    def rollback(self, state: RolloutState) -> None:
        if self.backend is not None:
            self.backend.rollback()
            return
        self._call("PUT", "/admin/upstreams", json={"canary": None})



class KServeTarget:
    """An InferenceService through ``KServeBackend``; error rate and latency from Prometheus by
    revision; from the monitor, when one is given: labelled quality and both prediction samples per
    version, and the shadow phase's join."""

    def __init__(self, backend: Any, metrics: PrometheusMetrics, quality: MonitorQuality | None = None,
                 shadow: MonitorShadow | None = None, predictions: MonitorPredictions | None = None,
                 labelled: MonitorLabelled | None = None) -> None:
        """``predictions`` and ``labelled`` default to the monitor ``shadow`` reads (same URL and bearer
        token), ``labelled`` else to the one ``predictions`` reads."""
        self.backend = backend
        self.metrics = metrics
        self.quality = quality
        self.shadow = shadow
        if predictions is None and shadow is not None:
            predictions = shadow.sibling(MonitorPredictions)
        self.predictions = predictions
        if labelled is None and (shadow or predictions) is not None:
            labelled = (shadow or predictions).sibling(MonitorLabelled)
        self.labelled = labelled

    def set_weight(self, percent: int) -> None:
        self.backend.set_traffic(percent)

    def _revisions(self) -> tuple[str | None, str | None]:
        """(canary, primary) revisions: the latest ready one and the last rolled-out one."""
        status = self.backend.status()
        canary = status.latest_ready_revision
        primary = status.latest_rolledout_revision
        return (canary if canary != primary else None), primary

    def stats(self, since: float, canary_version: str, primary_version: str | None):  # noqa: ANN201
        """Per revision from Prometheus; quality and the prediction samples by version from the
        monitor. A monitor that cannot be read raises ``ServingError``: the interval is unavailable."""
        canary_rev, primary_rev = self._revisions()
        window = max(time.time() - since, 1.0)
        canary = self.metrics.revision_stats(canary_rev, window) if canary_rev else None
        primary = self.metrics.revision_stats(primary_rev, window) if primary_rev else None
        sides = [(stats, str(version)) for stats, version in ((canary, canary_version), (primary, primary_version))
                 if stats is not None and version is not None]
        if self.quality is not None:
            by_version = self.quality.versions(since)
            for stats, version in sides:
                stats.update(by_version.get(version, {}))
        if self.predictions is not None and sides:
            samples = self.predictions.samples(since, [version for _, version in sides])
            for stats, version in sides:
                stats["predictions"] = samples.get(version, [])
        return canary, primary

    def champion_predictions(self, version: str, limit: int) -> list[Any]:
        """From the monitor's inference log (``GET /predictions``); none without a monitor."""
        if self.predictions is None:
            return []
        return self.predictions.samples(0.0, [str(version)], limit=limit).get(str(version), [])

    def labelled_rows(self, since: float, model: str) -> list[dict[str, Any]] | None:
        if self.labelled is None:
            return None
        return self.labelled.rows(since, model=model, limit=LABELLED_LIMIT)

    def promote(self, state: RolloutState) -> None:
        self.backend.promote(state.canary_uri or f"models:/{state.model_name}/{state.canary_version}")

    def set_shadow(self, percent: float, state: RolloutState | None = None) -> None:
        """The shadow InferenceService + Istio mirror for the candidate (``KServeBackend.set_shadow``); 0 removes them."""
        if percent == 0 or state is None:
            self.backend.remove_shadow()
            return
        self.backend.set_shadow(state.canary_uri or f"models:/{state.model_name}/{state.canary_version}",
                                state.canary_version, percent)

    def shadow_stats(self, since: float, version: str | None = None) -> dict[str, Any]:
        """Mirrored requests, errors and p99 of the shadow's revision from Prometheus (its queue-proxy
        counts every copy it answered), and — with a monitor — the shadow's and the primary's answers
        joined by request id in the inference log: agreement or difference, both prediction samples
        (output PSI) and quality on the same labelled rows, so the shadow phase is judged on the same
        checks and limits as on the embedded default (see docs/rollouts.md)."""
        status = self.backend.shadow_status()
        revision = status.latest_ready_revision if status is not None else None
        if not revision:
            raise ServingError("the shadow InferenceService is not there or has no ready revision yet")
        stats = self.metrics.revision_stats(revision, max(time.time() - since, 1.0))
        rate = stats.get("error_rate")
        requests = int(stats.get("requests") or 0)
        out = {"requests": requests, "error_rate": rate, "p99_ms": stats.get("p99_ms"),
               "errors": round(rate * requests) if rate is not None else None, "revision": revision,
               "source": "prometheus"}
        if self.shadow is not None:
            joined = self.shadow.summary(since, version)
            out.update({k: v for k, v in joined.items() if k not in out})
            out["source"] = "prometheus+monitor"
        return out

    def rollback(self, state: RolloutState) -> None:
        self.backend.rollback()

