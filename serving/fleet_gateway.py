"""The fleet gateway: one process, one port, in front of every model of a fleet.

Each model keeps the whole gateway it has alone (:class:`serving.gateway._Gateway`): its own traffic
split and canary, primary replicas, inference log to *its* sink URL (``/models/<name>/events`` on the
fleet's monitor) with its own ingest token and event outbox, ``/feedback`` store and outbox, per-version
statistics and Prometheus metrics. This module only dispatches:

* the Open Inference Protocol routes (:mod:`serving.oip`, checked on the raw path) by the model name
  in the path — ``/v1/models/<name>:predict``, ``/v2/models/<name>/infer``, ``/v2/models/<name>/ready``,
  … — to that model's gateway, which forwards them unchanged (a packed model server hosts several
  models, each under its own name); a name the fleet does not serve is **404** with a JSON error
  naming it, never forwarded;
* each model's own routes under ``/models/<name>``: ``/models/<name>/admin/split`` (and
  ``upstreams``, ``replicas``, ``shadow``: the admin bearer token ``DRIFTLOOP_GATEWAY_TOKEN``, one for
  the fleet gateway), ``/models/<name>/admin/status``, ``/admin/stats``, ``/models/<name>/feedback``
  (the model's ingest token) and ``/models/<name>/metrics`` (its series alone);
* its own: ``GET /admin/models`` (every model and its split, upstreams, versions), ``GET /metrics``
  (every model's series with a ``model`` label: one scrape target for the fleet), ``/healthz``,
  ``/openapi.json``; ``GET /v1/models`` lists the models, ``/v2/health/live|ready`` answer for the
  gateway itself.

A model whose model server is down answers 502 for that model only; the others keep answering. All
models share one keep-alive connection pool to the model servers and one to the monitor. Each model's inference log has one
sender that waits up to ``0.05 s × models`` (at most 1 s) for more events before it posts a batch, so
fifty models make about as many POSTs to the monitor as one (an event reaches the monitor up to a second
later; nothing waits for it).

``python -m serving.fleet_gateway --config FILE`` reads the models from a JSON file (written by
:mod:`serving.fleet_backend`): ``{"models": [{"name", "primary": {"url", "version"}, "canary",
"canary_percent", "replicas", "sink_url", "feedback_url", "feedback_outbox", "event_outbox",
"serving_state", "sticky_key", "max_payload_bytes", "namespace", "ingest_token_file"}, ...]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.gateway import _feedback_url, _Gateway, oip_routes
from serving.gateway_base import (ADMIN_TOKEN_ENV, INGEST_TOKEN_ENV, GatewayConfig, StrictJSON, check_percent,
                                  check_upstream, http_session)
from serving.oip import NAME_PATTERN, match_route

__all__ = ["FleetGateway", "create_fleet_gateway_app", "fleet_configs", "main", "MODEL_PREFIX"]

log = logging.getLogger(__name__)

#: longest a model's event sender waits for more events before it posts a batch (its linger grows with the
#: number of models, so that the fleet's POSTs to the monitor stay as many as one model's)
_MAX_LINGER = 1.0
#: where a model's own routes (admin, feedback, metrics) live on the fleet gateway
MODEL_PREFIX = "/models/{model}"


class _ModelLabelled:
    """Every model's gateway metrics in one exposition, each sample with a ``model`` label (one family per
    metric name, as Prometheus expects of one target)."""

    def __init__(self, models: dict[str, _Gateway]) -> None:
        self.models = models

    def collect(self):  # noqa: ANN201 (prometheus_client's collector protocol)
        merged: dict[str, Metric] = {}
        for name, gw in self.models.items():
            if gw.events is not None:
                gw.metrics.queue_depth.set(gw.events.queue.qsize())
            for family in gw.metrics.registry.collect():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                out.samples.extend(Sample(s.name, {"model": name, **s.labels}, s.value, s.timestamp, s.exemplar)
                                   for s in family.samples)
        yield from merged.values()


class FleetGateway:
    """The models' gateways behind one app: dispatch by name, the fleet's own routes."""

    def __init__(self, configs: list[GatewayConfig], *, connections: int = 1024) -> None:
        names = [cfg.name for cfg in configs]
        if not configs or len(set(names)) != len(names):
            raise ValueError(f"a fleet gateway needs at least one model and distinct names, got {names}")
        for cfg in configs:  # many models: as many POSTs to the monitor as one model makes, not one per request
            if len(configs) > 1:
                cfg.senders = 1
                cfg.sink_linger = min(_MAX_LINGER, cfg.sink_linger * len(configs))
        self.models: dict[str, _Gateway] = {cfg.name: _Gateway(cfg) for cfg in configs}
        self._routes = {name: {path: endpoint for path, endpoint, _ in gw.model_routes()}
                        for name, gw in self.models.items()}
        self.connections = connections
        self.registry = CollectorRegistry()
        self.registry.register(_ModelLabelled(self.models))
        self.rejected = Counter("driftloop_fleet_gateway_rejected_total", "Requests the fleet gateway refused "
                                "before any model's gateway saw them", ["reason"], registry=self.registry)

    # -- lifecycle ------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):  # noqa: ANN201
        timeout = max(gw.cfg.upstream_timeout for gw in self.models.values())
        client = http_session(self.connections, timeout)
        sink = http_session(16, max(gw.cfg.sink_timeout for gw in self.models.values()))
        started: list[_Gateway] = []
        try:
            for gw in self.models.values():
                await gw.startup(client, sink)
                started.append(gw)
            # what startup made (imports, every model's routes, registries and loggers) lives as long as the
            # process: out of the collector's way, a full collection no longer walks it (~100 ms each)
            gc.collect()
            gc.freeze()
            yield
        finally:
            for gw in started:
                try:
                    await gw.shutdown()
                except Exception:  # noqa: BLE001 (one model's failing shutdown never keeps the others' outboxes open)
                    log.exception("stopping model %s's gateway failed", gw.cfg.name)
            await client.close()
            await sink.close()

    # -- dispatch -------------------------------------------------------------------
    def _unknown(self, name: str) -> Response:
        self.rejected.labels(reason="unknown_model").inc()
        served = sorted(self.models)
        listed = ", ".join(served[:20]) + (f", … ({len(served)} in all)" if len(served) > 20 else "")
        return StrictJSON({"error": f"model {name!r:.120} is not served by this gateway; it serves {listed} "
                                    "(GET /admin/models)"}, status_code=404)

    async def oip(self, request: Request) -> Response:
        """The Open Inference Protocol routes, to the gateway of the model the path names."""
        raw = request.scope.get("raw_path") or request.url.path.encode()
        found = match_route(request.method, raw, None)
        if found.kind is None:
            self.rejected.labels(reason="no_route" if found.status == 404 else "method").inc()
            return StrictJSON({"error": found.error}, status_code=found.status,
                              headers={"allow": found.allow} if found.allow else None)
        if found.name is None:
            return self._own(found.path)
        gw = self.models.get(found.name)
        if gw is None:
            return self._unknown(found.name)
        if found.kind == "infer":
            return await gw.infer(request, found.path)
        return await gw.passthrough(found.path)

    def _own(self, path: str) -> Response:
        """The routes without a model name, answered by the fleet gateway itself."""
        if path == "/v1/models":
            return StrictJSON({"models": sorted(self.models)})
        if path.startswith("/v2/health/"):
            return StrictJSON({path.rsplit("/", 1)[1]: True})
        if path == "/v2":
            return StrictJSON({"name": "driftloop fleet gateway", "version": "1", "extensions": [],
                               "models": sorted(self.models)})
        return StrictJSON({"ok": True, "models": len(self.models)})  # GET /: liveness

    def model_route(self, path: str) -> Callable[[Request], Awaitable[Response]]:
        """The endpoint of ``/models/{model}<path>``: that model's own ``<path>``."""

        async def endpoint(request: Request) -> Response:
            name = request.path_params["model"]
            routes = self._routes.get(name)
            if routes is None:
                return self._unknown(name)
            return await routes[path](request)

        return endpoint

    # -- the fleet's own routes ---------------------------------------------------------
    async def models_route(self, request: Request) -> Response:
        return StrictJSON({"models": [{**gw.admin.status_doc(), "prefix": f"/models/{name}"}
                                      for name, gw in sorted(self.models.items())]})

    async def metrics_route(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return StrictJSON({"ok": True, "models": len(self.models)})

    async def openapi(self, request: Request) -> Response:
        return StrictJSON(fleet_openapi(next(iter(self.models)), [p for p, _, _ in
                                                                   next(iter(self.models.values())).model_routes()]))

    def routes(self) -> list[Route]:
        per_model = next(iter(self.models.values())).model_routes()
        return [
            *oip_routes(self.oip),
            *(Route(MODEL_PREFIX + path, self.model_route(path), methods=methods) for path, _, methods in per_model),
            Route("/admin/models", self.models_route, methods=["GET"]),
            Route("/metrics", self.metrics_route, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]


def fleet_openapi(example: str, model_paths: list[str]) -> dict[str, Any]:
    """The one-model document with each model's own routes under ``/models/{model}`` and the fleet's added."""
    from serving.gateway_openapi import gateway_openapi

    doc = gateway_openapi(example)
    param = {"name": "model", "in": "path", "required": True, "description": "the model's name in the fleet",
             "schema": {"type": "string", "pattern": f"^{NAME_PATTERN}$", "example": example}}
    paths: dict[str, Any] = {}
    for path, item in doc["paths"].items():
        if path in model_paths:
            item = {method: {**op, "parameters": [param, *op.get("parameters", [])]} for method, op in item.items()}
            path = MODEL_PREFIX + path
        paths[path] = item
    paths["/metrics"] = {"get": {"summary": "Every model's Prometheus metrics, each with a model label",
                                 "responses": {"200": {"description": "OK"}}}}
    paths["/admin/models"] = {"get": {"summary": "Every model: its split, upstreams, replicas and versions",
                                      "responses": {"200": {"description": "OK"}}}}
    doc["paths"] = paths
    doc["info"]["description"] = ("Routes a request to the primary or canary model server of the model its path "
                                  "names and logs it to that model's monitor path. Only the routes listed here are "
                                  "answered; nothing else reaches a model server.")
    return doc


def create_fleet_gateway_app(configs: list[GatewayConfig]) -> Starlette:
    """The fleet gateway as an ASGI app (serve it with uvicorn on 127.0.0.1)."""
    fleet = FleetGateway(configs)
    app = Starlette(routes=fleet.routes(), lifespan=fleet.lifespan)
    app.state.fleet = fleet
    return app


_KEYS = {"name", "primary", "canary", "canary_percent", "replicas", "sink_url", "feedback_url", "feedback_outbox",
         "event_outbox", "serving_state", "sticky_key", "max_payload_bytes", "namespace", "ingest_token_file"}


def fleet_configs(doc: Any, *, admin_token: str | None = None,
                  ingest_token: str | None = None) -> list[GatewayConfig]:
    """The models of a fleet gateway's JSON document, or ``ValueError`` naming the model and the key.

    ``ingest_token`` (``DRIFTLOOP_INGEST_TOKEN``) applies to every model; else each model's
    ``ingest_token_file`` is read."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc["models"]:
        raise ValueError('expected {"models": [{"name": .., "primary": {"url": .., "version": ..}, ...}, ...]}')
    configs = []
    for i, m in enumerate(doc["models"]):
        where = f"models[{i}]" + (f" ({m.get('name')})" if isinstance(m, dict) and m.get("name") else "")
        try:
            if not isinstance(m, dict) or not isinstance(m.get("name"), str) or "primary" not in m:
                raise ValueError("a model needs a name and a primary")
            if unknown := set(m) - _KEYS:
                raise ValueError(f"unknown key(s) {sorted(unknown)}")
            canary = check_upstream(m["canary"], "canary") if m.get("canary") else None
            token = ingest_token
            if token is None and m.get("ingest_token_file"):
                token = Path(m["ingest_token_file"]).read_text().strip() or None
            configs.append(GatewayConfig(
                name=m["name"], namespace=m.get("namespace") or "default", primary=check_upstream(m["primary"], "primary"),
                canary=canary, canary_percent=check_percent(m.get("canary_percent") or 0) if canary else 0.0,
                replicas=[check_upstream(r, f"replica {j}") for j, r in enumerate(m.get("replicas") or [])],
                sticky_key=m.get("sticky_key"), sink_url=m.get("sink_url"),
                feedback_url=m.get("feedback_url") or _feedback_url(m.get("sink_url")),
                feedback_outbox=m.get("feedback_outbox"), event_outbox=m.get("event_outbox"),
                serving_state=m.get("serving_state"), max_payload_bytes=int(m.get("max_payload_bytes") or 8 << 20),
                admin_token=admin_token, ingest_token=token))
        except (ValueError, OSError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return configs


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m serving.fleet_gateway", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="JSON file of the models (see the module's docstring)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        doc = json.loads(Path(args.config).read_text())
        configs = fleet_configs(doc, admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
                                ingest_token=os.environ.get(INGEST_TOKEN_ENV) or None)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"fleet gateway: {args.config}: {exc}") from None
    if not os.environ.get(ADMIN_TOKEN_ENV):
        log.warning("%s is not set: every PUT /models/<name>/admin/* is refused", ADMIN_TOKEN_ENV)
    log.info("fleet gateway for %d models on %s:%d", len(configs), args.host, args.port)
    uvicorn.run(create_fleet_gateway_app(configs), host=args.host, port=args.port, log_level="warning",
                access_log=False, proxy_headers=False, server_header=False)


if __name__ == "__main__":
    main()
