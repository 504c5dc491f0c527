"""The retraining trigger: an alert that passes the guardrails starts the training pipeline.

Runs go through the runner the monitor is given (``runner.run_training(RunRequest(trigger=
"drift:<alert-id>", …))``, the same pipeline as ``driftloop run train``), so the registered model
version carries ``driftloop.trigger=drift:<id>`` and ``driftloop.alert_id``. The monitor is a
service below ``pipelines/``: it never imports the runner. Whoever builds the trigger hands it a
``runner_factory`` (the monitor command passes ``pipelines.training.training_runner_for``), and
the embedded default's worker is a process of its own. Where the run executes:

* embedded default (kfp.local): a background worker process (``python -m pipelines.retrain``)
  runs the pipeline and writes its outcome into the alert store, so the monitor keeps ingesting.
  It starts through ``driftloop.core.processes.spawn`` and dies with the monitor, its pipeline's
  task processes with it; the worker's pid is stored and its liveness checked (``/proc``) by the
  in-flight guard, so a run whose monitor died is marked LOST at the next start, not forgotten.
* Kubernetes (``kfp.host`` set): the run is submitted with ``kfp.Client`` (non-blocking) through
  the runner from ``runner_factory``; the in-flight guard asks Kubeflow for the run's state.
* an injected runner (tests, embedding): called in a background thread of this process.

**Data window** of the retraining run, in the data's own time (``data.time_column``), never the
wall clock: it ends just after the newest event time in the training source (the end is
exclusive: the newest second is inside), and starts ``trigger.recent_days`` before that end, or at
the time of the ``trigger.recent_rows``-th last row; with neither, all rows up to the end. So data
whose times are historical gives the last days *of the data*. Without a time column there is no
window (every row). When the source cannot be read here (a monitor without the pipeline's storage
credentials) the default window is left open (the run reads up to the data's end itself);
``recent_days`` / ``recent_rows`` then fail the start, naming the source.

**A run is in flight** from its start until its rollout has an outcome (:mod:`monitoring.outcomes`:
promoted, rolled back, nothing registered, no rollout, failed). An alert of the monitor's own
checks that arrives meanwhile is **attached** to that run (decision ``attached``) and re-checked
when it has an outcome (:meth:`Trigger.follow`): superseded when the canary was promoted, resolved
when its episode ended meanwhile, otherwise judged by the guardrails again. A run whose canary was
rolled back does not start the cooldown: the next attempt for the degraded champion is not held
for ``trigger.cooldown_seconds`` (the daily budget still counts it). Alertmanager's alerts are held
(``in_flight``) as before.

**In a fleet** (``settings.fleet``) the models' triggers also share the fleet's limits, kept in one
ledger in the fleet's root (:mod:`monitoring.fleet_runs`, safe across processes): an alert that
passes its model's guardrails starts a run only while fewer than ``fleet.max_concurrent_runs`` runs
are in flight and their train steps' GPUs stay inside ``fleet.gpus``; otherwise it is **queued**
(decision ``queued``, the reason naming the limit) and started by :meth:`Trigger.follow` (each round
of the monitor's checks) when a slot frees, oldest first across the fleet. A run's slot frees when
its run ends, or when its process is gone. A queued alert whose episode ended meanwhile is
resolved; one judged otherwise on a re-check (attached to another run of its model, held by a
guardrail) leaves the queue. ``fleet.daily_runs`` is one pool of runs started in the last 24 hours
across the models: when it is spent the alert is held (``budget``), as by its own daily budget.
Nothing of this applies to a one-model configuration.

Alertmanager's alert for a drift the monitor raised itself is its duplicate
(:mod:`monitoring.duplicates`); the monitor's own checks raise one alert per episode
(:mod:`monitoring.episodes`).
"""

from __future__ import annotations

import contextlib
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
from driftloop.core.runs import RunRequest, TrainingRuns
from driftloop.core.tables import event_times
from monitoring.alerts import ATTACHED, QUEUED, STARTED, Alert, AlertStore, Decision, day_ago, decide
from monitoring.duplicates import DRIFT_ALERTNAMES, EPISODE_MARGIN_SECONDS, GaugeEpisodes
from monitoring.fleet_runs import FleetRuns
from monitoring.outcomes import PROMOTED, Outcome, RunOutcomes

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


