"""The package's import structure: no cycle among its modules, counting every import statement wherever it stands
(inside functions too, where a cycle could otherwise hide), and the layers contract of ``make lint``, which must
fail when a module imports upward."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cai_bench"


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(node: ast.AST, importer: str, is_package: bool, modules: dict) -> list[str]:
    """The modules of the package one import statement loads: the named modules, and, for a module of another
    package, that package's ``__init__`` as Python imports it first."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer.split(".") if is_package else importer.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        # ``from package import name`` loads the submodule where there is one, else takes a name of the package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if not name:
            continue
        out.append(name)
        out += [p for p in _ancestors(name) if p not in _ancestors(importer) and p != importer]
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from every import statement anywhere in its source."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                graph[name] |= {m for m in _imported(node, name, path.name == "__init__.py", modules) if m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it (the first again at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_in_the_package_counting_imports_inside_functions():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_closed_inside_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub import low  # a package re-exporting its module\n")
    (package / "low.py").write_text("def f():\n    from pkg import high  # the cycle, hidden in a function\n")
    (package / "high.py").write_text("from . import low\n")
    (package / "sub" / "low.py").write_text("from pkg.sub import other\n")
    (package / "sub" / "other.py").write_text("import pkg.low\n")
    graph = import_graph(package)
    assert graph["pkg.sub"] == {"pkg.sub.low"}  # a sibling import within a package is not a cycle through it
    assert graph["pkg.sub.other"] == {"pkg.low"}
    assert find_cycle(graph) == ["pkg.high", "pkg.low", "pkg.high"]


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).parent / "lint-imports"
    env = {"PYTHONPATH": str(tree), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([str(lint), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter (the dev extra) is not installed")  # fmt: skip
def test_the_layers_contract_holds_and_fails_on_an_upward_import(tmp_path):
    """``make lint``'s contracts on a copy of the package: they pass as the package is, and fail once a module of
    the lowest package (core's plan) imports one of a high one (the commands' runner), and once a module inside
    inference imports above its own floor (the worker's vocabulary importing the torch engine)."""
    tree = tmp_path / "tree"
    shutil.copytree(PACKAGE, tree / "cai_bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    kept = _lint_imports(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    plan = tree / "cai_bench" / "core" / "plan.py"
    kept_text = plan.read_text()
    plan.write_text(kept_text + "\n\ndef _upward():\n    from cai_bench.commands import runner  # noqa\n")
    broken = _lint_imports(tree)
    assert broken.returncode != 0
    assert "cai_bench.core.plan -> cai_bench.commands.runner" in broken.stdout
    plan.write_text(kept_text)
    worker = tree / "cai_bench" / "inference" / "worker.py"
    worker.write_text(worker.read_text() + "\n\ndef _upward():\n    from cai_bench.inference import engine  # noqa\n")
    broken = _lint_imports(tree)
    assert broken.returncode != 0
    assert "cai_bench.inference.worker -> cai_bench.inference.engine" in broken.stdout


def _functions(package: Path):
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node, node.end_lineno - node.lineno + 1


def test_no_function_of_the_package_is_over_80_lines_and_no_command_over_40():
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({lines})" for p, n, lines in _functions(PACKAGE) if lines > 80]
    assert not long, long

    def is_command(node) -> bool:
        return any(isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in node.decorator_list)

    commands = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({lines})" for p, n, lines in _functions(PACKAGE / "cli")
                if lines >= 40 and is_command(n)]  # fmt: skip
    assert not commands, commands


def test_the_command_line_uses_no_private_module_of_typer_or_click():
    for path, node in ((p, n) for p in PACKAGE.rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))):
        if isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            private = [n for n in names if n.startswith(("typer._", "click"))]
            assert not private, f"{path.relative_to(ROOT)}: {private}"
