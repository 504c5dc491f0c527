"""Several models in one KServe ModelServer process (``serving.model_pack``) against a real local
MLflow registry, and the plan of which models share a process (``pack``)."""

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest

from driftloop.core.processes import free_port, spawn, stop_processes
from serving.model_pack import ModelSpec, main, pack, parse_model_spec

MAX_PAYLOAD = 16 * 1024
ROWS = {
    "pack-a": [{"x1": float(i), "x2": float(i % 3)} for i in range(6)],
    "pack-b": [{"u": float(i), "v": i ** 0.5, "w": 1.0} for i in range(6)],
    "pack-c": [{"z": float(i), "city": ["oslo", "lima", None][i % 3]} for i in range(6)],
}


def _log(name: str, model, frame: pd.DataFrame, path: str | None = None) -> str:
    """Register ``model`` as ``name`` (or save it to ``path``); returns its URI."""
    import mlflow
    from mlflow.models import infer_signature

    from components.register import trusted_types

    kwargs = {"signature": infer_signature(frame, model.predict(frame)), "pip_requirements": ["scikit-learn"],
              "skops_trusted_types": trusted_types(model)}
    if path is not None:
        mlflow.sklearn.save_model(model, path, **kwargs)
        return path
    with mlflow.start_run():
        mlflow.sklearn.log_model(model, name="model", registered_model_name=name, **kwargs)
    return f"models:/{name}/1"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny models of different columns and learners: two in a registry, one saved to a path.

    Returns (tracking URI, {name: (version, URI)}, {name: the model's in-process predictions}).
    """
    import mlflow
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder
    from sklearn.tree import DecisionTreeRegressor

    home = tmp_path_factory.mktemp("pack")
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    frames = {name: pd.DataFrame(rows * 4) for name, rows in ROWS.items()}
    a = LogisticRegression().fit(frames["pack-a"], frames["pack-a"].x1 > 2)
    b = DecisionTreeRegressor(max_depth=3, random_state=0).fit(frames["pack-b"], frames["pack-b"].u * 2)
    c = make_pipeline(make_column_transformer((OneHotEncoder(handle_unknown="ignore"), ["city"]),
                                              remainder="passthrough"),
                      LogisticRegression()).fit(frames["pack-c"], frames["pack-c"].city == "oslo")
    try:
        specs = {"pack-a": ("1", _log("pack-a", a, frames["pack-a"])),
                 "pack-b": ("1", _log("pack-b", b, frames["pack-b"])),
                 "pack-c": ("7", _log("pack-c", c, frames["pack-c"], str(home / "c-model")))}
    finally:
        mlflow.set_tracking_uri(previous)
    expected = {name: m.predict(pd.DataFrame(ROWS[name])).tolist()
                for name, m in (("pack-a", a), ("pack-b", b), ("pack-c", c))}
    return tracking_uri, specs, expected


def _wait_ready(url: str, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"model_pack exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError("model_pack did not become ready")


@pytest.fixture(scope="module")
def server(models):
    """One model_pack process serving the three models and a fourth whose URI names nothing (one
    process start costs ~10 s of CPU: one serves every case). Yields (url, process, stderr file)."""
    tracking_uri, specs, _ = models
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    port = free_port()
    cmd = [sys.executable, "-m", "serving.model_pack", "--http-port", str(port), "--max-payload-bytes",
           str(MAX_PAYLOAD)]
    for name, (version, uri) in specs.items():
        cmd += ["--model", f"{name}={version}={uri}"]
        if name == "pack-a":
            cmd += ["--model", "pack-missing=1=models:/pack-missing/1"]
    err = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
    proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        yield url, proc, err
    finally:
        stop_processes([proc.pid], timeout=20)


def _v2_body(name: str, request_id: str = "r-1") -> dict:
    rows = ROWS[name]
    return {"id": request_id, "inputs": [
        {"name": col, "shape": [len(rows)], "datatype": "BYTES" if col == "city" else "FP64",
         "data": [r[col] for r in rows]} for col in rows[0]]}


def test_each_model_answers_v1_and_v2_with_its_own_predictions_and_version(server, models):
    """Through plain httpx (the fast V2 path) and kserve's own client (kserve's V2 route)."""
    from kserve import InferenceRESTClient, RESTConfig
    from kserve.protocol.infer_type import InferInput, InferRequest

    _, specs, expected = models
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=30) as client:
        for name, (version, _) in specs.items():
            r = client.post(f"/v1/models/{name}:predict", json={"instances": ROWS[name]})
            assert r.status_code == 200, r.text
            assert r.json() == {"predictions": expected[name], "model_version": version}
            r = client.post(f"/v2/models/{name}/infer", json=_v2_body(name))
            assert r.status_code == 200, r.text
            doc = r.json()
            assert (doc["model_name"], doc["model_version"], doc["id"]) == (name, version, "r-1")
            assert doc["outputs"][0]["data"] == expected[name]

    async def through_kserve() -> dict:
        out = {}
        v1 = InferenceRESTClient(RESTConfig(protocol="v1", retries=0))
        v2 = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        try:
            for name in specs:
                answer = await v1.infer(url, {"instances": ROWS[name]}, model_name=name)
                body = _v2_body(name)["inputs"]
                request = InferRequest(model_name=name, request_id="k-1", infer_inputs=[
                    InferInput(i["name"], i["shape"], i["datatype"], i["data"]) for i in body])
                response = await v2.infer(url, request, model_name=name)
                out[name] = (answer, response.model_name, response.outputs[0].data,
                             await v2.is_model_ready(url, name))
        finally:
            await v1.close()
            await v2.close()
        return out

    # (kserve's client drops a V2 answer's model_version: InferResponse.from_bytes; checked with httpx above)
    for name, (v1_answer, v2_name, v2_data, ready) in asyncio.run(through_kserve()).items():
        assert v1_answer == {"predictions": expected[name], "model_version": specs[name][0]}
        assert (v2_name, list(v2_data), ready) == (name, expected[name], True)


def test_version_routes_are_per_model(server, models):
    _, specs, expected = models
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v2/models/pack-c/versions/7/infer", json=_v2_body("pack-c"))
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == expected["pack-c"], r.text
        assert client.get("/v2/models/pack-a/versions/1/ready").status_code == 200
        r = client.post("/v2/models/pack-a/versions/7/infer", json=_v2_body("pack-a"))
        assert r.status_code == 404 and "serves version '1'" in r.json()["error"], r.text
        r = client.post("/v2/models/pack-b/infer?model_version=7", json=_v2_body("pack-b"))
        assert r.status_code == 404 and "'pack-b' version '7'" in r.json()["error"], r.text


def test_an_unknown_name_is_a_404_naming_it(server):
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=30) as client:
        for path, body in (("/v1/models/nope:predict", {"instances": ROWS["pack-a"]}),
                           ("/v2/models/nope/infer", _v2_body("pack-a"))):
            r = client.post(path, json=body)
            assert r.status_code == 404 and "nope" in r.json()["error"], r.text
        assert client.get("/v2/models/nope/ready").status_code == 404


def test_a_malformed_request_to_one_model_leaves_the_others_answering(server, models):
    _, _, expected = models
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/models/pack-a:predict", json={"instances": [{"x1": "one", "x2": 1.0}]})
        assert r.status_code == 400 and "'x1'" in r.json()["error"], r.text
        r = client.post("/v2/models/pack-a/infer", content=b'{"inputs": [')
        assert r.status_code == 400 and r.json()["error"], r.text
        r = client.post("/v1/models/pack-a:predict", json={"instances": ROWS["pack-b"]})  # another model's columns
        assert r.status_code == 400 and "unknown column(s)" in r.json()["error"], r.text
        big = {"instances": ROWS["pack-c"] * 400}
        r = client.post("/v1/models/pack-c:predict", json=big)
        assert r.status_code == 413 and str(MAX_PAYLOAD) in r.json()["error"], r.text
        r = client.post("/v1/models/pack-b:predict", json={"instances": ROWS["pack-b"]})
        assert r.status_code == 200 and r.json()["predictions"] == expected["pack-b"], r.text


def test_every_model_is_served_by_one_process(server, models):
    _, specs, _ = models
    url, proc, _ = server
    assert psutil.Process(proc.pid).children(recursive=True) == []
    assert sorted(httpx.get(f"{url}/v1/models", timeout=10).json()["models"]) == sorted(specs)
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).json() == {"ready": True}


def test_a_model_that_fails_to_load_leaves_the_others_serving(server, models):
    _, _, expected = models
    url, proc, err = server
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v2/health/ready").status_code == 200
        for name in ("pack-a", "pack-b"):
            r = client.post(f"/v1/models/{name}:predict", json={"instances": ROWS[name]})
            assert r.status_code == 200 and r.json()["predictions"] == expected[name], r.text
        for method, path in (("GET", "/v2/models/pack-missing/ready"), ("GET", "/v1/models/pack-missing"),
                             ("POST", "/v1/models/pack-missing:predict"), ("POST", "/v2/models/pack-missing/infer")):
            r = client.request(method, path, json={"instances": ROWS["pack-a"]} if method == "POST" else None)
            assert r.status_code == 503, (path, r.text)
            doc = r.json()
            assert doc["ready"] is False and "'pack-missing'" in doc["error"] and "failed to load" in doc["error"]
            assert "models:/pack-missing/1" in doc["error"]
    assert proc.poll() is None
    err.seek(0)
    lines = [line for line in err.read().splitlines() if "pack-missing" in line]
    assert len(lines) == 1 and "not loaded" in lines[0], lines


def test_no_model_loaded_is_an_error_naming_each(tmp_path, capsys):
    code = main(["--http-port", str(free_port()), "--max-payload-bytes", "1024",
                 "--model", f"x=1={tmp_path / 'none'}", "--model", f"y=1={tmp_path / 'nothing'}"])
    err = capsys.readouterr().err
    assert code == 2 and "x:" in err and "y:" in err and "nothing" in err


@pytest.mark.parametrize("given, problem", [
    ("a=1", "expected NAME=VERSION=URI"),
    ("a/b=1=models:/a/1", "the name 'a/b'"),
    ("=1=models:/a/1", "the name ''"),
    ("a=1=", "the URI is empty"),
])
def test_a_bad_model_argument_is_refused_naming_it(given, problem, capsys):
    with pytest.raises(ValueError, match=problem):
        parse_model_spec(given)
    assert main(["--http-port", "1", "--max-payload-bytes", "1", "--model", given]) == 2
    assert problem in capsys.readouterr().err


def test_a_model_argument_keeps_the_uri_whole():
    assert parse_model_spec("a==models:/a@champion") == ModelSpec("a", "", "models:/a@champion")
    assert parse_model_spec("a.b-c=3=/p/x=y") == ModelSpec("a.b-c", "3", "/p/x=y")


def test_a_name_given_twice_is_refused(capsys):
    assert main(["--http-port", "1", "--max-payload-bytes", "1", "--model", "a=1=/x", "--model", "a=2=/y"]) == 2
    assert "['a'] given more than once" in capsys.readouterr().err


SIZES = [("m1", 40), ("m2", 70), ("m3", 10), ("m4", 30), ("m5", 25), ("m6", 5)]


@pytest.mark.parametrize("models, max_models, max_bytes, groups", [
    ([], 3, 100, []),
    (SIZES, 50, 1000, [["m2", "m1", "m4", "m5", "m3", "m6"]]),  # all fit one, largest first
    (SIZES, 2, 1000, [["m2", "m1"], ["m4", "m5"], ["m3", "m6"]]),  # the count bounds
    (SIZES, 50, 100, [["m2", "m4"], ["m1", "m5", "m3", "m6"]]),  # the bytes bound: first fit
    (SIZES, 50, 60, [["m2"], ["m1", "m3", "m6"], ["m4", "m5"]]),  # m2 is over the limit: alone
    ([("big", 500), ("b", 1), ("a", 1)], 5, 10, [["big"], ["a", "b"]]),  # ties by name
    ([("z", 0), ("y", 0), ("x", 0)], 2, 1, [["x", "y"], ["z"]]),
])
def test_pack_first_fit_decreasing(models, max_models, max_bytes, groups):
    assert pack(models, max_models=max_models, max_bytes=max_bytes) == groups


def test_pack_respects_its_limits_and_is_deterministic():
    rng = np.random.default_rng(3)
    models = [(f"model-{i:02d}", int(s)) for i, s in enumerate(rng.integers(1, 400, size=60))]
    sizes = dict(models)
    groups = pack(models, max_models=7, max_bytes=1000)
    assert sorted(n for g in groups for n in g) == sorted(sizes)
    for group in groups:
        assert len(group) <= 7 and sum(sizes[n] for n in group) <= 1000
    assert pack(list(reversed(models)), max_models=7, max_bytes=1000) == groups
    oversize = pack([*models, ("huge", 5000)], max_models=7, max_bytes=1000)
    assert ["huge"] in oversize


@pytest.mark.parametrize("models, kwargs, problem", [
    ([("a", 1)], {"max_models": 0, "max_bytes": 1}, "max_models"),
    ([("a", 1)], {"max_models": 1, "max_bytes": 0}, "max_bytes"),
    ([("a", 1), ("a", 2)], {"max_models": 1, "max_bytes": 9}, "listed twice"),
    ([("a", -1)], {"max_models": 1, "max_bytes": 9}, "negative size"),
])
def test_pack_refuses_bad_input(models, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        pack(models, **kwargs)
