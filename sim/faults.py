"""Fault kinds the simulator can inject, as data: each kind's fields, meaning, start and end.

A fault is scripted in a scenario (``[[faults]]``) or drawn from the seed (``[random_faults]``).
``FAULT_KINDS`` is the one list of kinds: the parser, the random generator, the world and
docs/simulation.md all read it. Each kind's ``start`` (written right above the table) does it to
a World and returns how it ends, so adding a kind touches this file and the docs only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from shir.core.credentials import check_credential as core_check_credential
from shir.core.errors import InvalidCommand
from shir.core.kernel import check_name as _core_check_name
from shir.sim.network import CONTROL, HB, INTRANET, SERVICE

if TYPE_CHECKING:
    from shir.sim.node import SimNode
    from shir.sim.world import World

__all__ = ["FAULT_KINDS", "FIELD_TYPES", "Fault", "FaultKind", "draw_faults", "links",
           "parse_fault"]


End = Callable[[], object]
# How a kind starts in a World: (world, fault, its node or None) -> how it ends (None: nothing
# to undo). Each kind's start and end are written right above the table, next to its entry.
Start = Callable[["World", "Fault", "SimNode | None"], "End | None"]


@attrs.frozen
class FaultKind:
    """What one kind of fault needs and does."""

    needs: tuple[str, ...]  # required fields besides kind and at_s
    allows: tuple[str, ...]  # optional fields
    doc: str
    start: Start
    silences: bool = False  # the service hears nothing from the node while it lasts


# --- how each kind starts, and ends -------------------------------------------------------------

def _crash(w: World, f: Fault, node: SimNode | None) -> End | None:
    if node is None or not node.up:
        return None
    node.crash()
    return node.restart


def _pause(w: World, f: Fault, node: SimNode | None) -> End | None:  # hibernate, stall
    if node is None or node.paused:
        return None
    node.pause()
    shift = f.duration_s if f.kind == "stall" else 0.0  # a stall has no clock jump
    return lambda: node.resume(shift)


def links(w: World, f: Fault) -> list[tuple[str, str, str]]:
    """The (source, destination, channel) links a partition-like fault cuts."""
    name = f.node
    assert name is not None
    if f.kind == "control_partition":
        out = [(name, SERVICE, CONTROL)]
        if not f.oneway:
            out.append((SERVICE, name, CONTROL))
        return out
    peers = [f.peer] if f.peer else [p for p in w.node_names if p != name]
    out = []
    for p in peers:
        out.append((name, p, INTRANET))
        if not f.oneway:
            out.append((p, name, INTRANET))
    if f.kind == "isolate":
        out += [(name, SERVICE, CONTROL), (SERVICE, name, CONTROL),
                (name, SERVICE, HB), (SERVICE, name, HB)]
    return out


def _cut(w: World, f: Fault, node: SimNode | None) -> End | None:  # partitions, isolate
    if node is None:
        return None
    cut = links(w, f)
    blocked = w.net.blocked
    for link in cut:
        blocked[link] += 1

    def end() -> None:
        for link in cut:
            blocked[link] -= 1
            if not blocked[link]:
                del blocked[link]

    return end


def _message_fault(w: World, f: Fault, node: SimNode | None) -> End | None:
    w.net.message_faults.append(f)  # the network applies drop/duplicate/delay/reorder
    return lambda: w.net.message_faults.remove(f)


def _clock_skew(w: World, f: Fault, node: SimNode | None) -> End | None:
    if node is None:
        return None
    node.clock_rate = f.factor
    return lambda: setattr(node, "clock_rate", 1.0)


def _clock_jump(w: World, f: Fault, node: SimNode | None) -> End | None:
    if node is not None:
        node.jump_clock(f.extra_s)
    return None


def _slow(w: World, f: Fault, node: SimNode | None) -> End | None:
    if node is None:
        return None
    name = node.name
    w.slow[name] = f.factor
    return lambda: w.slow.pop(name, None)


def _regenerate_key(w: World, f: Fault, node: SimNode | None) -> End | None:
    w.service.regenerate_key(f.key or "key1")
    return None


def _version_skew(w: World, f: Fault, node: SimNode | None) -> End | None:
    if node is None:
        return None
    node.reported_version = f.version
    return (lambda: setattr(node, "reported_version", None)) if f.duration_s else None


def _upgrade(w: World, f: Fault, node: SimNode | None) -> End | None:
    if node is not None:
        w.service.upgrade(node, f)  # it finishes (or rolls back) by itself after duration_s
    return None


def _credential_drift(w: World, f: Fault, node: SimNode | None) -> End | None:
    if node is not None and f.credential:
        held = node.credentials.get(f.credential, 0)
        if held > 1:
            node.credentials[f.credential] = held - 1
        else:
            node.credentials.pop(f.credential, None)
    return None


def _rotate_credential(w: World, f: Fault, node: SimNode | None) -> End | None:
    if node is not None and f.credential:
        w.service.save_credential(node.name, f.credential)
    return None


def _burst(w: World, f: Fault, node: SimNode | None) -> End | None:
    for _ in range(f.count):
        w.workload.submit_job()
    return None


def _append_unknown(w: World, f: Fault, node: SimNode | None) -> End | None:
    w.store.p = f.probability
    return lambda: setattr(w.store, "p", 0.0)



FAULT_KINDS: dict[str, FaultKind] = {
    "crash": FaultKind(
        ("node", "duration_s"), (),
        "the node's process dies (running jobs and memory lost, durable state kept) and "
        "restarts after duration_s",
        _crash, silences=True,
    ),
    "hibernate": FaultKind(
        ("node", "duration_s"), (),
        "the machine sleeps: nothing runs; on wake its clock jumps forward by duration_s, so its "
        "timers all fire at once and its first message reveals the gap",
        _pause, silences=True,
    ),
    "stall": FaultKind(
        ("node", "duration_s"), (),
        "the node freezes without a clock jump (a long GC pause): its timers resume late",
        _pause, silences=True,
    ),
    "partition": FaultKind(
        ("node", "duration_s"), ("peer", "oneway"),
        "node<->node on the intranet port: from node to peer (all peers if none), both ways "
        "unless oneway = true",
        _cut,
    ),
    "control_partition": FaultKind(
        ("node", "duration_s"), ("oneway",),
        "node<->control channel: messages between the node and the service are lost "
        "(oneway = true: only node -> service)",
        _cut,
    ),
    "isolate": FaultKind(
        ("node", "duration_s"), (),
        "a symmetric partition of the node from everything: peers and control channel",
        _cut, silences=True,
    ),
    "drop": FaultKind(
        ("duration_s", "probability"), ("node",),
        "each message (to or from node, or any) is lost with probability",
        _message_fault,
    ),
    "duplicate": FaultKind(
        ("duration_s", "probability"), ("node",),
        "each message is delivered twice with probability",
        _message_fault,
    ),
    "delay": FaultKind(
        ("duration_s", "extra_s"), ("node",),
        "every message takes extra_s longer",
        _message_fault,
    ),
    "reorder": FaultKind(
        ("duration_s", "probability", "extra_s"), ("node",),
        "each message is held back by up to extra_s with probability, so later ones overtake it",
        _message_fault,
    ),
    "clock_skew": FaultKind(
        ("node", "duration_s", "factor"), (),
        "the node's clock runs at factor x real time (its timers fire early or late)",
        _clock_skew,
    ),
    "clock_jump": FaultKind(
        ("node", "extra_s"), (),
        "the node's clock jumps forward by extra_s: timers due in that span fire at once",
        _clock_jump,
    ),
    "slow": FaultKind(
        ("node", "duration_s", "factor"), (),
        "the node runs jobs at factor x its speed",
        _slow,
    ),
    "regenerate_key": FaultKind(
        ("key",), (),
        "a user regenerates key1 or key2; operators get the new one",
        _regenerate_key,
    ),
    "version_skew": FaultKind(
        ("node", "version"), ("duration_s",),
        "the node reports another version (until duration_s passes, if given)",
        _version_skew,
    ),
    "upgrade": FaultKind(
        ("node", "version", "duration_s"), ("fail",),
        "the node installs version over duration_s (restarting: jobs lost); fail = true "
        "makes it roll back",
        _upgrade,
    ),
    "credential_drift": FaultKind(
        ("node", "credential"), (),
        "the node's local copy of credential falls one version behind (or is lost): the "
        "service must notice from its heartbeat and sync it again",
        _credential_drift,
    ),
    "rotate_credential": FaultKind(
        ("node", "credential"), (),
        "a user saves the next version of credential on node; every other node must sync, "
        "and new jobs need the new version",
        _rotate_credential,
    ),
    "burst": FaultKind(
        ("count",), (),
        "the service submits count jobs at once (durations drawn like the workload's)",
        _burst,
    ),
    "append_unknown": FaultKind(
        ("duration_s", "probability"), (),
        "an event-store append's outcome is unknown to the host (it may have landed): the host "
        "re-reads the stream before going on",
        _append_unknown,
    ),
}

# Each field's kind of value, by name: what parse_fault checks (and shir.sim.strategies draws).
FIELD_TYPES: dict[str, str] = {
    "node": "str", "peer": "str", "duration_s": "pos", "probability": "prob", "extra_s": "pos",
    "factor": "pos", "key": "key", "version": "str", "fail": "bool", "oneway": "bool",
    "count": "count", "credential": "str",
}


@attrs.frozen
class Fault:
    """One fault at ``at_s`` (simulated seconds). Unused fields keep their defaults."""

    kind: str
    at_s: float
    node: str | None = None
    peer: str | None = None
    duration_s: float = 0.0
    probability: float = 0.0
    extra_s: float = 0.0
    factor: float = 1.0
    key: str | None = None
    version: str | None = None
    fail: bool = False
    oneway: bool = False
    count: int = 0
    credential: str | None = None

    @property
    def end_s(self) -> float:
        """When the fault is over."""
        return self.at_s + self.duration_s

    def describe(self) -> str:
        """A short label for timelines and reports."""
        who = self.node or self.key or "all"
        if self.credential:
            who += f"/{self.credential}"
        extra = f"->{self.peer}" if self.peer else ""
        return f"{self.kind} {who}{extra} @{self.at_s:g}s" + (
            f" for {self.duration_s:g}s" if self.duration_s else ""
        )


def parse_fault(data: Mapping[str, Any], nodes: set[str]) -> Fault:
    """Build a fault from a TOML table; ``ValueError('.key: expected ...')`` on bad input."""
    kind = data.get("kind")
    if kind not in FAULT_KINDS:
        raise ValueError(
            f".kind: unknown fault kind {kind!r}; valid kinds: {', '.join(FAULT_KINDS)}"
        )
    spec = FAULT_KINDS[kind]
    allowed = {"kind", "at_s", *spec.needs, *spec.allows}
    for k in data:
        if k not in allowed:
            raise ValueError(
                f".{k}: not a field of a {kind} fault; it takes {', '.join(sorted(allowed))}"
            )
    for k in spec.needs:
        if k not in data:
            raise ValueError(f".{k}: a {kind} fault needs {k}")
    values: dict[str, Any] = {"kind": kind}
    at = data.get("at_s", 0.0)
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at < 0:
        raise ValueError(f".at_s: expected a time in seconds >= 0, got {at!r}")
    values["at_s"] = float(at)
    for k, v in data.items():
        if k in ("kind", "at_s"):
            continue
        values[k] = _field(kind, k, v, nodes)
    if values.get("peer") is not None and values["peer"] == values.get("node"):
        raise ValueError(f".peer: expected a node other than node ({values['node']!r}): a node "
                         f"cannot be partitioned from itself; leave peer out to cut it off from "
                         f"every other node, got {values['peer']!r}")
    return Fault(**values)


# why: a value that makes the fault change nothing (a crash for 0 s, a drop with probability 0,
# a slow-down by factor 1) would let a scenario pass without the fault it names
_NO_OP: dict[str, tuple[float, str]] = {
    "duration_s": (0.0, "> 0"),
    "probability": (0.0, "0 < p <= 1"),
    "extra_s": (0.0, "> 0"),
    "factor": (1.0, "> 0 and not 1"),
}


def _field(kind: str, k: str, v: Any, nodes: set[str]) -> Any:
    """One checked field of a fault; ``ValueError('.k: expected ...')`` names what is wrong."""
    t = FIELD_TYPES[k]
    if t == "str":
        if not isinstance(v, str):
            raise ValueError(f".{k}: expected a string, got {v!r:.80}")
        if k in ("node", "peer") and v not in nodes:
            raise ValueError(f".{k}: expected one of the nodes {sorted(nodes)}, got {v!r:.80}")
        try:  # why: a value the core refuses makes the fault do nothing, silently
            if k == "credential":
                core_check_credential(v, 1)
            else:
                _core_check_name(k, v)
        except InvalidCommand as exc:
            raise ValueError(f".{k}: expected a value the core accepts ({exc})") from None
    elif t == "key":
        if v not in ("key1", "key2"):
            raise ValueError(f".{k}: expected key1 or key2, got {v!r:.80}")
    elif t == "bool":
        if not isinstance(v, bool):
            raise ValueError(f".{k}: expected true or false, got {v!r:.80}")
    elif t == "count":
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100_000:
            raise ValueError(f".{k}: expected an integer 1..100000, got {v!r:.80}")
    else:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f".{k}: expected a number, got {v!r:.80}")
        no_op, rng = _NO_OP.get(k, (math.nan, ""))
        if v < 0 or (t == "prob" and v > 1) or (k == "factor" and v == 0) or v == no_op:
            rng = rng or ("0..1" if t == "prob" else ">= 0")
            why = f" ({v:g} would make the {kind} fault change nothing)" if v == no_op else ""
            raise ValueError(f".{k}: expected a number {rng}, got {v!r}{why}")
        v = float(v)
    return v


def draw_faults(
    rng: random.Random,
    kinds: tuple[str, ...],
    per_hour: float,
    until_s: float,
    nodes: tuple[str, ...],
    min_duration_s: float,
    max_duration_s: float,
    probability: float,
    credentials: tuple[str, ...] = (),
) -> tuple[Fault, ...]:
    """Faults as a Poisson process of ``per_hour``, every draw from ``rng`` (so from the seed)."""
    out: list[Fault] = []
    if per_hour <= 0 or not kinds or not nodes:
        return ()
    t = 0.0
    while True:
        t += rng.expovariate(per_hour / 3600.0)
        if t >= until_s:
            return tuple(out)
        kind = rng.choice(kinds)
        node = rng.choice(nodes)
        duration = rng.uniform(min_duration_s, max_duration_s)
        f: Fault
        if kind in ("drop", "duplicate"):
            f = Fault(kind, t, duration_s=duration, probability=probability)
        elif kind == "delay":
            f = Fault(kind, t, duration_s=duration, extra_s=rng.uniform(0.05, 2.0))
        elif kind == "reorder":
            f = Fault(kind, t, duration_s=duration, probability=probability,
                      extra_s=rng.uniform(0.05, 2.0))
        elif kind == "partition":
            peers = [n for n in nodes if n != node]
            f = Fault(kind, t, node=node, peer=rng.choice(peers) if peers else None,
                      duration_s=duration, oneway=rng.random() < 0.5)
        elif kind == "control_partition":
            f = Fault(kind, t, node=node, duration_s=duration, oneway=rng.random() < 0.3)
        elif kind in ("clock_skew", "slow"):
            f = Fault(kind, t, node=node, duration_s=duration, factor=rng.uniform(0.5, 1.5))
        elif kind == "clock_jump":
            f = Fault(kind, t, node=node, extra_s=duration)
        elif kind == "regenerate_key":
            f = Fault(kind, t, key=rng.choice(("key1", "key2")))
        elif kind == "version_skew":
            f = Fault(kind, t, node=node, version="5.39", duration_s=duration)
        elif kind == "upgrade":
            # every drawn upgrade targets the same next version, so they roll forward together
            f = Fault(kind, t, node=node, version="5.41",
                      duration_s=min(duration, 60.0),
                      fail=rng.random() < 0.3)
        elif kind in ("credential_drift", "rotate_credential"):
            if not credentials:
                continue  # no workload credential to drift or rotate
            f = Fault(kind, t, node=node, credential=rng.choice(credentials))
        elif kind == "burst":
            f = Fault(kind, t, count=rng.randint(10, 200))
        elif kind == "append_unknown":
            f = Fault(kind, t, duration_s=duration, probability=probability)
        else:
            f = Fault(kind, t, node=node, duration_s=duration)
        out.append(f)
