"""Model quality on labelled windows, judged against the version's own holdout metrics.

Input drift says the inputs moved; it cannot say the model is wrong. This check can: per model
version, on a window of labelled predictions (by prediction time, at least
``monitor.quality.min_labels`` labels), it computes

* regression: RMSE, MAE, R², mean error (bias, prediction − truth);
* classification: accuracy, F1 (binary: positive class; else macro), ROC AUC where class scores
  were logged, and the expected calibration error of the top score;

and compares each with the same version's holdout metrics recorded at registration
(``quality/holdout.json``; older versions: the run's logged metrics) under
``monitor.quality.max_relative`` / ``max_absolute`` (e.g. RMSE 25 % worse, accuracy 0.05 lower).

Windows are tumbling: by count, the k-th block of ``window_rows`` labelled rows in prediction-time
order (the latest complete one is judged); by time, the latest complete interval of
``window_seconds``. A block keeps its id when more labels arrive, so a re-check of the same
block is de-duplicated by its alert id.

Evidently's ``RegressionPreset`` / ``ClassificationPreset`` is the report of record (HTML + JSON,
saved with the alert and logged to MLflow); the metrics here are a fast path with the same
definitions (scikit-learn's, which Evidently uses), tested to give the same values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from driftloop.core.errors import MonitorError, RegistryError
from driftloop.core.statistics import classification_metrics as _classification_metrics
from driftloop.core.statistics import regression_metrics
from monitoring.estimate import Calibration

if TYPE_CHECKING:
    from driftloop.core.config import QualityConfig

__all__ = [
    "HOLDOUT_ARTIFACT",
    "Baseline",
    "BaselineCache",
    "MetricVerdict",
    "classification_metrics",
    "Block",
    "clean_labelled",
    "compare",
    "evidently_quality",
    "quality_alert_id",
    "quality_metrics",
    "regression_metrics",
    "tumbling_block",
    "verdicts_dict",
]

log = logging.getLogger(__name__)

HOLDOUT_ARTIFACT = "quality/holdout.json"
LOWER_IS_BETTER = {"rmse", "mae", "ece", "mean_error"}  # mean_error: its absolute value
TASK_METRICS = {"regression": ("rmse", "mae", "r2", "mean_error"),
                "classification": ("accuracy", "f1", "roc_auc", "ece")}


# -- what a stored label or prediction may be ----------------------------------------------------
# Labels arrive from outside and older rows were stored unchecked: each row's label and prediction
# are coerced to the task's type and the model's classes, and a row that cannot be is skipped and
# counted (``clean_labelled``), never an error for the whole window.
_MAX_MAGNITUDE = 1e100  # beyond this a regression value is no measurement (and its square overflows the sums)
_INT_LITERAL = re.compile(r"[+-]?\d+")


def _unwrap(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_number(value: Any) -> float | str:
    """A regression value as a finite float, or why it is none (``"not a number"``, ``"not finite"``, …)."""
    value = _unwrap(value)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return "not a number"
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        return "not a number"
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        return "not finite"
    if not math.isfinite(number):
        return "not finite"
    return number if abs(number) <= _MAX_MAGNITUDE else f"beyond ±{_MAX_MAGNITUDE:g}"


def _class_kind(classes: list[Any]) -> str:
    if all(isinstance(c, (bool, np.bool_)) for c in classes):
        return "bool"
    if all(_is_int(c) for c in classes):
        return "int"
    if all(isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, (bool, np.bool_))
           for c in classes):
        return "float"
    return "str"


def _as_class_of(value: Any, kind: str) -> Any:
    """``value`` as a class of ``kind`` (the model's class type), or None when it is not one: "1" is
    the int 1 only as an exact integer literal, 2.5 is no int class, a dict no class at all."""
    value = _unwrap(value)
    if value is None or isinstance(value, (dict, list, tuple)):
        return None
    if kind == "bool":
        return bool(value) if isinstance(value, (bool, np.bool_)) else None
    if isinstance(value, (bool, np.bool_)):
        return None
    if kind == "int":
        if _is_int(value):
            return int(value)
        if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
            return int(value)
        if isinstance(value, str) and _INT_LITERAL.fullmatch(value.strip()):
            return int(value.strip())
        return None
    if kind == "float":
        number = _as_number(value)
        return number if isinstance(number, float) else None
    if isinstance(value, str):
        return value
    return str(int(value)) if _is_int(value) else None


def clean_labelled(task: str, rows: pd.DataFrame, classes: list[Any] | None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows whose label and prediction are values of the task (regression: finite floats;
    classification: the model's classes), coerced, and the count of rows skipped per reason.

    A row is skipped for its first fault: its label or prediction is not a number / not finite /
    not a class / not one of the model's classes, or its class scores are not finite.
    """
    skipped: dict[str, int] = {}
    if rows.empty:
        return rows, skipped
    if task == "regression":
        def coerce(value: Any) -> tuple[Any, str | None]:
            number = _as_number(value)
            return (number, None) if isinstance(number, float) else (None, number)
    else:
        known = set(classes) if classes else None
        if classes:
            kind = _class_kind(list(classes))
        else:  # no recorded classes: the type the model answers with
            answers = [_unwrap(p) for p in rows["prediction"]]
            kind = "int" if answers and all(_is_int(p) for p in answers) else "str"

        def coerce(value: Any) -> tuple[Any, str | None]:
            cls = _as_class_of(value, kind)
            if cls is None:
                return None, "not a class"
            if known is not None and cls not in known:
                return None, "not one of the model's classes"
            return cls, None

    keep = np.ones(len(rows), dtype=bool)
    coerced: dict[str, list[Any]] = {}
    for column in ("label", "prediction"):
        out = []
        for i, value in enumerate(rows[column]):
            if not keep[i]:
                out.append(None)
                continue
            cls, fault = coerce(value)
            if fault is not None:
                keep[i] = False
                reason = f"{column} {fault}"
                skipped[reason] = skipped.get(reason, 0) + 1
            out.append(cls)
        coerced[column] = out
    if "scores" in rows:
        for i, scores in enumerate(rows["scores"]):
            if keep[i] and scores is not None and not _finite_scores(scores):
                keep[i] = False
                skipped["scores not finite"] = skipped.get("scores not finite", 0) + 1
    frame = rows.assign(label=pd.Series(coerced["label"], index=rows.index, dtype=object),
                        prediction=pd.Series(coerced["prediction"], index=rows.index, dtype=object))
    return frame[keep].reset_index(drop=True), skipped


def _finite_scores(scores: Any) -> bool:
    try:
        return bool(np.isfinite(np.asarray(scores, dtype=float)).all())
    except (TypeError, ValueError):
        return False


# -- the metrics (fast path) ---------------------------------------------------------------------
def _as_class(values: Any, classes: list[Any] | None) -> np.ndarray:
    """Labels and predictions in one comparable form: the model's class values where known."""
    arr = pd.Series(list(values))
    arr = arr.map(lambda v: v[0] if isinstance(v, list) and len(v) == 1 else v)
    if classes is not None and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in classes):
        num = pd.to_numeric(arr, errors="coerce")
        if not num.isna().any():
            values = num.to_numpy(dtype=float)
            return values.astype(np.int64) if np.all(values == np.round(values)) else values
    return arr.astype(str).to_numpy()


