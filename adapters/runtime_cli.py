"""The factory side on the command line: ``shir runtime``, ``shir job`` and ``shir status``.

::

    shir runtime create --store STORE --name NAME [--factory NAME] [--json]
    shir runtime regenerate-key --store STORE key1|key2
    shir job submit --store STORE [--channel URL] --kind KIND [--param K=V ...] [--id KEY]
                    [--credential ID]
    shir job show --store STORE ID
    shir status --store STORE [--json] [--detail] [--watch [S] [--count N]]

``runtime create`` prints the runtime's two auth keys once; the store keeps only salted
verifiers, so a lost key cannot be shown again, only regenerated. ``job submit`` queues a
request on the control channel (idempotent by ``--id``, which defaults to a new id and is
printed); the dispatcher node moves it into the log. With ``--credential ID`` the job carries
that credential, its value read from ``SHIR_CREDENTIAL_VALUE`` or a prompt, sealed for each node
the runtime's log names (:mod:`shir.adapters.carried`). ``status`` reads the log (a live store or
a recorded one) and prints the runtime, its nodes and its queue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

from shir.adapters.node_cli import cli_errors, open_channel
from shir.core.errors import ShirError

__all__ = ["add_job_commands", "add_runtime_commands", "add_status_command"]

STREAM = "runtime"


def add_runtime_commands(subparsers: Any) -> None:
    """Add ``runtime create|regenerate-key`` to an ``add_subparsers()`` result."""
    rt = subparsers.add_parser("runtime", help="create a runtime, regenerate its keys",
                               description="Create a self-hosted runtime; manage its auth keys.")
    rcmds = rt.add_subparsers(dest="runtime_command", metavar="COMMAND")
    rcmds.required = True
    create = rcmds.add_parser(
        "create", help="create the runtime in a store and print its two keys once",
        description="Create the runtime in STORE and print key1 and key2 once (the store keeps "
                    "only verifiers). The interval options shorten timeouts for tests.")
    create.add_argument("--store", required=True, help="event store URL (sqlite:///PATH, ...)")
    create.add_argument("--name", required=True, help="the runtime's name")
    create.add_argument("--factory", default="factory", help="the data factory it belongs to")
    create.add_argument("--description", default="")
    create.add_argument("--json", action="store_true", help='print {"key1": ..., "key2": ...}')
    create.add_argument("--heartbeat-interval", type=float, metavar="S",
                        help="node heartbeat interval (default 10 s)")
    create.add_argument("--missed-heartbeats", type=int, metavar="N",
                        help="missed heartbeats before a node is Offline (default 3)")
    create.add_argument("--lock-duration", type=float, metavar="S",
                        help="job lease duration (default 60 s)")
    create.add_argument("--max-deliveries", type=int, metavar="N",
                        help="deliveries before a job is dead-lettered (default 10)")
    create.set_defaults(handler=lambda a: cli_errors("shir runtime create", lambda: _create(a)))
    regen = rcmds.add_parser(
        "regenerate-key", help="replace one auth key and print the new one",
        description="Replace key1 or key2; the old key registers no node from now on.")
    regen.add_argument("--store", required=True)
    regen.add_argument("slot", choices=("key1", "key2"))
    regen.set_defaults(
        handler=lambda a: cli_errors("shir runtime regenerate-key", lambda: _regenerate(a)))


def add_job_commands(subparsers: Any) -> None:
    """Add ``job submit|show`` to an ``add_subparsers()`` result."""
    job = subparsers.add_parser("job", help="submit a job, show a job",
                                description="Queue job requests; show what became of one.")
    jcmds = job.add_subparsers(dest="job_command", metavar="COMMAND")
    jcmds.required = True
    submit = jcmds.add_parser("submit", help="queue a job request on the control channel")
    submit.add_argument("--store", required=True)
    submit.add_argument("--channel", help="control channel URL (default: the store's file)")
    submit.add_argument("--kind", required=True, help="job kind: touch (test), copy, ...")
    submit.add_argument("--param", action="append", default=[], metavar="K=V",
                        help="a parameter; V is read as JSON when it parses, else as text")
    submit.add_argument("--spec", metavar="JSON|@FILE",
                        help="all parameters as one JSON object (a copy job's spec), instead "
                             "of --param")
    submit.add_argument("--id", help="idempotency key (default: a new one, printed)")
    submit.add_argument("--count", type=int, default=1,
                        help="queue N requests (ids ID-0..ID-N-1)")
    submit.add_argument("--credential", metavar="ID",
                        help="the job carries credential ID, sealed for each registered node; "
                             "its value from SHIR_CREDENTIAL_VALUE or a prompt")
    submit.add_argument("--credential-value", metavar="VALUE",
                        help="the value on the command line (other users can see it: "
                             "prefer the environment)")
    # read in part (`| head`), a submit still queued every request it printed and more
    submit.set_defaults(handler=lambda a: cli_errors("shir job submit", lambda: _submit(a)),
                        reader_may_leave=True)
    show = jcmds.add_parser("show", help="what became of a job (by id or idempotency key)")
    show.add_argument("--store", required=True)
    show.add_argument("--channel", help="control channel URL (default: the store's file)")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=lambda a: cli_errors("shir job show", lambda: _show(a)),
                      reader_may_leave=True)


def add_status_command(subparsers: Any) -> None:
    """Add ``status`` to an ``add_subparsers()`` result."""
    status = subparsers.add_parser(
        "status", help="the runtime's status: nodes, dispatcher, term, queue",
        description="Print the runtime's status from its event store (live or recorded).")
    status.add_argument("--store", required=True)
    status.add_argument("--channel", help="control channel URL (default: the store's file)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--detail", action="store_true",
                        help="also print the monitoring view (version status, proxy, remote "
                             "access, sharing links, last update); --json always has it")
    status.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="S",
                        help="print again every S seconds (default 2) until interrupted")
    status.add_argument("--count", type=int, metavar="N",
                        help="with --watch, stop after N reports")
    status.set_defaults(handler=lambda a: cli_errors("shir status", lambda: _status(a)),
                        reader_may_leave=True)


# -- runtime ----------------------------------------------------------------------------------


def _driver(url: str, create: bool = False) -> Any:
    from shir.adapters.stores import open_store
    from shir.core.driver import Driver

    return Driver(open_store(url, create=create), STREAM)


def _no_runtime(url: str) -> ShirError:
    from shir.adapters.stores import describe_store_url

    return ShirError(f"{describe_store_url(url)} holds no runtime: create one with "
                     "shir runtime create --store STORE --name NAME")


def _create(args: argparse.Namespace) -> int:
    from shir.core import handle, initial
    from shir.core.codec import encode
    from shir.core.commands import CreateRuntime
    from shir.core.keys import AuthKey
    from shir.core.model import KeyName, RuntimeSettings

    overrides = {k: v for k, v in (
        ("heartbeat_interval_s", args.heartbeat_interval),
        ("missed_heartbeats_offline", args.missed_heartbeats),
        ("lock_duration_s", args.lock_duration),
        ("max_deliveries", args.max_deliveries),
    ) if v is not None}
    settings = RuntimeSettings(**overrides)  # InvalidSettings names the value at fault
    runtime_id = f"ir-{uuid.uuid4().hex[:16]}"
    key1 = AuthKey.from_seed(runtime_id, KeyName.KEY1, 1, os.urandom(48))
    key2 = AuthKey.from_seed(runtime_id, KeyName.KEY2, 1, os.urandom(48))
    command = CreateRuntime(runtime_id, args.factory, args.name, key1, key2, time.time(),
                            args.description, settings)
    for event in handle(initial(), command).events:  # refused before a store file is made
        encode(event)
    driver = _driver(args.store, create=True)
    if driver.state.runtime is not None:
        rt = driver.state.runtime
        raise ShirError(f"the store already holds runtime {rt.name!r} ({rt.runtime_id}); a "
                        "store holds one runtime: give another store, or use that runtime's "
                        "keys (shir runtime regenerate-key prints a new one)")
    if args.json:
        shown = json.dumps({"runtime_id": runtime_id, "name": args.name,
                            "key1": key1.text, "key2": key2.text}) + "\n"
    else:
        shown = (f"runtime {args.name} ({runtime_id}) created; its keys are shown only now:\n"
                 f"key1: {key1.text}\nkey2: {key2.text}\n")
    # printed before the runtime is created: a runtime whose keys nobody saw is not made
    _show_keys(shown, "nothing was created; run it again with its output to a terminal or a "
                      "file")
    try:
        driver.handle(command)
    except ShirError as exc:  # another create won the race since the check above
        raise ShirError(f"{exc}; the keys printed above belong to no runtime: discard "
                        "them") from None
    return 0


def _show_keys(text: str, if_lost: str) -> None:
    """Write keys that are shown once to stdout; a stdout that cannot take them (a full disk)
    is an error saying what became of them, never a traceback."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        raise ShirError(f"cannot write to standard output ({exc.strerror}): {if_lost}") from None


