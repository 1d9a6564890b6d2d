"""The package's layering, as data, checked on every module of cxrlib.

A module may import modules of its own layer or of lower ones, never of a higher one;
no two modules import each other, directly or around a loop; and no module imports a
private (``_name``) function, class or module of another package. Imports inside
functions count too: they run as surely as module-level ones, only later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

PACKAGE = "cxrlib"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: Layers from low to high: each entry names the top-level parts of ``cxrlib`` (a module or
#: a subpackage) on that layer. Parts on one layer may import each other, but not in a loop.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "config", "settings", "errors"),
    ("runs",),
    ("data",),
    ("models",),
    ("evaluate",),
    ("train",),
    ("explain", "textclean", "reader_study", "judges"),
    ("stages",),
    ("viz",),
    ("pipeline", "__main__", "_kernel_client", "reader_web", "references", "results"),
)

#: Import cycles known and due to go, each a sorted group of modules. Nothing may join this
#: list; a cycle not on it fails the test, and so does a listed one that has gone (remove it).
KNOWN_CYCLES: tuple[tuple[str, ...], ...] = ()


# --------------------------------------------------------------------------- the checker


def module_name(path: Path, root: Path = ROOT, package: str = PACKAGE) -> str:
    """``cxrlib/data/io.py`` -> ``cxrlib.data.io``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def imports_of(source: str, module: str, is_package: bool, modules: Iterable[str]) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every import statement in ``source``.

    ``from a.b import c`` gives ``("a.b.c", None)`` when ``a.b.c`` is one of ``modules``,
    else ``("a.b", "c")``. Relative imports are resolved against ``module``.
    """
    known = set(modules)
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate, None) if candidate in known else (base, alias.name))
    return found


def read_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, list[tuple[str, str | None]]]:
    """Every module of the package -> its imports of the package's own modules."""
    paths = {module_name(path, root, package): path for path in sorted(root.rglob("*.py"))}
    graph = {}
    for module, path in paths.items():
        found = imports_of(path.read_text(encoding="utf-8"), module, path.name == "__init__.py", paths)
        graph[module] = [(target, name) for target, name in found
                         if target == package or target.startswith(package + ".")]
    return graph


def part_of(module: str, package: str = PACKAGE) -> str:
    """The top-level part of ``cxrlib`` a module belongs to (``cxrlib.data.io`` -> ``data``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_problems(graph: Mapping[str, Sequence[tuple[str, str | None]]],
                   layers: Sequence[Sequence[str]] = LAYERS) -> list[str]:
    """Imports that run up a layer, and modules whose part has no layer."""
    rank = {part: level for level, parts in enumerate(layers) for part in parts}
    problems = []
    for module, targets in sorted(graph.items()):
        if part_of(module) not in rank:
            problems.append(f"{module}: {part_of(module)!r} is on no layer (add it to LAYERS)")
            continue
        for target, _ in targets:
            if rank.get(part_of(target), -1) > rank[part_of(module)]:
                problems.append(f"{module} imports {target}, a higher layer "
                                f"({part_of(target)} above {part_of(module)})")
    return sorted(set(problems))


def private_problems(graph: Mapping[str, Sequence[tuple[str, str | None]]]) -> list[str]:
    """Private names (``_name``: functions, classes, constants, modules) imported from another
    module; a private module may be imported by the modules of its own package only."""
    problems = []
    for module, targets in sorted(graph.items()):
        for target, name in targets:
            if name is not None and name.startswith("_") and not name.startswith("__") and target != module:
                problems.append(f"{module} imports the private name {name} of {target}")
            parts = target.split(".")
            private = [depth for depth, part in enumerate(parts) if part.startswith("_") and not part.startswith("__")]
            if private:
                owner = ".".join(parts[:private[0]])
                if not module.startswith(owner + "."):
                    problems.append(f"{module} imports the private module {target}")
    return sorted(set(problems))


def import_cycles(graph: Mapping[str, Sequence[tuple[str, str | None]]]) -> list[list[str]]:
    """Groups of two or more modules that import each other, directly or around a loop
    (strongly connected components, Tarjan's algorithm), each sorted."""
    edges = {module: sorted({target for target, _ in targets if target in graph and target != module})
             for module, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    cycles.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return sorted(cycles)


# --------------------------------------------------------------------------- the checker, on a fake package


def _fake_graph(sources: Mapping[str, str]) -> dict[str, list[tuple[str, str | None]]]:
    modules = list(sources)
    graph = {}
    for module, source in sources.items():
        found = imports_of(source, module, module.count(".") == 1 and module.endswith(("data", "models")), modules)
        graph[module] = [(t, n) for t, n in found if t.startswith("cxrlib")]
    return graph


def test_checker_finds_upward_imports_cycles_and_private_names():
    graph = _fake_graph({
        "cxrlib.config": "import os\n",
        "cxrlib.data": "",
        "cxrlib.data.io": "from cxrlib.data.dicom import read_dicom\n",
        "cxrlib.data.dicom": "def f():\n    from . import io\n",               # function-level, relative: a cycle
        "cxrlib.data.recipes": "from cxrlib.data.sources import _key\n",          # private name
        "cxrlib.data.sources": "from cxrlib.models.unet import UNet\n",            # upward
        "cxrlib.models": "",
        "cxrlib.models.unet": "from cxrlib.config import seed_everything\n",
        "cxrlib.models._utils": "",
        "cxrlib.models.cyclegan": "from cxrlib.models._utils import x\n",         # private module, same package: fine
        "cxrlib.train": "",
        "cxrlib.train.engine": "from cxrlib.models import _utils\n",              # private module of another package
        "cxrlib.nowhere": "",
    })
    assert graph["cxrlib.data.dicom"] == [("cxrlib.data.io", None)]
    assert layer_problems(graph) == [
        "cxrlib.data.sources imports cxrlib.models.unet, a higher layer (models above data)",
        "cxrlib.nowhere: 'nowhere' is on no layer (add it to LAYERS)",
    ]
    assert import_cycles(graph) == [["cxrlib.data.dicom", "cxrlib.data.io"]]
    assert private_problems(graph) == [
        "cxrlib.data.recipes imports the private name _key of cxrlib.data.sources",
        "cxrlib.train.engine imports the private module cxrlib.models._utils",
    ]


def test_checker_finds_longer_cycles_and_passes_a_clean_graph():
    graph = {"cxrlib.a": [("cxrlib.b", None)], "cxrlib.b": [("cxrlib.c", None)], "cxrlib.c": [("cxrlib.a", None)],
             "cxrlib.d": [("cxrlib.a", None)]}
    assert import_cycles(graph) == [["cxrlib.a", "cxrlib.b", "cxrlib.c"]]
    clean = {"cxrlib.config": [], "cxrlib.data.io": [("cxrlib.config", "PROJECT_ROOT")],
             "cxrlib.train.engine": [("cxrlib.data.io", "read_image"), ("cxrlib.train.engine", "_local")]}
    assert (layer_problems(clean), import_cycles(clean), private_problems(clean)) == ([], [], [])


# --------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def graph():
    return read_graph()


def test_no_import_runs_up_a_layer(graph):
    assert layer_problems(graph) == []


def test_no_import_cycle(graph):
    assert [tuple(cycle) for cycle in import_cycles(graph)] == sorted(KNOWN_CYCLES)


def test_no_private_name_imported_across_modules(graph):
    assert private_problems(graph) == []
