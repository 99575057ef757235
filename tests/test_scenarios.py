"""The built-in scenarios pass, runs are reproducible from a seed, and the docs cover the schema."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from shir.sim.faults import FAULT_KINDS
from shir.sim.scenario import (
    DurationDist,
    NetworkSpec,
    NodeSpec,
    RandomFaults,
    Workload,
    builtin_names,
    load_scenario,
)
from shir.sim.surface import LinkSpec, ProxyChange
from shir.sim.world import run

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "simulation.md"
REQUIRED = {
    "reference", "dispatcher-hibernates", "crash-mid-job", "intranet-partition",
    "key-regenerated-while-registering", "rolling-upgrade", "duplicate-storm",
    "control-channel-loss", "version-expiry",
}
REFERENCE_UNTIL_S = 600.0  # the reference scenario is one simulated hour; ten minutes in tests
SHORT = "dispatcher-hibernates"  # a short built-in for the reproducibility checks


def test_the_required_scenarios_are_built_in() -> None:
    names = set(builtin_names())
    assert names >= REQUIRED, f"missing: {sorted(REQUIRED - names)}"
    assert len(names) >= 8


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_scenario_passes(name: str) -> None:
    scenario = load_scenario(name)
    assert scenario.description, f"{name} has no description"
    assert scenario.expect, f"{name} has no expectations"
    if name != "reference":
        # short in simulated time, so the suite runs every one of them whole
        assert scenario.duration_s + scenario.drain_s <= 600, name
    result = run(scenario, until_s=REFERENCE_UNTIL_S if name == "reference" else None)
    assert result.invariant_violations == []
    assert result.expectations["failed"] == []
    assert len(result.expectations["passed"]) == len(scenario.expect)
    assert result.ok


def test_same_seed_same_log_and_different_seed_different_log() -> None:
    scenario = load_scenario(SHORT)
    first = run(scenario)
    second = run(scenario)
    assert first.event_log_sha256 == second.event_log_sha256
    assert first.events == second.events
    other = run(scenario, seed=scenario.seed + 1)
    assert other.event_log_sha256 != first.event_log_sha256


def test_same_seed_same_log_in_another_process_with_another_hash_seed() -> None:
    here = run(load_scenario(SHORT))
    env = {**os.environ, "PYTHONHASHSEED": "4242" if os.environ.get("PYTHONHASHSEED") != "4242"
           else "17"}
    code = (
        "import json; from shir.sim.scenario import load_scenario; from shir.sim.world import run;"
        f" r = run(load_scenario({SHORT!r})); print(json.dumps(r.to_json()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    there = json.loads(out.stdout)
    assert there["event_log_sha256"] == here.event_log_sha256
    assert there["events"] == here.events


# -- docs/simulation.md covers the schema ---------------------------------------------------


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _doc_table_rows(doc: str, heading: str) -> set[str]:
    """The names in backticks in the first column of the tables under a heading."""
    section = doc.split(heading, 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    cells = re.findall(r"^\|([^|]*)\|", section, flags=re.MULTILINE)
    return {name for cell in cells for name in re.findall(r"`([^`]+)`", cell)}


def test_every_fault_kind_is_documented_with_its_fields(doc: str) -> None:
    rows = _doc_table_rows(doc, "## Fault kinds")
    assert rows == set(FAULT_KINDS), (
        f"undocumented: {sorted(set(FAULT_KINDS) - rows)}, stale: {sorted(rows - set(FAULT_KINDS))}"
        " (python tests/test_scenarios.py prints the table)"
    )
    assert fault_kind_table() in doc, "the fault-kind table is out of date: " \
        "python tests/test_scenarios.py prints the current one"


@pytest.mark.parametrize(("heading", "cls"), [
    ("### `[[nodes]]`", NodeSpec),
    ("### `[workload]`", Workload),
    ("### `[network]`", NetworkSpec),
    ("### `[random_faults]`", RandomFaults),
    ("### `[[links]]`", LinkSpec),
    ("### `[[proxy_changes]]`", ProxyChange),
])
def test_every_scenario_key_is_documented(doc: str, heading: str, cls: type) -> None:
    rows = _doc_table_rows(doc, heading)
    keys = {f.name for f in attrs.fields(cls)}
    assert keys <= rows, f"{heading}: undocumented keys {sorted(keys - rows)}"


def test_every_duration_kind_settings_field_and_invariant_is_documented(doc: str) -> None:
    from shir.core.model import RuntimeSettings

    assert {f.name for f in attrs.fields(DurationDist)} <= _doc_table_rows(
        doc, "### `[workload]`")
    assert {f.name for f in attrs.fields(RuntimeSettings)} <= _doc_table_rows(
        doc, "### `[settings]`")
    invariants = _doc_table_rows(doc, "## Invariants")
    assert {"terms", "leases", "capacity", "effects", "membership", "replay", "lost"} <= invariants
    metrics = _doc_table_rows(doc, "## Metrics")
    assert {"jobs.submitted", "jobs.completed", "jobs.dead_lettered", "jobs.unfinished",
            "jobs.lost", "jobs.duplicate_effects", "failovers", "max_dispatcher_gap_s",
            "max_offline_detect_s", "invariant_violations", "refusals.<Error>"} <= metrics


def fault_kind_table() -> str:
    """The fault-kind table of docs/simulation.md, generated from FAULT_KINDS."""
    lines = ["| kind | needs | optional | what it does |", "|---|---|---|---|"]
    for name, kind in FAULT_KINDS.items():
        needs = ", ".join(f"`{k}`" for k in kind.needs)
        allows = ", ".join(f"`{k}`" for k in kind.allows) or "-"
        lines.append(f"| `{name}` | {needs} | {allows} | {kind.doc} |")
    return "\n".join(lines)


if __name__ == "__main__":  # print the table to paste into docs/simulation.md
    print(fault_kind_table())
