"""The ``driftloop monitor`` process: sink + periodic drift check + alerts + retraining trigger.

One Starlette app: the inference-log sink (``POST /events``, ``/feedback``, ``/quality``,
``/healthz``, ``/metrics``) plus the monitor's own routes:

* ``POST /alerts/alertmanager`` — Prometheus Alertmanager webhook; bearer token from the
  environment variable ``DRIFTLOOP_WEBHOOK_TOKEN`` only (401 without / with a wrong token,
  400 naming the problem for a malformed payload; both counted in
  ``driftloop_monitor_events_rejected_total{reason}``).
* ``GET /alerts`` — recent alerts with their decisions and runs.
* ``POST /check`` — check now (``?report=true`` renders Evidently's report even without drift).
* ``POST /quality/check`` — check the labelled windows now; ``GET`` the last outcome (realised
  metrics vs holdout, the estimate from calibrated scores, any quality alert).
* ``GET /reports/{alert_id}`` — the alert's Evidently HTML report.
* ``GET /shadow?since=<iso|epoch>&version=`` — a shadow phase on a cluster: the shadow
  InferenceService's answers joined with the primary's by request id (``X-Request-Id`` in KServe's
  ``metadata`` extension) and compared like the local gateway compares them (agreement or
  difference, both prediction samples, quality on the same labelled rows). Read by the rollout
  controller; same bearer token as the webhook (401 without / with a wrong one).
* ``GET /predictions?since=<iso|epoch>&versions=a,b&limit=N`` — the predictions each model
  version served since a time (the latest ``limit`` of each, default 5000; shadow rows left out),
  so the rollout controller on a cluster compares the canary's distribution with the primary's
  (``prediction_psi``). Same bearer token as ``/shadow``.

Shadow rows (``role`` shadow: the gateway's ``ce-servingrole``, a shadow InferenceService's
annotations) are kept for that join and left out of the drift windows.

A background thread checks every ``monitor.check_interval_seconds``: the current window (from
``monitor.window_*``) is compared with the champion's reference by the fast path; below
``monitor.min_samples`` rows the verdict is "insufficient data" and nothing is raised. When the
fast path finds dataset drift, Evidently (the judge of record) runs on the window (sampled down
to ``monitor.report_sample_rows``), its HTML + JSON report is saved under
``<workspace>/monitor/reports/<alert-id>/`` and logged to MLflow (a run tagged with the alert id
and the champion version), and — if Evidently confirms — the alert goes to the trigger.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from driftloop.core.errors import DriftloopError, MonitorError
from driftloop.core.files import workspace_token
from driftloop.core.registry import Registry
from driftloop.core.shadow import SHADOW_ROLE, compare_rows, shadow_name
from monitoring.alerts import Alert, AlertStore, alertmanager_alerts, drift_alert_id
from monitoring.drift import DriftOptions, DriftResult, evidently_report, fast_check, save_report
from monitoring.metrics import MonitorMetrics
from monitoring.quality_check import QualityMonitor
from monitoring.reference import ChampionReference, ReferenceCache
from monitoring.events import EventError, RowSchema
from monitoring.openapi import monitor_openapi
from monitoring.sink import INGEST_TOKEN_ENV, IngestAuth, LabelPolicy, create_sink_app, since_param
from monitoring.store import InferenceStore
from monitoring.trigger import Trigger

__all__ = ["WEBHOOK_TOKEN_ENV", "MonitorService", "ingest_token_path", "log_report_to_mlflow", "row_schema"]

log = logging.getLogger(__name__)

WEBHOOK_TOKEN_ENV = "DRIFTLOOP_WEBHOOK_TOKEN"
REPORT_ARTIFACT_DIR = "drift_report"
PREDICTIONS_LIMIT = 5_000  # per version, when the request names none
MAX_PREDICTIONS_LIMIT = 50_000
MAX_ALERTS_LIMIT = 10_000


def _json(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload, default=str, option=orjson.OPT_SERIALIZE_NUMPY),
                    status_code=status, media_type="application/json")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def ingest_token_path(settings: Any) -> Path:
    """``<workspace>/monitor/ingest.token``: the ingest token when ``DRIFTLOOP_INGEST_TOKEN`` is not set."""
    return settings.workspace_dir / "monitor" / "ingest.token"


def row_schema(champion: ChampionReference, task: str) -> RowSchema:
    """What the champion's model server accepts per column, from the dtypes of its reference sample."""
    import pandas as pd

    kinds: dict[str, str] = {}
    frame = champion.frame
    for col in champion.features_numeric:
        kinds[col] = "int" if col in frame and pd.api.types.is_integer_dtype(frame[col]) else "float"
    for col in champion.features_categorical:
        values = frame[col].dropna() if col in frame else pd.Series(dtype=object)
        if pd.api.types.is_bool_dtype(values):
            kinds[col] = "bool"
        elif pd.api.types.is_integer_dtype(values):
            kinds[col] = "int"
        elif len(values) and all(isinstance(v, str) for v in values):
            kinds[col] = "str"
        else:
            kinds[col] = "any"
    return RowSchema(kinds, task)


