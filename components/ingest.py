"""Ingest: read a table from a URI (:func:`driftloop.core.tables.read_table`), cut a time window,
split train/test, keep a reference sample."""

import logging
from dataclasses import dataclass

import pandas as pd

from driftloop.core.errors import DataSourceError
from driftloop.core.tables import read_table

__all__ = ["read_table", "ingest", "IngestResult"]

log = logging.getLogger(__name__)


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
        times = pd.to_datetime(df[time_column], errors="coerce", utc=True)
        if times.isna().all():
            raise DataSourceError(f"time column {time_column!r} holds no parseable timestamps")
        mask = times.notna()
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
