"""The monitor's own HTTP routes, added beside the sink's by :class:`monitoring.service.MonitorService`.

Grouped by who calls them, each group built by one function:

* :func:`alert_routes` — ``POST /alerts/alertmanager`` (Prometheus Alertmanager's webhook; bearer
  token from ``DRIFTLOOP_WEBHOOK_TOKEN`` only) and ``GET /alerts`` (recent alerts, decisions, runs);
* :func:`check_routes` — ``POST /check`` (a drift check now) and ``GET``/``POST /quality/check``
  (the last quality outcome / a quality check now); running a check needs the ingest token;
* :func:`report_routes` — ``GET /reports/{alert_id}``, an alert's Evidently HTML report;
* :func:`rollout_routes` — ``GET /shadow`` and ``GET /predictions``, read by the rollout
  controller on a cluster; same bearer token as the webhook; ``GET /labelled``, the labelled
  requests a canary's quality is judged on, read by the controller in both homes: the webhook token
  or the ingest token (the embedded default's controller has the workspace's);
* :func:`openapi_route` — ``GET /openapi.json``, the document of the sink's and the monitor's routes.

A refused request gets a 401 JSON ``{"error": ...}`` and is counted in
``driftloop_monitor_events_rejected_total{reason}``. The routes do the HTTP work only; the
monitor they are given (:class:`MonitorParts`) does the checks.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from driftloop.core.errors import DriftloopError
from monitoring.alerts import alertmanager_alerts
from monitoring.events import EventError
from monitoring.openapi import monitor_openapi
from monitoring.sink import since_param

if TYPE_CHECKING:
    from monitoring.alerts import AlertStore
    from monitoring.metrics import MonitorMetrics
    from monitoring.quality_check import QualityMonitor
    from monitoring.sink import IngestAuth
    from monitoring.store import InferenceStore
    from monitoring.trigger import Trigger

__all__ = ["MAX_ALERTS_LIMIT", "MAX_LABELLED_LIMIT", "MAX_PREDICTIONS_LIMIT", "PREDICTIONS_LIMIT", "WEBHOOK_TOKEN_ENV",
           "MonitorParts",
           "alert_routes", "check_routes", "monitor_routes", "openapi_route", "report_routes", "rollout_routes"]

WEBHOOK_TOKEN_ENV = "DRIFTLOOP_WEBHOOK_TOKEN"
PREDICTIONS_LIMIT = 5_000  # per version, when the request names none
MAX_PREDICTIONS_LIMIT = 50_000
MAX_LABELLED_LIMIT = 50_000
MAX_ALERTS_LIMIT = 10_000

Refusal = Callable[[Request, str], Response | None]  # the 401 for a request without the right token, else None


class MonitorParts(Protocol):
    """What the routes use of the monitor (:class:`monitoring.service.MonitorService` is one)."""

    store: InferenceStore
    alerts: AlertStore
    trigger: Trigger
    metrics: MonitorMetrics
    quality: QualityMonitor
    auth: IngestAuth

    def check(self, *, force: bool = False, report: bool = False) -> dict[str, Any]: ...

    def check_quality(self) -> dict[str, Any]: ...

    def shadow_summary(self, since: float | None = None, version: str | None = None) -> dict[str, Any]: ...


def _json(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload, default=str, option=orjson.OPT_SERIALIZE_NUMPY),
                    status_code=status, media_type="application/json")


def monitor_routes(monitor: MonitorParts) -> list[Route]:
    """All the monitor's own routes; the webhook token is read from the environment now."""
    token = os.environ.get(WEBHOOK_TOKEN_ENV) or None
    refusal = webhook_refusal(token, monitor.metrics)
    unauthorized = ingest_refusal(monitor.auth, monitor.metrics)
    return [*alert_routes(monitor, refusal), *check_routes(monitor, unauthorized), *report_routes(monitor),
            *rollout_routes(monitor, refusal)]


