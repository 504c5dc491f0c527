"""The local scheduler: runs due slots of the stored schedules through the runner adapter.

Each tick reads the schedules from :class:`~pipelines.schedule.LocalSchedules`, works out
which slot is due (:func:`plan_slots`), claims it atomically in the store and only then
runs it, so a restart or a second scheduler never runs a slot twice. Catch-up policy,
per schedule, after downtime: ``catchup`` runs the most recent missed slot once and
records the older ones as skipped; ``no_catchup`` records missed slots as skipped and
runs only a slot that is on time (no later than ``schedule.grace_seconds``).
A slot left ``claimed``/``running`` by a scheduler process that died is marked failed
(interrupted), never re-run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from croniter import croniter

from driftloop.core.config import Settings
from driftloop.core.errors import DriftloopError, ScheduleError
from driftloop.core.processes import process_alive
from pipelines.schedule import LocalSchedules, Schedule, utc

__all__ = ["SlotPlan", "SlotOutcome", "plan_slots", "Scheduler"]

log = logging.getLogger(__name__)

# Missed slots recorded one by one after a long outage; older ones are left out.
MAX_RECORDED_MISSES = 1000


@dataclass(frozen=True)
class SlotPlan:
    """What to do now: the slot to run (if any) and the missed slots to record as skipped."""

    run: datetime | None
    skipped: tuple[datetime, ...]


@dataclass(frozen=True)
class SlotOutcome:
    schedule: str
    slot: datetime
    state: str  # done | failed | busy (not claimed: taken by another scheduler or at max_concurrency)
    run_id: str | None = None
    error: str | None = None


def plan_slots(cron: str, start: datetime, now: datetime, *, catchup: bool, grace_seconds: float) -> SlotPlan:
    """Slots of ``cron`` in ``(start, now]``: run the latest if on time or ``catchup``; skip the rest."""
    start, now = utc(start), utc(now)
    it = croniter(cron, now + timedelta(seconds=1))  # get_prev is strict: a slot at exactly `now` counts
    due: list[datetime] = []
    while len(due) <= MAX_RECORDED_MISSES:
        slot = utc(it.get_prev(datetime))
        if slot <= start:
            break
        if slot <= now:
            due.append(slot)
    if not due:
        return SlotPlan(None, ())
    latest, missed = due[0], tuple(reversed(due[1:]))
    if catchup or (now - latest).total_seconds() <= grace_seconds:
        return SlotPlan(latest, missed)
    return SlotPlan(None, missed + (latest,))


class Scheduler:
    """Runs the schedules of one workspace; ``tick`` once, or ``run_forever`` until stopped."""

    def __init__(
        self,
        settings: Settings,
        store: LocalSchedules | None = None,
        *,
        runner_factory: Callable[[Settings], Any] | None = None,
        clock: Callable[[], datetime] = utc,
    ) -> None:
        if settings.is_cluster:
            raise ScheduleError(f"kfp.host is set ({settings.kfp.host}): Kubeflow runs the schedules there, "
                                "no local scheduler is needed")
        from pipelines.training import training_runner_for

        self.settings = settings
        self.store = store or LocalSchedules.from_settings(settings)
        self.runner_factory = runner_factory or training_runner_for
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def release_interrupted(self) -> list[tuple[str, datetime]]:
        """Mark slots held by dead scheduler processes on this host as failed (never re-run them)."""
        host = socket.gethostname()
        released = []
        for rec in self.store.active_slots():
            parts = rec.owner.split(":")
            if len(parts) >= 2 and parts[0] == host and parts[1].isdigit() and not process_alive(int(parts[1])):
                self.store.set_slot(rec.schedule, rec.slot, "failed", error="interrupted: its scheduler stopped",
                                    now=self.clock())
                released.append((rec.schedule, rec.slot))
                log.warning("slot %s of %s was interrupted; recorded as failed", rec.slot.isoformat(), rec.schedule)
        return released

    def due(self, schedule: Schedule, since: datetime, now: datetime) -> SlotPlan:
        last = self.store.last_slot(schedule.name)
        start = max(utc(since), utc(last)) if last else utc(since)
        return plan_slots(schedule.cron, start, now, catchup=schedule.catchup,
                          grace_seconds=self.settings.schedule.grace_seconds)

    def has_due(self) -> bool:
        """Whether a tick now would run or skip a slot (reads the store, claims nothing): a fleet's one
        scheduler starts a model's tick only then."""
        now = self.clock()
        for schedule, since in self.store.schedules():
            if not schedule.paused:
                plan = self.due(schedule, since, now)
                if plan.run is not None or plan.skipped:
                    return True
        return False

    def tick(self) -> list[SlotOutcome]:
        """Claim and run every due slot once; return what happened."""
        self.release_interrupted()
        outcomes = []
        for schedule, since in self.store.schedules():
            if schedule.paused:
                continue
            now = self.clock()
            plan = self.due(schedule, since, now)
            if plan.run is None:
                if plan.skipped:
                    self.store.record_skipped(schedule.name, plan.skipped, now=now)
                    log.info("schedule %s: %d missed slot(s) skipped (no catch-up)", schedule.name, len(plan.skipped))
                continue
            if not self.store.claim(schedule.name, plan.run, self.owner, schedule.max_concurrency, plan.skipped,
                                    now=now):
                outcomes.append(SlotOutcome(schedule.name, plan.run, "busy"))
                continue
            outcomes.append(self._run(schedule, plan.run))
        return outcomes

    def _data_end(self, schedule: Schedule) -> datetime | None:
        """Just after the newest event time of the schedule's source (None without a window or a time column,
        or when the source cannot be read here: the window then ends at the slot, and the run says what it read)."""
        settings = schedule.settings_for(self.settings)
        if schedule.window_days is None or not settings.data.time_column:
            return None
        from driftloop.core.tables import event_times

        try:
            times = event_times(settings.data.source, settings.data.time_column, settings.data.format)
        except (DriftloopError, OSError, ValueError) as exc:
            log.warning("schedule %s: the window ends at the slot (the times in %s are not readable here: %s)",
                        schedule.name, settings.data.source, exc)
            return None
        if times.empty:
            return None
        return (times.iloc[-1].floor("s") + timedelta(seconds=1)).to_pydatetime()

    def _run(self, schedule: Schedule, slot: datetime) -> SlotOutcome:
        from pipelines.runner import RunRequest

        name = schedule.name
        self.store.set_slot(name, slot, "running", now=self.clock())
        window_start, window_end = schedule.window(slot, self._data_end(schedule))
        log.info("schedule %s: running slot %s (window %s .. %s)", name, slot.isoformat(), window_start or "-",
                 window_end or "-")
        try:
            if schedule.pipeline == "score":
                from pipelines.scoring import ScoreRequest, run_scoring

                result = run_scoring(schedule.settings_for(self.settings), ScoreRequest(trigger=schedule.trigger))
            else:
                runner = self.runner_factory(schedule.settings_for(self.settings))
                result = runner.run_training(RunRequest(trigger=schedule.trigger, window_start=window_start,
                                                        window_end=window_end))
        except KeyboardInterrupt:
            self.store.set_slot(name, slot, "failed", error="interrupted: the scheduler was stopped", now=self.clock())
            raise
        except DriftloopError as exc:
            outcome = SlotOutcome(name, slot, "failed", error=str(exc))
        except Exception as exc:  # keep the scheduler alive; the slot records what broke
            log.exception("schedule %s: slot %s crashed", name, slot.isoformat())
            outcome = SlotOutcome(name, slot, "failed", error=f"{type(exc).__name__}: {exc}")
        else:
            failed = result.state == "FAILED"
            outcome = SlotOutcome(name, slot, "failed" if failed else "done", run_id=result.run_id,
                                  error=result.error if failed else None)
        self.store.set_slot(name, slot, outcome.state, run_id=outcome.run_id, error=outcome.error, now=self.clock())
        log.info("schedule %s: slot %s %s%s", name, slot.isoformat(), outcome.state,
                 f": {outcome.error}" if outcome.error else "")
        return outcome

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Tick every ``schedule.tick_seconds`` until ``stop`` is set."""
        stop = stop or threading.Event()
        interval = self.settings.schedule.tick_seconds
        log.info("scheduler %s watching %s every %.0f s", self.owner, self.store.path, interval)
        while not stop.is_set():
            self.tick()
            stop.wait(interval)