def _regenerate(args: argparse.Namespace) -> int:
    from shir.core.commands import RegenerateAuthKey
    from shir.core.keys import AuthKey
    from shir.core.model import KeyName

    driver = _driver(args.store)
    rt = driver.state.runtime
    if rt is None:
        raise _no_runtime(args.store)
    slot = KeyName(args.slot)
    for _ in range(5):
        generation = driver.state.key_generations[slot] + 1
        key = AuthKey.from_seed(rt.runtime_id, slot, generation, os.urandom(48))
        try:
            driver.handle(RegenerateAuthKey(key, max(time.time(), driver.state.now)))
            break
        except ShirError:
            driver.catch_up()  # a node wrote meanwhile; the generation may have moved
    else:
        raise ShirError(f"could not regenerate {slot.value}: the store kept changing; retry")
    _show_keys(f"{slot.value}: {key.text}\n",
               f"{slot.value} was replaced and its new key is lost: run shir runtime "
               f"regenerate-key {slot.value} again, with its output to a terminal or a file")
    return 0


# -- jobs -------------------------------------------------------------------------------------


def _channel_url(args: argparse.Namespace) -> str:
    if args.channel:
        return str(args.channel)
    if not args.store.startswith("sqlite:"):
        raise ShirError("name the control channel with --channel URL (only a SQLite store "
                        "carries an embedded channel)")
    return str(args.store)


