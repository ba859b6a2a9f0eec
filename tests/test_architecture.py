"""The import layers of the package, checked on the source (``ast``), so that no cycle and no
upward dependency comes back:

- no import cycle between modules (imports inside functions count: a late import is still a
  dependency);
- ``autocomp.multiobjective`` (the pure Pareto maths) imports nothing from autocomp;
- ``autocomp.store`` (the study storage) imports nothing that runs or reads studies;
- the building blocks (what to search, inputs, compressors, the plan -> model pipeline, evaluators,
  deployment, latency, students) import nothing of the layers built on them;
- ``autocomp.compressors`` imports only itself, ``autocomp.errors`` and ``autocomp._imports`` (the optional-package helper);
- nothing imports ``autocomp.cli`` but the CLI itself;
- ``import autocomp`` loads none of the heavy libraries;
- a missing optional package is reported by ``autocomp._imports.optional`` alone (no module catches
  ImportError itself).

A module is named by its dotted path (``autocomp/store/__init__.py`` is ``autocomp.store``); ``from
autocomp.x import y`` depends on the module ``autocomp.x.y`` when there is one, else on ``autocomp.x``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "autocomp"

BUILDING_BLOCKS = ("autocomp.config", "autocomp.inputs", "autocomp.compressors", "autocomp.pipeline",
                   "autocomp.evaluators", "autocomp.deploy", "autocomp.latency", "autocomp.students")
RUNNING = ("autocomp.study", "autocomp.api", "autocomp.cli", "autocomp.validation", "autocomp.reporting",
           "autocomp.samplers")
HEAVY = ("torch", "ray", "lm_eval", "plotly", "matplotlib", "transformers", "optuna")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> dict[str, int]:
    """The autocomp modules ``name`` imports (anywhere in the file), each with the first line that does."""
    known = modules()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target.split(".")[0] == "autocomp" and target != name:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = package[:len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in known else source, node.lineno)
    return found


@lru_cache(maxsize=None)
def graph() -> dict[str, dict[str, int]]:
    return {name: imports_of(name, path) for name, path in modules().items()}


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    for start in sorted(edges):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(edges[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]


def test_the_scan_sees_every_kind_of_import():
    g = graph()
    assert "autocomp.api" in g["autocomp"]                          # a function-level `from autocomp import api`
    assert "autocomp.config.plan" in g["autocomp.config.space"]       # a top-level `from autocomp.config.plan import`
    assert "autocomp.store.schema" in g["autocomp.study.prepare"]
    assert len(g) == len(list(PACKAGE.rglob("*.py")))


def test_no_import_cycle():
    edges = {name: {t for t in targets if t in modules()} for name, targets in graph().items()}
    cycle = find_cycle(edges)
    if cycle:
        g = graph()
        steps = [f"{a} (line {g[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle: " + " -> ".join(cycle) + "\n  " + "\n  ".join(steps), pytrace=False)


def _violations(importers, forbidden, allowed=None) -> list[str]:
    out = []
    for name, targets in graph().items():
        if not within(name, importers):
            continue
        for target, line in targets.items():
            bad = within(target, forbidden) if forbidden is not None else not within(target, allowed)
            if bad:
                out.append(f"{name} (line {line}) imports {target}")
    return out


CONTRACTS = {
    "pareto maths imports nothing of autocomp": (("autocomp.multiobjective",), None, ()),
    "storage imports nothing that runs or reads studies":
        (("autocomp.store",), ("autocomp.study", "autocomp.front", "autocomp.api", "autocomp.cli",
                               "autocomp.validation", "autocomp.reporting", "autocomp.samplers"), None),
    "building blocks import no layer above them":
        (BUILDING_BLOCKS, RUNNING + ("autocomp.store", "autocomp.front"), None),
    "compressors import only compressors and errors":
        (("autocomp.compressors",), None, ("autocomp.compressors", "autocomp.errors", "autocomp._imports")),
}


@pytest.mark.parametrize("contract", list(CONTRACTS))
def test_layer_contract(contract):
    importers, forbidden, allowed = CONTRACTS[contract]
    assert any(within(name, importers) for name in modules()), f"no module is {importers}"
    bad = _violations(importers, forbidden, allowed)
    assert not bad, f"{contract}:\n  " + "\n  ".join(bad)


def test_only_the_cli_imports_the_cli():
    bad = [f"{name} (line {line}) imports {target}" for name, targets in graph().items() if not within(name, ("autocomp.cli",))
           for target, line in targets.items() if within(target, ("autocomp.cli",))]
    assert not bad, "\n".join(bad)


def test_a_violation_is_reported(monkeypatch):
    """The contract check can fail: a forged edge from the storage to the study runner is caught."""
    forged = {name: dict(targets) for name, targets in graph().items()}
    forged["autocomp.store.urls"]["autocomp.study.loop"] = 1
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: forged)
    importers, forbidden, allowed = CONTRACTS["storage imports nothing that runs or reads studies"]
    assert _violations(importers, forbidden, allowed) == ["autocomp.store.urls (line 1) imports autocomp.study.loop"]


def test_import_autocomp_is_light():
    """``import autocomp`` (and its version) loads no heavy library; the API names load on first use."""
    code = ("import sys, autocomp; print(autocomp.__version__); "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    version, heavy = (proc.stdout.splitlines() + ["", ""])[:2]
    assert version.strip()
    assert heavy.strip() == "", f"import autocomp loaded {heavy}"


def _catches_import_error(path: Path) -> list[int]:
    """Lines of ``except`` clauses in ``path`` that name ImportError or ModuleNotFoundError."""
    names = {"ImportError", "ModuleNotFoundError"}
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            if any(isinstance(c, ast.Name) and c.id in names for c in caught):
                lines.append(node.lineno)
    return lines


def test_optional_imports_go_through_one_helper(tmp_path):
    bad = [f"{name}:{line}" for name, path in modules().items() if name != "autocomp._imports"
           for line in _catches_import_error(path)]
    assert not bad, "catch ImportError only in autocomp._imports.optional: " + ", ".join(bad)
    forged = tmp_path / "forged.py"
    forged.write_text("try:\n    import ray\nexcept (ValueError, ImportError):\n    ray = None\n")
    assert _catches_import_error(forged) == [3]


def test_a_missing_optional_package_is_one_named_error(monkeypatch):
    from autocomp._imports import optional
    from autocomp.errors import DependencyError

    monkeypatch.setitem(sys.modules, "plotly", None)   # import fails as if not installed
    with pytest.raises(DependencyError) as err:
        optional("plotly.graph_objects", "the HTML report", "pip install plotly")
    assert str(err.value) == "the HTML report: package 'plotly' is not installed; pip install plotly"
    assert optional("json", "x", "y").dumps({}) == "{}"
