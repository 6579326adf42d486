"""No import circle in zdq, and the codec floor imports nothing above it: read from the source.

Every module under ``zdq/`` is parsed with :mod:`ast`, never imported (no side effects, no Dask).
An import counts when it runs at import time: at module level, in a class body, under ``if
TYPE_CHECKING:`` or ``try:`` (mypy and readers follow those too); an import inside a function
does not (it runs when called, after every module has loaded). ``from zdq.x import y`` is an
import of ``zdq.x.y`` when that is a module, else of ``zdq.x``. The parents a dotted import
loads implicitly (``zdq/__init__.py`` for ``zdq.errors``) are not counted: every module would
then circle through ``zdq/__init__.py``.

A circle is a strongly connected component of more than one module; the failure names its
modules and one closed path through them, with the line of each import.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "zdq"

#: What the codec floor may import of zdq (everything else of zdq is above it).
#: (``zdq.compiled`` loads the optional compiled modules: it imports nothing of zdq.)
CODEC_MAY_IMPORT = ("zdq.codec", "zdq.errors", "zdq.config", "zdq.compiled")
#: The wings above the floor, named in the issue: the codec never imports them, not even in a function.
ABOVE_THE_CODEC = ("zdq.client", "zdq.broker", "zdq.consumer", "zdq.relay", "zdq.observe")


@dataclass(frozen=True)
class Module:
    """One module's source: ``package`` when it is a package's ``__init__.py``."""

    name: str
    source: str = field(repr=False)
    package: bool = False
    path: str = ""


@dataclass(frozen=True)
class Edge:
    """``importer`` imports ``imported`` at ``line`` (``at_import``: when the module loads)."""

    importer: str
    imported: str
    line: int
    at_import: bool


# -- reading ---------------------------------------------------------------------------------------
def read_package(root: Path, package: str) -> dict[str, Module]:
    """Every module of ``package`` under ``root``, by dotted name (a compiled module by its
    ``.pyi`` stub: it imports nothing of the package's)."""
    modules: dict[str, Module] = {}
    stubs = [p for p in (root / package).rglob("*.pyi") if not p.with_suffix(".py").exists()]
    for path in sorted([*(root / package).rglob("*.py"), *stubs]):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        modules[name] = Module(name, path.read_text(encoding="utf-8"), is_package, str(path.relative_to(root)))
    return modules


def _statements(body: Iterable[ast.stmt], at_import: bool = True) -> Iterator[tuple[ast.stmt, bool]]:
    """Every statement, with whether it runs when the module loads (not inside a function)."""
    for node in body:
        yield node, at_import
        inner = at_import and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _statements([child], inner)
            elif isinstance(child, (ast.ExceptHandler, ast.match_case)):
                yield from _statements(child.body, inner)


def _known(name: str, modules: dict[str, Module]) -> str | None:
    """``name`` or its longest prefix that is a module of the package (``None``: not ours)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute name a ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.name if module.package else module.name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(modules: dict[str, Module]) -> list[Edge]:
    """Every import between ``modules``, at import time or not, once per line (a module's import
    of itself, as ``from . import x`` in a package whose ``x`` is no module, is none)."""
    edges: dict[Edge, None] = {}
    for module in modules.values():
        tree = ast.parse(module.source, module.path or module.name)
        for node, at_import in _statements(tree.body):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _known(base, modules))
            for target in targets:
                if target is not None and target != module.name:
                    edges[Edge(module.name, target, node.lineno, at_import)] = None
    return list(edges)


# -- circles ---------------------------------------------------------------------------------------
def circles(names: Iterable[str], edges: Iterable[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, in order."""
    graph: dict[str, set[str]] = {name: set() for name in names}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def closed_path(component: list[str], edges: Iterable[Edge]) -> list[Edge]:
    """A shortest circle through the component's first module (breadth first, inside it)."""
    members = set(component)
    out: dict[str, list[Edge]] = {}
    for edge in edges:
        if edge.importer in members and edge.imported in members:
            out.setdefault(edge.importer, []).append(edge)
    start = component[0]
    came: dict[str, Edge] = {}
    todo = deque([start])
    while todo:
        v = todo.popleft()
        for edge in sorted(out.get(v, []), key=lambda e: (e.imported, e.line)):
            if edge.imported == start:
                path = [edge]
                while path[0].importer != start:
                    path.insert(0, came[path[0].importer])
                return path
            if edge.imported not in came:
                came[edge.imported] = edge
                todo.append(edge.imported)
    raise AssertionError(f"{component} is not a circle")  # a component found by circles() always is


def describe(component: list[str], edges: list[Edge], modules: dict[str, Module]) -> str:
    """The circle's modules, one closed path through them, and every import between them."""

    def where(e: Edge) -> str:
        return f"{modules[e.importer].path or e.importer}:{e.line}"

    path = closed_path(component, edges)
    steps = " -> ".join(f"{e.importer} ({where(e)})" for e in path)
    members = set(component)
    inside = sorted(
        (e for e in edges if e.importer in members and e.imported in members), key=lambda e: (e.importer, e.line)
    )
    lines = [f"circle of {len(component)} modules: {', '.join(component)}", f"    e.g. {steps} -> {path[-1].imported}"]
    lines += [f"    {e.importer} imports {e.imported} at {where(e)}" for e in inside]
    return "\n".join(lines)


# -- the package as it is ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zdq_modules() -> dict[str, Module]:
    modules = read_package(ROOT, PACKAGE)
    assert "zdq.codec.tasks" in modules and "zdq.errors" in modules, f"zdq's source is not under {ROOT}"
    return modules


@pytest.fixture(scope="module")
def zdq_imports(zdq_modules: dict[str, Module]) -> list[Edge]:
    return imports(zdq_modules)


def test_no_module_of_zdq_imports_itself_back_through_others(zdq_modules: dict[str, Module], zdq_imports: list[Edge]) -> None:
    edges = [e for e in zdq_imports if e.at_import]
    found = circles(zdq_modules, edges)
    report = "\n".join(describe(c, edges, zdq_modules) for c in found)
    assert not found, f"zdq has {len(found)} import circle(s) (imports that run when a module loads):\n{report}"


def test_no_module_of_zdq_imports_itself_back_even_through_imports_in_functions(
    zdq_modules: dict[str, Module], zdq_imports: list[Edge]
) -> None:
    # A lazy import breaks a circle at load time only: the two modules still need each other (the
    # executor made pools and the pools made executors, until the pool's executor became a class
    # of its own below them).
    found = circles(zdq_modules, zdq_imports)
    report = "\n".join(describe(c, zdq_imports, zdq_modules) for c in found)
    assert not found, f"zdq has {len(found)} import circle(s), counting imports in functions:\n{report}"


def test_the_codec_floor_imports_only_itself_the_errors_and_the_config(
    zdq_modules: dict[str, Module], zdq_imports: list[Edge]
) -> None:
    codec = {name for name in zdq_modules if name == "zdq.codec" or name.startswith("zdq.codec.")}
    assert {"zdq.codec.tasks", "zdq.codec.results", "zdq.codec.timing", "zdq.codec.schedules"} <= codec
    edges = zdq_imports  # in functions too: a lazy import is a dependency all the same
    upward = [
        f"{e.importer} ({zdq_modules[e.importer].path}:{e.line}) imports {e.imported}"
        for e in edges
        if e.importer in codec and not any(e.imported == m or e.imported.startswith(m + ".") for m in CODEC_MAY_IMPORT)
    ]
    assert not upward, "the codec imports from above its floor:\n" + "\n".join(upward)


def test_nothing_the_codec_reaches_is_a_wing_above_it(zdq_imports: list[Edge]) -> None:
    edges = zdq_imports
    reached = {"zdq.codec.tasks", "zdq.codec.results", "zdq.codec.timing", "zdq.codec.schedules", "zdq.codec.chunking"}
    todo = list(reached)
    while todo:
        v = todo.pop()
        for e in edges:
            if e.importer == v and e.imported not in reached:
                reached.add(e.imported)
                todo.append(e.imported)
    above = sorted(m for m in reached if any(m == w or m.startswith(w + ".") for w in ABOVE_THE_CODEC))
    assert not above, f"the codec reaches {above} through its imports"


def test_the_old_codec_paths_only_re_export_the_codec(zdq_imports: list[Edge]) -> None:
    shims = {"zdq.tasks", "zdq.serialization", "zdq.timing", "zdq.schedules", "zdq.chunking"}
    for edge in zdq_imports:
        if edge.importer in shims:
            assert edge.imported.startswith("zdq.codec."), f"{edge.importer} imports {edge.imported}"


# -- the reader itself, on small made-up packages ----------------------------------------------------
def _package(**sources: str) -> dict[str, Module]:
    """Made-up modules: keyword ``a__b`` is module ``p.a.b``; ``p`` and any name ending ``__init``
    are packages."""
    modules = {"p": Module("p", "", package=True)}
    for key, source in sources.items():
        parts = ["p", *key.split("__")]
        is_package = parts[-1] == "init"
        if is_package:
            parts.pop()
        name = ".".join(parts)
        modules[name] = Module(name, source, is_package)
    return modules


def _edges(modules: dict[str, Module]) -> set[tuple[str, str, bool]]:
    return {(e.importer, e.imported, e.at_import) for e in imports(modules)}


def test_the_reader_resolves_from_imports_to_a_submodule_when_there_is_one() -> None:
    modules = _package(
        a="from p import b\nfrom p.c import VALUE\nimport p.d.e as e\n",
        b="",
        c="VALUE = 1\n",
        d__init="",
        d__e="",
    )
    assert _edges(modules) == {("p.a", "p.b", True), ("p.a", "p.c", True), ("p.a", "p.d.e", True)}


def test_the_reader_resolves_relative_imports_from_modules_and_packages() -> None:
    modules = _package(
        d__init="from . import e\nfrom .e import X\n",
        d__e="from .. import a\nfrom ..a import Y\n",
        a="",
    )
    assert _edges(modules) == {("p.d", "p.d.e", True), ("p.d.e", "p.a", True)}


def test_the_reader_counts_type_checking_try_and_class_imports_but_not_function_imports() -> None:
    modules = _package(
        a=(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from p.b import B\n"
            "try:\n    import p.c\nexcept ImportError:\n    import p.d\n"
            "class K:\n    from p.e import E\n"
            "def f():\n    from p.f import F\n"
            "class L:\n    def m(self):\n        import p.g\n"
        ),
        b="",
        c="",
        d="",
        e="",
        f="",
        g="",
    )
    assert _edges(modules) == {
        ("p.a", "p.b", True),
        ("p.a", "p.c", True),
        ("p.a", "p.d", True),
        ("p.a", "p.e", True),
        ("p.a", "p.f", False),
        ("p.a", "p.g", False),
    }


def test_imports_of_other_packages_are_not_edges_and_each_line_counts_once() -> None:
    assert _edges(_package(a="import os\nfrom dask import config\nimport pkgutil\n")) == set()
    modules = _package(a="from p.b import X, Y, Z\n", b="")
    assert imports(modules) == [Edge("p.a", "p.b", 1, True)]


def test_a_circle_is_found_and_named_with_a_closed_path_and_its_lines() -> None:
    modules = _package(
        a="import p.b\n",
        b="\n\nfrom p import c\n",
        c="from p.a import X\n",
        d="import p.a\n",  # imports into the circle, is not in it
    )
    edges = imports(modules)
    found = circles(modules, edges)
    assert found == [["p.a", "p.b", "p.c"]]
    text = describe(found[0], edges, modules)
    assert "circle of 3 modules: p.a, p.b, p.c" in text
    assert "p.a (p.a:1) -> p.b (p.b:3) -> p.c (p.c:1) -> p.a" in text
    assert "p.c imports p.a at p.c:1" in text and "p.d imports" not in text


def test_every_circle_is_reported_on_its_own_and_a_function_import_closes_none() -> None:
    modules = _package(
        a="import p.b\n",
        b="import p.a\n",
        c="import p.d\n",
        d="from p import c\n",
        e="import p.f\n",
        f="def later():\n    import p.e\n",
    )
    edges = [e for e in imports(modules) if e.at_import]
    assert circles(modules, edges) == [["p.a", "p.b"], ["p.c", "p.d"]]


def test_a_package_without_circles_has_none() -> None:
    modules = _package(a="import p.b\nimport p.c\n", b="import p.c\n", c="")
    assert circles(modules, imports(modules)) == []


def test_every_module_compiles_with_warnings_as_errors() -> None:
    """A user running with ``-W error`` (or pytest's ``filterwarnings = error``) imports zdq: no
    module's source warns when compiled (an invalid escape such as ``\\ `` in a docstring warns
    on every import without cached bytecode, and is a SyntaxWarning from Python 3.12)."""
    import warnings

    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(), str(path), "exec")
