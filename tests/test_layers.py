"""Imports only point down the layers of DESIGN.md; a file's path says its layer.

The layer table is written once, here. Every module of the product is read with ``ast`` (all
imports, also the ones inside functions) and an import that its layer may not make fails the
test: one from a lower layer to a higher one, one between ``serving/`` and ``monitoring/``, a
service importing a step (services use the core only), or a sub-command module importing the
main CLI module. A module started as a process (``python -m pkg.mod``: a string constant that
names a product module, alone or after ``-m`` in a command string) is an edge as much as an
import is, and is read the same way.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("driftloop", "components", "pipelines", "serving", "monitoring")

# Layer of a module, by the longest matching prefix of its dotted name. Higher number = higher layer.
LAYERS: dict[str, tuple[int, str]] = {
    "driftloop.core": (0, "core"),
    "components": (1, "steps"),
    "serving": (2, "services"),
    "monitoring": (2, "services"),
    "pipelines": (3, "pipelines"),
    "driftloop.app": (4, "application"),
    "driftloop": (4, "application"),  # the package's public facade (lazy names only)
}
# What each layer may import besides itself (application: everything below it).
MAY_IMPORT = {
    "core": {"core"},
    "steps": {"core", "steps"},
    "services": {"core"},  # plus their own package; serving/ and monitoring/ never import each other
    "pipelines": {"core", "steps", "services", "pipelines"},
    "application": {"core", "steps", "services", "pipelines", "application"},
}
# The one step that reaches a service: deploy puts the challenger out through serving/.
EXCEPTIONS = {("components.deploy", "serving")}
# The one process started upwards: the trigger starts a retraining run as the worker process of
# pipelines/ (DESIGN.md: "the trigger starts runs through pipelines/"), never by import.
STARTED_EXCEPTIONS = {("monitoring.trigger", "pipelines.retrain")}
MAIN_CLI = "driftloop.app.cli"


def layer_of(module: str) -> tuple[int, str] | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str) -> set[str]:
    """Every module an import statement names, anywhere in the file (relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from pkg import mod`` imports the sub-module too
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def started_modules(source: str) -> set[str]:
    """Product modules the file starts as processes: a string constant that is a dotted module name
    (``[sys.executable, "-m", "pipelines.retrain"]``, ``WORKER_MODULE = "serving.gateway"``), or a
    word after ``-m`` in a command string."""
    found: set[str] = set()
    known = product_module_names()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            words = node.value.split()
            names = {node.value} if len(words) == 1 else {b for a, b in zip(words, words[1:]) if a == "-m"}
            found.update(n for n in names if "." in n and n in known)
    return found


def violations(module: str, source: str) -> list[str]:
    """Why each import in ``source`` (the text of ``module``) breaks the layering; empty when none does."""
    own = layer_of(module)
    if own is None:
        return []
    out = []
    started = started_modules(source)
    for target in sorted(imported_modules(source, module) | started):
        other = layer_of(target)
        if other is None or target == module:
            continue
        top, target_top = module.split(".")[0], target.split(".")[0]
        if (module, target_top) in EXCEPTIONS or (target in started and (module, target) in STARTED_EXCEPTIONS):
            continue
        if other[0] > own[0]:
            out.append(f"{module} ({own[1]}) imports {target} ({other[1]}): a lower layer importing a higher one")
        elif own[1] == other[1] == "services" and top != target_top:
            out.append(f"{module} imports {target}: serving/ and monitoring/ never import each other")
        elif other[1] not in MAY_IMPORT[own[1]] and other[1] != own[1]:
            out.append(f"{module} ({own[1]}) imports {target} ({other[1]}): {own[1]} may import only "
                       f"{', '.join(sorted(MAY_IMPORT[own[1]]))}")
        if target == MAIN_CLI and module.startswith("driftloop.app.") and module != MAIN_CLI and target not in started:
            out.append(f"{module} imports {MAIN_CLI}: a sub-command module never imports the main CLI module")
    return out


def product_modules() -> list[tuple[str, Path]]:
    return sorted((module_name(p), p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@functools.cache
def product_module_names() -> frozenset[str]:
    return frozenset(m for m, _ in product_modules())


def test_every_module_has_a_layer():
    unplaced = [m for m, _ in product_modules() if layer_of(m) is None]
    assert not unplaced
    # The core package exists and the application has its own folder: the path tells the layer.
    assert (ROOT / "driftloop" / "core" / "config.py").exists()
    assert (ROOT / "driftloop" / "app" / "cli.py").exists()


def test_imports_only_point_down():
    found = [v for m, p in product_modules() for v in violations(m, p.read_text())]
    assert found == []


# Each import the layering removed, put back in the file it came from: the check must catch it.
REINTRODUCED = [
    ("pipelines.runner", "from pipelines.training import compile_pipeline", None),  # same layer: allowed
    ("driftloop.core.config", "from pipelines.training import compile_pipeline", "core"),
    ("driftloop.core.registry", "from components._runtime import ERROR_FILE_ENV", "core"),
    ("driftloop.core.registry", "from serving.rollout import RolloutStore", "core"),
    ("driftloop.core.processes", "from monitoring.alerts import lookup_alert", "core"),
    ("driftloop.core.console", "from driftloop.app.cli import app", "core"),
    ("monitoring.trigger", "from components.ingest import read_table", "services"),
    ("monitoring.trigger", "from pipelines.runner import runner_for", "services"),
    ("monitoring.service", "from serving.traffic import Splitter", "never import each other"),
    ("serving.gateway", "import monitoring.events", "never import each other"),
    ("serving.rollout", "from driftloop.app.lineage import build_lineage", "services"),
    ("components.deploy", "from pipelines.runner import runner_for", "steps"),
    ("components.ingest", "from monitoring.drift import fast_check", "steps"),
    ("components.train", "from serving.predictor import MLflowModel", "steps"),  # only deploy reaches serving/
    ("components.deploy", "from serving.rollout import weight_schedule", None),
    ("pipelines.schedule", "from driftloop.app.cli import console", "pipelines"),
    ("driftloop.app.schedule_cli", "from driftloop.app.cli import console, settings_from", "main CLI"),
    ("driftloop.app.monitor_cli", "from ..app.cli import settings_from", None),  # resolved below
    # a module started as a process is an edge too
    ("monitoring.sink", "WORKER = 'pipelines.retrain'", "services"),
    ("serving.gateway", "cmd = ['python', '-m', 'monitoring.sink']", "never import each other"),
    ("driftloop.core.processes", "cmd = 'python -m serving.predictor --port 1'", "core"),
    ("serving.local_backend", "cmd = ['python', '-m', 'serving.predictor']", None),
    ("monitoring.trigger", "cmd = ['python', '-m', 'pipelines.schedule']", "services"),  # only retrain is named
]


@pytest.mark.parametrize("module,line,expected", REINTRODUCED)
def test_a_reintroduced_upward_import_is_caught(module, line, expected):
    path = dict(product_modules())[module]
    source = path.read_text() + f"\n\ndef _reintroduced():\n    {line}\n"
    found = violations(module, source)
    if module == "driftloop.app.monitor_cli":  # a relative import resolves like an absolute one
        assert any("main CLI" in v for v in found), found
    elif expected is None:
        assert found == []
    else:
        assert any(expected in v for v in found), found


def test_the_layer_table_orders_the_design():
    assert layer_of("driftloop.core.errors")[1] == "core"
    assert layer_of("driftloop.app.demo")[1] == "application"
    assert layer_of("pipelines.retrain")[1] == "pipelines"
    assert layer_of("components.train")[0] < layer_of("serving.predictor")[0] < layer_of("pipelines.runner")[0]
    assert layer_of("kfp.dsl") is None
