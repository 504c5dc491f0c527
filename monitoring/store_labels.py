"""The inference store's labels: ground truth posted as feedback, stored for the quality checks.

One label per (request id, row index), all or nothing per call; a label may come before its
prediction is logged (it joins once the prediction is there). This is where labels are written;
:mod:`monitoring.labels` reads them back joined with the predictions (see :mod:`monitoring` for
how the labelled-quality parts fit together). :class:`LabelWriter` is mixed into
:class:`monitoring.store.InferenceStore`, which owns the connection, the lock and ``_write``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from monitoring.events import EventError
from monitoring.store_write import Pending

__all__ = ["LabelResult", "LabelWriter"]

_dumps = orjson.dumps


@dataclass(frozen=True)
class LabelResult:
    """What one feedback call did: labels newly stored, ids the store has not seen, repeats."""

    stored: int
    unknown_ids: list[str]
    duplicates: int = 0  # the same label again for a (request id, row) that has it: nothing changed


class LabelWriter:
    """Mixin of :class:`~monitoring.store.InferenceStore`: storing ground-truth labels."""

    _lock: threading.Lock
    _pending: OrderedDict[str, Pending]
    _write: Callable[[Callable[[sqlite3.Connection], Any]], Any]

    def add_labels(self, labels: Sequence[dict[str, Any]]) -> LabelResult:
        """Store ground-truth labels ``[{"id", "label", "row_index"=0, "ts"=now}]`` in one transaction.

        Labels for ids the store has never seen are stored too (the events may still be in flight)
        and reported in ``unknown_ids``. One label per (request id, row): the same label again is a
        duplicate (counted, nothing changes), a different one is refused (409) and the first stays;
        a row beyond a stored request's rows is refused (422). All or nothing.
        """
        now = time.time()
        params: dict[tuple[str, int], tuple] = {}
        for item in labels:
            if not isinstance(item, dict) or "id" not in item or "label" not in item:
                raise EventError(422, "each feedback item needs 'id' and 'label'", reason="bad_feedback")
            row_index = item.get("row_index", 0)
            if row_index.__class__ is bool or not isinstance(row_index, int) or row_index < 0:
                raise EventError(422, f"feedback for {item['id']!r}: row_index must be a non-negative integer",
                                 reason="bad_feedback")
            ts = item.get("ts", now)
            if isinstance(ts, bool) or not isinstance(ts, (int, float)):
                raise EventError(422, f"feedback for {item['id']!r}: ts must be epoch seconds", reason="bad_feedback")
            key = (str(item["id"]), row_index)
            label = _dumps(item["label"])
            if key in params and params[key][2] != label:
                raise EventError(409, f"feedback for {key[0]!r} row {row_index} gives two different labels",
                                 reason="label_conflict")
            params[key] = (*key, label, float(ts))
        ids = sorted({k[0] for k in params})
        known: set[str] = set()
        fresh: list[tuple] = []

        def work(db: sqlite3.Connection) -> None:
            conflicts = []
            for key, param in params.items():
                row = db.execute("SELECT label FROM labels WHERE request_id = ? AND row_index = ?", key).fetchone()
                if row is None:
                    self._check_row_index(db, *key)
                    fresh.append(param)
                elif bytes(row[0] if isinstance(row[0], bytes) else row[0].encode()) != param[2]:
                    conflicts.append(f"{key[0]!r} row {key[1]}")
            if conflicts:  # one label per prediction: the first one stays
                raise EventError(409, f"already labelled with a different label: {', '.join(conflicts[:5])}"
                                      + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
                                      + "; nothing of this feedback was stored", reason="label_conflict")
            db.executemany("INSERT INTO labels (request_id, row_index, label, ts) VALUES (?,?,?,?)", fresh)
            for chunk in range(0, len(ids), 500):
                part = ids[chunk:chunk + 500]
                marks = ",".join("?" * len(part))
                known.update(r[0] for r in db.execute(
                    f"SELECT DISTINCT ce_id FROM events WHERE ce_id IN ({marks})", part))

        with self._lock:
            self._write(work)
        return LabelResult(stored=len(fresh), unknown_ids=[i for i in ids if i not in known],
                           duplicates=len(params) - len(fresh))

    def _check_row_index(self, db: sqlite3.Connection, request_id: str, row_index: int) -> None:
        """Refuse (422) a label for a row the stored request does not have; a request not stored yet
        keeps its labels waiting (they join by (request id, row) once it is)."""
        n = db.execute("SELECT COUNT(*) FROM rows WHERE request_id = ?", (request_id,)).fetchone()[0]
        if not n:
            pending = self._pending.get(request_id)
            if pending is not None and pending.kind == "request":
                n = len(pending.items)
            else:
                row = db.execute("SELECT flat FROM events WHERE ce_id = ? AND kind = 'request'",
                                 (request_id,)).fetchone()
                n = len(orjson.loads(row[0])) if row is not None and row[0] else 0
        if n and row_index >= n:
            raise EventError(422, f"feedback for {request_id!r}: row_index {row_index} is beyond the request's "
                                  f"{n} rows (0..{n - 1})", reason="bad_feedback")
