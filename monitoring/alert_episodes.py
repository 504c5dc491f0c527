"""Episodes of the monitor's own checks: the stretches of failing verdicts one alert stands for.

An **episode** of a model's drift (or quality) opens at the first complete window whose verdict
fails and closes once ``resolve_after`` complete windows in a row have passed
(``monitor.resolve_windows``, ``monitor.quality.resolve_windows``), or when another version is the
champion (its windows are judged against its own reference and holdout). Each window counts once:
the episode keeps the id of the last window it counted, so a re-check of that window changes
nothing. :class:`EpisodeTables` is mixed into :class:`monitoring.alerts.AlertStore` (table
``episodes`` in the alert store); :mod:`monitoring.episodes` decides what a check does with an
episode's verdicts (one alert per episode).

Not to be confused with ``drift_episodes`` (the same store): those follow the drift gauge
Prometheus scrapes, open and close with each verdict and end at a monitor restart, so that
Alertmanager's alert for the monitor's own drift is known as its duplicate.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["EPISODE_SCHEMA", "Episode", "EpisodeStep", "EpisodeTables"]

EPISODE_SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (
    seq INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    version TEXT NOT NULL,
    opened REAL NOT NULL,
    last_failed REAL NOT NULL,
    closed REAL,
    close_reason TEXT,
    alert_id TEXT,
    failing INTEGER NOT NULL DEFAULT 1,
    passing INTEGER NOT NULL DEFAULT 0,
    last_window TEXT
);
CREATE INDEX IF NOT EXISTS episodes_open ON episodes (model, kind, closed);
"""


@dataclass(frozen=True)
class Episode:
    """One episode: ``failing`` windows counted, ``passing`` windows in a row since the last failing one."""

    seq: int
    model: str
    kind: str  # drift | quality
    version: str  # the champion version whose windows failed
    opened: float
    last_failed: float
    closed: float | None
    close_reason: str | None
    alert_id: str | None  # the alert the episode's failing windows are counted on
    failing: int
    passing: int
    last_window: str | None

    @property
    def open(self) -> bool:
        return self.closed is None


@dataclass(frozen=True)
class EpisodeStep:
    """What one verdict did: the episode after it (None when none is open), whether the window was new
    (``counted``), and whether the verdict opened or closed the episode."""

    episode: Episode | None
    counted: bool = True
    opened: bool = False
    closed: bool = False


def _episode(row: sqlite3.Row | None) -> Episode | None:
    return None if row is None else Episode(**{k: row[k] for k in row.keys()})


class EpisodeTables:
    """Mixin of :class:`~monitoring.alerts.AlertStore`: the ``episodes`` table."""

    _lock: threading.RLock
    _db: sqlite3.Connection
    _tx: Callable[..., sqlite3.Cursor]

    def open_episode(self, model: str, kind: str) -> Episode | None:
        """``model``'s open episode of ``kind``, if any."""
        return _episode(self._tx("SELECT * FROM episodes WHERE model = ? AND kind = ? AND closed IS NULL "
                                 "ORDER BY seq DESC LIMIT 1", (model, kind)).fetchone())

    def open_episodes(self, model: str) -> list[Episode]:
        """Every open episode of ``model`` (drift and quality), oldest first."""
        rows = self._tx("SELECT * FROM episodes WHERE model = ? AND closed IS NULL ORDER BY seq", (model,)).fetchall()
        return [e for e in map(_episode, rows) if e is not None]

    def episode(self, seq: int) -> Episode | None:
        return _episode(self._tx("SELECT * FROM episodes WHERE seq = ?", (seq,)).fetchone())

    def record_verdict(self, model: str, kind: str, version: str, *, failed: bool, window: str, now: float,
                       resolve_after: int) -> EpisodeStep:
        """One complete window's verdict: opens, extends, counts towards closing, or closes the episode."""
        with self._lock:
            ep = self.open_episode(model, kind)
            if ep is not None and ep.version != str(version):
                self._close(ep.seq, now, f"v{version} is the champion now")
                ep = None
            if ep is not None and ep.last_window == window:
                return EpisodeStep(ep, counted=False)
            if failed and ep is None:
                cur = self._db.execute("INSERT INTO episodes (model, kind, version, opened, last_failed, last_window) "
                                       "VALUES (?, ?, ?, ?, ?, ?)", (model, kind, str(version), now, now, window))
                return EpisodeStep(self.episode(int(cur.lastrowid)), opened=True)
            if ep is None:
                return EpisodeStep(None)
            if failed:
                self._db.execute("UPDATE episodes SET failing = failing + 1, passing = 0, last_failed = ?, "
                                 "last_window = ? WHERE seq = ?", (now, window, ep.seq))
                return EpisodeStep(self.episode(ep.seq))
            if ep.passing + 1 >= resolve_after:
                self._db.execute("UPDATE episodes SET passing = passing + 1, last_window = ? WHERE seq = ?",
                                 (window, ep.seq))
                self._close(ep.seq, now, f"{ep.passing + 1} complete window(s) in a row passed")
                return EpisodeStep(self.episode(ep.seq), closed=True)
            self._db.execute("UPDATE episodes SET passing = passing + 1, last_window = ? WHERE seq = ?",
                             (window, ep.seq))
            return EpisodeStep(self.episode(ep.seq))

    def close_superseded(self, model: str, champion_version: str, *, now: float) -> list[Episode]:
        """Close ``model``'s open episodes of versions other than the champion's; returns them."""
        with self._lock:
            stale = [e for e in self.open_episodes(model) if e.version != str(champion_version)]
            for e in stale:
                self._close(e.seq, now, f"v{champion_version} is the champion now")
            return stale

    def bind_alert(self, seq: int, alert_id: str) -> None:
        """The alert the episode's failing windows are counted on from now on."""
        self._tx("UPDATE episodes SET alert_id = ? WHERE seq = ?", (alert_id, seq))

    def _close(self, seq: int, now: float, reason: str) -> None:
        self._db.execute("UPDATE episodes SET closed = ?, close_reason = ? WHERE seq = ? AND closed IS NULL",
                         (now, reason, seq))

    def episode_of_alert(self, alert_id: str) -> Episode | None:
        """The episode whose alert ``alert_id`` is (or was)."""
        return _episode(self._tx("SELECT * FROM episodes WHERE alert_id = ? ORDER BY seq DESC LIMIT 1",
                                 (alert_id,)).fetchone())

    def episodes_of(self, seqs: list[int]) -> list[Episode]:
        if not seqs:
            return []
        marks = ",".join("?" * len(seqs))
        rows = self._tx(f"SELECT * FROM episodes WHERE seq IN ({marks}) ORDER BY seq", tuple(seqs)).fetchall()
        return [e for e in map(_episode, rows) if e is not None]


def episode_dict(ep: Episode) -> dict[str, Any]:
    """An episode as it is shown in an alert's details and ``GET /alerts``."""
    return {"seq": ep.seq, "kind": ep.kind, "version": ep.version, "opened": ep.opened, "closed": ep.closed,
            "failing_windows": ep.failing, "close_reason": ep.close_reason}
