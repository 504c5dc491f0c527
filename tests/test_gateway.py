"""The local gateway against live upstreams and a live recording sink (all on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from serving.gateway import GatewayConfig, Upstream, create_gateway_app
from serving.traffic import Splitter, sticky_bucket
from tests.serving_helpers import FakeModelServer, RecordingSink, free_port, row, serve_app, truth


@pytest.fixture(scope="module")
def upstreams():
    primary, canary = FakeModelServer("churn", "1"), FakeModelServer("churn", "2")
    with serve_app(primary.app) as p_url, serve_app(canary.app) as c_url:
        yield primary, p_url, canary, c_url


@pytest.fixture(scope="module")
def sink():
    rec = RecordingSink()
    with serve_app(rec.app) as url:
        yield rec, url + "/events"


TOKEN = "test-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def gateway(p_url, c_url=None, pct=0.0, **kw):
    kw.setdefault("admin_token", TOKEN)
    kw.setdefault("ingest_token", TOKEN)  # labels (POST /feedback) take the ingest token; one token in these tests
    cfg = GatewayConfig(name="churn", namespace="test", primary=Upstream(p_url, "1"),
                        canary=Upstream(c_url, "2") if c_url else None, canary_percent=pct, **kw)
    return serve_app(create_gateway_app(cfg))


def predict(client: httpx.Client, i: int, **headers):
    return client.post("/v1/models/churn:predict", json={"instances": [row(i)]}, headers=headers)


def test_split_follows_percentage(upstreams):
    _, p_url, _, c_url = upstreams
    with gateway(p_url, c_url, 30, seed=3) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        roles = [predict(c, i).headers["x-serving-role"] for i in range(400)]
        share = roles.count("canary") / len(roles)
        assert 0.22 < share < 0.38, share
        # moving the split changes where requests go
        assert c.put("/admin/split", json={"canary_percent": 0}).status_code == 200
        assert {predict(c, i).headers["x-model-version"] for i in range(30)} == {"1"}
        assert c.put("/admin/split", json={"canary_percent": 100}).status_code == 200
        assert {predict(c, i).headers["x-model-version"] for i in range(30)} == {"2"}


def test_split_statistics_of_splitter():
    s = Splitter(10, seed=1)
    n = 20_000
    share = sum(s.choose() == "canary" for _ in range(n)) / n
    assert abs(share - 0.10) < 0.01


def test_sticky_key_keeps_a_user_on_one_side(upstreams):
    _, p_url, _, c_url = upstreams
    with gateway(p_url, c_url, 50, sticky_key="x-user") as url, httpx.Client(base_url=url, headers=AUTH) as c:
        for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
            versions = {predict(c, i, **{"x-user": user}).headers["x-model-version"] for i in range(8)}
            assert len(versions) == 1
            expected = "2" if sticky_bucket(user) < 50 else "1"
            assert versions == {expected}
        users = [f"user-{i}" for i in range(300)]
        canary_users = sum(predict(c, 0, **{"x-user": u}).headers["x-serving-role"] == "canary" for u in users)
        assert 100 < canary_users < 200


def test_forwards_v1_and_v2_unchanged(upstreams):
    primary, p_url, _, _ = upstreams
    v2 = {"id": "r1", "inputs": [{"name": "tenure", "shape": [2], "datatype": "FP64", "data": [3.0, 30.0]},
                                 {"name": "region", "shape": [2], "datatype": "BYTES", "data": ["eu", "us"]}]}
    with gateway(p_url) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        v1_body = json.dumps({"instances": [row(1), row(20)]}).encode()
        direct = httpx.post(p_url + "/v1/models/churn:predict", content=v1_body, headers={"content-type": "application/json"})
        via = c.post("/v1/models/churn:predict", content=v1_body, headers={"content-type": "application/json"})
        assert via.status_code == 200 and via.json() == direct.json()
        assert primary.seen[-1]["body"] == v1_body
        body2 = json.dumps(v2).encode()
        r2 = c.post("/v2/models/churn/infer", content=body2, headers={"content-type": "application/json"})
        assert r2.status_code == 200
        assert r2.json()["outputs"][0]["data"] == [1, 0]
        assert primary.seen[-1]["body"] == body2 and primary.seen[-1]["path"] == "/v2/models/churn/infer"
        assert c.get("/v2/health/ready").json() == {"ready": True}
        # the upstream's own 400 passes through with its message
        bad = c.post("/v1/models/churn:predict", content=b'{"rows": []}', headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "instances" in bad.json()["error"]
        # an incoming request id is honoured and returned
        r = predict(c, 1, **{"x-request-id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123" == r.headers["ce-id"]
        assert primary.seen[-1]["headers"]["x-request-id"] == "abc-123"


def test_oversize_payload_is_refused_with_413(upstreams):
    primary, p_url, _, _ = upstreams
    with gateway(p_url, max_payload_bytes=2048) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        before = len(primary.seen)
        r = c.post("/v1/models/churn:predict", json={"instances": [row(i) for i in range(100)]})
        assert r.status_code == 413 and "max_payload_bytes" in r.json()["error"]
        assert len(primary.seen) == before
        assert predict(c, 1).status_code == 200


def test_events_pair_request_and_response_by_ce_id(upstreams, sink):
    _, p_url, _, c_url = upstreams
    rec, sink_url = sink
    rec.events.clear()
    with gateway(p_url, c_url, 50, sink_url=sink_url, seed=5) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        served = {}
        for i in range(20):
            r = predict(c, i)
            served[r.headers["ce-id"]] = (r.headers["x-model-version"], r.headers["x-serving-role"], r.content)
        events = rec.wait_for(40)
    assert len(events) == 40
    by_id: dict[str, dict[str, dict]] = {}
    for e in events:
        h = e["headers"]
        assert h["ce-specversion"] == "1.0" and h["ce-inferenceservicename"] == "churn"
        assert h["ce-namespace"] == "test" and h["ce-component"] == "predictor" and h["ce-source"]
        by_id.setdefault(h["ce-id"], {})[h["ce-type"]] = e
    assert set(by_id) == set(served)
    for ce_id, pair in by_id.items():
        req = pair["org.kubeflow.serving.inference.request"]
        resp = pair["org.kubeflow.serving.inference.response"]
        version, role, content = served[ce_id]
        assert json.loads(req["body"])["instances"][0].keys() == row(0).keys()
        assert resp["body"] == content
        for e in (req, resp):
            assert e["headers"]["ce-modelversion"] == version and e["headers"]["ce-servingrole"] == role
            assert e["headers"]["ce-endpoint"] == ("canary" if role == "canary" else "default")


def test_sink_down_serving_continues_and_drops_are_counted(upstreams):
    _, p_url, _, _ = upstreams
    dead_sink = f"http://127.0.0.1:{free_port()}/events"
    with gateway(p_url, sink_url=dead_sink) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        t0 = time.perf_counter()
        assert all(predict(c, i).status_code == 200 for i in range(50))
        assert time.perf_counter() - t0 < 10
        deadline = time.monotonic() + 10
        dropped = 0.0
        while time.monotonic() < deadline and dropped < 100:
            text = c.get("/metrics").text
            dropped = sum(float(line.split()[-1]) for line in text.splitlines()
                          if line.startswith("driftloop_gateway_events_dropped_total{"))
            time.sleep(0.05)
        assert dropped == 100


def test_feedback_joins_labels_with_the_version_that_answered(upstreams):
    _, p_url, canary, c_url = upstreams
    canary.wrong = True
    try:
        with gateway(p_url, c_url, 50, seed=11) as url, httpx.Client(base_url=url, headers=AUTH) as c:
            feedback = []
            for i in range(60):
                r = predict(c, i)
                feedback.append({"id": r.headers["ce-id"], "label": truth(row(i))})
            assert c.post("/feedback", json=feedback).json()["accepted"] == 60
            stats = c.get("/admin/stats").json()["versions"]
            assert stats["1"]["quality"] == 1.0 and stats["2"]["quality"] == 0.0
            assert stats["1"]["labels"] + stats["2"]["labels"] == 60
            assert stats["1"]["requests"] + stats["2"]["requests"] == 60
            unknown = c.post("/feedback", json={"id": "nope", "label": 1})
            assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
            assert c.post("/feedback", content=b"{not json",
                          headers={"content-type": "application/json"}).status_code == 400
            fresh = predict(c, 99).headers["ce-id"]
            mismatch = c.post("/feedback", json={"id": fresh, "label": [1, 0, 1]})
            assert mismatch.status_code == 400 and "label" in mismatch.json()["error"]
            again = c.post("/feedback", json={"id": feedback[0]["id"], "label": 1})  # one label per request id
            assert again.status_code == 409 and again.json()["duplicate"] == [feedback[0]["id"]]
            stats = c.get("/admin/stats").json()["versions"]
            assert stats["1"]["labels"] + stats["2"]["labels"] == 60
    finally:
        canary.wrong = False


def test_admin_rejects_bad_split_before_changing_anything(upstreams):
    _, p_url, _, c_url = upstreams
    with gateway(p_url, c_url, 10) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        for bad in ({"canary_percent": 101}, {"canary_percent": -1}, {"canary_percent": "x"}, {"weight": 5}):
            r = c.put("/admin/split", json=bad)
            assert r.status_code == 400 and r.json()["error"]
        assert c.get("/admin/status").json()["canary_percent"] == 10
    with gateway(p_url) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        r = c.put("/admin/split", json={"canary_percent": 20})
        assert r.status_code == 400 and "canary upstream" in r.json()["error"]
        assert c.put("/admin/upstreams", json={"canary": {"url": c_url, "version": "2"}, "canary_percent": 100}).status_code == 200
        assert predict(c, 1).headers["x-model-version"] == "2"
    with pytest.raises(ValueError, match="between 0 and 100"):
        GatewayConfig(name="x", primary=Upstream(p_url, "1"), canary_percent=150)


def test_upstream_down_gives_502_and_the_gateway_keeps_serving(upstreams):
    _, p_url, _, _ = upstreams
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway(p_url, dead, 100) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        r = predict(c, 1)
        assert r.status_code == 502 and "canary" in r.json()["error"]
        stats = c.get("/admin/stats").json()["versions"]
        assert stats["2"]["errors"] == 1 and stats["2"]["error_rate"] == 1.0
        c.put("/admin/split", json={"canary_percent": 0})
        assert predict(c, 1).status_code == 200


def _dropped(client: httpx.Client) -> dict[str, float]:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("driftloop_gateway_events_dropped_total{"):
            out[line.split('reason="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def test_events_go_out_in_batches_carrying_the_bodies_byte_for_byte(upstreams, sink):
    """Batched structured CloudEvents (the cloudevents SDK reads them) with every attribute KServe's logger
    sends plus modelversion/servingrole; the response bytes the client got are in the POST unchanged."""
    _, p_url, _, _ = upstreams
    rec, sink_url = sink
    rec.events.clear()
    with gateway(p_url, sink_url=sink_url, sink_linger=0.3) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        answers = {}
        for i in range(10):
            r = predict(c, i)
            answers[r.headers["ce-id"]] = r.content
        events = rec.wait_for(20)
    assert len(events) == 20
    posts = {id(e["raw"]) for e in events}
    assert len(posts) < 10  # not one POST per event, nor per request
    assert all(e["headers"]["content-type"] == "application/json" for e in events)
    for e in events:
        h = e["headers"]
        assert {"ce-id", "ce-type", "ce-source", "ce-specversion", "ce-time", "ce-inferenceservicename",
                "ce-namespace", "ce-component", "ce-endpoint", "ce-modelversion", "ce-servingrole"} <= h.keys()
        if h["ce-type"].endswith("response"):
            assert answers[h["ce-id"]] in e["raw"]  # spliced as sent, not re-encoded


def test_a_batch_with_one_refused_event_keeps_the_others(upstreams, tmp_path):
    """The real sink refuses a whole batch for one bad event; the gateway sends that batch again event by
    event, so only the bad event is dropped (and counted with the sink's status)."""
    from monitoring.metrics import MonitorMetrics
    from monitoring.sink import create_sink_app
    from monitoring.store import InferenceStore

    _, p_url, _, _ = upstreams
    store = InferenceStore(tmp_path / "inference.db")
    app = create_sink_app(store, metrics=MonitorMetrics(), model_names={"churn"}, reference_columns=list(row(0)))
    with serve_app(app) as sink_url, gateway(p_url, sink_url=sink_url + "/events", sink_linger=0.5) as url, \
            httpx.Client(base_url=url, headers=AUTH) as c:
        good = [predict(c, i).headers["ce-id"] for i in range(8)]
        bad = c.post("/v1/models/churn:predict", json={"instances": [{"tenure": 3.0}]})  # lacks the other columns
        assert bad.status_code == 200  # the model server took it; only the log refuses it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(store.event_ids()) < 17:
            time.sleep(0.05)
        time.sleep(0.2)
        assert _dropped(c) == {"sink_422": 1.0}
    assert store.event_ids("request") == set(good)
    assert store.event_ids("response") == {*good, bad.headers["ce-id"]}
    store.close()


def test_a_full_event_queue_drops_and_counts_never_delays_a_prediction(upstreams):
    """A sink slower than the traffic: the bounded queue fills, further pairs are dropped and counted as
    queue_full; every prediction is answered at once, and every event is either sent or counted."""
    _, p_url, _, _ = upstreams
    slow = RecordingSink()

    async def crawl(request):
        await asyncio.sleep(0.5)
        return await slow.receive(request)

    slow_sink = serve_app(Starlette(routes=[Route("/events", crawl, methods=["POST"])]))
    with slow_sink as sink_url, gateway(p_url, sink_url=sink_url + "/events", queue_size=3, senders=1,
                                        sink_linger=0.0) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        t0 = time.perf_counter()
        assert all(predict(c, i).status_code == 200 for i in range(40))
        assert time.perf_counter() - t0 < 5  # 40 requests, not 40 sink round trips of 0.5 s
        dropped = _dropped(c).get("queue_full", 0.0)
        assert dropped >= 2 * 30
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(slow.events) + dropped < 80:
            time.sleep(0.05)
    assert len(slow.events) + dropped == 80


def test_events_still_held_when_the_gateway_stops_are_counted_not_lost_silently(upstreams):
    """A sink that does not answer before the gateway stops: after the short drain, every event still
    queued or in flight is counted as dropped for the shutdown."""
    _, p_url, _, _ = upstreams

    async def stall(request):
        await asyncio.sleep(4)
        return Response(status_code=200)

    with serve_app(Starlette(routes=[Route("/events", stall, methods=["POST"])])) as sink_url:
        cfg = GatewayConfig(name="churn", primary=Upstream(p_url, "1"), sink_url=sink_url + "/events", senders=1,
                            sink_linger=0.0, sink_timeout=30.0, admin_token=TOKEN)
        app = create_gateway_app(cfg)
        with serve_app(app) as url, httpx.Client(base_url=url) as c:
            assert all(predict(c, i).status_code == 200 for i in range(5))
    registry = app.state.gateway.metrics.registry
    assert registry.get_sample_value("driftloop_gateway_events_sent_total") == 0.0
    assert registry.get_sample_value("driftloop_gateway_events_dropped_total", {"reason": "shutdown"}) == 10.0


def test_the_event_logger_keeps_its_sink_connection_when_the_sink_answers_with_a_body(upstreams):
    # the real sink answers each batch with a JSON body; left unread, aiohttp closed the
    # connection and every batch paid a new TCP connection (to the gateway and the sink)
    _, p_url, _, _ = upstreams
    peers: list[tuple[str, int]] = []

    async def receive(request):
        await request.body()
        peers.append(request.client)
        return Response(json.dumps({"accepted": 2, "detail": "x" * 500}), status_code=202,
                        media_type="application/json")

    sink_app = Starlette(routes=[Route("/events", receive, methods=["POST"])])
    with serve_app(sink_app) as sink_url, \
            gateway(p_url, sink_url=sink_url + "/events", senders=1) as url, \
            httpx.Client(base_url=url, headers=AUTH) as c:
        for i in range(6):  # one batch at a time
            assert predict(c, i).status_code == 200
            deadline = time.monotonic() + 5
            while len(peers) <= i and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(peers) == 6
    assert len(set(peers)) == 1, peers
