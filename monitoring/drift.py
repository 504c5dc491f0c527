"""Drift checks: Evidently's DataDriftPreset as the judge of record, and a vectorised fast path.

Evidently decides which statistical test each column gets and what threshold counts as drift
(the same rules are applied here, read from ``evidently.legacy.calculations.stattests``), and it
renders the report a person reads (HTML + JSON). Evidently recomputes each column's statistic
several times and builds charts even for ``.dict()`` (~2 min and 2 GB at 1M rows × 20 columns), so
the continuous check uses a fast path instead:

* the reference side is summarised once per champion (:class:`ReferenceProfile`: sorted finite
  values and std for numeric columns, category counts for every column with few levels; a grid of
  cells (:class:`_Grid`) per numeric column, built the first time a window large enough for it
  comes);
* each window is reduced with numpy (a categorical column counted per object when a few objects
  make it, else with one ``value_counts``; a numeric column binned on a grid — per cell a count and
  a sum, cells holding reference values split at them, and only the values in cells where the two
  CDFs cross sorted — or sorted whole when the window is small) and compared with exactly the
  statistic Evidently would use — normalised Wasserstein (to rounding), scipy's K-S,
  chi-square / Z-test / Jensen-Shannon on category counts; any other configured method falls back
  to Evidently's own implementation of that method for that column.

Method selection mirrors ``evidently.legacy.calculations.stattests.registry._get_default_stattest``:
decided on the reference size after dropping missing values (≤ 1000 rows: K-S for numeric with
more than 5 distinct values, else chi-square, or the Z-test when there are at most 2 values;
> 1000 rows: Wasserstein (normed) for numeric with more than 5 values, else Jensen-Shannon).
``DriftOptions`` carries the configured overrides with Evidently's precedence: per column, then
per kind (numeric/categorical); thresholds fall back to the method's default.

What a window holds is not trusted (rows stored by older versions, values within the schema but
extreme): before either engine sees a column, :func:`_window_column` cleans it against the
reference and counts what it set aside (``ColumnDrift.set_aside``), and both engines get the same
cleaned values, so the fast path still matches Evidently and clean data gives the same result as
before:

* missing, infinite and non-numeric values are dropped (counted: ``missing``, ``infinite``,
  ``not_numeric``);
* numeric values farther from the reference's range than its width (``out_of_range``), and
  values or categories the reference never holds where it has few levels (``unseen_level``: a
  chi-square with an expected count of 0 would call one row drift), are set aside while they are
  at most one request's rows (``DriftOptions.max_set_aside``, ``monitor.max_rows_per_request``,
  from one ``request_id`` where the window has them) and a tenth of the window; more than that is a change of the data itself and stays in, numeric
  values clipped to ``_FAR`` reference widths (``clipped``) so that no statistic overflows;
* a column left with no values is skipped, with its reason (``DriftResult.skipped``), and the
  dataset verdict is taken on the columns that could be checked.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from driftloop.core.errors import MonitorError

if TYPE_CHECKING:
    from driftloop.core.config import MonitorConfig

__all__ = [
    "CATEGORICAL",
    "NUMERICAL",
    "ColumnDrift",
    "DriftOptions",
    "DriftResult",
    "ReferenceProfile",
    "evidently_report",
    "fast_check",
    "method_name",
    "prepare_frame",
    "save_report",
]

log = logging.getLogger(__name__)

NUMERICAL = "num"
CATEGORICAL = "cat"
# Small-reference regime boundary and "few distinct values" limits, as in Evidently.
_SMALL_REFERENCE = 1000
_FEW_VALUES = 5
_BINARY = 2
_HIST_LEVELS = 20  # Jensen-Shannon on numeric columns bins by Sturges above this many levels
_KEEP_LEVELS = _HIST_LEVELS + 1
_SET_ASIDE_SHARE = 0.1  # out-of-range values or unseen levels set aside: at most this share of a column
_FAR = 2.0 ** 20  # beyond this many reference widths from its range, kept values are clipped (finite sums)


@dataclass(frozen=True)
class DriftOptions:
    """Method/threshold overrides and the dataset drift share (``MonitorConfig`` fields)."""

    drift_share: float = 0.5
    num_method: str | None = None
    cat_method: str | None = None
    num_threshold: float | None = None
    cat_threshold: float | None = None
    per_column_method: dict[str, str] = field(default_factory=dict)
    per_column_threshold: dict[str, float] = field(default_factory=dict)
    max_set_aside: int = 100  # one request's rows at most (monitor.max_rows_per_request)

    @classmethod
    def from_config(cls, monitor: MonitorConfig) -> DriftOptions:
        return cls(
            drift_share=monitor.drift_share,
            num_method=monitor.num_method,
            cat_method=monitor.cat_method,
            num_threshold=monitor.num_threshold,
            cat_threshold=monitor.cat_threshold,
            per_column_method=dict(monitor.per_column_method),
            per_column_threshold=dict(monitor.per_column_threshold),
            max_set_aside=monitor.max_rows_per_request,
        )

    def method_for(self, column: str, kind: str) -> str | None:
        return self.per_column_method.get(column) or (self.num_method if kind == NUMERICAL else self.cat_method)

    def threshold_for(self, column: str, kind: str) -> float | None:
        if column in self.per_column_threshold:
            return self.per_column_threshold[column]
        return self.num_threshold if kind == NUMERICAL else self.cat_threshold

    def preset_kwargs(self) -> dict[str, Any]:
        """The same overrides as ``DataDriftPreset`` keyword arguments."""
        return {
            "drift_share": self.drift_share,
            "num_method": self.num_method,
            "cat_method": self.cat_method,
            "num_threshold": self.num_threshold,
            "cat_threshold": self.cat_threshold,
            "per_column_method": dict(self.per_column_method) or None,
            "per_column_threshold": dict(self.per_column_threshold) or None,
        }


@dataclass(frozen=True)
class ColumnDrift:
    """One column's verdict: the method (Evidently's stattest name), its score and threshold."""

    column: str
    kind: str
    method: str
    score: float
    threshold: float
    drifted: bool
    n_reference: int = 0
    n_current: int = 0
    set_aside: dict[str, int] = field(default_factory=dict)  # reason -> window values not compared


@dataclass
class DriftResult:
    """Every checked column's verdict plus the dataset verdict (share of drifted columns ≥ drift_share);
    columns without values in the window are ``skipped`` (column -> reason) and judge nothing."""

    columns: list[ColumnDrift]
    drift_share: float
    n_reference: int
    n_current: int
    engine: str  # "fast" | "evidently"
    skipped: dict[str, str] = field(default_factory=dict)
    skipped_set_aside: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def set_aside(self) -> dict[str, int]:
        """Window values not compared, per reason, over every column (see the module's docstring)."""
        total: dict[str, int] = {}
        for counts in [*(c.set_aside for c in self.columns), *self.skipped_set_aside.values()]:
            for reason, n in counts.items():
                total[reason] = total.get(reason, 0) + n
        return total

    @property
    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    @property
    def share(self) -> float:
        return len(self.drifted_columns) / len(self.columns) if self.columns else 0.0

    @property
    def dataset_drift(self) -> bool:
        return bool(self.columns) and self.share >= self.drift_share

    def column(self, name: str) -> ColumnDrift:
        for c in self.columns:
            if c.column == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "drift_share": self.drift_share,
            "share": self.share,
            "dataset_drift": self.dataset_drift,
            "drifted_columns": self.drifted_columns,
            "columns": [asdict(c) for c in self.columns],
            "skipped": dict(self.skipped),
            "set_aside": self.set_aside,
        }


