"""What every part of the local gateway shares: its configuration (:class:`GatewayConfig`, the
:class:`Upstream` model servers and their checks), its Prometheus metrics, the bearer-token check of the
routes that change state, and strict JSON in (NaN/Infinity refused) and out (never a 500).

The request path (:mod:`serving.gateway`), its admin API (:mod:`serving.gateway_admin`), its ``/feedback``
route (:mod:`serving.gateway_feedback`) and its inference-log events (:mod:`serving.gateway_events`) build
on this module; it imports none of them.
"""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = ["ADMIN_TOKEN_ENV", "INGEST_TOKEN_ENV", "MAX_ID_CHARS", "Upstream", "GatewayConfig", "check_upstream",
           "check_percent", "GatewayMetrics", "ServeSupervision", "http_session", "StrictJSON", "error_response",
           "strict_loads", "read_body", "check_bearer"]

# The bearer token that PUT /admin/* needs; read from the environment only.
ADMIN_TOKEN_ENV = "DRIFTLOOP_GATEWAY_TOKEN"
# The bearer token the gateway sends with every POST to the sink's /events and the monitor's /feedback.
INGEST_TOKEN_ENV = "DRIFTLOOP_INGEST_TOKEN"
#: longest request id (``x-request-id``, a label's ``id``) the gateway accepts
MAX_ID_CHARS = 256
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}


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
    senders: int = 2  # concurrent batch POSTs to the sink
    sink_timeout: float = 2.0
    sink_linger: float = 0.05  # seconds a sender waits for more events before it posts a batch
    seed: int | None = None
    source: str = field(default="")
    admin_token: str | None = field(default=None, repr=False)
    max_feedback_bytes: int = 1024 * 1024
    feedback_url: str | None = None  # the monitor's POST /feedback; labels are forwarded there
    feedback_outbox: str | None = None  # SQLite file keeping labels the monitor has not taken yet
    replicas: list[Upstream] = field(default_factory=list)  # more servers of the primary's version
    shadow_percent: float = 0.0  # share of served requests mirrored to the canary upstream (serving.shadow)
    shadow_timeout: float = 2.0
    ingest_token: str | None = field(default=None, repr=False)  # sent to the sink and /feedback
    event_outbox: str | None = None  # SQLite file keeping events the sink has not taken yet (None: drop them)
    event_outbox_max_rows: int = 200_000
    event_outbox_max_bytes: int = 512 * 1024 * 1024
    event_retry_seconds: float = 1.0
    request_ids: int = 100_000  # client request ids remembered, to refuse one reused for other rows
    serving_state: str | None = None  # serve's state file: its restarts and what is down, exposed in /metrics

    def __post_init__(self) -> None:
        check_percent(self.canary_percent)
        if self.canary_percent > 0 and self.canary is None:
            raise ValueError("a canary percentage above 0 needs a canary upstream")


def check_upstream(doc: Any, role: str, own: tuple[str, int] | None = None) -> Upstream:
    """``{"url": "http(s)://host:port", "version": "<str>"}`` → an :class:`Upstream`, or ``ValueError``
    naming the problem; ``own`` (host, port) is the gateway itself, which may not be its own upstream."""
    from urllib.parse import urlsplit

    if not isinstance(doc, dict) or set(doc) - {"url", "version"} or "url" not in doc or "version" not in doc:
        raise ValueError(f'{role} must be {{"url": "http://host:port", "version": "<model version>"}}, got {doc!r:.120}')
    url, version = doc["url"], doc["version"]
    if not isinstance(version, str) or not version.strip() or len(version) > 200:
        raise ValueError(f"{role} version must be a non-empty string (the MLflow version), got {version!r:.60}")
    if not isinstance(url, str):
        raise ValueError(f"{role} url must be a string, got {url!r:.60}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{role} url {url!r:.120} is not a URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{role} url {url!r:.120} must be http:// or https:// with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{role} url {url!r:.120} must be a plain http(s)://host:port without query or credentials")
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    if own is not None and port == own[1] and (host == own[0] or (host in _LOOPBACK and own[0] in _LOOPBACK)):
        raise ValueError(f"{role} url {url!r:.120} is this gateway itself; requests would loop")
    return Upstream(url, version)


