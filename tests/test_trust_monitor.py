"""The monitor's trust boundary: auth, what /events and /feedback accept, reused ids, a full disk,
file modes, stopping a run with the monitor, and the published OpenAPI document.

Each HTTP case runs against the real monitor app (sink + service routes) on the trained champion,
with events made by the CloudEvents SDK (``cloudevents.http.CloudEvent``, ``to_binary``,
``to_structured``), and checks the answer, that /healthz and /readyz stay right, and that every
event acknowledged before is still stored.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from urllib.parse import quote

import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent
from starlette.testclient import TestClient

from driftloop.core.processes import process_alive, spawn
from monitoring.alerts import AlertStore
from monitoring.events import RowSchema
from monitoring.labels import labelled_window
from monitoring.metrics import MonitorMetrics
from monitoring.service import MonitorService
from monitoring.sink import IngestAuth, create_sink_app
from monitoring.store import InferenceStore
from monitoring.trigger import Trigger
from tests.ce_events import COLUMNS, attributes, binary, instance, pair, structured
from tests.conftest import make_settings
from tests.test_trigger import RecordingRunner

STRUCTURED = {"content-type": "application/cloudevents+json"}
BATCH = {"content-type": "application/cloudevents-batch+json"}


def _settings(tmp_path_factory, trained, name: str, **extra):
    base, _ = trained
    return make_settings(tmp_path_factory.mktemp(name) / "ws", base.data.source,
                         **{"mlflow.tracking_uri": base.tracking_uri, "serving.name": "churn", **extra})


@pytest.fixture(scope="module")
def monitor(tmp_path_factory, trained):
    """The monitor's app on the trained champion; three requests acknowledged, good-0 row 0 labelled 1."""
    service = MonitorService(_settings(tmp_path_factory, trained, "trust"), runner=RecordingRunner())
    auth = {"authorization": f"Bearer {service.ingest_token}"}
    with TestClient(service.app) as client:
        acked = set()
        for i in range(3):
            for headers, body in pair(f"good-{i}", n=2, start=i):
                assert client.post("/events", content=body, headers={**headers, **auth}).status_code == 200
            acked.add(f"good-{i}")
        assert client.post("/feedback", json={"id": "good-0", "label": 1}, headers=auth).status_code == 200
        yield service, client, auth, acked
    service.store.close()
    service.alerts.close()


def _still_whole(service: MonitorService, client: TestClient, acked: set[str]) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200, client.get("/readyz").text
    assert acked <= service.store.event_ids()
    assert service.store.count() >= 2 * len(acked)


# -- requests of the table: (method, path, headers, body, with the ingest token) ----------------------

def _event(data=None, kind="request", token=True, ce_id=None, **changes):
    headers, body = binary(ce_id or uuid.uuid4().hex, kind, data or {"instances": [instance(1)]})
    headers.update(changes)
    return "POST", "/events", headers, body, token


def _structured_event(token=True):
    return "POST", "/events", STRUCTURED, json.dumps(structured(uuid.uuid4().hex, "request",
                                                                {"instances": [instance(2)]})).encode(), token


def _feedback(payload, token=True, ctype="application/json"):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return "POST", "/feedback", {"content-type": ctype}, body, token


def _row(**values):
    return {"instances": [{**instance(3), **values}]}


def _response(pred):
    return _event({"predictions": [pred]}, kind="response", modelversion="1")


