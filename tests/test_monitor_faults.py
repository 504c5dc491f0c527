"""The store under faults: nothing is acknowledged that was not durably stored.

Store files deleted or replaced mid-run, a truncated ``-shm`` (SIGBUS territory)
and commits failing with "disk I/O error": ``/events`` answers 503 saying why, ``/readyz`` says
the same, every event acknowledged with 200 is in the store after a restart, and the service
keeps answering.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from starlette.testclient import TestClient

from monitoring.metrics import MonitorMetrics
from monitoring.sink import create_sink_app
from monitoring.store import InferenceStore
from tests.ce_events import COLUMNS, pair


def _client(store: InferenceStore) -> TestClient:
    app = create_sink_app(store, metrics=MonitorMetrics(), model_names={"churn"}, reference_columns=COLUMNS)
    return TestClient(app)


def _post_pair(client: TestClient, ce_id: str) -> list[int]:
    codes = []
    for headers, body in pair(ce_id):
        codes.append(client.post("/events", content=body, headers=headers).status_code)
    return codes


def _fill(client: TestClient, prefix: str, n: int) -> set[str]:
    acked = set()
    for i in range(n):
        if _post_pair(client, f"{prefix}{i}") == [200, 200]:
            acked.add(f"{prefix}{i}")
    return acked


def test_deleted_store_files_refuse_events_and_readiness(tmp_path):
    path = tmp_path / "inference.db"
    store = InferenceStore(path)
    with _client(store) as client:
        acked = _fill(client, "before", 5)
        assert len(acked) == 5 and client.get("/readyz").status_code == 200
        for f in tmp_path.glob("inference.db*"):  # rm inference.db*
            f.unlink()
        headers, body = pair("after")[0]
        r = client.post("/events", content=body, headers=headers)
        assert r.status_code == 503 and "was deleted" in r.json()["error"], r.text
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "was deleted" in ready.json()["error"]
        assert client.get("/healthz").status_code == 200  # the service keeps answering
        assert not path.exists()  # nothing re-created a fresh empty file behind the writer's back
    store.close()
    with InferenceStore(path) as restarted:  # nothing acknowledged after the deletion is missing
        assert "after" not in restarted.event_ids()


def test_replaced_store_file_is_refused(tmp_path):
    path = tmp_path / "inference.db"
    store = InferenceStore(path)
    with _client(store) as client:
        acked = _fill(client, "a", 3)
        backup = tmp_path / "copy.db"
        shutil.copy(path, backup)
        os.replace(backup, path)  # e.g. a restore from a backup while the monitor runs
        r = client.post("/events", content=pair("late")[0][1], headers=pair("late")[0][0])
        assert r.status_code == 503 and "was replaced" in r.json()["error"]
        assert client.get("/readyz").status_code == 503
    store.close()
    assert acked == {"a0", "a1", "a2"}


def test_truncated_shm_is_refused_not_a_sigbus(tmp_path):
    """A truncated ``-shm`` mapped by SQLite kills the process with SIGBUS at its next access."""
    script = textwrap.dedent(f"""
        import os, time
        from starlette.testclient import TestClient
        from monitoring.metrics import MonitorMetrics
        from monitoring.sink import create_sink_app
        from monitoring.store import InferenceStore
        from tests.ce_events import COLUMNS, pair
        store = InferenceStore({str(tmp_path / 'inference.db')!r}, checkpoint_seconds=0.05)
        app = create_sink_app(store, metrics=MonitorMetrics(), model_names={{"churn"}}, reference_columns=COLUMNS)
        with TestClient(app) as c:
            for h, b in pair("a"):
                assert c.post("/events", content=b, headers=h).status_code == 200
            os.truncate({str(tmp_path / 'inference.db-shm')!r}, 0)
            time.sleep(0.3)  # the checkpointer ticks meanwhile
            h, b = pair("b")[0]
            r = c.post("/events", content=b, headers=h)
            print(r.status_code, r.json()["error"])
            print(c.get("/readyz").status_code)
        store.close()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    status, error = proc.stdout.splitlines()[0].split(" ", 1)
    assert status == "503" and "was truncated" in error
    assert proc.stdout.splitlines()[1] == "503"


class _FailingCommits:
    """The writer connection, with COMMIT failing like a full or broken disk while ``failing`` is set."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.failing = True

    def execute(self, sql: str, *args):
        if self.failing and sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self._db, name)


def test_failing_commits_answer_503_and_readiness_follows(tmp_path):
    path = tmp_path / "inference.db"
    store = InferenceStore(path)
    with _client(store) as client:
        acked = _fill(client, "ok", 3)
        real = store._db
        store._db = failing = _FailingCommits(real)
        headers, body = pair("lost")[0]
        r = client.post("/events", content=body, headers=headers)
        assert r.status_code == 503 and "disk I/O error" in r.json()["error"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "disk I/O error" in ready.json()["error"]
        failing.failing = False  # the disk recovers: readiness comes back without any event
        assert client.get("/readyz").status_code == 200
        assert client.post("/events", content=body, headers=headers).status_code == 200  # the client's retry
        store._db = real
    store.close()
    with InferenceStore(path) as restarted:
        assert acked | {"lost"} == restarted.event_ids()
