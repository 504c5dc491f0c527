"""The gateway's admin API: ``PUT /admin/split``, ``/admin/upstreams``, ``/admin/replicas`` and
``/admin/shadow`` change where traffic goes and need the admin bearer token
(``DRIFTLOOP_GATEWAY_TOKEN``); ``GET /admin/status``, ``/admin/stats`` and ``/admin/shadow`` report it.

A refused call changes nothing: every body is checked whole (strict JSON, at most 64 KiB, known keys,
percentages in [0, 100], upstreams that are plain ``http(s)://host:port`` other than the gateway itself)
before the split, the upstreams or the replicas are touched.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from serving.gateway_base import (GatewayConfig, GatewayMetrics, StrictJSON, check_bearer, check_percent,
                                  check_upstream, error_response, read_body, strict_loads)
from serving.gateway_events import EventLogger
from serving.traffic import Splitter, TrafficStats

if TYPE_CHECKING:
    from serving.shadow import ShadowMirror

__all__ = ["GatewayAdmin", "parse_since"]

log = logging.getLogger(__name__)

_MAX_ADMIN_BYTES = 64 * 1024


class _Routing(Protocol):
    """What the admin API reads and changes of the gateway's request path."""

    cfg: GatewayConfig
    metrics: GatewayMetrics
    splitter: Splitter
    stats: TrafficStats
    events: EventLogger | None
    shadow: ShadowMirror | None
    inflight: dict[str, int]

    async def set_shadow(self, percent: float) -> None: ...


