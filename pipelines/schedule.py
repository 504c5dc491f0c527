"""Recurring training runs: the schedule model and its two homes.

A schedule is a name, a standard 5-field cron expression and what each run gets:
config overrides (``section.key=value``), an optional data window of the last
``window_days`` before the slot time, ``max_concurrency`` and a catch-up policy.

* Embedded default: :class:`LocalSchedules` keeps schedules and the state of every
  slot in a SQLite file in the workspace; ``driftloop scheduler``
  (:mod:`pipelines.scheduler`) runs due slots through the runner adapter.
* Kubernetes: :class:`KfpSchedules` makes each schedule a KFP recurring run. KFP cannot
  change a recurring run in place and deleting one stops its runs, so an update creates
  a new *generation* (job ``<name>-v<N>``) first, disables the old one and deletes it
  only once it has no runs in flight. The schedule's definition and generation live in
  the recurring run's description (JSON), so any machine sees the same schedules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from croniter import croniter
from pydantic import ValidationError

from driftloop.core.config import Settings, apply_overrides
from driftloop.core.errors import ConfigError, ScheduleError

__all__ = [
    "Schedule",
    "ScheduleStatus",
    "SlotRecord",
    "LocalSchedules",
    "KfpSchedules",
    "schedule_backend",
    "normalize_cron",
    "kfp_cron",
    "next_slot",
    "parse_params",
    "utc",
    "SLOT_ACTIVE",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
# Slot states that hold a place under max_concurrency.
SLOT_ACTIVE = ("claimed", "running")


def utc(value: datetime | None = None) -> datetime:
    """``value`` (default: now) as an aware UTC datetime; naive values are taken as UTC."""
    value = value or datetime.now(timezone.utc)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _iso(value: datetime) -> str:
    return utc(value).isoformat(timespec="seconds")


def normalize_cron(expr: str) -> str:
    """Check a standard 5-field cron expression (or @daily-style macro); return it normalised."""
    text = " ".join(str(expr).split())
    text = _MACROS.get(text.lower(), text)
    fields = text.split(" ") if text else []
    if len(fields) != 5:
        raise ScheduleError(
            f"invalid cron expression {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(fields)}"
        )
    if not croniter.is_valid(text):
        raise ScheduleError(f"invalid cron expression {expr!r}: a field is out of range or malformed")
    return text


def kfp_cron(expr: str) -> str:
    """KFP's cron has a leading seconds field: ``*/5 * * * *`` → ``0 */5 * * * *``."""
    return "0 " + normalize_cron(expr)


def next_slot(cron: str, after: datetime) -> datetime:
    """The first slot of ``cron`` strictly after ``after`` (UTC)."""
    return utc(croniter(normalize_cron(cron), utc(after)).get_next(datetime))


def parse_params(items: list[str] | None) -> dict[str, str]:
    """``["model.params.max_iter=50", ...]`` → ``{"model.params.max_iter": "50"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ScheduleError(f"--param {item!r} is not section.key=value")
        out[key.strip()] = value
    return out


@dataclass(frozen=True)
class Schedule:
    """What runs when: validated on construction (name, cron, limits)."""

    name: str
    cron: str
    params: dict[str, str] = field(default_factory=dict)
    window_days: float | None = None
    max_concurrency: int = 1
    catchup: bool = True
    paused: bool = False
    pipeline: str = "train"  # train | score (pipelines.PIPELINES)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name or ""):
            raise ScheduleError(
                f"schedule name {self.name!r} must be 1-40 lowercase letters, digits or '-', "
                "starting and ending with a letter or digit"
            )
        object.__setattr__(self, "cron", normalize_cron(self.cron))
        object.__setattr__(self, "params", {str(k): str(v) for k, v in dict(self.params).items()})
        if self.max_concurrency < 1:
            raise ScheduleError(f"schedule {self.name!r}: max_concurrency must be at least 1")
        if self.window_days is not None and self.window_days <= 0:
            raise ScheduleError(f"schedule {self.name!r}: window_days must be positive")
        if self.pipeline not in ("train", "score"):
            raise ScheduleError(f"schedule {self.name!r}: pipeline {self.pipeline!r} is not train or score")
        if self.pipeline == "score" and self.window_days is not None:
            raise ScheduleError(f"schedule {self.name!r}: --window-days applies to training; a scoring schedule "
                                "scores score.input (set it with -p score.input=URI)")

    @property
    def trigger(self) -> str:
        return f"schedule:{self.name}"

    def settings_for(self, base: Settings) -> Settings:
        """The settings a run of this schedule uses: ``base`` with the schedule's overrides."""
        if not self.params:
            return base
        raw = apply_overrides(base.model_dump(mode="json"), self.params)
        try:
            return Settings.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"schedule {self.name!r}: invalid --param override ({problems})") from exc

    def window(self, slot: datetime, data_end: datetime | None = None) -> tuple[str | None, str | None]:
        """The data window of the run for ``slot``: the last ``window_days`` before it, or none.

        ``data_end`` (exclusive: just after the source's newest event time) moves the window back into the
        data's own time when the data ends before the slot — a table whose times are historical, or a feed
        that lags — so the run trains on the last days *of the data*, never on an empty window."""
        if self.window_days is None:
            return None, None
        end = utc(slot) if data_end is None else min(utc(slot), utc(data_end))
        return _iso(end - timedelta(days=self.window_days)), _iso(end)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schedule":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class ScheduleStatus:
    """One schedule as ``list`` shows it, on either home."""

    schedule: Schedule
    state: str  # active | paused | deleting | disabled
    home: str  # local | kubeflow
    next_run: datetime | None = None
    ident: str | None = None  # KFP recurring run id
    note: str = ""


