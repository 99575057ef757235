"""``shir``: the command line. ``shir sim ...`` runs the simulator; ``shir credentials ...`` is
mounted from :mod:`shir.adapters.credentials_cli`.

::

    shir sim run SCENARIO [--seed N] [--until DURATION] [--json] [--plot FILE.png] [--log FILE]
    shir sim sweep SCENARIO --seeds N [--workers K] [--until DURATION] [--json]
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
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, TextIO

from shir.sim.scenario import Scenario, ScenarioError, builtin_names, load_scenario

__all__ = ["main", "parse_duration"]

Handler = Callable[[argparse.Namespace], int]

PLOT_INSTALL_HINT = "pip install 'shir[plot]'"
_MAX_LISTED = 20  # violations shown in a human report; --json has them all


class UsageError(Exception):
    """Bad input: printed as ``shir <command>: error: <message>``, exit code 2."""


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


def _positive_int(what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: expected an integer >= 1")
        return n

    return parse


def _mark(ok: bool, stream: TextIO) -> str:
    """A check mark, or plain words when the terminal's encoding has no such glyphs."""
    glyph = "✓" if ok else "✗"
    try:
        glyph.encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "ok  " if ok else "FAIL"
    return glyph


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


def _until_s(args: argparse.Namespace) -> float | None:
    return None if args.until is None else parse_duration(args.until)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:,.0f} s"


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


def _write_log(directory: Path, stream: str, events: Sequence[object]) -> None:
    from shir.adapters.filestore import FileEventStore

    with FileEventStore(directory) as store:
        store.append(stream, events, 0)


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


def format_report(result: Any, scenario: Scenario, out: TextIO) -> str:
    """The human report of one run."""
    j = result.jobs
    speed = result.simulated_s / result.wall_s if result.wall_s > 0 else math.inf
    lines = [f"scenario      {scenario.name}"]
    if scenario.description:
        lines += textwrap.wrap(scenario.description, 100, initial_indent=" " * 14,
                               subsequent_indent=" " * 14)
    lines += [
        f"seed          {result.seed}",
        f"time          {_fmt_s(result.simulated_s)} simulated in {result.wall_s:.2f} s wall "
        f"({speed:,.0f}x real time)",
        f"events        {result.events:,}, sha256 {result.event_log_sha256}",
        f"jobs          {j['submitted']:,} submitted, {j['completed']:,} completed, "
        f"{j['dead_lettered']} dead-lettered, {j.get('unfinished', 0)} unfinished, "
        f"{j['lost']} lost, {j['duplicate_effects']} duplicate effects",
        f"failovers     {result.failovers}",
        f"max gaps      dispatcher {result.max_dispatcher_gap_s:.1f} s, "
        f"offline detection {result.max_offline_detect_s:.1f} s",
        "refusals      " + (", ".join(f"{k} {v}" for k, v in result.refusals.items()) or "none"),
    ]
    exp = result.expectations
    if exp["passed"] or exp["failed"]:
        lines.append(f"expectations  {len(exp['passed'])} passed, {len(exp['failed'])} failed")
        lines += [f"  {_mark(True, out)} {e}" for e in exp["passed"]]
        lines += [f"  {_mark(False, out)} {e}" for e in exp["failed"]]
    else:
        lines.append("expectations  none in this scenario")
    v = result.invariant_violations
    if v:
        lines.append(f"invariants    {len(v)} violated")
        lines += [f"  {_mark(False, out)} {x}" for x in v[:_MAX_LISTED]]
        if len(v) > _MAX_LISTED:
            lines.append(f"  ... and {len(v) - _MAX_LISTED} more (--json lists them all)")
    else:
        lines.append("invariants    all held")
    lines.append("result        " + ("PASS" if result.ok else "FAIL"))
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    from shir.sim.world import run

    if args.plot is not None:
        _check_plot_available()
    log_target = _log_target(args.log) if args.log is not None else None
    scenario = _load(args.scenario)
    result = run(scenario, seed=args.seed, until_s=_until_s(args))
    if log_target is not None:
        try:
            _write_log(*log_target, result.log)
        except OSError as exc:
            raise UsageError(f"--log {args.log}: {exc.strerror or exc}") from None
    if args.plot is not None:
        _plot(result, args.plot)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
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


