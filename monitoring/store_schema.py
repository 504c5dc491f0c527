"""The inference store's schema and its migrations (see :mod:`monitoring.store` for the tables' meaning).

:data:`SCHEMA` creates what a new store needs; :func:`migrate` brings a store made by an earlier
version up to it (a column or index added, never one removed), so an old ``inference.db`` keeps
its data. :data:`UNPAIRED` is the one SQL condition both the writer (reloading the events that wait
for their counterpart) and the readers (counting them) use.
"""

from __future__ import annotations

import sqlite3

__all__ = ["SCHEMA", "UNPAIRED", "create_schema", "migrate"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    ce_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT,
    role TEXT,
    attributes TEXT NOT NULL,
    body BLOB NOT NULL,
    flat TEXT NOT NULL,
    received_at REAL NOT NULL,
    request_key TEXT,
    UNIQUE (ce_id, kind)
);
CREATE TABLE IF NOT EXISTS rows (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    ts REAL NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT,
    role TEXT,
    features TEXT NOT NULL,
    prediction TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rows_ts ON rows (ts);
CREATE INDEX IF NOT EXISTS rows_request ON rows (request_id, row_index);
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    label TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (request_id, row_index)
);
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL
);
"""

# An event is unpaired while its counterpart is not stored: pairing is 1:1 on the unique
# (ce_id, kind), so this needs no flag to update when a pair completes.
UNPAIRED = "NOT EXISTS (SELECT 1 FROM events o WHERE o.ce_id = e.ce_id AND o.kind != e.kind)"


def create_schema(db: sqlite3.Connection) -> None:
    """Create the tables a new store needs and migrate those of an older one."""
    db.executescript(SCHEMA)
    migrate(db)


def migrate(db: sqlite3.Connection) -> None:
    """Bring a store made by an earlier version up to this schema (a column added, never removed)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
    if "request_key" not in columns:
        db.execute("ALTER TABLE events ADD COLUMN request_key TEXT")
    # only events that carry a key are indexed: the local gateway's primary events carry none
    db.execute("CREATE INDEX IF NOT EXISTS events_request_key ON events (request_key) WHERE request_key IS NOT NULL")