@dataclass(frozen=True)
class SlotRecord:
    schedule: str
    slot: datetime
    state: str  # claimed | running | done | failed | skipped
    owner: str
    run_id: str | None
    error: str | None


# --- embedded default -------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    since TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    schedule TEXT NOT NULL,
    slot TEXT NOT NULL,
    state TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    run_id TEXT,
    error TEXT,
    updated_at TEXT NOT NULL,
    UNIQUE (schedule, slot)
);
"""


class LocalSchedules:
    """Schedules and slot states in a SQLite file; every change is one transaction.

    A slot is claimed by inserting ``(schedule, slot)`` under a unique constraint inside
    an immediate transaction that also counts the schedule's active slots, so two
    scheduler processes never run the same slot and ``max_concurrency`` holds across them.
    """

    home = "local"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, timeout=30)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise ScheduleError(f"cannot open the schedule store {self.path}: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> "LocalSchedules":
        return cls(settings.schedule.store or settings.workspace_dir / "schedules.db")

    @contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise ScheduleError(f"cannot open the schedule store {self.path}: {exc}") from exc
        try:
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # schedules ---------------------------------------------------------------------
    def create(self, schedule: Schedule, now: datetime | None = None) -> Schedule:
        stamp = _iso(utc(now))
        try:
            with self._tx(immediate=True) as db:
                db.execute("INSERT INTO schedules (name, spec, since, created_at, updated_at) VALUES (?,?,?,?,?)",
                           (schedule.name, json.dumps(schedule.to_dict()), stamp, stamp, stamp))
        except sqlite3.IntegrityError as exc:
            raise ScheduleError(f"a schedule named {schedule.name!r} already exists (use `schedule update`)") from exc
        log.info("schedule %s created: %s", schedule.name, schedule.cron)
        return schedule

    def get(self, name: str) -> tuple[Schedule, datetime]:
        """The schedule and the time its slots count from (creation, or the last cron change / resume)."""
        with self._tx() as db:
            row = db.execute("SELECT spec, since FROM schedules WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ScheduleError(f"no schedule named {name!r}")
        return Schedule.from_dict(json.loads(row[0])), datetime.fromisoformat(row[1])

    def schedules(self) -> list[tuple[Schedule, datetime]]:
        with self._tx() as db:
            rows = db.execute("SELECT spec, since FROM schedules ORDER BY name").fetchall()
        return [(Schedule.from_dict(json.loads(spec)), datetime.fromisoformat(since)) for spec, since in rows]

    def update(self, name: str, now: datetime | None = None, **changes: Any) -> Schedule:
        """Change a schedule in place; slots already claimed or running are not touched."""
        now = utc(now)
        with self._tx(immediate=True) as db:
            row = db.execute("SELECT spec, since FROM schedules WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ScheduleError(f"no schedule named {name!r}")
            old = Schedule.from_dict(json.loads(row[0]))
            new = dataclasses.replace(old, **changes)
            # A new cron, or a resume, counts slots from now: nothing before it is "missed".
            restart = new.cron != old.cron or (old.paused and not new.paused)
            since = _iso(now) if restart else row[1]
            db.execute("UPDATE schedules SET spec = ?, since = ?, updated_at = ? WHERE name = ?",
                       (json.dumps(new.to_dict()), since, _iso(now), name))
        log.info("schedule %s updated", name)
        return new

    def delete(self, name: str) -> None:
        """Remove a schedule; a slot of it that is running finishes and is recorded."""
        with self._tx(immediate=True) as db:
            if db.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount == 0:
                raise ScheduleError(f"no schedule named {name!r}")
        log.info("schedule %s deleted", name)

    def list(self, now: datetime | None = None) -> list[ScheduleStatus]:
        now = utc(now)
        out = []
        for schedule, _since in self.schedules():
            last = self.slots(schedule.name, limit=1)
            note = f"last slot {_iso(last[0].slot)} {last[0].state}" if last else "no slot yet"
            out.append(ScheduleStatus(schedule, "paused" if schedule.paused else "active", self.home,
                                      None if schedule.paused else next_slot(schedule.cron, now), note=note))
        return out

    # slots -----------------------------------------------------------------------------
    def last_slot(self, name: str) -> datetime | None:
        with self._tx() as db:
            row = db.execute("SELECT MAX(slot) FROM slots WHERE schedule = ?", (name,)).fetchone()
        return datetime.fromisoformat(row[0]) if row and row[0] else None

    def claim(self, name: str, slot: datetime, owner: str, max_concurrency: int,
              skipped: tuple[datetime, ...] = (), now: datetime | None = None) -> bool:
        """Atomically take ``slot`` for ``owner`` (and record ``skipped`` slots); False if taken or full."""
        stamp = _iso(utc(now))
        with self._tx(immediate=True) as db:
            active = db.execute(f"SELECT COUNT(*) FROM slots WHERE schedule = ? AND state IN {SLOT_ACTIVE}",
                                (name,)).fetchone()[0]
            if active >= max_concurrency:
                return False
            inserted = db.execute(
                "INSERT OR IGNORE INTO slots (schedule, slot, state, owner, updated_at) VALUES (?,?,?,?,?)",
                (name, _iso(slot), "claimed", owner, stamp)).rowcount
            if inserted:
                self._skip(db, name, skipped, stamp)
            return bool(inserted)

    def record_skipped(self, name: str, slots: tuple[datetime, ...], now: datetime | None = None) -> None:
        with self._tx(immediate=True) as db:
            self._skip(db, name, slots, _iso(utc(now)))

    @staticmethod
    def _skip(db: sqlite3.Connection, name: str, slots: tuple[datetime, ...], stamp: str) -> None:
        db.executemany("INSERT OR IGNORE INTO slots (schedule, slot, state, error, updated_at) VALUES (?,?,?,?,?)",
                       [(name, _iso(s), "skipped", "missed", stamp) for s in slots])

    def set_slot(self, name: str, slot: datetime, state: str, *, run_id: str | None = None,
                 error: str | None = None, now: datetime | None = None) -> None:
        with self._tx(immediate=True) as db:
            db.execute("UPDATE slots SET state = ?, run_id = COALESCE(?, run_id), error = ?, updated_at = ? "
                       "WHERE schedule = ? AND slot = ?", (state, run_id, error, _iso(utc(now)), name, _iso(slot)))

    def slots(self, name: str, limit: int | None = None) -> list[SlotRecord]:
        """The schedule's slots, newest first."""
        sql = "SELECT schedule, slot, state, owner, run_id, error FROM slots WHERE schedule = ? ORDER BY slot DESC"
        with self._tx() as db:
            rows = db.execute(sql + (f" LIMIT {int(limit)}" if limit else ""), (name,)).fetchall()
        return [SlotRecord(r[0], datetime.fromisoformat(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    def active_slots(self) -> list[SlotRecord]:
        with self._tx() as db:
            rows = db.execute("SELECT schedule, slot, state, owner, run_id, error FROM slots "
                              f"WHERE state IN {SLOT_ACTIVE}").fetchall()
        return [SlotRecord(r[0], datetime.fromisoformat(r[1]), r[2], r[3], r[4], r[5]) for r in rows]


# --- Kubernetes: KFP recurring runs ------------------------------------------------------

_DESC_KEY = "driftloop.schedule"
# Run states after which a run no longer needs its recurring run.
_TERMINAL = {"SUCCEEDED", "SKIPPED", "FAILED", "CANCELED"}


@dataclass
class _Job:
    """One KFP recurring run that carries a generation of a driftloop schedule."""

    id: str
    name: str
    generation: int
    schedule: Schedule
    enabled: bool
    deleted: bool
    experiment_id: str | None
    pipeline_id: str | None
    version_id: str | None


def _filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": 1, "key": key, "stringValue": value}]})


class KfpSchedules:
    """Schedules as KFP recurring runs, updated by generations so runs in flight survive."""

    home = "kubeflow"

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        from pipelines.runner import KfpRunner

        self.settings = settings
        self.runner = KfpRunner(settings, client=client)

    @property
    def host(self) -> str:
        return str(self.settings.kfp.host)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.runner._call(what, fn, *args, **kwargs)

    # reading ------------------------------------------------------------------------------
    def _jobs(self) -> dict[str, list[_Job]]:
        """driftloop's recurring runs in the experiment, by schedule name, oldest generation first."""
        experiment_id = self.runner.experiment_id(create=False)
        if experiment_id is None:
            return {}
        client, token, jobs = self.runner.client, "", []
        while True:
            page = self._call("listing recurring runs", client.list_recurring_runs, page_token=token, page_size=100,
                              experiment_id=experiment_id)
            for rr in page.recurring_runs or []:
                job = _parse_job(rr)
                if job is not None:
                    jobs.append(job)
            token = page.next_page_token or ""
            if not token:
                break
        grouped: dict[str, list[_Job]] = {}
        for job in sorted(jobs, key=lambda j: j.generation):
            grouped.setdefault(job.schedule.name, []).append(job)
        return grouped

    def _active_runs(self, job: _Job) -> int:
        """Runs of ``job`` that have not finished (filtered by recurring run id, checked again here)."""
        client, token, count = self.runner.client, "", 0
        while True:
            page = self._call(f"listing the runs of recurring run {job.id}", client.list_runs, page_token=token,
                              page_size=100, experiment_id=job.experiment_id, filter=_filter("recurring_run_id", job.id))
            for run in page.runs or []:
                if run.recurring_run_id == job.id and str(run.state or "").upper() not in _TERMINAL:
                    count += 1
            token = page.next_page_token or ""
            if not token:
                return count

    def _reconcile(self, jobs: list[_Job]) -> list[tuple[_Job, int]]:
        """Disable generations that are no longer current; delete those with no run in flight.

        Returns the retired generations still waiting for their runs, with the number in flight.
        """
        current = jobs[-1]
        retiring = jobs if current.deleted else jobs[:-1]
        waiting = []
        client = self.runner.client
        for job in retiring:
            if job.enabled:
                self._call(f"disabling recurring run {job.name}", client.disable_recurring_run, job.id)
                job.enabled = False
            if job is current:  # the tombstone goes last, once nothing else is left
                continue
            active = self._active_runs(job)
            if active:
                waiting.append((job, active))
                continue
            self._call(f"deleting recurring run {job.name}", client.delete_recurring_run, job.id)
            log.info("deleted recurring run %s (generation %d of %s)", job.name, job.generation, job.schedule.name)
        if current.deleted and not waiting:
            self._call(f"deleting recurring run {current.name}", client.delete_recurring_run, current.id)
        return waiting

    def list(self, now: datetime | None = None) -> list[ScheduleStatus]:
        """Every schedule with its state; retired generations without runs in flight are deleted on the way."""
        now = utc(now)
        out = []
        for name, jobs in sorted(self._jobs().items()):
            waiting = self._reconcile(jobs)
            current = jobs[-1]
            note = f"{current.name} ({current.id})"
            if waiting:
                note += "; retiring " + ", ".join(f"{j.name} ({n} run{'s' if n != 1 else ''} in flight)" for j, n in waiting)
            if current.deleted:
                if not waiting:
                    continue
                state = "deleting"
            elif current.enabled:
                state = "active"
            else:
                state = "paused" if current.schedule.paused else "disabled"
            out.append(ScheduleStatus(current.schedule, state, self.home,
                                      next_slot(current.schedule.cron, now) if state == "active" else None,
                                      ident=current.id, note=note))
        return out

    # writing ------------------------------------------------------------------------------
    def _submit(self, schedule: Schedule, generation: int, *, deleted: bool = False,
                version: tuple[str, str] | None = None) -> str:
        from pipelines.training import pipeline_arguments, training_pipeline_for

        if schedule.window_days is not None:
            raise ScheduleError(
                f"schedule {schedule.name!r}: --window-days needs the local scheduler; on Kubeflow a recurring run "
                "passes the same parameters to every run (point data.source at a rolling export instead)"
            )
        settings = schedule.settings_for(self.settings)
        if schedule.pipeline == "score":
            from pipelines.scoring import ScoreRequest, score_arguments, upload_scoring

            # Empty request id and start time: each run's drift step uses its KFP run id and its own clock.
            params = score_arguments(settings, ScoreRequest(trigger=schedule.trigger, request_id="", started=""))
            pipeline_id, version_id = version or upload_scoring(settings, self.runner.client)[1:]
        else:
            params = pipeline_arguments(settings, trigger=schedule.trigger, request_id="")
            # An empty request id makes the register step use the KFP run id, one per run.
            params["request_id"] = ""
            pipeline_id, version_id = version or self.runner.upload(training_pipeline_for(self.settings))
        experiment_id = self.runner.experiment_id()
        job_name = f"{schedule.name}-v{generation}"
        description = json.dumps({_DESC_KEY: {**schedule.to_dict(), "generation": generation, "deleted": deleted}},
                                 sort_keys=True)
        created = self._call(
            f"creating recurring run {job_name}", self.runner.client.create_recurring_run,
            experiment_id=experiment_id, job_name=job_name, description=description,
            cron_expression=kfp_cron(schedule.cron), max_concurrency=schedule.max_concurrency,
            no_catchup=not schedule.catchup, params=params, pipeline_id=pipeline_id, version_id=version_id,
            enabled=not (schedule.paused or deleted), service_account=self.settings.kfp.service_account or None,
        )
        log.info("created recurring run %s (%s)", job_name, created.recurring_run_id)
        return str(created.recurring_run_id)

    def create(self, schedule: Schedule, now: datetime | None = None) -> Schedule:
        jobs = self._jobs().get(schedule.name, [])
        if jobs and not jobs[-1].deleted:
            raise ScheduleError(f"a schedule named {schedule.name!r} already exists on {self.host} "
                                f"(recurring run {jobs[-1].name}); use `schedule update`")
        self._submit(schedule, jobs[-1].generation + 1 if jobs else 1)
        return schedule

    def _current(self, name: str) -> list[_Job]:
        jobs = self._jobs().get(name, [])
        if not jobs or jobs[-1].deleted:
            raise ScheduleError(f"no schedule named {name!r} on {self.host}")
        return jobs

    def update(self, name: str, now: datetime | None = None, **changes: Any) -> Schedule:
        """New generation first, then the old one disabled; it is deleted once its runs finish."""
        jobs = self._current(name)
        new = dataclasses.replace(jobs[-1].schedule, **changes)
        new_id = self._submit(new, jobs[-1].generation + 1)
        jobs.append(_Job(new_id, f"{name}-v{jobs[-1].generation + 1}", jobs[-1].generation + 1, new,
                         not new.paused, False, None, None, None))
        self._reconcile(jobs)
        return new

    def delete(self, name: str) -> None:
        """Stop the schedule now; generations with runs in flight are deleted when those finish."""
        jobs = self._current(name)
        current = jobs[-1]
        for job in jobs:
            if job.enabled:
                self._call(f"disabling recurring run {job.name}", self.runner.client.disable_recurring_run, job.id)
                job.enabled = False
        if not any(self._active_runs(job) for job in jobs):
            for job in jobs:
                self._call(f"deleting recurring run {job.name}", self.runner.client.delete_recurring_run, job.id)
            return
        # Runs are in flight: leave a disabled tombstone generation so every machine sees "deleting".
        version = (current.pipeline_id, current.version_id) if current.pipeline_id and current.version_id else None
        self._submit(current.schedule, current.generation + 1, deleted=True, version=version)


def _state(value: Any) -> str:
    return str(getattr(value, "value", value) or "").upper()


def _parse_job(rr: Any) -> _Job | None:
    try:
        data = json.loads(rr.description or "")[_DESC_KEY]
        schedule = Schedule.from_dict(data)
        generation = int(data["generation"])
    except (ValueError, TypeError, KeyError, ScheduleError):
        return None  # not one of ours
    status, mode = _state(rr.status), _state(rr.mode)
    enabled = status == "ENABLED" if status not in ("", "STATUS_UNSPECIFIED") else mode == "ENABLE"
    ref = rr.pipeline_version_reference
    return _Job(str(rr.recurring_run_id), str(rr.display_name), generation, schedule, enabled, bool(data.get("deleted")),
                rr.experiment_id, getattr(ref, "pipeline_id", None), getattr(ref, "pipeline_version_id", None))


def schedule_backend(settings: Settings, client: Any | None = None) -> LocalSchedules | KfpSchedules:
    """KFP recurring runs when ``kfp.host`` is set, else the local store."""
    return KfpSchedules(settings, client=client) if settings.is_cluster else LocalSchedules.from_settings(settings)
