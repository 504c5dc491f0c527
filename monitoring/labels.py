"""Labelled (and scored) predictions read from the inference log, for the quality checks.

Labels arrive as feedback — posted to the monitor's ``/feedback`` by ``ce-id``, or to the local
gateway, which forwards them here — and live in the store's ``labels`` table keyed by
(request id, row index). They are joined with the paired rows by the same key, so a label that
came before its prediction was logged is joined as soon as the prediction is there.

Class scores are not a column of the paired rows (the drift checks do not need them): they sit
in the logged response body (V1 ``"scores"`` next to ``"predictions"``, V2 an output tensor named
``scores``) and are read from there, one body per request, only for the rows of a window.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

__all__ = ["label_problem", "labelled_count", "labelled_window", "score_matrix", "scored_window", "scores_of_body",
           "usable_labels", "versions_seen"]

log = logging.getLogger(__name__)
_SCALARS = (str, int, float, bool)
_said_unversioned: set[str] = set()  # stores whose unversioned predictions were reported once


def label_problem(label: Any, task: str, classes: list[Any] | None) -> str | None:
    """Why ``label`` cannot be ground truth for a ``task`` model with ``classes`` (None: it can).

    Regression: a finite number. Classification: one of ``classes`` of the same JSON type (``"1"``
    is not the class ``1``, ``2.5`` and ``true`` are not classes ``0``/``1``); without known classes
    a single value (no object, list or non-finite number).
    """
    if task == "regression":
        if label.__class__ is bool or not isinstance(label, (int, float)) or not math.isfinite(label):
            return f"label {_short(label)} must be a finite number for a regression model"
        return None
    if not isinstance(label, _SCALARS) or (isinstance(label, float) and not math.isfinite(label)):
        return f"label {_short(label)} must be a single class value" + (f", one of {classes}" if classes else "")
    if classes is None:
        return None
    if not any(_same_type(label, c) and label == c for c in classes):
        return f"label {_short(label)} is not one of the model's classes {classes}"
    return None


def _same_type(a: Any, b: Any) -> bool:
    if a.__class__ is bool or b.__class__ is bool:
        return a.__class__ is b.__class__
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str)
    return isinstance(a, (int, float)) and isinstance(b, (int, float))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def usable_labels(frame: pd.DataFrame) -> pd.Series:
    """Which rows' labels the quality metrics can use, judged against the rows' own predictions.

    Labels stored before the door checked them (``"banana"`` for a 0/1 classifier, an object, a
    fraction where the predictions are whole classes) would make every metric fail; such rows are
    left out and counted. A label must be a single value of the predictions' kind: text with text,
    a number with numbers, a whole number where every prediction is a whole number.
    """
    preds = [p[0] if isinstance(p, list) and len(p) == 1 else p for p in frame["prediction"]]
    numbers = [p for p in preds if p.__class__ is not bool and isinstance(p, (int, float))]
    texts = all(isinstance(p, str) for p in preds)
    whole = bool(numbers) and len(numbers) == len(preds) and all(float(p).is_integer() for p in numbers)
    keep = []
    for label in frame["label"]:
        if texts:
            ok = isinstance(label, str)
        elif numbers:
            ok = label.__class__ is not bool and isinstance(label, (int, float)) and math.isfinite(label) and \
                (not whole or float(label).is_integer())
        else:
            ok = isinstance(label, _SCALARS)
        keep.append(ok)
    return pd.Series(keep, index=frame.index, dtype=bool)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0)
    db.execute("PRAGMA busy_timeout=30000")
    return db


def scores_of_body(body: bytes | str | None) -> tuple[list[list[float]] | None, list[Any] | None]:
    """Per-row class scores and the class order of a logged response body (None when it has none)."""
    if not body:
        return None, None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    if isinstance(doc.get("scores"), list):
        return doc["scores"], doc.get("classes")
    for out in doc.get("outputs") or []:
        if isinstance(out, dict) and out.get("name") == "scores" and isinstance(out.get("data"), list):
            data, shape = out["data"], out.get("shape") or []
            if data and not isinstance(data[0], list) and len(shape) == 2:
                data = [data[i:i + shape[1]] for i in range(0, len(data), shape[1])]
            classes = (out.get("parameters") or {}).get("classes")
            if isinstance(classes, str):
                try:
                    classes = orjson.loads(classes)
                except orjson.JSONDecodeError:
                    classes = None
            return data, classes
    return None, None


def _with_scores(db: sqlite3.Connection, frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``scores`` (list per row, or None) from the response bodies of the frame's requests."""
    bodies: dict[str, bytes] = {}
    ids = list(dict.fromkeys(frame["request_id"]))
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        marks = ",".join("?" * len(part))
        bodies.update(db.execute(f"SELECT ce_id, body FROM events WHERE kind = 'response' AND ce_id IN ({marks})",
                                 part).fetchall())
    parsed = {rid: scores_of_body(body)[0] for rid, body in bodies.items()}
    scores = []
    for rid, idx in zip(frame["request_id"], frame["row_index"]):
        s = parsed.get(rid)
        scores.append(s[idx] if s is not None and idx < len(s) else None)
    frame["scores"] = scores
    return frame


def _decode(values: list[Any]) -> list[Any]:
    if not values:
        return []
    return orjson.loads(b"[" + b",".join(v if isinstance(v, bytes) else str(v).encode() for v in values) + b"]")


