"""Layering and packaging rules that the design fixes.

- shir.core is pure: no module under core/ imports I/O, concurrency, clocks, randomness or the
  outer layers (checked on the source with `ast`, imports inside functions included).
- shir.sim imports only shir.core, itself, the standard library, SimPy and attrs, and the
  libraries of its optional extras (Hypothesis, matplotlib, Dask, tqdm): never an adapter.
- shir.adapters imports no shir.sim, except its command line's composition root,
  adapters/cli.py, which mounts the simulator's commands and hands them the file event store.
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
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"
SIM = ROOT / "sim"
ADAPTERS = ROOT / "adapters"
COMPOSITION_ROOT = ADAPTERS / "cli.py"
# Besides the standard library: the simulator's own dependencies and its optional extras'.
SIM_MAY_IMPORT = ("shir.core", "shir.sim", "simpy", "attrs", "hypothesis", "matplotlib",
                  "dask", "distributed", "tqdm")  # dask: distributed's config

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


def _forbidden(module: str, banned_list: tuple[str, ...] = FORBIDDEN_IN_CORE) -> str | None:
    for banned in banned_list:
        if module == banned or module.startswith(banned + "."):
            return banned
    return None


def _resolve_relative(package: str, level: int, module: str | None) -> str:
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*base, module] if module else base)


def imports(source: str, filename: str, package: str) -> list[tuple[int, list[str]]]:
    """Every import in `source` (a module of `package`) as (line, the modules it may name):
    `from a import b` names `a` or `a.b`; `importlib.import_module("x")` and `__import__("x")`
    with a constant name count too."""
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [(line, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = _resolve_relative(package, node.level, node.module)
            else:
                module = node.module or ""
            # `from shir import adapters` names the module only in its alias.
            found.append((line, [module, *(f"{module}.{alias.name}" for alias in node.names)]))
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
            found.append((line, [node.args[0].value]))
    return found


def forbidden_imports(source: str, filename: str, package: str = "shir.core",
                      banned_list: tuple[str, ...] = FORBIDDEN_IN_CORE) -> list[str]:
    """Return one message per import in `source` (a module of `package`) of a banned module."""
    problems: list[str] = []
    layer = ".".join(package.split(".")[:2])
    for line, candidates in imports(source, filename, package):
        for candidate in candidates:
            banned = _forbidden(candidate, banned_list)
            if banned is not None:
                problems.append(f"{filename}:{line}: imports {candidate!r}"
                                f" ({layer} must not depend on {banned!r})")
                break
    return problems


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _package(path: Path) -> str:
    """The package that relative imports in `path` resolve against (core/ is shir.core)."""
    rel = path.relative_to(ROOT)
    return ".".join(["shir", *rel.parent.parts])


def sim_strays(source: str, filename: str, package: str = "shir.sim") -> list[str]:
    """One message per import in a shir.sim module of anything but the standard library and
    SIM_MAY_IMPORT."""
    def allowed(module: str) -> bool:
        top = module.split(".")[0]
        return (top in sys.stdlib_module_names or top == "__future__"
                or any(module == ok or module.startswith(ok + ".") for ok in SIM_MAY_IMPORT))

    problems = []
    for line, (module, *names) in imports(source, filename, package):
        # `from shir import core` is allowed by its name, `from shir import adapters` is not
        bad = ([] if allowed(module) else [m for m in names if not allowed(m)]
               if module == "shir" else [module])
        if bad:
            problems.append(f"{filename}:{line}: imports {bad[0]!r} (shir.sim may import only "
                            "shir.core, the standard library and its own dependencies)")
    return problems


def _check(paths: list[Path], checker: Callable[[str, str, str], list[str]]) -> list[str]:
    """What ``checker(source, file name, package)`` finds in each of ``paths`` (not none)."""
    assert paths, "no .py files found"
    return [problem for path in paths for problem in checker(
        path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), _package(path))]


def test_core_imports_nothing_impure() -> None:
    problems = _check(_modules(CORE), forbidden_imports)
    assert not problems, "shir.core must stay pure:\n" + "\n".join(problems)


def test_sim_imports_only_core_and_its_own_dependencies() -> None:
    problems = _check(_modules(SIM), sim_strays)
    assert not problems, "\n".join(problems)


def test_adapters_import_no_sim_but_the_composition_root() -> None:
    adapters = [p for p in _modules(ADAPTERS) if p != COMPOSITION_ROOT]
    problems = _check(adapters, lambda source, name, package: forbidden_imports(
        source, name, package, ("shir.sim",)))
    assert not problems, "\n".join(problems)
    # and the composition root is where the simulator's commands are mounted
    assert "shir.sim" in COMPOSITION_ROOT.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("from shir.adapters.filestore import FileEventStore", "shir.adapters.filestore"),
        ("def f():\n    from shir import adapters", "shir.adapters"),
        ("from .. import adapters", "shir.adapters"),
        ("import azure.storage.blob", "azure.storage.blob"),
        ("import pyodbc", "pyodbc"),
        ("import importlib\nimportlib.import_module('shir.adapters.cli')", "shir.adapters.cli"),
    ],
)
def test_sim_checker_catches_an_adapter_or_a_driver(source: str, problem: str) -> None:
    problems = sim_strays(source, "sim/example.py")
    assert len(problems) == 1 and repr(problem) in problems[0], problems


@pytest.mark.parametrize("source", [
    "import os, json, tomllib", "from shir.core.store import EventStore", "from . import faults",
    "import simpy", "import attrs", "from hypothesis import strategies as st",
    "import matplotlib.pyplot as plt", "from distributed import Client", "import tqdm",
])
def test_sim_checker_allows_core_stdlib_and_its_dependencies(source: str) -> None:
    assert sim_strays(source, "sim/example.py") == []


@pytest.mark.parametrize("source", [
    "import shir.sim.cli", "from shir.sim import world", "from shir import sim",
    "def f():\n    from shir.sim.scenario import load_scenario",
])
def test_adapter_checker_catches_sim(source: str) -> None:
    problems = forbidden_imports(source, "adapters/example.py", "shir.adapters", ("shir.sim",))
    assert len(problems) == 1, problems


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
