"""A table of malformed inputs against one served model (a real KServe ModelServer process and the
gateway in front of it), /feedback and the admin endpoints.

Each case checks three things: a 4xx whose message names the problem; the service still up (a good
request still answers 200, on the SAME keep-alive connection); nothing already accepted lost (the
label, the statistics and the split accepted before the table are all still there).
"""

from __future__ import annotations

import json
import time
import uuid
import subprocess
import sys

import httpx
import pandas as pd
import pytest

from serving.gateway import GatewayConfig, Upstream, create_gateway_app
from tests.conftest import free_port
from tests.serving_helpers import serve_app

NUMERIC = ["tenure", "monthly_spend", "sessions", "support_calls", "latency_ms"]
COLUMNS = NUMERIC + ["region", "plan"]
MAX_PAYLOAD = 64 * 1024
TOKEN = "bad-input-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
V1 = "/v1/models/churn:predict"
V2 = "/v2/models/churn/infer"


@pytest.fixture(scope="module")
def good_row(scenario_path):
    df = pd.read_parquet(scenario_path).head(1)[COLUMNS].astype(object)
    return df.where(df.notna(), None).to_dict("records")[0]


@pytest.fixture(scope="module")
def served(trained, good_row, tmp_path_factory):
    """One model server process, the gateway in front of it, and what was accepted before the table."""
    settings, _ = trained
    port = free_port()
    # a file, not a pipe: a full pipe would block the server's logging (one line per refused request)
    log = open(tmp_path_factory.mktemp("bad-input") / "predictor.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "serving.predictor", "--model-name", "churn", "--model-uri",
                             "models:/churn@champion", "--tracking-uri", settings.tracking_uri, "--http-port",
                             str(port), "--max-payload-bytes", str(MAX_PAYLOAD)],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    ms_url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=ms_url, timeout=30) as direct:
            _wait_ready(direct, proc)
            cfg = GatewayConfig(name="churn", primary=Upstream(ms_url, "1"), canary=Upstream(ms_url, "1c"),
                                canary_percent=0, admin_token=TOKEN, ingest_token=TOKEN, max_payload_bytes=MAX_PAYLOAD,
                                max_feedback_bytes=4096)
            with serve_app(create_gateway_app(cfg)) as gw_url, httpx.Client(base_url=gw_url, timeout=30) as gw:
                r = gw.post(V1, json={"instances": [good_row]}, headers={"x-request-id": "accepted-1"})
                assert r.status_code == 200, r.text
                assert gw.post("/feedback", json={"id": "accepted-1", "label": r.json()["predictions"][0]},
                               headers=AUTH).status_code == 200  # the ingest token (one token in these tests)
                assert gw.put("/admin/split", json={"canary_percent": 5}, headers=AUTH).status_code == 200
                yield {"direct": direct, "gateway": gw, "proc": proc, "gw_url": gw_url, "ms_url": ms_url}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(client: httpx.Client, proc: subprocess.Popen) -> None:
    import time

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise AssertionError(f"model server exited: {proc.log.read()[-2000:]}")
        try:
            if client.get("/v2/health/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("model server did not become ready")


def _v2(row, **changes):
    inputs = [{"name": c, "shape": [1], "datatype": "FP64" if c in NUMERIC else "BYTES", "data": [row[c]]}
              for c in COLUMNS]
    first = changes.pop("first", None)
    if first is not None:
        inputs[0] = {**inputs[0], **first}
    return {"id": "t", "inputs": inputs, **changes}


def _raw(text: str) -> bytes:
    return text.encode()


# (name, protocol/target, body: dict | bytes | callable(row), expected status, fragment of the message)
MODEL_CASES = [
    ("v1-not-json", V1, b'{"instances": [', 400, "Unrecognized request format"),
    ("v1-bool-for-number", V1, lambda r: {"instances": [dict(r, tenure=True)]}, 400, "column 'tenure' expects a number"),
    ("v1-string-for-number", V1, lambda r: {"instances": [dict(r, tenure="twelve")]}, 400, "column 'tenure' expects a number"),
    ("v1-number-for-string", V1, lambda r: {"instances": [dict(r, region=3)]}, 400, "column 'region' expects a string"),
    ("v1-missing-column", V1, lambda r: {"instances": [{k: v for k, v in r.items() if k != "plan"}]}, 400,
     "missing column(s) ['plan']"),
    ("v1-extra-column", V1, lambda r: {"instances": [dict(r, colour="red")]}, 400, "unknown column(s) ['colour']"),
    ("v1-nan-literal", V1, lambda r: _raw(json.dumps({"instances": [dict(r, tenure=float("nan"))]})), 400,
     "Unrecognized request format"),
    ("v1-huge-number", V1, lambda r: _raw(json.dumps({"instances": [r]}).replace('"tenure": ', '"tenure": 1e999, "x": ')),
     400, "Unrecognized request format"),
    ("v1-empty", V1, {"instances": []}, 400, '"instances" is empty'),
    ("v1-no-instances", V1, lambda r: {"rows": [r]}, 400, 'needs "instances"'),
    ("v1-row-too-short", V1, lambda r: {"instances": [[r[c] for c in COLUMNS[:-1]]]}, 400, "has 6 values; expected 7"),
    ("v1-instances-not-list", V1, lambda r: {"instances": r}, 400, 'be a list'),
    ("v1-unknown-model", "/v1/models/nope:predict", lambda r: {"instances": [r]}, 404, "nope"),
    ("v2-not-json", V2, b'{"inputs": [', 400, "malformed request"),
    ("v2-nan-literal", V2, lambda r: _raw(json.dumps(_v2(r, first={"data": [float("nan")]}))), 400, "NaN"),
    ("v2-infinity", V2, lambda r: _raw(json.dumps(_v2(r, first={"data": [float("inf")]}))), 400, "inf"),
    ("v2-int32-fraction", V2, lambda r: _v2(r, first={"datatype": "INT32", "data": [15.5]}), 400,
     "is INT32 but holds 15.5"),
    ("v2-negative-shape", V2, lambda r: _v2(r, first={"shape": [-1]}), 400, "shape [-1]"),
    ("v2-unknown-datatype", V2, lambda r: _v2(r, first={"datatype": "FP128"}), 400, "'FP128'"),
    ("v2-shape-mismatch", V2, lambda r: _v2(r, first={"shape": [2]}), 400, "shape [2] needs 2"),
    ("v2-bool-for-number", V2, lambda r: _v2(r, first={"data": [True]}), 400, "holds bool"),
    ("v2-bytes-for-number", V2, lambda r: _v2(r, first={"datatype": "BYTES", "data": ["12"]}), 400,
     "column 'tenure' expects numbers"),
    ("v2-missing-tensor", V2, lambda r: {"inputs": _v2(r)["inputs"][:-1]}, 400, "missing column(s) ['plan']"),
    ("v2-empty-inputs", V2, {"inputs": []}, 400, '"inputs" is empty'),
    ("v2-id-not-string", V2, lambda r: _v2(r, id=7), 400, "id"),
    ("v2-unknown-model", "/v2/models/nope/infer", lambda r: _v2(r), 404, "nope"),
    ("oversize", V1, lambda r: {"instances": [r] * (MAX_PAYLOAD // 150)}, 413, "max_payload_bytes"),
]


def _send(client: httpx.Client, method: str, path: str, body, headers=None) -> httpx.Response:
    headers = dict(headers or {})
    if isinstance(body, bytes):
        headers.setdefault("content-type", "application/json")
        return client.request(method, path, content=body, headers=headers)
    return client.request(method, path, json=body, headers=headers)


def _still_up_and_nothing_lost(served, good_row) -> None:
    for name in ("direct", "gateway"):  # the same keep-alive clients that sent the bad request
        r = served[name].post(V1, json={"instances": [good_row]})
        assert r.status_code == 200 and r.headers.get("connection") != "close", (name, r.status_code, r.text)
        r = served[name].post(V2, json={"inputs": _v2(good_row)["inputs"]})
        assert r.status_code == 200 and r.json()["id"], (name, r.text)
    assert served["proc"].poll() is None
    gw = served["gateway"]
    stats = gw.get("/admin/stats")
    assert stats.status_code == 200
    primary = stats.json()["versions"]["1"]
    assert primary["labels"] >= 1 and primary["requests_total"] >= 1 and primary["errors_total"] == 0
    status = stats.json()["status"]
    assert status["canary_percent"] == 5 and status["primary"] == {"url": served["ms_url"], "version": "1"}


@pytest.mark.parametrize("target", ["direct", "gateway"])
@pytest.mark.parametrize("name,path,body,status,message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_malformed_model_request(served, good_row, target, name, path, body, status, message):
    payload = body(good_row) if callable(body) else body
    r = _send(served[target], "POST", path, payload)
    assert r.status_code == status, (r.status_code, r.text)
    assert message in r.json()["error"], r.text
    _still_up_and_nothing_lost(served, good_row)


def test_a_refused_request_is_one_line_in_the_model_servers_log_without_a_traceback(served, good_row):
    # kserve's own handler logs a whole traceback at ERROR for each refused request
    marker = f"colour_{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        r = _send(served["direct"], "POST", V1, {"instances": [dict(good_row, **{marker: "red"})]})
        assert r.status_code == 400 and marker in r.json()["error"]
    deadline = time.monotonic() + 5
    while True:
        served["proc"].log.seek(0)
        log = served["proc"].log.read()
        if log.count(marker) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    lines = [line for line in log.splitlines() if marker in line]
    assert len(lines) == 3 and all("refused POST /v1/models/churn:predict (400)" in line for line in lines), lines
    assert "Traceback" not in log  # nor for any refused request the tests above sent


FEEDBACK_CASES = [
    ("wrong-token", {"id": "accepted-1", "label": 0}, {"authorization": "Bearer not-it"}, 401, "DRIFTLOOP_INGEST_TOKEN"),
    ("not-bearer", {"id": "accepted-1", "label": 0}, {"authorization": f"Basic {TOKEN}"}, 401, "bearer token"),
    ("text-plain", b'{"id":"accepted-1","label":1}', {"content-type": "text/plain"}, 415, "application/json"),
    ("form", b"id=accepted-1&label=1", {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ("not-json", b"{not json", None, 400, "not valid JSON"),
    ("nan-label", b'{"id":"accepted-1","label":NaN}', None, 400, "NaN"),
    ("infinity-label", b'{"id":"accepted-1","label":Infinity}', None, 400, "Infinity"),
    ("object-label", {"id": "accepted-1", "label": {"a": 1}}, None, 400, "label must be"),
    ("null-label", {"id": "accepted-1", "label": None}, None, 400, "label must be"),
    ("missing-label", {"id": "accepted-1"}, None, 400, "feedback must be"),
    ("id-not-string", {"id": 1, "label": 1}, None, 400, "id must be"),
    ("empty-list", [], None, 400, "empty"),
    ("duplicate", {"id": "accepted-1", "label": 0}, None, 409, "already have a label"),
    ("unknown-id", {"id": "never-served", "label": 1}, None, 404, "never-served"),
    ("oversize", [{"id": "accepted-1", "label": 1}] * 200, None, 413, "larger than 4096"),
]


@pytest.mark.parametrize("name,body,headers,status,message", FEEDBACK_CASES, ids=[c[0] for c in FEEDBACK_CASES])
def test_malformed_feedback(served, good_row, name, body, headers, status, message):
    r = _send(served["gateway"], "POST", "/feedback", body, {**AUTH, **(headers or {})})
    assert r.status_code == status, (r.status_code, r.text)
    assert message in r.json()["error"], r.text
    _still_up_and_nothing_lost(served, good_row)


ADMIN_CASES = [
    ("split-no-token", "/admin/split", {"canary_percent": 50}, {}, 401, "token"),
    ("split-wrong-token", "/admin/split", {"canary_percent": 50}, {"authorization": "Bearer x"}, 401, "token"),
    ("upstreams-no-token", "/admin/upstreams", {"canary": None}, {}, 401, "token"),
    ("split-out-of-range", "/admin/split", {"canary_percent": 150}, AUTH, 400, "between 0 and 100"),
    ("split-nan", "/admin/split", b'{"canary_percent": NaN}', AUTH, 400, "NaN"),
    ("split-not-json", "/admin/split", b"50", AUTH, 400, "canary_percent"),
    ("upstream-file-url", "/admin/upstreams", {"canary": {"url": "file:///etc/passwd", "version": "2"}}, AUTH, 400,
     "http"),
    ("upstream-not-a-url", "/admin/upstreams", {"canary": {"url": "not a url", "version": "2"}}, AUTH, 400, "http"),
    ("upstream-int-version", "/admin/upstreams", {"primary": {"url": "http://127.0.0.1:9", "version": 2}}, AUTH, 400,
     "version"),
    ("upstream-self", "/admin/upstreams", "self", AUTH, 400, "gateway itself"),
    ("upstream-unknown-key", "/admin/upstreams", {"canary": None, "weight": 5}, AUTH, 400, "unknown key"),
]


@pytest.mark.parametrize("name,path,body,headers,status,message", ADMIN_CASES, ids=[c[0] for c in ADMIN_CASES])
def test_malformed_admin_call(served, good_row, name, path, body, headers, status, message):
    if body == "self":
        body = {"canary": {"url": served["gw_url"], "version": "2"}}
    r = _send(served["gateway"], "PUT", path, body, headers)
    assert r.status_code == status, (r.status_code, r.text)
    assert message in r.json()["error"], r.text
    _still_up_and_nothing_lost(served, good_row)


def test_v2_without_id_or_with_null_id_gets_a_generated_id(served, good_row):
    for target in ("direct", "gateway"):
        ids = set()
        for body in ({"inputs": _v2(good_row)["inputs"]}, {"id": None, "inputs": _v2(good_row)["inputs"]}):
            r = served[target].post(V2, json=body)
            assert r.status_code == 200, r.text
            ids.add(r.json()["id"])
        assert len(ids) == 2 and all(len(i) >= 32 for i in ids)


def test_served_v2_traffic_is_json_the_inference_log_accepts(served, good_row):
    """What the gateway logs is exactly what it forwarded and answered: both must be strict JSON."""
    gap = _v2(good_row, first={"data": [None]})  # a gap is null, never NaN
    r = served["gateway"].post(V2, json=gap)
    assert r.status_code == 200, r.text
    import orjson

    orjson.loads(json.dumps(gap))
    orjson.loads(r.content)
