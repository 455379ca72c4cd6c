"""No import circles: the package's modules, read from source with ``ast`` (nothing is imported, so
no vLLM, and the test runs in milliseconds), must form an acyclic import graph.

What counts as an edge ``a -> b`` (``a`` imports ``b``, both modules of the scanned packages):

- every ``import`` / ``from ... import`` statement in ``a``, at module level *and* inside functions,
  methods and classes: a lazy import defers a dependency, it does not remove it. A literal
  ``importlib.import_module("pkg.mod")`` / ``__import__("pkg.mod")`` counts too;
- *except* imports under ``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:`` (their ``else:``
  branch does run, so it counts);
- ``import p.q.r`` is an edge to ``p.q.r``; ``from p.q import r`` is an edge to the module
  ``p.q.r`` if there is one (a file or a package), else to ``p.q`` (``r`` is a name defined in
  ``p/q.py`` or ``p/q/__init__.py``); relative imports (``from . import x``, ``from ..a import b``)
  are resolved against the importing module's package first. A package is the module of its
  ``__init__.py``.

No implicit edges to ancestor packages. Importing ``p.q.r`` does execute ``p/__init__.py`` and
``p/q/__init__.py`` first, but an edge to each ancestor would report false circles: ``p/__init__``
importing ``p.sub`` (to re-export it) and ``p.sub`` importing its sibling ``p.other`` would read as
``p.sub -> p -> p.sub``, while Python runs it fine (when ``p.sub`` runs, ``p`` is already in
``sys.modules``, only partly initialised, and nothing needs a name from it). The circle that does
break, ``p.sub`` needing a *name* from ``p/__init__`` (``from p import helper``) while that
``__init__`` is still importing ``p.sub``, is caught: ``from p import helper`` (``helper`` not a
submodule) is an edge ``p.sub -> p``.

A failure names each strongly connected component of the graph with more than one module (or a
module importing itself) as one concrete circle through it, and the import lines behind each arrow.
``import_graph(root)`` is the reusable part (e.g. for a layering test).
"""

from __future__ import annotations

import ast
import tomllib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sage_vllm_batch", "hydra_plugins")


@dataclass(frozen=True)
class ImportSite:
    """Where one edge comes from: ``path:line``, and whether the import runs lazily (in a function)."""

    path: Path
    line: int
    lazy: bool

    def __str__(self) -> str:
        where = f"{self.path.as_posix()}:{self.line}"
        return f"{where} (lazy)" if self.lazy else where


