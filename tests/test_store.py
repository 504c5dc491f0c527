"""The SQLite/WAL inference store: pairing by ce-id, atomicity, restart, windows, labels, quality."""

import sqlite3

import pytest

from monitoring import store_write
from monitoring.events import EventError, parse_binary
from monitoring.store import InferenceStore, StoreUnavailable
from tests.ce_events import binary, instance, pair


def events_of(ce_id, n=1, start=0, version="1", role="champion", t=None):
    (rq_h, rq_b), (rs_h, rs_b) = pair(ce_id, n, start, version, role)
    return parse_binary(rq_h, rq_b, received_at=t), parse_binary(rs_h, rs_b, received_at=t)


def test_pairs_request_and_response_in_either_order(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        req, resp = events_of("a", n=3, version="5", role="challenger")
        assert store.append_events([req]) == 1
        assert store.count() == 0 and store.counts()["unpaired"] == 1
        assert store.append_events([resp]) == 1
        req2, resp2 = events_of("b", n=1, start=10)
        store.append_events([resp2, req2])
        df = store.rows()
    assert list(df["request_id"]) == ["a", "a", "a", "b"]
    assert list(df["row_index"]) == [0, 1, 2, 0]
    assert list(df["model_version"]) == ["5", "5", "5", "1"]
    assert list(df["role"]) == ["challenger"] * 3 + ["champion"]
    assert list(df["prediction"]) == [0, 1, 0, 0]
    assert df.loc[1, "tenure"] == instance(1)["tenure"] and df.loc[3, "region"] == instance(10)["region"]
    assert df["sessions"].dtype == "float64" and df["sessions"].isna().iloc[0]  # None -> NaN
    assert str(df["ts"].dt.tz) == "UTC"


def test_unpaired_events_survive_restart_and_pair_later(tmp_path):
    path = tmp_path / "log.db"
    req, resp = events_of("a", n=2)
    store = InferenceStore(path)
    store.append_events([req])
    store.close()
    with InferenceStore(path) as store:
        store.append_events([resp])
        assert store.count() == 2 and store.counts()["unpaired"] == 0


def test_pairing_falls_back_to_the_database_beyond_the_memory_bound(tmp_path):
    with InferenceStore(tmp_path / "log.db", max_pending=2) as store:
        evs = [events_of(f"e{i}") for i in range(5)]
        store.append_events([rq for rq, _ in evs])  # 5 pending, only 2 kept in memory
        store.append_events([rs for _, rs in evs])
        assert store.count() == 5 and store.counts()["unpaired"] == 0


def test_duplicates_are_stored_once(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        req, resp = events_of("a")
        assert store.append_events([req, resp]) == 2
        assert store.append_events([req, resp]) == 0
        assert store.count() == 1 and store.counts()["events"] == 2


def test_row_count_mismatch_rejected_and_group_is_atomic(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        req, _ = events_of("a", n=3)
        store.append_events([req])
        ok_req, ok_resp = events_of("ok")
        bad_resp = parse_binary(*binary("a", "response", {"predictions": [1, 0]}))
        results = store.append_groups([[ok_req, bad_resp], [ok_resp]])
        assert isinstance(results[0], EventError) and results[0].status == 422
        assert "3 rows" in results[0].message and "2 predictions" in results[0].message
        assert results[1].responses == 1 and results[1].rows == 0
        # the failed group stored nothing (not even ok_req): ok's response stays unpaired
        assert store.event_ids("request") == {"a"} and store.count() == 0
        with pytest.raises(EventError):
            store.append_events([bad_resp])
        # the original request is still waiting and pairs with a correct response
        good = parse_binary(*binary("a", "response", {"predictions": [1, 0, 1]}))
        store.append_events([good])
        assert store.count() == 3


def test_database_error_stores_nothing_and_keeps_earlier_data(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        store.append_events(list(events_of("a")))
        other = sqlite3.connect(tmp_path / "log.db", timeout=0.1)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        store._db.execute("PRAGMA busy_timeout=100")
        with pytest.raises(StoreUnavailable, match="database is locked") as refused:
            store.append_events(list(events_of("b")))
        assert refused.value.status == 503 and isinstance(refused.value.__cause__, sqlite3.OperationalError)
        assert "database is locked" in store.health()  # /readyz says so until a commit works again
        other.rollback()
        other.close()
        assert store.count() == 1 and store.event_ids() == {"a"}
        store.append_events(list(events_of("b")))  # the in-memory pairing state was rolled back too
        assert store.count() == 2 and store.health() is None


def test_windows(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        for i in range(25):
            store.append_events(list(events_of(f"r{i:02d}", start=i, t=1000.0 + i * 10)))
        tumbling = store.window("tumbling", rows=10)
        assert tumbling.complete and list(tumbling.rows["request_id"]) == [f"r{i:02d}" for i in range(10, 20)]
        assert tumbling.id == store.window("tumbling", rows=10).id
        sliding = store.window("sliding", rows=10)
        assert list(sliding.rows["request_id"]) == [f"r{i:02d}" for i in range(15, 25)]
        timed = store.window("sliding", rows=100, seconds=50, now=1250.0)
        assert list(timed.rows["request_id"]) == [f"r{i:02d}" for i in range(20, 25)]
        # tumbling by time: intervals of 100 s aligned at 0; at t=1250 the last complete one is [1100, 1200)
        tt = store.window("tumbling", rows=1000, seconds=100, now=1250.0)
        assert tt.complete and (tt.start_ts, tt.end_ts) == (1100.0, 1200.0) and tt.n == 10
        capped = store.window("tumbling", rows=4, seconds=100, now=1250.0)
        assert list(capped.rows["request_id"]) == ["r16", "r17", "r18", "r19"]
        assert store.count(since=1200.0) == 5


def test_first_tumbling_window_is_partial(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        for i in range(3):
            store.append_events(list(events_of(f"p{i}")))
        win = store.window("tumbling", rows=10)
        assert not win.complete and win.n == 3


def test_labels_and_quality_by_version(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        store.append_events(list(events_of("a", n=2, start=0, version="1")))  # predictions 0, 1
        store.append_events(list(events_of("b", n=2, start=0, version="2")))  # predictions 0, 1
        res = store.add_labels([{"id": "a", "label": 0}, {"id": "a", "row_index": 1, "label": 0},
                                {"id": "b", "label": 0}, {"id": "b", "row_index": 1, "label": 1},
                                {"id": "ghost", "label": 1}])
        assert res.stored == 5 and res.unknown_ids == ["ghost"]
        q = store.quality_by_version()
        assert q == {"1": {"n": 2, "accuracy": 0.5}, "2": {"n": 2, "accuracy": 1.0}}
        qr = store.quality_by_version(task="regression")
        assert qr["1"]["rmse"] == pytest.approx(0.5 ** 0.5) and qr["2"]["mae"] == 0.0
        for bad in ({"label": 1}, {"id": "a", "label": 1, "ts": "noon"}, {"id": "a", "label": 1, "row_index": -1}):
            with pytest.raises(EventError) as err:
                store.add_labels([bad])
            assert err.value.status == 422


def test_store_from_settings_lives_in_the_workspace(tmp_path):
    from driftloop.core.config import load_settings

    s = load_settings(overrides={"workspace": str(tmp_path / "ws")}, environ={})
    with InferenceStore.from_settings(s) as store:
        assert store.path == tmp_path / "ws" / "monitor" / "inference.db" and store.synchronous == "NORMAL"
    s = load_settings(overrides={"workspace": str(tmp_path / "ws"), "monitor.store": "logs/x.db",
                                 "monitor.store_synchronous": "FULL"}, environ={})
    with InferenceStore.from_settings(s) as store:
        store.append_events(list(events_of("a")))
        assert store.path == tmp_path / "ws" / "logs" / "x.db" and store.count() == 1
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_event_in_a_refused_group_and_an_accepted_one_is_stored_once(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        req_a, _ = events_of("a", n=2)
        store.append_events([req_a])
        shared_req, shared_resp = events_of("s")
        bad = parse_binary(*binary("a", "response", {"predictions": [1]}))
        # group 1 is refused (a's row count) after claiming "s"; group 2 re-sends "s" and must keep it
        results = store.append_groups([[shared_req, bad], [shared_req, shared_req, shared_resp]])
        assert isinstance(results[0], EventError)
        assert (results[1].requests, results[1].responses, results[1].duplicates, results[1].rows) == (1, 1, 1, 1)
        assert store.counts() == {"events": 3, "unpaired": 1, "rows": 1, "labels": 0}


def test_restart_reloads_unpaired_events_within_the_lookback(tmp_path):
    path = tmp_path / "log.db"
    with InferenceStore(path) as store:
        store.append_events([events_of(f"u{i}")[0] for i in range(3)])
        store.append_events(list(events_of("done")))
    with InferenceStore(path, pair_lookback=3) as store:  # the last 3 events: u2 and done's pair
        assert list(store._pending) == ["u2"]
        store.append_events([events_of("u2")[1], events_of("u0")[1]])
        assert set(store.rows()["request_id"]) == {"done", "u2"}  # u0 was older than the look-back
        assert store.counts()["unpaired"] == 1  # u1's request; u0's events are both stored (unpaired rows)
    with InferenceStore(path) as store:
        assert store.counts()["events"] == 7 and store.count() == 2


def test_empty_store_reads(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        win = store.window("tumbling", rows=10)
        assert win.n == 0 and not win.complete and store.quality_by_version() == {}
        assert list(store.rows().columns) == ["seq", "request_id", "row_index", "ts", "model_name", "model_version",
                                              "role", "prediction"]
        with pytest.raises(ValueError):
            store.window("tumbling")


def test_only_events_left_waiting_keep_their_flattened_rows_and_pair_after_a_restart(tmp_path):
    path = tmp_path / "log.db"
    with InferenceStore(path) as store:
        store.append_events(list(events_of("together", n=3)))  # the local gateway sends both halves at once
        store.append_events([events_of("alone", n=2)[0]])  # KServe's logger sends them apart
        # a group pairs "late" with an earlier group's request, then is refused: "late" waits again
        late_req, late_resp = events_of("late", n=2)
        bad = parse_binary(*binary("alone", "response", {"predictions": [1, 0, 1]}))
        results = store.append_groups([[late_req], [late_resp, bad]])
        assert isinstance(results[1], EventError) and store.counts()["unpaired"] == 2
    db = sqlite3.connect(path)
    flat = dict(db.execute("SELECT ce_id || '/' || kind, flat FROM events").fetchall())
    db.close()
    # paired in the transaction that stored them: their rows are in ``rows``, no third copy
    assert flat["together/request"] == b"" and flat["together/response"] == b""
    assert flat["alone/request"].count(b"tenure") == 2 and flat["late/request"].count(b"tenure") == 2
    with InferenceStore(path, max_pending=0) as store:  # nothing in memory: the counterparts come from the database
        store.append_events([events_of("alone", n=2)[1], late_resp])
        assert store.counts()["unpaired"] == 0
        rows = store.rows()
    assert sorted(rows["request_id"]) == ["alone"] * 2 + ["late"] * 2 + ["together"] * 3
    assert list(rows[rows.request_id == "late"]["tenure"]) == [instance(0)["tenure"], instance(1)["tenure"]]


def test_one_thread_checkpoints_every_store_and_leaves_an_idle_one_alone(tmp_path, monkeypatch):
    import threading
    import time

    calls: dict[str, list[tuple[int, int]]] = {}
    real = InferenceStore.checkpoint

    def spy(self):
        before = self._checkpointed
        real(self)
        if self.path.parent == tmp_path:  # other tests' stores still open in this process share the thread
            calls.setdefault(self.path.name, []).append((before, self._checkpointed))

    monkeypatch.setattr(InferenceStore, "checkpoint", spy)
    stores = [InferenceStore(tmp_path / f"m{i}.db", checkpoint_seconds=0.05) for i in range(6)]
    try:
        names = [t.name for t in threading.enumerate()]
        assert names.count("store-checkpoints") == 1 and "store-checkpoint" not in names  # one thread, not six
        sizes = {s.path.name: s.path.stat().st_size for s in stores}
        for i, store in enumerate(stores[:5]):  # m5 stays idle after its start
            store.append_events([e for k in range(40) for e in events_of(f"{i}-{k}", n=3)])
        time.sleep(0.6)
        for store in stores[:5]:
            # the committed frames were copied into the database file by the shared thread
            assert store.path.stat().st_size > sizes[store.path.name], store.path
            assert store._checkpointed == store._commits
        idle = calls["m5.db"]
        # visited every interval, but checkpointed once (what its start left in the WAL) and then left alone
        assert len(idle) >= 3 and sum(1 for before, after in idle if after != before) == 1
    finally:
        for store in stores:
            store.close()
    visits = sum(len(v) for v in calls.values())
    time.sleep(0.3)
    assert sum(len(v) for v in calls.values()) == visits  # a closed store is not visited again



def test_a_group_commit_of_any_size_stores_each_event_once_with_a_few_statement_texts(tmp_path, monkeypatch):
    """Events of one call go in as multi-row INSERTs of a few fixed sizes (a new size is a new statement for
    SQLite to compile): every count still stores each new event once, pairs it, and skips the duplicates,
    wherever they fall among the statements."""
    flat = [ev for i in range(1200) for ev in events_of(f"c{i}")]  # 2400 events: request, response, ...
    with InferenceStore(tmp_path / "log.db") as store:
        sizes = []
        monkeypatch.setattr(store_write, "_insert_sql", lambda n, sql=store_write._insert_sql: sizes.append(n) or sql(n))
        assert store.append_events(flat[:2341]) == 2341  # 2048 + 256 + 32 + 5
        assert store.count() == 1170 and store.counts()["unpaired"] == 1
        assert store.append_events(flat[2000:2400]) == 59  # 256 + 4 * 32 + 16: 341 stored before, 59 new
        assert store.append_events(flat[5:42]) == 0  # 37 at once (up to 64: one statement of its own size)
        assert store.count() == 1200 and store.counts() == {**store.counts(), "events": 2400, "unpaired": 0}
        assert sorted(store.rows()["request_id"].unique()) == sorted(f"c{i}" for i in range(1200))
    assert sizes == [2048, 256, 32, 5, 256, 32, 32, 32, 32, 16, 37]  # statements of 2341, 400 and 37 events