CASES = [
    # 1. auth: /events, /feedback and every state-changing route need the ingest token
    ("events-binary-no-token", _event(token=False), 401, "Authorization: Bearer"),
    ("events-structured-no-token", _structured_event(token=False), 401, "Authorization: Bearer"),
    ("events-wrong-token", _event(token=False, authorization="Bearer not-the-token"), 401, "wrong bearer token"),
    ("feedback-no-token", _feedback({"id": "good-1", "label": 0}, token=False), 401, "POST /feedback"),
    ("check-no-token", ("POST", "/check", {}, b"", False), 401, "POST /check"),
    ("quality-check-no-token", ("POST", "/quality/check", {}, b"", False), 401, "POST /quality/check"),
    # 2. /feedback: JSON only, one label per row, rows that exist, labels of the model's kind
    ("feedback-text-plain", _feedback({"id": "good-1", "label": 0}, ctype="text/plain"), 415, "application/json"),
    ("feedback-form", _feedback(b"id=good-1&label=0", ctype="application/x-www-form-urlencoded"), 415,
     "application/json"),
    ("feedback-relabel", _feedback({"id": "good-0", "label": 0}), 409, "'good-0' row 0"),
    ("feedback-row-beyond", _feedback({"id": "good-1", "row_index": 7, "label": 0}), 422, "row_index 7"),
    ("feedback-label-banana", _feedback({"id": "good-1", "label": "banana"}), 422, "'banana'"),
    ("feedback-label-object", _feedback({"id": "good-1", "label": {"a": [1]}}), 422, "{'a': [1]}"),
    ("feedback-label-fraction", _feedback({"id": "good-1", "label": 2.5}), 422, "classes [0, 1]"),
    ("feedback-label-text-one", _feedback({"id": "good-1", "label": "1"}), 422, "'1'"),
    ("feedback-id-not-text", _feedback({"id": 12, "label": 1}), 422, "'id'"),
    # 3. values the model server would refuse never enter a window
    ("categorical-as-number", _event(_row(region=5)), 422, "'region'"),
    ("categorical-as-object", _event(_row(plan={"tier": "pro"})), 422, "'plan'"),
    ("categorical-as-list", _event(_row(region=["eu"])), 422, "'region'"),
    ("categorical-as-bool", _event(_row(plan=True)), 422, "'plan'"),
    ("numeric-as-text", _event(_row(tenure="12")), 422, "'tenure'"),
    ("numeric-overflow", ("POST", "/events", binary(uuid.uuid4().hex, "request", {})[0],
                          b'{"instances": [{"tenure": 1e400}]}', True), 400, "infinity"),
    ("prediction-object", _response({"class": 1}), 422, "prediction 0"),
    ("prediction-two-values", _response([0, 1]), 422, "prediction 0"),
    ("ce-time-not-rfc3339", _event(**{"ce-time": "yesterday"}), 400, "RFC 3339"),
    ("ce-id-100kb", _event(ce_id="x" * 100_000), 400, "at most 256"),
    ("data-base64-not-base64", ("POST", "/events", STRUCTURED, json.dumps({
        **attributes("b64-bad", "request"), "specversion": "1.0", "data_base64": "***"}).encode(), True),
     400, "data_base64"),
    # 4. a reused ce-id with other rows is refused, not dropped as a duplicate
    ("reused-id-other-rows", _event({"instances": [instance(40), instance(41)]}, ce_id="good-1"), 409,
     "'good-1' was already used"),
]


