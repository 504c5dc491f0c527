"""Several MLflow models in one KServe ``ModelServer`` process: a fleet's packed model server.

A fleet of many small models must not pay one Python process (~150+ MB) per model. kserve's
``ModelServer`` hosts many models in one process, its model repository routing
``/v1/models/<name>:predict`` and ``/v2/models/<name>/infer`` by name; this module starts one with
the predictor's models and REST server (``serving.predictor``: signature checks, payload limit,
version routes, the fast V2 path), each of which finds its model by the name in the path. Each
model answers exactly as a one-model predictor does, with its own ``model_version``.

``python -m serving.model_pack --http-port P --model NAME=VERSION=URI [--model ...]`` serves them.
VERSION is the version the model answers with: a registry URI (``models:/…``) must resolve to it
(one that resolves to another version is not loaded); for a run or path URI it is taken as given;
empty (``NAME==URI``) takes what the URI gives, as the predictor does.

A model that fails to load does not stop the others: it is logged (one line naming it and the
reason), and its routes — ``/v1/models/<name>…``, ``/v2/models/<name>…`` including ``/ready`` —
answer 503 naming it and the reason. ``/v2/health/ready`` is ready when every model that loaded
is ready. A process with no model loaded exits with status 2, naming each model and its reason.

:func:`pack` plans the processes: which models share one, bounded by count and model-file bytes.
It and the argument parsing import nothing heavy; the server parts import kserve when called.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.predictor import DriftloopModel

__all__ = ["ModelSpec", "parse_model_spec", "pack", "load_models", "UnloadedModels", "serve_pack", "main"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# a route that names a model: /v1/models/<name>, …:predict, /v2/models/<name>, …/ready, …/infer, …/versions/…
_MODEL_ROUTE = re.compile(r"/v[12]/models/(?P<name>[^/:]+)(?:[/:].*)?")


@dataclass(frozen=True)
class ModelSpec:
    """One model of a pack: the name it answers to, the version it answers with, where it is."""

    name: str
    version: str
    uri: str


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME=VERSION=URI`` → :class:`ModelSpec` (the URI may hold ``=``); ValueError naming the problem."""
    parts = text.split("=", 2)
    if len(parts) != 3:
        raise ValueError(f"--model {text!r}: expected NAME=VERSION=URI (VERSION may be empty: NAME==URI)")
    name, version, uri = (p.strip() for p in parts)
    if not _NAME.fullmatch(name):
        raise ValueError(f"--model {text!r}: the name {name!r} must be letters, digits, '_', '.' or '-' "
                         "(at most 63), starting with a letter or digit")
    if not uri:
        raise ValueError(f"--model {text!r}: the URI is empty")
    return ModelSpec(name, version, uri)


