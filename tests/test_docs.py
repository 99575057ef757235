"""The documentation cannot rot: generated pages match their generators, examples run.

- docs/state-machine.md is generated from ``shir.core.rules``; regenerate it with the command
  the failure message prints.
- Every ```python block of docs/embedding.md and docs/operations.md is executed, in order, in
  one namespace; the examples assert what they show, and on operations.md every output the page
  shows (```text blocks, "prints `...`") is what the blocks print, in that order.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from shir.core import rules

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REGENERATE = ".venv/bin/python -m shir.core.rules > docs/state-machine.md"


def test_state_machine_doc_matches_the_rules() -> None:
    page = DOCS / "state-machine.md"
    expected = rules.mermaid()
    actual = page.read_text(encoding="utf-8") if page.exists() else ""
    assert actual == expected, f"docs/state-machine.md is out of date; run: {REGENERATE}"


def test_the_documented_command_generates_the_doc() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shir.core.rules"], capture_output=True, text=True, check=True,
        cwd=ROOT,
    ).stdout
    assert out == rules.mermaid()


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(encoding="utf-8"), re.S | re.M)


def test_embedding_doc_has_an_example() -> None:
    blocks = python_blocks(DOCS / "embedding.md")
    assert blocks, "docs/embedding.md lost its runnable example"


def shown_outputs(page: Path) -> list[str]:
    """What the page says its examples print: ```text blocks and inline "prints `...`"."""
    text = page.read_text(encoding="utf-8")
    found = re.finditer(r"^```text\n(.*?)^```$|^prints `([^`]+)`", text, re.S | re.M)
    return [(m.group(1) or m.group(2) + "\n") for m in found]


@pytest.mark.parametrize("page", ["embedding.md", "operations.md"])
def test_python_blocks_run(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": f"docs.{page}"}
    for i, block in enumerate(python_blocks(DOCS / page), 1):
        code = compile(block, f"docs/{page} (python block {i})", "exec")
        exec(code, namespace)  # our own documentation
    printed = capsys.readouterr().out
    if page == "embedding.md":
        assert "refused: node 'node-a' dispatched under term 1" in printed
        assert "term 3: node-a dispatches" in printed
    if page == "operations.md":
        shown = shown_outputs(DOCS / page)
        assert len(shown) >= 7
        assert "".join(shown) == printed