def classification_metrics(y_true: Any, y_pred: Any, scores: np.ndarray | None = None,
                           classes: list[Any] | None = None) -> dict[str, float]:
    """Accuracy, F1, and — with scores (``n × k``, columns in ``classes`` order) — ROC AUC and ECE.

    The definitions are ``driftloop.core.statistics``' (scikit-learn's, as for the evaluate step);
    the macro F1 of several classes averages over every class the model knows (one absent from the
    window counts 0). Arrays whose type already says what each value is (integer or string labels,
    finite scores) take :func:`_encoded_metrics`, which computes the same values from class codes;
    anything else (lists, wrapped values, unknown labels) goes through ``core.statistics``."""
    fast = _encoded_metrics(y_true, y_pred, scores, classes)
    if fast is not None:
        return fast
    y = _as_class(y_true, classes)
    p = _as_class(y_pred, classes)
    order = list(_as_class(classes, classes)) if classes is not None else sorted(set(y) | set(p))
    return _classification_metrics(y, p, order, scores, macro_over_classes=True)


def quality_metrics(task: str, labels: Any, predictions: Any, scores: np.ndarray | None = None,
                    classes: list[Any] | None = None) -> dict[str, float]:
    """The task's metrics on one window (the fast path)."""
    if task == "regression":
        y, p = _float_array(labels), _float_array(predictions)
        if y is None or p is None:
            y = pd.to_numeric(pd.Series(list(labels)), errors="raise")
            p = pd.to_numeric(pd.Series([v[0] if isinstance(v, list) else v for v in predictions]), errors="raise")
        return regression_metrics(y, p)
    return classification_metrics(labels, predictions, scores, classes)


