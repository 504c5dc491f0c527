"""The inference store's monitoring windows: which paired rows the drift check judges next.

A :class:`Window` is a slice of the paired rows plus where it sits in the log (first and last
``seq``, its time bounds, whether it is complete); :meth:`WindowQueries.window` picks the current
tumbling or sliding window by row count and/or time. :class:`WindowQueries` is mixed into
:class:`monitoring.store.InferenceStore` next to :class:`~monitoring.store_query.StoreQueries`,
whose ``rows``/``count``/``_frame`` it builds on.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from monitoring.store_query import to_frame

__all__ = ["Window", "WindowQueries"]


@dataclass(frozen=True)
class Window:
    """The rows of one monitoring window and where it sits in the log."""

    rows: pd.DataFrame
    kind: str
    start_seq: int
    end_seq: int
    start_ts: float | None
    end_ts: float | None
    complete: bool

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def id(self) -> str:
        """Stable id of the window (the same tumbling window always gets the same id)."""
        return f"{self.kind}:{self.start_seq}-{self.end_seq}"

    @property
    def requests(self) -> int:
        """Distinct inference requests the window's rows came from."""
        return int(self.rows["request_id"].nunique()) if len(self.rows) else 0

    def capped(self, max_rows_per_request: int) -> "Window":
        """The window with at most ``max_rows_per_request`` rows of each request (its first ones):
        one large request cannot fill a window on its own. Same id and bounds."""
        if not len(self.rows) or self.rows["request_id"].value_counts().iloc[0] <= max_rows_per_request:
            return self
        return self._with(self.rows[self.rows["row_index"] < max_rows_per_request].reset_index(drop=True))

    def without_role(self, role: str) -> "Window":
        """The window without the rows of ``role`` (a shadow's answers to mirrored copies). Same id and bounds."""
        if not len(self.rows) or not (self.rows["role"] == role).any():
            return self
        return self._with(self.rows[self.rows["role"] != role].reset_index(drop=True))

    def _with(self, rows: pd.DataFrame) -> "Window":
        return Window(rows, self.kind, self.start_seq, self.end_seq, self.start_ts, self.end_ts, self.complete)


class WindowQueries:
    """Mixin of :class:`~monitoring.store.InferenceStore`: the current monitoring window."""

    _reader: Callable[[], sqlite3.Connection]
    rows: Callable[..., pd.DataFrame]
    count: Callable[..., int]
    _frame: Callable[..., pd.DataFrame]

    def window(self, kind: Literal["tumbling", "sliding"] = "tumbling", rows: int | None = None,
               seconds: float | None = None, *, now: float | None = None, model_name: str | None = None) -> Window:
        """The current monitoring window.

        * sliding: the last ``rows`` rows, restricted to the last ``seconds`` when given.
        * tumbling by count (no ``seconds``): the latest COMPLETE block of ``rows`` rows in arrival
          order (blocks ``[k*rows, (k+1)*rows)``), or the partial first block while none is complete.
        * tumbling by time: the latest complete interval ``[k*seconds, (k+1)*seconds)`` (epoch
          aligned) — or the running one while none is complete — capped to its last ``rows`` rows.

        ``Window.id`` is stable for a tumbling window, so a check can skip windows it has seen.
        The minimum sample size before a verdict is the caller's decision (``Window.n``).
        """
        if rows is None and seconds is None:
            raise ValueError("a window needs rows and/or seconds")
        now = time.time() if now is None else now
        mfilter, mparams = ("AND model_name = ?", [model_name]) if model_name else ("", [])
        if kind == "sliding":
            since = now - seconds if seconds is not None else None
            df = self.rows(since=since, limit=rows, model_name=model_name)
            return self._window(df, kind, complete=True)
        if kind != "tumbling":
            raise ValueError(f"unknown window kind {kind!r} (tumbling or sliding)")
        if seconds is None:
            total = self.count(model_name=model_name)
            k = total // rows
            start = (k - 1) * rows if k else 0
            df = self._frame(f"WHERE 1 = 1 {mfilter}", mparams, limit=rows) if k == 0 else \
                self._nth_block(start, rows, mfilter, mparams)
            return self._window(df, kind, complete=k > 0)
        current = math.floor(now / seconds) * seconds
        earliest = self._first_ts(model_name)
        complete = earliest is not None and earliest < current
        start = current - seconds if complete else current
        df = self.rows(since=start, until=start + seconds, limit=rows, model_name=model_name)
        win = self._window(df, kind, complete=complete)
        return Window(win.rows, kind, win.start_seq, win.end_seq, start, start + seconds, complete)

    def _nth_block(self, offset: int, n: int, mfilter: str, mparams: list) -> pd.DataFrame:
        sql = ("SELECT seq, request_id, row_index, ts, model_name, model_version, role, features, prediction "
               f"FROM rows WHERE 1 = 1 {mfilter} ORDER BY seq LIMIT ? OFFSET ?")
        db = self._reader()
        try:
            data = db.execute(sql, [*mparams, n, offset]).fetchall()
        finally:
            db.close()
        return to_frame(data)

    def _first_ts(self, model_name: str | None) -> float | None:
        db = self._reader()
        try:
            if model_name:
                r = db.execute("SELECT MIN(ts) FROM rows WHERE model_name = ?", (model_name,)).fetchone()
            else:
                r = db.execute("SELECT MIN(ts) FROM rows").fetchone()
            return r[0]
        finally:
            db.close()

    @staticmethod
    def _window(df: pd.DataFrame, kind: str, *, complete: bool) -> Window:
        if df.empty:
            return Window(df, kind, 0, 0, None, None, complete)
        ts = df["ts"]
        return Window(df, kind, int(df["seq"].iloc[0]), int(df["seq"].iloc[-1]) + 1,
                      ts.iloc[0].timestamp(), ts.iloc[-1].timestamp(), complete)
