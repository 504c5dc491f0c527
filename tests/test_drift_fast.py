"""The drift check's fast path, part by part: object columns counted by object, the reference grids
built by counting, windows integrated piece by piece between reference values — each against the
plain computation it replaces, and the whole check against Evidently on large windows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitoring import drift as D
from monitoring.drift import DriftOptions, ReferenceProfile, evidently_report, fast_check


def _plain_counts(values: np.ndarray) -> dict[str, int]:
    """What each value becomes for Evidently (``str(value)``), counted, missing values left out."""
    s = pd.Series(values)
    return s[s.notna()].astype(str).value_counts().to_dict()


def _objects_cases():
    rng = np.random.default_rng(1)
    levels = np.array(["a", "b", "c", "d", "e"], dtype=object)
    shared = levels[rng.choice(5, 50_000, p=[0.5, 0.2, 0.2, 0.05, 0.05])]
    yield "shared", shared
    gappy = shared.copy()
    gappy[rng.random(gappy.size) < 0.1] = None
    gappy[rng.random(gappy.size) < 0.05] = np.nan
    yield "missing", gappy
    rare = shared.copy()
    rare[12_345] = "z"  # one object the sample does not see
    rare[40_001] = "a" + ""  # the same text as others in another object: still one level
    yield "rare", rare
    yield "fresh", np.array(["".join(["x", str(i % 7)]) for i in range(20_000)], dtype=object)  # one object per row
    many = np.array([f"level-{i}" for i in range(40)], dtype=object)
    yield "many", many[rng.integers(0, 40, 30_000)]
    mixed = np.array([1, 1.0, True, "1", None], dtype=object)[rng.integers(0, 5, 20_000)]
    yield "mixed", mixed  # equal to Python, four texts to Evidently
    yield "strided", np.repeat(shared, 2)[::2]


@pytest.mark.parametrize("case", list(_objects_cases()), ids=lambda c: c[0])
def test_object_columns_counted_by_object_as_by_value(case):
    _, values = case
    assert D._category_counts(pd.Series(values)) == _plain_counts(values)


def test_counting_by_object_is_taken_only_where_few_objects_are():
    rng = np.random.default_rng(2)
    shared = np.array(["p", "q"], dtype=object)[rng.integers(0, 2, 10_000)]
    assert D._counts_by_identity(shared) == _plain_counts(shared)
    fresh = np.array([f"v{i}" for i in range(10_000)], dtype=object)
    assert D._counts_by_identity(fresh) is None  # strings made row by row: counted by value instead


def _old_grid(ref: np.ndarray, distinct: int, per_value: int):
    """The grid as it was built before (a search per cell edge): k, clean and fixed."""
    layout = D._Grid.layout(ref, distinct, per_value)
    h, off, cells = layout
    edges = (off + np.arange(cells + 1, dtype=np.float64)) * h
    right = ref.searchsorted(edges, "right")
    k = np.concatenate(([0], right[:-1], [ref.size])).astype(np.int64)
    inside = ref.searchsorted(edges[1:], "left") > right[:-1]
    clean = np.concatenate(([True], ~inside, [True]))
    grid = D._Grid.build(ref, distinct, per_value)
    ref_bins = grid.bins(ref)[0]
    dirty = np.flatnonzero(inside)
    fixed = np.sort(np.concatenate((ref[~clean[ref_bins]], edges[dirty], edges[dirty + 1])))
    return k, clean, fixed


def _references():
    rng = np.random.default_rng(3)
    yield "normal", np.sort(rng.normal(10, 2, 5000))
    yield "on edges", np.sort(np.round(rng.normal(0, 1, 4000) * 64) / 64)  # many values exactly on cell edges
    clusters = np.concatenate([c + rng.random(30) * 1e-6 for c in rng.normal(0, 5, 100)])
    yield "clusters", np.sort(clusters)  # several distinct values in one cell
    yield "negative", np.sort(-rng.lognormal(0, 1, 3000))


@pytest.mark.parametrize("case", list(_references()), ids=lambda c: c[0])
def test_grids_built_by_counting_equal_the_searched_ones(case):
    _, ref = case
    distinct = np.unique(ref).size
    for per_value in D._CELLS_PER_REFERENCE_VALUE:
        grid = D._Grid.build(ref, distinct, per_value)
        k, clean, fixed = _old_grid(ref, distinct, per_value)
        assert np.array_equal(grid.k, k) and np.array_equal(grid.clean, clean) and np.array_equal(grid.fixed, fixed)


def _windows(ref: np.ndarray):
    rng = np.random.default_rng(4)
    scale = ref.std()
    yield rng.choice(ref, 300_000) + rng.normal(0, scale * 0.05, 300_000)  # close: the CDFs cross often
    yield rng.choice(ref, 200_000)  # the reference's own values, ties on every one
    yield ref.mean() + (rng.choice(ref, 250_000) - ref.mean()) * 1.3 + scale * 0.2  # wider, shifted: long tails


@pytest.mark.parametrize("case", list(_references()), ids=lambda c: c[0])
def test_pieces_between_reference_values_give_the_merged_sort(case):
    """The large-window path against merging the two sorted samples, on references with values on
    cell edges and several values per cell, windows crossing the reference, repeating its values
    and reaching past it (both grids; the least value given or not)."""
    _, ref = case
    profile = ReferenceProfile.build(pd.DataFrame({"x": ref}), ["x"], [])
    prof = profile.columns["x"]
    for cur in _windows(ref):
        expected = D._wasserstein_sorted(prof.sorted_values, np.sort(cur))
        for grid in prof.grids:  # either grid gives the distance, whatever the window's size
            for low in (None, float(cur.min())):
                assert grid.wasserstein(prof.sorted_values, cur, low) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_numeric_levels_counted_without_sorting_the_window():
    levels = np.array([1.0, 2.0, 3.0, 4.0])
    rng = np.random.default_rng(5)
    window = rng.choice(levels, 10_000)
    window[:3] = [7.5, 7.5, -0.0]
    expected = dict(zip(*[a.tolist() for a in np.unique(window, return_counts=True)]))
    assert D._levels_of(window, levels) == expected
    assert list(D._levels_of(window, levels)) == sorted(expected)
    assert D._levels_of(np.arange(30.0), levels) is None  # more than the kept number of levels


def test_a_clean_float_column_is_compared_as_it_is():
    ref = pd.DataFrame({"x": np.linspace(0, 10, 2000)})
    prof = ReferenceProfile.build(ref, ["x"], []).columns["x"]
    window = pd.Series(np.linspace(-5, 15, 5000))  # within the reference's width of its range
    clean = D._clean_numeric(prof, window)
    assert clean is not None and clean.values is not None and np.shares_memory(clean.values, window.to_numpy())
    assert clean.low == -5.0 and clean.set_aside == {}
    for bad in (window.where(window > 0), window.replace(15.0, np.inf), window + 20.0, window.astype("float32")):
        assert D._clean_numeric(prof, bad) is None  # missing, infinite, far or not float64: cleaned in full


def test_grids_are_built_only_for_windows_that_use_them():
    rng = np.random.default_rng(6)
    ref = pd.DataFrame({"x": rng.normal(0, 1, 5000), "c": np.array(["a", "b"], dtype=object)[rng.integers(0, 2, 5000)]})
    profile = ReferenceProfile.build(ref, ["x"], ["c"])
    fast_check(profile, ref.sample(8000, replace=True, random_state=1), DriftOptions())
    assert profile.columns["x"]._grids == {}  # a small window is sorted: no grid built
    fast_check(profile, ref.sample(100_000, replace=True, random_state=2), DriftOptions())
    assert list(profile.columns["x"]._grids) == [8]  # the coarse grid only


def test_large_windows_with_gaps_and_shared_objects_match_evidently():
    """A 60k-row window: float columns clean and not (NaN, a far value), a column with few levels,
    object categories from a few objects with missing values — Evidently's scores and verdicts."""
    rng = np.random.default_rng(7)
    names = np.array(["north", "south", "east", "west"], dtype=object)

    def frame(rows, shift):
        return pd.DataFrame({
            "a": rng.normal(shift, 1, rows),
            "b": rng.gamma(2, 2 + shift, rows),
            "r": rng.choice([1.0, 2.0, 3.0], rows, p=[0.2, 0.5, 0.3] if not shift else [0.4, 0.4, 0.2]),
            "region": names[rng.choice(4, rows, p=[0.4, 0.3, 0.2, 0.1] if not shift else [0.25] * 4)],
        })

    ref, cur = frame(3000, 0.0), frame(60_000, 0.2)
    cur.loc[::17, "b"] = np.nan
    cur.loc[5, "a"] = 1e9  # one far value: set aside
    cur.loc[::23, "region"] = None
    options = DriftOptions()
    fast = fast_check(ReferenceProfile.build(ref, ["a", "b", "r"], ["region"]), cur, options)
    _, judge = evidently_report(ref, cur, ["a", "b", "r"], ["region"], options)
    assert [c.column for c in fast.columns] == [c.column for c in judge.columns]
    for col in fast.columns:
        other = judge.column(col.column)
        assert (col.method, col.drifted) == (other.method, other.drifted), col.column
        assert col.score == pytest.approx(other.score, rel=1e-12, abs=1e-12), col.column
    assert fast.column("a").set_aside == {"out_of_range": 1}