# -- the vectorised reading: class codes, counts, one sort per score column ----------------------
# ``_as_class`` looks at every value in Python (1M rows: most of a second). Where the array's type
# already answers what it would find, the values are read as a whole instead and each is replaced
# by its class's index (its code); the metrics are then counts of codes, computed the way
# scikit-learn computes them from those counts, so the values are the same to the last bit
# (tests/test_quality_fast.py). ``None`` from any helper below means "not this reading": the
# caller takes the general path, which gives the same answer, only slower.
_EXACT_INT = 2 ** 53  # integers a float64 holds exactly (``_as_class`` reads numbers as float64)
_LOOKUP_SPAN = 1 << 16  # integer classes within this span are coded by a table, others by a search


def _raw(values: Any) -> np.ndarray | None:
    if isinstance(values, pd.Series):
        values = values.to_numpy()
    return values if isinstance(values, np.ndarray) and values.ndim == 1 else None


def _float_array(values: Any) -> np.ndarray | None:
    """Regression values as float64 where the array holds numbers only (what ``pd.to_numeric`` gives)."""
    arr = _raw(values)
    if arr is None:
        return None
    if arr.dtype.kind in "iuf":
        return arr
    if arr.dtype.kind == "O" and pd.api.types.infer_dtype(arr, skipna=False) in (
            "integer", "floating", "mixed-integer-float"):
        try:
            return arr.astype(np.float64)
        except (TypeError, ValueError, OverflowError):
            return None
    return None


def _numeric_classes(classes: list[Any] | None) -> bool:
    return classes is not None and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in classes)


def _class_values(values: Any, numeric: bool) -> np.ndarray | None:
    """What ``_as_class`` returns (int64 for integral numbers, str objects for text), read as a
    whole array; None where that needs a look at each value (lists, NaN, fractions, mixed types)."""
    arr = _raw(values)
    if arr is None:
        return None
    kind = arr.dtype.kind
    if kind == "O":
        inferred = pd.api.types.infer_dtype(arr, skipna=False)
        if inferred == "string" and not numeric:
            return arr
        if not numeric or inferred not in ("integer", "floating", "mixed-integer-float"):
            return None
        try:
            arr = arr.astype(np.int64) if inferred == "integer" else arr.astype(np.float64)
        except (TypeError, ValueError, OverflowError):
            return None
        kind = arr.dtype.kind
    elif kind == "U":
        return arr.astype(object) if not numeric else None
    if not numeric or kind not in "iuf" or arr.size == 0:
        return None
    lo, hi = arr.min(), arr.max()
    if kind == "f":
        if not (np.isfinite(lo) and np.isfinite(hi) and -_EXACT_INT < lo and hi < _EXACT_INT):
            return None
        as_int = arr.astype(np.int64)
        return as_int if np.array_equal(as_int, arr) else None  # fractions: scikit-learn reads them otherwise
    if -_EXACT_INT < int(lo) and int(hi) < _EXACT_INT:  # beyond: float64 would round them, as _as_class does
        return arr.astype(np.int64, copy=False)
    return None