def worker_alive(pid: int | None) -> bool:
    """True while ``pid`` is a live (non-zombie) retraining worker process (or this process)."""
    return process_alive(pid, cmdline_contains=WORKER_MODULE.encode())


def retrain_window(settings: Settings) -> tuple[str | None, str | None]:
    """(window_start, window_end) of a retraining run's data, in data time (module doc): ISO times,
    the end exclusive; None for an open side."""
    import pandas as pd

    cfg = settings.trigger
    if not settings.data.time_column:
        return None, None
    recency = cfg.recent_days is not None or cfg.recent_rows is not None
    try:
        times = event_times(settings.data.source, str(settings.data.time_column), settings.data.format)
    except (DriftloopError, OSError, ValueError) as exc:
        if recency:
            what = "recent_days" if cfg.recent_days is not None else "recent_rows"
            raise MonitorError(f"trigger.{what} needs the times in data.source {settings.data.source!r} "
                               f"(column {settings.data.time_column!r}), which the monitor cannot read: {exc}") from exc
        log.warning("data window left open: the times in %s are not readable here (%s)", settings.data.source, exc)
        return None, None
    if times.empty:
        return None, None
    end = times.iloc[-1].floor("s") + pd.Timedelta(seconds=1)  # exclusive: the newest event is inside
    if cfg.recent_days is not None:
        return (end - pd.Timedelta(days=cfg.recent_days)).isoformat(), end.isoformat()
    if cfg.recent_rows is not None and len(times) > cfg.recent_rows:
        return times.iloc[-cfg.recent_rows].isoformat(), end.isoformat()
    return None, end.isoformat()