# -- Evidently's stattests ----------------------------------------------------------------------
def _column_type(kind: str) -> Any:
    from evidently.legacy.core import ColumnType

    return ColumnType.Numerical if kind == NUMERICAL else ColumnType.Categorical


_STATTESTS: dict[tuple[str, str, bool], Any] = {}


def _stattest(method: str, kind: str, *, default: bool = False) -> Any:
    """Evidently's StatTest for a configured method (type-checked, as Evidently does) or a default one."""
    key = (method, kind, default)
    if key not in _STATTESTS:
        _STATTESTS[key] = _find_stattest(method, kind, default=default)
    return _STATTESTS[key]


def warm_up() -> None:
    """Import Evidently's stattest registry now (``evidently.legacy`` brings its whole package along: ~3 s of a
    slow 2-core machine), so the first check does not pay for it: the monitor's check loop calls this before
    its first wait. A registry that cannot be imported is left for the check to report."""
    try:
        import evidently.legacy.calculations.stattests.registry  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - the check that needs it says what is wrong
        log.debug("Evidently's stattests not imported ahead of the first check: %s", exc)


def _find_stattest(method: str, kind: str, *, default: bool = False) -> Any:
    from evidently.legacy.calculations.stattests.registry import (
        StatTestNotFoundError,
        _registered_stat_tests,
        get_registered_stattest,
    )

    if default:  # Evidently's default selection returns the test object without a type check
        return next(iter(_registered_stat_tests[method].values()))
    try:
        return get_registered_stattest(method, _column_type(kind))
    except (StatTestNotFoundError, ValueError) as exc:
        raise MonitorError(f"drift method {method!r} cannot be used here: {exc}") from exc


def method_name(label: str) -> str:
    """Evidently's stattest name (``ks``) for a name or a display name (``K-S p_value``)."""
    from evidently.legacy.calculations.stattests.registry import _registered_stat_tests

    if label in _registered_stat_tests:
        return label
    for name, by_type in _registered_stat_tests.items():
        if any(t.display_name == label for t in by_type.values()):
            return name
    return label


def _default_method(n_reference: int, n_values: int, kind: str) -> str:
    """``_get_default_stattest`` of Evidently, on counts (reference rows and distinct values)."""
    few = "chisquare" if n_values > _BINARY else "z"
    if n_reference <= _SMALL_REFERENCE:
        if kind == NUMERICAL:
            return few if n_values <= _FEW_VALUES else "ks"
        return few
    if kind == NUMERICAL:
        return "jensenshannon" if n_values <= _FEW_VALUES else "wasserstein"
    return "jensenshannon"