def _codes(values: np.ndarray, order: list[Any]) -> np.ndarray | None:
    """Each value's index in ``order``; None when one is not in it (or ``order`` repeats a class)."""
    if values.dtype == object:
        index = pd.Index(order, dtype=object)
        if not index.is_unique:
            return None
        codes = index.get_indexer(values)
        return codes if codes.size == 0 or codes.min() >= 0 else None
    keys = np.asarray(order, dtype=np.int64)
    if keys.size == 0 or np.unique(keys).size != keys.size:
        return None
    lo, hi = int(keys.min()), int(keys.max())
    vlo, vhi = int(values.min()), int(values.max())
    if vlo < lo or vhi > hi:
        return None
    if np.array_equal(keys, np.arange(keys.size)):  # classes 0..k-1: the values are their codes
        return values
    if hi - lo <= _LOOKUP_SPAN:
        table = np.full(hi - lo + 1, -1, dtype=np.int64)
        table[keys - lo] = np.arange(keys.size)
        codes = table[values - lo]
        return codes if codes.min() >= 0 else None
    sorter = np.argsort(keys)
    at = np.minimum(keys.searchsorted(values, sorter=sorter), keys.size - 1)
    found = sorter[at]
    return found if np.array_equal(keys[found], values) else None


def _encoded_metrics(y_true: Any, y_pred: Any, scores: Any, classes: list[Any] | None) -> dict[str, float] | None:
    """``core.statistics.classification_metrics`` (macro over the classes) from class codes, or None."""
    numeric = _numeric_classes(classes)  # without classes, _as_class reads every value as text
    y, p = _class_values(y_true, numeric), _class_values(y_pred, numeric)
    if y is None or p is None or y.size != p.size or y.size == 0 or (y.dtype == object) != (p.dtype == object):
        return None
    if classes is not None:
        order = list(_as_class(classes, classes))
    else:
        both = np.concatenate((y, p))
        order = sorted(pd.unique(both).tolist()) if both.dtype == object else np.unique(both).tolist()
    cy, cp = _codes(y, order), _codes(p, order)
    if cy is None or cp is None:
        return None
    n, k = y.size, len(order)
    score_matrix = None
    if scores is not None:
        score_matrix = np.asarray(scores)
        if score_matrix.dtype != np.float64 or score_matrix.shape != (n, k) or not np.isfinite(score_matrix).all():
            return None
    counts = np.bincount(cy * k + cp, minlength=k * k).reshape(k, k)  # truth × prediction
    tp = np.diagonal(counts)
    true_sum, pred_sum = counts.sum(axis=1), counts.sum(axis=0)
    # scikit-learn's F-score: (1 + β²) tp / (β² true + pred), 0 where nothing is true nor predicted
    denom = true_sum.astype(np.float64) + pred_sum
    f = np.where(denom == 0, 0.0, 2.0 * tp / np.where(denom == 0, 1.0, denom))
    out = {"accuracy": int(tp.sum()) / n, "f1": float(f[1]) if k == 2 else float(np.mean(f))}
    if score_matrix is None:
        return out
    if np.count_nonzero(true_sum) > 1:
        auc = _roc_auc_codes(cy, score_matrix, order, true_sum)
        if auc is not None:
            out["roc_auc"] = auc
    out["ece"] = _ece(cy == cp, _row_reduce(np.maximum, score_matrix))
    return out


def _row_reduce(op: Any, matrix: np.ndarray) -> np.ndarray:
    """``op`` over each row, column by column (the same values as ``matrix.max(axis=1)`` or, for a few
    columns, ``sum(axis=1)``, at a fraction of the time for a tall matrix)."""
    out = matrix[:, 0].copy()
    for j in range(1, matrix.shape[1]):
        op(out, matrix[:, j], out=out)
    return out


