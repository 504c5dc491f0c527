"""The evaluate step and the monitor score the same predictions with the same functions
(driftloop.core.statistics), and those agree with scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from components import evaluate
from driftloop.core import statistics
from monitoring import quality


class _Fixed:
    """A model that answers fixed predictions (and scores) whatever the features."""

    def __init__(self, pred, proba=None, classes=None):
        self._pred, self._proba = np.asarray(pred), proba
        if classes is not None:
            self.classes_ = np.asarray(classes)
        if proba is not None:
            self.predict_proba = lambda X: self._proba

    def predict(self, X):
        return self._pred


def _score(model, y, task):
    test = pd.DataFrame({"x": np.arange(len(y), dtype=float), "y": y})
    return evaluate.score(model, test, target="y", task=task, numeric=["x"], categorical=[])


def test_both_callers_use_the_one_definition():
    assert evaluate.classification_metrics is statistics.classification_metrics
    assert evaluate.regression_metrics is statistics.regression_metrics
    assert evaluate.expected_calibration_error is statistics.expected_calibration_error
    assert quality.regression_metrics is statistics.regression_metrics
    assert quality._classification_metrics is statistics.classification_metrics


@pytest.mark.parametrize("classes", [[0, 1], [0, 1, 2]])
def test_accuracy_and_f1_are_the_same_for_evaluate_and_monitor_and_sklearns(classes):
    rng = np.random.default_rng(7)
    truth = rng.choice(classes, 500)
    pred = np.where(rng.random(500) < 0.7, truth, rng.choice(classes, 500))
    proba = rng.dirichlet(np.ones(len(classes)), 500)
    holdout = _score(_Fixed(pred, proba, classes), truth, "classification")
    live = quality.quality_metrics("classification", list(truth), [[int(v)] for v in pred], proba, classes)
    average = {"pos_label": 1} if len(classes) == 2 else {"average": "macro"}
    assert holdout["accuracy"] == live["accuracy"] == skm.accuracy_score(truth, pred)
    assert holdout["f1"] == live["f1"] == skm.f1_score(truth, pred, zero_division=0, **average)
    assert holdout["roc_auc"] == live["roc_auc"]


def test_rmse_mae_r2_are_the_same_for_evaluate_and_monitor_and_sklearns():
    rng = np.random.default_rng(11)
    y = rng.normal(100, 10, 400)
    pred = 0.9 * y + rng.normal(4, 6, 400)
    holdout = _score(_Fixed(pred), y, "regression")
    live = quality.quality_metrics("regression", list(y), list(pred))
    assert holdout["rmse"] == live["rmse"] == math.sqrt(skm.mean_squared_error(y, pred))
    assert holdout["mae"] == live["mae"] == skm.mean_absolute_error(y, pred)
    assert holdout["r2"] == live["r2"] == skm.r2_score(y, pred)


def test_where_the_two_readings_differ_each_keeps_its_own():
    # A constant truth: the evaluate step reads R² as scikit-learn does, the monitor says NaN.
    assert _score(_Fixed([1.0, 2.0, 1.0]), [1.0, 1.0, 1.0], "regression")["r2"] == skm.r2_score([1, 1, 1], [1, 2, 1])
    assert math.isnan(quality.regression_metrics([1.0, 1.0, 1.0], [1.0, 2.0, 1.0])["r2"])
    # Non-finite predictions: the evaluate step refuses them (the champion then "cannot score").
    with pytest.raises(ValueError, match="NaN"):
        _score(_Fixed([1.0, float("nan")]), [1.0, 2.0], "regression")
    # Macro F1 over a class absent from both truth and predictions: the monitor counts it as 0.
    truth, pred = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    assert statistics.f1(truth, pred, [0, 1, 2], macro_over_classes=False) == skm.f1_score(truth, pred, average="macro")
    assert statistics.f1(truth, pred, [0, 1, 2]) == skm.f1_score(truth, pred, average="macro", labels=[0, 1, 2],
                                                                  zero_division=0)
