"""One definition of each statistic shared by the evaluate step, the monitor, the rollout and the agent."""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

__all__ = ["psi", "accuracy", "f1", "roc_auc", "classification_metrics", "regression_metrics",
           "expected_calibration_error", "in_blackout",
           "BLACKOUT_WINDOW", "check_blackout_windows"]


def _numeric(values: list[Any]) -> list[float] | None:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        out.append(float(v))
    return out


def psi(expected: list[Any], actual: list[Any], *, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of ``actual`` against ``expected``.

    Numeric outputs with many distinct values are binned by the expected sample's deciles;
    class labels (or few distinct values) are compared level by level.
    """
    import numpy as np

    exp_num, act_num = _numeric(expected), _numeric(actual)
    if exp_num is not None and act_num is not None and len(set(exp_num)) > bins:
        edges = np.unique(np.quantile(np.asarray(exp_num), np.linspace(0, 1, bins + 1)[1:-1]))
        e = np.bincount(np.searchsorted(edges, exp_num, side="right"), minlength=len(edges) + 1)
        a = np.bincount(np.searchsorted(edges, act_num, side="right"), minlength=len(edges) + 1)
    else:
        levels = sorted({str(v) for v in expected} | {str(v) for v in actual})
        e = np.array([sum(1 for v in expected if str(v) == lv) for lv in levels])
        a = np.array([sum(1 for v in actual if str(v) == lv) for lv in levels])
    pe = np.maximum(e / max(e.sum(), 1), eps)
    pa = np.maximum(a / max(a.sum(), 1), eps)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


# -- model quality: one definition for the evaluate step (holdout) and the monitor (live windows) --
def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of predictions equal to the truth (scikit-learn's ``accuracy_score``)."""
    import numpy as np

    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def f1(y_true: Any, y_pred: Any, classes: list[Any], *, macro_over_classes: bool = True) -> float:
    """F1 of the positive class ``classes[1]`` for two classes, else the macro average.

    ``macro_over_classes``: average over every class in ``classes``, a class absent from both truth
    and predictions counting 0 (the monitor's reading); False averages over the classes present in
    either (the evaluate step's).
    """
    from sklearn import metrics as skm

    if len(classes) == 2:
        return float(skm.f1_score(y_true, y_pred, pos_label=classes[1], zero_division=0))
    labels = list(classes) if macro_over_classes else None
    return float(skm.f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0))


def roc_auc(y_true: Any, scores: Any, classes: list[Any]) -> float | None:
    """ROC AUC of the scores (``n × k``, columns in ``classes`` order; one-vs-rest beyond two
    classes), or None where undefined (a class missing from the truth)."""
    from sklearn import metrics as skm

    try:
        if len(classes) == 2:
            return float(skm.roc_auc_score(y_true == classes[1], scores[:, 1]))
        return float(skm.roc_auc_score(y_true, scores, multi_class="ovr", labels=classes))
    except ValueError:
        return None


def expected_calibration_error(correct: Any, confidence: Any, bins: int = 10) -> float:
    """ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by their rows.

    The value recorded at registration (the evaluate step's holdout) and the one the monitor
    computes on labelled windows, so the two compare."""
    import numpy as np

    correct = np.asarray(correct, dtype=float)
    confidence = np.asarray(confidence, dtype=float)
    if confidence.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total / confidence.size)


def classification_metrics(y_true: Any, y_pred: Any, classes: list[Any], scores: Any = None, *,
                           macro_over_classes: bool = True, ece: bool = True) -> dict[str, float]:
    """Accuracy, F1 and — with scores — ROC AUC (when the truth has two classes or more) and the
    expected calibration error of the top score (``ece``). Truth and predictions must already be
    comparable values; see :func:`f1` for ``macro_over_classes``."""
    import numpy as np
    import pandas as pd

    out = {"accuracy": accuracy(y_true, y_pred), "f1": f1(y_true, y_pred, classes, macro_over_classes=macro_over_classes)}
    if scores is not None and pd.Series(np.asarray(y_true)).nunique() > 1:
        auc = roc_auc(y_true, scores, classes)
        if auc is not None:
            out["roc_auc"] = auc
    if scores is not None and ece:
        correct = (np.asarray(y_true) == np.asarray(y_pred)).astype(float)
        out["ece"] = expected_calibration_error(correct, np.asarray(scores).max(axis=1))
    return out


def regression_metrics(y_true: Any, y_pred: Any, *, strict: bool = False) -> dict[str, float]:
    """RMSE, MAE, R² and the mean error (prediction − truth).

    ``strict`` is the evaluate step's reading, scikit-learn's: empty or non-finite input raises
    ``ValueError`` and R² of a constant truth is 1.0 when every prediction is exact, else 0.0.
    Not strict (the monitor's): empty input gives ``{}``, values that overflow give inf, and R² of a
    constant truth is NaN. R² of a single row is NaN either way.
    """
    import numpy as np

    y = np.asarray(y_true, dtype=float).ravel()
    p = np.asarray(y_pred, dtype=float).ravel()
    if strict:
        if y.size == 0:
            raise ValueError(f"Found array with 0 sample(s) (shape={y.shape}) while a minimum of 1 is required.")
        for values in (y, p):
            if np.isnan(values).any():
                raise ValueError("Input contains NaN.")
            if not np.isfinite(values).all():
                raise ValueError("Input contains infinity or a value too large for dtype('float64').")
    if y.size == 0:
        return {}
    with np.errstate(over="ignore", invalid="ignore"):  # values not cleaned may overflow: inf, judged by nobody
        err = p - y
        ss_res = float(np.sum(err ** 2))
        ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    elif strict and y.size > 1:
        r2 = 1.0 if ss_res == 0 else 0.0
    else:
        r2 = float("nan")
    return {"rmse": math.sqrt(ss_res / y.size), "mae": float(np.mean(np.abs(err))), "r2": r2,
            "mean_error": float(err.mean())}


# -- blackout windows: one reading for the retraining trigger and the agent ----------------------
BLACKOUT_WINDOW = re.compile(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d")


def check_blackout_windows(windows: list[str]) -> list[str]:
    """``windows`` unchanged when each is ``HH:MM-HH:MM``; else ``ValueError`` naming the first wrong one."""
    for item in windows:
        if not BLACKOUT_WINDOW.fullmatch(item):
            raise ValueError(f"blackout window {item!r} is not HH:MM-HH:MM")
    return windows


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def in_blackout(windows: tuple[str, ...] | list[str], now: float) -> str | None:
    """The blackout window (``HH:MM-HH:MM`` UTC; ``22:00-06:00`` wraps midnight) that ``now``
    (epoch seconds) falls in, or None."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    minute = t.hour * 60 + t.minute
    for window in windows:
        start, end = (_minutes(x) for x in window.split("-"))
        inside = start <= minute < end if start <= end else (minute >= start or minute < end)
        if inside:
            return window
    return None
