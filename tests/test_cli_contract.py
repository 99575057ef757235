"""Issue 17: the CLI's contract, as a property over generated bad input.

Hypothesis writes scenario documents (mostly valid, with some fields swapped for junk, unknown
keys, damaged text) and damaged event logs (records dropped, swapped, repeated, moved in time,
mixed with another run; bytes flipped, cut or appended), and drives ``shir sim run`` and
``shir sim replay`` through the command line's ``main()`` in-process. Whatever it writes:

- the exit code is 0, 1 or 2, and agrees with the report (0 PASS / all held, 1 FAIL / violated);
- exit 2 prints one ``shir sim <command>: error:`` message that names the input, and nothing on
  stdout;
- nothing raises (an exception out of ``main()`` is what a user would see as a traceback), and
  no output holds a traceback;
- every input is answered in bounded time.

Under the CI profile (``SHIR_HYPOTHESIS_PROFILE=shir-ci``) each property tries ``CI_EXAMPLES``
fresh inputs; ``test_the_real_entry_point_prints_no_traceback`` runs the installed ``shir`` in a
subprocess on a few of them, to show the same holds where a user sees it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shir.adapters.cli import main
from shir.adapters.filestore import FileEventStore
from shir.sim.faults import FAULT_KINDS
from shir.sim.scenario import parse_scenario
from shir.sim.testing import profile
from shir.sim.world import run

CI_EXAMPLES = 500  # per property, under the CI profile
QUICK_EXAMPLES = 40
BOUND_S = 10.0  # the longest any one input may take to be answered (runs are seconds long)
# how many inputs each property tried, for the report (printed by the last test)
TRIED: dict[str, int] = {"scenario documents": 0, "of which ran": 0, "damaged logs": 0}


def _settings() -> settings:
    base = profile()
    examples = CI_EXAMPLES if base.max_examples >= 1000 else QUICK_EXAMPLES
    return settings(base, max_examples=examples)


def shir(*argv: str) -> tuple[int, str, str, float]:
    """Run ``shir argv`` in-process: exit code, stdout, stderr, seconds taken."""
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - started


def holds_contract(command: str, code: int, out: str, err: str, seconds: float,
                   names: tuple[str, ...]) -> None:
    assert code in (0, 1, 2), (code, out, err)
    assert "Traceback" not in out + err
    assert seconds < BOUND_S, f"{seconds:.1f} s"
    if code == 2:
        assert out == "", out
        assert err.startswith(f"shir sim {command}: error: ") or err.startswith("usage: "), err
        assert any(n in err for n in names), err
    elif out.startswith("{"):  # --json: one object on stdout, whose verdict is the code's
        assert json.loads(out)["ok"] == (code == 0), out
    elif command == "run":
        assert ("result        PASS" if code == 0 else "result        FAIL") in out, out
    else:
        assert ("all held" in out) == (code == 0), out


# --- scenario documents ----------------------------------------------------------------------

JUNK = st.one_of(
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([1e-6, 0.05, 1e12, 2**63, 1e308, math.nan, math.inf, -math.inf, -0.5,
                     604_800, 250_001, 129, 257]),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
    st.lists(st.integers(0, 3), max_size=2),
    st.just({"x": 1}),
)


def field(valid: st.SearchStrategy[Any], *edges: Any) -> st.SearchStrategy[Any]:
    """Mostly ``valid``; one time in 32 an edge value (one the loader must refuse, or take),
    one time in 32 junk of any type."""
    def pick(k: int) -> st.SearchStrategy[Any]:  # valid is the simplest, so shrinks keep it
        if k == 31:
            return JUNK
        if k == 30 and edges:
            return st.sampled_from(edges)
        return valid
    return st.integers(0, 31).flatmap(pick)


@st.composite
def table(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]],
          required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Some of ``fields`` (``required`` ones nearly always), perhaps with an unknown key."""
    out = {k: draw(s) for k, s in fields.items()
           if (k in required and draw(st.integers(0, 31)) < 31) or draw(st.booleans())}
    if draw(st.integers(0, 31)) == 31:
        out[draw(st.sampled_from(("extra", "Name", "at", "node_name")))] = draw(JUNK)
    return out


NODE = field(st.just("n1") | st.just("n2"), "n9", "", " ")
EARLY = field(st.integers(0, 9), 40, -1)  # before the workload ends (duration_s >= 10)
SPAN = field(st.integers(1, 9), 0)

