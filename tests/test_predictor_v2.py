"""The predictor's fast V2 path (``FastInferV2``) answers exactly what kserve's own V2 route answers.

Two real predictor processes serve the same registered model, one with the fast path (the
default) and one with ``--kserve-v2-route``; every request below goes to both and the status,
content type and body bytes must be the same — answers and refusals alike.
"""

import orjson
import pytest

from tests.test_predictor import COLUMNS, NUMERIC, _predictor, rows  # noqa: F401 - rows: the fixture


@pytest.fixture(scope="module")
def pair(trained):
    settings, _ = trained
    with _predictor(settings) as fast, _predictor(settings, "--kserve-v2-route") as stock:
        yield fast[0], stock[0]


def _columns(rows, **extra):
    return {**extra, "inputs": [{"name": c, "shape": [len(rows)], "datatype": "FP64" if c in NUMERIC else "BYTES",
                                 "data": [r[c] for r in rows]} for c in COLUMNS]}


def _cases(rows):
    flat = [row[c] for row in rows for c in COLUMNS]
    two_d = {"id": "2d", "inputs": [{"name": "x", "shape": [len(rows), len(COLUMNS)], "datatype": "BYTES",
                                     "data": flat}]}
    bad_type = _columns(rows[:2], id="bad-type")
    bad_type["inputs"][0]["datatype"] = "NOPE"
    missing = _columns(rows[:2], id="missing")
    del missing["inputs"][0]["data"]
    wrong_col = _columns(rows[:2], id="wrong-col")
    wrong_col["inputs"][0]["name"] = "not_a_column"
    return {
        "batch": (_columns(rows, id="batch"), {}),
        "one row": (_columns(rows[:1], id="one"), {}),
        "2-D tensor": (two_d, {}),
        "scores asked": (_columns(rows[:5], id="scored"), {"x-driftloop-scores": "true"}),
        "output named": (_columns(rows[:3], id="named", outputs=[{"name": "predictions"}]), {}),
        "unknown output": (_columns(rows[:3], id="unknown", outputs=[{"name": "nope"}]), {}),
        "parameters": (_columns(rows[:3], id="params", parameters={"binary_data_output": False}), {}),
        "bad datatype": (bad_type, {}),
        "no data": (missing, {}),
        "wrong column": (wrong_col, {}),
        "not an object": ([1, 2], {}),
    }


def test_fast_v2_answers_are_byte_identical_to_kserves_route(pair, rows):
    fast, stock = pair
    for name, (doc, headers) in _cases(rows).items():
        body = orjson.dumps(doc)
        a = fast.post("/v2/models/churn/infer", content=body, headers={"content-type": "application/json", **headers})
        b = stock.post("/v2/models/churn/infer", content=body, headers={"content-type": "application/json", **headers})
        assert (a.status_code, a.headers["content-type"]) == (b.status_code, b.headers["content-type"]), name
        assert a.content == b.content, name
    ok = fast.post("/v2/models/churn/infer", json=_columns(rows, id="batch")).json()
    assert ok["outputs"][0]["shape"] == [len(rows)]


def test_fast_v2_without_an_id_answers_like_kserve_with_a_fresh_id(pair, rows):
    fast, stock = pair
    doc = _columns(rows[:4])
    a = fast.post("/v2/models/churn/infer", json=doc).json()
    b = stock.post("/v2/models/churn/infer", json=doc).json()
    assert a.pop("id") != b.pop("id")
    assert a == b


def test_fast_v2_keeps_the_payload_limit_and_malformed_json_refusals(pair, rows):
    fast, stock = pair
    for body in (b'{"inputs": [', b"x" * (64 * 1024 + 1)):
        a = fast.post("/v2/models/churn/infer", content=body, headers={"content-type": "application/json"})
        b = stock.post("/v2/models/churn/infer", content=body, headers={"content-type": "application/json"})
        assert a.status_code == b.status_code and a.status_code in (400, 413)
        assert a.content == b.content


def test_fast_v2_answers_plain_requests_itself_and_hands_the_rest_to_kserve(trained, rows):
    """In process: the middleware answers a plain request without calling the app behind it, and
    passes anything else (here: ``parameters``) through with the body it read."""
    import asyncio

    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane

    from serving.predictor import DriftloopModel, FastInferV2

    settings, _ = trained
    model = DriftloopModel("churn", "models:/churn@champion", tracking_uri=settings.tracking_uri)
    model.load()
    repo = ModelRepository(models_dir="/nonexistent")
    repo.update(model)
    passed: list[bytes] = []

    async def kserve_route(scope, receive, send):
        passed.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = FastInferV2(kserve_route, DataPlane(model_registry=repo))

    async def post(doc) -> tuple[int, bytes]:
        body, sent = orjson.dumps(doc), []
        scope = {"type": "http", "method": "POST", "path": "/v2/models/churn/infer",
                 "headers": [(b"content-type", b"application/json")]}

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        await middleware(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    status, answer = asyncio.run(post(_columns(rows[:3], id="plain")))
    assert status == 200 and not passed
    assert orjson.loads(answer)["outputs"][0]["shape"] == [3]
    with_parameters = _columns(rows[:3], id="p", parameters={"binary_data_output": False})
    assert asyncio.run(post(with_parameters))[0] == 299
    assert passed == [orjson.dumps(with_parameters)]


def test_an_all_numeric_estimator_predicts_on_the_array_with_the_frames_answers():
    """A plain estimator fitted on exactly the signature's numeric columns is given the float64 array
    (sklearn's frame checks skipped): same predictions and scores as on the DataFrame; a pipeline, a
    string column or another column order keeps the DataFrame."""
    import numpy as np
    import pandas as pd
    from kserve.protocol.infer_type import InferInput, InferRequest
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from serving.predictor import DriftloopModel, InputSchema, _takes_array

    rng = np.random.default_rng(3)
    cols = tuple(f"x{i}" for i in range(6))
    train = pd.DataFrame(rng.normal(size=(400, 6)), columns=cols)
    train.iloc[::17, 2] = np.nan
    fitted = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(train, train["x0"] + train["x1"] > 0)
    schema = InputSchema(cols, frozenset(cols))
    assert _takes_array(fitted, schema)
    assert not _takes_array(make_pipeline(StandardScaler(), HistGradientBoostingClassifier()).fit(train, train["x0"] > 0),
                            schema)
    assert not _takes_array(fitted, InputSchema(cols[::-1], frozenset(cols)))
    assert not _takes_array(fitted, InputSchema(cols, frozenset(cols[:-1])))

    model = DriftloopModel("m", "unused")
    model._model, model.schema, model._as_array, model.model_version = fitted, schema, True, "1"
    rows = pd.DataFrame(rng.normal(size=(50, 6)), columns=cols)
    rows.iloc[3, 4] = np.nan
    instances = [{c: (None if pd.isna(v) else v) for c, v in r.items()} for r in rows.to_dict("records")]
    expected = fitted.predict(rows).tolist()
    assert model.predict({"instances": instances})["predictions"] == expected
    scored = model.predict({"instances": instances}, headers={"x-driftloop-scores": "true"})
    assert np.array_equal(np.asarray(scored["scores"]), fitted.predict_proba(rows))
    v2 = InferRequest(model_name="m", request_id="r", infer_inputs=[
        InferInput(name=c, shape=[50], datatype="FP64", data=[i[c] for i in instances]) for c in cols])
    assert model.predict(v2).outputs[0].data == expected
