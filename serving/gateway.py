"""The local gateway: one port in front of the primary and canary model servers.

On the embedded default it plays the part that Knative/Istio and KServe's inference logger
play on a cluster:

* splits traffic between the primary and the canary by the canary percentage (weighted
  random, or sticky by a request header when ``sticky_key`` is set);
* forwards KServe V1 and V2 requests unchanged (bytes in, bytes out) over keep-alive
  ``httpx`` connections;
* logs every served request and its response as the KServe logger does — CloudEvents v1 in
  binary mode, ``ce-id`` shared by request and response — plus two extension attributes
  KServe's logger leaves out: ``ce-modelversion`` (the MLflow version that answered) and
  ``ce-servingrole`` (``primary`` or ``canary``). Events go through a bounded queue to
  background senders: a slow or dead sink drops events (counted), never predictions;
* returns the request id in ``x-request-id`` and ``ce-id`` so that a client can send the
  ground truth later to ``POST /feedback``; the gateway joins it with the prediction it
  served and keeps per-version quality for the rollout controller;
* exposes ``PUT /admin/split``, ``PUT /admin/upstreams``, ``GET /admin/status``,
  ``GET /admin/stats`` and Prometheus ``/metrics``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.feedback import FeedbackForwarder
from serving.traffic import CANARY, PRIMARY, Splitter, TrafficStats

__all__ = ["Upstream", "GatewayConfig", "EventLogger", "create_gateway_app", "main",
           "REQUEST_TYPE", "RESPONSE_TYPE"]

log = logging.getLogger(__name__)

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
# KServe's logger names the endpoint of the InferenceService that answered.
_ENDPOINT = {PRIMARY: "default", CANARY: "canary"}
_FORWARD_HEADERS = ("content-type", "accept", "inference-header-content-length")


@dataclass
class Upstream:
    """One model server behind the gateway."""

    url: str
    version: str

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")


@dataclass
class GatewayConfig:
    name: str
    primary: Upstream
    canary: Upstream | None = None
    canary_percent: float = 0.0
    namespace: str = "default"
    sticky_key: str | None = None
    sink_url: str | None = None
    max_payload_bytes: int = 8 * 1024 * 1024
    upstream_timeout: float = 30.0
    queue_size: int = 10_000
    senders: int = 4
    sink_timeout: float = 2.0
    seed: int | None = None
    source: str = field(default="")
    feedback_url: str | None = None  # the monitor's POST /feedback; labels are forwarded there
    feedback_outbox: str | None = None  # SQLite file keeping labels the monitor has not taken yet

    def __post_init__(self) -> None:
        check_percent(self.canary_percent)
        if self.canary_percent > 0 and self.canary is None:
            raise ValueError("a canary percentage above 0 needs a canary upstream")


def check_percent(value: Any) -> float:
    """A canary percentage in [0, 100], or ``ValueError`` naming the problem."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"canary_percent must be a number between 0 and 100, got {value!r}")
    if not 0 <= value <= 100:
        raise ValueError(f"canary_percent must be between 0 and 100, got {value}")
    return float(value)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("driftloop_gateway_requests_total", "Inference requests by role, version and status",
                                ["role", "version", "code"], registry=r)
        self.latency = Histogram("driftloop_gateway_request_seconds", "Upstream round trip by role", ["role"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.events_sent = Counter("driftloop_gateway_events_sent_total", "Inference-log events accepted by the sink",
                                   registry=r)
        self.events_dropped = Counter("driftloop_gateway_events_dropped_total", "Inference-log events not delivered",
                                      ["reason"], registry=r)
        self.queue_depth = Gauge("driftloop_gateway_event_queue_depth", "Events waiting to be sent", registry=r)
        self.canary_percent = Gauge("driftloop_gateway_canary_percent", "Share of traffic sent to the canary", registry=r)
        self.rejected = Counter("driftloop_gateway_rejected_total", "Requests refused by the gateway", ["reason"],
                                registry=r)


class EventLogger:
    """Sends KServe-logger CloudEvents to the sink from a bounded queue, off the request path."""

    def __init__(self, sink_url: str, *, name: str, namespace: str, source: str, metrics: _Metrics,
                 queue_size: int = 10_000, senders: int = 4, timeout: float = 2.0) -> None:
        self.sink_url = sink_url
        self.name = name
        self.namespace = namespace
        self.source = source
        self.metrics = metrics
        self.queue: asyncio.Queue[tuple[str, str, str, str, bytes, bytes]] = asyncio.Queue(maxsize=queue_size)
        self.senders = senders
        self.timeout = timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    def submit(self, request_id: str, role: str, version: str, path: str, request_body: bytes,
               response_body: bytes) -> None:
        """Queue one request/response pair; drops (and counts) when the queue is full."""
        try:
            self.queue.put_nowait((request_id, role, version, path, request_body, response_body))
        except asyncio.QueueFull:
            self.metrics.events_dropped.labels(reason="queue_full").inc(2)

    def start(self) -> None:
        limits = httpx.Limits(max_connections=self.senders, max_keepalive_connections=self.senders)
        self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits)
        self._tasks = [asyncio.create_task(self._send_loop()) for _ in range(self.senders)]

    async def close(self, drain_seconds: float = 2.0) -> None:
        """Give queued events a short time to go out, then stop the senders."""
        deadline = time.monotonic() + drain_seconds
        while not self.queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _events(self, item: tuple[str, str, str, str, bytes, bytes]) -> list[tuple[dict[str, str], bytes]]:
        from cloudevents.conversion import to_binary
        from cloudevents.http import CloudEvent

        request_id, role, version, path, request_body, response_body = item
        out = []
        for ce_type, body in ((REQUEST_TYPE, request_body), (RESPONSE_TYPE, response_body)):
            event = CloudEvent({
                "id": request_id, "type": ce_type, "source": self.source, "specversion": "1.0",
                "datacontenttype": "application/json", "inferenceservicename": self.name,
                "namespace": self.namespace, "component": "predictor", "endpoint": _ENDPOINT[role],
                "modelversion": version, "servingrole": role, "inferencepath": path,
            }, body)
            headers, data = to_binary(event, data_marshaller=lambda d: d)
            out.append((headers, data))
        return out

    async def _send_loop(self) -> None:
        assert self._client is not None
        while True:
            item = await self.queue.get()
            self.metrics.queue_depth.set(self.queue.qsize())
            for headers, data in self._events(item):
                try:
                    resp = await self._client.post(self.sink_url, content=data, headers=headers)
                except httpx.HTTPError as exc:
                    self.metrics.events_dropped.labels(reason="sink_unreachable").inc()
                    log.debug("inference-log sink %s unreachable: %s", self.sink_url, exc)
                    continue
                if resp.status_code < 300:
                    self.metrics.events_sent.inc()
                else:
                    self.metrics.events_dropped.labels(reason=f"sink_{resp.status_code}").inc()
                    log.warning("inference-log sink refused event %s: %s %s", item[0], resp.status_code,
                                resp.text[:200])


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class _Gateway:
    """Request handling; one per app."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.metrics = _Metrics()
        self.splitter = Splitter(cfg.canary_percent, seed=cfg.seed)
        self.metrics.canary_percent.set(cfg.canary_percent)
        self.stats = TrafficStats()
        self.client: httpx.AsyncClient | None = None
        self.events: EventLogger | None = None
        self.forwarder: FeedbackForwarder | None = None

    # -- lifecycle ------------------------------------------------------------------
    async def startup(self) -> None:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=30)
        self.client = httpx.AsyncClient(timeout=self.cfg.upstream_timeout, limits=limits)
        if self.cfg.sink_url:
            self.events = EventLogger(self.cfg.sink_url, name=self.cfg.name, namespace=self.cfg.namespace,
                                      source=self.cfg.source or f"driftloop-gateway/{self.cfg.name}",
                                      metrics=self.metrics, queue_size=self.cfg.queue_size,
                                      senders=self.cfg.senders, timeout=self.cfg.sink_timeout)
            self.events.start()
        if self.cfg.feedback_url and self.cfg.feedback_outbox:
            self.forwarder = FeedbackForwarder(self.cfg.feedback_url, self.cfg.feedback_outbox)
            self.forwarder.start()

    async def shutdown(self) -> None:
        if self.events is not None:
            await self.events.close()
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.client is not None:
            await self.client.aclose()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):  # noqa: ANN201
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    # -- inference ------------------------------------------------------------------
    async def _read_body(self, request: Request) -> bytes | None:
        limit = self.cfg.max_payload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(self, request: Request) -> Response:
        body = await self._read_body(request)
        if body is None:
            self.metrics.rejected.labels(reason="too_large").inc()
            return _error(413, f"payload larger than serving.max_payload_bytes ({self.cfg.max_payload_bytes} bytes)")
        headers = request.headers
        request_id = headers.get("x-request-id") or headers.get("ce-id") or uuid.uuid4().hex
        key = headers.get(self.cfg.sticky_key) if self.cfg.sticky_key else None
        role = self.splitter.choose(key)
        upstream = self.cfg.canary if role == CANARY and self.cfg.canary is not None else self.cfg.primary
        if upstream is self.cfg.primary:
            role = PRIMARY
        path = request.url.path
        fwd = {k: v for k, v in headers.items() if k in _FORWARD_HEADERS}
        fwd["x-request-id"] = request_id
        assert self.client is not None
        start = time.perf_counter()
        try:
            resp = await self.client.post(upstream.url + path, content=body, headers=fwd)
            status, content = resp.status_code, resp.content
            ctype = resp.headers.get("content-type", "application/json")
        except httpx.HTTPError as exc:
            status, ctype = 502, "application/json"
            content = json.dumps({"error": f"{role} model server at {upstream.url} failed: {exc!r}"}).encode()
        elapsed = time.perf_counter() - start
        self.stats.record(role=role, version=upstream.version, request_id=request_id, status=status,
                          latency_ms=elapsed * 1000.0, body=content)
        self.metrics.requests.labels(role, upstream.version, str(status)).inc()
        self.metrics.latency.labels(role).observe(elapsed)
        if self.events is not None and 200 <= status < 300:
            self.events.submit(request_id, role, upstream.version, path, body, content)
        return Response(content, status_code=status, media_type=None, headers={
            "content-type": ctype, "x-request-id": request_id, "ce-id": request_id,
            "x-model-version": upstream.version, "x-serving-role": role})

    async def passthrough(self, request: Request) -> Response:
        """Health, readiness and metadata: answered by the primary."""
        assert self.client is not None
        try:
            resp = await self.client.get(self.cfg.primary.url + request.url.path)
        except httpx.HTTPError as exc:
            return _error(502, f"primary model server at {self.cfg.primary.url} failed: {exc!r}")
        return Response(resp.content, status_code=resp.status_code,
                        headers={"content-type": resp.headers.get("content-type", "application/json")})

    async def models(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.infer(request)
        return await self.passthrough(request)

    # -- feedback -------------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        try:
            doc = json.loads(await request.body())
        except ValueError as exc:
            return _error(400, f"feedback is not valid JSON: {exc}")
        items = doc if isinstance(doc, list) else [doc]
        if not items or not all(isinstance(i, dict) and "id" in i and "label" in i for i in items):
            return _error(400, 'feedback must be {"id": <request id>, "label": <value>} or a list of them')
        accepted, unknown, errors = 0, [], []
        for item in items:
            try:
                self.stats.feedback(str(item["id"]), item["label"])
                accepted += 1
            except KeyError:
                unknown.append(str(item["id"]))
            except ValueError as exc:
                errors.append(str(exc))
        if errors:
            return _error(400, "; ".join(errors), accepted=accepted)
        if unknown and not accepted:
            return _error(404, f"unknown request id(s) {', '.join(unknown[:5])}: not served here or expired",
                          unknown=unknown)
        return JSONResponse({"accepted": accepted, "unknown": unknown})

    # -- admin ----------------------------------------------------------------------
    def status_doc(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "canary_percent": self.splitter.canary_percent,
            "sticky_key": self.cfg.sticky_key,
            "primary": asdict(self.cfg.primary),
            "canary": asdict(self.cfg.canary) if self.cfg.canary else None,
            "sink_url": self.cfg.sink_url,
            "events_queued": self.events.queue.qsize() if self.events else 0,
        }

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.status_doc())

    async def _json(self, request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError as exc:
            raise ValueError(f"body is not valid JSON: {exc}") from exc

    async def split(self, request: Request) -> Response:
        try:
            doc = await self._json(request)
            if not isinstance(doc, dict) or "canary_percent" not in doc:
                raise ValueError('expected {"canary_percent": <0-100>}')
            pct = check_percent(doc["canary_percent"])
            if pct > 0 and self.cfg.canary is None:
                raise ValueError("no canary upstream is set; PUT /admin/upstreams first")
        except ValueError as exc:
            return _error(400, str(exc))
        self.splitter.canary_percent = pct
        self.cfg.canary_percent = pct
        self.metrics.canary_percent.set(pct)
        log.info("canary split set to %s%%", pct)
        return JSONResponse(self.status_doc())

    async def upstreams(self, request: Request) -> Response:
        """Replace primary and/or canary (``{"primary": {"url", "version"}, "canary": {...} | null}``)."""
        try:
            doc = await self._json(request)
            if not isinstance(doc, dict) or not ({"primary", "canary"} & doc.keys()):
                raise ValueError('expected {"primary": {"url": .., "version": ..}} and/or {"canary": {...} | null}')
            primary = Upstream(**doc["primary"]) if "primary" in doc else self.cfg.primary
            canary = (Upstream(**doc["canary"]) if doc["canary"] else None) if "canary" in doc else self.cfg.canary
            pct = check_percent(doc.get("canary_percent", self.splitter.canary_percent))
            if canary is None:
                pct = 0.0
        except (TypeError, ValueError) as exc:
            return _error(400, f"bad upstreams: {exc}")
        self.cfg.primary, self.cfg.canary = primary, canary
        self.splitter.canary_percent = self.cfg.canary_percent = pct
        self.metrics.canary_percent.set(pct)
        return JSONResponse(self.status_doc())

    async def stats_route(self, request: Request) -> Response:
        since_raw = request.query_params.get("since")
        try:
            since = _parse_since(since_raw) if since_raw else None
        except ValueError as exc:
            return _error(400, str(exc))
        return JSONResponse({"status": self.status_doc(), "versions": self.stats.summary(since)})

    async def metrics_route(self, request: Request) -> Response:
        if self.events is not None:
            self.metrics.queue_depth.set(self.events.queue.qsize())
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})


def _feedback_url(sink_url: str | None) -> str | None:
    """The monitor's ``/feedback`` next to its ``/events`` sink."""
    if not sink_url or not sink_url.rstrip("/").endswith("/events"):
        return None
    return sink_url.rstrip("/")[: -len("/events")] + "/feedback"


def _parse_since(raw: str) -> float:
    """Epoch seconds or an ISO timestamp."""
    try:
        return float(raw)
    except ValueError:
        pass
    from datetime import datetime, timezone

    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise ValueError(f"since={raw!r} is neither epoch seconds nor an ISO timestamp") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def create_gateway_app(cfg: GatewayConfig) -> Starlette:
    """The gateway as an ASGI app (serve it with uvicorn on 127.0.0.1)."""
    gw = _Gateway(cfg)
    routes = [
        Route("/v1/models/{tail:path}", gw.models, methods=["GET", "POST"]),
        Route("/v2/models/{tail:path}", gw.models, methods=["GET", "POST"]),
        Route("/v1/models", gw.passthrough, methods=["GET"]),
        Route("/v2/health/{tail:path}", gw.passthrough, methods=["GET"]),
        Route("/v2", gw.passthrough, methods=["GET"]),
        Route("/feedback", gw.feedback, methods=["POST"]),
        Route("/admin/split", gw.split, methods=["PUT"]),
        Route("/admin/upstreams", gw.upstreams, methods=["PUT"]),
        Route("/admin/status", gw.status, methods=["GET"]),
        Route("/admin/stats", gw.stats_route, methods=["GET"]),
        Route("/metrics", gw.metrics_route, methods=["GET"]),
        Route("/healthz", gw.healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan)
    app.state.gateway = gw
    return app


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.gateway", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="InferenceService name reported in the events")
    p.add_argument("--namespace", default="default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--primary-url", required=True)
    p.add_argument("--primary-version", required=True)
    p.add_argument("--canary-url")
    p.add_argument("--canary-version")
    p.add_argument("--canary-percent", type=float, default=0.0)
    p.add_argument("--sticky-key")
    p.add_argument("--sink-url", help="inference-log sink (POST /events); unset = no logging")
    p.add_argument("--feedback-url", help="the monitor's POST /feedback (default: the sink URL's /feedback)")
    p.add_argument("--feedback-outbox", help="SQLite file for labels the monitor has not taken yet; "
                                             "unset = labels stay in the gateway only")
    p.add_argument("--max-payload-bytes", type=int, default=8 * 1024 * 1024)
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = _parser().parse_args(argv)
    canary = Upstream(args.canary_url, args.canary_version or "") if args.canary_url else None
    cfg = GatewayConfig(name=args.name, namespace=args.namespace, primary=Upstream(args.primary_url, args.primary_version),
                        canary=canary, canary_percent=args.canary_percent, sticky_key=args.sticky_key,
                        sink_url=args.sink_url, max_payload_bytes=args.max_payload_bytes,
                        feedback_url=args.feedback_url or _feedback_url(args.sink_url),
                        feedback_outbox=args.feedback_outbox)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_gateway_app(cfg), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
