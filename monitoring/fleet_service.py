"""One monitor process for every model of a fleet (docs/fleet.md, "Monitoring: one monitor").

:class:`FleetMonitor` hosts one :class:`~monitoring.service.MonitorService` per model — its own
inference log, windows, champion reference, quality checks, alerts, episodes, trigger and history,
each in the model's own workspace, exactly as a one-model monitor keeps them — on one port, each
model's app mounted under its ``monitor.base_path`` (``/models/<name>``): the gateway's sink URL
``http://<monitor>/models/<name>/events`` and the model's whole API (alerts, check, quality,
reports, metrics, openapi, the Alertmanager webhook) live there. Beside them, the fleet's routes:

* ``GET /models`` — every model's state: the last drift verdict, open alerts, the last check's time,
  "waiting for a champion" for a model not trained yet, the error of a check that fails; and what
  ``driftloop status`` shows of it (open alerts, last retrain, last drift and quality verdicts), in the
  shape the status row has (:mod:`monitoring.model_summary`);
* ``POST /alerts/alertmanager`` — Alertmanager's webhook for the whole fleet: each firing alert goes, by
  its ``model`` label, to that model's own ``POST /models/<name>/alerts/alertmanager`` (its guardrails,
  decisions and alert store); an alert without the label, or naming no model of the fleet, refuses the
  delivery with one line naming it, before any model sees it;
* ``GET /healthz``; ``GET /readyz`` (200 while at least one model's store answers and the intake journal, if
  any, commits; every model's
  readiness in the body; 503 when none does);
* ``GET /metrics`` — one scrape for the process: every model's series with a ``model`` label
  (:class:`monitoring.metrics.ModelLabelled`), plus the fleet's own (``driftloop_fleet_*``);
* ``GET /openapi.json`` — the fleet's routes and each model's, under ``/models/{model}``.

A path under ``/models/`` that names no model of the fleet is a 404 naming it.

**One check loop** (:class:`FleetChecks`): one scheduler thread keeps each model's next due time
(its own ``monitor.check_interval_seconds``) and hands due models to a small pool of worker threads
(``workers``, 2 by default) that run the model's round (:meth:`MonitorService._round`: drift, quality,
the runs' outcomes). A model whose previous round still runs is not queued twice. A round that
raises — a corrupt store, a missing reference — is logged on one line for that model
(the traceback with ``-v``) and never stops the others; a model without a champion yet is "waiting
for a champion", not an error.

SIGTERM / Ctrl-C stops the server, the loop, and every model's retraining workers.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from driftloop.core.errors import DriftloopError
from monitoring.drift import warm_up as drift_warm_up
from monitoring.intake import IntakeJournal
from monitoring.loglines import LoopLines
from monitoring.metrics import CONTENT_TYPE_LATEST, ModelLabelled
from monitoring.model_summary import alerts_summary, verdicts_summary
from monitoring.openapi import monitor_openapi
from monitoring.reference import NoChampionError
from monitoring.routes import webhook_refusal
from monitoring.store import StoreUnavailable
from monitoring.service import WEBHOOK_TOKEN_ENV, MonitorService, mounted_app, serve_until_stopped

if TYPE_CHECKING:
    from driftloop.core.fleet import FleetModel

__all__ = ["FleetChecks", "FleetMonitor", "WAITING", "fleet_openapi"]

log = logging.getLogger(__name__)

WAITING = "waiting for a champion"
MODELS_PREFIX = "/models/"


def _json(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload, default=str), status_code=status, media_type="application/json")


class _ModelLog(logging.LoggerAdapter):
    """The check loop's lines of one model: prefixed with its name, a failure on one line (its traceback
    only at DEBUG, ``driftloop -v``)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        if kwargs.get("exc_info") and not self.logger.isEnabledFor(logging.DEBUG):
            exc = sys.exc_info()[1]
            if exc is not None:
                msg = f"{msg}: {type(exc).__name__}: {exc}"
            kwargs["exc_info"] = False
        return f"model {self.extra['model']}: {msg}", kwargs


class _Rejected:
    """What :func:`monitoring.routes.webhook_refusal` counts its refusals on, for the fleet's own webhook."""

    def __init__(self, counter: Counter) -> None:
        self.events_rejected = counter


