"""Drift check: the fast path agrees with Evidently (both reference regimes), drift is flagged, bad input refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from driftloop.core.errors import MonitorError
from driftloop.app.scenario import FEATURES_CATEGORICAL, FEATURES_NUMERIC, generate
from monitoring.drift import DriftOptions, ReferenceProfile, evidently_report, fast_check, prepare_frame

NUMERIC = [*FEATURES_NUMERIC, "rating"]  # rating: a numeric column with 4 levels
CATEGORICAL = [*FEATURES_CATEGORICAL, "churned_before"]  # binary → Z-test in the small regime


def _frame(rows: int, *, drift: bool, seed: int) -> pd.DataFrame:
    df = generate(rows=rows, drift_at=0.0 if drift else None, seed=seed)
    rng = np.random.default_rng(seed + 100)
    p_rating = [0.1, 0.2, 0.3, 0.4] if not drift else [0.4, 0.3, 0.2, 0.1]
    df["rating"] = rng.choice([1.0, 2.0, 3.0, 4.0], rows, p=p_rating)
    df["churned_before"] = rng.choice(["yes", "no"], rows, p=[0.2, 0.8] if not drift else [0.5, 0.5])
    return df


def _compare(ref: pd.DataFrame, cur: pd.DataFrame, options: DriftOptions | None = None):
    options = options or DriftOptions()
    fast = fast_check(ReferenceProfile.build(ref, NUMERIC, CATEGORICAL), cur, options)
    _, judge = evidently_report(ref, cur, NUMERIC, CATEGORICAL, options)
    assert [c.column for c in fast.columns] == [c.column for c in judge.columns] or \
        sorted(c.column for c in fast.columns) == sorted(c.column for c in judge.columns)
    for col in fast.columns:
        other = judge.column(col.column)
        assert col.method == other.method, col.column
        assert col.threshold == pytest.approx(other.threshold)
        assert col.score == pytest.approx(other.score, rel=1e-9, abs=1e-12), col.column
        assert col.drifted == other.drifted, col.column
    assert fast.drifted_columns == [c.column for c in fast.columns if judge.column(c.column).drifted]
    assert fast.dataset_drift == judge.dataset_drift
    return fast, judge


@pytest.mark.parametrize("drift", [False, True], ids=["no-drift", "drift"])
def test_small_reference_regime_matches_evidently(drift):
    ref, cur = _frame(1000, drift=False, seed=11), _frame(400, drift=drift, seed=12)
    fast, _ = _compare(ref, cur)
    methods = {c.column: c.method for c in fast.columns}
    assert methods["tenure"] == "ks" and methods["rating"] == "chisquare"
    assert methods["region"] == "chisquare" and methods["churned_before"] == "z"
    expected = {"tenure", "monthly_spend", "sessions", "region", "rating", "churned_before"} if drift else set()
    assert set(fast.drifted_columns) == expected
    assert fast.dataset_drift is drift


@pytest.mark.parametrize("drift", [False, True], ids=["no-drift", "drift"])
def test_large_reference_regime_matches_evidently(drift):
    ref, cur = _frame(3000, drift=False, seed=21), _frame(2500, drift=drift, seed=22)
    fast, _ = _compare(ref, cur)
    methods = {c.column: c.method for c in fast.columns}
    assert methods["tenure"] == "wasserstein" and methods["rating"] == "jensenshannon"
    assert methods["region"] == "jensenshannon" and methods["churned_before"] == "jensenshannon"
    expected = {"tenure", "monthly_spend", "sessions", "region", "rating", "churned_before"} if drift else set()
    assert set(fast.drifted_columns) == expected


def test_configured_methods_and_thresholds_match_evidently():
    ref, cur = _frame(3000, drift=False, seed=31), _frame(2000, drift=True, seed=32)
    options = DriftOptions(drift_share=0.9, num_method="ks", cat_threshold=0.5,
                           per_column_method={"latency_ms": "psi", "plan": "chisquare"},
                           per_column_threshold={"tenure": 1e-300})
    fast, judge = _compare(ref, cur, options)
    assert fast.column("latency_ms").method == "psi"  # no fast path: Evidently's own implementation
    assert fast.column("sessions").method == "ks" and fast.column("plan").method == "chisquare"
    assert fast.column("region").threshold == 0.5 and not fast.column("region").drifted
    assert fast.column("tenure").threshold == 1e-300
    assert judge.dataset_drift is False  # 0.9 of the columns are needed


def test_mismatched_columns_are_refused_by_name():
    ref = _frame(500, drift=False, seed=1)
    profile = ReferenceProfile.build(ref, NUMERIC, CATEGORICAL)
    with pytest.raises(MonitorError, match=r"lacks the reference columns \['tenure'\]"):
        fast_check(profile, ref.drop(columns=["tenure"]), DriftOptions())
    # a column with nothing to compare is skipped with its reason; the others are still judged
    result = fast_check(profile, ref.assign(sessions="many"), DriftOptions())
    assert result.skipped == {"sessions": "no values to compare in the current window (500 not numeric)"}
    assert "sessions" not in [c.column for c in result.columns] and len(result.columns) == len(NUMERIC + CATEGORICAL) - 1
    result = fast_check(profile, ref.assign(plan=None), DriftOptions())
    assert result.skipped == {"plan": "no values to compare in the current window (500 missing)"}
    assert result.skipped_set_aside == {"plan": {"missing": 500}} and not result.dataset_drift


def test_prepare_frame_keeps_missing_values_missing():
    df = pd.DataFrame({"x": [1, None, 3], "c": ["a", None, 2]})
    out = prepare_frame(df, ["x"], ["c"])
    assert out["x"].dtype == np.float64 and np.isnan(out["x"][1])
    assert out["c"].tolist() == ["a", None, "2"]


def _grid_cases():
    rng = np.random.default_rng(5)
    ref = rng.normal(10, 2, 3000)
    yield "shifted", ref, rng.normal(10.6, 2.2, 200_000)
    yield "same", ref, rng.normal(10, 2, 150_000)
    # ties: a rounded reference and a window that repeats reference values and grid edges exactly
    tied = np.round(rng.normal(0, 1, 4000), 2)
    window = np.concatenate((rng.choice(tied, 100_000), np.round(rng.normal(0.1, 1, 100_000), 3)))
    yield "ties", tied, window
    # a window reaching far beyond the reference on both sides, and a heavy right tail
    yield "tails", rng.lognormal(0, 1, 2000), np.concatenate((rng.lognormal(0.2, 1.5, 100_000), [-50.0, 1e6]))
    # NaN and infinite gaps in the window: only finite values count
    gappy = rng.normal(3, 1, 120_000)
    gappy[rng.random(gappy.size) < 0.1] = np.nan
    gappy[:7] = np.inf
    yield "nan-gaps", rng.normal(3, 1, 2500), gappy


@pytest.mark.parametrize("case", list(_grid_cases()), ids=lambda c: c[0])
def test_grid_wasserstein_equals_the_sorted_computation_and_scipy(case):
    """The large-window path (window binned on the reference's grid, never sorted whole) gives the
    same distance as merging the sorted samples and as scipy, to ~1e-9, ties and NaN gaps included."""
    from scipy.stats import wasserstein_distance

    from monitoring.drift import _ColumnProfile, _numeric_values, _wasserstein, _wasserstein_sorted

    _, ref, window = case
    profile = ReferenceProfile.build(pd.DataFrame({"x": ref}), ["x"], [])
    prof: _ColumnProfile = profile.columns["x"]
    cur = _numeric_values(pd.Series(window), "x")
    assert len(prof.grids) == 2 and cur.size > prof.grids[0].cells  # the fine grid is the one taken
    old = _wasserstein_sorted(prof.sorted_values, np.sort(cur))
    finite = window[np.isfinite(window)]
    assert old == pytest.approx(wasserstein_distance(ref, finite), rel=1e-9, abs=1e-12)
    assert _wasserstein(prof, cur) == pytest.approx(old, rel=1e-9, abs=1e-12)
    for grid in prof.grids:  # and the coarse one, which windows of ~100k rows take
        assert grid.wasserstein(prof.sorted_values, cur) == pytest.approx(old, rel=1e-9, abs=1e-12)


def test_large_window_check_matches_evidently_score():
    """Through fast_check on a window large enough for the grid path: Evidently's own score and verdict."""
    rng = np.random.default_rng(9)
    ref = pd.DataFrame({"a": rng.normal(0, 1, 2000), "b": np.round(rng.gamma(2, 2, 2000), 1)})
    cur = pd.DataFrame({"a": rng.normal(0.15, 1, 150_000), "b": np.round(rng.gamma(2, 2.2, 150_000), 1)})
    cur.loc[::13, "a"] = np.nan
    profile = ReferenceProfile.build(ref, ["a", "b"], [])
    assert all(cur[c].notna().sum() > profile.columns[c].grids[0].cells for c in "ab")
    fast = fast_check(profile, cur, DriftOptions())
    _, judge = evidently_report(ref, cur, ["a", "b"], [], DriftOptions())
    for col in fast.columns:
        assert col.method == "wasserstein"
        assert col.score == pytest.approx(judge.column(col.column).score, rel=1e-9, abs=1e-12)
        assert col.drifted == judge.column(col.column).drifted
    assert fast.column("a").drifted and fast.column("b").drifted


def test_a_constant_column_leaves_no_numpy_warning_in_the_monitors_log():
    """A constant column (the hotels table's `company` in a window) made Evidently's correlations divide by zero,
    and numpy's RuntimeWarning went into the monitor's log at every report; the verdict is unaffected."""
    import warnings

    rng = np.random.default_rng(3)
    ref = pd.DataFrame({"a": rng.normal(0, 1, 500), "flat": np.full(500, 7.0)})
    cur = pd.DataFrame({"a": rng.normal(0, 1, 400), "flat": np.full(400, 7.0)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, judge = evidently_report(ref, cur, ["a", "flat"], [], DriftOptions())
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert not judge.column("flat").drifted