def _channel_to_read(args: argparse.Namespace) -> Any:
    """The control channel ``status`` and ``job show`` read, or None (a Blob or file store
    given no --channel). Reading creates nothing: a typo in --channel is refused, not made."""
    if not (args.channel or args.store.startswith("sqlite:")):
        return None
    url = _channel_url(args).strip()
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    if path and not os.path.exists(path):
        raise ShirError(f"no control channel at {path}: check --channel (the store's file "
                        "carries one; a node host creates another the first time it runs)")
    return open_channel(url)


def _params(pairs: list[str]) -> bytes:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ShirError(f"--param {pair[:40]!r}: write KEY=VALUE")
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
        _json_bytes(params[key], f"--param {pair[:40]}")
    return _json_bytes(params, "--param")


def _json_bytes(data: Any, what: str) -> bytes:
    """``data`` as JSON; Python reads 1e999 and NaN, but JSON has no such number, so a node
    could not read the request back."""
    try:
        return json.dumps(data, sort_keys=True, allow_nan=False).encode()
    except ValueError:
        raise ShirError(f"{what}: a number is infinite or NaN, which JSON cannot hold; give a "
                        "finite number") from None


def _spec(text: str) -> bytes:
    if text.startswith("@"):
        try:
            with open(text[1:], "rb") as f:
                raw = f.read(64 * 1024 + 1)
        except OSError as exc:
            raise ShirError(f"--spec {text[:80]}: {exc.strerror}") from None
    else:
        raw = text.encode()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ShirError("--spec must be a JSON object (or @FILE holding one)") from None
    if not isinstance(data, dict):
        raise ShirError("--spec must be a JSON object (or @FILE holding one)")
    return _json_bytes(data, "--spec")


