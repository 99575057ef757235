"""``shir sim ...``: the simulator's commands, mounted on the ``shir`` command line by its
composition root, :mod:`shir.adapters.cli` (which passes the file event store for ``--log`` and
``replay``: this package imports no adapter).

::

    shir sim run SCENARIO [--seed N] [--until DURATION] [--json] [--plot FILE.png] [--log FILE]
    shir sim sweep SCENARIO --seeds N [--workers K | --cluster local[:K] | --cluster ADDRESS]
                   [--until DURATION] [--batch-size B] [--json] [--out FILE.jsonl]
    shir sim replay LOG [--json]
    shir sim list

SCENARIO is a built-in name (``shir sim list``) or the path of a TOML file. DURATION is seconds,
or a number with ``s``, ``m`` or ``h``: ``90``, ``90s``, ``15m``, ``2h``.

Exit codes: 0 every invariant and expectation held; 1 one failed (the seed and the command that
replays it are printed: on stdout, or on stderr with ``--json`` so stdout stays one JSON object);
2 bad input (the message names the file, the key and what was expected). A user's mistake never
prints a traceback; a bug in the simulator does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from shir.core.monitoring import monitoring_view, render, view_to_json
from shir.core.store import EventStore
from shir.sim.report import fault_report, format_report, listed, mark, not_joined
from shir.sim.scenario import (
    LIMITS,
    Scenario,
    ScenarioError,
    builtin_names,
    check_simulated_s,
    load_scenario,
)

__all__ = [
    "EventLogFiles",
    "UsageError",
    "add_commands",
    "check_log",
    "parse_duration",
    "parse_until",
    "replay_command",
]

Handler = Callable[[argparse.Namespace], int]

PLOT_INSTALL_HINT = "pip install 'shir[plot]'"


class UsageError(Exception):
    """Bad input: printed as ``shir sim <command>: error: <message>``, exit code 2."""


class EventLogFiles(Protocol):
    """The event log files ``run --log`` writes and ``replay`` reads; the composition root
    provides them (the file event store). Each method raises :class:`UsageError`, with a message
    naming the file and what to do, when it cannot."""

    def writer(self, log: str, directory: Path) -> AbstractContextManager[EventStore]:
        """The event store of ``directory``, its lock taken on entry (so a folder another
        process holds is refused before a run, not after it); ``log`` is the user's text."""
        ...

    def read(self, log: str, path: Path) -> list[object]:
        """Every record of the log file ``path``, read without a lock or write access."""
        ...


# -- small helpers ----------------------------------------------------------------------------

