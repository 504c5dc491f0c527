"""Alerts and the retraining guardrails, recorded durably in SQLite in the workspace.

An alert comes from the monitor's own drift check or from a Prometheus Alertmanager webhook.
Its id is deterministic — drift: champion version + window bounds; Alertmanager: fingerprint +
``startsAt`` — so the same drift re-detected, or the same webhook re-delivered, maps to the same
row and starts at most one run.

The store also keeps the monitor's drift episodes (table ``drift_episodes``: when its check's
verdict turned to drift and when it turned back), so the trigger can tell that an Alertmanager
alert reports a drift the monitor already raised (``duplicate_of`` on the alert; see
``monitoring.trigger``), and the episodes of its own checks (table ``episodes``,
:mod:`monitoring.alert_episodes`): one alert per stretch of failing windows.

:func:`decide` applies the guardrails in a fixed order (first failing one is the reason):
duplicate (the same id again, or the duplicate of another alert) → trigger disabled → minimum
samples → blackout window → a run in flight (the monitor's own alerts are **attached** to that run
and re-checked when its rollout ends; others are held) → cooldown since the last started run
whose rollout was not rolled back → daily budget (runs started in the last 24 hours). In a fleet an
alert that passes them may still be **queued** (:data:`QUEUED`) behind the fleet's limits or held by
its daily pool (``monitoring.fleet_runs``). Every decision, duplicates included, is appended to the
``decisions`` table with its reason.

After its run, a started alert records the run's **outcome** (``promoted``, ``rolled_back``,
``not_registered``, ``no_rollout``, ``failed``; :mod:`monitoring.outcomes`); a ``needs-attention``
alert (source ``needs-attention``) says that a retrain did not replace a degraded champion.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driftloop.core.errors import MonitorError
from driftloop.core.statistics import in_blackout
from monitoring.alert_episodes import EPISODE_SCHEMA, EpisodeTables

if TYPE_CHECKING:
    from driftloop.core.config import Settings, TriggerConfig

__all__ = [
    "ATTACHED",
    "ATTENTION",
    "COOLDOWN_WAIVED",
    "OWN_SOURCES",
    "QUEUED",
    "STARTED",
    "Alert",
    "AlertStore",
    "Decision",
    "alertmanager_alerts",
    "alerts_path",
    "decide",
    "drift_alert_id",
    "in_blackout",
    "lookup_alert",
]

log = logging.getLogger(__name__)

STARTED = "started"
ATTACHED = "attached"  # waits for the run in flight; re-checked when that run's rollout ends
QUEUED = "queued"  # passed the guardrails; waits for a free slot of its fleet (monitoring.fleet_runs)
ATTENTION = "needs-attention"  # source of the alert that a retrain left a degraded champion in place
#: Sources of the monitor's own checks: attached to a run in flight instead of held behind it.
OWN_SOURCES = ("drift", "quality")
#: Outcomes of a run after which its start no longer holds the next one back (trigger.cooldown_seconds):
#: the canary was judged and rolled back, so the champion is still the degraded one.
COOLDOWN_WAIVED = ("rolled_back",)
_DAY = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    details TEXT NOT NULL,
    samples INTEGER,
    window_start TEXT,
    window_end TEXT,
    report_path TEXT,
    report_uri TEXT,
    decision TEXT,
    reason TEXT,
    request_id TEXT,
    pipeline_run_id TEXT,
    model_version TEXT,
    run_state TEXT,
    worker_pid INTEGER,
    started REAL,
    finished REAL,
    deliveries INTEGER NOT NULL DEFAULT 1,
    duplicate_of TEXT,
    episode INTEGER,
    attached_to TEXT,
    outcome TEXT,
    outcome_reason TEXT,
    followed REAL,
    resolved REAL
);
CREATE INDEX IF NOT EXISTS alerts_started ON alerts (started);
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY,
    alert_id TEXT NOT NULL,
    ts REAL NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_alert ON decisions (alert_id, ts);
CREATE TABLE IF NOT EXISTS drift_episodes (
    seq INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    opened REAL NOT NULL,
    last_seen REAL NOT NULL,
    closed REAL
);
CREATE INDEX IF NOT EXISTS drift_episodes_model ON drift_episodes (model, opened);
""" + EPISODE_SCHEMA

#: Columns added since the first release, with their types: a store written earlier gains them when opened.
_ADDED_COLUMNS = {"duplicate_of": "TEXT", "episode": "INTEGER", "attached_to": "TEXT", "outcome": "TEXT",
                  "outcome_reason": "TEXT", "followed": "REAL", "resolved": "REAL"}

