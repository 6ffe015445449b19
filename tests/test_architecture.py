"""The arrows of docs/architecture.md, checked by walking every import of the package.

- Library code never imports a command-line module (``guardserve.cli``, ``*.cli``): a CLI
  parses arguments and calls the library, never the other way round.
- Library code never imports ``guardserve.demo``: the demo depends on the library (it is
  one user of it), so the library works the same on any model.
- Between the library's packages, imports form no cycle.

"Library" is every module but the entry points: the CLI modules, ``__main__``, the
benchmarks (``guardserve.benchmarks``, which measure on the demo) and the demo itself.
Imports inside functions count as much as those at the top of a file.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import guardserve

ROOT = Path(guardserve.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("guardserve", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """Modules of the package that ``module`` imports (``from x import y`` counts ``x.y``
    where that is a module)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _is_cli(module: str) -> bool:
    return module in ("guardserve.cli", "guardserve.__main__") or module.endswith(".cli")


def _is_library(module: str) -> bool:
    return not (_is_cli(module) or module.startswith(("guardserve.benchmarks", "guardserve.demo")))


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_walk_sees_the_package():
    # The rules below would pass vacuously on an empty graph.
    assert len(MODULES) > 50
    assert "guardserve.textgen" in GRAPH["guardserve.unlearn.data"]
    assert "guardserve.guard.service" in GRAPH["guardserve.server.entry"] or any(
        m.startswith("guardserve.guard") for m in GRAPH["guardserve.server.entry"])


def test_library_never_imports_a_cli_module():
    bad = sorted(f"{m} imports {t}" for m, ts in GRAPH.items() if _is_library(m) for t in ts if _is_cli(t))
    assert not bad, "library code imports a CLI module (move the shared code into the library):\n" + "\n".join(bad)


def test_library_never_imports_the_demo():
    bad = sorted(f"{m} imports {t}" for m, ts in GRAPH.items() if _is_library(m)
                 for t in ts if t.startswith("guardserve.demo"))
    assert not bad, "library code imports guardserve.demo (pass the data in, or read it from the model folder):\n" \
        + "\n".join(bad)


def _package_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for m, ts in GRAPH.items():
        if not _is_library(m):
            continue
        for t in ts:
            if _is_library(t) and _package(t) != _package(m):
                edges[_package(m)].add(_package(t))
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for t in sorted(edges.get(n, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_packages():
    cycle = _cycle(_package_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}}) is None
