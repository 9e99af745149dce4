"""The package's imports only point down: no cycle, even counting imports inside functions, and none upward.

Every module of ``inhercc`` (``passes/`` installed as ``inhercc.passes``) is parsed with ``ast``; every import
statement counts wherever it sits (module level, functions, ``try``), except those under ``if TYPE_CHECKING:``,
which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"inhercc": ROOT / "inhercc", "inhercc.passes": ROOT / "passes"}

# Bottom (0) to top (6): a module may import only from its own layer or below. A name ending in ".*" covers a
# package and every module inside it. Written once here; the longest matching entry wins.
LAYERS: dict[str, int] = {
    "inhercc.errors": 0,
    "inhercc.linalg": 0,
    "inhercc._version": 0,
    "inhercc.options": 0,  # the option() declaration, checks and dict round-trip every options class uses
    "inhercc.model": 1,
    "inhercc.graph": 1,
    "inhercc.files": 1,
    "inhercc.specs": 1,
    "inhercc.progress": 1,
    "inhercc.data": 2,
    "inhercc.runtime": 2,
    "inhercc.torchrt.*": 3,
    "inhercc.families": 3,  # the Layer record and the op-family registry: below passes and layers (same layer)
    "inhercc.layers": 3,
    "inhercc.factorizer": 3,
    "inhercc.passes.*": 3,
    "inhercc.plan": 3,
    "inhercc.calibrate": 3,
    "inhercc.verify": 3,
    "inhercc.losses": 3,
    "inhercc.sensitivity": 3,
    "inhercc.report": 3,
    "inhercc.bench": 3,
    "inhercc.latency": 3,
    "inhercc.quantize": 3,  # INT8 through onnxruntime.quantization (and what it quantizes, for fake quantization)
    "inhercc.precision": 3,  # fp16 through onnxruntime.transformers.float16 (bench's fp16 copies too)
    "inhercc.optimize": 3,  # ONNX Runtime's transformer optimizer; the layers its fusions need dense
    "inhercc.distill.*": 4,  # config, processes, features, teacher, checkpoint, trainer, run
    "inhercc.recipe": 4,  # composes the stages' options (DistillConfig among them)
    "inhercc.reskd.cascade": 3,  # the merged ONNX cascade: model / specs only
    "inhercc.reskd.calibrate": 3,  # numpy only
    "inhercc.reskd.options": 4,  # composes DistillConfig
    "inhercc.reskd.*": 5,  # training rounds: compress and distil
    "inhercc.stages": 5,
    "inhercc.pipeline": 5,
    "inhercc.cli.*": 6,  # a package of thin commands
    "inhercc.__main__": 6,
    "inhercc": 6,
}


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package's ``__init__.py`` under the package's name)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            found[name] = path
    return found


def is_type_checking(test: ast.expr) -> bool:
    """Whether an ``if`` test is ``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a tree, at any depth, skipping the bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules a module imports; ``from P import X`` means module ``P.X`` when that is a module."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = name.split(".") if is_package else name.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            full = f"{base}.{alias.name}"
            targets.add(full if full in modules else base)
    return {t for t in targets if t in modules and t != name}


def import_graph() -> dict[str, set[str]]:
    """Module name → the package modules it imports."""
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def layer_of(name: str) -> int | None:
    """A module's layer from LAYERS (the longest matching entry), or None when it has none."""
    best: tuple[int, int] | None = None
    for key, layer in LAYERS.items():
        hit = key == name or (key.endswith(".*") and (name == key[:-2] or name.startswith(key[:-1])))
        if hit and (best is None or len(key) > best[0]):
            best = (len(key), layer)
    return None if best is None else best[1]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_imports_inside_functions_count_and_type_checking_ones_do_not(tmp_path: Path) -> None:
    """Every import counts wherever it sits; ``from P import X`` is module ``P.X`` when that is a module, else
    ``P``; relative imports resolve against the package; ``if TYPE_CHECKING:`` bodies are skipped."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import inhercc.errors\n"
        "if TYPE_CHECKING:\n"
        "    from inhercc.pipeline import compress\n"
        "def f():\n"
        "    from inhercc import linalg, compress\n"
        "    try:\n"
        "        from .base import Pass\n"
        "    except ImportError:\n"
        "        pass\n"
    )
    modules = {"inhercc", "inhercc.errors", "inhercc.linalg", "inhercc.pipeline", "inhercc.passes.base"}
    found = imported_modules("inhercc.passes.mod", source, modules)
    assert found == {"inhercc", "inhercc.errors", "inhercc.linalg", "inhercc.passes.base"}


def test_the_graph_is_read() -> None:
    """The walker sees imports inside functions and resolves ``from inhercc import X`` to the module."""
    graph = import_graph()
    assert {"inhercc", "inhercc.model", "inhercc.passes", "inhercc.passes.base", "inhercc.torchrt.module"} <= set(graph)
    assert "inhercc.pipeline" in graph["inhercc"]
    assert "inhercc.passes.base" in graph["inhercc.passes"]


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in the layer table before it can be imported from anywhere."""
    missing = sorted(name for name in import_graph() if layer_of(name) is None)
    assert missing == []


def test_no_import_points_up() -> None:
    """No module imports one from a higher layer."""
    graph = import_graph()
    upward = sorted(
        f"{src} (layer {layer_of(src)}) -> {dst} (layer {layer_of(dst)})"
        for src, targets in graph.items()
        for dst in targets
        if (layer_of(src) or 0) < (layer_of(dst) or 0)
    )
    assert upward == [], "\n".join(upward)


def test_no_import_cycle() -> None:
    """No circle of imports between modules, counting those inside functions."""
    graph = import_graph()
    cycles = find_cycles(graph)
    detail = [
        " <-> ".join(c) + "\n    " + "\n    ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
        for c in cycles
    ]
    assert cycles == [], "\n".join(detail)


def test_one_atomic_writer() -> None:
    """Only :mod:`inhercc.files` renames temp files into place or makes temp files beside outputs: models, JSON,
    plots and checkpoints all go through its one writer."""
    calls = set()
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename", "mkstemp", "mkdtemp"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("os", "tempfile") and name != "inhercc.files":
                    calls.add(f"{name}: {base.id}.{node.attr}")
    assert sorted(calls) == []


MAX_FUNCTION_LINES = 80


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method of the package (nested ones too) of ``limit`` lines or more, docstring included."""
    found = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines >= limit:
                    found.append(f"{name}.{node.name}: {lines} lines")
    return found


def test_functions_are_short_enough_to_read() -> None:
    assert long_functions() == []
    assert long_functions(limit=60)  # the walk sees functions (some are over 60 lines)