_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", re.IGNORECASE)
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``2h`` (or ``1.5h``); ``ValueError`` otherwise."""
    m = _DURATION.fullmatch(text)
    seconds = float(m.group(1)) * _UNIT_S[m.group(2).lower()] if m else math.nan
    if not (m and math.isfinite(seconds) and seconds > 0):
        raise ValueError(
            f"invalid duration {text!r}: expected a positive number of seconds, or a number "
            "with a unit s, m or h (90, 90s, 15m, 2h)"
        )
    return seconds


def _duration_arg(text: str) -> str:
    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _seed_arg(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if seed < 0:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected an integer >= 0")
    return seed


# A sweep lists its seeds and keeps a record per seed: 10^11 seeds took 2.6 GB in 8 s, while
# a million runs of the shortest built-in already take hours on one machine.
MAX_SEEDS = 1_000_000


def _positive_int(what: str, most: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1 or (most is not None and n > most):
            bound = f" and <= {most:,}" if most is not None else ""
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text!r}: expected an integer >= 1{bound}")
        return n

    return parse


def replay_command(scenario_arg: str, seed: int, until: str | None) -> str:
    """The command that runs ``scenario_arg`` with ``seed`` again, as a user types it."""
    parts = ["shir", "sim", "run", scenario_arg, "--seed", str(seed)]
    if until is not None:
        parts += ["--until", until]
    return shlex.join(parts)


def _load(scenario_arg: str) -> Scenario:
    try:
        return load_scenario(scenario_arg)
    except ScenarioError as exc:
        raise UsageError(str(exc)) from None


def parse_until(args: argparse.Namespace, scenario: Scenario | None = None) -> float | None:
    """``--until`` in seconds (None if not given), refused past the limits; with ``scenario``,
    its drain and heartbeats count too. A bad value raises :class:`UsageError`."""
    if args.until is None:
        return None
    until_s = parse_duration(args.until)
    limit = LIMITS["simulated_s"]
    if until_s > limit:
        raise UsageError(f"--until {args.until}: expected at most {limit:g} s (the limit: 7 days)")
    if scenario is not None:
        try:
            check_simulated_s(until_s, scenario.drain_s, f"--until {args.until} with the drain",
                              scenario.settings.heartbeat_interval_s, len(scenario.nodes))
        except ScenarioError as exc:
            raise UsageError(str(exc)) from None
    return until_s


# -- sim run ----------------------------------------------------------------------------------


def _check_plot_available() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--plot needs matplotlib, an optional extra: {PLOT_INSTALL_HINT}")


def _log_target(path_text: str) -> tuple[Path, str]:
    """The directory and stream of a ``--log`` file ``<dir>/<stream>.events``."""
    from shir.core.store import InvalidStreamName, check_stream_name

    path = Path(path_text)
    if path.suffix != ".events":
        raise UsageError(
            f"--log {path_text}: expected a file name ending in .events (the event store keeps "
            "a stream in <dir>/<stream>.events), e.g. --log run.events"
        )
    try:
        stream = check_stream_name(path.stem)
    except InvalidStreamName as exc:
        raise UsageError(f"--log {path_text}: {exc}") from None
    if path.exists():
        raise UsageError(
            f"--log {path_text}: the file exists; an event log is never overwritten: remove it "
            "or choose another name"
        )
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"--log {path_text}: {parent} is not a directory")
    return parent, stream


def _check_plot_target(plot: str, log: str | None) -> None:
    if Path(plot).suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: expected a file name ending in .png (it writes a PNG "
                         "image), e.g. --plot run.png")
    if log is not None and Path(plot).resolve() == Path(log).resolve():
        raise UsageError(f"--plot {plot}: the same file as --log; choose another name")
    folder = Path(plot).parent
    if not folder.is_dir():  # why: found only after the run, its results would be lost
        raise UsageError(f"--plot {plot}: folder {folder} does not exist; create it first")


def _plot(result: Any, path: str) -> None:
    try:
        from shir.sim.plot import plot_timeline
    except ImportError as exc:
        raise UsageError(f"--plot: plotting is not available ({exc})") from None
    try:
        plot_timeline(result, path)
    except ImportError:
        raise UsageError(f"--plot needs matplotlib, an optional extra: {PLOT_INSTALL_HINT}") \
            from None
    except OSError as exc:
        raise UsageError(f"--plot {path}: {exc.strerror or exc}") from None


def _cmd_run(args: argparse.Namespace, logs: EventLogFiles) -> int:
    from shir.sim.world import run

    if args.plot is not None:
        _check_plot_target(args.plot, args.log)
        _check_plot_available()
    log_target = _log_target(args.log) if args.log is not None else None
    scenario = _load(args.scenario)
    until_s = parse_until(args, scenario)
    # why: open the store (and take its lock) before the run, so a folder another process
    # holds is refused at once instead of after the whole run, whose results would be lost
    opened: AbstractContextManager[EventStore | None] = (
        logs.writer(args.log, log_target[0]) if log_target is not None
        else contextlib.nullcontext())
    with opened as store:
        result = run(scenario, seed=args.seed, until_s=until_s)
        if store is not None and log_target is not None:
            try:
                store.append(log_target[1], result.log, 0)
            except OSError as exc:
                raise UsageError(f"--log {args.log}: {exc.strerror or exc}") from None
    if args.plot is not None:
        _plot(result, args.plot)
    if args.json:
        print(json.dumps({**result.to_json(), "faults": fault_report(result, scenario),
                          "nodes_not_joined": not_joined(result, scenario)}, indent=2))
    else:
        print(format_report(result, scenario, sys.stdout))
        if args.log is not None:
            print(f"event log     {args.log} ({result.events:,} events; shir sim replay "
                  f"{shlex.quote(args.log)})")
        if args.plot is not None:
            print(f"plot          {args.plot}")
    if result.ok:
        return 0
    again = replay_command(args.scenario, result.seed, args.until)
    print(f"seed {result.seed} failed; replay it with:\n  {again}",
          file=sys.stderr if args.json else sys.stdout)
    return 1


# -- sim sweep --------------------------------------------------------------------------------


def _cmd_sweep(args: argparse.Namespace) -> int:
    from shir.sim.sweep import SweepError, cmd_sweep

    try:
        return cmd_sweep(args)
    except SweepError as exc:
        raise UsageError(str(exc)) from None


# -- sim replay -------------------------------------------------------------------------------


def _read_log(path_text: str, logs: EventLogFiles) -> list[object]:
    from shir.core.store import InvalidStreamName, check_stream_name

    path = Path(path_text)
    if path.suffix != ".events":
        raise UsageError(f"{path_text}: expected an event log file ending in .events "
                         "(written by shir sim run --log FILE.events)")
    if not path.is_file():
        raise UsageError(f"{path_text}: no such file")
    try:
        check_stream_name(path.stem)
    except InvalidStreamName as exc:
        raise UsageError(f"{path_text}: {exc}") from None
    events = logs.read(path_text, path)
    if not events:
        raise UsageError(f"{path_text}: the log holds no events")
    return events


def check_log(events: Sequence[object]) -> tuple[Any, list[str], dict[str, int]]:
    """Fold a recorded log and run the stream checkers of :mod:`shir.sim.invariants` over it.

    Returns the final state, the violations, and the job counters seen in the log. Who presented
    which key generation is not in the log, so that one membership check is skipped. The replay
    check takes a snapshot (as bytes) midway and folds the tail onto it. A log that does not
    fold record by record raises :class:`UsageError` naming the first record that does not
    follow; time going backwards is reported as a violation.
    """
    backwards = _check_folds(events)
    try:
        state, violations, counters = _check_log(events)
    except Exception as exc:  # any fold error on a log is damage
        raise UsageError(
            f"the event log does not fold as one whole stream ({type(exc).__name__}); it is "
            "damaged or assembled from pieces"
        ) from None
    return state, backwards + violations, counters


def _check_folds(events: Sequence[object]) -> list[str]:
    """Fold record by record, naming the first that does not follow; report time going back."""
    from shir.core.events import RuntimeCreated
    from shir.core.state import evolve, initial

    if type(events[0]) is not RuntimeCreated:  # a whole stream begins by creating its runtime
        raise UsageError(
            f"the event log is damaged: record #1 is {type(events[0]).__name__}, not "
            "RuntimeCreated; the log is not one whole stream (its start is missing): use the "
            "complete log"
        )
    state = initial()
    last_at: float | None = None
    backwards: list[str] = []
    for number, e in enumerate(events, 1):
        at = getattr(e, "at", None)
        if isinstance(at, (int, float)) and last_at is not None and at < last_at:
            backwards.append(f"time went backwards at record #{number} ({type(e).__name__}): "
                             f"t={at:g} s after t={last_at:g} s")
        if isinstance(at, (int, float)):
            last_at = at if last_at is None else max(last_at, at)
        if number > 1 and type(e) is RuntimeCreated:
            raise UsageError(
                f"the event log is damaged: record #{number} creates the runtime again; the log "
                "is not one whole stream (another run was appended to it): use one run's log"
            )
        try:
            state = evolve(state, e)
        except Exception as exc:  # a refused record is damage, not a bug
            raise UsageError(
                f"the event log is damaged: record #{number} ({type(e).__name__}) does not follow "
                f"from the {number - 1} before it ({type(exc).__name__}); the log is not one "
                "whole stream (cut, reordered, or mixed with another run): use the complete log"
            ) from None
    return backwards


def _check_log(events: Sequence[object]) -> tuple[Any, list[str], dict[str, int]]:
    from shir.core import jobs
    from shir.core.snapshot import snapshot_bytes
    from shir.core.state import fold, initial
    from shir.sim.invariants import Checkers, check_snapshot

    clock = [0.0]
    checkers = Checkers(lambda: clock[0], lambda _node: None)
    half = len(events) // 2
    snapshot = snapshot_bytes(fold(initial(), events[:half]))
    submitted: dict[str, None] = {}
    for e in events:
        clock[0] = getattr(e, "at", clock[0])
        if type(e) is jobs.JobSubmitted:
            submitted[e.idempotency_key] = None
        checkers.on_events((e,))
    state = fold(initial(), events)
    violations = list(checkers.violations)
    violations += check_snapshot(snapshot, events[half:], state)
    book = state.jobs
    active = set(book.active_keys)
    lost = [k for k in submitted if k not in checkers.completed_keys and k not in active
            and k not in checkers.dead_keys]
    if lost:
        violations.append(f"lost: {len(lost)} jobs vanished, e.g. {lost[:3]}")
    counters = {
        "submitted": len(submitted),
        "completed": len(checkers.completed_keys),
        "dead_lettered": book.dead_lettered,
        "queued": book.queued(),
        "running": len(book.leases),
        "lost": len(lost),
        "duplicate_effects": checkers.duplicate_effects,
    }
    return state, violations, counters


def _cmd_replay(args: argparse.Namespace, logs: EventLogFiles) -> int:
    events = _read_log(args.log, logs)
    try:
        state, violations, counters = check_log(events)
    except UsageError as exc:
        raise UsageError(f"{args.log}: {exc}") from None
    rt = state.runtime
    nodes = {n.name: {"status": n.status.value, "reasons": list(n.reasons)} for n in state.nodes}
    last_at = max((getattr(e, "at", 0.0) for e in events), default=0.0)
    if args.json:
        print(json.dumps({
            "log": args.log,
            "events": len(events),
            "last_event_at_s": round(last_at, 3),
            "runtime": rt.name if rt else None,
            "status": state.status.value,
            "nodes": nodes,
            "term": state.term,
            "dispatcher": state.dispatcher,
            "jobs": counters,
            "invariant_violations": violations,
            "monitoring": None if rt is None else view_to_json(monitoring_view(state)),
            "ok": not violations,
        }, indent=2))
    else:
        out = sys.stdout
        print(f"log           {args.log}: {len(events):,} events up to t={last_at:,.1f} s")
        print(f"runtime       {rt.name if rt else '(not created)'}, status {state.status.value}")
        print("nodes")
        for name, n in nodes.items():
            why = f" ({'; '.join(n['reasons'])})" if n["reasons"] else ""
            print(f"  {name:12}  {n['status']}{why}")
        print(f"term          {state.term}, dispatcher {state.dispatcher or 'none'}")
        if rt is not None:  # the monitoring view of the recorded runtime (shir.core.monitoring)
            print("monitoring")
            print("\n".join("  " + line for line in render(monitoring_view(state)).splitlines()))
        c = counters
        print(f"jobs          {c['submitted']:,} submitted, {c['completed']:,} completed, "
              f"{c['dead_lettered']} dead-lettered, {c['queued']} queued, {c['running']} "
              f"running, {c['lost']} lost, {c['duplicate_effects']} duplicate effects")
        if violations:
            print(f"invariants    {len(violations)} violated")
            print("\n".join(listed(violations, f"{mark(False, out)} ")))
        else:
            print("invariants    all held (terms, leases, capacity, effects, membership, replay, "
                  "lost)")
    return 1 if violations else 0


# -- sim list ---------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    names = builtin_names()
    width = max(map(len, names), default=0)
    # on a terminal, one screen line per scenario; piped, the whole description
    columns = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    for name in names:
        try:
            description = load_scenario(name).description
        except ScenarioError as exc:  # a broken built-in is a bug, but keep listing the rest
            description = f"(cannot load: {exc})"
        line = f"{name:{width}}  {description}"
        if columns > width + 10 and len(line) > columns - 1:
            line = line[: columns - 4] + "..."
        print(line)
    return 0


# -- the parser -------------------------------------------------------------------------------


def _guarded(command: str, handler: Handler) -> Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except UsageError as exc:
            print(f"shir sim {command}: error: {exc}", file=sys.stderr)
            return 2

    return run


def add_commands(subparsers: Any, logs: EventLogFiles) -> None:
    """Add ``sim run|sweep|replay|list`` to an ``add_subparsers()`` result.

    Every leaf parser sets ``handler``: ``args.handler(args)`` runs the command and returns its
    exit code, having printed a user's mistake as ``shir sim <command>: error: ...`` (exit 2).
    ``logs`` are the event log files of ``run --log`` and ``replay``. ``list`` also sets
    ``reader_may_leave``: its output read in part (``| head``) is still a success.
    """
    sim = subparsers.add_parser(
        "sim", help="run fault-injection simulations",
        description="Run a simulated runtime through faults, check its invariants and the "
                    "scenario's expectations.",
    )
    cmds = sim.add_subparsers(dest="sim_command", metavar="COMMAND")
    cmds.required = True
    scenario_help = "a built-in scenario name (shir sim list) or the path of a TOML file"
    until_help = ("simulated time with workload and faults instead of the scenario's duration_s "
                  "(90, 90s, 15m, 2h); the drain phase follows")

    run = cmds.add_parser(
        "run", help="run one scenario",
        description="Run one scenario. Exit 0 when every invariant and expectation holds, 1 when "
                    "one fails (with the command that replays it), 2 for bad input.",
    )
    run.add_argument("scenario", metavar="SCENARIO", help=scenario_help)
    run.add_argument("--seed", type=_seed_arg, help="the seed (default: the scenario's)")
    run.add_argument("--until", type=_duration_arg, metavar="DURATION", help=until_help)
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--plot", metavar="FILE.png",
                     help=f"draw the timeline to FILE.png (needs {PLOT_INSTALL_HINT})")
    run.add_argument("--log", metavar="FILE.events",
                     help="write the event log to FILE.events (read it with shir sim replay)")
    run.set_defaults(handler=_guarded("run", lambda args: _cmd_run(args, logs)))

    sweep = cmds.add_parser(
        "sweep", help="run one scenario with many seeds in parallel",
        description="Run seeds S..S+N-1 (S: the scenario's seed) in batches on local worker "
                    "processes or a Dask cluster, and report each metric's distribution over the "
                    "seeds. A batch whose worker died runs again. Exit 1 if any run failed; each "
                    "failing seed is printed with its replay command.",
    )
    sweep.add_argument("scenario", metavar="SCENARIO", help=scenario_help)
    sweep.add_argument("--seeds", type=_positive_int("number of seeds", MAX_SEEDS), required=True,
                       metavar="N", help="how many seeds to run")
    sweep.add_argument("--workers", type=_positive_int("number of workers"), metavar="K",
                       help="parallel processes, 1-64 (default: the number of CPUs)")
    sweep.add_argument("--cluster", metavar="ADDRESS",
                       help="run on Dask distributed (pip install 'shir[dask]'): local or "
                            "local:WORKERS for a loopback LocalCluster, or a scheduler address "
                            "such as tcp://10.0.0.5:8786")
    sweep.add_argument("--until", type=_duration_arg, metavar="DURATION", help=until_help)
    sweep.add_argument("--batch-size", type=_positive_int("batch size"), metavar="B",
                       help="seeds per task (default: about 1 s of runs, fewer at start and end)")
    sweep.add_argument("--json", action="store_true",
                       help="print one JSON object (with each seed's hash and metrics)")
    sweep.add_argument("--out", metavar="FILE.jsonl",
                       help="write one JSON line per seed (hash, metrics, failures) to FILE.jsonl")
    sweep.set_defaults(handler=_guarded("sweep", _cmd_sweep))

    replay = cmds.add_parser(
        "replay", help="rebuild state from an event log and check the invariants",
        description="Fold a recorded event log (shir sim run --log FILE.events), re-run the "
                    "stream checkers over it and print a summary. Exit 1 on a violation, 2 when "
                    "the log cannot be read.",
    )
    replay.add_argument("log", metavar="LOG", help="the FILE.events written by --log")
    replay.add_argument("--json", action="store_true", help="print one JSON object")
    replay.set_defaults(handler=_guarded("replay", lambda args: _cmd_replay(args, logs)))

    lst = cmds.add_parser("list", help="list the built-in scenarios",
                          description="The built-in scenarios, one a line.")
    lst.set_defaults(handler=_guarded("list", _cmd_list), reader_may_leave=True)
