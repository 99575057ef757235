"""The decider is composed in one visible place (shir.core.decide), and the core's modules stay
apart: no module writes into another's tables, none imports another's underscore names, and
core/ has no import cycle (imports inside functions included). Each checker is shown to catch
what it is for on a planted example, so these tests can fail.

Also: ``rules.TRANSITIONS`` is the authoritative list of status changes, and a change decide
would emit that it does not list is caught.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import attrs
import pytest
from rig import Rig, recomputed

from shir.core import rules
from shir.core.events import HeartbeatReceived
from shir.core.model import NodeStatus
from shir.core.state import fold

CORE = Path(__file__).resolve().parent.parent / "core"
composed = importlib.import_module("shir.core.decide")  # shir.core.decide is also the function
_MUTATORS = {"update", "append", "extend", "setdefault", "insert", "add", "pop", "clear"}


def _sources() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(CORE.glob("*.py"))
            if p.stem != "__init__"}


def _imports(source: str, modules: set[str]) -> list[tuple[str, str, int]]:
    """(core module, imported name or "", line) for every import of a shir.core module."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shir.core"):
            target = node.module.removeprefix("shir.core").lstrip(".")
            for alias in node.names:
                if not target and alias.name in modules:  # from shir.core import leasing
                    out.append((alias.name, "", node.lineno))
                elif target:
                    out.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("shir.core."):
                    out.append((alias.name.removeprefix("shir.core."), "", node.lineno))
    return out


def private_imports(sources: dict[str, str]) -> list[str]:
    """Imports of another core module's underscore names."""
    return [f"core/{name}.py:{line}: imports {target}.{what}"
            for name, src in sources.items()
            for target, what, line in _imports(src, set(sources))
            if what.startswith("_") and target != name]


