"""Labels posted to the gateway reach the monitor's label store — and survive a restart of either.

A real monitor sink process (restarted, and once down while labels arrive), the gateway in-process
in front of a tiny model server that answers like the predictor (class scores only when asked)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.gateway import GatewayConfig, Upstream, create_gateway_app
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
INGEST_TOKEN = "quality-feedback-ingest-token"
INGEST_AUTH = {"authorization": f"Bearer {INGEST_TOKEN}"}


def _model_app() -> Starlette:
    async def predict(request: Request) -> JSONResponse:
        rows = (await request.json())["instances"]
        body = {"predictions": [int(r[0] > 0) for r in rows], "model_version": "1"}
        if request.headers.get("x-driftloop-scores") == "true":
            body["scores"] = [[0.2, 0.8] if r[0] > 0 else [0.9, 0.1] for r in rows]
            body["classes"] = [0, 1]
        return JSONResponse(body)

    return Starlette(routes=[Route("/v1/models/m:predict", predict, methods=["POST"])])


class _Thread(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # not the main thread
        pass


@pytest.fixture
def model_server():
    port = free_port("127.0.0.1")
    server = _Thread(uvicorn.Config(_model_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _start_monitor(store: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "monitoring.sink", "--store", str(store), "--port", str(port),
                             "--model", "m"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "DRIFTLOOP_INGEST_TOKEN": INGEST_TOKEN})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("monitor sink did not start")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _quality(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/quality", timeout=5).json()["versions"]


def _wait(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_labels_posted_to_the_gateway_are_stored_by_the_monitor_and_survive_restarts(tmp_path, model_server):
    port = free_port("127.0.0.1")
    store, outbox = tmp_path / "inference.db", tmp_path / "gateway" / "feedback-outbox.db"
    cfg = dict(name="m", primary=Upstream(model_server, "1"), sink_url=f"http://127.0.0.1:{port}/events",
               feedback_url=f"http://127.0.0.1:{port}/feedback", feedback_outbox=str(outbox), ingest_token=INGEST_TOKEN)
    monitor = _start_monitor(store, port)
    try:
        with TestClient(create_gateway_app(GatewayConfig(**cfg)), headers=INGEST_AUTH) as gw:
            ids = []
            for x in (1.0, -1.0, 2.0):
                r = gw.post("/v1/models/m:predict", json={"instances": [[x]]})
                assert r.status_code == 200 and "scores" not in r.json()  # the client did not ask for them
                ids.append(r.headers["x-request-id"])
            asked = gw.post("/v1/models/m:predict", json={"instances": [[3.0]]}, headers={"x-driftloop-scores": "1"})
            assert asked.json()["scores"] == [[0.2, 0.8]]
            _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/metrics").text.count(
                "driftloop_monitor_rows_stored_total 4.0"))
            # the monitor is up: acknowledged once stored there
            r = gw.post("/feedback", json={"id": ids[0], "label": 1})
            assert r.status_code == 200 and r.json()["monitor"] == "stored", r.text
            assert _quality(port)["1"] == {"n": 1, "accuracy": 1.0}

            _stop(monitor)  # the monitor goes down: labels wait in the gateway's durable outbox
            r = gw.post("/feedback", json={"id": ids[1], "label": 1})
            assert r.status_code == 202 and r.json()["monitor"] == "queued", r.text
            exposed = gw.get("/metrics").text  # the outbox is visible to Prometheus
            assert 'driftloop_gateway_feedback_outbox{state="pending"} 1.0' in exposed
            assert 'driftloop_gateway_feedback_outbox{state="dead"} 0.0' in exposed
            pred = gw.post("/v1/models/m:predict", json={"instances": [[5.0]]})
            assert pred.status_code == 200  # predictions never wait on the monitor
        # the gateway restarts while the monitor is still down; then the monitor comes back
        monitor = _start_monitor(store, port)
        with TestClient(create_gateway_app(GatewayConfig(**cfg)), headers=INGEST_AUTH) as gw:
            _wait(lambda: _quality(port).get("1", {}).get("n") == 2)
            r = gw.post("/feedback", json={"id": ids[2], "label": 0})  # served before the restart
            assert r.status_code == 200 and r.json()["monitor"] == "stored", r.text
        _stop(monitor)
        monitor = _start_monitor(store, port)  # and the monitor restarts: nothing lost
        assert _quality(port)["1"] == {"n": 3, "accuracy": pytest.approx(1 / 3)}
    finally:
        _stop(monitor)
