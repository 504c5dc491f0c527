"""The KServe predictor against a real ModelServer process and a real local MLflow registry."""

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest

from tests.conftest import free_port

NUMERIC = ["tenure", "monthly_spend", "sessions", "support_calls", "latency_ms"]
CATEGORICAL = ["region", "plan"]
COLUMNS = NUMERIC + CATEGORICAL
MAX_PAYLOAD = 64 * 1024


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"model server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("model server did not become ready")


@contextlib.contextmanager
def _predictor(settings, *extra: str):
    port = free_port()
    cmd = [sys.executable, "-m", "serving.predictor", "--model-name", "churn", "--model-uri", "models:/churn@champion",
           "--tracking-uri", settings.tracking_uri, "--http-port", str(port), "--max-payload-bytes", str(MAX_PAYLOAD),
           *extra]
    # stderr to a file, not a pipe: kserve logs a traceback per refused request and a full pipe blocks the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile("w+"), text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(trained):
    """One predictor process serving churn@champion on 127.0.0.1 (the embedded default)."""
    settings, _ = trained
    with _predictor(settings) as running:
        yield running


def _listening(proc) -> set:
    """(ip, port) pairs a process and its children listen on."""
    out = set()
    root = psutil.Process(proc.pid)
    for process in [root, *root.children(recursive=True)]:
        connections = getattr(process, "net_connections", None) or process.connections  # psutil >= 6 / < 6
        out |= {(c.laddr.ip, c.laddr.port) for c in connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    return out


@pytest.fixture(scope="module")
def rows(scenario_path):
    """40 raw rows as a client sends them: numbers, strings, and null gaps in both kinds of column."""
    df = pd.read_parquet(scenario_path).head(40)[COLUMNS].astype(object)
    df = df.where(df.notna(), None)
    df.loc[3, "monthly_spend"] = None
    df.loc[5, "region"] = None
    df.loc[7, "plan"] = None
    df.loc[9, "tenure"] = None
    return df.to_dict("records")


@pytest.fixture(scope="module")
def expected(trained, rows):
    """The registered model's own predictions on the same rows."""
    import mlflow.sklearn

    from components.train import prepare_features

    settings, _ = trained
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.sklearn.load_model("models:/churn/1")
    return model.predict(prepare_features(pd.DataFrame(rows), NUMERIC, CATEGORICAL)).tolist()


def _v2_columns(rows, request_id="req-1"):
    return {"id": request_id, "inputs": [
        {"name": c, "shape": [len(rows)], "datatype": "FP64" if c in NUMERIC else "BYTES", "data": [r[c] for r in rows]}
        for c in COLUMNS]}


def test_v1_rows_as_mappings_and_lists_match_the_model(server, rows, expected):
    client, _, _ = server
    r = client.post("/v1/models/churn:predict", json={"instances": rows})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": expected, "model_version": "1"}
    as_lists = [[row[c] for c in COLUMNS] for row in rows]
    r = client.post("/v1/models/churn:predict", json={"instances": as_lists})
    assert r.json()["predictions"] == expected


def test_v1_single_row_matches_the_model(server, rows, expected):
    client, _, _ = server
    for i in (3, 5, 7):  # rows with a gap
        r = client.post("/v1/models/churn:predict", json={"instances": [rows[i]]})
        assert r.json()["predictions"] == [expected[i]]


def test_v2_tensor_per_column_matches_the_model(server, rows, expected):
    client, _, _ = server
    r = client.post("/v2/models/churn/infer", json=_v2_columns(rows, "abc-123"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "abc-123"
    assert body["model_version"] == "1"
    assert body["model_name"] == "churn"
    (out,) = body["outputs"]
    assert out["name"] == "predictions" and out["shape"] == [len(rows)]
    assert out["data"] == expected


def test_v2_one_2d_bytes_tensor_matches_the_model(server, rows, expected):
    client, _, _ = server
    flat = [row[c] for row in rows for c in COLUMNS]
    req = {"id": "two-d", "inputs": [{"name": "input-0", "shape": [len(rows), len(COLUMNS)], "datatype": "BYTES",
                                      "data": flat}]}
    r = client.post("/v2/models/churn/infer", json=req)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == expected


def _bad_cases(row):
    v2 = _v2_columns([row])
    short_shape = {"inputs": [dict(v2["inputs"][0], shape=[2])] + v2["inputs"][1:]}
    wrong_2d = {"inputs": [{"name": "x", "shape": [1, 6], "datatype": "BYTES", "data": [row[c] for c in COLUMNS[:6]]}]}
    bytes_for_number = {"inputs": [dict(v2["inputs"][0], datatype="BYTES", data=["12"])] + v2["inputs"][1:]}
    return [
        ("v1", b'{"instances": [', "Unrecognized request format"),
        ("v2", b'{"inputs": [', "malformed request"),
        ("v1", {"instances": [dict(row, colour="red")]}, "unknown column(s) ['colour']"),
        ("v1", {"instances": [{k: v for k, v in row.items() if k != "plan"}]}, "missing column(s) ['plan']"),
        ("v1", {"instances": [dict(row, tenure="twelve")]}, "column 'tenure' expects a number"),
        ("v1", {"instances": [dict(row, region=3)]}, "column 'region' expects a string"),
        ("v1", {"instances": [[row[c] for c in COLUMNS[:-1]]]}, "has 6 values; expected 7"),
        ("v1", {"instances": []}, '"instances" is empty'),
        ("v1", {"rows": [row]}, 'needs "instances"'),
        ("v2", {"inputs": []}, '"inputs" is empty'),
        ("v2", short_shape, "shape [2]"),
        ("v2", wrong_2d, "must be [n, 7]"),
        ("v2", bytes_for_number, "column 'tenure' expects numbers"),
        ("v2", {"inputs": v2["inputs"][:-1]}, "missing column(s) ['plan']"),
    ]


def test_bad_input_is_400_naming_the_problem_and_the_server_keeps_serving(server, rows, expected):
    client, proc, _ = server
    for protocol, body, message in _bad_cases(rows[0]):
        path = "/v1/models/churn:predict" if protocol == "v1" else "/v2/models/churn/infer"
        if isinstance(body, bytes):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(path, json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert message in r.json()["error"], (body, r.text)
    assert proc.poll() is None
    r = client.post("/v1/models/churn:predict", json={"instances": rows[:2]})
    assert r.status_code == 200 and r.json()["predictions"] == expected[:2]


def test_oversize_payload_is_refused_before_parsing(server, rows, expected):
    client, _, _ = server
    big = {"instances": rows * (MAX_PAYLOAD // 200)}
    r = client.post("/v1/models/churn:predict", json=big)
    assert r.status_code == 413
    assert f"limit of {MAX_PAYLOAD} bytes" in r.json()["error"]

    def chunks():  # no content-length: the limit holds on the streamed body too
        body = ("[" + "0," * MAX_PAYLOAD + "0]").encode()
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    r = client.post("/v1/models/churn:predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/models/churn:predict", json={"instances": rows[:1]})
    assert r.json()["predictions"] == expected[:1]


def test_readiness_and_metrics(server):
    client, _, _ = server
    assert client.get("/v1/models/churn").json() == {"name": "churn", "ready": True}
    assert client.get("/v2/models/churn/ready").status_code == 200
    client.post("/v1/models/churn:predict", json={"instances": []})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'request_predict_seconds_count{model_name="churn"}' in metrics.text


def test_embedded_default_listens_on_loopback_only(server):
    _, proc, port = server
    assert _listening(proc) == {("127.0.0.1", port)}  # loopback, REST only: no gRPC port


def test_worker_processes_keep_loopback_limit_and_messages(trained, rows, expected):
    """kserve spawns its workers afresh: the additions must be made in each of them."""
    settings, _ = trained
    with _predictor(settings, "--workers", "2") as (client, proc, port):
        assert _listening(proc) == {("127.0.0.1", port)}
        for _ in range(2):  # every request is served by a spawned worker; the parent only supervises
            r = client.post("/v1/models/churn:predict", json={"instances": rows * (MAX_PAYLOAD // 200)})
            assert r.status_code == 413 and "serving.max_payload_bytes" in r.json()["error"]
            r = client.post("/v2/models/churn/infer", content=b'{"inputs": [', headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"].startswith("malformed request")
            r = client.post("/v1/models/churn:predict", json={"instances": rows[:3]})
            assert r.json() == {"predictions": expected[:3], "model_version": "1"}


def test_missing_alias_or_model_fails_at_load_naming_the_uri(trained):
    from driftloop.core.errors import ServingError
    from serving.predictor import DriftloopModel

    settings, _ = trained
    for uri in ("models:/churn@nosuchalias", "models:/no-such-model/1", "models:/churn/99"):
        model = DriftloopModel("churn", uri, tracking_uri=settings.tracking_uri)
        with pytest.raises(ServingError, match=uri.replace("/", ".").replace("@", ".")):
            model.load()
        assert not model.ready


def test_cli_reports_a_missing_model_and_exits_before_serving(trained, capsys):
    from serving.predictor import main

    settings, _ = trained
    port = free_port()
    code = main(["--model-name", "churn", "--model-uri", "models:/churn@gone", "--tracking-uri", settings.tracking_uri,
                 "--http-port", str(port)])
    assert code == 2
    assert "models:/churn@gone" in capsys.readouterr().err


def test_pinned_version_and_run_uri_load_with_their_version(trained):
    from serving.predictor import DriftloopModel

    from driftloop.core.registry import Registry

    settings, _ = trained
    model = DriftloopModel("churn", "models:/churn/1", tracking_uri=settings.tracking_uri)
    assert model.load() and model.model_version == "1"
    assert model.schema.columns == tuple(COLUMNS)
    assert model.schema.numeric == frozenset(NUMERIC)
    run_id = Registry.from_settings(settings).get_version("churn", "1").run_id
    by_run = DriftloopModel("churn", f"runs:/{run_id}/model", tracking_uri=settings.tracking_uri)
    assert by_run.load() and by_run.model_version  # not a registry URI: the logged model's id


def test_a_version_started_by_the_local_backend_loads_from_its_files_without_the_registry(trained, rows, expected,
                                                                                          capsys):
    """The launcher (here with MLflow loaded, as ``driftloop serve`` and the deploy step have it) hands a pinned
    version's file location to its model server, which loads it without opening the tracking store and answers
    as the registry-loaded version does; an alias or another version is left to the server to resolve."""
    import subprocess

    from serving.local_backend import LocalBackend
    from serving.predictor import DriftloopModel, main

    settings, _ = trained
    argv = LocalBackend(settings).model_server_argv("1", "models:/churn/1", 0)
    location = argv[argv.index("--model-location") + 1]
    assert location.startswith("file://") and argv[argv.index("--model-version") + 1] == "1"
    for unpinned in ("models:/churn@champion", "models:/churn/2", "runs:/abc/model"):
        assert "--model-location" not in LocalBackend(settings).model_server_argv("1", unpinned, 0)
    probe = ("import sys, driftloop\nfrom serving.predictor import DriftloopModel\n"
             "m = DriftloopModel('churn', 'models:/churn/1', 'sqlite:////nonexistent/no.db', location=sys.argv[1],"
             " version='1')\nm.load()\nimport json\nprint(json.dumps([m.model_version, 'sqlalchemy' in sys.modules,"
             " m.predict({'instances': json.loads(sys.argv[2])})['predictions']]))")
    out = subprocess.run([sys.executable, "-c", probe, location, json.dumps(rows)], capture_output=True, text=True,
                         timeout=180, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    version, store_opened, predictions = json.loads(out.stdout.strip().splitlines()[-1])
    assert version == "1" and not store_opened  # a tracking URI that does not exist was never opened
    registry_loaded = DriftloopModel("churn", "models:/churn/1", tracking_uri=settings.tracking_uri)
    registry_loaded.load()
    assert predictions == registry_loaded.predict({"instances": rows})["predictions"] == expected
    assert main(["--model-name", "churn", "--model-uri", "models:/churn/1", "--model-location", location]) == 2
    assert "--model-location and --model-version go together" in capsys.readouterr().err


def test_frame_from_instances_keeps_dtypes_the_model_was_trained_on():
    from serving.predictor import InputSchema, frame_from_instances

    schema = InputSchema(("b", "a", "c"), frozenset({"a"}))  # strings before numbers: signature order kept
    for rows in ([{"a": 1, "b": "x", "c": "y"}, {"a": None, "b": None, "c": "z"}], [["x", 1, "y"], [None, None, "z"]]):
        frame = frame_from_instances(rows, schema)
        assert list(frame.columns) == ["b", "a", "c"]
        assert frame["a"].dtype == np.float64 and frame["a"][0] == 1.0 and np.isnan(frame["a"][1])
        assert frame["b"].dtype == object and frame["b"].tolist() == ["x", None]
    no_gaps = frame_from_instances([{"a": 2, "b": "x", "c": "y"}], schema)  # the all-numbers fast path
    assert no_gaps["a"].dtype == np.float64 and no_gaps["a"][0] == 2.0
