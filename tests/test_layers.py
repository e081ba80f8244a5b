"""Import layers of bench/, methods/ and metrics/: no cycles, and the import-linter contracts of pyproject.toml.

Layers, high to low: commands & recipes > adapters & metrics > runtime & data sets > embedded world >
contracts (bench.interfaces) > helpers. Function-local imports count (grimp reads them); imports under
``if TYPE_CHECKING:`` do not (they never run: annotations of a lower module naming a higher one's type).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "methods", "metrics")


def strongly_connected_components(graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components with more than one module (an import cycle each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def build_graph():
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=True)
    finally:
        sys.path.remove(str(ROOT))


def test_no_import_cycles():
    graph = build_graph()
    cycles = strongly_connected_components(graph)
    detail = []
    for component in cycles:
        for a in component:
            for b in component:
                if a != b and graph.direct_import_exists(importer=a, imported=b):
                    lines = [d["line_number"] for d in graph.get_import_details(importer=a, imported=b)]
                    detail.append(f"{a} -> {b} (line {', '.join(map(str, lines))})")
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_cycle_check_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("a", "b", "c", "d"):
        graph.add_module(m)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    graph.add_import(importer="c", imported="d")
    assert strongly_connected_components(graph) == [["a", "b", "c"]]


def test_import_linter_contracts():
    pytest.importorskip("importlinter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