def discover_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Every module under ``root/<package>`` for each package (dotted name -> source file); a
    package's ``__init__.py`` is the package itself. Directories without ``__init__.py`` are
    namespace packages: their modules are found, they are no module themselves."""
    modules: dict[str, Path] = {}
    for package in packages:
        top = root / package
        if not top.is_dir():
            continue
        for path in sorted(top.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if any(not p.isidentifier() for p in parts):
                continue  # not importable (e.g. a stray "foo-bar.py" or a .venv inside)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _ImportCollector(ast.NodeVisitor):
    """Collects ``(target module name, imported names or None, line, lazy)`` of one source file."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, list[str] | None, int, bool]] = []
        self._depth = 0  # > 0: inside a function, the import is lazy

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:  # only the else branch runs
                self.visit(stmt)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, None, node.lineno, self._depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".") if self.package else []
            if node.level - 1 > len(base):
                return  # beyond the top-level package: Python raises, nothing to resolve
            base = base[: len(base) - (node.level - 1)]
            if node.module:
                base.append(node.module)
            target = ".".join(base)
        else:
            target = node.module or ""
        self.found.append((target, [a.name for a in node.names], node.lineno, self._depth > 0))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if (
            name in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            self.found.append((node.args[0].value, None, node.lineno, self._depth > 0))
        self.generic_visit(node)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is a module, else its longest prefix that is (None for outside imports)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, dict[str, list[ImportSite]]]:
    """The import graph with provenance: ``edges[a][b]`` lists where module ``a`` imports ``b``.
    Every module is a key (possibly with no edges); only imports among the scanned modules count."""
    modules = discover_modules(root, packages)
    edges: dict[str, dict[str, list[ImportSite]]] = {m: {} for m in modules}
    for module, path in modules.items():
        collector = _ImportCollector(module, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for target, names, line, lazy in collector.found:
            if names is None:
                resolved = [_known(target, modules)]
            else:
                resolved = [
                    f"{target}.{n}" if f"{target}.{n}" in modules else _known(target, modules) for n in names
                ]
            site = ImportSite(path.relative_to(root), line, lazy)
            for dst in dict.fromkeys(r for r in resolved if r is not None):
                edges[module].setdefault(dst, []).append(site)
    return edges


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules it imports (runtime and lazy imports; not ``TYPE_CHECKING`` ones),
    over the packages' source under ``root`` (the directory holding the top-level packages)."""
    return {src: set(dsts) for src, dsts in import_edges(root, packages).items()}


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative, so deep graphs cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        work = [(start, iter(sorted(graph.get(start, ()))))]
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """The shortest circle ``start -> ... -> start`` inside one component (BFS)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph.get(node, ())):
            if succ not in within:
                continue
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if succ not in parent:
                parent[succ] = node
                queue.append(succ)
    raise AssertionError(f"{start} is on no circle within {sorted(within)}")


def _knots(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components that hold a circle: more than one module, or a self-import."""
    return sorted(
        c for c in strongly_connected_components(graph) if len(c) > 1 or c[0] in graph.get(c[0], ())
    )


def _knot_circles(graph: dict[str, set[str]], knot: list[str], cover: bool) -> list[list[str]]:
    circles: list[list[str]] = []
    uncovered = list(knot)
    while uncovered:
        circles.append(_shortest_cycle(graph, uncovered[0], set(knot)))
        uncovered = [m for m in uncovered if m not in circles[-1]] if cover else []
    return circles


def find_circles(graph: dict[str, set[str]], *, cover: bool = False) -> list[list[str]]:
    """One concrete circle (first module repeated at the end) per strongly connected component with
    more than one module, or per module importing itself. ``cover``: more circles per component,
    until each of its modules is on one (so what to cut is visible for the whole knot)."""
    return [circle for knot in _knots(graph) for circle in _knot_circles(graph, knot, cover)]


def describe_circles(edges: dict[str, dict[str, list[ImportSite]]]) -> str:
    """Readable report: per knot (strongly connected component), circles through all its modules,
    and the import lines behind each arrow."""
    graph = {src: set(dsts) for src, dsts in edges.items()}
    lines = []
    for knot in _knots(graph):
        if len(knot) > 2:
            lines.append(f"knot of {len(knot)} modules: {', '.join(knot)}")
        for circle in _knot_circles(graph, knot, cover=True):
            lines.append("import circle: " + " -> ".join(circle))
            for src, dst in zip(circle, circle[1:], strict=False):
                lines.append(f"    {src} -> {dst}: " + ", ".join(str(s) for s in edges[src][dst]))
    return "\n".join(lines)


# -- the real package ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_edges() -> dict[str, dict[str, list[ImportSite]]]:
    return import_edges(ROOT)


def test_the_package_has_no_import_circles(real_edges):
    report = describe_circles(real_edges)
    if report:
        pytest.fail(f"the package has import circles (lazy imports count):\n{report}", pytrace=False)


def test_the_real_graph_is_not_vacuous(real_edges):
    """A broken scanner (wrong root, every import dropped) must not pass the circle test."""
    graph = {src: set(dsts) for src, dsts in real_edges.items()}
    assert len(graph) > 20, sorted(graph)
    assert sum(len(d) for d in graph.values()) > 20
    assert all(m == "sage_vllm_batch" or m.startswith(("sage_vllm_batch.", "hydra_plugins.")) for m in graph)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry_points = {target.partition(":")[0] for target in scripts.values()}
    assert entry_points <= set(graph), "a console script's module was not scanned"
    assert any(graph[m] for m in entry_points), "no console script imports anything of the package?"


# -- the scanner itself, on a synthetic package ---------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def pkg(tmp_path) -> Path:
    return _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import os\n\ndef f():\n    from pkg import b\n",  # lazy import
            "pkg/b.py": "from pkg.a import f\n",  # a name from a module -> that module
            "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import X\n",
            "pkg/d.py": (
                "import typing\nimport pkg.c\nif typing.TYPE_CHECKING:\n    import pkg.e\n"
                "else:\n    import pkg.sub.deep\n"
            ),
            "pkg/e.py": "",
            "pkg/sub/__init__.py": "from .deep import g\n",
            "pkg/sub/deep.py": "from ..e import h\nfrom .. import a\nfrom . import leaf as _l\n",
            "pkg/sub/leaf.py": "from pkg.sub import helper\n",
            "pkg/dyn.py": "import importlib\n\nclass K:\n    def m(self):\n        importlib.import_module('pkg.e')\n",
        },
    )


def test_scanner_resolves_absolute_relative_lazy_and_type_checking_imports(pkg):
    graph = import_graph(pkg, ["pkg"])
    assert set(graph) == {
        "pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.sub", "pkg.sub.deep", "pkg.sub.leaf", "pkg.dyn",
    }  # fmt: skip
    assert graph["pkg.a"] == {"pkg.b"}  # lazy, `from pkg import b` is the submodule; os is outside
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == set()  # TYPE_CHECKING only
    assert graph["pkg.d"] == {"pkg.c", "pkg.sub.deep"}  # typing.TYPE_CHECKING skipped, its else counted
    assert graph["pkg.sub"] == {"pkg.sub.deep"}  # relative, in a package's __init__
    assert graph["pkg.sub.deep"] == {"pkg.e", "pkg.a", "pkg.sub.leaf"}  # from ..e / from .. / from .
    assert graph["pkg.sub.leaf"] == {"pkg.sub"}  # a name from a package -> its __init__
    assert graph["pkg.dyn"] == {"pkg.e"}  # literal import_module, in a method