def _carried(args: argparse.Namespace, params: bytes, state: Any) -> bytes:
    """The bundle carrying ``--credential``, sealed for each node the runtime's log names."""
    from shir.adapters.carried import seal_for_nodes
    from shir.adapters.node_jobs import credentials_named, pack_spec
    from shir.core.leasing import MAX_SPEC_BYTES

    if args.kind == "copy" and args.credential not in credentials_named("copy", params):
        raise ShirError(f"--credential {args.credential}: the copy spec does not name it "
                        "(as 'credential' of the source or of a blob sink)")
    from shir.adapters.credentials_cli import read_value

    value = read_value(f"credential {args.credential}", args.credential_value,
                       "shir job submit")
    keys = {n.name: n.envelope_key for n in state.nodes if n.envelope_key is not None}
    bundle = seal_for_nodes(args.credential, value, state.runtime.runtime_id, keys)
    if len(pack_spec(args.kind, params, bundle)) > MAX_SPEC_BYTES:
        raise ShirError(f"the parameters and the carried credential take more than "
                        f"{MAX_SPEC_BYTES} bytes: shorten them")
    return bundle


def _submit(args: argparse.Namespace) -> int:
    from shir.adapters.channel import JobRequest

    if not 1 <= args.count <= 100_000:
        raise ShirError(f"--count must be 1..100000, got {args.count}")
    if args.id is not None and not args.id:  # `--id "$KEY"` with KEY unset
        raise ShirError("--id is empty: give the idempotency key, or leave --id out for a "
                        "new one")
    base = args.id or f"req-{uuid.uuid4().hex[:16]}"
    if not 1 <= len(base) <= 200:
        raise ShirError("--id must be 1-200 characters")
    params = _spec(args.spec) if args.spec is not None else _params(args.param)
    if args.spec is not None and args.param:
        raise ShirError("give the parameters with --spec or with --param, not both")
    from shir.adapters.node_jobs import check_request, pack_spec

    try:  # refuse what the dispatcher would dead-letter, before it is queued
        pack_spec(args.kind, params)
    except UnicodeEncodeError:
        raise  # not UTF-8: shir.adapters.cli.main names the argument
    except ValueError as exc:
        raise ShirError(f"--kind: {exc}") from None
    check_request(args.kind, params)  # and what every node would fail until dead-lettered
    state = _driver(args.store).state  # a typo in --store must not queue into a new file
    if state.runtime is None:
        raise _no_runtime(args.store)
    carried = _carried(args, params, state) if args.credential else b""
    ids = [base] if args.count == 1 else [f"{base}-{i}" for i in range(args.count)]
    channel = open_channel(_channel_url(args))
    try:
        for i in range(0, len(ids), 500):
            channel.send([JobRequest(m, args.kind, params, carried) for m in ids[i:i + 500]])
    finally:
        channel.close()
    for m in ids:
        print(m)
    return 0