def check_percent(value: Any) -> float:
    """A canary percentage in [0, 100], or ``ValueError`` naming the problem."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"canary_percent must be a number between 0 and 100, got {value!r}")
    if not 0 <= value <= 100:
        raise ValueError(f"canary_percent must be between 0 and 100, got {value}")
    return float(value)


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own (``GET /metrics``)."""

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
        self.retries = Counter("driftloop_gateway_upstream_retries_total",
                               "Requests sent again because a pooled connection dropped before a response",
                               registry=r)
        self.feedback_outbox = Gauge("driftloop_gateway_feedback_outbox", "Label batches in the gateway's outbox: "
                                     "waiting for the monitor (pending) or refused by it and set aside (dead)",
                                     ["state"], registry=r)
        self.event_outbox = Gauge("driftloop_gateway_event_outbox", "Inference-log events in the gateway's outbox: "
                                  "waiting for the sink (pending) or refused by it (dead)", ["state"], registry=r)


class ServeSupervision:
    """``driftloop serve``'s supervision in the gateway's ``/metrics``: restarts per role (a counter that
    survives the gateway's own restarts, since ``serve`` counts them in its state file) and what is down
    now. Read from the state file when scraped; an unreadable file exposes no samples rather than failing
    the scrape."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def collect(self):  # noqa: ANN201 (prometheus_client's collector protocol)
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        restarts = CounterMetricFamily("driftloop_serve_restarts", "Processes driftloop serve restarted after "
                                       "they died or failed readiness, by role", labels=["role"])
        down = GaugeMetricFamily("driftloop_serve_down", "1 while serve's process of this role is down and "
                                 "waiting for its restart", labels=["role"])
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            state = {}
        counts = state.get("restarts") if isinstance(state, dict) else None
        for role, n in sorted((counts or {}).items()):
            if isinstance(n, int):
                restarts.add_metric([str(role)], n)
        out = state.get("down") if isinstance(state, dict) else None
        replicas = state.get("replicas") if isinstance(state, dict) else None
        roles = {"primary", "canary", "gateway", *(out or {}), *(counts or {}),
                 *(r.get("role") for r in (replicas or []) if isinstance(r, dict) and r.get("role"))}
        for role in sorted(roles):
            down.add_metric([str(role)], 1.0 if role in (out or {}) else 0.0)
        yield restarts
        yield down


def http_session(connections: int, timeout: float) -> aiohttp.ClientSession:
    """A keep-alive aiohttp session for loopback HTTP (no proxies from the environment, no cookies)."""
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=30, ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                 cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
                                 skip_auto_headers=("User-Agent", "Accept-Encoding"))


class StrictJSON(JSONResponse):
    """JSON that is always valid: a NaN/Infinity that slipped into a document becomes null instead of
    failing the response (Starlette's JSONResponse refuses them with a 500)."""

    def render(self, content: Any) -> bytes:
        try:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()
        except ValueError:
            return json.dumps(_finite(content), allow_nan=False, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return StrictJSON({"error": message, **extra}, status_code=status)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (send a finite number)")


def strict_loads(body: bytes, what: str) -> Any:
    """Strict JSON (NaN/Infinity refused), or ``ValueError`` naming ``what``."""
    try:
        return json.loads(body, parse_constant=_no_constants)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from exc


async def read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is larger than ``limit`` bytes (declared, or as it streams in)."""
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


def check_bearer(request: Request, cfg: GatewayConfig, metrics: GatewayMetrics, *, use: str = "admin"
                 ) -> Response | None:
    """401 unless the request carries the bearer token for ``use``: ``admin`` (the split and the
    upstreams: the gateway's admin token) or ``feedback`` (labels: the workspace's ingest token, the one
    the monitor's own ``/feedback`` takes — labels decide quality alerts and rollouts)."""
    token, env = (cfg.admin_token, ADMIN_TOKEN_ENV) if use == "admin" else (cfg.ingest_token, INGEST_TOKEN_ENV)
    if not token:
        metrics.rejected.labels(reason=f"{use}_not_configured").inc()
        return error_response(401, f"{use} endpoints are locked: {env} is not set on the gateway")
    given = request.headers.get("authorization", "")
    if not given.lower().startswith("bearer ") or not hmac.compare_digest(given[7:].strip().encode(),
                                                                           token.encode()):
        metrics.rejected.labels(reason=f"{use}_unauthorized").inc()
        return error_response(401, f"missing or wrong bearer token (the gateway's {env})")
    return None