class Trigger:
    """Applies the guardrails to alerts, starts retraining runs and follows them to their rollout's outcome."""

    def __init__(self, settings: Settings, alerts: AlertStore, *, runner: TrainingRuns | None = None,
                 runner_factory: Callable[[Settings], TrainingRuns] | None = None, metrics: Any | None = None,
                 clock: Callable[[], float] = time.time, registry: Any | None = None) -> None:
        """``registry``: where the rollouts' outcomes are read (MLflow); without one a run is over when it ends."""
        self.settings = settings
        self.alerts = alerts
        self.runner = runner
        self.runner_factory = runner_factory
        self.metrics = metrics
        self.clock = clock
        self.gauge = GaugeEpisodes(settings, alerts, clock)
        self.outcomes = RunOutcomes(settings, alerts, registry=registry, metrics=metrics, since=self.gauge.born)
        self.fleet = FleetRuns.of(settings)  # the fleet's shared limits; None for a one-model configuration
        self._lock = threading.RLock()
        self._threads: dict[str, threading.Thread] = {}
        self._workers: dict[str, subprocess.Popen] = {}

    @property
    def _born(self) -> float:
        return self.gauge.born

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

    def in_flight(self) -> str | None:
        """The alert whose run is running, or whose rollout has no outcome yet."""
        return self.refresh() or self.outcomes.pending()

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

    # -- Alertmanager duplicates (monitoring.duplicates) ------------------------------------
    def observe_drift(self, model: str, drift: bool) -> None:
        """The drift check's verdict as exported on the gauge (:meth:`GaugeEpisodes.observe_drift`)."""
        self.gauge.observe_drift(model, drift)

    def duplicate_of(self, alert: Alert, now: float) -> tuple[str, str] | None:
        """(id of the alert that ``alert`` duplicates, how it was recognised), or None."""
        return self.gauge.duplicate_of(alert, now)

    # -- decisions ---------------------------------------------------------------------------
    def submit(self, alert: Alert) -> Decision:
        """Record the alert, apply the guardrails, start a run when they pass. Never raises for a refusal."""
        with self._lock:
            self.follow()  # outcomes known by now count (in flight, cooldown) before this alert is judged
            now = self.clock()
            fresh = self.alerts.insert(alert)
            if fresh:
                original, why = self.duplicate_of(alert, now) or (None, "")
            else:  # a repeat delivery: the duplicate of what its first delivery duplicated
                original, why = (self.alerts.get(alert.id) or {}).get("duplicate_of"), ""
            if fresh and original is not None:
                self.alerts.update(alert.id, duplicate_of=original)
            return self._judge(alert, now, seen=not fresh, original=original, why=why)

    def rejudge(self, alert_id: str, *, samples: int | None = None, why: str = "") -> Decision | None:
        """Apply the guardrails again to a known alert that has not started a run (held or attached), e.g.
        when its episode's next window fails or the run it waited for has an outcome; None if it has one."""
        with self._lock:
            rec = self.alerts.get(alert_id)
            if rec is None or rec.get("decision") == STARTED:
                return None
            if samples is not None:
                self.alerts.update(alert_id, samples=samples)
            alert = Alert(rec["id"], rec["source"], created=rec["created"], details=rec.get("details") or {},
                          samples=rec["samples"] if samples is None else samples, window_start=rec.get("window_start"),
                          window_end=rec.get("window_end"), report_path=rec.get("report_path"),
                          report_uri=rec.get("report_uri"))
            return self._judge(alert, self.clock(), seen=False, original=None, why="", note=why,
                               previous=rec.get("decision"))

    def _judge(self, alert: Alert, now: float, *, seen: bool, original: str | None, why: str,
               note: str = "", previous: str | None = None) -> Decision:
        in_flight = self.in_flight() if not seen and original is None else None
        decision, reason = decide(alert, self.settings.trigger, now=now, seen=seen, in_flight=in_flight,
                                  last_started=self.alerts.last_started(),
                                  started_last_day=self.alerts.started_since(day_ago(now)),
                                  duplicate_of=original, why=why)
        request_id = None
        if self.fleet is not None and not seen:
            decision, reason = self._admit(alert.id, now, decision, reason)
        if decision == ATTACHED:
            self.alerts.update(alert.id, attached_to=in_flight)
        elif decision == STARTED:
            try:
                request_id = self._start(alert, now)
            except DriftloopError as exc:
                decision, reason = "failed", f"could not start the run: {exc}"
                if self.fleet is not None:
                    self.fleet.release(alert.id)
        reason = f"{note}: {reason}" if note else reason
        self.alerts.record_decision(alert.id, decision, reason, now=now, final=not seen)
        if self.metrics is not None:
            self.metrics.trigger_decisions.labels(decision=decision).inc()
        # a re-delivered alert (Alertmanager repeats, a re-checked window) or one held again is no news: only with -v
        log.log(logging.DEBUG if decision in ("duplicate", previous) else logging.INFO, "alert %s (%s): %s — %s",
                alert.id, alert.source, decision, reason)
        return Decision(alert.id, decision, reason, request_id, original)

    # -- after a run -------------------------------------------------------------------------
    def follow(self) -> list[Outcome]:
        """Follow finished runs to their rollout's outcome; for each outcome re-check the alerts attached
        to its run and raise needs-attention when a degraded champion stays. Returns the new outcomes."""
        with self._lock:
            self.refresh()
            now = self.clock()
            ended = self.outcomes.ended(now)
            for outcome in ended:
                self.outcomes.attention(outcome, now)
                for rec in self.alerts.attached_to(outcome.alert["id"]):
                    self._recheck(rec, outcome, now)
            self.outcomes.resolve(now)
            if self.fleet is not None:
                self._drain(now)
            return ended

    # -- the fleet's limits (monitoring.fleet_runs) -------------------------------------------
    def _admit(self, alert_id: str, now: float, decision: str, reason: str) -> tuple[str, str]:
        """(decision, reason) after the fleet's limits: passed by the model's guardrails → started, queued or
        held by the pool; not passed → out of the fleet's queue."""
        if decision != STARTED:
            self.fleet.dequeue(alert_id)
            return decision, reason
        try:
            admission = self.fleet.admit(alert_id, now)
        except DriftloopError as exc:
            return "failed", f"could not start the run: {exc}"
        if admission.started:
            return STARTED, f"{reason}; {admission.reason}"
        return ("budget" if admission.spent else QUEUED), admission.reason

    def _drain(self, now: float) -> None:
        """Free the slots of this model's runs that ended; start its queued alerts that a slot fits now."""
        try:
            self.fleet.release_ended({rec["id"] for rec in self.alerts.running()})
            for alert_id in self.fleet.queued():
                rec = self.alerts.get(alert_id)
                episode = self.alerts.episode(int(rec["episode"])) if rec and rec.get("episode") else None
                if rec is None or rec.get("decision") != QUEUED:
                    self.fleet.dequeue(alert_id)
                elif episode is not None and not episode.open:
                    self.fleet.dequeue(alert_id)
                    self.alerts.record_decision(alert_id, "resolved", f"its {episode.kind} episode ended while it "
                                                f"was queued ({episode.close_reason})", now=now)
                elif self.in_flight():  # a run of its model started meanwhile: attached to it, or held
                    self.rejudge(alert_id, why="a run of its model is in flight")
                elif self.fleet.ready(alert_id):
                    self.rejudge(alert_id, why="a slot of the fleet is free")
        except DriftloopError as exc:  # the ledger unreadable: the queue waits for the next round
            log.warning("the fleet's queue was not drained: %s", exc)

    def _recheck(self, rec: dict[str, Any], ended: Outcome, now: float) -> None:
        """An alert attached to the run that ``ended``: superseded, resolved, or judged again."""
        run = ended.alert["id"]
        episode = self.alerts.episode(int(rec["episode"])) if rec.get("episode") else None
        if ended.outcome == PROMOTED:
            self.alerts.record_decision(rec["id"], "superseded", f"the run of alert {run} it waited for was promoted "
                                        f"({ended.reason}); the new champion's windows are judged afresh", now=now)
        elif episode is not None and not episode.open:
            self.alerts.record_decision(rec["id"], "resolved", f"its {episode.kind} episode ended before the run of "
                                        f"alert {run} had an outcome ({episode.close_reason})", now=now)
        else:
            self.rejudge(rec["id"], why=f"re-checked after the run of alert {run} ({ended.outcome})")

    # -- starting a run ----------------------------------------------------------------------
    def _start(self, alert: Alert, now: float) -> str:
        start, end = retrain_window(self.settings)
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
        except sqlite3.ProgrammingError as exc:
            # the monitor stopped (and closed its store) while the run went on: nothing to record it in; the
            # next monitor finds the alert RUNNING with this process gone and marks it LOST (refresh)
            log.warning("the result of the retraining run for alert %s was not recorded: %s", alert_id, exc)
        except Exception as exc:  # the monitor keeps running; the failure is recorded on the alert
            log.exception("retraining run for alert %s failed", alert_id)
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed under the run, as above
                self.alerts.update(alert_id, run_state="FAILED", finished=self.clock(), reason=f"run failed: {exc}")
        finally:
            if self.fleet is not None:  # the run ended: its slot is free for the next follow() of any model
                self.fleet.release(alert_id)

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
        if self.fleet is not None:
            self.fleet.hold(alert_id, proc.pid)
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
    """Write a RunResult (state, pipeline run id, model version) onto the alert; for a run that
    registered nothing, why (the gate's reason, or that it equals the champion) for its outcome."""
    fields: dict[str, Any] = {"pipeline_run_id": result.run_id, "run_state": result.state}
    if result.state not in ("SUBMITTED", "RUNNING"):
        fields["finished"] = now
    summary = result.summary or {}
    version = summary.get("model_version")
    if version:
        fields["model_version"] = str(version)
    elif result.state == "SUCCEEDED" and summary.get("gate"):
        fields["outcome_reason"] = f"gate {summary['gate']}: {summary.get('reason', '')}".strip(": ")
    if result.error:
        fields["reason"] = f"run failed: {result.error}"
    alerts.update(alert_id, **fields)
