"""The package's layering, read from the source with ``ast``: no import cycles, no private names
imported across modules, and each layer importing only the layers ARCHITECTURE.md allows.

Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import weightsmith

ROOT = Path(weightsmith.__file__).parent

FOUNDATION = {"weightsmith.errors", "weightsmith._result", "weightsmith._tensors"}
# the front doors that hand work to distributed/ (format="dcp" saves, sharded models)
INTO_DISTRIBUTED = {"weightsmith.saving", "weightsmith.conversion", "weightsmith.warmstart.load"}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


MODULES = _modules()


def _imports() -> tuple[dict[str, set[str]], set[tuple[str, str, str]]]:
    """Module -> the weightsmith modules it imports; and (importer, module, private name) triples."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    private: set[tuple[str, str, str]] = set()
    for name, (path, package) in MODULES.items():
        here = name if package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name in MODULES and a.name != name}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target not in MODULES:
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    module = full if full in MODULES else target
                    if module != name:
                        edges[name].add(module)
                    if full not in MODULES and alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.add((name, target, alias.name))
    return edges, private


EDGES, PRIVATE = _imports()


def _cycles(edges: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
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
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset({"a", "b", "c"})}
    assert _cycles({"a": {"b"}, "b": set()}) == set()


def test_the_import_reader_sees_lazy_and_relative_imports():
    assert "weightsmith.distributed.sharded_load" in EDGES["weightsmith.warmstart.load"]  # inside load_
    assert "weightsmith.warmstart.plan" in EDGES["weightsmith.warmstart.execute"]


def test_no_import_cycles():
    assert _cycles(EDGES) == set()


def test_no_private_names_imported_across_modules():
    assert sorted(PRIVATE) == []


def test_the_foundation_imports_nothing_of_the_package():
    assert {m: EDGES[m] for m in FOUNDATION} == {m: set() for m in FOUNDATION}


def test_io_imports_only_io_and_the_foundation():
    bad = {(m, t) for m, targets in EDGES.items() if m.startswith("weightsmith.io")
           for t in targets if not t.startswith("weightsmith.io") and t not in FOUNDATION}
    assert bad == set()


def test_only_the_command_line_imports_the_command_line():
    bad = {(m, t) for m, targets in EDGES.items() if not m.startswith("weightsmith.cli")
           for t in targets if t.startswith("weightsmith.cli")}
    assert bad == {("weightsmith.__main__", "weightsmith.cli")}


def test_distributed_is_reached_only_through_its_front_doors():
    importers = {m for m, targets in EDGES.items() if not m.startswith("weightsmith.distributed")
                 for t in targets if t.startswith("weightsmith.distributed")}
    assert importers <= INTO_DISTRIBUTED, importers - INTO_DISTRIBUTED
