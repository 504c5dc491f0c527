"""Drift and quality checks on values that are not trusted: one extreme, infinite or ill-typed value
in a window changes no verdict, raises nothing, warns nothing, and is counted in the result.

Drift: a clean 1,000-row window against a reference in both of Evidently's regimes (small: K-S,
chi-square, Z-test; large: Wasserstein, Jensen-Shannon); each case puts extreme values into one
request's rows and checks every column against the clean window (same verdict; same score as the
window without those values, which were set aside), the counts, and Evidently's run on the same
window. Quality: labels of the wrong type stored for a real QualityMonitor (real store, registry,
alerts, trigger), as rows stored by an older version would be.
"""

from __future__ import annotations

import math
import sqlite3
import warnings

import numpy as np
import orjson
import pandas as pd
import pytest

from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC, generate
from driftloop.core.errors import MonitorError
from monitoring.drift import DriftOptions, ReferenceProfile, evidently_report, fast_check
from monitoring.estimate import Calibration, estimate_performance
from monitoring.quality import clean_labelled, compare, quality_metrics, regression_metrics

NUMERIC = [*FEATURES_NUMERIC, "rating"]  # rating: numeric with 4 levels (chi-square / Jensen-Shannon on levels)
CATEGORICAL = [*FEATURES_CATEGORICAL, "churned_before"]  # binary: the Z-test in the small regime
OPTIONS = DriftOptions()  # max_set_aside = 100, monitor.max_rows_per_request's default


def _frame(rows: int, *, seed: int, drift: bool = False) -> pd.DataFrame:
    df = generate(rows=rows, drift_at=0.0 if drift else None, seed=seed)
    rng = np.random.default_rng(seed + 100)
    df["rating"] = rng.choice([1.0, 2.0, 3.0, 4.0], rows, p=[0.4, 0.3, 0.2, 0.1] if drift else [0.1, 0.2, 0.3, 0.4])
    df["churned_before"] = rng.choice(["yes", "no"], rows, p=[0.5, 0.5] if drift else [0.2, 0.8])
    return df.reset_index(drop=True)


@pytest.fixture(scope="module", params=[1000, 3000], ids=["small-reference", "large-reference"])
def regime(request):
    reference = _frame(request.param, seed=41)
    profile = ReferenceProfile.build(reference, NUMERIC, CATEGORICAL)
    window = _frame(1000, seed=42)
    return reference, profile, window, fast_check(profile, window, OPTIONS)


