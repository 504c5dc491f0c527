"""Test helpers: run an ASGI app on a free 127.0.0.1 port in a thread; a KServe-like upstream
with switchable faults (errors, latency, wrong answers); a sink that records CloudEvents."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 in a background thread; yields its base URL; always stops it."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def truth(row: dict[str, Any]) -> int:
    """The scenario's "true" label for the fake upstream: churn when tenure is short."""
    return int((row.get("tenure") or 0.0) < 12)


class FakeModelServer:
    """KServe-protocol upstream (V1 + V2) whose behaviour a test can change while it runs.

    ``fail``: share of requests answered 500; ``delay``: seconds added per request;
    ``wrong``: answer the opposite of :func:`truth` (a model with bad accuracy).
    """

    def __init__(self, name: str, version: str) -> None:
        self.name, self.version = name, version
        self.fail, self.delay, self.wrong = 0.0, 0.0, False
        self.seen: list[dict[str, Any]] = []
        self._n = 0
        self.app = Starlette(routes=[
            Route("/v1/models/{tail}", self.v1, methods=["POST", "GET"]),
            Route("/v2/models/{name}/infer", self.v2, methods=["POST"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
        ])

    def _predict(self, rows: list[dict[str, Any]]) -> list[int]:
        return [1 - truth(r) if self.wrong else truth(r) for r in rows]

    async def _faults(self) -> Response | None:
        self._n += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail and (self._n % round(1 / self.fail) == 0):
            return JSONResponse({"error": "injected failure"}, status_code=500)
        return None

    async def ready(self, request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def v1(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse({"name": self.name, "ready": True})
        raw = await request.body()
        self.seen.append({"path": request.url.path, "body": raw, "headers": dict(request.headers)})
        try:
            import json

            rows = json.loads(raw)["instances"]
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "Unrecognized request format: expected 'instances'"}, status_code=400)
        if (err := await self._faults()) is not None:
            return err
        return JSONResponse({"predictions": self._predict(rows), "model_version": self.version})

    async def v2(self, request: Request) -> Response:
        import json

        raw = await request.body()
        self.seen.append({"path": request.url.path, "body": raw, "headers": dict(request.headers)})
        doc = json.loads(raw)
        cols = {i["name"]: i["data"] for i in doc["inputs"]}
        n = len(next(iter(cols.values())))
        rows = [{k: v[j] for k, v in cols.items()} for j in range(n)]
        if (err := await self._faults()) is not None:
            return err
        return JSONResponse({"model_name": self.name, "model_version": self.version, "id": doc.get("id", ""),
                             "outputs": [{"name": "predictions", "shape": [n], "datatype": "INT64",
                                          "data": self._predict(rows)}]})


class RecordingSink:
    """A little inference-log sink that records the CloudEvents it receives, each as binary mode has it
    (``ce-*`` headers + body); structured events and batches are read with the cloudevents SDK and
    keep the POST's raw bytes under ``raw``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/events", self.receive, methods=["POST"])])

    async def receive(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/cloudevents"):
            from cloudevents.conversion import to_binary
            from cloudevents.http import from_dict

            docs = json.loads(body)
            for doc in docs if isinstance(docs, list) else [docs]:
                headers, data = to_binary(from_dict(doc), data_marshaller=lambda d: json.dumps(
                    d, separators=(",", ":"), ensure_ascii=False).encode())
                self.events.append({"headers": {k.lower(): v for k, v in headers.items()}, "body": data, "raw": body})
        else:
            self.events.append({"headers": dict(request.headers), "body": body})
        return Response(status_code=200)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.events


def row(i: int) -> dict[str, Any]:
    return {"tenure": float(i % 40), "monthly_spend": 30.0 + i % 5, "sessions": float(i % 9), "support_calls": 1.0,
            "latency_ms": 120.0, "region": ["eu", "us", "apac"][i % 3], "plan": ["basic", "pro"][i % 2]}