def import_cycles(sources: dict[str, str]) -> list[list[str]]:
    """Cycles in the graph of core modules importing core modules."""
    graph = {name: {t for t, _w, _l in _imports(src, set(sources)) if t in sources and t != name}
             for name, src in sources.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append([*path[path.index(m):], m])
            elif m not in state:
                visit(m, [*path, m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return cycles


def table_writes(sources: dict[str, str]) -> list[str]:
    """Changes to a name imported from another core module (``X.update(...)``, ``X[k] = v``,
    ``module.X.append(...)``): every module exports its tables and only decide.py merges."""
    problems = []
    for name, src in sources.items():
        tree = ast.parse(src)
        imported = {alias.asname or alias.name
                    for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module and node.module.startswith("shir.core")
                    for alias in node.names}

        def foreign(expr: ast.expr, imported: set[str] = imported) -> bool:
            if isinstance(expr, ast.Name):
                return expr.id in imported
            return isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and (
                expr.value.id in imported)

        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _MUTATORS and foreign(node.func.value)):
                problems.append(f"core/{name}.py:{node.lineno}: changes {ast.unparse(node.func)}")
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Subscript) and foreign(t.value):
                        problems.append(f"core/{name}.py:{node.lineno}: changes {ast.unparse(t)}")
                    elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and (
                            t.value.id in imported):
                        problems.append(f"core/{name}.py:{node.lineno}: sets {ast.unparse(t)}")
    return problems


def test_no_core_module_imports_another_modules_private_names() -> None:
    assert private_imports(_sources()) == []


def test_core_has_no_import_cycle() -> None:
    assert import_cycles(_sources()) == []


def test_no_core_module_writes_into_another_modules_tables() -> None:
    assert table_writes(_sources()) == []


def test_the_checkers_catch_what_they_are_for() -> None:
    planted = {
        "a": "from shir.core.b import _helper\nfrom shir.core import c\n",
        "b": "from shir.core.a import DECIDE\nDECIDE.update({})\n"
             "def f():\n    import shir.core.a\n",
        "c": "from shir.core import a as other\nfrom shir.core.a import EVOLVE\nEVOLVE[int] = 1\n"
             "other.RULES = ()\n",
    }
    assert private_imports(planted) == ["core/a.py:1: imports b._helper"]
    assert ["a", "b", "a"] in import_cycles(planted)
    assert table_writes(planted) == [
        "core/b.py:2: changes DECIDE.update",
        "core/c.py:3: changes EVOLVE[int]",
        "core/c.py:4: sets other.RULES",
    ]


def test_decide_merges_every_concern_and_each_command_once() -> None:
    from shir.core import credentials, leasing, lifecycle, proxy, sharing

    concerns = composed.CONCERNS
    assert concerns == (lifecycle, leasing, credentials, sharing, proxy)
    for table in ("DECIDE", "EVOLVE", "EFFECTS"):
        merged = getattr(composed, table)
        parts = [getattr(c, table) for c in concerns]
        assert sum(len(p) for p in parts) == len(merged), f"{table}: a key in two concerns"
        assert all(merged[k] is v for p in parts for k, v in p.items())
    assert tuple(r for c in concerns for r in c.RULES) == composed.RULES


# --- TRANSITIONS ------------------------------------------------------------------------------

def test_transitions_list_only_changes_decide_can_make() -> None:
    edges = {(t.source, t.target) for t in rules.TRANSITIONS}
    assert len(edges) == len(rules.TRANSITIONS)  # no edge twice
    assert all(s is not t for s, t in edges)
    assert not any(t is NodeStatus.INITIALIZING for _s, t in edges)  # entered by registering only
    assert (NodeStatus.OFFLINE, NodeStatus.UPGRADING) not in edges  # StartUpgrade refuses it
    assert (NodeStatus.INITIALIZE_FAILED, NodeStatus.UPGRADING) not in edges  # and this too
    # a node fails to initialize only from Initializing; no registered node needs registration
    assert {s for s, t in edges if t is NodeStatus.INITIALIZE_FAILED} == {NodeStatus.INITIALIZING}
    assert not any(NodeStatus.NEED_REGISTRATION in e for e in edges)
    doc = rules.mermaid()
    for t in rules.TRANSITIONS:
        assert f"{t.source.value} --> {t.target.value}: {t.cause}" in doc


def test_a_change_decide_would_emit_that_is_not_listed_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = Rig.online(2, at=10.0)
    silent = (NodeStatus.ONLINE, NodeStatus.OFFLINE)
    monkeypatch.setattr(rules, "_ALLOWED", rules._ALLOWED - {silent})
    with pytest.raises(AssertionError,
                       match=r"unlisted transition NodeStatus\.ONLINE -> NodeStatus\.OFFLINE"):
        c.run(60.0, skip=["n2"])  # n2 falls silent: Online -> Offline, no longer listed


# --- incremental settling ---------------------------------------------------------------------

def test_the_status_memo_sees_every_fact_a_derivation_reads() -> None:
    # ``lifecycle.derive_statuses`` skips a node whose facts and runtime-wide facts are equal to
    # those of its last derivation: a field left out of either would let a stale status stand.
    c = Rig.online(2, at=1.0)
    m = c.state.model()
    node = m.nodes["n1"]
    assert node.facts() == attrs.astuple(node, recurse=False)
    ctx = rules.context(m, m.now)
    everything_but_now = attrs.astuple(ctx, recurse=False)[1:]
    assert attrs.fields(rules.Context)[0].name == "now"
    assert ctx.facts() == tuple(
        tuple(v.items()) if isinstance(v, dict) else v for v in everything_but_now
    )


def test_folding_other_events_than_decided_takes_no_caches_from_the_decision() -> None:
    # A host whose append lost to another writer folds that writer's events instead of its
    # own decision's: the decision's caches (n1 heard at 20 s) must not be taken for them.
    c = Rig.online(2, at=1.0)
    decided = composed.decide(c.state, c.heartbeat_cmd("n1", at=20.0))
    assert [type(e) for e in decided] == [HeartbeatReceived]
    m1, m2 = (c.state.node(n).metrics for n in ("n1", "n2"))  # type: ignore[union-attr]
    other = fold(c.state, [HeartbeatReceived("n1", m1, 5.0), HeartbeatReceived("n2", m2, 20.0)])
    assert composed.next_deadline(other) == composed.next_deadline(recomputed(other))
    # and the decision's own events, folded, agree with a fresh derivation too
    c2 = Rig.online(2, at=1.0)
    own = composed.decide(c2.state, c2.heartbeat_cmd("n1", at=20.0))
    mine = fold(c2.state, own)
    assert composed.next_deadline(mine) == composed.next_deadline(recomputed(mine))


def test_a_rule_is_marked_for_settling_only_by_the_events_it_reads() -> None:
    c = Rig.online(2, at=1.0)
    names = [r.name for r in c.state.model().rules]
    bit = {name: 1 << i for i, name in enumerate(names)}
    composed.next_deadline(c.state)
    assert c.state.model().dirty == 0  # every rule found nothing since the last change
    c.submit_n(2)
    assert {e.token.node for e in c.dispatch()} == {"n1", "n2"}
    m = c.state.model()
    assert m.dirty == 0  # job events only lower the lease rule's due time, to the new lease's
    assert m.rule_due[names.index("leases")] == m.jobs.next_expiry()
    # A heartbeat changes a node's facts, not which nodes are Offline. Folded as another
    # writer's event (no decision of this model's to take the caches from), it marks the rules
    # that read it:
    metrics = c.state.node("n1").metrics  # type: ignore[union-attr]
    m = fold(c.state.copy(), [HeartbeatReceived("n1", metrics, 5.0)]).model()
    assert m.dirty & bit["node statuses"]
    assert not m.dirty & (bit["leases"] | bit["offline auto-expiry"])
    # Decided here, the decision already settled those rules on its scratch model after its
    # own events: folding the same events takes its caches instead of settling them again.
    c.heartbeat_all(5.0)
    m = c.state.model()
    assert m.dirty == 0
    assert composed.next_deadline(c.state) == composed.next_deadline(recomputed(c.state))
    events = c.run(40.0, skip=["n2"])  # n2 falls silent: the lease rule must look again
    lost = [e for e in events if type(e).__name__ == "JobReleased"]
    assert [(e.token.node, e.reason.value) for e in lost] == [("n2", "node_lost")]