def _roc_auc_codes(codes: np.ndarray, scores: np.ndarray, order: list[Any], true_sum: np.ndarray) -> float | None:
    """``core.statistics.roc_auc``: the positive class's column for two classes; else one-vs-rest,
    macro, only for classes given in sorted order and rows of scores summing to 1 (NaN when a class
    is missing from the truth), as scikit-learn's ``roc_auc_score`` answers."""
    k = len(order)
    if k == 2:
        return _binary_auc(codes == 1, scores[:, 1])
    if any(not order[i] < order[i + 1] for i in range(k - 1)):  # scikit-learn: labels must be ordered
        return None
    if not np.allclose(1, _row_reduce(np.add, scores)):
        return None
    per_class = [_binary_auc(codes == c, scores[:, c]) if 0 < true_sum[c] < codes.size else np.nan for c in range(k)]
    return float(np.average(np.asarray(per_class, dtype=np.float64)))


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """scikit-learn's ROC AUC of one column: its ROC curve (``drop_intermediate``) and trapezoids.

    The curve's points are counts at each distinct score from the top: one sort of the scores
    (any order within ties: only each distinct score's counts matter) gives, at the start of each
    run of equal scores, how many rows and how many positives lie below it. The counts are the
    integers scikit-learn accumulates in float64, so the curve, and the area, are the same."""
    from sklearn.metrics import auc

    order = np.argsort(score)
    ranked = score[order]
    starts = np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))
    below = np.concatenate(([0], np.cumsum(positive[order], dtype=np.int64)))[starts]  # positives below each run
    n_pos = int(np.count_nonzero(positive))
    tps = (n_pos - below)[::-1].astype(np.float64)  # descending thresholds: positives at or above
    fps = (positive.size - starts)[::-1].astype(np.float64) - tps
    if fps.size > 2:
        keep = np.concatenate(([True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]))
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.concatenate(([0.0], fps)), np.concatenate(([0.0], tps))
    return auc(fps / fps[-1], tps / tps[-1])


