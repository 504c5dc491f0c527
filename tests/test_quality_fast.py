"""The vectorised classification metrics (arrays in, class codes and counts inside) give exactly the
values of the general path (``core.statistics``, scikit-learn) and Evidently's: ties, single-class
windows, integer, float, string and object labels, two classes and more, classes in any order."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from monitoring import quality as q
from monitoring.quality import classification_metrics, evidently_quality, quality_metrics

# the general path warns where scikit-learn finds a metric undefined (one class in the truth); the
# values compared are what it answers
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")


def _general(y, p, scores, classes):
    """The general path: lists are always read value by value (``_as_class`` + ``core.statistics``)."""
    return classification_metrics(list(y), list(p), scores, classes)


def _same(fast: dict, slow: dict) -> None:
    assert fast.keys() == slow.keys()
    for key, value in slow.items():
        if math.isnan(value):
            assert math.isnan(fast[key]), key
        else:
            assert fast[key] == value, (key, fast[key], value)  # the same float, not merely close


def _scores(rng, truth, n, k, *, decimals=None):
    raw = rng.random((n, k))
    raw[np.arange(n), truth] += rng.random() * 1.5
    out = raw / raw.sum(axis=1, keepdims=True)
    if decimals is not None:  # ties: many rows share a score
        out = np.round(out, decimals)
        if k == 2:
            out[:, 0] = 1.0 - out[:, 1]
    return out


def _case(rng, n, k, *, decimals=None, skew=1.0):
    p_class = rng.dirichlet(np.full(k, skew))
    truth = rng.choice(k, n, p=p_class)
    scores = _scores(rng, truth, n, k, decimals=decimals)
    flip = rng.random(n) < rng.uniform(0.0, 0.4)
    preds = np.where(flip, rng.integers(0, k, n), scores.argmax(axis=1))
    return truth, preds, scores


@pytest.mark.parametrize("seed", range(40))
def test_codes_give_the_general_paths_values_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    k = [2, 2, 2, 3, 4, 5][seed % 6]
    n = int(rng.choice([1, 2, 3, 7, 50, 333, 4000]))
    truth, preds, scores = _case(rng, n, k, decimals=[None, 1, 2, 3][seed % 4], skew=[0.2, 1.0, 5.0][seed % 3])
    labels = [[0, 1, 2, 3, 4], [3, 7, 11, 20, 40], [1, 0, 2, 4, 3], [-5, 100_000, 7, 8, 9]][seed % 4][:k]
    if k > 2 and seed % 4 == 2:
        labels = sorted(labels)  # multiclass ROC AUC needs ordered classes; unordered ones are tested below
    classes = list(labels)
    y, p = np.asarray(labels)[truth], np.asarray(labels)[preds]
    assert q._encoded_metrics(y, p, scores, classes) is not None  # the vectorised reading was taken
    _same(classification_metrics(y, p, scores, classes), _general(y, p, scores, classes))
    _same(classification_metrics(y, p, None, classes), _general(y, p, None, classes))


@pytest.mark.parametrize("form", ["object ints", "int32", "floats", "series", "strings", "unicode", "no classes"])
def test_every_array_form_reads_as_the_general_path_does(form):
    rng = np.random.default_rng(7)
    truth, preds, scores = _case(rng, 3000, 3, decimals=2)
    classes = [0, 1, 2]
    y, p = truth, preds
    if form == "object ints":  # what clean_labelled hands over: Python ints in object columns
        y, p = np.array(truth.tolist(), dtype=object), np.array(preds.tolist(), dtype=object)
    elif form == "int32":
        y, p = truth.astype(np.int32), preds.astype(np.int32)
    elif form == "floats":
        y, p = truth.astype(float), preds.astype(float)
    elif form == "series":
        y, p = pd.Series(truth.tolist(), dtype=object), pd.Series(preds.tolist(), dtype=object)
    elif form in ("strings", "unicode", "no classes"):
        names = np.array(["cat", "dog", "eel"], dtype=object if form != "unicode" else str)
        y, p = names[truth], names[preds]
        classes = None if form == "no classes" else ["cat", "dog", "eel"]
    assert q._encoded_metrics(y, p, scores, classes) is not None
    _same(classification_metrics(y, p, scores, classes), _general(y, p, scores, classes))


def test_single_class_windows_and_absent_classes():
    rng = np.random.default_rng(3)
    n = 500
    for k, truth_value in ((2, 0), (2, 1), (3, 2)):
        y = np.full(n, truth_value)
        p = rng.integers(0, k, n)
        scores = _scores(rng, p, n, k)
        fast = classification_metrics(y, p, scores, list(range(k)))
        assert "roc_auc" not in fast  # one class in the truth: no ROC AUC
        _same(fast, _general(y, p, scores, list(range(k))))
    # nothing predicted or true of the positive class: F1 0 (zero_division=0)
    y = p = np.zeros(n, dtype=int)
    _same(classification_metrics(y, p, None, [0, 1]), _general(y, p, None, [0, 1]))
    assert classification_metrics(y, p, None, [0, 1])["f1"] == 0.0
    # three classes, one missing from the truth: scikit-learn's one-vs-rest AUC is NaN
    truth = rng.integers(0, 2, n)
    scores = _scores(rng, truth, n, 3)
    fast = classification_metrics(truth, truth, scores, [0, 1, 2])
    assert math.isnan(fast["roc_auc"])
    _same(fast, _general(truth, truth, scores, [0, 1, 2]))


def test_what_scikit_learn_refuses_is_refused_the_same_way():
    rng = np.random.default_rng(4)
    truth, preds, scores = _case(rng, 800, 3)
    names = np.array(["b", "a", "c"], dtype=object)  # unordered classes: no multiclass ROC AUC
    fast = classification_metrics(names[truth], names[preds], scores, ["b", "a", "c"])
    assert "roc_auc" not in fast
    _same(fast, _general(names[truth], names[preds], scores, ["b", "a", "c"]))
    loose = scores * 1.5  # scores that are no probabilities: no multiclass ROC AUC
    _same(classification_metrics(truth, preds, loose, [0, 1, 2]), _general(truth, preds, loose, [0, 1, 2]))
    assert "roc_auc" not in classification_metrics(truth, preds, loose, [0, 1, 2])


@pytest.mark.parametrize("case", ["unknown label", "fraction", "nan score", "float32 scores", "list values",
                                  "bools", "ints without classes"])
def test_anything_else_takes_the_general_path(case):
    rng = np.random.default_rng(5)
    truth, preds, scores = _case(rng, 300, 2)
    y, p, classes = truth, preds, [0, 1]
    if case == "unknown label":
        y = truth.copy()
        y[3] = 5
    elif case == "fraction":
        y = truth + 0.5
        classes = [0.5, 1.5]
    elif case == "nan score":
        scores = scores.copy()
        scores[0, 1] = np.nan
    elif case == "float32 scores":
        scores = scores.astype(np.float32)
    elif case == "list values":
        p = np.empty(300, dtype=object)
        p[:] = [[int(v)] for v in preds]
    elif case == "bools":
        y, p, classes = truth.astype(bool), preds.astype(bool), [False, True]
    elif case == "ints without classes":
        classes = None
    assert q._encoded_metrics(y, p, scores, classes) is None
    try:
        expected = _general(y, p, scores, classes)
    except ValueError as exc:
        with pytest.raises(type(exc)):
            classification_metrics(y, p, scores, classes)
    else:
        _same(classification_metrics(y, p, scores, classes), expected)


def test_binary_auc_is_scikit_learns_on_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(6)
    for n in (2, 5, 40, 1000, 20_000):
        y = rng.integers(0, 2, n).astype(bool)
        y[:2] = [True, False]
        s = np.round(rng.random(n) * 0.5 + 0.3 * y, int(rng.integers(0, 4)))
        s[rng.random(n) < 0.1] = -0.0  # -0.0 and 0.0 tie
        s[rng.random(n) < 0.1] = 0.0
        assert q._binary_auc(y, s) == roc_auc_score(y, s)


def test_vectorised_path_gives_evidentlys_values():
    """Arrays (the vectorised path) against ClassificationPreset: binary with tied scores, and three
    string classes."""
    rng = np.random.default_rng(8)
    truth, _, scores = _case(rng, 3000, 2, decimals=2)
    scores[scores[:, 1] == 0.5] = [0.51, 0.49]
    preds = scores.argmax(axis=1)  # Evidently reads the predicted label off the scores: the model's own
    fast = quality_metrics("classification", truth, preds, scores, [0, 1])
    _, judged = evidently_quality("classification", truth, preds, scores, [0, 1])
    assert set(judged) == {"accuracy", "f1", "roc_auc"}
    for key, value in judged.items():
        assert fast[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    names = np.array(["a", "b", "c"], dtype=object)
    palette = rng.dirichlet([1, 1, 1], 40)  # 40 score rows, each shared by many rows: ties in every column
    scores = palette[rng.integers(0, 40, 3000)]
    preds = scores.argmax(axis=1)
    truth = np.where(rng.random(3000) < 0.6, preds, rng.integers(0, 3, 3000))
    fast = quality_metrics("classification", names[truth], names[preds], scores, ["a", "b", "c"])
    _, judged = evidently_quality("classification", names[truth], names[preds], scores, ["a", "b", "c"])
    assert set(judged) == {"accuracy", "f1", "roc_auc"}
    for key, value in judged.items():
        assert fast[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_regression_arrays_read_as_the_general_path_does():
    rng = np.random.default_rng(9)
    y = rng.normal(100, 10, 2000)
    pred = 0.9 * y + rng.normal(4, 6, 2000)
    expected = quality_metrics("regression", list(y), list(pred))
    for form in (lambda a: a, lambda a: pd.Series(a), lambda a: np.array(a.tolist(), dtype=object)):
        assert quality_metrics("regression", form(y), form(pred)) == expected
    ints = rng.integers(0, 50, 2000)
    assert quality_metrics("regression", ints, pred) == quality_metrics("regression", list(ints), list(pred))
