"""A KServe-protocol fake model server as a process (``python -m tests.fake_model_server``), for tests
that start real serving processes without an MLflow model: answers V1/V2 like
tests.serving_helpers.FakeModelServer after ``--delay`` seconds, and counts requests at ``/count``."""

from __future__ import annotations

import argparse

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.serving_helpers import FakeModelServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-name", default="model")
    p.add_argument("--version", default="1")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0)
    args = p.parse_args()
    server = FakeModelServer(args.model_name, args.version)
    server.delay = args.delay

    async def count(request: Request) -> Response:
        return JSONResponse({"requests": len(server.seen)})

    server.app.router.routes.append(Route("/count", count, methods=["GET"]))
    uvicorn.run(server.app, host="127.0.0.1", port=args.http_port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
