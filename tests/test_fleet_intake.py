"""A fleet monitor's intake journal: every model's events of a round in one commit, moved into each model's
own store in batches; acknowledged means durable, a read sees every acknowledged event, a kill loses nothing,
one model's failing store never holds back the others."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from monitoring.events import EventError, parse_binary
from monitoring.intake import IntakeJournal, _blob, _entries, _prepared
from monitoring.metrics import MonitorMetrics
from monitoring.sink import GroupCommitter
from monitoring.store import InferenceStore, StoreUnavailable
from monitoring.store_write import event_tuple, prepared
from tests.ce_events import binary, instance, pair

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("a", "b", "c")


def _events(model: str, ce_id: str, n: int = 1):
    (rq_h, rq_b), (rs_h, rs_b) = pair(ce_id, n)
    req, resp = parse_binary(rq_h, rq_b), parse_binary(rs_h, rs_b)
    return req, resp


def _fleet(tmp_path: Path, **kwargs):
    committers = {m: GroupCommitter(InferenceStore(tmp_path / m / "inference.db"), MonitorMetrics()) for m in MODELS}
    journal = IntakeJournal(tmp_path / "intake.db", committers, **{"drain_seconds": 3600, **kwargs})
    return committers, journal


def _journal_rows(path: Path, table: str = "intake") -> list[str]:
    """The model of each event in the journal, in order."""
    con = sqlite3.connect(path)
    try:
        blobs = [blob for (blob,) in con.execute(f"SELECT events FROM {table} ORDER BY seq")]
    finally:
        con.close()
    return [model for blob in blobs for model, groups in _entries([blob])[0].items() for g in groups for _ in g]


def _close(committers, journal) -> None:
    journal.close()
    for c in committers.values():
        c.store.close()


async def _send_round(committers, ids_by_model: dict[str, list[str]]) -> list:
    """Each id's request and response as single events, all models' concurrently (one round)."""
    calls = []
    for model, ids in ids_by_model.items():
        for ce_id in ids:
            req, resp = _events(model, ce_id)
            calls += [committers[model].submit([req]), committers[model].submit([resp])]
    return await asyncio.gather(*calls, return_exceptions=True)


def test_a_round_of_every_model_is_one_journal_commit_and_reads_see_it_before_the_drain(tmp_path):
    committers, journal = _fleet(tmp_path)
    try:
        commits = journal._commits
        ids = {m: [f"{m}-{i}" for i in range(5)] for m in MODELS}
        results = asyncio.run(_send_round(committers, ids))
        assert all(r.stored == 1 and r.duplicates == 0 for r in results), results
        assert journal._commits == commits + 1  # 30 events of 3 models: one commit, one row
        assert journal.waiting == 30 and len(_journal_rows(journal.path)) == 30
        con = sqlite3.connect(journal.path)
        assert con.execute("SELECT COUNT(*) FROM intake").fetchone()[0] == 1
        assert con.execute("PRAGMA page_size").fetchone()[0] == 16384
        con.close()
        assert committers["a"].store._commits == 1  # nothing in the stores yet ...
        # ... but a read moves every acknowledged event in first: each model's pairs, in its own store only
        assert committers["a"].store.count() == 5
        assert journal.waiting == 0 and _journal_rows(journal.path) == []
        for m in MODELS:
            assert sorted(committers[m].store.rows()["request_id"]) == sorted(ids[m])
            assert committers[m].metrics.events_ingested.labels(type="request")._value.get() == 5
            assert committers[m].metrics.rows_stored._value.get() == 5
    finally:
        _close(committers, journal)


def test_the_journal_row_gives_back_the_event_and_the_store_writes_what_it_writes_for_the_parsed_one(tmp_path):
    events = []
    for i in range(6):
        for kind, data in (("request", {"instances": [instance(i), instance(i + 1)]}),
                           ("response", {"predictions": [1, 0]})):
            headers, body = binary(f"x-{i}", kind, data, version="3" if kind == "response" else None)
            events.append(parse_binary(headers, body, received_at=12.5 + i))
    events[1].body = "{\"predictions\": [1, 0], \"note\": \"ü\"}".encode()  # not ASCII, spaces kept
    journaled = [ev for group in _prepared(_entries([_blob([("m", [event_tuple(ev) for ev in events])])])[0]["m"])
                 for ev in group]
    assert journaled == [prepared(ev) for ev in events]
    waiting, named = event_tuple(events[0]), prepared(events[0])
    gc.collect()  # collections stop tracking plain tuples of atoms (the inner tuple first, then the event's), not a
    gc.collect()  # NamedTuple: what waits for the drain costs the collector nothing
    assert not gc.is_tracked(waiting) and gc.is_tracked(named)
    tables = []
    for name, evs in (("parsed", events), ("journaled", journaled)):
        with InferenceStore(tmp_path / f"{name}.db") as store:  # responses first for half: pairs either way
            store.append_groups([[ev] for ev in evs[6:]] + [[ev] for ev in evs[:6][::-1]])
        con = sqlite3.connect(tmp_path / f"{name}.db")
        tables.append([con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("events", "rows")])
        con.close()
    assert tables[0] == tables[1] and len(tables[0][1]) == 12


def test_the_drain_thread_moves_events_and_close_moves_the_rest(tmp_path):
    committers, journal = _fleet(tmp_path, drain_seconds=0.05)
    try:
        asyncio.run(_send_round(committers, {"b": ["b-1", "b-2"]}))
        deadline = 200
        while journal.waiting and deadline:
            deadline -= 1
            asyncio.run(asyncio.sleep(0.02))
        assert journal.waiting == 0 and _journal_rows(journal.path) == []
        assert committers["b"].store._commits > 1  # moved by the drain thread, not by a read
        asyncio.run(_send_round(committers, {"c": ["c-1"]}))
    finally:
        _close(committers, journal)
    with InferenceStore(tmp_path / "c" / "inference.db") as store:
        assert store.count() == 1  # what waited at close went into the store before it closed


def test_a_failing_store_keeps_its_events_and_never_holds_back_the_others(tmp_path, monkeypatch, caplog):
    committers, journal = _fleet(tmp_path)
    try:
        asyncio.run(_send_round(committers, {m: [f"{m}-1"] for m in MODELS}))
        real = InferenceStore.append_groups

        def failing(self, groups):
            if self is committers["b"].store:
                raise StoreUnavailable("the inference store cannot commit: disk I/O error")
            return real(self, groups)

        monkeypatch.setattr(InferenceStore, "append_groups", failing)
        with caplog.at_level(logging.ERROR, logger="monitoring.intake"):
            journal.drain()
        assert "model b: 2 events wait in the intake journal" in caplog.text
        assert _journal_rows(journal.path) == ["b", "b"]  # a's and c's rows deleted, b's kept
        assert journal.waiting == 2
        monkeypatch.setattr(InferenceStore, "append_groups", real)
        journal.drain()  # the store takes them again
        assert _journal_rows(journal.path) == [] and committers["b"].store.count() == 1
        # a closed store refuses at once (503), the others keep taking events
        committers["c"].store.close()
        results = asyncio.run(_send_round(committers, {"a": ["a-2"], "c": ["c-2"]}))
        assert [type(r).__name__ for r in results] == ["GroupResult", "GroupResult", "StoreUnavailable",
                                                       "StoreUnavailable"]
        assert committers["a"].store.count() == 2
    finally:
        _close(committers, journal)


def test_what_the_store_refuses_when_it_pairs_is_counted_and_the_rest_is_stored(tmp_path, caplog):
    committers, journal = _fleet(tmp_path)
    try:
        req, _ = _events("a", "bad", n=2)
        _, resp = _events("a", "bad", n=1)  # the response disagrees on the number of instances
        good = _events("a", "good")

        async def send():
            return await asyncio.gather(committers["a"].submit([req]), committers["a"].submit([resp]),
                                        committers["a"].submit(list(good)))

        assert all(r.stored for r in asyncio.run(send()))  # acknowledged: in the journal
        with caplog.at_level(logging.ERROR, logger="monitoring.intake"):
            assert committers["a"].store.count() == 1  # the good pair
        assert "model a: 1 acknowledged events refused by its store" in caplog.text
        refusals = {s.labels["reason"]: s.value for m in committers["a"].metrics.events_rejected.collect()
                    for s in m.samples if s.name.endswith("_total")}
        assert sum(refusals.values()) == 1, refusals
        # a re-sent event is acknowledged and found a duplicate in the store: counted there, stored once
        asyncio.run(_send_round(committers, {"a": ["good"]}))
        assert committers["a"].store.count() == 1
        assert committers["a"].metrics.events_duplicate._value.get() == 2
    finally:
        _close(committers, journal)


_KILLED = textwrap.dedent("""
    import asyncio, os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from monitoring.intake import IntakeJournal
    from monitoring.metrics import MonitorMetrics
    from monitoring.sink import GroupCommitter
    from monitoring.store import InferenceStore
    from tests.test_fleet_intake import MODELS, _send_round
    tmp = Path({tmp!r})
    committers = {{m: GroupCommitter(InferenceStore(tmp / m / "inference.db"), MonitorMetrics()) for m in MODELS}}
    journal = IntakeJournal(tmp / "intake.db", committers, drain_seconds=3600)
    results = asyncio.run(_send_round(committers, {{m: [f"{{m}}-{{i}}" for i in range(20)] for m in MODELS}}))
    assert all(r.stored == 1 for r in results)
    print("acknowledged", len(results), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_events_acknowledged_before_a_kill_reach_the_stores_at_the_next_start(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _KILLED.format(root=str(ROOT), tmp=str(tmp_path))],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL and "acknowledged 120" in proc.stdout, proc.stderr
    assert len(_journal_rows(tmp_path / "intake.db")) == 120
    for m in MODELS:  # nothing reached the stores before the kill
        con = sqlite3.connect(tmp_path / m / "inference.db")
        assert con.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
        con.close()
    # the next monitor hosts only a and b: their events move in, c's stay for c's monitor
    committers = {m: GroupCommitter(InferenceStore(tmp_path / m / "inference.db"), MonitorMetrics()) for m in "ab"}
    journal = IntakeJournal(tmp_path / "intake.db", committers, drain_seconds=3600)
    try:
        assert journal.recovered == 80
        assert committers["a"].store.count() == 20 and committers["b"].store.count() == 20
        assert _journal_rows(tmp_path / "intake.db") == [] and _journal_rows(journal.path, "intake_kept") == ["c"] * 40
    finally:
        _close(committers, journal)
    # recovering again (rows moved but not deleted, as after a kill between the two) stores nothing twice
    with InferenceStore(tmp_path / "a" / "inference.db") as store:
        assert store.count() == 20 and store.counts()["unpaired"] == 0


def test_a_full_journal_refuses_and_acknowledges_nothing(tmp_path, monkeypatch):
    committers, journal = _fleet(tmp_path)
    try:
        def full(work):
            raise StoreUnavailable("the intake journal cannot commit: database or disk is full")

        monkeypatch.setattr(journal, "_write", full)
        results = asyncio.run(_send_round(committers, {"a": ["a-1"]}))
        assert all(isinstance(r, EventError) and r.status == 503 for r in results)
        assert journal.waiting == 0
        monkeypatch.undo()
        assert committers["a"].store.count() == 0 and _journal_rows(journal.path) == []
    finally:
        monkeypatch.undo()
        _close(committers, journal)


def test_events_waiting_over_the_limit_are_refused_with_503(tmp_path):
    committers, journal = _fleet(tmp_path, max_waiting_events=4)
    try:
        first = asyncio.run(_send_round(committers, {"a": ["a-1", "a-2"]}))
        assert all(r.stored == 1 for r in first)
        more = asyncio.run(_send_round(committers, {"a": ["a-3"], "b": ["b-1"]}))
        assert isinstance(more[0], StoreUnavailable) and "4 acknowledged events wait" in more[0].message
        assert all(r.stored == 1 for r in more[2:])  # b is not held back by a
    finally:
        _close(committers, journal)


@pytest.mark.parametrize("hosted", [("a", "b"), ("a",)])
def test_a_monitor_of_part_of_the_fleet_moves_only_its_models_events(tmp_path, hosted):
    committers, journal = _fleet(tmp_path)
    asyncio.run(_send_round(committers, {m: [f"{m}-1"] for m in MODELS}))
    journal._waiting.clear()
    journal._counts.clear()  # as if killed: the journal rows are all that is left
    journal.close()
    for c in committers.values():
        c.store.close()
    again = {m: GroupCommitter(InferenceStore(tmp_path / m / "inference.db"), MonitorMetrics()) for m in hosted}
    journal = IntakeJournal(tmp_path / "intake.db", again, drain_seconds=3600)
    try:
        assert journal.recovered == 2 * len(hosted)
        assert _journal_rows(tmp_path / "intake.db", "intake_kept") == [m for m in MODELS for _ in (0, 1)
                                                                        if m not in hosted]
    finally:
        _close(again, journal)
    # the monitor of the rest moves theirs later
    rest = {m: GroupCommitter(InferenceStore(tmp_path / m / "inference.db"), MonitorMetrics()) for m in MODELS
            if m not in hosted}
    journal = IntakeJournal(tmp_path / "intake.db", rest, drain_seconds=3600)
    try:
        assert journal.recovered == 2 * len(rest) and all(c.store.count() == 1 for c in rest.values())
        assert _journal_rows(journal.path, "intake_kept") == [] == _journal_rows(journal.path)
    finally:
        _close(again, journal)


def test_a_second_monitor_of_the_fleet_cannot_take_the_journal(tmp_path):
    committers, journal = _fleet(tmp_path)
    try:
        with pytest.raises(StoreUnavailable, match="in use by another monitor of this fleet"):
            IntakeJournal(tmp_path / "intake.db", {}, drain_seconds=3600)
    finally:
        _close(committers, journal)
    IntakeJournal(tmp_path / "intake.db", {}, drain_seconds=3600).close()  # free again once closed


def test_a_batch_goes_straight_into_its_store_and_pairs_with_journaled_halves(tmp_path):
    committers, journal = _fleet(tmp_path)
    try:
        requests = [_events("a", f"a-{i}")[0] for i in range(40)]
        responses = [_events("a", f"a-{i}")[1] for i in range(40)]

        async def send():
            singles = await asyncio.gather(*(committers["a"].submit([r]) for r in responses[:5]))
            batch = await committers["a"].submit(requests)  # 40 events: a commit of its own
            return singles, batch

        singles, batch = asyncio.run(send())
        assert journal.waiting == 5 and batch.requests == 40  # the batch is in the store already ...
        assert committers["a"].store._commits > 1 and len(_journal_rows(journal.path)) == 5
        assert committers["a"].store.count() == 5  # ... and a read moves the five responses, which pair with it
        asyncio.run(committers["a"].submit(responses[5:]))  # 35 more: straight in too
        assert journal.waiting == 0 and committers["a"].store.count() == 40
    finally:
        _close(committers, journal)


def test_a_damaged_journal_row_is_kept_and_the_rest_recovered(tmp_path, caplog):
    committers, journal = _fleet(tmp_path)
    asyncio.run(_send_round(committers, {"a": ["a-1"], "b": ["b-1"]}))
    journal._waiting.clear()
    journal._counts.clear()  # as if killed
    _close(committers, journal)
    con = sqlite3.connect(tmp_path / "intake.db")
    con.execute("INSERT INTO intake (events) VALUES (?)", (b'[["a", true, "half a row',))
    con.commit()
    con.close()
    again = {m: GroupCommitter(InferenceStore(tmp_path / m / "inference.db"), MonitorMetrics()) for m in MODELS}
    with caplog.at_level(logging.ERROR, logger="monitoring.intake"):
        journal = IntakeJournal(tmp_path / "intake.db", again, drain_seconds=3600)
    try:
        assert journal.recovered == 4 and again["a"].store.count() == 1 and again["b"].store.count() == 1
        assert "a row of 24 bytes cannot be read" in caplog.text
        con = sqlite3.connect(tmp_path / "intake.db")
        assert con.execute("SELECT events FROM intake_kept").fetchall() == [(b'[["a", true, "half a row',)]
        con.close()
    finally:
        _close(again, journal)


def test_a_journal_file_that_is_no_database_leaves_the_fleet_monitor_running(tmp_path, caplog):
    from monitoring.fleet_service import FleetMonitor

    class _Service:  # what the fleet monitor uses of a model's monitor at start
        def __init__(self, name):
            self.app = type("App", (), {"state": type("S", (), {"committer": GroupCommitter(
                InferenceStore(tmp_path / name / "inference.db"), MonitorMetrics())})()})()
            self.settings = type("Set", (), {"monitor": type("M", (), {"store_synchronous": "NORMAL"})()})()

    (tmp_path / "intake.db").write_bytes(b"this is no database" * 400)
    fleet = FleetMonitor.__new__(FleetMonitor)
    fleet.services = {m: _Service(m) for m in MODELS}
    with caplog.at_level(logging.ERROR, logger="monitoring.fleet_service"):
        assert fleet._open_intake(tmp_path / "intake.db") is None
    assert "the intake journal" in caplog.text and "events go straight into each model's store" in caplog.text
    IntakeJournal(tmp_path / "other.db", {}, drain_seconds=3600).close()  # the lock of a failed open was let go
    for s in fleet.services.values():
        s.app.state.committer.store.close()


def test_the_stores_it_feeds_are_checkpointed_at_the_journal_interval_and_as_before_once_it_closes(tmp_path):
    """A store the journal feeds commits only at drains: it is checkpointed every ``store_checkpoint_seconds``
    (still checkpointed: its WAL is copied into its file), and at its own interval again once the journal closes
    (its events go straight into it)."""
    committers = {m: GroupCommitter(InferenceStore(tmp_path / m / "inference.db", checkpoint_seconds=0.05),
                                    MonitorMetrics()) for m in MODELS}
    journal = IntakeJournal(tmp_path / "intake.db", committers, drain_seconds=3600, store_checkpoint_seconds=0.2)
    try:
        assert [c.store.checkpoint_seconds for c in committers.values()] == [0.2] * len(MODELS)
        asyncio.run(_send_round(committers, {"a": ["a-1", "a-2"]}))
        journal.drain()
        store = committers["a"].store
        deadline = 250
        while store._checkpointed != store._commits and deadline:
            deadline -= 1
            asyncio.run(asyncio.sleep(0.02))
        assert store._checkpointed == store._commits  # the drained commit was copied into the store's file
    finally:
        journal.close()
    try:
        assert [c.store.checkpoint_seconds for c in committers.values()] == [0.05] * len(MODELS)
    finally:
        for c in committers.values():
            c.store.close()
