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
``monitor.min_samples`` rows, or while the window is not complete, the verdict is "insufficient
data" and nothing is raised. When the fast path finds dataset drift and the drift episode has no
alert yet, Evidently (the judge of record) runs on the window (sampled down to
``monitor.report_sample_rows``), its HTML + JSON report is saved under
``<workspace>/monitor/reports/<alert-id>/`` and logged to MLflow (a run tagged with the alert id
and the champion version), and — if Evidently confirms — the alert goes to the trigger; later
drifted windows of the episode are counted on it. After the checks the trigger follows finished
runs to their rollout's outcome (:meth:`monitoring.trigger.Trigger.follow`). Every check (the loop's
and ``POST /check``'s) and every outcome is also a snapshot in the model's Evidently project
(:mod:`monitoring.history`, written off the check's path); the loop logs a line when a verdict
changes and a summary at most every minute (:mod:`monitoring.loglines`), each verdict with ``-v``.

This module is the composition root: :class:`MonitorService` builds the parts, wires them into
one app and runs the check loop. The parts live apart: the routes above in
:mod:`monitoring.routes` (the sink's in :mod:`monitoring.sink`), the drift check in
:mod:`monitoring.drift_check`, the quality check in :mod:`monitoring.quality_check`, the shadow
comparison in :mod:`monitoring.shadow_check`.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.routing import Mount

from driftloop.core.errors import DriftloopError, MonitorError
from driftloop.core.files import workspace_token
from driftloop.core.registry import Registry
from driftloop.core.shadow import shadow_name
from monitoring.alerts import AlertStore
from monitoring.drift import warm_up as drift_warm_up
from monitoring.drift_check import DriftMonitor, log_report_to_mlflow
from monitoring.events import RowSchema
from monitoring.history import CheckHistory
from monitoring.loglines import LoopLines
from monitoring.metrics import MonitorMetrics
from monitoring.quality_check import QualityMonitor
from monitoring.reference import ChampionReference, ReferenceCache
from monitoring.routes import WEBHOOK_TOKEN_ENV, monitor_routes, openapi_route
from monitoring.shadow_check import shadow_summary
from monitoring.sink import INGEST_TOKEN_ENV, IngestAuth, LabelPolicy, create_sink_app
from monitoring.store import InferenceStore
from monitoring.trigger import Trigger

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = ["WEBHOOK_TOKEN_ENV", "MonitorService", "ingest_token_path", "log_report_to_mlflow", "mounted_app",
           "row_schema", "serve_until_stopped"]

log = logging.getLogger(__name__)


def ingest_token_path(settings: Settings) -> Path:
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


def mounted_app(routes: list[Any], apps: list[Starlette]) -> Starlette:
    """A Starlette app of ``routes`` (each model's app in a ``Mount``) whose lifespan runs every one of ``apps``'
    own (a ``Mount`` does not: the sink's group-commit writer must finish what is queued on shutdown)."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> Any:
        async with contextlib.AsyncExitStack() as stack:
            for app in apps:
                await stack.enter_async_context(app.router.lifespan_context(app))
            yield

    return Starlette(routes=routes, lifespan=lifespan)


def serve_until_stopped(app: Any, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until SIGTERM or Ctrl-C; returns normally (exit 0) after a graceful stop."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with the handler it
    # found; a no-op handler here turns that into a normal return, so the stores close cleanly (exit 0).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    # what was built before serving (imports, every model's monitor, references, registries) lives as long as
    # the process: out of the collector's way, a full collection no longer walks it (a fleet's monitor holds
    # every model's reference, clients and metrics)
    gc.collect()
    gc.freeze()
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class MonitorService:
    """The monitor's parts wired together; ``app`` serves them, ``run`` blocks until SIGTERM/Ctrl-C."""

    def __init__(self, settings: Settings, *, registry: Registry | None = None, runner: Any | None = None,
                 runner_factory: Any | None = None, metrics: MonitorMetrics | None = None,
                 store: InferenceStore | None = None, alerts: AlertStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or MonitorMetrics()
        self.store = store or InferenceStore.from_settings(settings)
        self.alerts = alerts or AlertStore.from_settings(settings)
        self.registry = registry or Registry.from_settings(settings)
        self.references = ReferenceCache(settings, self.registry)
        self.trigger = Trigger(settings, self.alerts, runner=runner, runner_factory=runner_factory,
                               metrics=self.metrics, registry=self.registry)
        self.reports_dir = settings.workspace_dir / "monitor" / "reports"
        self.drift = DriftMonitor(settings, store=self.store, references=self.references, alerts=self.alerts,
                                  trigger=self.trigger, metrics=self.metrics, registry=self.registry,
                                  reports_dir=self.reports_dir)
        self.options = self.drift.options
        self.quality = QualityMonitor(settings, store_path=self.store.path, registry=self.registry, alerts=self.alerts,
                                      trigger=self.trigger, metrics=self.metrics, reports_dir=self.reports_dir)
        self.history = CheckHistory(settings, metrics=self.metrics)  # every check in the model's Evidently project
        self.last_outcome: dict[str, Any] | None = None
        self.last_errors: dict[str, BaseException] = {}  # the loop's checks that failed or were skipped last round
        self.last_round: float | None = None  # unix time the loop's last round ended
        self.ingest_token = workspace_token(ingest_token_path(settings), INGEST_TOKEN_ENV)
        self.auth = IngestAuth(self.ingest_token, settings.monitor.events_auth)
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # -- the check ----------------------------------------------------------------------------
    def check(self, *, force: bool = False, report: bool = False) -> dict[str, Any]:
        """One drift check of the current window; returns the outcome (verdict, columns, alert)."""
        with self._check_lock:
            outcome = self.drift.check(force=force, report=report)
            self.last_outcome = outcome
            self.history.drift(outcome)
            return outcome

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
        for route in monitor_routes(self):
            app.router.routes.append(route)
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/openapi.json"]
        app.router.routes.append(openapi_route(self.settings.monitor.events_auth))  # the sink's and the monitor's
        app.state.monitor = self
        return app

    # -- process ------------------------------------------------------------------------------
    def _loop(self) -> None:
        interval = self.settings.monitor.check_interval_seconds
        lines = LoopLines(log)  # a line per change, a summary a minute; each verdict with -v (monitoring.loglines)
        drift_warm_up()  # while the first interval runs, not in the first check
        while not self._stop.wait(interval):
            self._round(lines)

    def _round(self, lines: LoopLines) -> None:
        """One round of the loop: drift, quality, the runs' outcomes; each failure leaves the others running."""
        self._guarded(lines, "drift", self.check, lines.drift)
        if self.settings.monitor.quality.enabled:
            self._guarded(lines, "quality", self.check_quality, lines.quality)
        self._guarded(lines, "follow-up", self._follow, None)  # the runs' outcomes
        lines.summary(f"history: {self.history.written} written, {self.history.failed} failed")
        self.last_round = time.time()

    def _follow(self) -> None:
        self.trigger.follow()  # finished runs to their rollout's outcome; attached alerts; needs-attention
        self.history.rollouts(self.alerts)  # every outcome followed so far (a new alert's guardrails follow too)

    def _guarded(self, lines: LoopLines, name: str, run: Any, said: Any) -> None:
        try:
            outcome = run()
        except DriftloopError as exc:  # no champion yet, MLflow away: said once while it lasts
            self.last_errors[name] = exc
            lines.skipped(name, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the service keeps running; the next round tries again
            self.last_errors[name] = exc
            lines.failed(name, exc)
            return
        self.last_errors.pop(name, None)
        if said is not None:
            said(outcome)

    def shadow_summary(self, since: float | None = None, version: str | None = None) -> dict[str, Any]:
        """The shadow's logged answers since ``since`` joined with the primary's and compared
        (:func:`monitoring.shadow_check.shadow_summary`)."""
        return shadow_summary(self.store, since, version)

    def check_quality(self) -> dict[str, Any]:
        """One quality check of the labelled windows of every version (see monitoring.quality_check)."""
        with self._check_lock:
            outcome = self.quality.check()
            self.history.quality(outcome)
            return outcome

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

    @property
    def served_app(self) -> Starlette:
        """What ``run`` serves: ``app``, under ``monitor.base_path`` when one is set (a fleet's model run alone
        answers on the same paths as on the fleet's monitor: ``/models/<name>/events``)."""
        base = self.settings.monitor.base_path
        return mounted_app([Mount(base, app=self.app)], [self.app]) if base else self.app

    def close(self) -> None:
        """Stop the check loop, write what the last checks recorded, stop the retraining workers, close the stores."""
        self.stop_checks()
        self.history.close()  # what the last checks recorded, written (bounded)
        self.trigger.stop()  # a retraining run started here stops with the monitor, with what it started
        self.store.close()
        self.alerts.close()

    def run(self, host: str | None = None, port: int | None = None) -> None:
        """Serve until SIGTERM or Ctrl-C (uvicorn handles both), then stop the check loop cleanly."""
        host = host or self.settings.monitor.host
        port = self.settings.monitor.port if port is None else port
        self.start_checks()
        log.info("driftloop monitor on http://%s:%d%s (checks every %.0fs)", host, port,
                 self.settings.monitor.base_path, self.settings.monitor.check_interval_seconds)
        try:
            serve_until_stopped(self.served_app, host, port)
        finally:
            self.close()
