"""``shir sim sweep``: one scenario, many seeds, on local worker processes or Dask distributed.

Theory of operation: the seeds are cut into batches of about a second of runs (one task runs a
batch, so a task's fixed cost, ~5 ms of CPU on Dask, is paid once per batch, not per seed; see
:class:`Batches`) and at most two batches per worker are in flight at a time, so memory stays
bounded however many seeds there are. Each batch carries the scenario (2-3 kB). Runs are
deterministic, so a batch whose worker died is simply run again: on the local pool a
``BrokenProcessPool`` is caught, the pool rebuilt and every batch not yet collected resubmitted;
on Dask the scheduler reruns the tasks of a lost worker itself (we count those reruns from the
``remove-worker`` events it pushes to us) and a batch that killed ``allowed-failures`` workers
(``KilledWorker``) is resubmitted by us. A batch that kills its worker ``MAX_ATTEMPTS`` times is
reported as failing seeds, never retried forever. Results are sorted by seed whatever order they
arrive in.

Dask and tqdm are optional (``pip install 'shir[dask]'``) and imported only when used. What a
sweep found and its reports live in :mod:`shir.sim.sweep_report`; this module re-exports them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TextIO

import attrs

from shir.sim.report import mark
from shir.sim.scenario import Scenario, ScenarioError, load_scenario
from shir.sim.sweep_report import (
    METRICS,
    Record,
    SweepResult,
    distribution,
    format_report,
    to_json,
    write_jsonl,
)

# Still importable from here, as before they moved to shir.sim.sweep_report.
from shir.sim.sweep_report import PERCENTILES as PERCENTILES
from shir.sim.sweep_report import iter_reasons as iter_reasons

__all__ = [
    "METRICS",
    "SweepResult",
    "distribution",
    "parse_cluster",
    "run_batch",
    "sweep",
]

DASK_INSTALL_HINT = "pip install 'shir[dask]'"
MAX_ATTEMPTS = 3  # a batch whose worker died this many times is reported, not rerun
IN_FLIGHT_PER_WORKER = 2  # enough to keep a worker busy while its last result travels
# A batch's length in run time: long enough that a Dask task's own cost (~5 ms of CPU,
# scheduler, worker and client together) is under 1% of it, short enough that a dead worker
# costs little; at the end, batches shrink to no less than TAIL_BATCH_S (that cost < 5%).
BATCH_S = 1.0
TAIL_BATCH_S = 0.1

BatchFn = Callable[[Scenario, Sequence[int], "float | None"], list[Record]]


class SweepError(Exception):
    """Bad input or an unreachable cluster: the message says what to do."""


# -- one batch, in a worker ----------------------------------------------------------------


def _run_one(scenario: Scenario, seed: int, until_s: float | None) -> Record:
    from shir.sim.world import run

    try:
        r = run(scenario, seed=seed, until_s=until_s)
    except Exception as exc:  # a simulator bug: this seed's failure, not the sweep's
        return {"seed": seed, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                "invariant_violations": [], "expectations_failed": [], "wall_s": 0.0,
                "simulated_s": 0.0, "events": 0, "event_log_sha256": None, "metrics": {},
                "pid": os.getpid()}
    metrics = {name: r.metric(name) for name in METRICS}
    return {"seed": seed, "ok": r.ok, "error": None,
            "invariant_violations": list(r.invariant_violations),
            "expectations_failed": list(r.expectations["failed"]),
            "wall_s": r.wall_s, "simulated_s": r.simulated_s, "events": r.events,
            "event_log_sha256": r.event_log_sha256, "metrics": metrics, "pid": os.getpid()}


def run_batch(scenario: Scenario, seeds: Sequence[int], until_s: float | None) -> list[Record]:
    """Run ``scenario`` once per seed; a small, picklable record per seed (runs in a worker)."""
    return [_run_one(scenario, seed, until_s) for seed in seeds]


def _lost(seeds: Sequence[int], why: str) -> list[Record]:
    return [{"seed": s, "ok": False, "error": why, "invariant_violations": [],
             "expectations_failed": [], "wall_s": 0.0, "simulated_s": 0.0, "events": 0,
             "event_log_sha256": None, "metrics": {}, "pid": None} for s in seeds]


# -- where the batches run -----------------------------------------------------------------


@attrs.frozen
class Cluster:
    """Where a sweep runs: ``pool`` (local processes), ``local`` (a loopback Dask LocalCluster)
    or ``address`` (an existing Dask scheduler)."""

    kind: str
    workers: int | None = None
    address: str | None = None

    def describe(self) -> str:
        if self.kind == "pool":
            return f"{self.workers} local process{'es' if self.workers != 1 else ''}"
        if self.kind == "local":
            return f"a Dask LocalCluster of {self.workers} worker{'s' if self.workers != 1 else ''}"
        return f"the Dask scheduler at {self.address}"


MAX_WORKERS = 64  # processes a sweep starts on this machine: each is a whole interpreter


def parse_cluster(text: str | None, workers: int | None) -> Cluster:
    """``None`` (the local pool), ``local``, ``local:WORKERS`` or ``tcp://HOST:PORT``."""
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise SweepError(f"--workers {workers}: expected 1..{MAX_WORKERS} (each worker is a "
                         "process of its own; a bigger sweep needs a Dask cluster of machines)")
    default = min(workers or os.cpu_count() or 1, MAX_WORKERS)
    if text is None:
        return Cluster("pool", default)
    if text == "local" or text.startswith("local:"):
        n_text = text.partition(":")[2]
        if not n_text:
            return Cluster("local", default)
        try:
            n = int(n_text)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_WORKERS:
            raise SweepError(f"--cluster {text}: expected local or local:WORKERS with WORKERS an "
                             f"integer from 1 to {MAX_WORKERS}, e.g. local:2")
        return Cluster("local", n)
    if "://" in text and text.split("://", 1)[1]:
        return Cluster("address", address=text)
    raise SweepError(f"--cluster {text}: expected local, local:WORKERS, or a Dask scheduler "
                     "address such as tcp://10.0.0.5:8786")