def webhook_refusal(token: str | None, metrics: MonitorMetrics) -> Refusal:
    """The check of the bearer token ``DRIFTLOOP_WEBHOOK_TOKEN`` (webhook, shadow, predictions)."""
    rejected = metrics.events_rejected

    def refusal(request: Request, what: str) -> Response | None:
        """401 unless the request carries the bearer token (``what`` names the refusal and its metric)."""
        if token is None:
            rejected.labels(reason=f"{what}_not_configured").inc()
            return _json(401, {"error": f"{what} refused: {WEBHOOK_TOKEN_ENV} is not set on the monitor"})
        given = request.headers.get("authorization", "")
        if not given.lower().startswith("bearer ") or not hmac.compare_digest(given[7:].strip().encode(),
                                                                               token.encode()):
            rejected.labels(reason=f"{what}_unauthorized").inc()
            return _json(401, {"error": "missing or wrong bearer token"})
        return None

    return refusal


def ingest_refusal(auth: IngestAuth, metrics: MonitorMetrics) -> Refusal:
    """The check of the ingest token (the monitor's state-changing routes)."""
    rejected = metrics.events_rejected

    def unauthorized(request: Request, what: str) -> Response | None:
        """401 unless the request carries the ingest token (the monitor's state-changing routes)."""
        refused = auth.refusal(request.headers.get("authorization"), what)
        if refused is None:
            return None
        rejected.labels(reason=refused.reason).inc()
        return Response(orjson.dumps({"error": refused.message}), status_code=401, media_type="application/json",
                        headers={"www-authenticate": "Bearer"})

    return unauthorized


