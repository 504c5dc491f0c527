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
    bad = ref.assign(sessions="many")
    with pytest.raises(MonitorError, match="'sessions' must be numeric"):
        fast_check(profile, bad, DriftOptions())
    with pytest.raises(MonitorError, match="'plan' has no values"):
        fast_check(profile, ref.assign(plan=None), DriftOptions())


def test_prepare_frame_keeps_missing_values_missing():
    df = pd.DataFrame({"x": [1, None, 3], "c": ["a", None, 2]})
    out = prepare_frame(df, ["x"], ["c"])
    assert out["x"].dtype == np.float64 and np.isnan(out["x"][1])
    assert out["c"].tolist() == ["a", None, "2"]
