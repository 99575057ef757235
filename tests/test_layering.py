"""Layering and packaging rules that the design fixes.

- shir.core is pure: no module under core/ imports I/O, concurrency, clocks, randomness or the
  outer layers (checked on the source with `ast`, imports inside functions included).
- The three folders install as one namespace, shir.*; no bare `core`, `adapters` or `sim`
  module may land in site-packages or a wheel.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"

FORBIDDEN_IN_CORE = (
    "shir.adapters",
    "shir.sim",
    "adapters",
    "sim",
    "azure",
    "pyodbc",
    "simpy",
    "socket",
    "threading",
    "asyncio",
    "subprocess",
    "time",
    "random",
)


def _forbidden(module: str) -> str | None:
    for banned in FORBIDDEN_IN_CORE:
        if module == banned or module.startswith(banned + "."):
            return banned
    return None


def _resolve_relative(package: str, level: int, module: str | None) -> str:
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*base, module] if module else base)


def forbidden_imports(source: str, filename: str, package: str = "shir.core") -> list[str]:
    """Return one message per forbidden import in `source` (a module of `package`)."""
    problems: list[str] = []

    def report(node: ast.AST, module: str) -> None:
        banned = _forbidden(module)
        if banned is not None:
            problems.append(
                f"{filename}:{getattr(node, 'lineno', '?')}: imports {module!r}"
                f" (shir.core must not depend on {banned!r})"
            )

    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                report(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = _resolve_relative(package, node.level, node.module)
            else:
                module = node.module or ""
            # `from shir import adapters` names the forbidden module only in its alias.
            candidates = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            for candidate in candidates:
                if _forbidden(candidate):
                    report(node, candidate)
                    break
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            report(node, node.args[0].value)
    return problems


def _core_modules() -> list[Path]:
    return sorted(p for p in CORE.rglob("*.py") if "__pycache__" not in p.parts)


def _package_of(path: Path) -> str:
    """The package that relative imports in `path` resolve against (core/ is shir.core)."""
    return ".".join(["shir", "core", *path.relative_to(CORE).parent.parts])


def test_core_imports_nothing_impure() -> None:
    modules = _core_modules()
    assert modules, f"no .py files found under {CORE}"
    problems: list[str] = []
    for path in modules:
        rel = str(path.relative_to(ROOT))
        problems += forbidden_imports(path.read_text(encoding="utf-8"), rel, _package_of(path))
    assert not problems, "shir.core must stay pure:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "import socket",
        "import os, time",
        "import threading as t",
        "from asyncio import sleep",
        "import azure.storage.blob",
        "from azure.storage import blob",
        "from shir import adapters",
        "from shir.sim.world import World",
        "from .. import sim",
        "import random\n",
        "def later():\n    import subprocess\n    return subprocess",
        "class C:\n    def m(self):\n        from time import monotonic\n",
        "import importlib\nimportlib.import_module('pyodbc')",
        "__import__('simpy')",
    ],
)
def test_checker_catches_forbidden_import(source: str) -> None:
    problems = forbidden_imports(source, "core/example.py")
    assert len(problems) == 1, problems
    assert problems[0].startswith("core/example.py:")


def test_checker_reports_file_line_and_module() -> None:
    problems = forbidden_imports('"""Doc."""\n\nimport socket\n', "core/net.py")
    assert problems == ["core/net.py:3: imports 'socket' (shir.core must not depend on 'socket')"]


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "import timeit",
        "import randomness",
        "import simulation",
        "import datetime, typing, attrs, msgpack",
        "from . import codec",
        "from .errors import DomainError",
        "from shir.core import codec",
        "from shir import core",
    ],
)
def test_checker_allows_pure_imports(source: str) -> None:
    assert forbidden_imports(source, "core/example.py") == []


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def test_installed_as_shir_namespace_only(tmp_path: Path) -> None:
    script = (
        "import importlib.util as u\n"
        "import shir.core, shir.adapters, shir.sim\n"
        "bare = [n for n in ('core', 'adapters', 'sim') if u.find_spec(n) is not None]\n"
        "assert not bare, f'bare top-level modules importable: {bare}'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_wheel_contains_only_the_shir_namespace(tmp_path: Path) -> None:
    # Build from a copy so the repository gets no build/ or egg-info litter from the test.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("core", "adapters", "sim"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("shir\n", encoding="utf-8")

    have_backend = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))
    isolation = ["--no-build-isolation"] if have_backend else []
    out = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), "."],
        cwd=src,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("shir-*.whl")
    names = zipfile.ZipFile(wheel).namelist()

    assert "shir/core/codec.py" in names
    assert "shir/core/py.typed" in names
    assert "shir/adapters/py.typed" in names
    assert "shir/sim/py.typed" in names
    assert "shir/__init__.py" not in names, "shir must stay an implicit namespace package"
    top_level = {name.split("/", 1)[0] for name in names}
    stray = {t for t in top_level if t != "shir" and not t.endswith(".dist-info")}
    assert not stray, f"wheel has top-level entries outside shir/: {sorted(stray)}"