def log_report_to_mlflow(registry: Registry, files: list[Path], *, alert_id: str, champion: ChampionReference,
                         result: DriftResult) -> str:
    """Log the report files as artifacts of a monitoring run; returns the HTML's ``runs:/`` URI."""
    client = registry.client
    run = client.create_run(registry.experiment_id(), run_name=f"drift-{alert_id}", tags={
        "driftloop.alert_id": alert_id, "driftloop.champion_version": champion.version,
        "driftloop.model": champion.model, "driftloop.kind": "drift-report"})
    run_id = run.info.run_id
    client.log_metric(run_id, "drift_share", result.share)
    client.log_metric(run_id, "window_rows", result.n_current)
    for path in files:
        client.log_artifact(run_id, str(path), REPORT_ARTIFACT_DIR)
    client.set_terminated(run_id)
    return f"runs:/{run_id}/{REPORT_ARTIFACT_DIR}/{files[0].name}"


class MonitorService:
    """The monitor's parts wired together; ``app`` serves them, ``run`` blocks until SIGTERM/Ctrl-C."""

    def __init__(self, settings: Any, *, registry: Registry | None = None, runner: Any | None = None,
                 runner_factory: Any | None = None, metrics: MonitorMetrics | None = None, store: InferenceStore | None = None,
                 alerts: AlertStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or MonitorMetrics()
        self.store = store or InferenceStore.from_settings(settings)
        self.alerts = alerts or AlertStore.from_settings(settings)
        self.registry = registry or Registry.from_settings(settings)
        self.references = ReferenceCache(settings, self.registry)
        self.trigger = Trigger(settings, self.alerts, runner=runner, runner_factory=runner_factory,
                               metrics=self.metrics)
        self.options = DriftOptions.from_config(settings.monitor)
        self.reports_dir = settings.workspace_dir / "monitor" / "reports"
        self.quality = QualityMonitor(settings, store_path=self.store.path, registry=self.registry, alerts=self.alerts,
                                      trigger=self.trigger, metrics=self.metrics, reports_dir=self.reports_dir)
        self.last_outcome: dict[str, Any] | None = None
        self.ingest_token = workspace_token(ingest_token_path(settings), INGEST_TOKEN_ENV)
        self.auth = IngestAuth(self.ingest_token, settings.monitor.events_auth)
        self._checked: dict[str, dict[str, Any]] = {}
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # -- the check ----------------------------------------------------------------------------
    def check(self, *, force: bool = False, report: bool = False) -> dict[str, Any]:
        """One drift check of the current window; returns the outcome (verdict, columns, alert)."""
        with self._check_lock:
            outcome = self._check(force=force, report=report)
            self.last_outcome = outcome
            return outcome

    def _check(self, *, force: bool, report: bool) -> dict[str, Any]:
        cfg = self.settings.monitor
        champion = self.references.get()
        window = self.store.window(cfg.window_kind, rows=cfg.window_rows, seconds=cfg.window_seconds)
        window = window.without_role(SHADOW_ROLE)  # a candidate's answers to mirrored copies are not production's
        window = window.capped(cfg.max_rows_per_request)  # one request cannot fill the window
        self.metrics.window_size.set(window.n)
        info = {"id": window.id, "kind": window.kind, "rows": window.n, "start": _iso(window.start_ts),
                "end": _iso(window.end_ts), "complete": window.complete}
        base = {"checked_at": _iso(time.time()), "champion": f"{champion.model} v{champion.version}", "window": info}
        info["requests"] = window.requests
        if window.n < cfg.min_samples or window.requests < cfg.min_requests:
            return {**base, "verdict": "insufficient data", "reason": (
                f"{window.n} rows (at most monitor.max_rows_per_request={cfg.max_rows_per_request} of each request) "
                f"from {window.requests} requests; a verdict needs monitor.min_samples={cfg.min_samples} rows and "
                f"monitor.min_requests={cfg.min_requests} requests, so no alert is raised and no run starts")}
        key = f"{champion.version}:{window.id}"
        if window.kind == "tumbling" and window.complete and key in self._checked and not (force or report):
            return {**self._checked[key], "verdict_cached": True}
        started = time.perf_counter()
        result = fast_check(champion.profile, window.rows, self.options)
        self._export(result, time.perf_counter() - started)
        self.trigger.observe_drift(champion.model, result.dataset_drift)  # the drift episode (trigger.py)
        outcome: dict[str, Any] = {**base, "verdict": "drift" if result.dataset_drift else "no drift",
                                   "result": result.to_dict()}
        if result.dataset_drift or report:
            alert_id = drift_alert_id(champion.model, champion.version, window.start_ts, window.end_ts)
            outcome["alert"] = self._raise(alert_id, champion, window, result)
        if window.kind == "tumbling" and window.complete:
            self._checked[key] = outcome
            while len(self._checked) > 64:  # only recent windows can come round again
                self._checked.pop(next(iter(self._checked)))
        return outcome

    def _export(self, result: DriftResult, seconds: float) -> None:
        m = self.metrics
        m.dataset_drift_share.set(result.share)
        m.dataset_drift.set(1.0 if result.dataset_drift else 0.0)
        for col in result.columns:
            m.feature_drift_score.labels(feature=col.column, method=col.method).set(col.score)
            m.feature_drifted.labels(feature=col.column, method=col.method).set(1.0 if col.drifted else 0.0)
        m.last_check_timestamp.set(time.time())
        m.check_seconds.observe(seconds)

    def _raise(self, alert_id: str, champion: ChampionReference, window: Any, fast: DriftResult) -> dict[str, Any]:
        known = self.alerts.get(alert_id)
        if known is not None:  # the same drift re-detected: no second report, the trigger records a duplicate
            alert = Alert(alert_id, "drift", samples=window.n)
            decision = self.trigger.submit(alert)
            return {"id": alert_id, "decision": decision.decision, "reason": decision.reason,
                    "report": f"/reports/{alert_id}"}
        rows = window.rows
        limit = self.settings.monitor.report_sample_rows
        if len(rows) > limit:
            rows = rows.sample(n=limit, random_state=0)
        snapshot, judged = evidently_report(champion.frame, rows, champion.numeric, champion.categorical, self.options)
        html, js = save_report(snapshot, self.reports_dir / alert_id)
        uri = None
        try:
            uri = log_report_to_mlflow(self.registry, [html, js], alert_id=alert_id, champion=champion, result=judged)
        except Exception as exc:  # noqa: BLE001 - MLflow down: the report stays local, the alert is still raised
            log.warning("drift report for %s not logged to MLflow: %s", alert_id, exc)
        details = {"champion_version": champion.version, "window": window.id,
                   "drifted_columns": judged.drifted_columns, "share": judged.share,
                   "fast_path": fast.to_dict(), "evidently": judged.to_dict()}
        alert = Alert(alert_id, "drift", details=details, samples=window.n, window_end=_iso(window.end_ts),
                      window_start=_iso(window.start_ts), report_path=str(html), report_uri=uri)
        if not judged.dataset_drift and not fast.dataset_drift:
            self.alerts.insert(alert)
            self.alerts.record_decision(alert_id, "report_only", "report requested; no dataset drift", now=time.time())
            return {"id": alert_id, "decision": "report_only", "report": f"/reports/{alert_id}", "report_uri": uri}
        if not judged.dataset_drift:
            self.alerts.insert(alert)
            self.alerts.record_decision(alert_id, "not_confirmed", "Evidently found no dataset drift on the "
                                        f"reported sample ({judged.share:.2f} of columns)", now=time.time())
            return {"id": alert_id, "decision": "not_confirmed", "report": f"/reports/{alert_id}", "report_uri": uri}
        self.metrics.alerts.labels(source="drift").inc()
        decision = self.trigger.submit(alert)
        return {"id": alert_id, "decision": decision.decision, "reason": decision.reason,
                "request_id": decision.request_id, "report": f"/reports/{alert_id}", "report_uri": uri}

    # -- HTTP ---------------------------------------------------------------------------------
    def _classes(self) -> list[Any] | None:
        """The champion's classes (labels must be one of them); None while there is no champion."""
        try:
            return self.references.get().classes
        except MonitorError:
            return None

    def _build_app(self) -> Starlette:
        columns = numeric = schema = None
        task = self.settings.model.task
        try:
            champion = self.references.get()
            columns, numeric = champion.features, champion.features_numeric  # rows are checked against its schema
            schema = row_schema(champion, task)
        except MonitorError as exc:
            log.warning("%s; events are accepted with any columns until a champion exists", exc)
        serving = self.settings.serving.name  # its shadow InferenceService logs here too (shadow phase)
        names = {serving, self.settings.mlflow.model_name, shadow_name(serving)}
        app = create_sink_app(self.store, metrics=self.metrics, model_names=names, reference_columns=columns,
                              max_body_bytes=self.settings.monitor.max_body_bytes, task=task,
                              numeric_columns=numeric, auth=self.auth, schema=schema,
                              labels=LabelPolicy(task, self._classes))
        for route in self._routes():
            app.router.routes.append(route)
        document = monitor_openapi(events_auth=self.settings.monitor.events_auth)

        async def openapi(request: Request) -> Response:
            return _json(200, document)

        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/openapi.json"]
        app.router.routes.append(Route("/openapi.json", openapi, methods=["GET"]))  # the sink's and the monitor's
        app.state.monitor = self
        return app

    def _routes(self) -> list[Route]:
        token = os.environ.get(WEBHOOK_TOKEN_ENV) or None
        rejected = self.metrics.events_rejected

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
                self.metrics.alerts.labels(source="alertmanager").inc()
                d = await asyncio.to_thread(self.trigger.submit, alert)
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
            return _json(200, {"alerts": await asyncio.to_thread(self.alerts.recent, limit)})

        def unauthorized(request: Request, what: str) -> Response | None:
            """401 unless the request carries the ingest token (the monitor's state-changing routes)."""
            refused = self.auth.refusal(request.headers.get("authorization"), what)
            if refused is None:
                return None
            rejected.labels(reason=refused.reason).inc()
            return Response(orjson.dumps({"error": refused.message}), status_code=401, media_type="application/json",
                            headers={"www-authenticate": "Bearer"})

        async def check_now(request: Request) -> Response:
            if (refused := unauthorized(request, "POST /check")) is not None:
                return refused
            report = request.query_params.get("report", "false").lower() in ("1", "true", "yes")
            try:
                outcome = await asyncio.to_thread(self.check, force=True, report=report)
            except DriftloopError as exc:
                return _json(409, {"error": str(exc)})
            return _json(200, outcome)

        async def quality_check(request: Request) -> Response:
            if request.method == "GET":  # reads only: a check raises alerts and starts runs, so only POST runs one
                return _json(200, self.quality.last_outcome or {
                    "checked_at": None, "versions": {},
                    "reason": "no quality check has run yet (every monitor.check_interval_seconds, or POST)"})
            if (refused := unauthorized(request, "POST /quality/check")) is not None:
                return refused
            try:
                outcome = await asyncio.to_thread(self.check_quality)
            except DriftloopError as exc:
                return _json(409, {"error": str(exc)})
            return _json(200, outcome)

        async def shadow(request: Request) -> Response:
            if (refused := refusal(request, "shadow")) is not None:
                return refused
            try:
                since = since_param(request.query_params.get("since"))
            except EventError as exc:
                return _json(exc.status, {"error": exc.message})
            version = request.query_params.get("version") or None
            stats = await asyncio.to_thread(self.shadow_summary, since, version)
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
            try:
                limit = int(query.get("limit", PREDICTIONS_LIMIT))
            except ValueError:
                limit = 0
            if not 1 <= limit <= MAX_PREDICTIONS_LIMIT:
                return _json(400, {"error": f"'limit' must be an integer from 1 to {MAX_PREDICTIONS_LIMIT}, "
                                            f"got {query.get('limit')!r}"})
            try:
                found = await asyncio.to_thread(self.store.predictions_by_version, since, versions, limit=limit)
            except EventError as exc:  # StoreUnavailable: 503 saying why
                return _json(exc.status, {"error": exc.message})
            return _json(200, {"since": since, "limit": limit,
                               "versions": {v: {"n": len(p), "predictions": p} for v, p in found.items()}})

        async def report(request: Request) -> Response:
            alert = await asyncio.to_thread(self.alerts.get, request.path_params["alert_id"])
            path = Path(alert["report_path"]) if alert and alert.get("report_path") else None
            if path is None or not path.is_file():
                return _json(404, {"error": f"no report for alert {request.path_params['alert_id']!r}"})
            return FileResponse(path, media_type="text/html")

        return [
            Route("/alerts/alertmanager", alertmanager, methods=["POST"]),
            Route("/alerts", list_alerts, methods=["GET"]),
            Route("/check", check_now, methods=["POST"]),
            Route("/quality/check", quality_check, methods=["GET", "POST"]),
            Route("/reports/{alert_id}", report, methods=["GET"]),
            Route("/shadow", shadow, methods=["GET"]),
            Route("/predictions", predictions, methods=["GET"]),
        ]

    # -- process ------------------------------------------------------------------------------
    def _loop(self) -> None:
        interval = self.settings.monitor.check_interval_seconds
        while not self._stop.wait(interval):
            try:
                outcome = self.check()
                log.info("drift check: %s (%s rows)", outcome["verdict"], outcome["window"]["rows"])
            except DriftloopError as exc:
                log.warning("drift check skipped: %s", exc)
            except Exception:  # the service keeps running; the next check tries again
                log.exception("drift check failed")
            if self.settings.monitor.quality.enabled:
                try:
                    self.check_quality()
                except DriftloopError as exc:
                    log.warning("quality check skipped: %s", exc)
                except Exception:  # the service keeps running; the next check tries again
                    log.exception("quality check failed")

    def shadow_summary(self, since: float | None = None, version: str | None = None) -> dict[str, Any]:
        """The shadow's logged answers since ``since`` joined with the primary's and compared
        (``driftloop.core.shadow.compare_rows``: the numbers the local gateway reports for its own join).

        ``joined_requests`` counts the shadow's requests whose primary answer was found;
        ``unjoined_rows`` the shadow rows without one yet (in flight, or a logger without
        ``metadataHeaders``). Errors and latency of the shadow are not here: its logger logs only
        the answers it gave (HTTP 200), so the controller reads those from Prometheus."""
        pairs = self.store.shadow_pairs(since, version=version)
        joined = pairs[pairs["primary_id"].notna()]
        out = compare_rows(zip(joined["primary_prediction"].tolist(), joined["shadow_prediction"].tolist(),
                               joined["label"].tolist()))
        out.update({"source": "monitor", "shadow_rows": len(pairs), "unjoined_rows": len(pairs) - len(joined),
                    "shadow_requests_logged": int(pairs["request_key"].nunique()),
                    "joined_requests": int(joined["request_key"].nunique())})
        return out

    def check_quality(self) -> dict[str, Any]:
        """One quality check of the labelled windows of every version (see monitoring.quality_check)."""
        with self._check_lock:
            return self.quality.check()

    def start_checks(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="drift-check", daemon=True)
            self._thread.start()

    def stop_checks(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def run(self, host: str | None = None, port: int | None = None) -> None:
        """Serve until SIGTERM or Ctrl-C (uvicorn handles both), then stop the check loop cleanly."""
        import uvicorn

        host = host or self.settings.monitor.host
        port = self.settings.monitor.port if port is None else port
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
        server = uvicorn.Server(config)
        self.start_checks()
        log.info("driftloop monitor on http://%s:%d (checks every %.0fs)", host, port,
                 self.settings.monitor.check_interval_seconds)
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with the handler it
        # found; a no-op handler here turns that into a normal return, so the stores close cleanly (exit 0).
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop_checks()
            self.trigger.stop()  # a retraining run started here stops with the monitor, with what it started
            self.store.close()
            self.alerts.close()