# -- frames -----------------------------------------------------------------------------------
def _require_columns(df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MonitorError(f"{what} data lacks the reference columns {missing}; it has {sorted(map(str, df.columns))}")


def prepare_frame(df: pd.DataFrame, numeric: list[str], categorical: list[str], *, what: str = "current") -> pd.DataFrame:
    """The checked columns in the types the checks expect: numeric float64, categorical strings.

    Missing columns or non-numeric values in a numeric column raise :class:`MonitorError` naming
    them, so rows that do not match the reference never pass silently.
    """
    _require_columns(df, [*numeric, *categorical], what)
    out: dict[str, Any] = {}
    for col in numeric:
        try:
            values = pd.to_numeric(df[col], errors="raise")
        except (ValueError, TypeError) as exc:
            raise MonitorError(f"{what} column {col!r} must be numeric like the reference: {exc}") from exc
        out[col] = values.astype("float64").replace([np.inf, -np.inf], np.nan).to_numpy()
    for col in categorical:
        series = df[col]
        out[col] = np.where(series.isna(), None, series.astype(str)).astype(object)
    return pd.DataFrame(out, index=df.index)


# -- reference profile ------------------------------------------------------------------------
@dataclass
class _ColumnProfile:
    kind: str
    n: int
    sorted_values: np.ndarray | None  # numeric: finite values, sorted
    std: float
    levels: dict[Any, int] | None  # value -> count when at most _KEEP_LEVELS distinct values
    n_levels: int
    values: np.ndarray  # non-missing values (numeric: sorted), for methods without a fast path
    level_values: np.ndarray | None = None  # numeric with levels: the distinct values, sorted
    _grids: dict[int, _Grid | None] = field(default_factory=dict)  # cells per reference value -> grid

    @property
    def raw(self) -> pd.Series:
        """The reference's values as Evidently's stattests take them (methods without a fast path)."""
        return pd.Series(self.values)

    def _grid(self, per_value: int) -> _Grid | None:
        if per_value not in self._grids:
            self._grids[per_value] = _Grid.build(self.sorted_values, self.n_levels, per_value)
        return self._grids[per_value]

    @property
    def grids(self) -> tuple[_Grid, ...]:
        """Numeric: cells for the Wasserstein distance of large windows, fine first (all of them built)."""
        if self.kind != NUMERICAL:
            return ()
        grids = (self._grid(per_value) for per_value in _CELLS_PER_REFERENCE_VALUE)
        return tuple(g for g in grids if g is not None)

    def grid_for(self, n: int) -> _Grid | None:
        """The finest grid with fewer cells than a window of ``n`` values, built the first time a window
        needs it (a champion judged on small windows never pays for one)."""
        for per_value in _CELLS_PER_REFERENCE_VALUE:
            layout = _Grid.layout(self.sorted_values, self.n_levels, per_value)
            if layout is not None and n > layout[2]:
                return self._grid(per_value)
        return None

    @property
    def reach(self) -> tuple[float, float]:
        """The window values a check compares as they are: within the reference's width of its range."""
        lo, hi = float(self.sorted_values[0]), float(self.sorted_values[-1])
        return lo - (hi - lo), hi + (hi - lo)


@dataclass
class ReferenceProfile:
    """Reference statistics computed once per champion; reused by every window check."""

    numeric: list[str]
    categorical: list[str]
    frame: pd.DataFrame
    columns: dict[str, _ColumnProfile]

    @classmethod
    def build(cls, reference: pd.DataFrame, numeric: list[str], categorical: list[str]) -> ReferenceProfile:
        frame = prepare_frame(reference, numeric, categorical, what="reference")
        profiles: dict[str, _ColumnProfile] = {}
        for col in numeric:
            values = frame[col].to_numpy()
            values = np.sort(values[~np.isnan(values)])
            if values.size == 0:
                raise MonitorError(f"reference column {col!r} has no values")
            uniques, counts = _sorted_uniques(values)
            few = uniques.size <= _KEEP_LEVELS
            levels = dict(zip(uniques.tolist(), counts.tolist())) if few else None
            profiles[col] = _ColumnProfile(NUMERICAL, values.size, values, max(float(np.std(values)), 0.001), levels,
                                           int(uniques.size), values, uniques if few else None)
        for col in categorical:
            series = pd.Series(frame[col]).dropna()
            if series.empty:
                raise MonitorError(f"reference column {col!r} has no values")
            counts = series.value_counts()
            profiles[col] = _ColumnProfile(CATEGORICAL, int(series.size), None, 0.0, counts.to_dict(), int(counts.size),
                                           series.to_numpy())
        return cls(list(numeric), list(categorical), frame, profiles)

    @property
    def n(self) -> int:
        return len(self.frame)


def _sorted_uniques(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if sorted_values.size == 0:
        return sorted_values, np.zeros(0, dtype=int)
    starts = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
    counts = np.diff(np.append(starts, sorted_values.size))
    return sorted_values[starts], counts


# -- statistics on summaries ------------------------------------------------------------------
_RAMP = np.arange(1, 2, dtype=np.float64)


def _ramp(n: int) -> np.ndarray:
    """1.0, 2.0, ..., n (read-only view of a cached array that grows as needed)."""
    global _RAMP
    if _RAMP.size < n:
        ramp = np.arange(1, max(n, 2 * _RAMP.size) + 1, dtype=np.float64)
        ramp.flags.writeable = False
        _RAMP = ramp
    return _RAMP[:n]


def _wasserstein_sorted(u: np.ndarray, v: np.ndarray) -> float:
    """First Wasserstein distance of two sorted samples: scipy's CDF formula, without re-sorting.

    The smaller sample is inserted into the larger (one search per value of the smaller). Where the
    merged values step up (deltas > 0), exactly ``i + 1`` values are at or below ``merged[i]``, of
    which ``c_i`` (a step function, built with ``np.repeat``) come from the smaller sample, so
    ``F_small - F_large = (c_i (nl/ns + 1) - (i + 1)) / nl``; where deltas == 0 the term vanishes.
    """
    small, large = (u, v) if u.size <= v.size else (v, u)
    at = large.searchsorted(small, "left")
    merged = np.insert(large, at, small)
    n = merged.size - 1
    marks = at + np.arange(small.size)
    lengths = np.diff(np.concatenate(([0], marks, [n])))
    d = np.repeat(np.arange(small.size + 1) * (large.size / small.size + 1.0), lengths)
    d -= _ramp(n)
    np.abs(d, out=d)
    d *= np.diff(merged)
    return float(d.sum()) / large.size  # not np.dot: BLAS threads would fight the monitor's threads


# Cells of the Wasserstein grids per distinct reference value (the more, the fewer window values
# share a cell with a reference value and are placed among its pieces; the fewer, the cheaper the
# per-cell sums): a fine grid for windows of ~1M rows, a coarse one for ~100k (measured from 1 to
# 64 per value, these are the fastest there or within the noise of it); a window smaller than a
# grid's cell count, or than _MIN_GRID_WINDOW, is sorted instead. And a cap on the cells.
_CELLS_PER_REFERENCE_VALUE = (32, 8)
_MAX_CELLS = 1 << 19
_MIN_GRID_WINDOW = 16_384  # smaller windows are sorted whatever the grids (no grid is built for them)


@dataclass(frozen=True)
class _Grid:
    """Cells of width ``h`` (a power of two) over the reference's range, built once per champion.

    A window is binned by ``floor(v / h)`` (exact: scaling by a power of two does not round, so
    every cell edge ``(off + i) * h`` is an exact float and a value falls in the cell whose edges
    bracket it). Bin 0 is ``(-inf, e_0)``, bin ``i + 1`` the cell ``[e_i, e_i+1)``, the last bin
    ``[e_G, inf)``. ``k[b]`` is the number of reference values ``<= `` the bin's left edge, which
    is the reference CDF (times its size) on the whole bin when ``clean[b]``: no reference value
    lies strictly inside. A cell that is not clean is cut into pieces at the reference values
    inside it (``fixed``: those values and the cells' edges, sorted), on each of which the
    reference CDF is constant again.
    """

    h: float
    off: float  # floor(min / h): cell i starts at (off + i) * h
    cells: int
    k: np.ndarray  # int64, one per bin
    clean: np.ndarray  # bool, one per bin
    fixed: np.ndarray  # sorted: the reference values in cells that are not clean and those cells' edges
    # The pieces [fixed[j], fixed[j+1]) of the cells that are not clean, on which F_r is constant:
    piece_k: np.ndarray  # reference values <= fixed[j]
    piece_bin: np.ndarray  # the bin of fixed[j]
    piece_first: np.ndarray  # the first piece of that bin
    piece_dirty: np.ndarray  # whether the piece lies in a cell that is not clean
    # per cell that is not clean, in order: its first piece, and its one reference value strictly
    # inside with the piece that starts there (NaN: several values, the piece is searched for)
    dirty_first: np.ndarray
    dirty_split: np.ndarray
    dirty_upper: np.ndarray
    starts_at: np.ndarray  # fixed's places in cells from e_0 - h (as bin_index gives them)

    @staticmethod
    def layout(ref: np.ndarray, distinct: int, per_value: int) -> tuple[float, int, int] | None:
        """``(h, off, cells)`` of the grid over the sorted reference ``ref``, or None where it has none."""
        lo, hi = float(ref[0]), float(ref[-1])
        if not hi > lo:
            return None
        target = min(_MAX_CELLS, per_value * distinct)  # at most `distinct` cells hold a value
        h = 2.0 ** math.floor(math.log2((hi - lo) / target))
        if not (math.isfinite(h) and h > 0 and math.isfinite(1.0 / h)):
            return None
        off = math.floor(lo / h)
        cells = int(math.floor(hi / h) - off + 1)
        if abs(off) + cells >= 2**52 or cells > 2 * _MAX_CELLS + 2:
            return None  # the cell edges would not be exact floats
        return h, off, cells

    @classmethod
    def build(cls, ref: np.ndarray, distinct: int, per_value: int) -> _Grid | None:
        layout = cls.layout(ref, distinct, per_value)
        if layout is None:
            return None
        h, off, cells = layout
        # the reference's cells and offsets in them (all inside the grid): counts per cell, no search
        none = np.zeros(0, np.intp)
        ref_bins, frac = cls(h, float(off), cells, *[none] * 11).bins(ref)
        cell = ref_bins - 1
        per_cell = np.bincount(cell, minlength=cells)
        on_edge = np.bincount(cell[frac == 0], minlength=cells)  # values exactly on the cell's left edge e_i
        right = np.cumsum(per_cell) - per_cell + on_edge  # reference values <= e_i
        inside = per_cell > on_edge  # some value strictly in (e_i, e_i+1)
        k = np.concatenate(([0], right, [ref.size])).astype(np.int64)
        clean = np.concatenate(([True], ~inside, [True]))
        dirty = np.flatnonzero(inside).astype(np.float64)
        fixed = np.concatenate((ref[inside[cell]], (off + dirty) * h, (off + dirty + 1.0) * h))
        fixed.sort()
        piece_bin = cls(h, float(off), cells, k, clean, fixed, *[none] * 8).bins(fixed)[0]
        # a value v lies in piece fixed.searchsorted(v, "right") - 1: a cell's first piece starts at its left edge
        first = fixed.searchsorted((off + piece_bin - 1.0) * h, "right") - 1
        strictly = frac > 0
        values_in, cells_in = ref[strictly], cell[strictly]
        distinct = np.ones(values_in.size, dtype=bool)
        distinct[1:] = values_in[1:] != values_in[:-1]
        split = np.full(cells, np.nan)
        split[cells_in] = values_in
        split[np.bincount(cells_in[distinct], minlength=cells) > 1] = np.nan
        split = split[inside]
        upper = fixed.searchsorted(split, "right") - 1  # the piece starting at the value (its last copy)
        return cls(h, float(off), cells, k, clean, fixed, ref.searchsorted(fixed, "right"), piece_bin, first,
                   ~clean[piece_bin], fixed.searchsorted((off + dirty) * h, "right") - 1, split, upper,
                   fixed * (1.0 / h) - (off - 1.0))

    def bins(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bin of every value and its offset ``(v - e) / h`` from an edge: the cell's left edge for
        a cell (in [0, 1]), ``e_0 - h`` in the left tail (below 1), ``e_G`` in the right tail."""
        t = values * (1.0 / self.h)
        f = np.floor(t)
        np.clip(f, self.off - 1.0, self.off + self.cells, out=f)
        frac = np.subtract(t, f, out=t)
        f -= self.off - 1.0
        return f.astype(np.intp), frac

    def bin_index(self, values: np.ndarray, low: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The bins of :meth:`bins`, in fewer passes over a large window (``low``: its least value,
        when known; at or above 0, truncation is the floor), and each value's place ``v / h - off + 1``
        in cells from ``e_0 - h`` (bin ``b`` starts at ``b``; rounded, so only summed, never compared)."""
        t = values * (1.0 / self.h)  # exact: h is a power of two
        floor = t if low is not None and low >= 0 else np.floor(t)
        b = floor.astype(np.intp)
        b -= int(self.off) - 1
        np.clip(b, 0, self.cells + 1, out=b)
        t -= self.off - 1.0
        return b, t

    def wasserstein(self, ref: np.ndarray, cur: np.ndarray, low: float | None = None) -> float:
        """First Wasserstein distance of the reference (sorted) and an unsorted window, exactly.

        ``n_r n |F_r - F_w|`` is integrated bin by bin in integers times lengths. On a clean
        bin ``F_r`` is constant and ``F_w`` rises from ``L/n`` (``L``: window values left of the
        bin) by the bin's values, so while the two do not cross inside, the integral is a sum of
        nonnegative terms over the bin's count and the values' offsets from its edges — no sort.
        Bins holding reference values are integrated the same way piece by piece between those
        values (:meth:`_dirty_part`); bins or pieces where the CDFs cross, on the merged grid of
        their sorted values, as scipy does for the whole sample (:meth:`_exact_part`).
        """
        n_r, n = ref.size, cur.size
        bins, place = self.bin_index(cur, low)
        last = self.cells + 1
        cnt = np.bincount(bins, minlength=last + 1)
        # sum of (v - e) / h per bin, e its left edge (e_0 - h for the left tail, e_G for the right):
        # the values' places less the bin's number, once per value (offsets from the grid, not from 0,
        # so a reference far from 0 loses no digits)
        below = np.bincount(bins, weights=place, minlength=last + 1)
        below -= cnt * np.arange(last + 1, dtype=np.float64)
        left = np.cumsum(cnt) - cnt  # window values left of each bin
        d = left * n_r - self.k * n  # n_r n (F_w - F_r) at each bin's left edge
        d_end = d + cnt * n_r  # ... and at its right edge
        h = self.h
        total = n_r * h * (float(cnt[0] - below[0]) + float(below[last]))  # the tails, where F_r is 0 or 1
        # A clean cell where F_w stays on one side of F_r (d >= 0: above; d_end <= 0: below) adds
        # h |d_end - n_r sum((v - e_i) / h)|: above, d h + n_r sum(e_i+1 - v); below, the mirror image.
        one_side = self.clean & ((d >= 0) | (d_end <= 0))
        one_side[0] = one_side[last] = False  # the tails, counted above
        total += h * float(np.sum(np.abs(d_end - n_r * below), where=one_side))
        # the other cells: those holding reference values, and clean ones where the CDFs cross
        other = ~one_side
        other[0] = other[last] = False
        pick = np.flatnonzero(other[bins])
        values, where = cur[pick], bins[pick]
        in_dirty = ~self.clean[where]
        dirty = values[in_dirty]
        places = dirty * (1.0 / h)
        places -= self.off - 1.0  # as bin_index places them
        dirty_part, exact = self._dirty_part(dirty, places, where[in_dirty], cnt, left, n_r, n)
        total += dirty_part
        exact |= other & self.clean
        if exact.any():
            keep = exact[where]
            total += self._exact_part(ref, values[keep], where[keep], n, exact, cnt, left)
        return total / (n * n_r)

    def _dirty_part(self, values: np.ndarray, places: np.ndarray, where: np.ndarray, cnt: np.ndarray,
                    left: np.ndarray, n_r: int, n: int) -> tuple[float, np.ndarray]:
        """``n_r n`` times the integral over the cells holding reference values (``values``: the window's
        values in them), piece by piece: between consecutive reference values and edges ``F_r`` is
        constant, so a piece where ``F_w`` stays on one side of it adds ``|d_b len - n_r sum(v - a)|``
        (``a``: its start, ``d_b``: ``n_r n (F_w - F_r)`` at its end), as a clean cell does. A cell
        with a piece where the CDFs cross is left out and marked in the returned bins for
        :meth:`_exact_part`."""
        starts = self.fixed
        exact = np.zeros(cnt.size, dtype=bool)
        if starts.size == 0:  # every reference value on a cell edge: no cell holds one inside
            return 0.0, exact
        rank = (np.cumsum(~self.clean) - 1)[where]  # the cell's place among those not clean
        split = self.dirty_split[rank]
        j = np.where(values >= split, self.dirty_upper[rank], self.dirty_first[rank])
        several = np.isnan(split)
        if several.any():
            j[several] = starts.searchsorted(values[several], "right") - 1
        c = np.bincount(j, minlength=starts.size)
        sums = np.bincount(j, weights=places, minlength=starts.size)  # in cells from e_0 - h, as starts_at
        before = np.cumsum(c) - c
        d_a = (left[self.piece_bin] + before - before[self.piece_first]) * n_r - self.piece_k * n
        d_b = d_a + c * n_r
        crossing = self.piece_dirty & (d_a < 0) & (d_b > 0)
        exact[self.piece_bin[crossing]] = True
        length = np.diff(starts, append=starts[-1])
        part = np.abs(d_b * length - (n_r * self.h) * (sums - c * self.starts_at))
        part[~self.piece_dirty | exact[self.piece_bin]] = 0.0
        return float(part.sum()), exact

    def _exact_part(self, ref: np.ndarray, window: np.ndarray, wbins: np.ndarray, n: int, exact: np.ndarray,
                    cnt: np.ndarray, left: np.ndarray) -> float:
        """``n_r n`` times the integral over the ``exact`` cells (``window``: the window's values in
        them, ``wbins`` their bins; ``n``: the window's size), on the merged grid of their values and edges."""
        n_r = ref.size
        window = np.sort(window)
        crossing = np.flatnonzero(exact & self.clean) - 1  # clean cells where the CDFs cross: edges only
        edges = np.sort((self.off + np.concatenate((crossing, crossing + 1)).astype(np.float64)) * self.h)
        # the reference values and edges of the exact cells that are not clean (a cell's right edge is
        # the next bin's left edge)
        fixed = self.fixed[exact[self.piece_bin] | exact[self.piece_bin - 1]]
        extra = np.insert(fixed, fixed.searchsorted(edges), edges)
        # merge the (few) reference values and edges into the sorted window values; at each point,
        # the number of those window values at or below it (exact at the last point of a tie, the
        # only one whose segment has a length)
        at = window.searchsorted(extra, "right")
        points = np.insert(window, at, extra)
        below = np.insert(np.arange(1, window.size + 1), at, at)
        pbins, _ = self.bins(points)
        start = np.cumsum(np.where(exact, cnt, 0)) - np.where(exact, cnt, 0)  # first index of each bin in window
        pb = pbins[:-1]
        g = left[pb] + (below[:-1] - start[pb])
        f = ref.searchsorted(points[:-1], "right")
        gaps = np.diff(points)
        gaps[~exact[pb]] = 0.0  # segments between exact cells lie in cells counted above
        return float(np.sum(gaps * np.abs(f * n - g * n_r)))


def _wasserstein(prof: _ColumnProfile, cur: np.ndarray, low: float | None = None) -> float:
    """Wasserstein distance of the profile and a window's finite values (sorted or not; ``low``:
    their least value, when known).

    Large windows go through the reference's grid (no sort of the window); small ones through
    the merged sorted samples.
    """
    grid = prof.grid_for(cur.size) if cur.size > _MIN_GRID_WINDOW else None
    if grid is not None:
        return grid.wasserstein(prof.sorted_values, cur, low)
    return _wasserstein_sorted(prof.sorted_values, np.sort(cur))


def _count_vectors(ref: dict[Any, int], cur: dict[Any, int]) -> tuple[list[Any], np.ndarray, np.ndarray]:
    keys = list(set(ref) | set(cur))
    return keys, np.array([ref.get(k, 0) for k in keys], float), np.array([cur.get(k, 0) for k in keys], float)


def _chisquare(ref: dict[Any, int], cur: dict[Any, int], n_ref: int, n_cur: int) -> float:
    from scipy.stats import chisquare

    _, r, c = _count_vectors(ref, cur)
    return float(chisquare(c, r * (n_cur / n_ref))[1])


def _z_test(ref: dict[Any, int], cur: dict[Any, int], n_ref: int, n_cur: int) -> float:
    from scipy.stats import norm

    if len(ref) == 1 and len(cur) == 1 and next(iter(ref)) == next(iter(cur)):
        return 1.0
    first = min(set(ref) | set(cur))  # Evidently: the first of the sorted levels
    p1 = 1.0 - ref.get(first, 0) / n_ref
    p2 = 1.0 - cur.get(first, 0) / n_cur
    pooled = (p1 * n_ref + p2 * n_cur) / (n_ref + n_cur)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1.0 / n_ref + 1.0 / n_cur))
    return float(2 * (1 - norm.cdf(np.abs(z))))


def _jensenshannon_counts(ref: dict[Any, int], cur: dict[Any, int], n_ref: int, n_cur: int) -> float:
    from scipy.spatial import distance

    _, r, c = _count_vectors(ref, cur)
    return float(distance.jensenshannon(r / n_ref, c / n_cur))


def _jensenshannon_hist(ref: np.ndarray, cur: np.ndarray) -> float:
    from scipy.spatial import distance

    bins = np.histogram_bin_edges(np.concatenate((ref, cur)), bins="sturges")
    return float(distance.jensenshannon(np.histogram(ref, bins)[0] / ref.size, np.histogram(cur, bins)[0] / cur.size))


_P_VALUE_INCLUSIVE = {"ks"}  # K-S flags p <= threshold; chi-square and Z-test p < threshold
_P_VALUE_METHODS = {"ks", "chisquare", "z"}


def _numeric_column(series: pd.Series) -> tuple[np.ndarray, dict[str, int]]:
    """A numeric column as float64 in row order, NaN where a value is missing, infinite or not a
    number, and those counts (the array may be the caller's data: copy before changing it)."""
    counts: dict[str, int] = {}
    not_numeric = 0
    if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        present = series.notna()
        series = pd.to_numeric(series, errors="coerce")
        not_numeric = int(np.count_nonzero(present.to_numpy() & series.isna().to_numpy()))
    values = np.asarray(series.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        nan = np.isnan(values)
        counts.update(missing=int(np.count_nonzero(nan)) - not_numeric,
                      infinite=int(values.size - np.count_nonzero(finite) - np.count_nonzero(nan)),
                      not_numeric=not_numeric)
        if counts["infinite"]:
            values = np.where(finite, values, np.nan)
    return values, {k: n for k, n in counts.items() if n}


def _numeric_values(series: pd.Series, name: str) -> np.ndarray:
    """Finite values of a numeric column ``name`` as float64, in their order (anything else dropped)."""
    values, _ = _numeric_column(series)
    nan = np.isnan(values)
    return values[~nan] if nan.any() else values


def _on_levels(values: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each value, the index of the first of ``levels`` (sorted) not below it, and whether it is
    that level (``np.isin`` in one search, NaN never on a level)."""
    at = np.minimum(levels.searchsorted(values), levels.size - 1)
    return at, levels[at] == values


def _levels_of(values: np.ndarray, levels: np.ndarray) -> dict[Any, int] | None:
    """value -> count of finite ``values`` (in sorted order), or None when they take more than
    ``_KEEP_LEVELS`` values; ``levels``: the reference's distinct values, which most of them take
    (only the others are sorted)."""
    at, hit = _on_levels(values, levels)
    counts = np.bincount(at[hit], minlength=levels.size)
    found = {k: c for k, c in zip(levels.tolist(), counts.tolist()) if c}
    others = values[~hit]
    if others.size:
        others = np.sort(others)
        if np.count_nonzero(others[1:] != others[:-1]) + 1 + len(found) > _KEEP_LEVELS:
            return None
        uniques, n = _sorted_uniques(others)
        found.update(zip(uniques.tolist(), n.tolist()))
        found = dict(sorted(found.items()))
    return found if len(found) <= _KEEP_LEVELS else None


def _category_counts(series: pd.Series) -> dict[Any, int]:
    """Counts per level as strings (what ``prepare_frame`` makes of each value: ``str(value)``),
    missing values left out."""
    values = series.to_numpy() if series.dtype == object else None
    if values is not None and values.size >= _IDENTITY_MIN_ROWS:
        counts = _counts_by_identity(values)
        if counts is not None:
            return counts
    counts: dict[Any, int] = {}
    found = series.value_counts(dropna=True)
    if series.dtype == object and not all(type(key) is str for key in found.index):
        # equal values of other types (1, 1.0, True) are one key to value_counts but three strings
        found = series[series.notna()].astype(str).value_counts()
    for key, n in found.items():
        if n:
            k = str(key)
            counts[k] = counts.get(k, 0) + int(n)
    return counts


# Counting an object column by its objects: a column whose values come from a few objects (what
# pyarrow's ``to_pandas`` and ``pd.read_csv`` give, or ``np.array(levels)[codes]``) is counted by
# the objects' addresses, with no string hashed or compared per row; the few distinct objects are
# then read (``str``), and objects with the same text add up. A column of distinct objects per row
# (strings decoded row by row, as the monitor's store does) is recognised on a sample and counted
# by value instead.
_IDENTITY_MIN_ROWS = 4096
_IDENTITY_SAMPLE = 4096  # rows looked at to guess how many distinct objects a column holds
_IDENTITY_PASSES = 16  # up to this many objects in the sample: one comparison pass each
_IDENTITY_MAX_SAMPLED = 256  # more distinct objects than this in the sample: counted by value


class _Addresses:
    """The object pointers of an object array, as a read-only ``uintp`` array (``np.asarray`` of it);
    holds the array, so the objects and the memory outlive every view made of it."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        face = values.__array_interface__
        self.__array_interface__ = {"shape": face["shape"], "strides": face["strides"], "version": 3,
                                    "data": (face["data"][0], True), "typestr": np.dtype(np.uintp).str}


def _counts_by_identity(values: np.ndarray) -> dict[Any, int] | None:
    """``_category_counts`` of an object array counted by object, or None when it holds many."""
    addresses = np.asarray(_Addresses(values))
    step = max(1, values.size // _IDENTITY_SAMPLE)
    sampled, first = np.unique(addresses[::step], return_index=True)
    if sampled.size > _IDENTITY_MAX_SAMPLED:
        return None
    objects, counts = values[::step][first], []
    if sampled.size <= _IDENTITY_PASSES:
        counts = [int(np.count_nonzero(addresses == a)) for a in sampled]
    if sum(counts) != values.size:  # objects the sample missed, or too many for a pass each: hash the addresses
        codes, uniques = pd.factorize(addresses)
        if uniques.size > _IDENTITY_MAX_SAMPLED * 4:
            return None
        # codes are numbered in order of first appearance: code c first shows where their running
        # maximum reaches c
        firsts = np.maximum.accumulate(codes).searchsorted(np.arange(uniques.size))
        objects, counts = values[firsts], np.bincount(codes, minlength=uniques.size).tolist()
    out: dict[Any, int] = {}
    for obj, missing, n in zip(objects, pd.isna(objects), counts):
        if not missing:
            k = str(obj)
            out[k] = out.get(k, 0) + n
    return out


@dataclass
class _WindowColumn:
    """A window column cleaned against its reference (module docstring): what is compared and what is not."""

    n: int  # values compared
    values: np.ndarray | None  # numeric: the finite values compared, in row order
    levels: dict[Any, int] | None  # categorical: counts of the levels compared
    set_aside: dict[str, int]  # reason -> values not compared
    aligned: np.ndarray | None = None  # when asked: one cell per row, NaN/None where not compared
    low: float | None = None  # numeric: the least value compared, when known


def _set_aside_limit(n: int, options: DriftOptions) -> int:
    return min(options.max_set_aside, int(n * _SET_ASIDE_SHARE))


def _one_request(requests: np.ndarray | None, mask: np.ndarray) -> bool:
    """Whether the flagged rows come from one request (always, when the window has no request ids):
    values that many senders send are the data, not one sender's."""
    return requests is None or len(set(requests[mask].tolist())) <= 1


def _window_column(prof: _ColumnProfile, series: pd.Series, options: DriftOptions, *,
                   aligned: bool = False, requests: np.ndarray | None = None) -> _WindowColumn:
    if prof.kind == CATEGORICAL:
        return _categorical_window(prof, series, options, aligned, requests)
    if not aligned and prof.levels is None:
        clean = _clean_numeric(prof, series)
        if clean is not None:
            return clean
    values, counts = _numeric_column(series)
    owned = False
    budget = _set_aside_limit(values.size, options)
    lo, hi = float(prof.sorted_values[0]), float(prof.sorted_values[-1])
    width = hi - lo
    outside = (values < lo - width) | (values > hi + width)
    n_out = int(np.count_nonzero(outside))
    if n_out:
        values, owned = values.copy(), True
        if n_out <= budget and _one_request(requests, outside):  # a request's worth of absurd values: they judge nothing
            values[outside] = np.nan
            counts["out_of_range"] = n_out
            budget -= n_out
        else:  # the data moved: kept, but no farther than statistics stay finite
            reach = _FAR * max(width, prof.std)
            far = int(np.count_nonzero((values < lo - reach) | (values > hi + reach)))
            if far:
                np.clip(values, lo - reach, hi + reach, out=values)
                counts["clipped"] = far
    if prof.levels is not None and budget:
        unseen = ~_on_levels(values, prof.level_values)[1] & ~np.isnan(values)
        n_unseen = int(np.count_nonzero(unseen))
        if 0 < n_unseen <= budget and _one_request(requests, unseen):  # a level the reference never had: one row would be chi-square drift
            values = values if owned else values.copy()
            values[unseen] = np.nan
            counts["unseen_level"] = n_unseen
    nan = np.isnan(values)
    kept = values[~nan] if nan.any() else values
    return _WindowColumn(int(kept.size), kept, None, counts, values if aligned else None)


def _clean_numeric(prof: _ColumnProfile, series: pd.Series) -> _WindowColumn | None:
    """A float64 column whose least and greatest values are finite and within the reference's reach
    has nothing to set aside (no missing, infinite or far value): compared as it is, not copied.
    None for any other column (the general cleaning)."""
    if series.dtype != np.float64 or len(series) == 0:
        return None
    values = series.to_numpy()
    low, high = float(values.min()), float(values.max())  # NaN if any value is NaN
    lo, hi = prof.reach
    if not (lo <= low and high <= hi):
        return None
    return _WindowColumn(values.size, values, None, {}, None, low)


def _categorical_window(prof: _ColumnProfile, series: pd.Series, options: DriftOptions,
                        aligned: bool, requests: np.ndarray | None) -> _WindowColumn:
    levels = _category_counts(series)
    n = sum(levels.values())
    counts = {"missing": len(series) - n}
    unseen = [k for k in levels if k not in (prof.levels or {})]
    n_unseen = sum(levels[k] for k in unseen)
    strings = series.astype(str) if aligned or (unseen and requests is not None) else None
    if not (0 < n_unseen <= _set_aside_limit(len(series), options)) or (
            requests is not None and not _one_request(requests, (series.notna() & strings.isin(unseen)).to_numpy())):
        unseen = []
    for key in unseen:
        del levels[key]
    counts["unseen_level"] = n_unseen if unseen else 0
    cells = None
    if aligned:
        cells = np.where(series.isna() | strings.isin(unseen), None, strings).astype(object)
    return _WindowColumn(sum(levels.values()), None, levels, {k: v for k, v in counts.items() if v}, cells)


def _skip_reason(wc: _WindowColumn) -> str:
    what = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in wc.set_aside.items()) or "no rows"
    return f"no values to compare in the current window ({what})"


def _column_check(name: str, prof: _ColumnProfile, wc: _WindowColumn, options: DriftOptions) -> ColumnDrift:
    """Compare one cleaned window column with its reference profile, the way Evidently would."""
    n_cur = wc.n
    if prof.kind == NUMERICAL:
        cur = wc.values
        # a window's levels matter only where the reference has few
        cur_levels = _levels_of(cur, prof.level_values) if prof.levels is not None else None
    else:
        cur_levels = wc.levels
    method = options.method_for(name, prof.kind)
    default = method is None
    if default:
        if prof.levels is not None and cur_levels is not None:
            n_values = len(set(prof.levels) | set(cur_levels))
        else:
            n_values = _KEEP_LEVELS + 1
        method = _default_method(prof.n, n_values, prof.kind)
    test = _stattest(method, prof.kind, default=default)
    method = test.name
    threshold = options.threshold_for(name, prof.kind)
    threshold = test.default_threshold if threshold is None else threshold
    score: float | None = None
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # degenerate counts: scipy's inf/0 p-values
        if method == "wasserstein" and prof.kind == NUMERICAL:
            score = _wasserstein(prof, cur, wc.low) / prof.std
        elif method == "ks" and prof.kind == NUMERICAL:
            from scipy.stats import ks_2samp

            score = float(ks_2samp(prof.sorted_values, cur)[1])
        elif method in ("chisquare", "z", "jensenshannon") and prof.levels is not None and cur_levels is not None and (
            prof.kind == CATEGORICAL or method != "jensenshannon" or prof.n_levels <= _HIST_LEVELS
        ):
            fn = {"chisquare": _chisquare, "z": _z_test, "jensenshannon": _jensenshannon_counts}[method]
            score = fn(prof.levels, cur_levels, prof.n, n_cur)
        elif method == "jensenshannon" and prof.kind == NUMERICAL:
            score = _jensenshannon_hist(prof.sorted_values, cur)
        if score is None:  # no fast path: Evidently's implementation on this column
            if prof.kind == NUMERICAL:
                values = pd.Series(cur)
            else:
                values = pd.Series(np.repeat(np.array(list(cur_levels), dtype=object), list(cur_levels.values())))
            res = test(prof.raw, values, _column_type(prof.kind), threshold)
            return ColumnDrift(name, prof.kind, method, float(res.drift_score), float(threshold), bool(res.drifted),
                               prof.n, n_cur, wc.set_aside)
    if method in _P_VALUE_METHODS:
        drifted = score <= threshold if method in _P_VALUE_INCLUSIVE else score < threshold
    else:
        drifted = score >= threshold
    return ColumnDrift(name, prof.kind, method, score, float(threshold), bool(drifted), prof.n, n_cur, wc.set_aside)


def _clean_columns(profile: ReferenceProfile, current: pd.DataFrame, options: DriftOptions, *,
                   aligned: bool = False) -> dict[str, _WindowColumn]:
    _require_columns(current, [*profile.numeric, *profile.categorical], "current")
    requests = current["request_id"].to_numpy() if "request_id" in current.columns else None
    return {col: _window_column(profile.columns[col], current[col], options, aligned=aligned, requests=requests)
            for col in [*profile.numeric, *profile.categorical]}


def _skipped(cleaned: dict[str, _WindowColumn]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    empty = {col: wc for col, wc in cleaned.items() if wc.n == 0}
    return {col: _skip_reason(wc) for col, wc in empty.items()}, {col: wc.set_aside for col, wc in empty.items()}


def fast_check(profile: ReferenceProfile, current: pd.DataFrame, options: DriftOptions) -> DriftResult:
    """The continuous check: every reference column of ``current`` against the profile."""
    cleaned = _clean_columns(profile, current, options)
    columns = [_column_check(col, profile.columns[col], wc, options) for col, wc in cleaned.items() if wc.n]
    return DriftResult(columns, options.drift_share, profile.n, len(current), "fast", *_skipped(cleaned))


# -- Evidently (judge of record) --------------------------------------------------------------
def evidently_report(reference: pd.DataFrame, current: pd.DataFrame, numeric: list[str], categorical: list[str],
                     options: DriftOptions) -> tuple[Any, DriftResult]:
    """Run ``DataDriftPreset`` on the window cleaned as the fast path cleans it, and read its verdict per
    column (method, value, threshold, test status)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    profile = ReferenceProfile.build(reference, numeric, categorical)
    cleaned = _clean_columns(profile, current, options, aligned=True)
    skipped, skipped_counts = _skipped(cleaned)
    checked = [col for col in cleaned if col not in skipped]
    if not checked:
        raise MonitorError(f"no column has values to compare in the current window: {skipped}")
    num, cat = [c for c in numeric if c in checked], [c for c in categorical if c in checked]
    ref = profile.frame[checked]
    cur = pd.DataFrame({col: cleaned[col].aligned for col in checked}, index=current.index)
    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
    report = Report([DataDriftPreset(**options.preset_kwargs())], include_tests=True)
    try:
        # Evidently's report also computes the columns' correlations (np.corrcoef), which divides by zero for a
        # constant column and prints a RuntimeWarning into the monitor's log at every report: not the user's
        # concern and not part of the verdict. errstate is this thread's only, unlike a warnings filter.
        with np.errstate(invalid="ignore", divide="ignore"):
            snapshot = report.run(current_data=Dataset.from_pandas(cur, data_definition=definition),
                                  reference_data=Dataset.from_pandas(ref, data_definition=definition))
    except ValueError as exc:
        raise MonitorError(f"Evidently could not compare the data: {exc}") from exc
    result = result_from_snapshot(snapshot.dict(), numeric, options.drift_share, len(ref), len(cur),
                                  {col: cleaned[col].set_aside for col in checked})
    result.skipped, result.skipped_set_aside = skipped, skipped_counts
    return snapshot, result


def result_from_snapshot(data: dict[str, Any], numeric: list[str], drift_share: float, n_reference: int,
                         n_current: int, set_aside: dict[str, dict[str, int]] | None = None) -> DriftResult:
    """Per-column verdicts from a snapshot's ``.dict()`` (``ValueDrift`` metrics + their tests)."""
    failed = {t["metric_config"]["metric_id"] for t in data.get("tests", []) if t.get("status") == "FAIL"}
    columns = []
    for metric in data["metrics"]:
        config = metric["config"]
        if not config.get("type", "").endswith("ValueDrift"):
            continue
        col = config["column"]
        columns.append(ColumnDrift(col, NUMERICAL if col in numeric else CATEGORICAL, method_name(config["method"]),
                                   float(metric["value"]), float(config["threshold"]), metric["id"] in failed,
                                   n_reference, n_current, dict((set_aside or {}).get(col, {}))))
    return DriftResult(columns, drift_share, n_reference, n_current, "evidently")


def save_report(snapshot: Any, directory: Path, stem: str = "drift") -> tuple[Path, Path]:
    """Write the report as ``<stem>.html`` and ``<stem>.json`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    html, js = directory / f"{stem}.html", directory / f"{stem}.json"
    snapshot.save_html(str(html))
    snapshot.save_json(str(js))
    return html, js
