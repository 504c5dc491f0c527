"""The local gateway: one port in front of the primary and canary model servers.

On the embedded default it plays the part that Knative/Istio and KServe's inference logger
play on a cluster:

* splits traffic between the primary and the canary by the canary percentage (weighted
  random, or sticky by a request header when ``sticky_key`` is set);
* forwards only the Open Inference Protocol routes of the one model it serves (V1 and V2, see
  :mod:`serving.oip`; matched on the raw path, so no ``..%2F`` reaches anything else on a model
  server) over keep-alive ``aiohttp`` connections, bodies as sent (a gzip body inflated);
* logs every served request and its response with the attributes the KServe logger sends —
  CloudEvents v1, ``ce-id`` shared by request and response — plus two extension attributes
  KServe's logger leaves out: ``ce-modelversion`` (the MLflow version that answered) and
  ``ce-servingrole`` (``primary`` or ``canary``). Events go through a bounded queue to
  background senders that post them in ``application/cloudevents-batch+json`` batches with the
  ingest bearer token (see :class:`EventLogger`; binary V2 tensors become JSON): a slow or dead
  sink never delays a prediction; its events wait in the ``--event-outbox`` SQLite file, or
  without one are dropped (counted);
* returns the request id in ``x-request-id`` and ``ce-id`` (a client's own id, refused with 409
  when it comes again with another body) so that a client can send the
  ground truth later to ``POST /feedback``; the gateway joins it with the prediction it
  served and keeps per-version quality for the rollout controller;
* balances the primary's traffic over its replicas (``--replica-url``, ``PUT /admin/replicas``:
  more model-server processes of the same version), each request to the one with the fewest
  requests in flight; a replica taken out receives nothing new and ``GET /admin/status`` shows
  its requests in flight until they are answered, so it can be stopped without dropping one;
* exposes ``PUT /admin/split``, ``PUT /admin/upstreams``, ``PUT /admin/replicas`` (all need the
  bearer token from ``DRIFTLOOP_GATEWAY_TOKEN``), ``GET /admin/status``, ``GET /admin/stats``,
  Prometheus ``/metrics`` and ``GET /openapi.json``.

Bad input never takes it down: every refusal is one 4xx with a JSON ``error`` naming the problem,
and what was accepted before (labels, statistics, the split) stays as it was. A pooled
keep-alive connection that the model server closed is retried once on a fresh one, so a stale
connection never reaches the client as a 502; a 502 the gateway makes for a dropped connection
is not counted as the model server's error.

This module is the request path (forwarding, the traffic split, the OIP allow-list) and the app that
puts the parts together; the admin API is :mod:`serving.gateway_admin`, the inference log
:mod:`serving.gateway_events`, ``POST /feedback`` :mod:`serving.gateway_feedback`, and what they share
(configuration, metrics, tokens, strict JSON) :mod:`serving.gateway_base`.
"""


from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.gateway_admin import GatewayAdmin
from serving.gateway_base import (ADMIN_TOKEN_ENV, INGEST_TOKEN_ENV, MAX_ID_CHARS, GatewayConfig, GatewayMetrics,
                                  ServeSupervision, StrictJSON, Upstream, check_upstream,
                                  error_response, http_session, read_body)
from serving.gateway_events import REQUEST_TYPE, RESPONSE_TYPE, EventLogger, start_event_logger
from serving.gateway_feedback import GatewayFeedback
from serving.oip import HEADER_LENGTH, match_route, without_binary_scores
from serving.traffic import CANARY, PRIMARY, Splitter, TrafficStats

if TYPE_CHECKING:
    from serving.shadow import ShadowMirror

__all__ = ["Upstream", "GatewayConfig", "EventLogger", "create_gateway_app", "main", "check_upstream",
           "REQUEST_TYPE", "RESPONSE_TYPE", "ADMIN_TOKEN_ENV", "INGEST_TOKEN_ENV"]

log = logging.getLogger(__name__)

_FORWARD_HEADERS = ("content-type", "accept", "inference-header-content-length")
# Asks the predictor for class scores (serving.predictor.SCORES_HEADER; not imported: kserve is heavy).
SCORES_HEADER = "x-driftloop-scores"
SCORES_OUTPUT = "scores"


class _UpstreamFailed(Exception):
    """No usable answer from a model server. ``counts``: the model server's fault (unreachable,
    too slow), as opposed to a connection that dropped under the gateway."""

    def __init__(self, message: str, counts: bool) -> None:
        super().__init__(message)
        self.counts = counts