class FleetChecks:
    """One scheduler thread and a pool of ``workers`` threads running every model's check round when due."""

    def __init__(self, services: dict[str, MonitorService], *, workers: int = 2,
                 on_round: Callable[[str, float], None] | None = None) -> None:
        self.services = services
        self.workers = max(1, workers)
        self.on_round = on_round  # (model, seconds) after each model's round (metrics)
        self.lines = {name: LoopLines(_ModelLog(log, {"model": name})) for name in services}
        self.overrun: dict[str, int] = dict.fromkeys(services, 0)  # rounds skipped: the previous one still ran
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def run_round(self, name: str) -> None:
        """One round of model ``name`` (drift, quality, the runs' outcomes); never raises."""
        started = time.perf_counter()
        try:
            self.services[name]._round(self.lines[name])
        except Exception:  # noqa: BLE001 - _round guards each check; this guards the loop against anything else
            self.lines[name].failed("round", sys.exc_info()[1] or RuntimeError("round failed"))
        finally:
            with self._lock:
                self._busy.discard(name)
            if self.on_round is not None:
                self.on_round(name, time.perf_counter() - started)

    def submit(self, name: str) -> bool:
        """Queue model ``name``'s round on the pool unless its previous round still runs; True if queued."""
        with self._lock:
            if name in self._busy or self._pool is None:
                self.overrun[name] += 1
                return False
            self._busy.add(name)
        self._pool.submit(self.run_round, name)
        return True

    def round_all(self) -> float:
        """Every model's round now, on the pool; blocks until all are done and returns the wall seconds."""
        started = time.perf_counter()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="fleet-check") as pool:
            for name in self.services:
                with self._lock:
                    self._busy.add(name)
                pool.submit(self.run_round, name)
        return time.perf_counter() - started

    def _loop(self) -> None:
        drift_warm_up()  # once for every model, while the first interval runs
        now = time.monotonic()
        due = [(now + s.settings.monitor.check_interval_seconds, name) for name, s in self.services.items()]
        heapq.heapify(due)
        while due and not self._stop.wait(max(0.0, due[0][0] - time.monotonic())):
            when, name = heapq.heappop(due)
            self.submit(name)
            interval = self.services[name].settings.monitor.check_interval_seconds
            heapq.heappush(due, (max(when + interval, time.monotonic()), name))  # a late round does not pile up

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fleet-check")
            self._thread = threading.Thread(target=self._loop, name="fleet-checks", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop scheduling; wait for the rounds that run now (queued ones are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class FleetMonitor:
    """The monitors of a fleet's models in one app and one check loop; ``run`` blocks until SIGTERM/Ctrl-C.

    ``service``: builds a model's monitor (default: ``MonitorService(settings, runner_factory=...)``). A
    model whose monitor cannot be built (its store unreadable at start) is named in ``/models`` and its
    paths answer 503 with the reason; the other models run.
    """

    def __init__(self, models: Iterable[FleetModel], *, workers: int = 2, runner_factory: Any | None = None,
                 service: Callable[[FleetModel], MonitorService] | None = None, intake: Path | None = None) -> None:
        self.models = {m.name: m for m in models}
        if not self.models:
            raise DriftloopError("a fleet monitor needs at least one model")
        build = service or (lambda m: MonitorService(m.settings, runner_factory=runner_factory))
        self.services: dict[str, MonitorService] = {}
        self.broken: dict[str, str] = {}  # model -> why its monitor could not be built
        for name, model in self.models.items():
            try:
                self.services[name] = build(model)
            except Exception as exc:  # noqa: BLE001 - one model's monitor failing to start never stops the others
                self.broken[name] = f"{type(exc).__name__}: {exc}"
                log.error("model %s: its monitor cannot start: %s", name, self.broken[name])
        self._registry = CollectorRegistry(auto_describe=True)
        self._models_gauge = Gauge("driftloop_fleet_models", "Models of the fleet monitor, by state of their "
                                   "monitor (running, unavailable)", ["state"], registry=self._registry)
        self._models_gauge.labels(state="running").set(len(self.services))
        self._models_gauge.labels(state="unavailable").set(len(self.broken))
        self._round_seconds = Histogram("driftloop_fleet_model_round_seconds", "Duration of one model's check "
                                        "round (drift, quality, follow-up) in the fleet's pool", registry=self._registry)
        self._webhook_rejected = Counter("driftloop_fleet_webhook_rejected", "Alertmanager deliveries to the fleet's "
                                         "webhook refused, by reason", ["reason"], registry=self._registry)
        self._unknown = Counter("driftloop_fleet_unknown_model_requests", "Requests to /models/<name> naming no "
                                "model of the fleet", registry=self._registry)
        self._registry.register(ModelLabelled({n: s.metrics.registry for n, s in self.services.items()}))
        self.intake = self._open_intake(intake)
        if self.intake is not None:
            Gauge("driftloop_fleet_intake_waiting_events", "Events acknowledged into the fleet's intake journal and "
                  "not yet moved into their model's store", registry=self._registry
                  ).set_function(lambda: self.intake.waiting if self.intake is not None else 0)
        self.checks = FleetChecks(self.services, workers=workers,
                                  on_round=lambda _name, seconds: self._round_seconds.observe(seconds))
        self._overrun = Gauge("driftloop_fleet_rounds_overrun", "Rounds of a model not run because its previous "
                              "round still ran", ["model"], registry=self._registry)
        for name in self.services:
            self._overrun.labels(model=name).set_function(lambda n=name: self.checks.overrun[n])
        self._apps = {s.settings.monitor.base_path: s.app for s in self.services.values()}
        self.starlette = mounted_app([*self._routes(), *(Mount(base, app=app) for base, app in self._apps.items())],
                                     list(self._apps.values()))

    def _open_intake(self, path: Path | None) -> IntakeJournal | None:
        """The fleet's intake journal (:mod:`monitoring.intake`) when this monitor hosts two models or more; with
        one, only what a previous fleet monitor left in the journal for it is moved into its store."""
        if path is None or not self.services:
            return None
        committers = {name: service.app.state.committer for name, service in self.services.items()}
        if len(committers) < 2 and not path.exists():
            return None
        try:
            journal = IntakeJournal(path, committers,
                                    synchronous=next(iter(self.services.values())).settings.monitor.store_synchronous)
        except StoreUnavailable as exc:  # another monitor of the fleet holds it: each model's store takes its events
            log.error("%s; events go straight into each model's store", exc.message)
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged journal file never keeps the fleet's monitor down
            log.error("the intake journal %s cannot be opened (%s: %s); events go straight into each model's store",
                      path, type(exc).__name__, exc)
            return None
        if len(committers) < 2:  # one model: its events straight into its store, as a one-model monitor
            journal.close()
            return None
        return journal

    # -- ASGI: a model's path goes straight to its app (no scan of 50 mounts per event) ---------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(MODELS_PREFIX):
            end = path.find("/", len(MODELS_PREFIX))
            base = path if end < 0 else path[:end]
            app = self._apps.get(base)
            if app is None:
                await self._no_model(base[len(MODELS_PREFIX):], scope, receive, send)
                return
            root = scope.get("root_path", "")
            scope["app_root_path"] = scope.get("app_root_path", root)
            scope["root_path"] = root + base  # what starlette's Mount sets for the mounted app
            await app(scope, receive, send)
            return
        await self.starlette(scope, receive, send)

    async def _no_model(self, name: str, scope: dict, receive: Any, send: Any) -> None:
        self._unknown.inc()
        if name in self.broken:
            response = _json(503, {"error": f"model {name!r}: its monitor is not running: {self.broken[name]}"})
        else:
            response = _json(404, {"error": f"no model {name!r} in this fleet's monitor "
                                            f"(models: {', '.join(self.models)})"})
        await response(scope, receive, send)

    # -- fleet routes ---------------------------------------------------------------------------------------
    def model_state(self, name: str) -> dict[str, Any]:
        """What ``GET /models`` says of one model: its state (the last check's verdict, or why there is none), its
        open alerts and last retrain (``open_alerts``, ``open``, ``last_retrain``) and its last drift and quality
        verdicts from its history (``drift``, ``quality``), in the shape ``driftloop status`` builds them from a
        workspace (:mod:`monitoring.model_summary`); a part that cannot be read is ``alerts_error`` /
        ``history_error``. Cheap enough to poll: the store's indexed queries and the newest snapshots only."""
        model = self.models[name]
        settings = model.settings
        row: dict[str, Any] = {"name": name, "team": model.team, "path": settings.monitor.base_path,
                               "check_interval_seconds": settings.monitor.check_interval_seconds}
        service = self.services.get(name)
        if service is None:
            return {**row, "state": "unavailable", "error": self.broken[name]}
        outcome = service.last_outcome or {}
        row["last_check"] = service.last_round
        row["overrun_rounds"] = self.checks.overrun.get(name, 0)
        row.update(open_alerts=0, open=[], last_retrain=None, drift=None, quality=None)
        try:
            row.update(alerts_summary(service.alerts, settings.mlflow.model_name))
        except Exception as exc:  # noqa: BLE001 - a damaged alert store is named in the row
            row["open_alerts"] = None
            row["alerts_error"] = f"{type(exc).__name__}: {exc}"
        try:
            row.update(verdicts_summary(service.history.workspace, settings.mlflow.model_name))
        except Exception as exc:  # noqa: BLE001 - an unreadable history is named in the row
            row["history_error"] = f"{type(exc).__name__}: {exc}"
        if row["drift"] is not None:  # the check the verdict is of
            row["drift"].update(champion=f"{settings.mlflow.model_name} v{row['drift']['version']}",
                                checked_at=row["drift"]["time"])
        error = service.last_errors.get("drift") or next(iter(service.last_errors.values()), None)
        if isinstance(service.last_errors.get("drift"), NoChampionError):
            row["state"], row["error"] = WAITING, None
        elif error is not None:
            row["state"] = "check skipped" if isinstance(error, DriftloopError) else "check failing"
            row["error"] = f"{type(error).__name__}: {error}"
        else:
            row["state"] = outcome.get("verdict") or "not checked yet"
            row["error"] = None
        return row

    def _routes(self) -> list[Route]:
        async def models(request: Request) -> Response:
            rows = await asyncio.to_thread(lambda: [self.model_state(n) for n in self.models])
            return _json(200, {"models": rows})

        async def healthz(request: Request) -> Response:
            return _json(200, {"status": "ok", "models": len(self.models)})

        async def readyz(request: Request) -> Response:
            def ready() -> dict[str, str]:
                out = {name: f"unavailable: {why}" for name, why in self.broken.items()}
                for name, service in self.services.items():
                    try:
                        problem = service.store.health()
                    except Exception as exc:  # noqa: BLE001 - readiness reports any store failure
                        problem = str(exc)
                    out[name] = "ready" if problem is None else f"store unavailable: {problem}"
                return out

            states = await asyncio.to_thread(ready)
            body: dict[str, Any] = {}
            if self.intake is not None:  # every model's events go through it: no model takes any while it fails
                problem = await asyncio.to_thread(self.intake.health)
                body["intake"] = "ready" if problem is None else problem
                if problem is not None:
                    states = {n: f"intake journal unavailable: {problem}" if v == "ready" else v
                              for n, v in states.items()}
            up = sum(v == "ready" for v in states.values())
            return _json(200 if up else 503, {"status": "ready" if up else "no model ready", "ready": up,
                                              "models": states, **body})

        async def metrics(request: Request) -> Response:
            return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

        # the webhook token is the process's (DRIFTLOOP_WEBHOOK_TOKEN), as every model's own route reads it
        refusal = webhook_refusal(os.environ.get(WEBHOOK_TOKEN_ENV) or None, _Rejected(self._webhook_rejected))

        async def alertmanager(request: Request) -> Response:
            if (refused := refusal(request, "webhook")) is not None:
                return refused
            try:
                payload = orjson.loads(await request.body())
                groups = self._alerts_by_model(payload)
            except (orjson.JSONDecodeError, ValueError) as exc:
                self._webhook_rejected.labels(reason="webhook_malformed").inc()
                return _json(400, {"error": f"malformed Alertmanager payload for a fleet's monitor: {exc}"})
            decisions: list[dict[str, Any]] = []
            transport = httpx.ASGITransport(app=self)
            async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as client:
                for name, alerts in groups.items():  # each model's own route: its guardrails, decisions and store
                    answer = await client.post(f"{MODELS_PREFIX}{name}/alerts/alertmanager",
                                               content=orjson.dumps({**payload, "alerts": alerts}),
                                               headers={"authorization": request.headers.get("authorization", ""),
                                                        "content-type": "application/json"})
                    if answer.status_code != 200:
                        decisions.append({"model": name, "error": answer.json().get("error", answer.text),
                                          "status": answer.status_code})
                        continue
                    decisions += [{"model": name, **d} for d in answer.json()["decisions"]]
            failed = [d for d in decisions if "error" in d]
            return _json(200 if not failed else failed[0]["status"], {"decisions": decisions})

        auth = {s.settings.monitor.events_auth for s in self.services.values()}
        document = fleet_openapi(list(self.models), events_auth="network" if auth == {"network"} else "token")

        async def openapi(request: Request) -> Response:
            return _json(200, document)

        return [Route("/models", models, methods=["GET"]), Route("/healthz", healthz, methods=["GET"]),
                Route("/alerts/alertmanager", alertmanager, methods=["POST"]),
                Route("/readyz", readyz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
                Route("/openapi.json", openapi, methods=["GET"])]

    def _alerts_by_model(self, payload: Any) -> dict[str, list[dict[str, Any]]]:
        """The payload's alerts grouped by their ``model`` label; raises ``ValueError`` naming the first alert
        that names no model of this fleet (nothing is handed on then)."""
        items = payload.get("alerts") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not items:
            raise ValueError("the payload has no 'alerts' list")
        groups: dict[str, list[dict[str, Any]]] = {}
        for i, item in enumerate(items):
            labels = item.get("labels") if isinstance(item, dict) else None
            name = labels.get("model") if isinstance(labels, dict) else None
            if not isinstance(name, str) or not name:
                raise ValueError(f"alerts[{i}] has no 'model' label (a fleet's rules keep it: `by (namespace, model)`); "
                                 f"each model's own webhook is /models/<name>/alerts/alertmanager")
            if name not in self.services:
                known = "its monitor is not running" if name in self.broken else f"models: {', '.join(self.models)}"
                raise ValueError(f"alerts[{i}] names model {name!r}, not one of this fleet's running monitors ({known})")
            groups.setdefault(name, []).append(item)
        return groups

    # -- process --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the check loop, then every model's monitor (history written, retraining workers stopped,
        stores closed); one model's failure to close never keeps the others open."""
        self.checks.stop()
        if self.intake is not None:
            try:
                self.intake.close()  # what waits goes into the stores before they close
            except Exception as exc:  # noqa: BLE001 - the journal keeps it: the next start moves it
                log.error("the intake journal did not close cleanly: %s", exc)
        for name, service in self.services.items():
            try:
                service.close()
            except Exception as exc:  # noqa: BLE001 - close the others too
                log.error("model %s: its monitor did not close cleanly: %s", name, exc)

    def run(self, host: str, port: int) -> None:
        """Serve every model on ``host:port`` until SIGTERM or Ctrl-C, then stop everything."""
        self.checks.start()
        log.info("driftloop fleet monitor on http://%s:%d: %d models under /models/<name>, %d check workers",
                 host, port, len(self.models), self.checks.workers)
        try:
            serve_until_stopped(self, host, port)
        finally:
            self.close()


def fleet_openapi(names: list[str], *, events_auth: str = "token") -> dict[str, Any]:
    """The fleet monitor's OpenAPI document: its own routes, and every model route under ``/models/{model}``."""
    one = monitor_openapi(events_auth=events_auth)
    param = {"name": "model", "in": "path", "required": True, "description": "the model's name in the fleet file",
             "schema": {"type": "string", "enum": names}}
    paths: dict[str, Any] = {}
    for path, ops in one["paths"].items():
        paths[f"/models/{{model}}{path}"] = {
            method: {**op, "parameters": [param, *op.get("parameters", [])],
                     "responses": {**op.get("responses", {}), "404": {"description": "no such model in the fleet"}}}
            for method, op in ops.items()}
    ok = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
    paths["/models"] = {"get": {"summary": "Every model's state: last drift verdict, open alerts, last check, "
                                           "waiting for a champion or the error of a failing check; its open "
                                           "alerts, last retrain and last drift and quality verdicts as driftloop "
                                           "status shows them", "responses": ok}}
    webhook = one["paths"].get("/alerts/alertmanager", {}).get("post")
    if webhook is not None:
        paths["/alerts/alertmanager"] = {"post": {
            **webhook, "summary": "Alertmanager's webhook for the fleet: each firing alert goes to its model's own "
                                  "webhook by its `model` label (400 naming an alert without one, or naming no model)"}}
    paths["/healthz"] = {"get": {"summary": "The process answers", "responses": ok}}
    paths["/readyz"] = {"get": {"summary": "Each model's store readiness (503 when no model is ready)",
                                "responses": {**ok, "503": {"description": "no model's store answers"}}}}
    paths["/metrics"] = {"get": {"summary": "Prometheus text: every model's series with a model label, and the "
                                            "fleet's own", "responses": {"200": {"description": "Prometheus text"}}}}
    paths["/openapi.json"] = {"get": {"summary": "This document", "responses": ok}}
    return {**one, "info": {**one.get("info", {}), "title": "driftloop fleet monitor"}, "paths": paths}
