"""docs/state-machine.md is generated from ``shir.core.rules``: the two must agree."""

from __future__ import annotations

from pathlib import Path

from shir.core.rules import mermaid

DOC = Path(__file__).resolve().parent.parent / "docs" / "state-machine.md"


def test_state_machine_doc_is_generated_from_the_rules() -> None:
    assert DOC.read_text(encoding="utf-8") == mermaid(), (
        "docs/state-machine.md is out of date: run "
        "`python -m shir.core.rules > docs/state-machine.md`"
    )