def _ece(correct: np.ndarray, confidence: np.ndarray, bins: int = 10) -> float:
    """``core.statistics.expected_calibration_error``, bin by bin in the same order and with the
    same sums: rows are grouped by bin with a stable sort, so each bin's mean adds its rows in
    their original order, as the masked mean does."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.zeros(confidence.size, dtype=np.uint8)  # np.digitize(right=True): the inner edges below each value
    for edge in edges[1:-1]:
        which += confidence > edge
    order = np.argsort(which, kind="stable")
    conf, hits = confidence[order], correct[order]
    bounds = np.concatenate(([0], np.cumsum(np.bincount(which, minlength=bins))))
    total = 0.0
    for b in range(bins):
        lo, hi = bounds[b], bounds[b + 1]
        if hi > lo:
            total += (hi - lo) * abs(hits[lo:hi].astype(float).mean() - conf[lo:hi].mean())
    return float(total / confidence.size)


# -- Evidently (report of record) ----------------------------------------------------------------
_EVIDENTLY_KEYS = {"MeanError": "mean_error", "RMSE": "rmse", "MAE": "mae", "R2Score": "r2", "Accuracy": "accuracy",
                   "F1Score": "f1", "RocAuc": "roc_auc"}


def evidently_quality(task: str, labels: Any, predictions: Any, scores: np.ndarray | None = None,
                      classes: list[Any] | None = None) -> tuple[Any, dict[str, float]]:
    """Run ``RegressionPreset`` / ``ClassificationPreset`` on a window; (snapshot, the metrics read back)."""
    from evidently import (BinaryClassification, DataDefinition, Dataset, MulticlassClassification, Regression,
                           Report)
    from evidently.presets import ClassificationPreset, RegressionPreset

    if task == "regression":
        frame = pd.DataFrame({"target": pd.to_numeric(pd.Series(list(labels))).to_numpy(dtype=float),
                              "prediction": [float(p[0] if isinstance(p, list) else p) for p in predictions]})
        definition = DataDefinition(numerical_columns=["target", "prediction"],
                                    regression=[Regression(target="target", prediction="prediction")])
        preset = RegressionPreset()
    else:
        y = _as_class(labels, classes)
        p = _as_class(predictions, classes)
        order = list(_as_class(classes, classes)) if classes is not None else sorted(set(y) | set(p))
        if len(order) > 2:  # Evidently names each class by its probability column: labels as those names
            y, p, order = y.astype(str), p.astype(str), [str(c) for c in order]
        frame = pd.DataFrame({"target": y, "prediction": p})
        proba_cols: list[str] = []
        if scores is not None:
            proba_cols = [f"proba_{c}" for c in order] if len(order) == 2 else list(order)
            for j, name in enumerate(proba_cols):
                frame[name] = scores[:, j]
        if len(order) == 2:
            spec = BinaryClassification(target="target", prediction_labels="prediction",
                                        prediction_probas=proba_cols[1] if proba_cols else None, pos_label=order[1])
        else:
            spec = MulticlassClassification(target="target", prediction_labels="prediction",
                                            prediction_probas=proba_cols or None)
        definition = DataDefinition(categorical_columns=["target", "prediction"], numerical_columns=proba_cols,
                                    classification=[spec])
        preset = ClassificationPreset()
    try:
        snapshot = Report([preset]).run(current_data=Dataset.from_pandas(frame, data_definition=definition))
    except (ValueError, KeyError, TypeError) as exc:
        raise MonitorError(f"Evidently could not compute the quality metrics: {exc}") from exc
    values: dict[str, float] = {}
    for metric in snapshot.dict()["metrics"]:
        kind = str(metric["config"].get("type", "")).rsplit(":", 1)[-1]
        key = _EVIDENTLY_KEYS.get(kind)
        if key is None:
            continue
        value = metric["value"]
        values[key] = float(value["mean"] if isinstance(value, dict) else value)
    return snapshot, values


# -- baselines -----------------------------------------------------------------------------------
@dataclass
class Baseline:
    """A version's holdout metrics (and calibration, for the estimate)."""

    version: str
    task: str
    metrics: dict[str, float]
    classes: list[Any] | None = None
    calibration: Calibration | None = None
    source: str = HOLDOUT_ARTIFACT


class BaselineCache:
    """Holdout baselines per version, read once from MLflow."""

    def __init__(self, registry: Any, model_name: str, task: str) -> None:
        self.registry = registry
        self.model_name = model_name
        self.task = task
        self._cache: dict[str, Baseline] = {}
        self._lock = threading.Lock()

    def get(self, version: str) -> Baseline:
        with self._lock:
            if version not in self._cache:
                self._cache[version] = self._load(version)
            return self._cache[version]

    def _load(self, version: str) -> Baseline:
        try:
            info = self.registry.get_version(self.model_name, version)
        except RegistryError as exc:
            raise MonitorError(f"no holdout baseline for {self.model_name} v{version}: {exc}") from exc
        if not info.run_id:
            raise MonitorError(f"{self.model_name} v{version} has no training run: no holdout baseline")
        try:
            path = self.registry.download(info.run_id, HOLDOUT_ARTIFACT)
            doc = json.loads(Path(path).read_text())
            return Baseline(version, doc.get("task", self.task), {k: float(v) for k, v in doc["metrics"].items()},
                            doc.get("classes"), Calibration.from_holdout(doc))
        except (RegistryError, OSError, ValueError, KeyError) as exc:
            log.info("%s v%s has no %s (%s); using the run's metrics", self.model_name, version, HOLDOUT_ARTIFACT, exc)
        try:
            logged = self.registry.run(info.run_id).data.metrics
        except RegistryError as exc:
            raise MonitorError(f"no holdout baseline for {self.model_name} v{version}: {exc}") from exc
        metrics = {k: float(logged[k]) for k in TASK_METRICS[self.task] if k in logged}
        if not metrics:
            raise MonitorError(f"{self.model_name} v{version}: its run logged no holdout metrics")
        return Baseline(version, self.task, metrics, source="run metrics")