def _strict(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every warning an error (numpy overflow, scipy's divide by zero, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# (id, {column: value}, rows of one request that carry it, {column: the reason it is counted under})
CASES = [
    ("1e300-in-five-numeric", {c: 1e300 for c in FEATURES_NUMERIC}, 1, {c: "out_of_range" for c in FEATURES_NUMERIC}),
    ("minus-1e300", {"tenure": -1e300}, 1, {"tenure": "out_of_range"}),
    ("max-float-everywhere", {c: np.finfo(float).max for c in NUMERIC}, 1, {c: "out_of_range" for c in NUMERIC}),
    ("inf", {"monthly_spend": np.inf}, 1, {"monthly_spend": "infinite"}),
    ("minus-inf", {"sessions": -np.inf, "rating": -np.inf}, 1, {"sessions": "infinite", "rating": "infinite"}),
    ("nan", {"latency_ms": np.nan}, 1, {"latency_ms": "missing"}),
    ("huge-python-int", {"support_calls": 10**30}, 1, {"support_calls": "out_of_range"}),
    ("int64-max", {"tenure": 2**63 - 1, "sessions": -(2**63)}, 1, {"tenure": "out_of_range", "sessions": "out_of_range"}),
    ("string-in-numeric", {"sessions": "banana"}, 1, {"sessions": "not_numeric"}),
    ("dict-in-numeric", {"latency_ms": {"a": [1]}}, 1, {"latency_ms": "not_numeric"}),
    ("new-level-in-few-level-numeric", {"rating": 2.5}, 1, {"rating": "unseen_level"}),
    ("1e300-in-few-level-numeric", {"rating": 1e300}, 1, {"rating": "out_of_range"}),
    ("unseen-category", {"region": "banana"}, 1, {"region": "unseen_level"}),
    ("dict-category", {"plan": {"a": [1]}}, 1, {"plan": "unseen_level"}),
    ("third-level-in-binary", {"churned_before": "maybe"}, 1, {"churned_before": "unseen_level"}),
    ("one-request-of-100-rows-at-1e300", {"tenure": 1e300, "region": "banana"}, 100,
     {"tenure": "out_of_range", "region": "unseen_level"}),
    ("one-request-of-100-rows-mixed", {"monthly_spend": -np.inf, "sessions": 1e308, "plan": 7}, 100,
     {"monthly_spend": "infinite", "sessions": "out_of_range", "plan": "unseen_level"}),
]


def _inject(window: pd.DataFrame, values: dict, rows: int) -> pd.DataFrame:
    bad = window.copy()
    for col, value in values.items():
        bad[col] = bad[col].astype(object)
        for i in range(rows):
            bad.at[i, col] = value
    return bad


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_request_of_extreme_values_changes_no_drift_verdict(regime, case):
    reference, profile, window, clean = regime
    _, values, rows, reasons = case
    bad = _inject(window, values, rows)
    result = _strict(fast_check, profile, bad, OPTIONS)
    # the same window without those values: the scores must be exactly its scores
    without = window.copy()
    for col in values:
        without.loc[: rows - 1, col] = np.nan if col in NUMERIC else None
    expected = fast_check(profile, without, OPTIONS)
    assert [c.column for c in result.columns] == [*NUMERIC, *CATEGORICAL] and result.skipped == {}
    for col in result.columns:
        before, same = clean.column(col.column), expected.column(col.column)
        assert col.drifted == before.drifted, (col.column, col.score, before.score)
        assert col.method == before.method and math.isfinite(col.score)
        assert col.score == pytest.approx(same.score, rel=1e-12, abs=1e-12), col.column
        if rows == 1:  # one row less than the clean window: about the same score
            assert col.score == pytest.approx(before.score, abs=0.05), col.column
    assert result.dataset_drift == clean.dataset_drift and result.share == clean.share
    for col, reason in reasons.items():  # the user sees what was not compared, and why
        counted = result.column(col).set_aside
        assert counted.get(reason, 0) - clean.column(col).set_aside.get(reason, 0) == rows, (col, counted)
    assert result.to_dict()["set_aside"] == result.set_aside
    # Evidently, the judge of record, is given the same cleaned window and says the same
    _, judged = _strict(evidently_report, reference, bad, NUMERIC, CATEGORICAL, OPTIONS)
    for col in result.columns:
        other = judged.column(col.column)
        assert (other.method, other.drifted) == (col.method, col.drifted), col.column
        assert other.score == pytest.approx(col.score, rel=1e-9, abs=1e-12), col.column
        assert other.set_aside == col.set_aside
    assert judged.dataset_drift == result.dataset_drift


def test_clean_windows_are_judged_as_evidently_judges_them_with_nothing_set_aside(regime):
    reference, profile, window, clean = regime
    _, judged = _strict(evidently_report, reference, window, NUMERIC, CATEGORICAL, OPTIONS)
    for col in clean.columns:
        other = judged.column(col.column)
        assert (other.method, other.drifted) == (col.method, col.drifted)
        assert col.score == pytest.approx(other.score, rel=1e-9, abs=1e-12), col.column
    assert set(clean.set_aside) <= {"missing"} and clean.skipped == {}
    drifted = _frame(1000, seed=43, drift=True)
    moved = fast_check(profile, drifted, OPTIONS)
    assert moved.dataset_drift
    # a real drift stays a drift with an extreme request in the window
    assert _strict(fast_check, profile, _inject(drifted, {"tenure": 1e300}, 1), OPTIONS).dataset_drift


def test_more_extreme_rows_than_a_request_are_kept_clipped_and_the_statistics_stay_finite(regime):
    """Beyond one request's rows, values far outside the reference are a change of the data, not one
    sender's: they stay (and drift), clipped so that no sum overflows."""
    reference, profile, window, _ = regime
    bad = _inject(window, {"tenure": 1e300, "sessions": -np.finfo(float).max}, 300)
    result = _strict(fast_check, profile, bad, OPTIONS)
    for col in ("tenure", "sessions"):
        assert result.column(col).drifted and math.isfinite(result.column(col).score)
        assert result.column(col).set_aside["clipped"] == 300
    _, judged = _strict(evidently_report, reference, bad, NUMERIC, CATEGORICAL, OPTIONS)
    assert judged.column("tenure").drifted and judged.column("sessions").drifted


@pytest.mark.parametrize("senders", [1, 5], ids=["one-request", "five-requests"])
def test_only_what_one_request_sends_is_set_aside(regime, senders):
    """With request ids in the window (as the monitor's windows have), values the reference never had
    are set aside only when one request sent them all; the same values from several are the data."""
    _, profile, window, clean = regime
    rows = window.assign(request_id=[f"req-{i // 100}" for i in range(len(window))])
    bad = rows.copy()
    picked = [100 * k + j for k in range(senders) for j in range(50 // senders)]
    bad["tenure"] = bad["tenure"].astype(object)
    bad.loc[picked, "region"] = "banana"
    bad.loc[picked, "tenure"] = 1e300
    result = _strict(fast_check, profile, bad, OPTIONS)
    region, tenure = result.column("region"), result.column("tenure")
    if senders == 1:
        assert region.set_aside.get("unseen_level") == 50 and tenure.set_aside.get("out_of_range") == 50
        assert result.dataset_drift == clean.dataset_drift
    else:
        assert "unseen_level" not in region.set_aside and tenure.set_aside.get("clipped") == 50
        assert region.n_current == clean.column("region").n_current  # compared, not set aside
        assert tenure.n_current == clean.column("tenure").n_current and math.isfinite(tenure.score)


@pytest.mark.parametrize("window", [
    pd.DataFrame({c: pd.Series([], dtype=float) for c in NUMERIC} | {c: pd.Series([], dtype=object) for c in CATEGORICAL}),
    pd.DataFrame({c: [np.nan] * 50 for c in NUMERIC} | {c: [None] * 50 for c in CATEGORICAL}),
], ids=["empty-window", "all-missing"])
def test_a_window_with_nothing_to_compare_skips_every_column_without_raising(regime, window):
    reference, profile, _, _ = regime
    result = _strict(fast_check, profile, window, OPTIONS)
    assert result.columns == [] and not result.dataset_drift and result.share == 0.0
    assert set(result.skipped) == {*NUMERIC, *CATEGORICAL}
    assert result.skipped["tenure"].startswith("no values to compare in the current window")
    with pytest.raises(MonitorError, match="no column has values to compare"):
        evidently_report(reference, window, NUMERIC, CATEGORICAL, OPTIONS)


def test_a_constant_column_and_a_single_level_are_judged_without_warnings(regime):
    reference, profile, window, clean = regime
    flat = window.assign(rating=3.0, churned_before="no", region="north")
    result = _strict(fast_check, profile, flat, OPTIONS)
    assert all(math.isfinite(c.score) for c in result.columns)
    assert result.column("rating").drifted and result.column("churned_before").drifted  # one value is a change
    assert result.column("tenure").score == clean.column("tenure").score


# -- quality ------------------------------------------------------------------------------------
def _store_label(store, request_id: str, row: int, label) -> None:
    """A label as a version that checked nothing stored it."""
    db = sqlite3.connect(store.path)
    with db:
        db.execute("INSERT OR REPLACE INTO labels (request_id, row_index, label, ts) VALUES (?, ?, ?, ?)",
                   (request_id, row, orjson.dumps(label), 1000.0))
    db.close()


@pytest.fixture
def quality(tmp_path):
    from tests.test_quality_paths import _Quality

    made = []

    def make(task):
        holdout = {"metrics": {"accuracy": 0.9, "f1": 0.9}, "classes": [0, 1]} if task == "classification" else \
            {"task": "regression", "metrics": {"rmse": 1.0, "mae": 0.8, "r2": 0.5, "mean_error": 0.0}}
        made.append(_Quality(tmp_path, holdout, **{"model.task": task, "monitor.quality.window_rows": 100,
                                                   "monitor.quality.min_labels": 50}))
        return made[-1]

    yield make
    for q in made:
        q.close()


def _log_window(q, task: str) -> tuple[list, list]:
    """100 labelled rows in ten requests (``req-1`` ... ``req-10``) that meet the holdout rules."""
    rng = np.random.default_rng(7)
    if task == "classification":
        truth = rng.integers(0, 2, 100).tolist()
        preds = [1 - t if i % 20 == 0 else t for i, t in enumerate(truth)]  # 95 % right
    else:
        truth = np.round(rng.normal(10, 3, 100), 3).tolist()
        preds = (np.array(truth) + rng.normal(0, 0.5, 100)).tolist()
    for i in range(0, 100, 10):
        q.log(1000.0 + i, preds[i:i + 10], labels=truth[i:i + 10])
    return truth, preds


# (id, task, the stored label of row 0, the reason it is skipped for, or None when it is coerced)
LABEL_CASES = [
    ("class-banana", "classification", "banana", "label not a class"),
    ("class-dict", "classification", {"a": [1]}, "label not a class"),
    ("class-2.5", "classification", 2.5, "label not a class"),
    ("class-int-literal-string", "classification", "1", None),
    ("class-float-literal-string", "classification", "1.0", "label not a class"),
    ("class-bool", "classification", True, "label not a class"),
    ("class-null", "classification", None, "label not a class"),
    ("class-unknown", "classification", 7, "label not one of the model's classes"),
    ("class-one-element-list", "classification", [1], None),
    ("regression-1e300", "regression", 1e300, "label beyond ±1e+100"),
    ("regression-minus-1e300", "regression", -1e300, "label beyond ±1e+100"),
    ("regression-banana", "regression", "banana", "label not a number"),
    ("regression-dict", "regression", {"a": [1]}, "label not a number"),
    ("regression-bool", "regression", False, "label not a number"),
    ("regression-numeric-string", "regression", "12.5", None),
]


@pytest.mark.parametrize("case", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_labels_are_coerced_to_the_task_or_skipped_with_their_reason(case):
    _, task, label, reason = case
    rng = np.random.default_rng(3)
    if task == "classification":
        truth, preds = rng.integers(0, 2, 50).tolist(), rng.integers(0, 2, 50).tolist()
    else:
        truth, preds = rng.normal(10, 3, 50).tolist(), rng.normal(10, 3, 50).tolist()
    rows = pd.DataFrame({"label": pd.Series([label, *truth[1:]], dtype=object), "prediction": preds})
    kept, skipped = _strict(clean_labelled, task, rows, [0, 1] if task == "classification" else None)
    live = _strict(quality_metrics, task, kept["label"], kept["prediction"], None, [0, 1])
    if reason is None:
        coerced = label[0] if isinstance(label, list) else {"1": 1, "12.5": 12.5}.get(label, label)
        assert skipped == {} and kept["label"].tolist() == [coerced, *truth[1:]]
        assert live == pytest.approx(quality_metrics(task, [coerced, *truth[1:]], preds, None, [0, 1]), rel=1e-12)
    else:
        assert skipped == {reason: 1} and kept["label"].tolist() == truth[1:]
        assert live == pytest.approx(quality_metrics(task, truth[1:], preds[1:], None, [0, 1]), rel=1e-12)
    assert all(math.isfinite(v) for v in live.values())


@pytest.mark.parametrize("case", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_a_stored_label_of_the_wrong_type_changes_no_quality_verdict(quality, case):
    """The monitor's check (real store, registry, alerts, trigger) on a window where one stored label is
    of the wrong type: the verdict stays, the row is counted when it is left out, nothing raises or warns."""
    _, task, label, reason = case
    q = quality(task)
    truth, preds = _log_window(q, task)
    _store_label(q.store, "req-1", 0, label)
    out = _strict(q.monitor.check, now=2000.0)["versions"]["1"]
    assert out["verdict"] == "ok", out
    assert "alert" not in out and q.runner.requests == [] and q.alerts_counted("quality") == 0
    assert out["labelled_rows"] == 100  # nothing stored is lost
    skipped = sum(out.get("skipped", {}).values())
    assert out["window"]["rows"] + skipped == 100 and out["window"]["skipped"] == skipped
    assert skipped == 1 if reason else skipped in (0, 1)  # coerced where it can be (or left out by the reader)
    if skipped:
        expected = quality_metrics(task, truth[1:], preds[1:], None, [0, 1])
        assert out["live"] == pytest.approx(expected, rel=1e-12)
    assert all(math.isfinite(v) for v in out["live"].values())
    again = q.monitor.check(now=2001.0)["versions"]["1"]  # and the check keeps working
    assert again["verdict"] == "ok" and again["live"] == out["live"]


def test_a_window_of_unusable_labels_is_insufficient_not_an_error(quality):
    q = quality("classification")
    _log_window(q, "classification")
    for i in range(1, 8):  # 70 of the 100 labels cannot be read as a class
        for j in range(10):
            _store_label(q.store, f"req-{i}", j, "banana")
    out = _strict(q.monitor.check, now=2000.0)["versions"]["1"]
    assert out["verdict"] == "insufficient labels" and sum(out["skipped"].values()) == 70
    assert out["reason"].startswith("30 ") and "alert" not in out and q.runner.requests == []


def test_metrics_that_are_not_finite_judge_nothing():
    """An overflow that reached a metric (values not cleaned) is no verdict, let alone an alert."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        live = regression_metrics([1e300, 1.0, 2.0], [1.0, 1.0, 2.0])
    assert math.isinf(live["rmse"])
    rules = type("Rules", (), {"max_relative": {"rmse": 0.25, "mae": 0.25}, "max_absolute": {"r2": 0.1}})()
    verdicts = compare(live, {"rmse": 1.0, "mae": 0.8, "r2": 0.5}, rules)
    assert [v.metric for v in verdicts] == ["mae"]  # finite: judged; inf rmse and NaN r2: not
    assert compare({"rmse": 1.0}, {"rmse": float("inf")}, rules) == []


def test_clean_labelled_coerces_rows_and_counts_scores_that_are_not_finite():
    rows = pd.DataFrame({"label": [0, "1", 1, 0], "prediction": [[0], 1, 1, "x"],
                         "scores": [[0.9, 0.1], [0.2, 0.8], [float("nan"), 1.0], [0.5, 0.5]]})
    kept, skipped = clean_labelled("classification", rows, [0, 1])
    assert kept["label"].tolist() == [0, 1] and kept["prediction"].tolist() == [0, 1]
    assert skipped == {"scores not finite": 1, "prediction not a class": 1}
    assert clean_labelled("classification", rows.iloc[:0], [0, 1])[1] == {}
    # without recorded classes the model's answers give the type: ints here
    assert clean_labelled("classification", rows.iloc[:2], None)[0]["label"].tolist() == [0, 1]


def test_the_estimate_leaves_out_rows_whose_scores_are_not_finite():
    cal = Calibration([0, 1], True, [(np.array([0.0, 1.0]), np.array([0.0, 1.0]))])
    clean = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    dirty = np.vstack([clean, [[np.nan, 0.5], [np.inf, -np.inf]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = estimate_performance(dirty, cal)
    assert est.rows == 3 and est.accuracy == pytest.approx(estimate_performance(clean, cal).accuracy)
    with pytest.raises(MonitorError, match="no scored rows"):
        estimate_performance(np.array([[np.nan, np.nan]]), cal)