class Batches:
    """Hands out the seeds in order, in batches sized by measured run time.

    ``batch_size`` given: batches of that many seeds. Else the first round is one seed per
    worker, and each round doubles (so the first result, and with it the progress bar's rate
    and ETA, comes after one run); once runs have come back, a batch is ``BATCH_S`` of run
    time, and towards the end at most half of what is left per worker, down to
    ``TAIL_BATCH_S`` (so the workers finish together instead of one idling while another runs
    a last long batch).
    """

    def __init__(self, seeds: Sequence[int], workers: int, batch_size: int | None = None):
        self.seeds = seeds
        self.workers = max(1, workers)
        self.fixed = batch_size
        self.next = 0  # index of the next seed to hand out
        self.handed = 0  # batches handed out
        self.largest = 0
        self.runs = 0  # runs that came back, and their wall time
        self.run_s = 0.0

    def __bool__(self) -> bool:
        return self.next < len(self.seeds)

    def observe(self, records: Sequence[Record]) -> None:
        """Learn how long a run takes from a batch's records."""
        for r in records:
            if r["wall_s"] > 0:
                self.runs += 1
                self.run_s += r["wall_s"]

    def take(self) -> tuple[int, ...]:
        """The next batch (only while ``bool(self)``)."""
        left = len(self.seeds) - self.next
        if self.fixed:
            size = self.fixed
        elif not self.runs:
            size = 2 ** min(self.handed // self.workers, 16)
        else:
            run_s = self.run_s / self.runs
            size = min(math.ceil(BATCH_S / run_s), 2 ** min(self.handed // self.workers, 16),
                       max(math.ceil(TAIL_BATCH_S / run_s),
                           math.ceil(left / (2 * self.workers))))
        size = max(1, min(size, left))
        batch = tuple(self.seeds[self.next:self.next + size])
        self.next += size
        self.handed += 1
        self.largest = max(self.largest, size)
        return batch


OnBatch = Callable[[list[Record]], None]


def _on_pool(scenario: Scenario, todo: Batches, until_s: float | None,
             workers: int, on_batch: OnBatch, batch_fn: BatchFn) -> int:
    """Run on a local process pool; returns how many seeds were run again.

    A dead worker breaks the whole pool, so the batch that killed it is not known: every batch
    then in flight becomes a suspect, and suspects run one at a time, alone in a new pool, so a
    second death is charged to the batch that caused it and not to its neighbours.
    """
    suspects: deque[tuple[tuple[int, ...], int]] = deque()
    retried = 0
    while todo or suspects:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            flight: dict[Future[list[Record]], tuple[tuple[int, ...], int]] = {}
            alone = False
            try:
                while todo or suspects or flight:
                    if suspects and not flight:
                        batch, attempt = suspects.popleft()
                        flight[pool.submit(batch_fn, scenario, batch, until_s)] = batch, attempt
                        alone = True
                    while not suspects and todo and len(flight) < IN_FLIGHT_PER_WORKER * workers:
                        batch = todo.take()
                        flight[pool.submit(batch_fn, scenario, batch, until_s)] = batch, 1
                        alone = False
                    done, _ = wait(flight, return_when=FIRST_COMPLETED)
                    for f in done:
                        batch, tries = flight.pop(f)
                        try:
                            records = f.result()
                        except BrokenProcessPool:  # a worker died: handled below
                            flight[f] = batch, tries
                            raise
                        except Exception as exc:  # the batch itself failed (not one run)
                            records = _lost(batch, f"the batch failed: {type(exc).__name__}: "
                                                   f"{exc}")
                        on_batch(records)
            except BrokenProcessPool:
                # collect what finished before the break; everything else runs again
                for f, (batch, attempt) in flight.items():
                    if f.done() and not f.cancelled() and f.exception() is None:
                        on_batch(f.result())
                    elif alone and attempt >= MAX_ATTEMPTS:
                        on_batch(_lost(batch, f"a worker process died running this seed's batch "
                                              f"{attempt} times"))
                    else:
                        suspects.append((batch, attempt + 1))
                        retried += len(batch)
            except BaseException:
                for f in flight:
                    f.cancel()
                raise
    return retried


# Settings for the workers and scheduler of a LocalCluster we start. Each default costs CPU
# that the runs then lack, and on a small machine the scheduler shares the workers' cores:
# the statistical profiler samples a running task's stack 100 times a second (nobody reads
# it: there is no dashboard), and the event-loop health check and system monitor wake every
# process 50 and 2 times a second. Measured by benchmarks/sweep.py (docs/simulation.md).
QUIET_DASK = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def _dask_client(cluster: Cluster) -> tuple[Any, Any]:
    try:
        import dask
        import distributed
    except ImportError:
        raise SweepError(f"--cluster needs Dask distributed, an optional extra: "
                         f"{DASK_INSTALL_HINT}") from None
    if cluster.kind == "local":
        import logging

        with dask.config.set(QUIET_DASK):  # the nannies hand this config to their workers
            local = distributed.LocalCluster(
                n_workers=cluster.workers, threads_per_worker=1, processes=True,
                # a dying worker and the cluster's own shutdown log errors we report better
                host="127.0.0.1", dashboard_address=None, silence_logs=logging.CRITICAL,
                # no dashboard, and its HTTP routes on a free loopback port (not 8787, which
                # another cluster may hold: Dask would warn and move)
                scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            )
        return distributed.Client(local), local
    assert cluster.address is not None  # parse_cluster gives every "address" cluster one
    return _connect(distributed, cluster.address), None


CONNECT_TIMEOUT_S = 10.0  # for a scheduler to answer; Dask's own timeout covers only the dial


def _connect(distributed: Any, address: str) -> Any:
    """A client of the scheduler at ``address``, or ``SweepError`` within CONNECT_TIMEOUT_S.

    Dask's ``timeout`` bounds connecting, not the handshake after it: a peer that accepts and
    never answers (not a scheduler, or a hung one) would hold the sweep forever. So the client
    is made on a daemon thread, waited for at most ``CONNECT_TIMEOUT_S``, and abandoned after.
    """
    hint = ("start one with `dask scheduler` and workers with `dask worker ADDRESS` (shir "
            "installed on each), or use --cluster local")
    made: dict[str, Any] = {}

    def connect() -> None:
        try:
            made["client"] = distributed.Client(address, timeout=f"{CONNECT_TIMEOUT_S / 2:g}s")
        except Exception as exc:  # reported on the caller's thread, below
            made["error"] = exc

    thread = threading.Thread(target=connect, name="shir-dask-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S)
    if thread.is_alive():
        raise SweepError(f"--cluster {address}: nothing answered as a Dask scheduler within "
                         f"{CONNECT_TIMEOUT_S:g} s (the port takes connections but says "
                         f"nothing); {hint}")
    exc = made.get("error")
    if exc is not None:
        raise SweepError(f"--cluster {address}: cannot reach a Dask scheduler there "
                         f"({type(exc).__name__}: {exc}); {hint}") from None
    return made["client"]


def _warm(client: Any) -> None:
    """Import the simulator on every worker before the clock starts (a spawned worker pays
    ~0.3 s of imports), and say so plainly when a worker cannot import it."""
    import importlib

    try:
        client.run(importlib.import_module, "shir.sim.world")
    except ImportError as exc:
        raise SweepError(f"a Dask worker cannot import the simulator ({exc}): install shir, "
                         "the same version, on every worker") from None


class _Reruns:
    """Seeds the scheduler runs again because a worker died, from its ``remove-worker`` events
    (pushed to us: no round trip per batch). A task that was processing on the dead worker, or
    had finished there but was not yet collected, runs again elsewhere."""

    def __init__(self, sizes: dict[str, int], pending: dict[str, Any]) -> None:
        self.sizes = sizes  # every task key we submitted -> its number of seeds
        self.pending = pending  # keys not yet collected
        self.seeds = 0

    def __call__(self, event: tuple[float, Any]) -> None:  # runs on the client's event loop
        msg = event[1]
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        lost = set(msg.get("processing-tasks", ())) | {
            k for k in msg.get("lost-computed-tasks", ()) if k in self.pending}
        self.seeds += sum(self.sizes.get(k, 0) for k in lost)


def _on_dask(scenario: Scenario, seeds: list[int], until_s: float | None, cluster: Cluster,
             on_batch: OnBatch, batch_fn: BatchFn,
             started: Callable[[int], Batches]) -> int:
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    client, local = _dask_client(cluster)
    given_up = 0
    try:
        if not client.nthreads():
            try:
                client.wait_for_workers(1, timeout=30)
            except TimeoutError:
                raise SweepError(f"{cluster.describe()} has no workers after 30 s: start some "
                                 "with `dask worker ADDRESS`") from None
        _warm(client)
        threads = sum(client.nthreads().values()) or 1
        todo = started(threads)
        again: deque[tuple[tuple[int, ...], int]] = deque()  # batches Dask gave up on
        meta: dict[str, tuple[tuple[int, ...], int]] = {}
        sizes: dict[str, int] = {}
        reruns = _Reruns(sizes, meta)
        client.subscribe_topic("all", reruns)
        pending = as_completed()

        def submit() -> None:
            while (again or todo) and pending.count() < IN_FLIGHT_PER_WORKER * threads:
                batch, attempt = again.popleft() if again else (todo.take(), 1)
                # the scenario travels with each batch (2-3 kB): scattered once instead, it
                # would be lost with the last worker holding it, and every batch with it
                f = client.submit(batch_fn, scenario, batch, until_s, pure=False)
                meta[f.key] = batch, attempt
                sizes[f.key] = len(batch)
                pending.add(f)

        submit()
        while not pending.is_empty():
            f = next(pending)
            batch, attempt = meta.pop(f.key)
            try:
                records = f.result()
            except KilledWorker:  # it killed allowed-failures workers in a row
                if attempt >= MAX_ATTEMPTS:
                    given_up += len(batch)  # counted as rerun by the event of its last death
                    on_batch(_lost(batch, "Dask workers kept dying while running this seed's "
                                          "batch (KilledWorker)"))
                else:
                    again.append((batch, attempt + 1))
            except Exception as exc:  # the task itself failed (not one run): say why
                on_batch(_lost(batch, f"the Dask task failed: {type(exc).__name__}: {exc}"))
            else:
                on_batch(records)
            f.release()
            submit()
        client.unsubscribe_topic("all")  # else the scheduler reports our own leaving to us
        return max(0, reruns.seeds - given_up)
    finally:
        client.close()
        if local is not None:
            local.close()


# -- the sweep -----------------------------------------------------------------------------


def _progress(total: int, stream: TextIO) -> Any:
    """A tqdm bar on a terminal; None when not a terminal or tqdm is not installed."""
    if not stream.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="seed", file=stream, dynamic_ncols=True, smoothing=0.1,
                desc="sweep")


def sweep(scenario: Scenario, seeds: Sequence[int], until_s: float | None = None, *,
          cluster: Cluster | None = None, batch_size: int | None = None,
          progress: TextIO | None = None, on_batch: OnBatch | None = None,
          batch_fn: BatchFn = run_batch) -> SweepResult:
    """Run ``scenario`` once per seed on ``cluster`` (default: local processes, one per CPU).

    ``progress``: a stream for a progress bar (drawn only on a terminal). ``on_batch`` sees each
    batch's records as they arrive (tests use it to kill a worker mid-sweep); ``batch_fn`` runs
    one batch in a worker (a picklable callable with :func:`run_batch`'s signature).
    """
    cluster = cluster or parse_cluster(None, None)
    seeds = list(seeds)
    if not seeds:
        raise SweepError("a sweep needs at least one seed")
    plan: list[Batches] = [Batches(seeds, 1)]  # replaced once the workers are known
    records: list[Record] = []
    bar = _progress(len(seeds), progress) if progress is not None else None
    failures = [0]
    workers = [cluster.workers or 0]
    startup = [0.0]
    last = [0.0]

    def collect(batch: list[Record]) -> None:
        last[0] = time.perf_counter()
        plan[0].observe(batch)
        records.extend(batch)
        failures[0] += sum(not r["ok"] for r in batch)
        if bar is not None:
            bar.set_postfix(failed=failures[0], refresh=False)
            bar.update(len(batch))
        if on_batch is not None:
            on_batch(batch)

    def started(n: int) -> Batches:  # the batches, once the workers are known
        startup[0] = time.perf_counter() - t0
        workers[0] = n
        plan[0] = Batches(seeds, n, batch_size)
        return plan[0]

    t0 = time.perf_counter()
    try:
        if cluster.kind == "pool":
            # forked workers inherit the simulator imported here (~0.3 s each otherwise), as
            # Dask workers import it before the clock starts
            import shir.sim.world  # noqa: F401

            todo = started(min(cluster.workers or 1, len(seeds)))
            retried = _on_pool(scenario, todo, until_s, workers[0], collect, batch_fn)
        else:
            if cluster.kind == "local":  # no idle worker processes: at most one per seed
                cluster = attrs.evolve(cluster, workers=min(cluster.workers or 1, len(seeds)))
            retried = _on_dask(scenario, seeds, until_s, cluster, collect, batch_fn, started)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    records.sort(key=lambda r: r["seed"])
    return SweepResult(scenario.name, seeds, records, cluster.describe(), workers[0],
                       plan[0].largest,
                       retried, wall, startup[0], max(0.0, last[0] - t0 - startup[0]))


def cmd_sweep(args: Any) -> int:
    """``shir sim sweep``: the handler :mod:`shir.sim.cli` calls; a user's mistake raises
    :class:`SweepError`."""
    import importlib.util

    from shir.sim.cli import parse_until, replay_command

    out_path = _out_target(args.out) if args.out is not None else None
    cluster = parse_cluster(args.cluster, args.workers)
    if cluster.kind != "pool" and importlib.util.find_spec("distributed") is None:
        raise SweepError(f"--cluster needs Dask distributed, an optional extra: "
                         f"{DASK_INSTALL_HINT}")
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        raise SweepError(str(exc)) from None
    seeds = [scenario.seed + i for i in range(args.seeds)]
    result = sweep(scenario, seeds, parse_until(args), cluster=cluster,
                   batch_size=args.batch_size, progress=sys.stderr)
    replays = {r["seed"]: replay_command(args.scenario, r["seed"], args.until)
               for r in result.failed}
    if out_path is not None:
        try:
            write_jsonl(result, out_path)
        except OSError as exc:
            raise SweepError(f"--out {args.out}: {exc.strerror or exc}") from None
    simulated = sum(r["simulated_s"] for r in result.records)
    if args.json:
        print(json.dumps(to_json(result, replays), indent=2))
        for seed, again in replays.items():
            print(f"seed {seed} failed; replay it with: {again}", file=sys.stderr)
    else:
        print(format_report(result, replays, lambda ok: mark(ok, sys.stdout), simulated))
        if out_path is not None:
            print(f"per seed      {args.out} ({len(result.records)} lines)")
    return 1 if result.failed else 0


def _out_target(text: str) -> Path:
    path = Path(text)
    if path.suffix != ".jsonl":
        raise SweepError(f"--out {text}: expected a file name ending in .jsonl (one JSON "
                         "object per seed), e.g. --out sweep.jsonl")
    if path.is_dir():
        raise SweepError(f"--out {text}: is a directory")
    if not path.parent.is_dir():
        raise SweepError(f"--out {text}: no such directory {path.parent}")
    return path

