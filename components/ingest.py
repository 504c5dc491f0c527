"""Ingest: read a table from a URI, cut a time window, split train/test, keep a reference sample."""

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from driftloop.errors import DataSourceError

__all__ = ["read_table", "ingest", "IngestResult"]

log = logging.getLogger(__name__)


def _normalise_uri(uri: str) -> str:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return uri


def read_table(uri: str, fmt: str = "auto") -> pd.DataFrame:
    """Read parquet or csv from a local path or any fsspec URI (s3://, gs://, http(s)://)."""
    if not uri:
        raise DataSourceError("no data source given (set data.source)")
    path = _normalise_uri(uri)
    if fmt == "auto":
        lowered = path.lower().split("?")[0]
        fmt = "csv" if lowered.endswith((".csv", ".csv.gz")) else "parquet"
    is_remote = "://" in path
    if not is_remote and not Path(path).exists():
        raise DataSourceError(f"data source not found: {uri}")
    try:
        if fmt == "csv":
            df = pd.read_csv(path)
        else:
            df = pd.read_parquet(path)
    except FileNotFoundError as exc:
        raise DataSourceError(f"data source not found: {uri}") from exc
    except ImportError as exc:
        raise DataSourceError(f"cannot read {uri}: a filesystem driver is missing ({exc})") from exc
    except Exception as exc:  # pyarrow/pandas raise many types for corrupt files
        raise DataSourceError(f"cannot read {uri} as {fmt}: {type(exc).__name__}: {exc}") from exc
    if df.empty:
        raise DataSourceError(f"data source {uri} has no rows")
    return df


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