def alert_routes(monitor: MonitorParts, refusal: Refusal) -> list[Route]:
    """``POST /alerts/alertmanager`` and ``GET /alerts``."""
    rejected = monitor.metrics.events_rejected

    async def alertmanager(request: Request) -> Response:
        if (refused := refusal(request, "webhook")) is not None:
            return refused
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            rejected.labels(reason="webhook_malformed").inc()
            return _json(400, {"error": f"body is not JSON: {exc}"})
        try:
            alerts = alertmanager_alerts(payload)
        except ValueError as exc:
            rejected.labels(reason="webhook_malformed").inc()
            return _json(400, {"error": f"malformed Alertmanager payload: {exc}"})
        decisions = []
        for alert in alerts:
            monitor.metrics.alerts.labels(source="alertmanager").inc()
            d = await asyncio.to_thread(monitor.trigger.submit, alert)
            decisions.append({"id": d.alert_id, "decision": d.decision, "reason": d.reason,
                              "request_id": d.request_id})
        return _json(200, {"decisions": decisions})

    async def list_alerts(request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            return _json(400, {"error": "limit must be an integer"})
        if not 1 <= limit <= MAX_ALERTS_LIMIT:  # SQLite: past 64 bits a 500, below 0 no limit
            return _json(400, {"error": f"limit must be from 1 to {MAX_ALERTS_LIMIT}, got {limit}"})
        return _json(200, {"alerts": await asyncio.to_thread(monitor.alerts.recent, limit)})

    return [
        Route("/alerts/alertmanager", alertmanager, methods=["POST"]),
        Route("/alerts", list_alerts, methods=["GET"]),
    ]


def check_routes(monitor: MonitorParts, unauthorized: Refusal) -> list[Route]:
    """``POST /check`` and ``GET``/``POST /quality/check``."""

    async def check_now(request: Request) -> Response:
        if (refused := unauthorized(request, "POST /check")) is not None:
            return refused
        report = request.query_params.get("report", "false").lower() in ("1", "true", "yes")
        try:
            outcome = await asyncio.to_thread(monitor.check, force=True, report=report)
        except DriftloopError as exc:
            return _json(409, {"error": str(exc)})
        return _json(200, outcome)

    async def quality_check(request: Request) -> Response:
        if request.method == "GET":  # reads only: a check raises alerts and starts runs, so only POST runs one
            return _json(200, monitor.quality.last_outcome or {
                "checked_at": None, "versions": {},
                "reason": "no quality check has run yet (every monitor.check_interval_seconds, or POST)"})
        if (refused := unauthorized(request, "POST /quality/check")) is not None:
            return refused
        try:
            outcome = await asyncio.to_thread(monitor.check_quality)
        except DriftloopError as exc:
            return _json(409, {"error": str(exc)})
        return _json(200, outcome)

    return [
        Route("/check", check_now, methods=["POST"]),
        Route("/quality/check", quality_check, methods=["GET", "POST"]),
    ]


def report_routes(monitor: MonitorParts) -> list[Route]:
    """``GET /reports/{alert_id}``."""

    async def report(request: Request) -> Response:
        alert = await asyncio.to_thread(monitor.alerts.get, request.path_params["alert_id"])
        path = Path(alert["report_path"]) if alert and alert.get("report_path") else None
        if path is None or not path.is_file():
            return _json(404, {"error": f"no report for alert {request.path_params['alert_id']!r}"})
        return FileResponse(path, media_type="text/html")

    return [Route("/reports/{alert_id}", report, methods=["GET"])]


def _limit(raw: str | None, default: int, most: int) -> int | None:
    """``limit`` as an integer from 1 to ``most`` (``default`` when absent); None when it is not."""
    try:
        limit = int(raw) if raw is not None else default
    except ValueError:
        return None
    return limit if 1 <= limit <= most else None


def rollout_routes(monitor: MonitorParts, refusal: Refusal) -> list[Route]:
    """``GET /shadow`` and ``GET /predictions`` (the rollout controller's reads on a cluster) and
    ``GET /labelled`` (its read in both homes)."""

    async def shadow(request: Request) -> Response:
        if (refused := refusal(request, "shadow")) is not None:
            return refused
        try:
            since = since_param(request.query_params.get("since"))
        except EventError as exc:
            return _json(exc.status, {"error": exc.message})
        version = request.query_params.get("version") or None
        stats = await asyncio.to_thread(monitor.shadow_summary, since, version)
        return _json(200, {"since": since, "version": version, "stats": stats})

    async def predictions(request: Request) -> Response:
        if (refused := refusal(request, "predictions")) is not None:
            return refused
        query = request.query_params
        try:
            since = since_param(query.get("since"))
        except EventError as exc:
            return _json(exc.status, {"error": exc.message})
        versions = list(dict.fromkeys(v.strip() for v in query.get("versions", "").split(",") if v.strip()))
        if not versions:
            return _json(400, {"error": "'versions' must name at least one model version, e.g. versions=3,4"})
        limit = _limit(query.get("limit"), PREDICTIONS_LIMIT, MAX_PREDICTIONS_LIMIT)
        if limit is None:
            return _json(400, {"error": f"'limit' must be an integer from 1 to {MAX_PREDICTIONS_LIMIT}, "
                                        f"got {query.get('limit')!r}"})
        try:
            found = await asyncio.to_thread(monitor.store.predictions_by_version, since, versions, limit=limit)
        except EventError as exc:  # StoreUnavailable: 503 saying why
            return _json(exc.status, {"error": exc.message})
        return _json(200, {"since": since, "limit": limit,
                           "versions": {v: {"n": len(p), "predictions": p} for v, p in found.items()}})

    async def labelled(request: Request) -> Response:
        # the ingest token (the embedded default's controller reads the workspace's), else the webhook's
        ingest = monitor.auth.refusal(request.headers.get("authorization"), "GET /labelled")
        if ingest is not None and refusal(request, "labelled") is not None:
            return _json(401, {"error": f"{ingest.message}, or {WEBHOOK_TOKEN_ENV}'s"})
        query = request.query_params
        try:
            since = since_param(query.get("since"))
        except EventError as exc:
            return _json(exc.status, {"error": exc.message})
        limit = _limit(query.get("limit"), MAX_LABELLED_LIMIT, MAX_LABELLED_LIMIT)
        if limit is None:
            return _json(400, {"error": f"'limit' must be an integer from 1 to {MAX_LABELLED_LIMIT}, "
                                        f"got {query.get('limit')!r}"})
        try:
            rows = await asyncio.to_thread(monitor.store.labelled_requests, since, model_name=query.get("model") or None,
                                           limit=limit)
        except EventError as exc:  # StoreUnavailable: 503 saying why
            return _json(exc.status, {"error": exc.message})
        return _json(200, {"since": since, "limit": limit, "n": len(rows), "rows": rows})

    return [
        Route("/shadow", shadow, methods=["GET"]),
        Route("/predictions", predictions, methods=["GET"]),
        Route("/labelled", labelled, methods=["GET"]),
    ]


def openapi_route(events_auth: str) -> Route:
    """``GET /openapi.json``: the OpenAPI document of the sink's routes and the monitor's."""
    document = monitor_openapi(events_auth=events_auth)

    async def openapi(request: Request) -> Response:
        return _json(200, document)

    return Route("/openapi.json", openapi, methods=["GET"])