FAULT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "node": NODE, "peer": NODE, "duration_s": SPAN,
    "probability": field(st.sampled_from((0.3, 1)), 0, 2), "extra_s": field(st.just(0.5), 0),
    "factor": field(st.sampled_from((0.5, 2)), 1, 0), "key": field(st.just("key2"), "key9"),
    "version": field(st.just("5.41"), "", " ", "\x01"), "fail": field(st.booleans()),
    "oneway": field(st.booleans()), "count": field(st.integers(1, 5), 0),
    "credential": field(st.just("sql"), " x", "other"),
}


@st.composite
def fault(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(field(st.sampled_from(sorted(FAULT_KINDS)), "meteor"))
    spec = FAULT_KINDS.get(kind) if isinstance(kind, str) else None
    names = (*spec.needs, *spec.allows) if spec else ("node", "duration_s")
    fields = {"at_s": EARLY, **{n: FAULT_FIELDS[n] for n in names}}
    return {"kind": kind, **draw(table(fields, spec.needs if spec else ()))}


EXPECT = st.sampled_from(({"kind": "dispatcher", "node": "n1"},
                          {"kind": "status", "node": "n2", "status": "Online"},
                          {"kind": "metric", "metric": "jobs.lost", "max": 0}))

DOCUMENT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "name": field(st.text("abc-", min_size=1, max_size=6), "", " ", "a\tb"),
    "description": field(st.text(st.characters(exclude_categories=("Cs",)), max_size=10)),
    "seed": field(st.integers(0, 9), -1),
    "duration_s": field(st.integers(10, 30), 0, 1e12),
    "drain_s": field(st.integers(0, 10), 1e12),
    "settings": table({
        "heartbeat_interval_s": field(st.sampled_from((2, 5, 10)), 1e-6),
        "missed_heartbeats_offline": field(st.integers(1, 4), 0),
        "lock_duration_s": field(st.sampled_from((20, 60)), 0),
        "max_deliveries": field(st.integers(1, 5), 0), "max_nodes": field(st.integers(1, 4), 9),
        "offline_expiry_s": field(st.sampled_from((30, 600)), 0),
    }),
    "nodes": st.integers(1, 3).flatmap(lambda n: st.tuples(*(table({
        "name": field(st.just(f"n{i + 1}"), "n1", "", " ", "n" * 129), "cores": field(
            st.integers(1, 8), 0), "memory_mb": field(st.just(4096), 0),
        "version": field(st.sampled_from(("5.40", "5.41")), ""), "join_at_s": EARLY,
        "key": field(st.sampled_from(("key1", "key2")), "key3"),
        "concurrency_limit": field(st.integers(1, 4), 0, 257),
        "speed": field(st.sampled_from((0.5, 1)), 0), "remote_access": field(st.booleans()),
    }, ("name",)) for i in range(n))).map(list)),
    "workload": table({
        "rate_per_s": field(st.sampled_from((0, 0.5, 2)), 1e9),
        "duration": field(table({"kind": field(st.just("fixed"), "x"),
                                 "mean_s": field(st.integers(1, 5))}),
                          {"kind": "uniform", "min_s": 3, "max_s": 1},
                          {"kind": "exponential", "min_s": 3}),
        "start_at_s": EARLY, "stop_at_s": field(st.integers(10, 20), 0),
        "needs": field(st.just([{"credential": "sql"}]), [{"credential": "a b"}],
                       [{"credential": "sql"}, {"credential": "sql", "version": 2}]),
        "duplicate_submit_p": field(st.sampled_from((0, 0.2)), 2),
    }),
    "network": table({"latency_s": field(st.sampled_from((0.001, 0.05))),
                      "jitter_s": field(st.sampled_from((0, 0.01)))}),
    "faults": st.lists(fault(), max_size=3),
    "random_faults": field(st.just({}), {"kinds": ["crash"]}, {"per_hour": 60}).flatmap(
        lambda base: st.just(base) if base else table({
            "per_hour": field(st.sampled_from((60, 600)), 0, 1e9),
            "kinds": field(st.lists(st.sampled_from(("crash", "drop", "partition")),
                                    min_size=1, max_size=2), ["credential_drift"], ["x"]),
            "min_duration_s": st.just(1), "max_duration_s": field(st.integers(1, 20), 0),
        }, ("per_hour", "kinds"))),
    "expect": st.lists(field(st.tuples(EXPECT, st.integers(0, 9)).map(
        lambda e: {**e[0], **({"at_s": e[1]} if e[0]["kind"] != "metric" else {})}),
        {"kind": "metric", "metric": "refusals.StaleLeese", "max": 0},
        {"kind": "metric", "metric": "failovers", "max": 0, "status": "Online"},
        {"kind": "status", "node": "n1", "status": "Gone", "at_s": 1},
        {"kind": "dispatcher", "node": "n1", "at_s": 1e9}), max_size=2),
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON's escapes are TOML's basic-string ones
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return str(v)


def to_toml(doc: dict[str, Any]) -> str:
    """The document as TOML: scalars (and junk in a table's place) first, then the tables."""
    tables = {k: v for k, v in doc.items()
              if (isinstance(v, dict) and k in ("settings", "workload", "network", "random_faults"))
              or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if k not in tables]
    for k, v in tables.items():
        for t in v if isinstance(v, list) else [v]:
            lines.append(f"[[{k}]]" if isinstance(v, list) else f"[{k}]")
            lines += [f"{f} = {toml_value(x)}" for f, x in t.items()]
    return "\n".join(lines) + "\n"


DAMAGE: dict[str, Callable[[bytes, int, bytes], bytes]] = {
    "cut": lambda b, i, _x: b[: i % (len(b) + 1)],
    "insert": lambda b, i, x: b[: i % (len(b) + 1)] + x + b[i % (len(b) + 1):],
    "flip": lambda b, i, _x: b[: i % len(b)] + bytes([b[i % len(b)] ^ 0x80]) + b[i % len(b) + 1:]
    if b else b,
    "utf-16": lambda b, _i, _x: b.decode().encode("utf-16"),
}


@st.composite
def scenario_files(draw: st.DrawFn) -> bytes:
    doc = draw(table(DOCUMENT_FIELDS, ("nodes", "duration_s", "drain_s")))  # short runs
    text = to_toml(doc).encode()
    if draw(st.integers(0, 9)) == 9:  # one in ten: damaged text
        how = draw(st.sampled_from(sorted(DAMAGE)))
        text = DAMAGE[how](text, draw(st.integers(0, 10_000)), draw(st.binary(max_size=4)))
    return text


RUN_OPTIONS = st.lists(st.integers(0, 7).flatmap(lambda k: st.sampled_from(
    (("--seed", "-1"), ("--until", "0"), ("--until", "2h"), ("--until", "1000000h"),
     ("--until", "x")) if k == 7 else
    (("--json",), ("--seed", "3"), ("--until", "15"), ("--until", "1m")))),
    max_size=2, unique=True)


@_settings()
@given(text=scenario_files(), options=RUN_OPTIONS, log=st.booleans())
def test_any_scenario_document_gets_an_answer_of_the_contract(
    text: bytes, options: list[tuple[str, ...]], log: bool
) -> None:
    TRIED["scenario documents"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.toml"
        path.write_bytes(text)
        argv = ["sim", "run", str(path), *(x for o in options for x in o)]
        events = Path(tmp) / "run.events"
        if log and "--json" not in argv:
            argv += ["--log", str(events)]
        code, out, err, seconds = shir(*argv)
        holds_contract("run", code, out, err, seconds, (str(path), "--until", "--seed"))
        TRIED["of which ran"] += code in (0, 1)
        if code in (0, 1) and events.exists():  # the log of a run replays to the same verdict
            again = shir("sim", "replay", str(events))
            holds_contract("replay", *again, (str(events),))
            assert again[0] == 0 or code == 1


# --- damaged logs ----------------------------------------------------------------------------

BASE = """duration_s = 20
drain_s = 5
[[nodes]]
name = "n1"
remote_access = true
[[nodes]]
name = "n2"
join_at_s = 1
[workload]
rate_per_s = 1
duration = { kind = "fixed", mean_s = 3 }
[[faults]]
kind = "crash"
node = "n1"
at_s = 8
duration_s = 5
"""


@functools.cache
def logs() -> tuple[tuple[object, ...], tuple[object, ...]]:
    """Two whole runs' logs: the one to damage, and another to mix into it."""
    import tomllib

    scenario = parse_scenario(tomllib.loads(BASE))
    return tuple(run(scenario, seed=1).log), tuple(run(scenario, seed=2).log)


def _at(e: object, t: float) -> object:
    return attrs.evolve(e, at=t) if hasattr(e, "at") else e  # type: ignore[misc]


RECORD_OPS: dict[str, Callable[[list[object], int, int, tuple[object, ...]], list[object]]] = {
    "drop": lambda e, i, _j, _o: e[:i] + e[i + 1:],
    "swap": lambda e, i, j, _o: [e[j] if k == i else e[i] if k == j else x
                                 for k, x in enumerate(e)],
    "repeat": lambda e, i, _j, _o: e[: i + 1] + e[i:],
    "earlier": lambda e, i, j, _o: [*e[:i], _at(e[i], float(j % 30)), *e[i + 1:]],
    "head": lambda e, i, _j, _o: e[:i],
    "tail": lambda e, i, _j, _o: e[i:],
    "splice": lambda e, i, j, o: e[:i] + list(o[j % len(o):]),
    "append": lambda e, _i, _j, o: e + list(o),
}


@st.composite
def damaged_logs(draw: st.DrawFn) -> tuple[list[object], list[tuple[str, int, bytes]]]:
    records, _ = logs()
    n = len(records)
    ops = draw(st.lists(st.tuples(st.sampled_from(sorted(RECORD_OPS)), st.integers(0, n - 1),
                                  st.integers(0, n - 1)), max_size=3))
    events = list(records)
    other = logs()[1]
    for name, i, j in ops:
        if events:
            events = RECORD_OPS[name](events, i % len(events), j % len(events), other)
    byte_ops = draw(st.lists(st.tuples(st.sampled_from(("cut", "insert", "flip")),
                                       st.integers(0, 50_000), st.binary(min_size=1, max_size=9)),
                             max_size=2))
    return events, byte_ops


@_settings()
@given(damage=damaged_logs(), as_json=st.booleans())
def test_any_damaged_log_gets_an_answer_of_the_contract(
    damage: tuple[list[object], list[tuple[str, int, bytes]]], as_json: bool
) -> None:
    TRIED["damaged logs"] += 1
    events, byte_ops = damage
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.events"
        if events:
            with FileEventStore(tmp, fsync=False) as store:
                store.append("run", events, 0)
        else:
            path.write_bytes(b"")
        data = path.read_bytes()
        for how, at, extra in byte_ops:
            data = DAMAGE[how](data, at, extra)
        path.write_bytes(data)
        code, out, err, seconds = shir("sim", "replay", str(path), *(["--json"] * as_json))
    holds_contract("replay", code, out, err, seconds, (str(path),))
    if events == list(logs()[0]) and not byte_ops:
        assert code == 0, err  # the whole log, undamaged, holds: the property can fail


# --- where a user sees it --------------------------------------------------------------------

def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("shir")
    return [str(script)] if script.exists() else [sys.executable, "-m", "shir.adapters.cli"]


@pytest.mark.parametrize("case", ["not-utf8", "self-partition", "bit-flipped-log", "cut-log"])
def test_the_real_entry_point_prints_no_traceback(tmp_path: Path, case: str) -> None:
    if case in ("not-utf8", "self-partition"):
        path = tmp_path / "s.toml"
        path.write_bytes(BASE.encode("utf-16") if case == "not-utf8" else (
            BASE + '[[faults]]\nkind = "partition"\nnode = "n1"\npeer = "n1"\nduration_s = 2\n'
        ).encode())
        argv = ["sim", "run", str(path)]
    else:
        path = tmp_path / "run.events"
        with FileEventStore(tmp_path, fsync=False) as store:
            store.append("run", list(logs()[0]), 0)
        data = path.read_bytes()
        path.write_bytes(DAMAGE["flip"](data, len(data) // 2, b"") if case == "bit-flipped-log"
                         else data[: len(data) // 2])
        argv = ["sim", "replay", str(path)]
    done = subprocess.run([*_entry_point(), *argv], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert str(path) in done.stderr


def test_how_many_inputs_the_properties_tried(capsys: pytest.CaptureFixture[str]) -> None:
    """Says how many inputs the two properties above tried (run after them, as pytest does)."""
    with capsys.disabled():
        print(f"\n[cli contract] inputs tried: {TRIED}")
    if TRIED["scenario documents"] and TRIED["damaged logs"]:  # not when run alone
        examples = _settings().max_examples
        assert TRIED["scenario documents"] >= examples and TRIED["damaged logs"] >= examples
        # honest only if the documents are not all refused: a good share must run
        assert TRIED["of which ran"] >= TRIED["scenario documents"] // 10, TRIED