#: An alert row with its episode's failing windows, opening and closing time.
_WITH_EPISODE = ("SELECT a.*, e.failing AS episode_windows, e.opened AS episode_opened, e.closed AS episode_closed "
                 "FROM alerts a LEFT JOIN episodes e ON e.seq = a.episode")

#: Decisions of the monitor's own drift alerts that did not go to the trigger (no drift raised).
_NOT_RAISED = ("report_only", "not_confirmed")


@dataclass
class Alert:
    """An alert to act on; ``window_*`` is the data window a retraining run would use."""

    id: str
    source: str  # drift | alertmanager
    created: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)
    samples: int | None = None
    window_start: str | None = None
    window_end: str | None = None
    report_path: str | None = None
    report_uri: str | None = None


@dataclass(frozen=True)
class Decision:
    alert_id: str
    decision: str  # started | attached | queued | duplicate | disabled | insufficient_samples | blackout | in_flight | cooldown | budget | failed
    reason: str
    request_id: str | None = None
    duplicate_of: str | None = None  # the alert this one duplicates (another alert's id)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def drift_alert_id(model: str, version: str, window_start: Any, window_end: Any) -> str:
    """Same champion + same window bounds → same id (re-detection is de-duplicated)."""
    return f"drift-{_digest(f'{model}:{version}:{window_start}:{window_end}')}"


def alertmanager_alerts(payload: Any, *, now: float | None = None) -> list[Alert]:
    """Firing alerts of an Alertmanager webhook payload; raises ``ValueError`` naming the problem."""
    if not isinstance(payload, dict):
        raise ValueError("the payload must be a JSON object (Alertmanager webhook format)")
    items = payload.get("alerts")
    if not isinstance(items, list) or not items:
        raise ValueError("the payload has no 'alerts' list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"alerts[{i}] is not an object")
        fingerprint, starts = item.get("fingerprint"), item.get("startsAt")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"alerts[{i}] has no 'fingerprint'")
        if not isinstance(starts, str) or not starts:
            raise ValueError(f"alerts[{i}] has no 'startsAt'")
        try:
            started = dt.datetime.fromisoformat(starts.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"alerts[{i}].startsAt {starts!r} is not an RFC 3339 time") from exc
        if item.get("status", payload.get("status", "firing")) != "firing":
            continue
        labels = item.get("labels") if isinstance(item.get("labels"), dict) else {}
        out.append(Alert(
            id=f"am-{_digest(f'{fingerprint}:{starts}')}",
            source="alertmanager",
            created=time.time() if now is None else now,
            details={"fingerprint": fingerprint, "startsAt": starts, "labels": labels,
                     "annotations": item.get("annotations") or {}, "receiver": payload.get("receiver")},
            window_end=(started if started.tzinfo else started.replace(tzinfo=dt.UTC))
            .astimezone(dt.UTC).isoformat(),
        ))
    return out


def decide(alert: Alert, config: TriggerConfig, *, now: float, seen: bool, in_flight: str | None,
           last_started: float | None, started_last_day: int, duplicate_of: str | None = None,
           why: str = "") -> tuple[str, str]:
    """The guardrails (``TriggerConfig``) as one pure function → (decision, reason).

    ``duplicate_of``: the alert this one duplicates (``why`` says how it was recognised); a
    duplicate starts nothing, whatever the other guardrails would say.
    """
    if seen:
        if duplicate_of:
            return "duplicate", f"duplicate of {duplicate_of}: alert {alert.id} was already received as its duplicate"
        return "duplicate", f"alert {alert.id} was already received; it starts at most one run"
    if duplicate_of:
        return "duplicate", f"duplicate of {duplicate_of}: {why}" if why else f"duplicate of {duplicate_of}"
    if not config.enabled:
        return "disabled", "trigger.enabled is false"
    if alert.samples is not None and alert.samples < config.min_samples:
        return "insufficient_samples", f"{alert.samples} rows < trigger.min_samples={config.min_samples}"
    blackout = in_blackout(list(config.blackout), now)
    if blackout:
        return "blackout", f"inside blackout window {blackout} UTC"
    if in_flight and alert.source in OWN_SOURCES:
        return ATTACHED, (f"attached to the retraining run of alert {in_flight}, still in flight (its run or its "
                          "canary's rollout); re-checked when that rollout ends")
    if in_flight:
        return "in_flight", f"retraining run for alert {in_flight} is still in flight"
    if last_started is not None and now - last_started < config.cooldown_seconds:
        left = config.cooldown_seconds - (now - last_started)
        return "cooldown", f"last run started {now - last_started:.0f}s ago; cooldown {config.cooldown_seconds:.0f}s ({left:.0f}s left)"
    if started_last_day >= config.daily_budget:
        return "budget", f"{started_last_day} runs started in the last 24h; trigger.daily_budget={config.daily_budget}"
    return STARTED, "guardrails passed"


