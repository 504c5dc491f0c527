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


# -- the canary's paired comparison ------------------------------------------------------------
def _two_classifiers(n, classes, seed, right=(0.8, 0.7)):
    rng = np.random.default_rng(seed)
    truth = rng.choice(classes, n)
    preds = [np.where(rng.random(n) < r, truth, rng.choice(classes, n)) for r in right]
    scores = [rng.dirichlet(np.ones(len(classes)), n) for _ in right]
    for s, p in zip(scores, preds):  # the predicted class gets the top score, as a classifier's would
        s[np.arange(n), [classes.index(v) for v in p]] += 1.0
        s /= s.sum(axis=1, keepdims=True)
    return truth, preds, scores


@pytest.mark.parametrize("classes", [[0, 1], [0, 1, 2]])
def test_the_paired_comparison_reads_each_metric_as_scikit_learn_does(classes):
    truth, (cand, champ), (s_c, s_p) = _two_classifiers(600, classes, 3)
    average = {"pos_label": 1} if len(classes) == 2 else {"average": "macro"}
    acc = statistics.paired_comparison("accuracy", truth, cand, champ)
    assert (acc.candidate, acc.champion) == (skm.accuracy_score(truth, cand), skm.accuracy_score(truth, champ))
    assert acc.change == pytest.approx(acc.candidate - acc.champion) and not acc.relative
    f1 = statistics.paired_comparison("f1", truth, cand, champ, classes=classes)
    assert f1.candidate == pytest.approx(skm.f1_score(truth, cand, zero_division=0, **average))
    auc = statistics.paired_comparison("roc_auc", truth, cand, champ, classes=classes, candidate_scores=s_c,
                                       champion_scores=s_p)
    ovr = {"multi_class": "ovr"} if len(classes) > 2 else {}
    expected = skm.roc_auc_score(truth, s_c if ovr else s_c[:, 1], **ovr)
    assert auc.candidate == pytest.approx(expected)
    for c in (acc, f1, auc):
        assert c.lower < c.change < c.upper and c.n == 600


def test_regression_is_compared_as_a_relative_change_whatever_the_target_s_units():
    """The issue's case: a champion under-predicting heavily (RMSE 133) against a retrained model that
    corrects it (RMSE ~71); their answers differ everywhere, and on 100 labelled requests — the default
    minimum — the candidate passes, in dollars or in thousands of dollars alike."""
    rng = np.random.default_rng(5)
    y = rng.lognormal(5.5, 0.5, 100)
    champion = 0.6 * y + rng.normal(0, 30, 100)
    candidate = y + rng.normal(0, 70, 100)
    rmse = statistics.paired_comparison("rmse", y, candidate, champion)
    assert rmse.relative and rmse.metric == "rmse"
    assert rmse.champion == pytest.approx(math.sqrt(skm.mean_squared_error(y, champion)))
    assert rmse.change == pytest.approx(1 - rmse.candidate / rmse.champion)
    assert rmse.verdict(0.05) is True and rmse.lower > 0  # better, with 95 % confidence
    scaled = statistics.paired_comparison("rmse", y * 1000, candidate * 1000, champion * 1000)
    assert (scaled.change, scaled.lower, scaled.upper) == pytest.approx((rmse.change, rmse.lower, rmse.upper))
    mae = statistics.paired_comparison("mae", y, candidate, champion)
    assert mae.candidate == pytest.approx(skm.mean_absolute_error(y, candidate))
    assert statistics.paired_comparison("r2", y, candidate, champion).metric == "rmse"  # R² moves with the MSE


def test_the_verdict_passes_within_the_margin_fails_when_worse_and_holds_otherwise():
    make = lambda lower, upper, effective=1000.0: statistics.PairedComparison(  # noqa: E731
        "accuracy", False, 1000, 0.8, 0.8, (lower + upper) / 2, lower, upper, 0.95, effective)
    assert make(-0.02, 0.03).verdict(0.05) is True
    assert make(-0.04, -0.01).verdict(0.05) is True  # surely worse, but by less than the margin it allows
    assert make(-0.09, -0.01).verdict(0.05) is False
    assert make(-0.09, 0.02).verdict(0.05) is None
    assert make(-0.02, 0.03, effective=12.0).verdict(0.05) is None  # a mean carried by a dozen rows
    # numbers compare as numbers, anything else as text: the monitor's reading of a label
    mixed = statistics.paired_comparison("accuracy", [1, 0, "yes"], [1.0, 1, "yes"], [1, 0, "no"])
    assert mixed.candidate == mixed.champion == pytest.approx(2 / 3)


def test_the_bounds_of_every_prefix_come_from_running_sums():
    rng = np.random.default_rng(8)
    lc, lp = rng.exponential(1.0, (3, 400)), rng.exponential(1.1, (3, 400))
    running = statistics.paired_bounds(statistics.loss_moments(lc, lp, cumulative=True), relative=True, power=0.5)
    for n in (50, 223, 400):
        once = statistics.paired_bounds(statistics.loss_moments(lc[:, :n], lp[:, :n]), relative=True, power=0.5)
        for a, b in zip(running, once):
            assert a[:, n - 1] == pytest.approx(b)


def test_the_sequence_is_wider_than_one_interval_and_tightest_near_the_planned_pairs():
    radius = statistics.sequence_radius(np.array([100, 500, 5000]))
    z = 1.6448536269514722  # one fixed look at 95 % one-sided
    assert (radius > z).all() and radius[1] < radius[0] and radius[1] < radius[2]
    assert statistics.sequence_radius(500, 0.99) > radius[1]
    with pytest.raises(ValueError, match="confidence"):
        statistics.sequence_radius(100, 0.5)


@pytest.mark.parametrize("metric", ["f1", "roc_auc"])
def test_f1_and_roc_auc_bounds_cover_the_truth(metric):
    """Bounds from the influence functions (F1 as a ratio of means, DeLong's placements for ROC AUC):
    their standard error matches a paired bootstrap's, and both bounds hold in 95 % of samples or more."""
    classes = [0, 1]
    population = 200_000
    truth, (cand, champ), (s_c, s_p) = _two_classifiers(population, classes, 11, right=(0.78, 0.75))
    kw = {"classes": classes}
    if metric == "roc_auc":
        kw.update(candidate_scores=s_c, champion_scores=s_p)
    true_change = statistics.paired_comparison(metric, truth, cand, champ, **kw).change
    rng = np.random.default_rng(12)
    n, held, boot = 300, 0, []
    for rep in range(300):
        i = rng.integers(0, population, n)
        sub = {k: (v[i] if k.endswith("scores") else v) for k, v in kw.items()}
        c = statistics.paired_comparison(metric, truth[i], cand[i], champ[i], **sub)
        held += c.lower <= true_change <= c.upper
        boot.append(c.change)
        if rep == 0:
            se = (c.upper - c.change) / float(statistics.sequence_radius(n))
    assert held / 300 >= 0.95
    assert se == pytest.approx(np.std(boot), rel=0.25)