class _Gateway:
    """The request path of one gateway: forwarding to the primary (its replicas) or the canary by the
    split, the OIP allow-list, the shadow mirror; its admin API (``admin``) and ``/feedback`` (``labels``)
    share its state."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.metrics = GatewayMetrics()
        if cfg.serving_state:
            self.metrics.registry.register(ServeSupervision(cfg.serving_state))
        self.splitter = Splitter(cfg.canary_percent, seed=cfg.seed)
        self.metrics.canary_percent.set(cfg.canary_percent)
        self.stats = TrafficStats()
        self.client: aiohttp.ClientSession | None = None
        self.events: EventLogger | None = None
        self.shadow: ShadowMirror | None = None  # while a shadow phase runs
        self.inflight: dict[str, int] = {}  # requests in flight per upstream URL
        self.request_ids: OrderedDict[str, bytes] = OrderedDict()  # client request id -> digest of its body
        self._rr = 0
        self._own_client = True
        self.admin = GatewayAdmin(self)
        self.labels = GatewayFeedback(self)

    def _pick_primary(self) -> Upstream:
        """The primary replica with the fewest requests in flight (round robin among equals)."""
        pool = [self.cfg.primary, *self.cfg.replicas]
        if len(pool) == 1:
            return pool[0]
        self._rr = (self._rr + 1) % len(pool)
        order = pool[self._rr:] + pool[:self._rr]
        return min(order, key=lambda u: self.inflight.get(u.url, 0))

    # -- lifecycle ------------------------------------------------------------------
    async def startup(self, client: aiohttp.ClientSession | None = None,
                      sink: aiohttp.ClientSession | None = None) -> None:
        """Start its senders; ``client`` and ``sink``: connection pools to the model servers and to the sink
        shared with other gateways (kept open at shutdown)."""
        self._own_client = client is None
        self.client = client or http_session(256, self.cfg.upstream_timeout)
        self.events = start_event_logger(self.cfg, self.metrics, sink)
        self.labels.start()
        if self.cfg.shadow_percent > 0 and self.cfg.canary is not None:
            await self.set_shadow(self.cfg.shadow_percent)

    async def shutdown(self) -> None:
        if self.shadow is not None:
            await self.shadow.close()
        if self.events is not None:
            await self.events.close()
            if self.events.outbox is not None:
                self.events.outbox.close()
        await self.labels.close()
        if self.client is not None and self._own_client:
            await self.client.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):  # noqa: ANN201
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    # -- inference ------------------------------------------------------------------
    def _refuse(self, status: int, reason: str, message: str) -> Response:
        self.metrics.rejected.labels(reason=reason).inc()
        return error_response(status, message)

    async def infer(self, request: Request, path: str) -> Response:
        body = await read_body(request, self.cfg.max_payload_bytes)
        if body is None:
            return self._refuse(413, "too_large",
                                f"payload larger than serving.max_payload_bytes ({self.cfg.max_payload_bytes} bytes)")
        headers = request.headers
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "deflate"):
            try:
                body = _decompress(body, encoding, self.cfg.max_payload_bytes)
            except ValueError as exc:
                return self._refuse(413 if "larger" in str(exc) else 400, "bad_encoding", str(exc))
        elif encoding != "identity":
            return self._refuse(415, "bad_encoding", f"Content-Encoding {encoding!r} is not supported; send the body "
                                                     "plain or gzip-compressed")
        request_hlen = None
        if HEADER_LENGTH in headers:
            raw = headers[HEADER_LENGTH].strip()
            if not raw.isdigit() or not 0 < int(raw) <= len(body):
                return self._refuse(400, "bad_header_length", f"{HEADER_LENGTH} is {raw[:20]!r}; it must be the byte "
                                                               f"length of the JSON header, 1..{len(body)}")
            request_hlen = int(raw)
        client_id = headers.get("x-request-id") or headers.get("ce-id")
        if client_id is not None and (not client_id or len(client_id) > MAX_ID_CHARS):
            return self._refuse(400, "bad_request_id", f"x-request-id must be 1..{MAX_ID_CHARS} characters")
        if client_id is not None and (conflict := self._claim_id(client_id, body)):
            return self._refuse(409, "request_id_reused", conflict)
        request_id = client_id or uuid.uuid4().hex
        key = headers.get(self.cfg.sticky_key) if self.cfg.sticky_key else None
        role = self.splitter.choose(key)
        upstream = self.cfg.canary if role == CANARY and self.cfg.canary is not None else self.cfg.primary
        if upstream is self.cfg.primary:
            role = PRIMARY
            upstream = self._pick_primary()
        fwd = {k: v for k, v in headers.items() if k in _FORWARD_HEADERS}
        if "content-type" not in fwd and request_hlen is None:
            fwd["content-type"] = "application/json"  # else aiohttp says octet-stream, which kserve reads as binary
        fwd["x-request-id"] = request_id
        client_scores = headers.get(SCORES_HEADER, "").lower() in ("1", "true", "yes")
        if self.events is not None:  # the log gets the class scores (quality estimate); the client only if asked
            fwd[SCORES_HEADER] = "true"
        start = time.perf_counter()
        server_error: bool | None = None
        self.inflight[upstream.url] = self.inflight.get(upstream.url, 0) + 1
        try:
            status, content, resp_headers = await self._send("POST", upstream.url + path, body, fwd)
            ctype = resp_headers.get("content-type", "application/json")
            raw_hlen = resp_headers.get(HEADER_LENGTH, "")
            response_hlen = int(raw_hlen) if raw_hlen.isdigit() else None
        except _UpstreamFailed as exc:
            status, ctype, server_error, response_hlen = 502, "application/json", exc.counts, None
            content = json.dumps({"error": f"{role} model server at {upstream.url} failed: {exc}"}).encode()
        finally:
            self.inflight[upstream.url] -= 1
            if not self.inflight[upstream.url]:
                del self.inflight[upstream.url]
        elapsed = time.perf_counter() - start
        self.stats.record(role=role, version=upstream.version, request_id=request_id, status=status,
                          latency_ms=elapsed * 1000.0, body=content, server_error=server_error)
        self.metrics.requests.labels(role, upstream.version, str(status)).inc()
        self.metrics.latency.labels(role).observe(elapsed)
        if self.shadow is not None and role == PRIMARY and 200 <= status < 300:
            self.shadow.offer(request_id, path, body, fwd, content)  # after the answer; never waits on the shadow
        if self.events is not None and 200 <= status < 300:
            self.events.submit(request_id, role, upstream.version, path, body, content, request_hlen, response_hlen)
            if not client_scores and response_hlen is not None:
                content, response_hlen = without_binary_scores(content, response_hlen, SCORES_OUTPUT)
            elif not client_scores:
                content = _without_scores(content)
        out_headers = {"content-type": ctype, "x-request-id": request_id, "ce-id": request_id,
                       "x-model-version": upstream.version, "x-serving-role": role}
        if response_hlen is not None:
            out_headers[HEADER_LENGTH] = str(response_hlen)
        return Response(content, status_code=status, media_type=None, headers=out_headers)

    def _claim_id(self, request_id: str, body: bytes) -> str | None:
        """Remember a client's request id with its body; a different body under an id already used is a
        conflict (the message), because labels are joined to the prediction by that id. The same body
        again (a client's retry) is fine."""
        digest = hashlib.blake2b(body, digest_size=16).digest()
        known = self.request_ids.get(request_id)
        if known is not None and known != digest:
            return (f"x-request-id {request_id!r:.80} was already used for a different request; labels are joined "
                    "to predictions by this id, so each request needs its own (a retry of the same body may reuse it)")
        self.request_ids[request_id] = digest
        self.request_ids.move_to_end(request_id)
        while len(self.request_ids) > self.cfg.request_ids:
            self.request_ids.popitem(last=False)
        return None

    async def _send(self, method: str, url: str, body: bytes | None = None,
                    headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        """One upstream round trip. A pooled keep-alive connection that the model server closed
        fails before any response byte arrives; that is retried once, on a fresh connection."""
        assert self.client is not None
        for attempt in (1, 2):
            try:
                async with self.client.request(method, url, data=body, headers=headers) as resp:
                    try:
                        content = await resp.read()
                    except asyncio.TimeoutError as exc:
                        raise _UpstreamFailed(f"too slow: {exc!r}", counts=True) from exc
                    except aiohttp.ClientError as exc:
                        raise _UpstreamFailed(f"connection dropped during the response: {exc!r}",
                                              counts=False) from exc
                    return resp.status, content, resp.headers
            except _UpstreamFailed:
                raise
            except aiohttp.ClientConnectorError as exc:
                raise _UpstreamFailed(f"unreachable: {exc!r}", counts=True) from exc
            except asyncio.TimeoutError as exc:  # aiohttp's timeouts are asyncio.TimeoutError subclasses
                raise _UpstreamFailed(f"too slow: {exc!r}", counts=True) from exc
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if attempt == 1:
                    log.debug("connection to %s dropped before a response (%r); retrying once", url, exc)
                    self.metrics.retries.inc()
                    continue
                raise _UpstreamFailed(f"connection dropped twice before a response: {exc!r}", counts=False) from exc
            except aiohttp.ClientError as exc:
                raise _UpstreamFailed(repr(exc), counts=False) from exc
        raise AssertionError("unreachable")

    async def passthrough(self, path: str) -> Response:
        """Liveness, health, readiness and metadata: answered by the primary."""
        try:
            status, content, headers = await self._send("GET", self.cfg.primary.url + path)
        except _UpstreamFailed as exc:
            return error_response(502, f"primary model server at {self.cfg.primary.url} failed: {exc}")
        return Response(content, status_code=status,
                        headers={"content-type": headers.get("content-type", "application/json")})

    async def oip(self, request: Request) -> Response:
        """The Open Inference Protocol routes of :mod:`serving.oip`, checked on the raw path; nothing
        else is forwarded (404, or 405 with ``Allow`` for a known route and another method)."""
        raw = request.scope.get("raw_path") or request.url.path.encode()
        found = match_route(request.method, raw, self.cfg.name)
        if found.kind is None:
            self.metrics.rejected.labels(reason="no_route" if found.status == 404 else "method").inc()
            return StrictJSON({"error": found.error}, status_code=found.status,
                              headers={"allow": found.allow} if found.allow else None)
        if found.kind == "infer":
            return await self.infer(request, found.path)
        return await self.passthrough(found.path)

    async def openapi(self, request: Request) -> Response:
        from serving.gateway_openapi import gateway_openapi

        return StrictJSON(gateway_openapi(self.cfg.name))

    async def set_shadow(self, percent: float) -> None:
        """Mirror ``percent`` of served requests to the canary upstream (0, or no canary: no mirror)."""
        from driftloop.core.shadow import SHADOW_SUFFIX
        from serving.shadow import SHADOW, ShadowMirror

        if self.shadow is not None:
            await self.shadow.close()
            self.shadow = None
        if percent > 0 and self.cfg.canary is not None:
            events = self.events
            self.shadow = ShadowMirror(
                self.cfg.canary.url, self.cfg.canary.version, percent, timeout=self.cfg.shadow_timeout,
                seed=self.cfg.seed, log_event=(lambda rid, version, path, body, content: events.submit(
                    f"{rid}{SHADOW_SUFFIX}", SHADOW, version, path, body, content)) if events is not None else None)
            self.shadow.start()
        self.cfg.shadow_percent = percent if self.shadow is not None else 0.0

    async def metrics_route(self, request: Request) -> Response:
        if self.events is not None:
            self.metrics.queue_depth.set(self.events.queue.qsize())
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return StrictJSON({"ok": True})

    def model_routes(self) -> list[tuple[str, Any, list[str]]]:
        """The routes of this model other than the inference protocol's: ``(path, endpoint, methods)``.
        A one-model gateway serves them at its root; the fleet gateway under ``/models/<name>``."""
        return [
            ("/feedback", self.labels.feedback, ["POST"]),
            ("/admin/split", self.admin.split, ["PUT"]),
            ("/admin/upstreams", self.admin.upstreams, ["PUT"]),
            ("/admin/replicas", self.admin.replicas, ["PUT"]),
            ("/admin/status", self.admin.status, ["GET"]),
            ("/admin/stats", self.admin.stats_route, ["GET"]),
            ("/admin/shadow", self.admin.shadow_route, ["GET", "PUT"]),
            ("/metrics", self.metrics_route, ["GET"]),
        ]


def _without_scores(content: bytes) -> bytes:
    """The response as the client would have had it without the scores the gateway asked for
    (V1 ``scores``/``classes`` keys, the V2 ``scores`` output)."""
    if b'"scores"' not in content:
        return content
    try:
        doc = orjson.loads(content)
    except ValueError:
        try:
            doc = json.loads(content)  # NaN/Infinity, which orjson refuses
        except ValueError:
            return content
    if not isinstance(doc, dict):
        return content
    if "scores" in doc:
        doc.pop("scores", None)
        doc.pop("classes", None)
    elif isinstance(doc.get("outputs"), list):
        doc["outputs"] = [o for o in doc["outputs"] if not (isinstance(o, dict) and o.get("name") == "scores")]
    try:
        return orjson.dumps(doc)
    except TypeError:
        return json.dumps(doc, separators=(",", ":")).encode()


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate body, inflated to at most ``limit`` bytes; ``ValueError`` naming the problem."""
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"the body is not valid {encoding} (Content-Encoding: {encoding}): {exc}") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise ValueError(f"the {encoding} body inflates to larger than serving.max_payload_bytes ({limit} bytes)")
    if not inflater.eof:
        raise ValueError(f"the {encoding} body is truncated (Content-Encoding: {encoding})")
    return out


def _feedback_url(sink_url: str | None) -> str | None:
    """The monitor's ``/feedback`` next to its ``/events`` sink."""
    if not sink_url or not sink_url.rstrip("/").endswith("/events"):
        return None
    return sink_url.rstrip("/")[: -len("/events")] + "/feedback"


def oip_routes(endpoint: Any) -> list[Route]:
    """Every path the Open Inference Protocol may use, to ``endpoint`` (which checks the raw path and answers
    404, or 405 with ``Allow``, itself)."""
    every = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    return [Route(path, endpoint, methods=every) for path in ("/", "/v1", "/v1/{tail:path}", "/v2", "/v2/{tail:path}")]


def create_gateway_app(cfg: GatewayConfig) -> Starlette:
    """The gateway as an ASGI app (serve it with uvicorn on 127.0.0.1)."""
    gw = _Gateway(cfg)
    routes = [
        *oip_routes(gw.oip),
        Route("/openapi.json", gw.openapi, methods=["GET"]),
        *(Route(path, endpoint, methods=methods) for path, endpoint, methods in gw.model_routes()),
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
    p.add_argument("--replica-url", action="append", default=[], help="another server of the primary's version "
                   "(repeat); traffic is balanced over the primary and these")
    p.add_argument("--canary-url")
    p.add_argument("--canary-version")
    p.add_argument("--canary-percent", type=float, default=0.0)
    p.add_argument("--sticky-key")
    p.add_argument("--sink-url", help="inference-log sink (POST /events); unset = no logging")
    p.add_argument("--serving-state", help="driftloop serve's state file: its restart counts and what is down "
                   "are exposed in /metrics (driftloop_serve_restarts_total, driftloop_serve_down)")
    p.add_argument("--feedback-url", help="the monitor's POST /feedback (default: the sink URL's /feedback)")
    p.add_argument("--feedback-outbox", help="SQLite file for labels the monitor has not taken yet; "
                                             "unset = labels stay in the gateway only")
    p.add_argument("--event-outbox", help="SQLite file for inference-log events the sink has not taken yet, "
                                          "retried with back-off; unset = kept in memory only, dropped on failure")
    p.add_argument("--event-outbox-max-rows", type=int, default=200_000, help="events the outbox holds at most")
    p.add_argument("--event-outbox-max-bytes", type=int, default=512 * 1024 * 1024,
                   help="bytes of events the outbox holds at most")
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
                        feedback_outbox=args.feedback_outbox, event_outbox=args.event_outbox,
                        event_outbox_max_rows=args.event_outbox_max_rows,
                        event_outbox_max_bytes=args.event_outbox_max_bytes,
                        ingest_token=os.environ.get(INGEST_TOKEN_ENV) or None, serving_state=args.serving_state,
                        replicas=[Upstream(u, args.primary_version) for u in args.replica_url],
                        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if cfg.admin_token is None:
        log.warning("%s is not set: PUT /admin/split and /admin/upstreams refuse every call", ADMIN_TOKEN_ENV)
    if cfg.ingest_token is None and (cfg.sink_url or cfg.feedback_url):
        log.warning("%s is not set: events and labels are sent without a bearer token, and a monitor that "
                    "requires one refuses them", INGEST_TOKEN_ENV)
    uvicorn.run(create_gateway_app(cfg), host=args.host, port=args.port, log_level="warning", access_log=False,
                proxy_headers=False, server_header=False)


if __name__ == "__main__":
    main()
