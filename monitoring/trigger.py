"""The retraining trigger: an alert that passes the guardrails starts the training pipeline.

Runs go through the same runner adapter as ``driftloop run train``
(``pipelines.runner.runner_for(settings).run_training(RunRequest(trigger="drift:<alert-id>", …))``),
so the registered model version carries ``driftloop.trigger=drift:<id>`` and
``driftloop.alert_id``. The monitor is a service below ``pipelines/``: it never imports the
runner. Whoever builds the trigger hands it a ``runner_factory`` (the monitor command passes
``pipelines.runner.runner_for``), and the embedded default's worker is a process of its own.
Where the run executes:

* embedded default (kfp.local): a background worker process (``python -m pipelines.retrain``)
  runs the pipeline and writes its outcome into the alert store, so the monitor keeps ingesting.
  It starts through ``driftloop.core.processes.spawn`` and dies with the monitor, its pipeline's
  task processes with it; the worker's pid is stored and its liveness checked (``/proc``) by the
  in-flight guard, so a run whose monitor died is marked LOST at the next start, not forgotten.
* Kubernetes (``kfp.host`` set): the run is submitted with ``kfp.Client`` (non-blocking) through
  the runner from ``runner_factory``; the in-flight guard asks Kubeflow for the run's state.
* an injected runner (tests, embedding): called in a background thread of this process.

Data window of the retraining run: it ends at the alert's window end (the time of the last row
the drift check saw, or the Alertmanager ``startsAt``); it starts ``trigger.recent_days`` before
that, or at the time of the ``trigger.recent_rows``-th last row of the training source before the
end; with neither set, all data up to the end is used.

One drift, one alert. On a cluster the same drift reaches the trigger twice: as the monitor's own
alert and, ``for:`` later, as Alertmanager's (the PrometheusRule ``DriftloopDatasetDrift`` fires
on the monitor's ``driftloop_monitor_dataset_drift_share``). The monitor's **drift episode** is
the time from the check whose verdict turned to drift (the check that sets
``driftloop_monitor_dataset_drift`` to 1) to the first later check that finds none, or to the
start of a new monitor process (its gauges read 0 until its first check); the drift check reports
each verdict through :meth:`Trigger.observe_drift`, and the episodes are stored with the alerts.
A firing ``DriftloopDatasetDrift`` whose labels fit this monitor (``namespace`` = the loop's
``serving.namespace``; ``model`` and ``version``, where a rule sets them, = its model and the own
alert's champion version) reports the episode that was open at its ``startsAt`` (give or take
:data:`EPISODE_MARGIN_SECONDS`). When the monitor raised an alert in that episode, the
Alertmanager alert is recorded as its duplicate (``duplicate_of``; decision ``duplicate``, reason
``duplicate of <id>: …``) and starts nothing; the original is the latest of the episode's own
alerts that started a run, else its latest. Failing that, an earlier Alertmanager alert with the
same fingerprint in the same episode is the original. Anything else — no episode at ``startsAt``
(drift seen only by Prometheus, a monitor whose store is new), no own alert in it (Evidently did
not confirm the drift), another alert name (``DriftloopBatchDrift``) — goes through the
guardrails as before. See docs/monitoring.md ("One drift, one alert").
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import DriftloopError, MonitorError
from driftloop.core.files import atomic_write, private_dir
from driftloop.core.processes import process_alive, spawn, stop_process
from driftloop.core.runs import PipelineRunner, RunRequest
from monitoring.alerts import STARTED, Alert, AlertStore, Decision, day_ago, decide

if TYPE_CHECKING:
    from driftloop.core.config import Settings

__all__ = [
    "DRIFT_ALERTNAMES",
    "EPISODE_MARGIN_SECONDS",
    "Trigger",
    "WORKER_MODULE",
    "record_result",
    "retrain_window",
    "trigger_of",
    "worker_alive",
]

log = logging.getLogger(__name__)

#: The module the embedded default's retraining worker runs (``python -m``); it lives in
#: ``pipelines/`` because it starts a pipeline run.
WORKER_MODULE = "pipelines.retrain"

_TERMINAL = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED", "CANCELING"}

#: Alertmanager alerts that report the monitor's own drift gauge (infra/base/monitoring/prometheus-rule.yaml
#: and each tenant's rule); only these can be duplicates of the monitor's drift alerts.
DRIFT_ALERTNAMES = frozenset({"DriftloopDatasetDrift"})

#: How far a ``startsAt`` may lie outside a drift episode and still report it: Prometheus sees the
#: gauge a scrape and an evaluation interval late, keeps a series that is no longer scraped for its
#: 5-minute lookback, and its clock is not the monitor's.
EPISODE_MARGIN_SECONDS = 300.0


def worker_alive(pid: int | None) -> bool:
    """True while ``pid`` is a live (non-zombie) retraining worker process (or this process)."""
    return process_alive(pid, cmdline_contains=WORKER_MODULE.encode())


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.UTC).isoformat()
    return str(value)


def retrain_window(settings: Settings, window_end: str | None) -> tuple[str | None, str | None]:
    """(window_start, window_end) of the retraining run's data, as described in the module doc."""
    end = window_end
    cfg = settings.trigger
    if end is None:
        return None, None
    end_ts = _to_timestamp(end)
    if cfg.recent_days is not None:
        return (end_ts - dt.timedelta(days=cfg.recent_days)).isoformat(), end_ts.isoformat()
    if cfg.recent_rows is not None and settings.data.time_column:
        start = _nth_last_time(settings, end_ts, cfg.recent_rows)
        return (start.isoformat() if start is not None else None), end_ts.isoformat()
    return None, end_ts.isoformat()