def alerts_path(settings: Settings) -> Path:
    return settings.workspace_dir / "monitor" / "alerts.db"


class AlertStore(EpisodeTables):
    """The alerts, decisions and episodes tables (SQLite, WAL); safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns a store written by an earlier release lacks."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(alerts)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name in columns:
                continue
            try:
                self._db.execute(f"ALTER TABLE alerts ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as exc:  # another process added it first
                if "duplicate column" not in str(exc):
                    raise

    @classmethod
    def from_settings(cls, settings: Settings) -> AlertStore:
        return cls(alerts_path(settings))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def insert(self, alert: Alert) -> bool:
        """Record a new alert; False (and one more delivery counted) when the id is known."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO alerts (id, source, created, details, samples, window_start, window_end, "
                "report_path, report_uri) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (alert.id, alert.source, alert.created, json.dumps(alert.details, default=str), alert.samples,
                 alert.window_start, alert.window_end, alert.report_path, alert.report_uri))
            if cur.rowcount == 0:
                self._db.execute("UPDATE alerts SET deliveries = deliveries + 1 WHERE id = ?", (alert.id,))
                return False
            return True

    def record_decision(self, alert_id: str, decision: str, reason: str, *, now: float, final: bool = True) -> None:
        with self._lock:
            self._db.execute("INSERT INTO decisions (alert_id, ts, decision, reason) VALUES (?, ?, ?, ?)",
                             (alert_id, now, decision, reason))
            if final:
                self._db.execute("UPDATE alerts SET decision = ?, reason = ? WHERE id = ?", (decision, reason, alert_id))

    def update(self, alert_id: str, **fields: Any) -> None:
        if not fields:
            return
        allowed = {"report_path", "report_uri", "request_id", "pipeline_run_id", "model_version", "run_state",
                   "worker_pid", "started", "finished", "decision", "reason", "window_start", "window_end",
                   "duplicate_of", "episode", "attached_to", "outcome", "outcome_reason", "followed", "resolved",
                   "samples"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown alert fields {sorted(unknown)}")
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._tx(f"UPDATE alerts SET {cols} WHERE id = ?", (*fields.values(), alert_id))

    def set_details(self, alert_id: str, details: dict[str, Any]) -> None:
        self._tx("UPDATE alerts SET details = ? WHERE id = ?", (json.dumps(details, default=str), alert_id))

    def get(self, alert_id: str) -> dict[str, Any] | None:
        """One alert, with its episode's failing windows and state (``episode_*``) where it has one."""
        row = self._tx(f"{_WITH_EPISODE} WHERE a.id = ?", (alert_id,)).fetchone()
        return _row(row) if row else None

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest alerts, each with its episode's failing windows and state (``episode_*``) where it has one."""
        rows = self._tx(f"{_WITH_EPISODE} ORDER BY a.created DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]

    def decisions(self, alert_id: str | None = None) -> list[dict[str, Any]]:
        if alert_id is None:
            rows = self._tx("SELECT * FROM decisions ORDER BY seq").fetchall()
        else:
            rows = self._tx("SELECT * FROM decisions WHERE alert_id = ? ORDER BY seq", (alert_id,)).fetchall()
        return [dict(r) for r in rows]

    def running(self) -> list[dict[str, Any]]:
        """Alerts whose retraining run has not finished (as far as the store knows)."""
        rows = self._tx("SELECT * FROM alerts WHERE decision = ? AND finished IS NULL ORDER BY started",
                        (STARTED,)).fetchall()
        return [_row(r) for r in rows]

    def last_started(self) -> float | None:
        """When the last run started that the cooldown counts from: runs rolled back do not count
        (:data:`COOLDOWN_WAIVED`; the champion they left in place is still degraded)."""
        marks = ",".join("?" * len(COOLDOWN_WAIVED))
        return self._tx(f"SELECT MAX(started) FROM alerts WHERE decision = ? AND (outcome IS NULL OR outcome NOT IN "
                        f"({marks}))", (STARTED, *COOLDOWN_WAIVED)).fetchone()[0]

    def unfollowed(self, since: float) -> list[dict[str, Any]]:
        """Started alerts whose run finished since ``since`` and whose outcome has not been followed up yet."""
        rows = self._tx("SELECT * FROM alerts WHERE decision = ? AND finished IS NOT NULL AND finished >= ? "
                        "AND followed IS NULL ORDER BY finished", (STARTED, since)).fetchall()
        return [_row(r) for r in rows]

    def attached_to(self, alert_id: str) -> list[dict[str, Any]]:
        """Alerts attached to the run of ``alert_id`` and not judged again since, oldest first."""
        rows = self._tx("SELECT * FROM alerts WHERE attached_to = ? AND decision = ? ORDER BY created",
                        (alert_id, ATTACHED)).fetchall()
        return [_row(r) for r in rows]

    def unresolved(self, source: str) -> list[dict[str, Any]]:
        """Alerts of ``source`` not resolved yet (``needs-attention``), oldest first."""
        rows = self._tx("SELECT * FROM alerts WHERE source = ? AND resolved IS NULL ORDER BY created",
                        (source,)).fetchall()
        return [_row(r) for r in rows]

    def started_since(self, since: float) -> int:
        return int(self._tx("SELECT COUNT(*) FROM alerts WHERE decision = ? AND started >= ?",
                            (STARTED, since)).fetchone()[0])

    # -- drift episodes ------------------------------------------------------------------------
    def observe_drift(self, model: str, drift: bool, *, now: float, restarted_at: float | None = None) -> None:
        """One drift check's verdict for ``model``: opens, extends or closes its drift episode.

        ``restarted_at``: this monitor process started then (its drift gauge read 0 from then until
        this check), so an episode an earlier process left open ended at that time.
        """
        with self._lock:
            if restarted_at is not None:
                self._db.execute("UPDATE drift_episodes SET closed = MAX(last_seen, ?) "
                                 "WHERE model = ? AND closed IS NULL AND opened < ?",
                                 (restarted_at, model, restarted_at))
            row = self._db.execute("SELECT seq FROM drift_episodes WHERE model = ? AND closed IS NULL "
                                   "ORDER BY opened DESC LIMIT 1", (model,)).fetchone()
            if drift and row is None:
                self._db.execute("INSERT INTO drift_episodes (model, opened, last_seen) VALUES (?, ?, ?)",
                                 (model, now, now))
            elif drift:
                self._db.execute("UPDATE drift_episodes SET last_seen = ? WHERE seq = ?", (now, row["seq"]))
            elif row is not None:
                self._db.execute("UPDATE drift_episodes SET closed = ? WHERE model = ? AND closed IS NULL",
                                 (now, model))

    def drift_episodes(self, model: str, *, since: float, until: float) -> list[dict[str, Any]]:
        """``model``'s drift episodes that were open at some time in [since, until], oldest first."""
        rows = self._tx("SELECT * FROM drift_episodes WHERE model = ? AND opened <= ? "
                        "AND (closed IS NULL OR closed >= ?) ORDER BY opened", (model, until, since)).fetchall()
        return [dict(r) for r in rows]

    def raised_between(self, start: float, end: float) -> list[dict[str, Any]]:
        """The monitor's own drift alerts that went to the trigger (first raised or re-raised) in
        [start, end], with ``raised`` = the last such time; oldest first."""
        marks = ",".join("?" * len(_NOT_RAISED))
        rows = self._tx(
            "SELECT a.*, MAX(d.ts) AS raised FROM alerts a JOIN decisions d ON d.alert_id = a.id "
            f"WHERE a.source = 'drift' AND a.decision IS NOT NULL AND a.decision NOT IN ({marks}) "
            "AND d.ts >= ? AND d.ts <= ? GROUP BY a.id ORDER BY raised",
            (*_NOT_RAISED, start, end)).fetchall()
        return [_row(r) for r in rows]

    def alertmanager_by_fingerprint(self, fingerprint: str) -> list[dict[str, Any]]:
        """Alertmanager alerts received with this fingerprint (any ``startsAt``), oldest first."""
        rows = self._tx("SELECT * FROM alerts WHERE source = 'alertmanager' "
                        "AND json_extract(details, '$.fingerprint') = ? ORDER BY created", (fingerprint,)).fetchall()
        return [_row(r) for r in rows]


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    try:
        out["details"] = json.loads(out.get("details") or "{}")
    except ValueError:
        pass
    return out


def lookup_alert(settings: Settings, alert_id: str) -> dict[str, Any] | None:
    """One alert from the workspace's alert store (used by lineage and ``driftloop alerts``)."""
    path = alerts_path(settings)
    if not path.exists():
        return None
    store = AlertStore(path)
    try:
        return store.get(alert_id)
    except sqlite3.Error as exc:
        raise MonitorError(f"alert store {path} is not readable: {exc}") from exc
    finally:
        store.close()


def day_ago(now: float) -> float:
    return now - _DAY
