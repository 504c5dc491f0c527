"""The gateway and the model server as a trust boundary (issue 21): a real KServe ModelServer process
with the trained champion, the real gateway in front of it, a recording sink and label receiver.

Each case of the tables checks the answer, that the model still serves afterwards (a normal predict
through the gateway is 200 and its event reaches the sink) and that every answered request's events
reached the sink as JSON.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sqlite3
import time
import uuid
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.gateway import GatewayConfig, Upstream, create_gateway_app
from tests.serving_helpers import RecordingSink, serve_app
from tests.test_bad_input_serving import COLUMNS, NUMERIC, _wait_ready

import serving.predictor  # noqa: F401  (imports kserve with the argv guard before kserve's client is imported)
from kserve.inference_client import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest

TOKEN = "trust-admin-token"
INGEST = "trust-ingest-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
V1 = "/v1/models/churn:predict"
V2 = "/v2/models/churn/infer"


class Receiver(RecordingSink):
    """The sink's /events (recorded as RecordingSink does) and the monitor's /feedback, with the
    Authorization header of every POST; ``down`` answers 503 to /events (the sink is failing)."""

    def __init__(self) -> None:
        super().__init__()
        self.auth: list[str | None] = []
        self.labels: list[Any] = []
        self.down = False
        self.app = Starlette(routes=[Route("/events", self.events_route, methods=["POST"]),
                                     Route("/feedback", self.feedback_route, methods=["POST"])])

    async def events_route(self, request: Request) -> Response:
        self.auth.append(request.headers.get("authorization"))
        if self.down:
            return JSONResponse({"error": "down"}, status_code=503)
        return await self.receive(request)

    async def feedback_route(self, request: Request) -> Response:
        self.auth.append(request.headers.get("authorization"))
        self.labels.append(json.loads(await request.body()))
        return JSONResponse({"stored": 1})

    def request_event(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The request event logged under ``request_id`` (its data as parsed JSON)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in list(self.events):
                if ev["headers"].get("ce-id") == request_id and ev["headers"]["ce-type"].endswith("request"):
                    return json.loads(ev["body"])
            time.sleep(0.02)
        raise AssertionError(f"no request event for {request_id!r} reached the sink")


@pytest.fixture(scope="module")
def good_rows(scenario_path):
    df = pd.read_parquet(scenario_path).head(3)[COLUMNS].astype(object)
    return df.where(df.notna(), None).to_dict("records")


def _start_predictor(settings, tmp, *extra):
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    log = open(tmp / f"predictor-{port}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "serving.predictor", "--model-name", "churn", "--model-uri",
                             "models:/churn@champion", "--tracking-uri", settings.tracking_uri, "--http-port",
                             str(port), *extra], stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc) -> None:
    import contextlib
    import subprocess

    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    proc.kill()  # nothing once it has exited
    proc.wait()
    proc.log.close()


@pytest.fixture(scope="module")
def stack(trained, tmp_path_factory):
    settings, _ = trained
    tmp = tmp_path_factory.mktemp("trust")
    proc, ms_url = _start_predictor(settings, tmp)
    rec = Receiver()
    try:
        with httpx.Client(base_url=ms_url, timeout=30) as direct, serve_app(rec.app) as rec_url:
            _wait_ready(direct, proc)
            cfg = GatewayConfig(name="churn", primary=Upstream(ms_url, "1"), admin_token=TOKEN,
                                sink_url=rec_url + "/events", feedback_url=rec_url + "/feedback",
                                feedback_outbox=str(tmp / "gateway" / "feedback-outbox.db"), ingest_token=INGEST,
                                sink_linger=0.0)
            with serve_app(create_gateway_app(cfg)) as gw_url, httpx.Client(base_url=gw_url, timeout=30) as gw:
                yield {"direct": direct, "gw": gw, "gw_url": gw_url, "ms_url": ms_url, "rec": rec, "proc": proc,
                       "settings": settings, "tmp": tmp}
    finally:
        _stop(proc)


def _v2(rows, **first):
    inputs = [{"name": c, "shape": [len(rows)], "datatype": "FP64" if c in NUMERIC else "BYTES",
               "data": [r[c] for r in rows]} for c in COLUMNS]
    inputs[0].update(first)
    return {"inputs": inputs}


def _binary_request(rows, nan: bool = False, binary_output: bool = False) -> InferRequest:
    inputs = []
    for c in COLUMNS:
        inp = InferInput(c, [len(rows)], "FP64" if c in NUMERIC else "BYTES")
        values = [r[c] for r in rows]
        if c == "tenure" and nan:
            values[0] = float("nan")
        arr = (np.array(values, dtype=np.float64) if c in NUMERIC
               else np.array([v.encode() for v in values], dtype=np.object_))
        inp.set_data_from_numpy(arr, binary_data=True)
        inputs.append(inp)
    return InferRequest(model_name="churn", infer_inputs=inputs, request_id=uuid.uuid4().hex,
                        parameters={"binary_data_output": True} if binary_output else None)


def _encoded(request: InferRequest) -> tuple[bytes, dict[str, str]]:
    body, length = request.to_rest()
    return body, {"inference-header-content-length": str(length), "content-type": "application/octet-stream"}


def _errors(stack) -> int:
    """Requests counted as failures of the served version (what pushes a canary toward rollback)."""
    return stack["gw"].get("/admin/stats").json()["versions"].get("1", {}).get("errors_total", 0)


def _still_serving(stack, rows) -> None:
    """A normal predict through the gateway answers 200 and its request event reaches the sink."""
    rid = uuid.uuid4().hex
    r = stack["gw"].post(V1, json={"instances": rows[:1]}, headers={"x-request-id": rid})
    assert r.status_code == 200, r.text
    assert stack["rec"].request_event(rid)["instances"] == rows[:1]


# -- defect 1 and 4: only the Open Inference Protocol routes pass the gateway -----------------------------
# (id, method, raw path, expected status, fragment of the error, forwarded: the answer comes from the model)
ROUTE_CASES = [
    ("unload-encoded-traversal", "POST", "/v2/models/..%2Frepository%2Fmodels%2Fchurn%2Funload", 404, "no route",
     False),
    ("load-encoded-traversal", "POST", "/v2/models/..%2Frepository%2Fmodels%2Fchurn%2Fload", 404, "no route", False),
    ("unload-lowercase-encoding", "POST", "/v2/models/..%2frepository%2fmodels%2fchurn%2funload", 404, "no route",
     False),
    ("metrics-v1-traversal", "GET", "/v1/models/..%2F..%2Fmetrics", 404, "no route", False),
    ("repository-direct", "POST", "/v2/repository/models/churn/unload", 404, "no route", False),
    ("repository-index", "POST", "/v2/repository/index", 404, "no route", False),
    ("metrics-upstream", "GET", "/v2/models/churn/..%2F..%2F..%2Fmetrics", 404, "no route", False),
    ("docs-upstream", "GET", "/v1/docs", 404, "no route", False),
    ("dotdot-name", "GET", "/v2/models/churn..x/ready", 404, "'..'", False),
    ("other-model-predict", "POST", "/v1/models/other:predict", 404, "model 'other' is not served here", False),
    ("other-model-metadata", "GET", "/v2/models/other", 404, "this gateway serves 'churn'", False),
    ("explain-not-served", "POST", "/v1/models/churn:explain", 404, "no route", False),
    ("get-on-predict", "GET", "/v1/models/churn:predict", 405, "use POST", False),
    ("head-on-predict", "HEAD", "/v1/models/churn:predict", 405, None, False),
    ("head-on-infer", "HEAD", "/v2/models/churn/infer", 405, None, False),
    ("post-on-ready", "POST", "/v2/models/churn/ready", 405, "use GET", False),
    ("v1-liveness", "GET", "/", 200, None, True),
    ("v1-models", "GET", "/v1/models", 200, None, True),
    ("v1-model-ready", "GET", "/v1/models/churn", 200, None, True),
    ("v2-server", "GET", "/v2", 200, None, True),
    ("v2-live", "GET", "/v2/health/live", 200, None, True),
    ("v2-model-ready", "GET", "/v2/models/churn/ready", 200, None, True),
]


@pytest.mark.parametrize("method,path,status,fragment,forwarded", [c[1:] for c in ROUTE_CASES],
                         ids=[c[0] for c in ROUTE_CASES])
def test_only_inference_routes_reach_the_model_server(stack, good_rows, method, path, status, fragment, forwarded):
    r = stack["gw"].request(method, path)
    assert r.status_code == status, r.text
    if status == 405:
        assert "POST" in r.headers["allow"] or "GET" in r.headers["allow"]
    if fragment:
        assert fragment in r.json()["error"]
    if path == "/":
        assert r.json() == {"status": "alive"}
    # the model is still loaded and served, through the gateway and on the model server
    assert stack["direct"].get("/v2/models/churn/ready").status_code == 200
    _still_serving(stack, good_rows)


def test_model_repository_is_off_on_the_model_server_unless_asked_for(stack, trained, good_rows):
    """The repository extension (load/unload without a token) is not mounted by default, nor published."""
    direct = stack["direct"]
    assert direct.post("/v2/repository/models/churn/unload").status_code == 404
    assert direct.post("/v2/repository/models/churn/load").status_code == 404
    assert not [p for p in direct.get("/openapi.json").json()["paths"] if p.startswith("/v2/repository")]
    assert direct.get("/v2/models/churn/ready").status_code == 200
    _still_serving(stack, good_rows)
    proc, url = _start_predictor(stack["settings"], stack["tmp"], "--enable-model-repository")
    try:
        with httpx.Client(base_url=url, timeout=30) as other:
            _wait_ready(other, proc)
            assert other.post("/v2/repository/models/churn/unload").status_code == 200
            assert other.get("/v2/models/churn/ready").status_code != 200
    finally:
        _stop(proc)


# -- defects 2, 3 and 5: bodies the model server must answer with one clear message, or serve and log --------
def _empty_per_column(rows):
    return {"json": {"inputs": [{"name": c, "shape": [0], "datatype": "FP64" if c in NUMERIC else "BYTES",
                                 "data": []} for c in COLUMNS]}}


def _empty_2d(rows):
    return {"json": {"inputs": [{"name": "x", "shape": [0, len(COLUMNS)], "datatype": "BYTES", "data": []}]}}


def _binary_nan(rows):
    body, headers = _encoded(_binary_request(rows, nan=True))
    return {"content": body, "headers": headers}


def _binary(rows):
    body, headers = _encoded(_binary_request(rows))
    return {"content": body, "headers": headers}


def _binary_out(rows):
    body, headers = _encoded(_binary_request(rows, binary_output=True))
    return {"content": body, "headers": headers}


def _no_content_type_v2(rows):
    return {"content": json.dumps(_v2(rows)).encode(), "headers": {}}


def _no_content_type_v1(rows):
    return {"content": json.dumps({"instances": rows}).encode(), "headers": {}}


def _gzip_v1(rows):
    return {"content": gzip.compress(json.dumps({"instances": rows}).encode()),
            "headers": {"content-type": "application/json", "content-encoding": "gzip"}}


def _brotli_v1(rows):
    return {"content": b"\x1b\x00", "headers": {"content-type": "application/json", "content-encoding": "br"}}


def _bad_gzip(rows):
    return {"content": b"\x1f\x8b\x08\x00garbage", "headers": {"content-type": "application/json",
                                                                "content-encoding": "gzip"}}


def _bad_header_length(rows):
    body, headers = _encoded(_binary_request(rows))
    return {"content": body, "headers": {**headers, "inference-header-content-length": str(len(body) + 5)}}


# (id, path, request builder, expected status, fragment of the error / None, logged as JSON)
BODY_CASES = [
    ("v2-empty-tensors", V2, _empty_per_column, 400, "no rows", False),
    ("v2-empty-2d-tensor", V2, _empty_2d, 400, "no rows", False),
    ("v1-empty-instances", V1, lambda rows: {"json": {"instances": []}}, 400, "empty", False),
    ("v2-binary-nan", V2, _binary_nan, 400, "NaN and Infinity are not accepted", False),
    ("v2-binary-request", V2, _binary, 200, None, True),
    ("v2-binary-request-and-response", V2, _binary_out, 200, None, True),
    ("v2-json-without-content-type", V2, _no_content_type_v2, 200, None, True),
    ("v1-json-without-content-type", V1, _no_content_type_v1, 200, None, True),
    ("v1-gzip-body", V1, _gzip_v1, 200, None, True),
    ("v1-brotli-body", V1, _brotli_v1, 415, "Content-Encoding 'br' is not supported", False),
    ("v1-broken-gzip", V1, _bad_gzip, 400, "gzip body", False),
    ("v2-header-length-past-body", V2, _bad_header_length, 400, "inference-header-content-length", False),
]


@pytest.mark.parametrize("path,build,status,fragment,logged", [c[1:] for c in BODY_CASES],
                         ids=[c[0] for c in BODY_CASES])
def test_bodies_get_one_clear_answer_and_answered_ones_are_logged_as_json(stack, good_rows, path, build, status,
                                                                          fragment, logged):
    before = _errors(stack)
    rid = uuid.uuid4().hex
    req = build(good_rows)
    r = stack["gw"].post(path, **{**req, "headers": {**req.get("headers", {}), "x-request-id": rid}})
    assert r.status_code == status, r.text
    if fragment:
        assert fragment in r.json()["error"]
        assert "JSON cannot carry" not in r.json()["error"] and "Traceback" not in r.text
    if logged:
        data = stack["rec"].request_event(rid)
        if path == V2:
            by_name = {t["name"]: t for t in data["inputs"]}
            assert by_name["tenure"]["data"] == [row["tenure"] for row in good_rows]
            assert by_name["region"]["data"] == [row["region"] for row in good_rows]
            assert "binary_data_size" not in json.dumps(data)
        else:
            assert data["instances"] == good_rows
    # a refusal of the client's request is never the version's failure (no push toward rollback)
    assert _errors(stack) == before
    _still_serving(stack, good_rows)


def test_model_server_itself_refuses_empty_and_compressed_and_reads_untyped_json(stack, good_rows):
    r = stack["direct"].post(V2, json=_empty_per_column(good_rows)["json"])
    assert r.status_code == 400 and "no rows" in r.json()["error"]
    r = stack["direct"].post(V1, content=gzip.compress(b'{"instances": []}'),
                             headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415 and "Content-Encoding 'gzip' is not supported" in r.json()["error"]
    r = stack["direct"].post(V2, content=json.dumps(_v2(good_rows)).encode())  # no Content-Type: read as JSON
    assert r.status_code == 200, r.text
    _still_serving(stack, good_rows)


# -- real clients: kserve's InferenceRESTClient, V1 and V2, JSON and binary -----------------------------------
def _client(protocol: str) -> InferenceRESTClient:
    return InferenceRESTClient(RESTConfig(protocol=protocol, timeout=30))


CLIENT_CASES = ["v1-json", "v2-json", "v2-binary-inputs", "v2-binary-inputs-and-outputs"]


@pytest.mark.parametrize("case", CLIENT_CASES)
def test_kserve_client_through_the_gateway_is_served_and_logged(stack, good_rows, case):
    async def call() -> Any:
        client = _client("v1" if case.startswith("v1") else "v2")
        try:
            if case == "v1-json":
                headers = {"x-request-id": uuid.uuid4().hex}
                out = await client.infer(stack["gw_url"], {"instances": good_rows}, model_name="churn",
                                         headers=headers)
                return headers["x-request-id"], out
            if case == "v2-json":
                request = InferRequest.from_inference_request(__import__(
                    "kserve.protocol.rest.v2_datamodels", fromlist=["InferenceRequest"]).InferenceRequest(
                    **_v2(good_rows)), "churn")
                request.id = uuid.uuid4().hex
            else:
                request = _binary_request(good_rows, binary_output=case.endswith("outputs"))
            rid = request.id
            return rid, await client.infer(stack["gw_url"], request, model_name="churn",
                                           headers={"x-request-id": rid})
        finally:
            await client._client.aclose()

    rid, out = asyncio.run(call())
    if case == "v1-json":
        assert len(out["predictions"]) == len(good_rows)
    else:
        preds = out.outputs[0]
        assert preds.name == "predictions" and len(preds.as_numpy()) == len(good_rows)
        assert [o.name for o in out.outputs] == ["predictions"]  # the scores the gateway asked for are not passed on
    data = stack["rec"].request_event(rid)
    assert "instances" in data or {t["name"] for t in data["inputs"]} == set(COLUMNS)
    _still_serving(stack, good_rows)


def test_v2_model_metadata_lists_the_feature_tensors(stack, good_rows):
    for client in (stack["gw"], stack["direct"]):
        meta = client.get("/v2/models/churn").json()
        inputs = {t["name"]: t for t in meta["inputs"]}
        assert list(inputs) == COLUMNS
        assert inputs["tenure"] == {"name": "tenure", "datatype": "FP64", "shape": [-1]}
        assert inputs["region"]["datatype"] == "BYTES"
        assert meta["outputs"][0]["name"] == "predictions" and meta["outputs"][0]["datatype"]
    _still_serving(stack, good_rows)


@pytest.mark.parametrize("binary_output", [False, True], ids=["binary-inputs", "binary-inputs-and-outputs"])
def test_tritonclient_reads_the_metadata_and_infers_binary_through_the_gateway(stack, good_rows, binary_output):
    """Triton's own HTTP client, as its users call it: tensors built from the model's V2 metadata, sent
    with the binary data extension; the answer is the model's, the request is logged as JSON."""
    import tritonclient.http as triton

    host = stack["gw_url"].removeprefix("http://")
    client = triton.InferenceServerClient(host, network_timeout=30.0)
    try:
        assert client.is_server_live() and client.is_model_ready("churn")
        meta = client.get_model_metadata("churn")
        inputs = []
        for tensor in meta["inputs"]:
            values = [r[tensor["name"]] for r in good_rows]
            arr = (np.array(values, dtype=np.float64) if tensor["datatype"] == "FP64"
                   else np.array([str(v).encode() for v in values], dtype=np.object_))
            inp = triton.InferInput(tensor["name"], [len(good_rows)], tensor["datatype"])
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        outputs = [triton.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=binary_output)]
        rid = uuid.uuid4().hex
        result = client.infer("churn", inputs, outputs=outputs, request_id=rid, headers={"x-request-id": rid})
    finally:
        client.close()
    predictions = result.as_numpy(meta["outputs"][0]["name"])
    direct = stack["direct"].post(V1, json={"instances": good_rows}).json()["predictions"]
    assert [int(p) for p in predictions] == [int(p) for p in direct]
    data = stack["rec"].request_event(rid)
    assert {t["name"] for t in data["inputs"]} == set(COLUMNS)
    assert "binary_data_size" not in json.dumps(data)  # logged as JSON the monitor can read
    _still_serving(stack, good_rows)


