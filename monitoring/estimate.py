"""Performance estimated before labels arrive: confidence-based estimation (CBPE, as NannyML does).

A classifier whose scores are calibrated says, for each row, how likely each class is. Over a
window, the expected accuracy is the mean calibrated probability of the class it predicted, and
the expected confusion matrix adds, for each row predicted as ``k``, its calibrated probability
of being each true class ``j`` to cell ``[j, k]``. The calibration is the isotonic map fitted on
the model's holdout at registration (``quality/holdout.json``, see
``components.evaluate.calibration_map``), applied here with ``np.interp`` — no model, no
scikit-learn.

The estimate holds while the relation between features and label stays as it was at training
(covariate shift: the inputs move, the model's confidence moves with them). Under concept drift
the model is confidently wrong and only labels show it — which is why the realised check on
labelled windows stays the judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from driftloop.core.errors import MonitorError

__all__ = ["Calibration", "Estimate", "estimate_performance", "finite_rows"]


@dataclass(frozen=True)
class Calibration:
    """Per-class isotonic maps (score → probability) of one model version."""

    classes: list[Any]
    binary: bool
    maps: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def from_holdout(cls, holdout: dict[str, Any]) -> Calibration | None:
        """The calibration recorded at registration, or None when the version has none."""
        cal = holdout.get("calibration")
        classes = holdout.get("classes")
        if not cal or not classes:
            return None
        maps = [(np.asarray(m["x"], float), np.asarray(m["y"], float)) for m in cal["maps"]]
        return cls(list(classes), bool(cal.get("binary")), maps)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (rows sum to 1) for raw scores ``n × k``."""
        scores = np.asarray(scores, dtype=float)
        if scores.ndim != 2 or scores.shape[1] != len(self.classes):
            raise MonitorError(f"scores have shape {list(scores.shape)}; the model has {len(self.classes)} classes")
        if self.binary:
            x, y = self.maps[0]
            p1 = np.interp(scores[:, 1], x, y)
            return np.column_stack([1.0 - p1, p1])
        out = np.column_stack([np.interp(scores[:, j], x, y) for j, (x, y) in enumerate(self.maps)])
        total = out.sum(axis=1, keepdims=True)
        uniform = np.full_like(out, 1.0 / out.shape[1])
        return np.where(total > 0, out / np.where(total > 0, total, 1.0), uniform)


@dataclass(frozen=True)
class Estimate:
    """Expected accuracy and confusion matrix (rows = true class, columns = predicted) of a window."""

    accuracy: float
    confusion: list[list[float]]
    classes: list[Any]
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "confusion": self.confusion, "classes": self.classes, "rows": self.rows}


def finite_rows(scores: np.ndarray) -> np.ndarray:
    """The rows of an ``n × k`` score matrix whose scores are all finite (a NaN or an infinity
    stored in one row estimates nothing)."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2:
        return scores
    finite = np.isfinite(scores).all(axis=1)
    return scores if finite.all() else scores[finite]


def estimate_performance(scores: np.ndarray, calibration: Calibration) -> Estimate:
    """CBPE on one window's rows with finite scores: the model's predicted class is the arg-max of its raw scores."""
    scores = finite_rows(scores)
    if scores.size == 0:
        raise MonitorError("no scored rows to estimate performance on")
    proba = calibration.apply(scores)
    predicted = scores.argmax(axis=1)
    n, k = proba.shape
    accuracy = float(proba[np.arange(n), predicted].mean())
    confusion = np.zeros((k, k))
    for j in range(k):
        confusion[:, j] = proba[predicted == j].sum(axis=0)
    return Estimate(accuracy, confusion.tolist(), list(calibration.classes), n)