# -- the rule ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricVerdict:
    metric: str
    live: float
    holdout: float
    limit: float  # the worst value still allowed
    rule: str
    degraded: bool


def compare(live: dict[str, float], baseline: dict[str, float], config: QualityConfig) -> list[MetricVerdict]:
    """Each metric with a rule (``max_relative`` / ``max_absolute``) against the holdout value.

    Lower-is-better metrics (rmse, mae, ece, |mean_error|) may grow by ``holdout × (1 + rel)`` or
    ``holdout + abs``; the others may fall to ``holdout × (1 − rel)`` or ``holdout − abs``. With
    both rules the stricter limit holds.
    """
    out = []
    for metric, value in live.items():
        rel, ab = config.max_relative.get(metric), config.max_absolute.get(metric)
        if (rel is None and ab is None) or metric not in baseline or value is None or not math.isfinite(value):
            continue  # a value that is not finite (no data, an overflow) judges nothing
        base = baseline[metric]
        if not math.isfinite(base):
            continue
        lower = metric in LOWER_IS_BETTER
        if metric == "mean_error":
            value, base = abs(value), abs(base)
        limits, rules = [], []
        if rel is not None:
            limits.append(base * (1 + rel) if lower else base - abs(base) * rel)
            rules.append(f"{'+' if lower else '-'}{rel:.0%}")
        if ab is not None:
            limits.append(base + ab if lower else base - ab)
            rules.append(f"{'+' if lower else '-'}{ab:g}")
        limit = min(limits) if lower else max(limits)
        degraded = value > limit if lower else value < limit
        out.append(MetricVerdict(metric, float(value), float(base), float(limit), " and ".join(rules), bool(degraded)))
    return out


# -- windows -------------------------------------------------------------------------------------
@dataclass
class Block:
    """One tumbling window of labelled rows of a version."""

    key: str
    rows: pd.DataFrame
    start_ts: float | None
    end_ts: float | None
    complete: bool
    extra: dict[str, Any] = field(default_factory=dict)


def tumbling_block(labelled: pd.DataFrame, *, rows: int, seconds: float | None, now: float) -> Block | None:
    """The latest complete tumbling block of ``labelled`` (sorted by prediction time ``ts``, epoch s)."""
    if labelled.empty:
        return None
    frame = labelled.sort_values(["ts", "request_id", "row_index"], kind="stable").reset_index(drop=True)
    if seconds is None:
        k = len(frame) // rows
        if k == 0:
            return Block("rows:0", frame, float(frame["ts"].iloc[0]), float(frame["ts"].iloc[-1]), False)
        part = frame.iloc[(k - 1) * rows: k * rows]
        return Block(f"rows:{k - 1}", part.reset_index(drop=True), float(part["ts"].iloc[0]),
                     float(part["ts"].iloc[-1]), True)
    current = math.floor(now / seconds) * seconds
    start = current - seconds
    part = frame[(frame["ts"] >= start) & (frame["ts"] < current)]
    if part.empty:
        part = frame[frame["ts"] >= current]
        return Block(f"t:{current:.0f}", part.tail(rows).reset_index(drop=True), current, current + seconds, False)
    return Block(f"t:{start:.0f}", part.tail(rows).reset_index(drop=True), start, current, True)


def quality_alert_id(model: str, version: str, block: str) -> str:
    """Same version + same block → same id (a re-check is de-duplicated)."""
    return "quality-" + hashlib.sha256(f"{model}:{version}:{block}".encode()).hexdigest()[:16]


def verdicts_dict(verdicts: list[MetricVerdict]) -> list[dict[str, Any]]:
    return [asdict(v) for v in verdicts]