class GatewayAdmin:
    """The ``/admin`` routes of one gateway."""

    def __init__(self, gw: _Routing) -> None:
        self.gw = gw

    def status_doc(self) -> dict[str, Any]:
        gw, cfg = self.gw, self.gw.cfg
        return {
            "name": cfg.name,
            "canary_percent": gw.splitter.canary_percent,
            "sticky_key": cfg.sticky_key,
            "primary": asdict(cfg.primary),
            "canary": asdict(cfg.canary) if cfg.canary else None,
            "replicas": [asdict(u) for u in cfg.replicas],
            "inflight": dict(gw.inflight),
            "sink_url": cfg.sink_url,
            "events_queued": gw.events.queue.qsize() if gw.events else 0,
        }

    async def status(self, request: Request) -> Response:
        return StrictJSON(self.status_doc())

    def _unauthorized(self, request: Request) -> Response | None:
        """401 unless the request carries the gateway's admin token (see :func:`check_bearer`)."""
        return check_bearer(request, self.gw.cfg, self.gw.metrics, use="admin")

    @staticmethod
    async def _admin_doc(request: Request) -> Any:
        body = await read_body(request, _MAX_ADMIN_BYTES)
        if body is None:
            raise ValueError(f"body larger than {_MAX_ADMIN_BYTES} bytes")
        return strict_loads(body, "body")

    async def split(self, request: Request) -> Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        gw, cfg = self.gw, self.gw.cfg
        try:
            doc = await self._admin_doc(request)
            if not isinstance(doc, dict) or set(doc) != {"canary_percent"}:
                raise ValueError('expected {"canary_percent": <0-100>}')
            pct = check_percent(doc["canary_percent"])
            if pct > 0 and cfg.canary is None:
                raise ValueError("no canary upstream is set; PUT /admin/upstreams first")
        except ValueError as exc:
            return error_response(400, str(exc))
        gw.splitter.canary_percent = pct
        cfg.canary_percent = pct
        gw.metrics.canary_percent.set(pct)
        log.info("canary split set to %s%%", pct)
        return StrictJSON(self.status_doc())

    async def upstreams(self, request: Request) -> Response:
        """Replace primary and/or canary (``{"primary": {"url", "version"}, "canary": {...} | null}``)."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        gw, cfg = self.gw, self.gw.cfg
        own = request.scope.get("server")
        own = (str(own[0]), int(own[1])) if own and own[1] is not None else None
        try:
            doc = await self._admin_doc(request)
            if not isinstance(doc, dict) or not ({"primary", "canary"} & doc.keys()):
                raise ValueError('expected {"primary": {"url": .., "version": ..}} and/or {"canary": {...} | null}')
            if set(doc) - {"primary", "canary", "canary_percent"}:
                raise ValueError(f"unknown key(s) {sorted(set(doc) - {'primary', 'canary', 'canary_percent'})}")
            primary = check_upstream(doc["primary"], "primary", own) if "primary" in doc else cfg.primary
            canary = ((check_upstream(doc["canary"], "canary", own) if doc["canary"] is not None else None)
                      if "canary" in doc else cfg.canary)
            pct = check_percent(doc.get("canary_percent", gw.splitter.canary_percent))
            if canary is None:
                pct = 0.0
        except ValueError as exc:
            return error_response(400, f"bad upstreams: {exc}")
        if primary.url != cfg.primary.url or primary.version != cfg.primary.version:
            cfg.replicas = []  # they served the primary that was replaced
        cfg.primary, cfg.canary = primary, canary
        gw.splitter.canary_percent = cfg.canary_percent = pct
        gw.metrics.canary_percent.set(pct)
        if gw.shadow is not None and (canary is None or canary.url != gw.shadow.url):
            await gw.set_shadow(0.0 if canary is None else cfg.shadow_percent)  # the mirror follows the canary
        return StrictJSON(self.status_doc())

    async def shadow_route(self, request: Request) -> Response:
        """``PUT {"percent": 0-100}``: mirror that share of served requests to the canary upstream (0 stops);
        ``GET ?since=``: the joined shadow statistics."""
        gw, cfg = self.gw, self.gw.cfg
        if request.method == "GET":
            since_raw = request.query_params.get("since")
            try:
                since = parse_since(since_raw) if since_raw else None
            except ValueError as exc:
                return error_response(400, str(exc))
            summary = gw.shadow.stats.summary(since) if gw.shadow is not None else None
            return StrictJSON({"percent": cfg.shadow_percent, "version": cfg.canary.version
                               if gw.shadow is not None and cfg.canary else None, "stats": summary})
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            doc = await self._admin_doc(request)
            if not isinstance(doc, dict) or set(doc) != {"percent"}:
                raise ValueError('expected {"percent": <0-100>}')
            pct = check_percent(doc["percent"])
            if pct > 0 and cfg.canary is None:
                raise ValueError("no canary upstream to mirror to; PUT /admin/upstreams first")
        except ValueError as exc:
            return error_response(400, str(exc).replace("canary_percent", "percent"))
        await gw.set_shadow(pct)
        log.info("shadow mirror set to %s%%", pct)
        return StrictJSON({"percent": cfg.shadow_percent})

    async def replicas(self, request: Request) -> Response:
        """Set the primary's extra replicas: ``{"replicas": [{"url", "version"}, ...]}`` (``[]``: the
        primary alone). Each must serve the primary's version. Requests in flight on a replica that
        is taken out are still answered; ``GET /admin/status`` shows them under ``inflight``."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        cfg = self.gw.cfg
        own = request.scope.get("server")
        own = (str(own[0]), int(own[1])) if own and own[1] is not None else None
        try:
            doc = await self._admin_doc(request)
            if not isinstance(doc, dict) or set(doc) != {"replicas"} or not isinstance(doc["replicas"], list):
                raise ValueError('expected {"replicas": [{"url": .., "version": ..}, ...]}')
            if len(doc["replicas"]) > 256:
                raise ValueError("at most 256 replicas")
            found = [check_upstream(d, f"replica {i}", own) for i, d in enumerate(doc["replicas"])]
            urls = [u.url for u in found] + [cfg.primary.url]
            if len(set(urls)) != len(urls):
                raise ValueError("replica urls must be distinct and differ from the primary's")
            for u in found:
                if u.version != cfg.primary.version:
                    raise ValueError(f"replica {u.url} serves version {u.version}, the primary serves "
                                     f"{cfg.primary.version}")
        except ValueError as exc:
            return error_response(400, f"bad replicas: {exc}")
        cfg.replicas = found
        log.info("primary replicas: %d", 1 + len(found))
        return StrictJSON(self.status_doc())

    async def stats_route(self, request: Request) -> Response:
        since_raw = request.query_params.get("since")
        try:
            since = parse_since(since_raw) if since_raw else None
        except ValueError as exc:
            return error_response(400, str(exc))
        return StrictJSON({"status": self.status_doc(), "versions": self.gw.stats.summary(since)})


def parse_since(raw: str) -> float:
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
