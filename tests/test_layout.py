"""The package's layout rules, checked on its source: an import of a gradexp module inside a function
is there to defer a heavy package (STYLE.md 16: never to hide a cycle), and the layers contract of
pyproject.toml ([tool.importlinter]) holds, as `lint-imports` checks it."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "gradexp"
# What is worth deferring: seconds to import (torch, matplotlib, ray, transformers) or optional.
HEAVY = {"torch", "matplotlib", "ray", "transformers", "lightning", "pytorch_lightning"}


def module_files() -> dict[str, Path]:
    """Every gradexp module by dotted name (a package by its __init__.py)."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


def imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The modules an import statement in `module` loads: each named one and the packages above it
    (`from a.b import c` loads a, a.b, and a.b.c where that is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            package = module.split(".") if MODULES.get(module, Path()).name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    loaded = []
    for name in names:
        parts = name.split(".")
        loaded += [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return list(dict.fromkeys(loaded))


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def top_level_imports(module: str) -> list[str]:
    """What importing `module` runs: the imports outside its functions (class bodies run; a TYPE_CHECKING
    block does not)."""
    tree = ast.parse(MODULES[module].read_text())
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or is_type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found += imported(node, module)
        todo += list(ast.iter_child_nodes(node))
    return found


@cache
def heavy_at_import(module: str, seen: frozenset = frozenset()) -> frozenset[str]:
    """The heavy packages importing `module` loads: its own top-level imports, and those of the gradexp
    modules it imports at top level (the packages above it included)."""
    heavy = set()
    for name in top_level_imports(module):
        root = name.split(".")[0]
        if root in HEAVY:
            heavy.add(root)
        elif name in MODULES and name != module and name not in seen:
            heavy |= heavy_at_import(name, seen | {module})
    return frozenset(heavy)


def imports_in_functions(module: str) -> list[tuple[int, list[str]]]:
    """(line, gradexp modules it loads) of each import statement inside a function of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    ours = [m for m in imported(node, module) if m in MODULES and m != "gradexp"]
                    if ours:
                        found.append((node.lineno, ours))
    return sorted(set((line, tuple(ms)) for line, ms in found))


# Imports inside functions that defer no heavy package, found when this test was written: gradexp.sinks.figures
# imports matplotlib inside its own functions, and the command line defers modules that load no torch. Each is
# to move to the top of its module (or to defer a heavy package); the list only shrinks.
KNOWN_CHEAP: set[tuple[str, str]] = set()  # (module path, gradexp module) pairs allowed for now: none


def test_the_scan_sees_what_the_package_imports():
    """The scan itself: it finds the package's modules, the heavy packages they load (directly and through
    other gradexp modules), and their imports inside functions."""
    assert {"gradexp.config", "gradexp.run.experiment", "gradexp.sinks.figures", "gradexp.data.images"} <= set(MODULES)
    assert heavy_at_import("gradexp.config") == frozenset()  # the bottom layer: pydantic and yaml
    assert heavy_at_import("gradexp.cli") == frozenset()  # `gradexp --version` imports no torch (test_cli.py)
    assert heavy_at_import("gradexp.run.experiment") == {"torch"}
    assert heavy_at_import("gradexp.huggingface") == {"torch", "transformers"}
    deferred = {m for module in MODULES for _, ms in imports_in_functions(module) for m in ms}
    assert "gradexp.run.experiment" in deferred  # the CLI defers torch


def test_an_import_inside_a_function_defers_a_heavy_package():
    """An import of a gradexp module inside a function is there to defer a heavy package: the module
    it imports loads one (torch, matplotlib, ray, transformers, lightning) when it is imported."""
    cheap = {(MODULES[module].relative_to(ROOT).as_posix(), ms[-1]): line
             for module in MODULES for line, ms in imports_in_functions(module)
             if not any(heavy_at_import(m) for m in ms)}
    new = [f"{path}:{line}: {name}" for (path, name), line in sorted(cheap.items()) if (path, name) not in KNOWN_CHEAP]
    assert not new, ("imports of gradexp modules inside functions that defer no heavy package (import them at "
                     "the top of the module):\n" + "\n".join(new))
    assert not KNOWN_CHEAP - set(cheap), f"moved to the top: take them off KNOWN_CHEAP: {KNOWN_CHEAP - set(cheap)}"


def test_the_layers_contract_holds():
    """`lint-imports` with pyproject.toml's contract: cli and session on top, config at the bottom."""
    exe = shutil.which("lint-imports") or shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("lint-imports (import-linter) is not installed: pip install import-linter")
    done = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 1 kept, 0 broken." in done.stdout or " KEPT" in done.stdout, done.stdout