# -- defect 6: the ingest token on every POST to the sink and to /feedback ------------------------------------
def test_events_and_labels_carry_the_ingest_token(stack, good_rows):
    rec = stack["rec"]
    rid = uuid.uuid4().hex
    r = stack["gw"].post(V1, json={"instances": good_rows[:1]}, headers={"x-request-id": rid})
    assert r.status_code == 200
    rec.request_event(rid)
    label = {"id": rid, "label": r.json()["predictions"][0]}
    forwarded = len(rec.labels)
    for headers in ({}, {"authorization": "Bearer not-the-token"}, {"authorization": f"Bearer {TOKEN}"}):
        refused = stack["gw"].post("/feedback", json=label, headers=headers)  # a label decides quality: token only
        assert refused.status_code == 401 and "DRIFTLOOP_INGEST_TOKEN" in refused.json()["error"], refused.text
    assert len(rec.labels) == forwarded  # nothing reached the monitor
    fb = stack["gw"].post("/feedback", json=label, headers={"authorization": f"Bearer {INGEST}"})
    assert fb.status_code == 200 and fb.json()["accepted"] == 1, fb.text  # the refused ones took no slot
    assert rec.labels and rec.labels[-1][0]["id"] == rid
    assert rec.auth and set(rec.auth) == {f"Bearer {INGEST}"}
    _still_serving(stack, good_rows)