def _select(db: sqlite3.Connection, sql_from: str, columns: list[str], *, version: str | None, model_name: str | None,
            since: float | None, until: float | None, limit: int | None, offset: int | None = None) -> list[tuple]:
    clauses, params = [], []
    if version is not None:
        clauses.append("COALESCE(r.model_version, 'unknown') = ?")
        params.append(version)
    if model_name:
        clauses.append("r.model_name = ?")
        params.append(model_name)
    if since is not None:
        clauses.append("r.ts >= ?")
        params.append(since)
    if until is not None:
        clauses.append("r.ts < ?")
        params.append(until)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    if offset is not None:  # the block [offset, offset + limit) in prediction-time order
        sql = f"SELECT {', '.join(columns)} {sql_from} {where} ORDER BY r.ts, r.seq LIMIT {int(limit or -1)} " \
              f"OFFSET {int(offset)}"
        return db.execute(sql, params).fetchall()
    sql = f"SELECT {', '.join(columns)} {sql_from} {where} ORDER BY r.ts DESC, r.seq DESC"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    rows = db.execute(sql, params).fetchall()
    rows.reverse()  # oldest first
    return rows


def labelled_count(store_path: str | Path, *, version: str | None = None) -> int:
    """How many logged predictions (of ``version``) have a label."""
    db = _connect(Path(store_path))
    try:
        sql = ("SELECT COUNT(*) FROM rows r JOIN labels l ON l.request_id = r.request_id "
               "AND l.row_index = r.row_index")
        if version is None:
            return int(db.execute(sql).fetchone()[0])
        return int(db.execute(sql + " WHERE COALESCE(r.model_version, 'unknown') = ?", (version,)).fetchone()[0])
    finally:
        db.close()


def labelled_window(store_path: str | Path, *, version: str | None = None, model_name: str | None = None,
                    since: float | None = None, until: float | None = None, limit: int | None = None,
                    offset: int | None = None, scores: bool = True) -> pd.DataFrame:
    """Labelled predictions by prediction time (``since`` inclusive, ``until`` exclusive; with
    ``limit`` the latest ones, with ``offset`` too the block from that position), oldest first:
    ``request_id, row_index, ts, model_version, role, prediction, label`` and ``scores`` when asked."""
    cols = ["r.request_id", "r.row_index", "r.ts", "COALESCE(r.model_version, 'unknown')", "r.role", "r.prediction",
            "l.label"]
    db = _connect(Path(store_path))
    try:
        rows = _select(db, "FROM rows r JOIN labels l ON l.request_id = r.request_id AND l.row_index = r.row_index",
                       cols, version=version, model_name=model_name, since=since, until=until, limit=limit,
                       offset=offset)
        frame = pd.DataFrame(rows, columns=["request_id", "row_index", "ts", "model_version", "role", "prediction",
                                            "label"])
        frame["prediction"] = _decode(list(frame["prediction"]))
        frame["label"] = _decode(list(frame["label"]))
        keep = usable_labels(frame) if len(frame) else None
        if keep is not None and not keep.all():
            skipped = int((~keep).sum())
            log.warning("%d stored labels (of %d) do not fit the predictions (wrong type or class) and are left out "
                        "of the quality check", skipped, len(frame))
            frame = frame[keep].reset_index(drop=True)
            frame.attrs["skipped_labels"] = skipped
        if scores:
            frame = _with_scores(db, frame)
    finally:
        db.close()
    return frame


def scored_window(store_path: str | Path, *, version: str | None = None, model_name: str | None = None,
                  since: float | None = None, until: float | None = None, limit: int | None = None) -> pd.DataFrame:
    """Logged predictions with their class scores, labelled or not (for the estimate)."""
    cols = ["r.request_id", "r.row_index", "r.ts", "COALESCE(r.model_version, 'unknown')", "r.prediction"]
    db = _connect(Path(store_path))
    try:
        rows = _select(db, "FROM rows r", cols, version=version, model_name=model_name, since=since, until=until,
                       limit=limit)
        frame = pd.DataFrame(rows, columns=["request_id", "row_index", "ts", "model_version", "prediction"])
        frame["prediction"] = _decode(list(frame["prediction"]))
        frame = _with_scores(db, frame)
    finally:
        db.close()
    return frame


def versions_seen(store_path: str | Path, *, model_name: str | None = None) -> list[str]:
    """Model versions with logged predictions, oldest first; predictions that name no version are
    left out (a quality check needs the version's holdout baseline) and reported once."""
    db = _connect(Path(store_path))
    try:
        sql = "SELECT model_version AS v, MIN(seq), COUNT(*) FROM rows"
        params: list[Any] = []
        if model_name:
            sql += " WHERE model_name = ?"
            params.append(model_name)
        rows = db.execute(sql + " GROUP BY v ORDER BY MIN(seq)", params).fetchall()
    finally:
        db.close()
    unversioned = sum(r[2] for r in rows if r[0] is None)
    if unversioned and str(store_path) not in _said_unversioned:
        _said_unversioned.add(str(store_path))  # said once per store, not at every check
        log.warning("%d logged predictions name no model version (no ce-modelversion, no model_version in the "
                    "response): they are left out of the quality checks", unversioned)
    return [r[0] for r in rows if r[0] is not None]


def score_matrix(frame: pd.DataFrame) -> np.ndarray | None:
    """The ``scores`` column as an ``n × k`` array (None when any row lacks scores)."""
    if "scores" not in frame or frame.empty or frame["scores"].isna().any():
        return None
    try:
        return np.asarray(list(frame["scores"]), dtype=float)
    except (ValueError, TypeError):
        return None