def _sweep_one(scenario_arg: str, seed: int, until_s: float | None) -> dict[str, Any]:
    """One run in a worker process: a small, picklable summary."""
    from shir.sim.world import run

    try:
        r = run(load_scenario(scenario_arg), seed=seed, until_s=until_s)
    except Exception as exc:  # a simulator bug: report it as this seed's failure
        return {"seed": seed, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                "invariant_violations": [], "expectations_failed": [], "wall_s": 0.0,
                "simulated_s": 0.0, "event_log_sha256": None}
    return {"seed": seed, "ok": r.ok, "error": None,
            "invariant_violations": r.invariant_violations,
            "expectations_failed": r.expectations["failed"], "wall_s": r.wall_s,
            "simulated_s": r.simulated_s, "event_log_sha256": r.event_log_sha256}


class _Progress:
    """A one-line progress bar on stderr, drawn only on a terminal."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.on = stream.isatty()
        self.started = time.perf_counter()

    def show(self, done: int, failed: int) -> None:
        if not self.on:
            return
        width = 30
        filled = width * done // max(1, self.total)
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.perf_counter() - self.started
        self.stream.write(f"\r[{bar}] {done}/{self.total} runs, {failed} failed, "
                          f"{elapsed:.1f} s ")
        self.stream.flush()

    def close(self) -> None:
        if self.on:
            self.stream.write("\n")
            self.stream.flush()


def _cmd_sweep(args: argparse.Namespace) -> int:
    scenario = _load(args.scenario)
    until_s = _until_s(args)
    seeds = [scenario.seed + i for i in range(args.seeds)]
    workers = min(args.workers or os.cpu_count() or 1, len(seeds))
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    progress = _Progress(len(seeds), sys.stderr)
    progress.show(0, 0)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: set[Future[dict[str, Any]]] = {
            pool.submit(_sweep_one, args.scenario, s, until_s) for s in seeds
        }
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                results += [f.result() for f in done]
                progress.show(len(results), sum(not r["ok"] for r in results))
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        finally:
            progress.close()
    wall = time.perf_counter() - started
    results.sort(key=lambda r: r["seed"])
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        r["replay"] = replay_command(args.scenario, r["seed"], args.until)
    report = {
        "scenario": scenario.name,
        "seeds": {"first": seeds[0], "last": seeds[-1]},
        "runs": len(results),
        "failures": len(failed),
        "failing_seeds": [r["seed"] for r in failed],
        "failed_runs": failed,
        "workers": workers,
        "wall_s": round(wall, 3),
        "simulated_s": round(sum(r["simulated_s"] for r in results), 3),
        "ok": not failed,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"sweep         {scenario.name}: seeds {seeds[0]}..{seeds[-1]} "
              f"({len(results)} runs on {workers} worker{'s' if workers != 1 else ''})")
        print(f"wall time     {wall:.2f} s ({_fmt_s(report['simulated_s'])} simulated)")
        print(f"failures      {len(failed)}")
        for r in failed:
            print(f"  seed {r['seed']}: {r['replay']}")
            why = ([r["error"]] if r["error"] else []) + r["invariant_violations"][:3] \
                + r["expectations_failed"][:3]
            for w in why:
                print(f"      {_mark(False, sys.stdout)} {w}")
        print("result        " + ("PASS" if not failed else "FAIL"))
    if failed and args.json:
        for r in failed:
            print(f"seed {r['seed']} failed; replay it with: {r['replay']}", file=sys.stderr)
    return 1 if failed else 0


# -- sim replay -------------------------------------------------------------------------------


def _read_log(path_text: str) -> list[object]:
    from shir.adapters.filestore import FileEventStore
    from shir.core.codec import CodecError
    from shir.core.store import InvalidStreamName, StoreError, check_stream_name

    path = Path(path_text)
    if path.suffix != ".events":
        raise UsageError(f"{path_text}: expected an event log file ending in .events "
                         "(written by shir sim run --log FILE.events)")
    if not path.is_file():
        raise UsageError(f"{path_text}: no such file")
    try:
        stream = check_stream_name(path.stem)
    except InvalidStreamName as exc:
        raise UsageError(f"{path_text}: {exc}") from None
    try:
        with FileEventStore(path.parent, fsync=False) as store:
            events = store.read(stream)
    except (StoreError, CodecError) as exc:
        raise UsageError(f"cannot read the event log: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{path_text}: {exc.strerror or exc}") from None
    if not events:
        raise UsageError(f"{path_text}: the log holds no events")
    return events


def check_log(events: Sequence[object]) -> tuple[Any, list[str], dict[str, int]]:
    """Fold a recorded log and run the stream checkers of :mod:`shir.sim.invariants` over it.

    Returns the final state, the violations, and the job counters seen in the log. Who presented
    which key generation is not in the log, so that one membership check is skipped. The replay
    check takes a snapshot (as bytes) midway and folds the tail onto it.
    """
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


def _cmd_replay(args: argparse.Namespace) -> int:
    events = _read_log(args.log)
    state, violations, counters = check_log(events)
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
        c = counters
        print(f"jobs          {c['submitted']:,} submitted, {c['completed']:,} completed, "
              f"{c['dead_lettered']} dead-lettered, {c['queued']} queued, {c['running']} "
              f"running, {c['lost']} lost, {c['duplicate_effects']} duplicate effects")
        if violations:
            print(f"invariants    {len(violations)} violated")
            for x in violations[:_MAX_LISTED]:
                print(f"  {_mark(False, out)} {x}")
            if len(violations) > _MAX_LISTED:
                print(f"  ... and {len(violations) - _MAX_LISTED} more (--json lists them all)")
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


def _add_sim(sub: Any) -> None:
    sim = sub.add_parser(
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
    run.set_defaults(handler=_cmd_run)

    sweep = cmds.add_parser(
        "sweep", help="run one scenario with many seeds in parallel",
        description="Run seeds S..S+N-1 (S: the scenario's seed) in parallel processes. Exit 1 "
                    "if any run failed; each failing seed is printed with its replay command.",
    )
    sweep.add_argument("scenario", metavar="SCENARIO", help=scenario_help)
    sweep.add_argument("--seeds", type=_positive_int("number of seeds"), required=True,
                       metavar="N", help="how many seeds to run")
    sweep.add_argument("--workers", type=_positive_int("number of workers"), metavar="K",
                       help="parallel processes (default: the number of CPUs)")
    sweep.add_argument("--until", type=_duration_arg, metavar="DURATION", help=until_help)
    sweep.add_argument("--json", action="store_true", help="print one JSON object")
    sweep.set_defaults(handler=_cmd_sweep)

    replay = cmds.add_parser(
        "replay", help="rebuild state from an event log and check the invariants",
        description="Fold a recorded event log (shir sim run --log FILE.events), re-run the "
                    "stream checkers over it and print a summary. Exit 1 on a violation, 2 when "
                    "the log cannot be read.",
    )
    replay.add_argument("log", metavar="LOG", help="the FILE.events written by --log")
    replay.add_argument("--json", action="store_true", help="print one JSON object")
    replay.set_defaults(handler=_cmd_replay)

    lst = cmds.add_parser("list", help="list the built-in scenarios",
                          description="The built-in scenarios, one a line.")
    lst.set_defaults(handler=_cmd_list)


def build_parser(with_credentials: bool = True) -> argparse.ArgumentParser:
    """The ``shir`` parser; ``credentials`` is only a stub unless ``with_credentials``."""
    parser = argparse.ArgumentParser(
        prog="shir",
        description="A self-hosted integration runtime as an event-sourced state machine, with a "
                    "deterministic fault-injection simulator.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_sim(sub)
    if with_credentials:
        from shir.adapters.credentials_cli import add_commands

        add_commands(sub)
    else:  # listed in --help; the real commands load only when asked for
        sub.add_parser("credentials", add_help=False,
                       help="node identity, credential backup and restore, offline encryption")
    from shir.adapters.copy_cli import add_command as add_copy  # light: imports wait for a run

    add_copy(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shir`` command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_credentials=argv[:1] == ["credentials"])
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad usage (message printed), 0 on --help
        return exc.code if isinstance(exc.code, int) else 2
    handler: Handler = args.handler
    name = "shir " + " ".join(x for x in (args.command, getattr(args, "sim_command", None)) if x)
    try:
        return handler(args)
    except UsageError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `shir sim list | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