def _to_timestamp(value: str) -> Any:
    import pandas as pd

    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _nth_last_time(settings: Settings, end: Any, n: int) -> Any:
    """Time of the n-th last row of the training source before ``end`` (None: fewer rows)."""
    import pandas as pd

    from driftloop.core.tables import read_table

    col = settings.data.time_column
    frame = read_table(settings.data.source, settings.data.format)
    times = pd.to_datetime(frame[col], utc=True)
    times = times[times < end].sort_values()
    return None if len(times) <= n else times.iloc[-n]


class Trigger:
    """Applies the guardrails to alerts and starts (and follows) retraining runs."""

    def __init__(self, settings: Settings, alerts: AlertStore, *, runner: PipelineRunner | None = None,
                 runner_factory: Callable[[Settings], PipelineRunner] | None = None, metrics: Any | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.alerts = alerts
        self.runner = runner
        self.runner_factory = runner_factory
        self.metrics = metrics
        self.clock = clock
        self._born = clock()  # this process's drift gauge reads 0 from here until its first check
        self._observed: set[str] = set()
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._workers: dict[str, subprocess.Popen] = {}

    # -- in flight --------------------------------------------------------------------------
    def refresh(self) -> str | None:
        """Update runs the store thinks are running; the alert id of one still in flight, if any."""
        in_flight = None
        for rec in self.alerts.running():
            if self._still_running(rec):
                in_flight = in_flight or rec["id"]
            elif (self.alerts.get(rec["id"]) or {}).get("finished") is None:  # gone without writing a result
                self.alerts.update(rec["id"], finished=self.clock(), run_state="LOST")
                log.warning("retraining run for alert %s is gone without a result; marked LOST", rec["id"])
        return in_flight

    def _still_running(self, rec: dict[str, Any]) -> bool:
        alert_id = rec["id"]
        thread = self._threads.get(alert_id)
        if thread is not None:
            return thread.is_alive()
        proc = self._workers.get(alert_id)
        if proc is not None and proc.poll() is not None:
            self._workers.pop(alert_id, None)  # reaped; the worker wrote its result (or died)
            return False
        if rec.get("pipeline_run_id") and rec.get("run_state") == "SUBMITTED" and self.settings.is_cluster:
            return self._cluster_running(alert_id, rec["pipeline_run_id"])
        pid = rec.get("worker_pid")
        if pid and pid != os.getpid():
            return worker_alive(pid)
        return False

    def _cluster_running(self, alert_id: str, run_id: str) -> bool:
        try:
            state = str(getattr(self._runner().client.get_run(run_id), "state", "") or "")
        except Exception as exc:  # noqa: BLE001 - Kubeflow unreachable: keep the guard closed, no second run
            log.warning("cannot read the state of run %s: %s; treating it as in flight", run_id, exc)
            return True
        if state.upper() in _TERMINAL:
            self.alerts.update(alert_id, run_state=state.upper(), finished=self.clock())
            return False
        return True

    def _runner(self) -> Any:
        if self.runner is None:
            if self.runner_factory is None:
                raise MonitorError("the trigger has no pipeline runner for Kubeflow (pass runner_factory)")
            self.runner = self.runner_factory(self.settings)
        return self.runner

    # -- drift episodes ----------------------------------------------------------------------
    def observe_drift(self, model: str, drift: bool) -> None:
        """The drift check's verdict, as just exported on ``driftloop_monitor_dataset_drift``.

        Opens ``model``'s drift episode on drift, closes it on no drift; the first call of a new
        monitor process closes an episode an earlier one left open (at this process's start). A
        store that cannot be written costs only the de-duplication of Alertmanager alerts.
        """
        restarted = None if model in self._observed else self._born
        try:
            self.alerts.observe_drift(model, drift, now=self.clock(), restarted_at=restarted)
        except sqlite3.Error as exc:
            log.warning("drift episode of %s not recorded: %s", model, exc)
            return
        self._observed.add(model)

    def duplicate_of(self, alert: Alert, now: float) -> tuple[str, str] | None:
        """(id of the alert that ``alert`` duplicates, how it was recognised), or None (module doc)."""
        if alert.source != "alertmanager":
            return None
        details = alert.details or {}
        labels = details.get("labels") if isinstance(details.get("labels"), dict) else {}
        name = labels.get("alertname")
        if not isinstance(name, str) or name not in DRIFT_ALERTNAMES or alert.window_end is None:
            return None
        s = self.settings
        if "namespace" in labels and str(labels["namespace"]) != s.serving.namespace:
            return None
        if "model" in labels and str(labels["model"]) not in (s.mlflow.model_name, s.serving.name):
            return None
        model = s.mlflow.model_name
        try:
            starts = dt.datetime.fromisoformat(alert.window_end).timestamp()
            return self._original(alert, model, labels, starts, now)
        except Exception as exc:  # noqa: BLE001 - the alert is stored already; the guardrails still judge it
            log.warning("alert %s not checked for duplicates: %s", alert.id, exc)
            return None

    def _original(self, alert: Alert, model: str, labels: dict[str, Any], starts: float,
                  now: float) -> tuple[str, str] | None:
        margin = EPISODE_MARGIN_SECONDS
        episodes = self.alerts.drift_episodes(model, since=starts - margin, until=starts + margin)
        if not episodes:
            return None
        # the episode open at startsAt, else the latest one within the margin of it
        holding = [e for e in episodes if e["opened"] <= starts and (e["closed"] is None or e["closed"] >= starts)]
        episode = (holding or episodes)[-1]
        since = _iso(episode["opened"])
        end = now if episode["closed"] is None else episode["closed"]
        own = self.alerts.raised_between(episode["opened"], end)
        if "version" in labels:
            own = [a for a in own if str((a.get("details") or {}).get("champion_version")) == str(labels["version"])]
        if own:
            started = [a for a in own if a.get("decision") == STARTED]
            original = (started or own)[-1]
            return original["id"], (f"the monitor raised this drift of {model} itself (its alert's decision: "
                                    f"{original['decision']}); drift episode since {since}, Alertmanager's "
                                    f"startsAt {alert.window_end}")
        fingerprint = (alert.details or {}).get("fingerprint")
        for earlier in self.alerts.alertmanager_by_fingerprint(str(fingerprint)):
            if earlier["id"] == alert.id or not earlier.get("window_end"):
                continue
            at = dt.datetime.fromisoformat(earlier["window_end"]).timestamp()
            if episode["opened"] - margin <= at <= end + margin:
                return earlier.get("duplicate_of") or earlier["id"], (
                    f"Alertmanager alert {fingerprint} again, with startsAt {alert.window_end}, in the same drift "
                    f"episode of {model} (since {since})")
        return None

    # -- decisions ---------------------------------------------------------------------------
    def submit(self, alert: Alert) -> Decision:
        """Record the alert, apply the guardrails, start a run when they pass. Never raises for a refusal."""
        with self._lock:
            now = self.clock()
            fresh = self.alerts.insert(alert)
            if fresh:
                original, why = self.duplicate_of(alert, now) or (None, "")
            else:  # a repeat delivery: the duplicate of what its first delivery duplicated
                original, why = (self.alerts.get(alert.id) or {}).get("duplicate_of"), ""
            in_flight = self.refresh() if fresh and original is None else None
            decision, reason = decide(alert, self.settings.trigger, now=now, seen=not fresh, in_flight=in_flight,
                                      last_started=self.alerts.last_started(),
                                      started_last_day=self.alerts.started_since(day_ago(now)),
                                      duplicate_of=original, why=why)
            if fresh and original is not None:
                self.alerts.update(alert.id, duplicate_of=original)
            request_id = None
            if decision == STARTED:
                try:
                    request_id = self._start(alert, now)
                except DriftloopError as exc:
                    decision, reason = "failed", f"could not start the run: {exc}"
            self.alerts.record_decision(alert.id, decision, reason, now=now, final=fresh)
            if self.metrics is not None:
                self.metrics.trigger_decisions.labels(decision=decision).inc()
            log.info("alert %s (%s): %s — %s", alert.id, alert.source, decision, reason)
            return Decision(alert.id, decision, reason, request_id, original)

    def _start(self, alert: Alert, now: float) -> str:
        start, end = retrain_window(self.settings, alert.window_end)
        request = RunRequest(trigger=trigger_of(alert.source, alert.id), window_start=start, window_end=end)
        self.alerts.update(alert.id, request_id=request.request_id, started=now, run_state="RUNNING",
                           window_start=start, window_end=end)
        if self.runner is not None and not self.settings.is_cluster:
            thread = threading.Thread(target=self._run_in_thread, args=(alert.id, request), daemon=True,
                                      name=f"retrain-{alert.id}")
            self.alerts.update(alert.id, worker_pid=os.getpid())
            self._threads[alert.id] = thread
            thread.start()
        elif self.settings.is_cluster:
            result = self._runner().run_training(request, wait=False)
            self.alerts.update(alert.id, pipeline_run_id=result.run_id, run_state=result.state)
        else:
            self._spawn_worker(alert.id, request)
        return request.request_id

    def _run_in_thread(self, alert_id: str, request: Any) -> None:
        try:
            result = self.runner.run_training(request)
            record_result(self.alerts, alert_id, result, self.clock())
        except Exception as exc:  # the monitor keeps running; the failure is recorded on the alert
            log.exception("retraining run for alert %s failed", alert_id)
            self.alerts.update(alert_id, run_state="FAILED", finished=self.clock(), reason=f"run failed: {exc}")

    def _spawn_worker(self, alert_id: str, request: Any) -> None:
        settings_file = self.settings.workspace_dir / "monitor" / "runs" / f"{alert_id}.settings.json"
        private_dir(settings_file.parent)
        atomic_write(settings_file, self.settings.model_dump_json())
        log_file = settings_file.with_suffix("").with_suffix(".log")
        cmd = [sys.executable, "-m", WORKER_MODULE, "--settings", str(settings_file), "--alert-id", alert_id,
               "--request-id", request.request_id, "--store", str(self.alerts.path)]
        if request.window_start:
            cmd += ["--window-start", request.window_start]
        if request.window_end:
            cmd += ["--window-end", request.window_end]
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        with open(log_file, "ab") as out:
            # dies with the monitor, and takes its pipeline's task processes with it (kill_group)
            proc = spawn(cmd, kill_group=True, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         env=env)
        self._workers[alert_id] = proc
        self.alerts.update(alert_id, worker_pid=proc.pid)
        log.info("retraining worker pid %d for alert %s (log %s)", proc.pid, alert_id, log_file)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the retraining workers this trigger started, each with its process group (the kfp.local
        task processes and whatever they started in it), when the monitor stops; their alerts are
        marked STOPPED. A run in an injected runner's thread cannot be stopped and is left to end."""
        for alert_id, proc in list(self._workers.items()):
            if proc.poll() is None:
                log.info("stopping the retraining worker pid %d of alert %s", proc.pid, alert_id)
                stop_process(proc.pid, timeout=timeout)
                try:
                    if (self.alerts.get(alert_id) or {}).get("finished") is None:
                        self.alerts.update(alert_id, finished=self.clock(), run_state="STOPPED",
                                           reason="the monitor stopped during the run")
                except sqlite3.Error as exc:
                    log.warning("alert %s not marked STOPPED: %s", alert_id, exc)
            self._workers.pop(alert_id, None)

    def wait(self, alert_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Block until the run started for ``alert_id`` has finished (tests, one-shot use)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            thread, proc = self._threads.get(alert_id), self._workers.get(alert_id)
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
            elif proc is not None:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
            rec = self.alerts.get(alert_id)
            if rec is None or rec.get("finished") is not None:
                return rec or {}
            self.refresh()
            time.sleep(0.2)
        raise MonitorError(f"the retraining run for alert {alert_id} did not finish within {timeout:.0f}s")


def trigger_of(source: str | None, alert_id: str) -> str:
    """The run's trigger: ``quality:<id>`` for a quality alert, ``drift:<id>`` for drift and Alertmanager."""
    return f"{'quality' if source == 'quality' else 'drift'}:{alert_id}"


def record_result(alerts: AlertStore, alert_id: str, result: Any, now: float) -> None:
    """Write a RunResult (state, pipeline run id, model version) onto the alert."""
    fields: dict[str, Any] = {"pipeline_run_id": result.run_id, "run_state": result.state}
    if result.state not in ("SUBMITTED", "RUNNING"):
        fields["finished"] = now
    version = (result.summary or {}).get("model_version")
    if version:
        fields["model_version"] = str(version)
    if result.error:
        fields["reason"] = f"run failed: {result.error}"
    alerts.update(alert_id, **fields)