def pack(models: list[tuple[str, int]], *, max_models: int, max_bytes: int) -> list[list[str]]:
    """Groups of model names, one process each: first-fit decreasing by model-file size.

    No group holds more than ``max_models`` models or more than ``max_bytes`` bytes of model files;
    a model bigger than ``max_bytes`` gets a group of its own. Deterministic: models are placed
    largest first (ties by name), each into the first group it fits; groups come in the order they
    were opened, and names in each in the order they were placed.
    """
    if max_models < 1:
        raise ValueError(f"max_models must be at least 1, got {max_models}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
    seen: set[str] = set()
    for name, size in models:
        if name in seen:
            raise ValueError(f"model {name!r} is listed twice")
        if size < 0:
            raise ValueError(f"model {name!r} has a negative size ({size})")
        seen.add(name)
    groups: list[list[str]] = []
    used: list[int] = []
    for name, size in sorted(models, key=lambda m: (-m[1], m[0])):
        for i, group in enumerate(groups):
            if len(group) < max_models and used[i] + size <= max_bytes:  # an oversize model never fits one
                group.append(name)
                used[i] += size
                break
        else:
            groups.append([name])
            used.append(size)
    return groups


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


def load_models(specs: list[ModelSpec], tracking_uri: str | None = None
                ) -> tuple[list[DriftloopModel], dict[str, str]]:
    """Load each model; returns those loaded and, for each one that was not, the reason (logged)."""
    from serving.predictor import DriftloopModel, _is_registry_uri

    loaded: list[DriftloopModel] = []
    failed: dict[str, str] = {}
    for spec in specs:
        model = DriftloopModel(spec.name, spec.uri, tracking_uri=tracking_uri)
        model.model_version = spec.version or None  # kept for a run or path URI; a registry URI resolves it
        try:
            model.load()
            if spec.version and model.model_version != spec.version:
                raise ValueError(f"{spec.uri} resolves to version {model.model_version}, not {spec.version}")
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
            failed[spec.name] = _one_line(exc)
            log.error("model %r (%s) not loaded, its routes answer 503: %s", spec.name, spec.uri,
                      failed[spec.name])
            continue
        if not spec.version and not _is_registry_uri(spec.uri):
            log.info("model %r answers with version %s (its MLflow model id)", spec.name, model.model_version)
        loaded.append(model)
    return loaded, failed


class UnloadedModels:
    """ASGI middleware: the routes of a model that failed to load answer 503 naming it and the reason
    (kserve would answer 404, not knowing it), and ``/v2/health/ready`` answers 503 while a model
    that loaded is not ready (kserve answers ready whatever its models are)."""

    def __init__(self, app: Any, failed: dict[str, str], loaded: list[Any]) -> None:
        self.app = app
        self.failed = dict(failed)
        self.loaded = list(loaded)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            found = _MODEL_ROUTE.fullmatch(path) if self.failed else None
            if found is not None and found["name"] in self.failed:
                name = found["name"]
                return await _answer(send, 503, {"name": name, "ready": False,
                                                 "error": f"model {name!r} is not ready: it failed to load: "
                                                          f"{self.failed[name]}"})
            if path == "/v2/health/ready":
                waiting = [m.name for m in self.loaded if not m.ready]
                if waiting:
                    return await _answer(send, 503, {"ready": False, "error": f"model(s) {waiting} not ready"})
        await self.app(scope, receive, send)


async def _answer(send: Any, status: int, doc: dict[str, Any]) -> None:
    from serving.predictor import _answer_json

    await _answer_json(send, status, doc)


def serve_pack(models: list[DriftloopModel], failed: dict[str, str] | None = None, *, http_port: int,
               host: str = "127.0.0.1", max_payload_bytes: int = 8 * 1024 * 1024, threads: int | None = 1) -> None:
    """Serve loaded models in this one process with the predictor's ModelServer until stopped (blocks);
    the routes of ``failed`` models (name → reason) answer 503 naming them."""
    from kserve.model_server import app  # the one app kserve's REST server builds (serving.predictor imported kserve)

    from serving.predictor import serve

    if not models:
        raise ValueError("no model to serve")
    # added before the server builds the app: the innermost middleware, after the predictor's own
    app.add_middleware(UnloadedModels, failed=failed or {}, loaded=models)
    serve(models, http_port=http_port, host=host, max_payload_bytes=max_payload_bytes, threads=threads)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.model_pack",
                                description="Serve several MLflow models in one KServe ModelServer process.")
    p.add_argument("--model", action="append", default=[], metavar="NAME=VERSION=URI", required=True,
                   help="a model to serve (repeat): the name it answers to, its version, its URI "
                        "(models:/name/<version>, models:/name@alias, runs:/… or a path)")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 in a cluster pod)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--max-payload-bytes", type=int, default=None,
                   help="largest request body (default: serving.max_payload_bytes)")
    p.add_argument("--threads", type=int, default=1,
                   help="OpenMP/BLAS threads per prediction (0 = the libraries' default)")
    return p


def _specs(texts: list[str]) -> list[ModelSpec]:
    specs = [parse_model_spec(text) for text in texts]
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"model name(s) {twice} given more than once")
    return specs


def _configured_payload_limit() -> int:
    from driftloop.core.config import load_settings

    return load_settings().serving.max_payload_bytes


def main(argv: list[str] | None = None) -> int:
    from driftloop.core.errors import ConfigError

    args = _parser().parse_args(argv)
    try:
        specs = _specs(args.model)
        limit = args.max_payload_bytes if args.max_payload_bytes is not None else _configured_payload_limit()
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loaded, failed = load_models(specs, args.tracking_uri)
    if not loaded:
        print("error: no model could be loaded: " + "; ".join(f"{n}: {r}" for n, r in failed.items()),
              file=sys.stderr)
        return 2
    serve_pack(loaded, failed, http_port=args.http_port, host=args.host, max_payload_bytes=limit,
               threads=args.threads or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
