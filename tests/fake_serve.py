"""``driftloop`` with fake model servers (``python -m tests.fake_serve serve …``): the real CLI, serve,
gateway, supervision and rollout, only each model server is ``tests.fake_model_server`` (no MLflow
model to load), so tests can kill and restart them quickly."""

from __future__ import annotations

import sys

from serving.local_backend import LocalBackend


def _fake_argv(self: LocalBackend, version: str, model_uri: str, port: int) -> list[str]:
    return ["tests.fake_model_server", "--model-name", self.settings.serving.name, "--version", version,
            "--http-port", str(port)]


if __name__ == "__main__":
    LocalBackend.model_server_argv = _fake_argv  # type: ignore[method-assign]
    from driftloop.app.cli import app

    app(sys.argv[1:], prog_name="driftloop")
