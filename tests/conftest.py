"""Shared fixtures: scenario data, settings in a temporary workspace, one trained champion per session."""

import os
import signal
import threading
import warnings
from pathlib import Path

import pytest

from driftloop.core.processes import free_port  # noqa: F401 (tests import it from here)
from tests.servers import tracking  # noqa: F401 (a real MLflow server on S3, one per session)

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

# A test run started in the background of a script (`make test &`, CI runners) inherits SIGINT ignored, and an
# ignored signal stays ignored across exec: the `driftloop serve` a test starts would then never see the Ctrl-C
# the test sends it. Python's own handler here means every child starts with the default action.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
warnings.filterwarnings("ignore", category=FutureWarning)


_TOKEN_ENV = ("DRIFTLOOP_GATEWAY_TOKEN", "DRIFTLOOP_INGEST_TOKEN")


@pytest.fixture(autouse=True)
def _tokens_do_not_leak_between_tests():
    """An in-process ``serve`` puts the workspace's tokens into ``os.environ`` for its children; a later
    test's workspace has other tokens, so each test ends with the token variables it started with."""
    before = {k: os.environ.get(k) for k in _TOKEN_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _retraining_threads_end_with_their_test():
    """A trigger with an in-process runner runs each retraining on a thread of its own (``retrain-<alert>``),
    which records the result after the run returns: a test that closes its monitor as the run ends would
    otherwise see that thread log into the next test's output ("not recorded: ... closed database")."""
    yield
    for thread in threading.enumerate():
        if thread.name.startswith("retrain-") and thread is not threading.current_thread():
            thread.join(timeout=10)


def make_settings(workspace: Path, source: Path, **overrides):
    """Settings for a test workspace (embedded default), with dotted-key overrides."""
    from driftloop.core.config import load_settings

    base = {
        "workspace": str(workspace),
        "data.source": str(source),
        "data.time_column": "event_time",
        "data.reference_size": 1000,
        "mlflow.model_name": "churn",
        "mlflow.experiment": "test",
        "model.params": {"max_iter": 50},
    }
    base.update(overrides)
    return load_settings(overrides=base, environ={})


@pytest.fixture(scope="session")
def scenario_path(tmp_path_factory) -> Path:
    """4000 rows over 60 days; drift (covariate + concept) from day 30."""
    from driftloop.app.scenario import write_scenario

    return write_scenario(tmp_path_factory.mktemp("data") / "scenario.parquet", rows=4000)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, scenario_path):
    """A workspace whose MLflow registry holds one champion (trained on the first 30 days).

    Returns (settings, RunResult). Shared by the whole session: tests must not move its aliases;
    tests that change the registry make their own workspace.
    """
    from pipelines.runner import LocalRunner, RunRequest
    from pipelines.training import run_training

    settings = make_settings(tmp_path_factory.mktemp("ws"), scenario_path)
    result = run_training(LocalRunner(settings), RunRequest(window_end="2026-01-31"))
    assert result.state == "SUCCEEDED", result.error
    return settings, result


# The longest modules go first. `make test` runs two test processes (pytest-xdist, a module at a time per
# process, in this order: --no-loadscope-reorder), so these run beside the many short modules instead of
# alone at the end.
_LONG_FIRST = ("test_real_data_loop.py", "test_e2e_loop.py", "test_e2e_fleet_demo.py")


# Modules that share a costly session fixture run in one test process, so it is built once: a real MLflow server
# on S3 with a champion trained through it (tests/servers.py `tracking`, ~55 s of a core; built once per process
# that needs it). `make test` runs `--dist loadfile`: every other module is a unit of its own, as loadfile makes it.
_SHARED_UNITS = {"test_real_mlflow.py": "tracking", "test_real_s3.py": "tracking", "test_real_alerting.py": "tracking"}


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFixtureScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return _SHARED_UNITS.get(scope.rsplit("/", 1)[-1], scope)

    return SharedFixtureScheduling(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