def test_circles_are_found_through_lazy_imports_but_not_through_type_checking(pkg):
    circles = find_circles(import_graph(pkg, ["pkg"]))
    assert circles == [
        ["pkg.a", "pkg.b", "pkg.a"],  # via the lazy import in pkg.a.f
        ["pkg.sub", "pkg.sub.deep", "pkg.sub.leaf", "pkg.sub"],  # leaf needs a name from pkg/sub/__init__
    ]  # pkg.c -> pkg.d -> pkg.c exists only under TYPE_CHECKING: no circle
    report = describe_circles(import_edges(pkg, ["pkg"]))
    assert "import circle: pkg.a -> pkg.b -> pkg.a" in report
    assert "pkg.a -> pkg.b: pkg/a.py:4 (lazy)" in report
    assert "pkg.b -> pkg.a: pkg/b.py:1" in report


def test_siblings_under_a_package_that_imports_them_are_no_circle(tmp_path):
    """The false circle ancestor edges would report: p/__init__ re-exports p.sub, p.sub imports p.other."""
    root = _write(
        tmp_path,
        {
            "p/__init__.py": "from p.sub import thing\n",
            "p/sub.py": "from p.other import helper\nthing = helper\n",
            "p/other.py": "helper = 1\n",
        },
    )
    assert find_circles(import_graph(root, ["p"])) == []


def test_a_self_import_and_a_longer_knot_are_reported(tmp_path):
    root = _write(
        tmp_path,
        {
            "q/__init__.py": "",
            "q/selfish.py": "import q.selfish\n",
            "q/x.py": "import q.y\n",
            "q/y.py": "import q.z\nimport q.w\n",
            "q/z.py": "import q.x\n",
            "q/w.py": "import q.y\n",
        },
    )
    edges = import_edges(root, ["q"])
    graph = import_graph(root, ["q"])
    assert find_circles(graph) == [["q.selfish", "q.selfish"], ["q.w", "q.y", "q.w"]]
    assert find_circles(graph, cover=True) == [
        ["q.selfish", "q.selfish"],
        ["q.w", "q.y", "q.w"],
        ["q.x", "q.y", "q.z", "q.x"],
    ]
    report = describe_circles(edges)
    assert "knot of 4 modules: q.w, q.x, q.y, q.z" in report
    assert "import circle: q.selfish -> q.selfish" in report


def private_imports(root: Path, packages: Iterable[str] = PACKAGES) -> list[str]:
    """``file:line name`` of every ``from <our module> import _name`` in the package: a private
    name belongs to its module (module-internal names such as ``__version__`` are not private)."""
    found = []
    for name, path in discover_modules(root, packages).items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if not node.module.startswith(tuple(packages)):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(
                        f"{path.relative_to(root)}:{node.lineno} {node.module}.{alias.name} (in {name})"
                    )
    return found


def test_no_private_names_are_imported_across_modules():
    assert private_imports(ROOT) == []


def test_a_private_import_is_found(tmp_path):
    root = _write(
        tmp_path,
        {"pkg/__init__.py": "", "pkg/a.py": "_x = 1\n", "pkg/b.py": "def f():\n    from pkg.a import _x\n"},
    )
    assert private_imports(root, ("pkg",)) == ["pkg/b.py:2 pkg.a._x (in pkg.b)"]


# The layout table of docs/architecture.md (tests/test_docs.py keeps the two in step), top to bottom: a module may import only from its own row or rows above.
LAYERS = (
    ("errors", "paths", "storage", "fsutil", "logs", "faults", "allocator"),
    ("tasks",),
    ("config",),
    ("registry", "sources"),
    ("engine",),
    ("requests",),
    ("outputs",),
    ("run",),
    ("executors", "sweep", "finetune", "service"),
    ("job", "__main__"),
)
# logs pauses the GC while it imports transformers, with the pause engine.startup owns.
ALLOWED_UPWARD = {("sage_vllm_batch.logs", "sage_vllm_batch.engine.startup")}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "sage_vllm_batch" or len(parts) < 2:
        return None
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def test_imports_follow_the_layout_table():
    graph = import_graph(ROOT, ("sage_vllm_batch",))
    unplaced = sorted(m for m in graph if _layer(m) is None and m != "sage_vllm_batch")
    assert unplaced == [], f"modules outside the layout table (docs/architecture.md): {unplaced}"
    upward = sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if _layer(a) is not None
        and _layer(b) is not None
        and _layer(b) > _layer(a)
        and (a, b) not in ALLOWED_UPWARD
    )
    assert upward == [], "imports against the layout (a row importing a row below it):\n" + "\n".join(upward)
    downward = [(a, b) for a, ts in graph.items() for b in ts if (_layer(a) or 0) > (_layer(b) or 0)]
    assert len(downward) > 50  # the table places real modules (a broken _layer would see no edges)
