"""The shape of the product's code: no class over 300 lines, no function over 80 lines outside
pipeline definitions, no import circle, settings typed.

Read with ``ast`` like tests/test_layers.py. A pipeline definition (a function decorated with
``@dsl.pipeline`` or one that builds and returns it, ``make_*_pipeline``) is a wiring diagram and
reads best whole; everything else is split by job.
"""

from __future__ import annotations

import ast
import re

from tests.test_layers import imported_modules, product_module_names, product_modules

MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80


def _is_pipeline_definition(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    decorated = any("pipeline" in ast.unparse(d) for d in node.decorator_list)
    return decorated or re.fullmatch(r"make_\w*pipeline", node.name) is not None


def oversized(source: str) -> list[str]:
    """``kind name lines`` for each class over 300 and each function over 80 lines in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
            out.append(f"class {node.name} {lines} lines (line {node.lineno})")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES \
                and not _is_pipeline_definition(node):
            out.append(f"function {node.name} {lines} lines (line {node.lineno})")
    return out


def test_no_class_over_300_and_no_function_over_80_lines():
    found = [f"{m}: {what}" for m, p in product_modules() for what in oversized(p.read_text())]
    assert found == []


def test_the_size_check_sees_a_long_function_and_spares_a_pipeline():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert oversized(f"def step():\n{body}\n") == [f"function step {MAX_FUNCTION_LINES + 1} lines (line 1)"]
    assert oversized(f"@dsl.pipeline(name='p')\ndef loop():\n{body}\n") == []
    methods = "\n".join(f"    def m{i}(self):\n        return {i}\n" for i in range(MAX_CLASS_LINES // 3 + 1))
    assert oversized(f"class Big:\n{methods}")[0].startswith("class Big")


def _annotated_any(source: str) -> list[str]:
    """Parameters named like settings (``settings``, ``cfg``, ``*_settings``) annotated ``Any``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            out += [f"{node.name}({a.arg}: Any) line {node.lineno}" for a in args
                    if a.annotation is not None and ast.unparse(a.annotation).strip("'\"") == "Any"
                    and (a.arg in ("settings", "cfg") or a.arg.endswith("_settings"))]
    return out


def test_settings_are_typed_everywhere():
    found = [f"{m}: {what}" for m, p in product_modules() for what in _annotated_any(p.read_text())]
    assert found == []
    assert _annotated_any("def f(settings: Any, cfg: 'Any'): ...") == ["f(settings: Any) line 1", "f(cfg: Any) line 1"]


def _resolve(target: str, known: frozenset[str]) -> str | None:
    """The product module an import names (``pkg.mod.Name`` is ``pkg.mod``)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports (anywhere in the file). A module importing its own
    package's ``__init__`` (a facade) is no edge: the package re-exports it, it does not use it."""
    known = product_module_names()
    graph: dict[str, set[str]] = {}
    for module, path in product_modules():
        edges = set()
        for target in imported_modules(path.read_text(), module):
            found = _resolve(target, known)
            if found and found != module and not module.startswith(found + "."):
                edges.add(found)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
