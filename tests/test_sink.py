"""The sink as a real process on localhost: real CloudEvents in, durable rows out, kill -9 safe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from monitoring.events import EventError
from monitoring.store import InferenceStore
from tests.ce_events import COLUMNS, binary, instance, pair, structured
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SINK_TOKEN = "sink-ingest-token"


class SinkProcess:
    """``python -m monitoring.sink`` in a subprocess on a free port."""

    def __init__(self, store: Path):
        self.store = store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"authorization": f"Bearer {SINK_TOKEN}"}  # the ingest token (DRIFTLOOP_INGEST_TOKEN)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitoring.sink", "--store", str(store), "--port", str(self.port),
             "--model", "churn", "--columns", ",".join(COLUMNS)], cwd=ROOT,
            env={**os.environ, "DRIFTLOOP_INGEST_TOKEN": SINK_TOKEN})
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("sink did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    proc = SinkProcess(tmp_path_factory.mktemp("sink") / "log.db")
    yield proc
    proc.stop()


def metric(client: httpx.Client, name: str, labels: str = "") -> float:
    key = f"{name}{{{labels}}}" if labels else name
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def send(client, headers, body):
    return client.post("/events", headers=headers, content=body)


def test_pairs_logger_events_into_rows(sink):
    with httpx.Client(base_url=sink.url, headers=sink.headers) as c:
        (rq, rs) = pair("pair-1", n=3, start=0, version="4", role="challenger")
        r = send(c, *rs)  # the response may arrive first
        assert r.status_code == 200 and r.json() == {"stored": 1, "duplicates": 0}
        assert send(c, *rq).status_code == 200
        assert send(c, *rq).json() == {"stored": 0, "duplicates": 1}  # a retry is acked, stored once
        # V2 request (one tensor per column) and V2 response with the version in the body
        v2 = {"inputs": [{"name": col, "shape": [1], "datatype": "BYTES" if col in ("region", "plan") else "FP64",
                          "data": [instance(5)[col]]} for col in COLUMNS]}
        assert send(c, *binary("pair-2", "request", v2)).status_code == 200
        out = {"model_name": "churn", "model_version": "9", "id": "pair-2",
               "outputs": [{"name": "output-0", "shape": [1], "datatype": "INT64", "data": [1]}]}
        assert send(c, *binary("pair-2", "response", out)).status_code == 200
    with InferenceStore(sink.store) as store:
        df = store.rows()
    mine = df[df["request_id"].isin(["pair-1", "pair-2"])].reset_index(drop=True)
    assert list(mine["request_id"]) == ["pair-1"] * 3 + ["pair-2"]
    assert list(mine["model_version"]) == ["4", "4", "4", "9"] and mine["role"].iloc[0] == "challenger"
    assert list(mine["prediction"]) == [0, 1, 0, 1]
    assert mine.loc[3, "latency_ms"] == instance(5)["latency_ms"] and mine.loc[2, "region"] == instance(2)["region"]


def test_batches_are_stored_in_one_request(sink):
    items = []
    for i in range(50):
        items.append(structured(f"batch-{i}", "request", {"instances": [instance(i)]}))
        items.append(structured(f"batch-{i}", "response", {"predictions": [i % 2]}, version="1"))
    with httpx.Client(base_url=sink.url, headers=sink.headers) as c:
        before = metric(c, "driftloop_monitor_rows_stored_total")
        r = c.post("/events", content=orjson.dumps(items),
                   headers={"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 200 and r.json()["stored"] == 100
        assert metric(c, "driftloop_monitor_rows_stored_total") == before + 50


def test_bad_events_get_clear_4xx_counted_and_lose_nothing(sink):
    with httpx.Client(base_url=sink.url, headers=sink.headers) as c:
        for rq_rs in (pair("keep-1"), pair("keep-2", n=2)):
            for ev in rq_rs:
                assert send(c, *ev).status_code == 200
        with InferenceStore(sink.store) as store:
            before = store.counts()

        headers, body = binary("bad-1", "request", {"instances": [instance(0)]})
        no_id = {k: v for k, v in headers.items() if k != "ce-id"}
        row = instance(0)
        del row["plan"]
        cases = [
            ((no_id, body), 400, "'ce-id'", "missing_header"),
            ((headers, b"<xml/>"), 400, "not JSON", "bad_json"),
            (binary("bad-2", "request", {"instances": [instance(0)]}, model="fraud"), 404, "'fraud'", "unknown_model"),
            (binary("bad-3", "request", {"instances": [row]}), 422, "missing ['plan']", "columns"),
            (pair("keep-2", n=2)[1], None, None, None),  # a retry of the same event: a duplicate, acked
            (binary("keep-2", "response", {"predictions": [1, 0, 1]}), 409, "'keep-2' was already used", "reused_id"),
            (binary("bad-4", "request", {"instances": [instance(0), instance(1)]}), None, None, None),
            (binary("bad-4", "response", {"predictions": [1]}), 422, "2 rows but response has 1", "row_count"),
        ]
        for (h, b), status, text, reason in cases:
            counted = metric(c, "driftloop_monitor_events_rejected_total", f'reason="{reason}"') if reason else 0
            r = send(c, h, b)
            if status is None:
                assert r.status_code == 200
                continue
            assert r.status_code == status and text in r.json()["error"], r.text
            assert metric(c, "driftloop_monitor_events_rejected_total", f'reason="{reason}"') == counted + 1
        assert c.post("/events", content=b"[]", headers={"content-type": "application/cloudevents-batch+json"}
                      ).status_code == 400
        assert c.get("/readyz").status_code == 200  # still serving
    with InferenceStore(sink.store) as store:
        after = store.counts()
        ids = store.event_ids()
    assert after["rows"] == before["rows"] and {"keep-1", "keep-2"} <= ids
    assert not ids & {"bad-1", "bad-2", "bad-3"}
    assert after["events"] == before["events"] + 1  # only bad-4's valid request


def test_feedback_and_quality_per_version(sink):
    with httpx.Client(base_url=sink.url, headers=sink.headers) as c:
        for ev in pair("q-1", n=2, version="21"):  # predictions 0, 1
            send(c, *ev)
        for ev in pair("q-2", n=1, version="22"):  # prediction 0
            send(c, *ev)
        t0 = time.time() - 60
        r = c.post("/feedback", json=[{"id": "q-1", "label": 0}, {"id": "q-1", "row_index": 1, "label": 0},
                                      {"id": "q-2", "label": 0}, {"id": "nobody", "label": 1}])
        assert r.status_code == 200 and r.json() == {"stored": 4, "duplicates": 0, "unknown_ids": ["nobody"]}
        q = c.get("/quality", params={"since": t0}).json()["versions"]
        assert q["21"] == {"n": 2, "accuracy": 0.5} and q["22"] == {"n": 1, "accuracy": 1.0}
        assert c.get("/quality", params={"since": "2999-01-01T00:00:00Z"}).json()["versions"] == {}
        assert c.get("/quality", params={"since": "2000-01-01"}).json()["versions"]["21"]["n"] == 2
        assert c.post("/feedback", json={"label": 1}).status_code == 422
        r = c.get("/quality", params={"since": "yesterday-ish"})
        assert r.status_code == 400 and "since" in r.json()["error"]


def test_kill_9_mid_stream_loses_no_acknowledged_event(tmp_path):
    store_path = tmp_path / "log.db"
    sink = SinkProcess(store_path)
    acked: set[tuple[str, str]] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def single_sender(worker: int) -> None:
        with httpx.Client(base_url=sink.url, timeout=5, headers=sink.headers) as c:
            i = 0
            while not stop.is_set():
                for ev, kind in zip(pair(f"w{worker}-{i}", n=2, start=i), ("request", "response")):
                    try:
                        r = send(c, *ev)
                    except httpx.TransportError:
                        return
                    if r.status_code == 200:
                        with lock:
                            acked.add((f"w{worker}-{i}", kind))
                i += 1

    def batch_sender() -> None:
        with httpx.Client(base_url=sink.url, timeout=5, headers=sink.headers) as c:
            i = 0
            while not stop.is_set():
                ids = [f"b-{i}-{j}" for j in range(100)]
                items = [structured(x, "request", {"instances": [instance(j)]}) for j, x in enumerate(ids)]
                items += [structured(x, "response", {"predictions": [1]}) for x in ids]
                try:
                    r = c.post("/events", content=orjson.dumps(items),
                               headers={"content-type": "application/cloudevents-batch+json"})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    with lock:
                        acked.update((x, k) for x in ids for k in ("request", "response"))
                i += 1

    threads = [threading.Thread(target=single_sender, args=(w,)) for w in range(4)]
    threads.append(threading.Thread(target=batch_sender))
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 20
        while len(acked) < 3000 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(sink.proc.pid, signal.SIGKILL)  # mid-stream: senders are still posting
        sink.proc.wait(10)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert sink.proc.returncode == -signal.SIGKILL
    assert len(acked) >= 3000

    restarted = SinkProcess(store_path)
    try:
        with InferenceStore(store_path) as store:
            assert store.integrity_check() == "ok"
            stored = {(i, "request") for i in store.event_ids("request")} | \
                     {(i, "response") for i in store.event_ids("response")}
            missing = acked - stored
            assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
            paired_ids = set(store.rows()["request_id"])
            both = {i for i, k in acked if k == "request" and (i, "response") in acked}
            assert both <= paired_ids
        # the restarted sink pairs an event left half-done by the crash
        with httpx.Client(base_url=restarted.url, headers=restarted.headers) as c:
            (rq, rs) = pair("after-restart", n=1)
            assert send(c, *rq).status_code == 200
            with InferenceStore(store_path) as store:
                n = store.count()
            assert send(c, *rs).status_code == 200
            with InferenceStore(store_path) as store:
                assert store.count() == n + 1
    finally:
        restarted.stop()


def test_app_takes_more_routes_and_serves_events_in_process(tmp_path):
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from monitoring.metrics import MonitorMetrics
    from monitoring.sink import create_sink_app

    store = InferenceStore(tmp_path / "log.db")
    app = create_sink_app(store, metrics=MonitorMetrics(), model_names={"churn"}, reference_columns=COLUMNS,
                          close_store=True, max_body_bytes=2048)

    async def extra(request):
        return PlainTextResponse("extra")

    app.add_route("/extra", extra)
    with TestClient(app) as c:
        assert c.get("/extra").text == "extra"
        for ev in pair("in-proc", n=2):
            assert c.post("/events", headers=ev[0], content=ev[1]).json() == {"stored": 1, "duplicates": 0}
        assert c.get("/events").status_code == 405
        big = binary("big", "request", {"instances": [instance(i) for i in range(40)]})
        r = c.post("/events", headers=big[0], content=big[1])
        assert r.status_code == 413 and "limit of 2048" in r.json()["error"]
        assert 'driftloop_monitor_events_rejected_total{reason="too_large"} 1.0' in c.get("/metrics").text
        assert c.get("/readyz").json() == {"status": "ready"}
    with InferenceStore(tmp_path / "log.db") as reopened:
        assert reopened.count() == 2


def test_group_commit_joins_concurrent_requests_and_drains_on_close(tmp_path):
    import asyncio

    from monitoring.events import parse_binary
    from monitoring.metrics import MonitorMetrics
    from monitoring.sink import GroupCommitter

    store = InferenceStore(tmp_path / "log.db")
    metrics = MonitorMetrics()
    committer = GroupCommitter(store, metrics)

    async def main():
        tasks = [asyncio.create_task(committer.submit([parse_binary(*ev) for ev in pair(f"g{i}")])) for i in range(20)]
        mismatch = [parse_binary(*binary("bad", "request", {"instances": [instance(0), instance(1)]})),
                    parse_binary(*binary("bad", "response", {"predictions": [1]}))]
        bad = asyncio.create_task(committer.submit(mismatch))
        await asyncio.sleep(0)  # every request has queued its events
        await committer.aclose()  # commits what was submitted, then stops
        return await asyncio.gather(*tasks), await asyncio.gather(bad, return_exceptions=True)

    results, (refused,) = asyncio.run(main())
    assert [r.stored for r in results] == [2] * 20 and store.count() == 20
    assert isinstance(refused, EventError) and refused.status == 422 and "bad" not in store.event_ids()
    assert metrics.registry.get_sample_value("driftloop_monitor_commit_group_events_count") == 1  # one commit
    assert metrics.registry.get_sample_value("driftloop_monitor_rows_stored_total") == 20
    store.close()