def _show(args: argparse.Namespace) -> int:
    """What became of one job: its history in the log, and what the control channel says of it
    (results on the reply queue; the dead-letter queue for a request the runtime refused, which
    never reaches the log)."""
    info, history = _job_in_log(args)
    channel = _channel_to_read(args)
    published: list[dict[str, Any]] = []
    try:
        if channel is not None:
            message_id = info.get("idempotency_key", args.id)
            published = [{"outcome": r.outcome, "at": r.at, "detail": r.detail}
                         for r in channel.results(message_id)]
            if not info:
                refused = [d for d in channel.dead_letters() if d.request.message_id == args.id]
                if refused:
                    info = {"idempotency_key": args.id, "state": "refused",
                            "reason": refused[-1].reason}
    finally:
        if channel is not None:
            channel.close()
    if not info and published:  # the log was trimmed or is another runtime's: say what we know
        info = {"idempotency_key": args.id, "state": published[-1]["outcome"]}
    if not info:
        raise ShirError(f"no job {args.id!r} in this runtime's log: a request the dispatcher "
                        "has not taken yet waits in the control channel (shir status shows "
                        "the queue)")
    info["history"] = history
    if channel is not None:
        info["published"] = published
    if args.json:
        print(json.dumps(info))
        return 0
    for k, v in info.items():
        if k not in ("history", "published"):
            print(f"{k:16} {v}")
    for h in history:
        extra = f" on {h['node']} (delivery {h['delivery']})" if "node" in h else ""
        detail = f": {h['detail']}" if h.get("detail") else ""
        print(f"  {_clock(h['at'])} {h['event']}{extra}{detail}")
    if channel is not None:
        print("reply queue      " + (", ".join(
            f"{r['outcome']} at {_clock(r['at'])}" for r in published) or "nothing published yet"))
    return 0


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _job_in_log(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The job's current state and history from the runtime's log ({} if it is not there)."""
    from shir.adapters.node_host import job_id_for
    from shir.core import jobs

    driver = _driver(args.store)
    wanted = {args.id, job_id_for(args.id)}
    info: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for e in driver.store.read(STREAM, 0):
        if isinstance(e, jobs.JobSubmitted) and (e.job_id in wanted or e.idempotency_key in wanted):
            info = {"job_id": e.job_id, "idempotency_key": e.idempotency_key, "state": "queued"}
            history = [{"at": e.at, "event": "submitted"}]
            continue
        token = getattr(e, "token", None)
        if not info or token is None or token.job_id != info["job_id"]:
            continue
        name = {jobs.JobLeased: "leased", jobs.JobCompleted: "completed",
                jobs.JobReleased: "released", jobs.JobDeadLettered: "dead_lettered"}.get(type(e))
        if name is None:
            continue
        info["state"] = {"leased": "running", "released": "queued"}.get(name, name)
        info["node"], info["delivery"], info["term"] = token.node, token.delivery, token.term
        history.append({"at": e.at, "event": name, "node": token.node,
                        "delivery": token.delivery, "detail": getattr(e, "detail", "")})
    return info, history


# -- status -----------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    if args.count is not None and not 1 <= args.count <= 1_000_000:
        raise ShirError(f"--count must be 1..1000000, got {args.count}")
    if args.count is not None and args.watch is None:
        raise ShirError("--count counts the reports of --watch: add --watch [S], or leave "
                        "--count out for one report")
    if args.watch is not None and not 0.1 <= args.watch <= 3600:
        raise ShirError(f"--watch must be 0.1..3600 seconds, got {args.watch:g}")
    if args.store.endswith(".events") and os.path.isfile(args.store):
        return _status_of_recording(args)
    driver = _driver(args.store)
    channel = _channel_to_read(args)
    printed = 0
    try:
        while True:
            driver.catch_up()
            if driver.state.runtime is None:
                raise _no_runtime(args.store)
            print(_shown(driver.state, time.time(), channel, args), flush=True)
            printed += 1
            if args.watch is None or (args.count is not None and printed >= args.count):
                return 0
            time.sleep(args.watch)
            if not args.json:
                print()
    finally:
        if channel is not None:
            channel.close()



def _status_of_recording(args: argparse.Namespace) -> int:
    """Status as of the end of a recorded log (``shir sim run --log FILE.events``)."""
    from pathlib import Path

    from shir.adapters.cli import read_log
    from shir.core.state import fold, initial

    state = fold(initial(), read_log(args.store, Path(args.store)))
    if state.runtime is None:
        raise ShirError(f"{args.store}: the recording holds no runtime (no event in it "
                        "created one): give a FILE.events written by shir sim run --log")
    print(_shown(state, state.now, None, args))
    return 0


def _shown(state: Any, now: float, channel: Any, args: argparse.Namespace) -> str:
    """What ``shir status`` prints for one look at ``state``."""
    from shir.adapters.status import render, status_of
    from shir.core.monitoring import monitoring_view, view_to_json
    from shir.core.monitoring import render as render_view

    report = status_of(state, now, channel)
    view = monitoring_view(state)
    if args.json:
        return json.dumps({**report, "monitoring": view_to_json(view)})
    return render(report) + ("\n\n" + render_view(view) if args.detail else "")