# -- defect 8: a reused x-request-id with other rows -------------------------------------------------------------
def test_reused_request_id_with_other_rows_is_refused_and_labels_stay_joined(stack, good_rows):
    gw, rid = stack["gw"], uuid.uuid4().hex
    first = gw.post(V1, json={"instances": good_rows[:1]}, headers={"x-request-id": rid})
    assert first.status_code == 200
    again = gw.post(V1, json={"instances": good_rows[:1]}, headers={"x-request-id": rid})  # a retry: same body
    assert again.status_code == 200 and again.headers["x-request-id"] == rid
    other = gw.post(V1, json={"instances": good_rows[1:3]}, headers={"x-request-id": rid})
    assert other.status_code == 409 and "already used for a different request" in other.json()["error"]
    assert stack["rec"].request_event(rid)["instances"] == good_rows[:1]
    assert not [e for e in stack["rec"].events if e["headers"].get("ce-id") == rid
                and json.loads(e["body"]).get("instances") == good_rows[1:3]]
    fb = gw.post("/feedback", json={"id": rid, "label": first.json()["predictions"][0]},
                 headers={"authorization": f"Bearer {INGEST}"})
    assert fb.status_code == 200 and fb.json()["accepted"] == 1
    _still_serving(stack, good_rows)


# -- defect 9: OpenAPI on both services -----------------------------------------------------------------------------
def test_openapi_documents_describe_every_route(stack, good_rows):
    doc = stack["gw"].get("/openapi.json").json()
    validate(doc)
    for path in ("/v1/models/{name}:predict", "/v2/models/{name}/infer", "/feedback", "/admin/split", "/metrics",
                 "/healthz", "/", "/v2/health/ready", "/v2/models/{name}"):
        assert path in doc["paths"], path
    assert doc["paths"]["/admin/split"]["put"]["security"] == [{"bearer": []}]
    assert doc["paths"]["/feedback"]["post"]["security"] == [{"ingestToken": []}]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    model_doc = stack["direct"].get("/openapi.json").json()
    validate(model_doc)
    assert "/v2/models/{model_name}/infer" in model_doc["paths"]
    _still_serving(stack, good_rows)


