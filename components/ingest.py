"""Ingest: read a table from a URI (:func:`driftloop.core.tables.read_table`), cut a time window,
split train/test, keep a reference sample."""

import logging
from dataclasses import dataclass

import pandas as pd

from driftloop.core.errors import DataSourceError, DataValidationError
from driftloop.core.tables import read_table

__all__ = ["read_table", "ingest", "IngestResult", "parse_times", "MAX_NULL_TIME_SHARE"]

log = logging.getLogger(__name__)

# Rows without a time are dropped with a warning; more than this share of them stops the run.
MAX_NULL_TIME_SHARE = 0.10


@dataclass(frozen=True)
class IngestResult:
    train: pd.DataFrame
    test: pd.DataFrame
    reference: pd.DataFrame
    window: str


def _to_utc(value: str, column: str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise DataSourceError(f"time window bound {value!r} for column {column!r} is not a timestamp") from exc
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def parse_times(values: pd.Series, column: str, *, max_null_share: float = MAX_NULL_TIME_SHARE) -> pd.Series:
    """The time column as UTC timestamps, every row parsed or the run stopped naming the column.

    Formats and UTC offsets may differ from row to row ("2026-01-05T10:00:00+01:00" beside
    "2026-01-05 09:00:00Z" or "05 Jan 2026"): ISO 8601 first, the rest one by one
    (``format="mixed"``); times without an offset are taken as UTC. A value that is no time
    stops the run (:class:`DataValidationError` with the value); missing times are dropped by
    the caller with a warning, or stop the run when more than ``max_null_share`` of rows lack one.
    """
    missing = values.isna()
    if missing.all():
        raise DataSourceError(f"time column {column!r} holds no parseable timestamps")
    share = float(missing.mean())
    if share > max_null_share:
        raise DataValidationError(
            f"time column {column!r} is empty in {int(missing.sum())} of {len(values)} rows ({share:.0%}, more than "
            f"the {max_null_share:.0%} allowed): fill the times or cut those rows from the source",
            column=column, rule="max_null_time_share")
    if pd.api.types.is_datetime64_any_dtype(values) or pd.api.types.is_numeric_dtype(values):
        return pd.to_datetime(values, errors="coerce", utc=True)
    text = values.astype("string").str.strip()
    times = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
    rest = times.isna() & ~missing
    if rest.any():
        times.loc[rest] = pd.to_datetime(text[rest], errors="coerce", utc=True, format="mixed")
    bad = times.isna() & ~missing
    if bad.any():
        example = values[bad].iloc[0]
        raise DataValidationError(
            f"time column {column!r}: {int(bad.sum())} of {len(values)} values are not timestamps "
            f"(e.g. {example!r} in row {bad.idxmax()}); use ISO 8601 times such as 2026-01-31T12:00:00Z",
            column=column, rule="timestamp")
    return times


def ingest(
    df: pd.DataFrame,
    *,
    target: str,
    time_column: str | None = None,
    window_start: str | None = None,
    window_end: str | None = None,
    test_size: float = 0.2,
    reference_size: int = 5000,
    seed: int = 42,
) -> IngestResult:
    """Cut the time window and split. Time-ordered split when a time column is given."""
    window = "all rows"
    if time_column:
        if time_column not in df.columns:
            raise DataSourceError(f"time column {time_column!r} is not in the data (columns: {', '.join(map(str, df.columns))})")
        times = parse_times(df[time_column], time_column)
        mask = times.notna()
        if not mask.all():
            log.warning("ingest: dropped %d of %d rows with no time in column %r", int((~mask).sum()), len(df),
                        time_column)
        if window_start:
            mask &= times >= _to_utc(window_start, time_column)
        if window_end:
            mask &= times < _to_utc(window_end, time_column)
        df = df.loc[mask].copy()
        if df.empty:
            raise DataSourceError(
                f"the time window [{window_start or '-inf'}, {window_end or '+inf'}) on {time_column!r} holds no rows"
            )
        df = df.assign(**{time_column: times.loc[df.index]}).sort_values(time_column, kind="stable")
        window = f"{df[time_column].iloc[0].isoformat()} .. {df[time_column].iloc[-1].isoformat()}"
    if len(df) < 10:
        raise DataSourceError(f"only {len(df)} rows in the data window; at least 10 are needed to train and test")
    if target not in df.columns:
        raise DataSourceError(f"target column {target!r} is not in the data (columns: {', '.join(map(str, df.columns))})")
    n_test = max(1, int(round(len(df) * test_size)))
    if time_column:
        train, test = df.iloc[:-n_test], df.iloc[-n_test:]
    else:
        shuffled = df.sample(frac=1.0, random_state=seed)
        train, test = shuffled.iloc[n_test:], shuffled.iloc[:n_test]
    reference = train.sample(n=min(reference_size, len(train)), random_state=seed)
    return IngestResult(train.reset_index(drop=True), test.reset_index(drop=True), reference.reset_index(drop=True), window)