@pytest.mark.parametrize("request_,status,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_at_the_door_by_name(monitor, request_, status, needle):
    service, client, auth, acked = monitor
    method, path, headers, body, token = request_
    rejected_before = _rejected(client)
    r = client.request(method, path, content=body, headers={**headers, **(auth if token else {})})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"], r.json()
    assert _rejected(client) == rejected_before + 1  # counted in /metrics
    _still_whole(service, client, acked)
    labels = service.store.labelled()
    assert list(labels["label"]) == [1]  # good-0's first label stays; nothing else labelled


def _rejected(client: TestClient) -> float:
    return sum(float(line.split()[-1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("driftloop_monitor_events_rejected_total{"))


ACCEPTED = [
    ("retry-same-event", lambda: pair("good-2", n=2, start=2)[0], {"stored": 0, "duplicates": 1}),
    ("percent-encoded-id", lambda: _encoded_id("pct/ü 1"), {"stored": 1, "duplicates": 0}),
    ("structured-data-base64", lambda: _base64_event("b64-ok"), {"stored": 1, "duplicates": 0}),
]


def _encoded_id(ce_id: str):
    headers, body = binary("placeholder", "request", {"instances": [instance(5)]})
    headers["ce-id"] = quote(ce_id, safe="")  # the CloudEvents HTTP binding percent-encodes header values
    return headers, body


def _base64_event(ce_id: str):
    event = {**attributes(ce_id, "request"), "specversion": "1.0", "datacontenttype": "application/json",
             "data_base64": base64.b64encode(json.dumps({"instances": [instance(6)]}).encode()).decode()}
    return STRUCTURED, json.dumps(event).encode()


@pytest.mark.parametrize("make,answer", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_spec_valid_events_are_accepted(monitor, make, answer):
    service, client, auth, acked = monitor
    headers, body = make()
    r = client.post("/events", content=body, headers={**headers, **auth})
    assert r.status_code == 200 and r.json() == answer, r.text
    _still_whole(service, client, acked)


def test_percent_encoded_id_is_stored_decoded_and_its_label_joins(monitor):
    service, client, auth, acked = monitor
    ce_id = "joined/ä %1"
    req = _encoded_id(ce_id)
    res = binary("placeholder", "response", {"predictions": [1]}, version="1")
    res[0]["ce-id"] = quote(ce_id, safe="")
    for headers, body in (req, res):
        assert client.post("/events", content=body, headers={**headers, **auth}).status_code == 200
    assert ce_id in service.store.event_ids()
    r = client.post("/feedback", json={"id": ce_id, "label": 1}, headers=auth)
    assert r.status_code == 200 and r.json() == {"stored": 1, "duplicates": 0, "unknown_ids": []}
    assert ce_id in set(service.store.labelled()["request_id"])
    again = client.post("/feedback", json={"id": ce_id, "label": 1}, headers=auth)  # the same label: a duplicate
    assert again.status_code == 200 and again.json()["duplicates"] == 1
    _still_whole(service, client, acked)


def test_get_quality_check_changes_nothing_and_post_runs_it(monitor):
    service, client, auth, acked = monitor
    alerts_before = client.get("/alerts").json()
    got = client.get("/quality/check")
    assert got.status_code == 200 and got.json()["checked_at"] is None  # nothing ran
    assert service.quality.last_outcome is None and client.get("/alerts").json() == alerts_before
    posted = client.post("/quality/check", headers=auth)
    assert posted.status_code == 200 and posted.json()["checked_at"] is not None
    assert client.get("/quality/check").json() == posted.json()
    _still_whole(service, client, acked)


def test_network_mode_takes_events_without_a_header_but_never_a_wrong_token(tmp_path_factory, trained, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_EVENTS_AUTH", "network")  # what infra/ sets on the monitor Deployment
    monkeypatch.setenv("DRIFTLOOP_INGEST_TOKEN", "cluster-token")
    from driftloop.core.config import load_settings

    base = _settings(tmp_path_factory, trained, "network")
    settings = load_settings(overrides={"workspace": str(base.workspace_dir), "data.source": base.data.source,
                                        "mlflow.tracking_uri": base.tracking_uri, "mlflow.model_name": "churn",
                                        "mlflow.experiment": "test", "serving.name": "churn"},
                             environ={"DRIFTLOOP_EVENTS_AUTH": "network"})
    assert settings.monitor.events_auth == "network"
    service = MonitorService(settings, runner=RecordingRunner())
    assert service.ingest_token == "cluster-token"
    try:
        with TestClient(service.app) as client:
            for headers, body in pair("kserve-1"):  # KServe's logger: no Authorization header
                assert client.post("/events", content=body, headers=headers).status_code == 200
            headers, body = pair("kserve-2")[0]
            wrong = client.post("/events", content=body, headers={**headers, "authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "wrong bearer token" in wrong.json()["error"]
            fb = client.post("/feedback", json={"id": "kserve-1", "label": 1})
            assert fb.status_code == 401  # /feedback always needs the token
            ok = client.post("/feedback", json={"id": "kserve-1", "label": 1},
                             headers={"authorization": "Bearer cluster-token"})
            assert ok.status_code == 200
            assert "kserve-2" not in service.store.event_ids() and service.store.count() == 1
            assert client.get("/readyz").status_code == 200
    finally:
        service.store.close()
        service.alerts.close()


def test_events_without_a_token_never_reach_a_drift_window(monitor):
    """CloudEvents posted straight to /events without the token fed a drift alert that started a run."""
    service, client, auth, acked = monitor
    rows_before = service.store.count()
    batch = [structured(f"forged-{i}", kind, data) for i in range(20)
             for kind, data in (("request", {"instances": [{**instance(i), "tenure": 999.0}] * 10}),
                                ("response", {"predictions": [1] * 10}))]
    r = client.post("/events", content=json.dumps(batch), headers=BATCH)
    assert r.status_code == 401
    assert service.store.count() == rows_before
    window = service.store.window("sliding", rows=10_000)
    assert not any(str(rid).startswith("forged-") for rid in window.rows["request_id"])
    _still_whole(service, client, acked)


# -- a full disk: a real SQLITE_FULL, readiness follows, and the store comes back on its own --------

def test_full_database_answers_503_readyz_names_it_and_recovers(tmp_path):
    store = InferenceStore(tmp_path / "log.db")
    app = create_sink_app(store, metrics=MonitorMetrics(), model_names={"churn"}, reference_columns=COLUMNS,
                          auth=IngestAuth("t"), close_store=True)
    auth = {"authorization": "Bearer t"}
    with TestClient(app) as client:
        for headers, body in pair("before-full", n=2):
            assert client.post("/events", content=body, headers={**headers, **auth}).status_code == 200
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # the database may not grow: SQLITE_FULL
        big = [instance(i) for i in range(2000)]
        refused = [client.post("/events", content=body, headers={**headers, **auth}).status_code
                   for headers, body in (binary(f"full-{i}", "request", {"instances": big}) for i in range(3))]
        assert refused == [503, 503, 503]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "store not writable: database or disk is full" in ready.json()["error"]
        assert client.get("/healthz").status_code == 200
        store._db.execute(f"PRAGMA max_page_count = {pages * 1000}")  # space is back
        assert client.get("/readyz").status_code == 200
        headers, body = binary("after-full", "request", {"instances": big})
        assert client.post("/events", content=body, headers={**headers, **auth}).status_code == 200
        assert {"before-full", "after-full"} <= store.event_ids()
    assert sqlite3.connect(tmp_path / "log.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sigterm_with_a_full_disk_exits_cleanly(tmp_path):
    """A sink whose files cannot grow (RLIMIT_FSIZE) refuses with 503 and stops on SIGTERM without a traceback."""
    script = tmp_path / "run.py"
    script.write_text(
        "import resource, signal, sys\n"
        "from monitoring.store import InferenceStore\n"
        "from tests.ce_events import binary, instance\n"
        "from monitoring.events import parse_binary\n"
        "store = InferenceStore(sys.argv[1])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "codes = []\n"
        "for i in range(20):\n"
        "    h, b = binary(f'e{i}', 'request', {'instances': [instance(j) for j in range(300)]})\n"
        "    try:\n"
        "        store.append_events([parse_binary(h, b)])\n"
        "        codes.append(200)\n"
        "    except Exception as exc:\n"
        "        codes.append(getattr(exc, 'status', 0))\n"
        "print(codes, store.health(), flush=True)\n"
        "signal.signal(signal.SIGTERM, lambda *_: (store.close(), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "signal.pause()\n")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "log.db")], cwd=os.getcwd(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    first = proc.stdout.readline()
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    assert "503" in first and "store not writable" in first and "200" in first, first
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


# -- labels stored by an older version, unversioned events ----------------------------------------

def test_bad_labels_stored_before_are_skipped_and_counted(tmp_path):
    with InferenceStore(tmp_path / "log.db") as store:
        for i in range(4):
            store.append_events([ev for h, b in pair(f"r{i}") for ev in [_parsed(h, b)]])
        db = sqlite3.connect(tmp_path / "log.db")
        with db:  # written as an older version let them through
            db.executemany("INSERT INTO labels VALUES (?, 0, ?, 0)",
                           [("r0", b"1"), ("r1", b'"banana"'), ("r2", b'{"a":[1]}'), ("r3", b"2.5")])
        db.close()
        frame = labelled_window(tmp_path / "log.db", scores=False)
    assert list(frame["request_id"]) == ["r0"] and frame.attrs["skipped_labels"] == 3


def test_unversioned_predictions_are_not_quality_checked(tmp_path, caplog):
    from monitoring.labels import versions_seen

    with InferenceStore(tmp_path / "log.db") as store:
        h, b = binary("nov", "response", {"predictions": [1]})  # no ce-modelversion, no model_version
        store.append_events([_parsed(*pair("nov")[0]), _parsed(h, b)])
        store.append_events([_parsed(*ev) for ev in pair("v1", version="1")])
    caplog.set_level("WARNING")
    assert versions_seen(tmp_path / "log.db") == ["1"]
    assert versions_seen(tmp_path / "log.db") == ["1"]
    assert sum("name no model version" in r.message for r in caplog.records) == 1  # said once


def _parsed(headers, body):
    from monitoring.events import parse_binary

    return parse_binary(headers, body)


@pytest.mark.parametrize("kind,value,needle", [
    ("int", 2.0 ** 70, "int64"), ("int", 2 ** 63, "int64"), ("float", float("nan"), "finite"),
    ("float", True, "numeric"), ("str", 3, "categorical"), ("bool", "yes", "boolean"), ("any", [1], "single"),
], ids=["int-2**70", "int-2**63", "float-nan", "float-bool", "str-number", "bool-text", "any-list"])
def test_row_schema_names_what_the_model_server_would_refuse(kind, value, needle):
    assert needle in RowSchema({"c": kind}).problem("c", value)
    assert RowSchema({"c": kind}).problem("c", None) is None


# -- files, the trigger's runs, OpenAPI ------------------------------------------------------------

def test_store_files_are_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        with InferenceStore(tmp_path / "monitor" / "log.db") as store:
            store.append_events([_parsed(*ev) for ev in pair("m")])
            alerts = AlertStore(tmp_path / "monitor" / "alerts.db")
            alerts.close()
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "monitor").iterdir()
                     if p.name.startswith("log.db")}
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "monitor").stat().st_mode) == 0o700
    assert modes and set(modes.values()) == {0o600}, modes


def test_stopping_the_trigger_stops_its_run_and_what_the_run_started(tmp_path):
    alerts = AlertStore(tmp_path / "alerts.db")
    settings = make_settings(tmp_path / "ws", tmp_path / "none.parquet")
    trigger = Trigger(settings, alerts)
    pidfile = tmp_path / "child.pid"
    worker = spawn([sys.executable, "-c", "import subprocess, sys, time\n"
                    f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                    f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(120)"], kill_group=True)
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    trigger._workers["a1"] = worker
    trigger.stop(timeout=5)
    deadline = time.monotonic() + 10
    while (process_alive(child) or worker.poll() is None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.poll() is not None and not process_alive(child)
    alerts.close()


def test_openapi_describes_every_route(monitor):
    service, client, auth, acked = monitor
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.") and doc["components"]["securitySchemes"]["ingestToken"]["scheme"] == "bearer"
    served = {(r.path, m) for r in service.app.routes for m in (getattr(r, "methods", None) or ()) if m != "HEAD"}
    described = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert served == described
    events = doc["paths"]["/events"]["post"]
    assert set(events["requestBody"]["content"]) == {"application/json", "application/cloudevents+json",
                                                     "application/cloudevents-batch+json"}
    assert events["security"] == [{"ingestToken": []}]
    import schemathesis

    schema = schemathesis.openapi.from_dict(doc) if hasattr(schemathesis, "openapi") else schemathesis.from_dict(doc)
    assert schema is not None
    _still_whole(service, client, acked)
