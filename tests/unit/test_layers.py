"""The import contract of kvbench's layers (pyproject.toml's [tool.importlinter]), and no import cycles.

- the contracts hold on the package as it is;
- they are not vacuous: a copy of the package with an upward import and a methods -> engine.cache import
  planted in it breaks both, and import-linter names them;
- no two kvbench modules import each other, directly or through others, counting imports inside
  functions and under `if TYPE_CHECKING:` (grimp's graph, the one import-linter checks, has both).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = "kvbench layers: imports point down only"
FORBIDDEN = "methods see only the engine's small types"


def lint_imports_exe() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip(f"import-linter's lint-imports is not installed next to {sys.executable}")
    return str(exe)


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports with root/pyproject.toml, analysing root/kvbench (root first on the path), no cache written."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.run([lint_imports_exe(), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=60)


def importlinter_section(pyproject: str) -> str:
    """The text of pyproject.toml's [tool.importlinter] table and its [[tool.importlinter.contracts]]."""
    lines, keep = [], False
    for line in pyproject.splitlines():
        header = line.strip().startswith("[")
        if header:
            keep = line.strip().strip("[]").startswith("tool.importlinter")
        if keep:
            lines.append(line)
    return "\n".join(lines) + "\n"


def test_contracts_name_the_layers():
    section = importlinter_section((REPO / "pyproject.toml").read_text())
    assert 'root_package = "kvbench"' in section
    assert LAYERS in section and FORBIDDEN in section


def test_contracts_kept_on_the_package():
    out = lint(REPO)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert f"{LAYERS} KEPT" in text
    assert f"{FORBIDDEN} KEPT" in text
    assert "2 kept, 0 broken" in text


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    """A copy of kvbench (code only) beside a pyproject.toml holding the real [tool.importlinter] section."""
    root = tmp_path_factory.mktemp("linted")
    shutil.copytree(REPO / "kvbench", root / "kvbench", ignore=shutil.ignore_patterns("__pycache__", "assets", "*.pyc"))
    (root / "pyproject.toml").write_text(importlinter_section((REPO / "pyproject.toml").read_text()))
    return root


def test_copy_is_clean_before_planting(package_copy):
    out = lint(package_copy)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_planted_violations_break_both_contracts(package_copy, tmp_path):
    root = tmp_path / "planted"
    shutil.copytree(package_copy, root)
    budget = root / "kvbench" / "engine" / "budget.py"
    budget.write_text(budget.read_text() + "\nimport kvbench.runner.run  # noqa: E402  planted: engine -> runner\n")
    full = root / "kvbench" / "methods" / "full.py"
    full.write_text(full.read_text() + "\nimport kvbench.engine.cache  # noqa: E402  planted: methods -> engine.cache\n")

    out = lint(root)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert f"{LAYERS} BROKEN" in text
    assert f"{FORBIDDEN} BROKEN" in text
    assert "0 kept, 2 broken" in text
    # the report names the planted imports (so the copy, not the installed package, was analysed)
    assert "kvbench.engine.budget -> kvbench.runner.run" in text
    assert "kvbench.methods.full -> kvbench.engine.cache" in text


# -- no import cycles


def import_graph() -> grimp.ImportGraph:
    return grimp.build_graph("kvbench", exclude_type_checking_imports=False, cache_dir=None)


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's strongly connected components of the module graph with more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
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
                components.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return components


def test_graph_counts_function_level_imports():
    """The graph sees imports inside functions: kvbench.cli imports kvbench.runner.main only in `run()`."""
    graph = import_graph()
    assert "kvbench.engine.cache" in graph.modules
    assert graph.direct_import_exists(importer="kvbench.cli", imported="kvbench.runner.main")
    assert graph.direct_import_exists(importer="kvbench.api", imported="kvbench.runner.run")  # inside evaluate()


def test_cycle_finder_finds_a_cycle():
    graph = import_graph()
    graph.add_import(importer="kvbench.engine.budget", imported="kvbench.engine.cache")  # cache imports budget
    assert any({"kvbench.engine.budget", "kvbench.engine.cache"} <= set(c) for c in strongly_connected(graph))


def test_no_import_cycles():
    graph = import_graph()
    cycles = strongly_connected(graph)
    chains = {tuple(c): graph.find_shortest_chain(c[0], c[1]) for c in cycles}
    assert not cycles, f"import cycles among kvbench modules: {chains}"
    selfish = [m for m in graph.modules if graph.direct_import_exists(importer=m, imported=m)]
    assert not selfish
