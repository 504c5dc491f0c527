"""The fleet gateway: three models behind one port, each with its own upstreams, split, statistics and
inference-log sink path (fake model servers and recording sinks on 127.0.0.1)."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from serving.fleet_gateway import create_fleet_gateway_app, fleet_configs
from serving.gateway_base import GatewayConfig, Upstream
from tests.serving_helpers import FakeModelServer, RecordingSink, free_port, row, serve_app

TOKEN = "fleet-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MODELS = ("churn", "demand", "upsell")
VERSIONS = {"churn": "1", "demand": "7", "upsell": "3"}


@pytest.fixture(scope="module")
def upstreams():
    """One model server per model, and a canary (v2) for churn."""
    servers = {name: FakeModelServer(name, VERSIONS[name]) for name in MODELS}
    canary = FakeModelServer("churn", "2")
    with serve_app(servers["churn"].app) as a, serve_app(servers["demand"].app) as b, \
            serve_app(servers["upsell"].app) as c, serve_app(canary.app) as d:
        yield servers, {"churn": a, "demand": b, "upsell": c}, canary, d


@pytest.fixture(scope="module")
def sinks():
    """The fleet's monitor as the gateway sees it: each model's events under /models/<name>/events."""
    recs = {name: RecordingSink() for name in MODELS}
    app = Starlette(routes=[Route(f"/models/{n}/events", rec.receive, methods=["POST"]) for n, rec in recs.items()])
    with serve_app(app) as url:
        yield recs, url


def fleet(urls, sink_url=None, **over):
    configs = [GatewayConfig(name=n, namespace="test", primary=Upstream(over.get(n, urls[n]), VERSIONS[n]),
                             sink_url=f"{sink_url}/models/{n}/events" if sink_url else None,
                             admin_token=TOKEN, ingest_token=TOKEN, seed=1, sink_linger=0.01)
               for n in MODELS]
    return serve_app(create_fleet_gateway_app(configs))


def predict(c: httpx.Client, name: str, i: int = 1) -> httpx.Response:
    return c.post(f"/v1/models/{name}:predict", json={"instances": [row(i)]})


def test_each_model_answers_through_one_port(upstreams):
    servers, urls, _, _ = upstreams
    v2 = {"inputs": [{"name": "tenure", "shape": [1], "datatype": "FP64", "data": [3.0]}]}
    with fleet(urls) as url, httpx.Client(base_url=url) as c:
        for name in MODELS:
            r = predict(c, name)
            assert r.status_code == 200, r.text
            assert r.headers["x-model-version"] == VERSIONS[name] and r.json()["model_version"] == VERSIONS[name]
            assert servers[name].seen[-1]["path"] == f"/v1/models/{name}:predict"  # forwarded unchanged
            r2 = c.post(f"/v2/models/{name}/infer", json=v2)
            assert r2.status_code == 200 and r2.json()["model_name"] == name
            assert servers[name].seen[-1]["path"] == f"/v2/models/{name}/infer"
        assert c.get("/v1/models").json() == {"models": sorted(MODELS)}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        listed = c.get("/admin/models").json()["models"]
        assert [m["name"] for m in listed] == sorted(MODELS)
        assert {m["name"]: m["primary"]["version"] for m in listed} == VERSIONS
        assert c.get("/healthz").json() == {"ok": True, "models": 3}
        spec = c.get("/openapi.json").json()
        assert "/models/{model}/admin/split" in spec["paths"] and "/admin/models" in spec["paths"]


def test_each_model_logs_to_its_own_sink_path(upstreams, sinks):
    _, urls, _, _ = upstreams
    recs, sink_url = sinks
    sent = {"churn": 3, "demand": 1, "upsell": 2}
    with fleet(urls, sink_url) as url, httpx.Client(base_url=url) as c:
        ids = {n: [predict(c, n, i).headers["x-request-id"] for i in range(k)] for n, k in sent.items()}
        for name, k in sent.items():
            events = recs[name].wait_for(2 * k)
            assert len(events) == 2 * k
            assert {e["headers"]["ce-id"] for e in events} == set(ids[name])
            assert {e["headers"]["ce-modelversion"] for e in events} == {VERSIONS[name]}
            # each event is the model's own request or answer
            requests = [json.loads(e["body"]) for e in events if e["headers"]["ce-type"].endswith("request")]
            assert len(requests) == k and all("instances" in r for r in requests)
        metrics = c.get("/metrics").text
        for name, k in sent.items():
            assert f'driftloop_gateway_requests_total{{code="200",model="{name}",role="primary",version=' \
                   f'"{VERSIONS[name]}"}} {float(k)}' in metrics
        own = c.get("/models/demand/metrics").text
        assert 'driftloop_gateway_requests_total{code="200",role="primary",version="7"} 1.0' in own


def test_rollout_of_one_model_never_touches_another(upstreams):
    servers, urls, canary, canary_url = upstreams
    with fleet(urls) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        for i in range(5):
            assert predict(c, "demand", i).status_code == 200
        demand_before = c.get("/models/demand/admin/stats").json()
        upsell_before = c.get("/models/upsell/admin/status").json()
        # the canary of churn, half its traffic
        r = c.put("/models/churn/admin/upstreams", json={"canary": {"url": canary_url, "version": "2"}})
        assert r.status_code == 200, r.text
        r = c.put("/models/churn/admin/split", json={"canary_percent": 50})
        assert r.status_code == 200 and r.json()["canary_percent"] == 50
        versions = [predict(c, "churn", i).headers["x-model-version"] for i in range(60)]
        assert set(versions) == {"1", "2"}
        # demand's split, upstreams and statistics are as they were; none of churn's requests reached them
        demand = c.get("/models/demand/admin/stats").json()
        assert demand["status"]["canary_percent"] == 0 and demand["status"]["canary"] is None
        assert demand["versions"].keys() == {"7"}
        assert demand["versions"]["7"]["requests"] == demand_before["versions"]["7"]["requests"] == 5
        assert c.get("/models/upsell/admin/status").json() == upsell_before
        churn = c.get("/models/churn/admin/stats").json()["versions"]
        assert churn["1"]["requests"] + churn["2"]["requests"] == 60
        # promote: the canary becomes churn's primary
        r = c.put("/models/churn/admin/upstreams", json={"primary": {"url": canary_url, "version": "2"}, "canary": None})
        assert r.status_code == 200
        assert {predict(c, "churn", i).headers["x-model-version"] for i in range(10)} == {"2"}
        assert {predict(c, "demand", i).headers["x-model-version"] for i in range(10)} == {"7"}
        # a new canary, then roll it back
        c.put("/models/churn/admin/upstreams", json={"canary": {"url": urls["churn"], "version": "1"},
                                                      "canary_percent": 30})
        r = c.put("/models/churn/admin/upstreams", json={"canary": None})
        assert r.json()["canary_percent"] == 0 and r.json()["canary"] is None
        assert {predict(c, "churn", i).headers["x-model-version"] for i in range(10)} == {"2"}
        demand = c.get("/models/demand/admin/status").json()
        assert demand["canary_percent"] == 0 and demand["primary"] == {"url": urls["demand"], "version": "7"}
        assert c.get("/models/upsell/admin/status").json() == upsell_before


def test_an_unknown_model_is_404_and_never_forwarded(upstreams):
    servers, urls, _, _ = upstreams
    seen = {n: len(s.seen) for n, s in servers.items()}
    with fleet(urls) as url, httpx.Client(base_url=url, headers=AUTH) as c:
        for r in (predict(c, "nope"), c.post("/v2/models/nope/infer", json={"inputs": []}),
                  c.get("/v2/models/nope/ready"), c.put("/models/nope/admin/split", json={"canary_percent": 0}),
                  c.get("/models/nope/admin/status"), c.post("/models/nope/feedback", json={"id": "x", "label": 1})):
            assert r.status_code == 404, (r.request.url, r.text)
            assert "'nope' is not served by this gateway" in r.json()["error"] and "churn" in r.json()["error"]
        assert c.get("/v1/models/a%2F..%2Fb:predict").status_code == 404
        assert c.get("/models/churn/admin/split").status_code == 405
        assert {n: len(s.seen) for n, s in servers.items()} == seen
        assert 'driftloop_fleet_gateway_rejected_total{reason="unknown_model"} 6.0' in c.get("/metrics").text


def test_admin_needs_the_token(upstreams):
    _, urls, _, canary_url = upstreams
    with fleet(urls) as url, httpx.Client(base_url=url) as c:
        for headers in ({}, {"authorization": "Bearer wrong"}):
            r = c.put("/models/churn/admin/split", json={"canary_percent": 0}, headers=headers)
            assert r.status_code == 401 and "DRIFTLOOP_GATEWAY_TOKEN" in r.json()["error"]
            r = c.put("/models/demand/admin/upstreams", json={"canary": {"url": canary_url, "version": "2"}},
                      headers=headers)
            assert r.status_code == 401
        assert c.get("/models/demand/admin/status").json()["canary"] is None
        r = c.post("/models/churn/feedback", json={"id": "x", "label": 1})
        assert r.status_code == 401  # labels take the ingest token


def test_one_model_down_leaves_the_others_answering(upstreams):
    _, urls, _, _ = upstreams
    dead = f"http://127.0.0.1:{free_port()}"
    with fleet(urls, demand=dead) as url, httpx.Client(base_url=url) as c:
        r = predict(c, "demand")
        assert r.status_code == 502 and "unreachable" in r.json()["error"]
        assert c.get("/v2/models/demand/ready").status_code == 502
        for name in ("churn", "upsell"):
            assert predict(c, name).status_code == 200
        assert predict(c, "demand").status_code == 502
        assert predict(c, "churn").status_code == 200


def test_fleet_configs_name_the_bad_model(tmp_path):
    token = tmp_path / "ingest.token"
    token.write_text("abc\n")
    good = {"name": "a", "primary": {"url": "http://127.0.0.1:1", "version": "1"}, "ingest_token_file": str(token)}
    [cfg] = fleet_configs({"models": [good]}, admin_token="t")
    assert cfg.ingest_token == "abc" and cfg.admin_token == "t" and cfg.feedback_url is None
    with pytest.raises(ValueError, match=r"models\[1\] \(b\): primary url 'ftp://x' must be http"):
        fleet_configs({"models": [good, {"name": "b", "primary": {"url": "ftp://x", "version": "1"}}]})
    with pytest.raises(ValueError, match=r"models\[0\] \(a\): unknown key\(s\) \['colour'\]"):
        fleet_configs({"models": [{**good, "colour": 1}]})
    with pytest.raises(ValueError, match="distinct names"):
        create_fleet_gateway_app(fleet_configs({"models": [good, good]}))