# -- defect 7: the event outbox (sink failing, then back) -----------------------------------------------------------
def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _metrics_when(gw: httpx.Client, name: str, at_least: float, timeout: float = 10.0) -> str:
    """The gateway's /metrics once ``name`` reaches ``at_least`` (or the last scrape after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        text = gw.get("/metrics").text
        if _metric(text, name) >= at_least or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_events_wait_in_the_outbox_while_the_sink_fails_and_go_out_when_it_is_back(stack, good_rows, tmp_path):
    rec = Receiver()
    outbox = tmp_path / "serving" / "events-outbox.db"
    with serve_app(rec.app) as rec_url:
        cfg = GatewayConfig(name="churn", primary=Upstream(stack["ms_url"], "1"), sink_url=rec_url + "/events",
                            ingest_token=INGEST, event_outbox=str(outbox), event_retry_seconds=0.2, sink_linger=0.0)
        with serve_app(create_gateway_app(cfg)) as gw_url, httpx.Client(base_url=gw_url, timeout=30) as gw:
            rec.down = True
            ids = [uuid.uuid4().hex for _ in range(20)]
            for rid in ids:
                assert gw.post(V1, json={"instances": good_rows[:1]}, headers={"x-request-id": rid}).status_code == 200
            text = _metrics_when(gw, 'driftloop_gateway_event_outbox{state="pending"}', 40)
            assert _metric(text, 'driftloop_gateway_event_outbox{state="pending"}') == 40, text
            assert "sink_503" not in text and "sink_unreachable" not in text  # nothing dropped
            assert oct(outbox.stat().st_mode & 0o777) == "0o600"
            rec.down = False
            for rid in ids:
                assert rec.request_event(rid, timeout=20)["instances"] == good_rows[:1]
            deadline = time.monotonic() + 10
            while _metric(gw.get("/metrics").text, 'driftloop_gateway_event_outbox{state="pending"}') and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            assert _metric(gw.get("/metrics").text, 'driftloop_gateway_event_outbox{state="pending"}') == 0
            assert set(rec.auth) == {f"Bearer {INGEST}"}
    _still_serving(stack, good_rows)


def test_a_full_outbox_drops_and_counts_and_logs_once(stack, good_rows, tmp_path, caplog):
    rec = Receiver()
    rec.down = True
    with serve_app(rec.app) as rec_url:
        cfg = GatewayConfig(name="churn", primary=Upstream(stack["ms_url"], "1"), sink_url=rec_url + "/events",
                            event_outbox=str(tmp_path / "events.db"), event_outbox_max_rows=6,
                            event_retry_seconds=30, sink_linger=0.0)
        with caplog.at_level("WARNING", logger="serving.gateway"), serve_app(create_gateway_app(cfg)) as gw_url, \
                httpx.Client(base_url=gw_url, timeout=30) as gw:
            for _ in range(10):
                assert gw.post(V1, json={"instances": good_rows[:1]}).status_code == 200
            text = _metrics_when(gw, 'driftloop_gateway_events_dropped_total{reason="outbox_full"}', 14)
            assert _metric(text, 'driftloop_gateway_event_outbox{state="pending"}') == 6
            assert _metric(text, 'driftloop_gateway_events_dropped_total{reason="outbox_full"}') == 14
            assert predicted_ok(gw, good_rows)
    full = [r for r in caplog.records if "outbox_full" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in full]
    with sqlite3.connect(tmp_path / "events.db") as db:  # what was kept survives the gateway
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 6
    _still_serving(stack, good_rows)


def predicted_ok(gw: httpx.Client, rows) -> bool:
    return gw.post(V1, json={"instances": rows[:1]}).status_code == 200
