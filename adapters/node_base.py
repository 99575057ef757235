"""The node host's state and its one door to the core (:class:`HostBase`).

:class:`~shir.adapters.node_host.NodeHost` is built from three parts: this base (what the host
holds, and :meth:`HostBase.send`, through which every command reaches the core), its duties
(:mod:`shir.adapters.node_duties`: the jobs running on this node, and what the dispatcher does
with the control channel) and the host itself (:mod:`shir.adapters.node_host`: start-up, the
turn loop, the effects it carries out, and shutdown). The module doc of ``node_host`` is the
theory of operation.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from shir.adapters.channel import ControlChannel
from shir.adapters.node_credentials import HostCredentials
from shir.adapters.node_jobs import KINDS, JobContext, JobRun
from shir.core import effects_of, jobs
from shir.core import events as ev
from shir.core.driver import AppendOutcomeUnknown, ConcurrencyConflict, Driver
from shir.core.errors import DomainError, Fenced, TimeWentBackwards
from shir.core.leasing import StaleLease, UnknownJob
from shir.core.model import NodeMetrics
from shir.core.proxy import ProxySettings
from shir.core.state import Node
from shir.core.store import EventStore, StoreError

__all__ = ["NO_PROXY", "SEND_TRIES", "HostBase", "HostExit", "Log"]

Log = Callable[..., None]
SEND_TRIES = 6  # a command that keeps losing races to other writers is given up after this
_MEMBERSHIP_EVENTS = (ev.NodeRegistered, ev.NodeRemoved, ev.NodeLeft)
NO_PROXY = ProxySettings()


class _LogDriver(Driver):
    """The core's Driver, reporting every tail it reads from the store to ``on_tail``.

    Those are other writers' events (and, after an append whose outcome was unknown, this
    node's own): their effects come from the log. The effects of this node's own appends come
    back from ``handle`` with the answer to its command.
    """

    def __init__(self, store: EventStore, on_tail: Callable[[list[object]], None]) -> None:
        self._on_tail: Callable[[list[object]], None] | None = None
        super().__init__(store)  # the history: folded, not acted on
        self._on_tail = on_tail

    def catch_up(self) -> list[object]:
        tail = super().catch_up()
        if tail and self._on_tail is not None:
            self._on_tail(tail)
        return tail


class HostExit(Exception):
    """The host must stop: ``code`` is the exit code, ``message`` says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class HostBase:
    """What a node host holds, and the one door to the core (see the module doc)."""

    def __init__(
        self, *, store: EventStore, channel: ControlChannel | None, key_text: str, name: str,
        machine_id: str, metrics: Callable[[int], NodeMetrics], cores: int, memory_mb: int,
        log: Log, heartbeat_interval_s: float | None = None,
        concurrency_limit: int | None = None, drain_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        kinds: dict[str, Callable[[JobContext], None]] = KINDS,
        intranet_address: str | None = None, cert_sha256: str | None = None,
        on_members: Callable[[tuple[Node, ...]], None] | None = None,
        credentials: HostCredentials | None = None,
        proxy: ProxySettings = NO_PROXY,
    ) -> None:
        self._effects: list[tuple[object, bool]] = []  # (effect, caused by this node's command)
        self.driver = _LogDriver(store, self._on_tail)  # the history's effects are not redone
        self.driver.listeners.append(self._on_events)
        self.channel = channel
        self._key_text = key_text
        self.name = name
        self.machine_id = machine_id
        self._metrics = metrics
        self.cores, self.memory_mb = cores, memory_mb
        self.log = log
        self._hb_option = heartbeat_interval_s
        self._limit_option = concurrency_limit
        self.drain_timeout_s = drain_timeout_s
        self.clock = clock
        self.kinds = kinds
        self.intranet_address, self.cert_sha256 = intranet_address, cert_sha256
        self._on_members = on_members  # told the registered nodes whenever they change
        self.credentials = credentials
        self.session = 0
        self.term = 0
        self.dispatcher: str | None = None
        self.running: dict[str, JobRun] = {}
        self._finished: queue.Queue[tuple[JobRun, str | None]] = queue.Queue()
        self._unreported: list[tuple[JobRun, str | None]] = []
        self._dispatch_wanted = False
        self._published: dict[str, None] = {}  # job ids published, their record not yet sent
        book = self.driver.state.jobs
        self._specs: dict[str, bytes] = {j.job_id: j.spec for j in book.jobs.values()}
        self.stop = threading.Event()
        self.draining = False
        self.leaving = False
        self.proxy = proxy  # the setting this process's clients were built with
        self.restart_to: ProxySettings | None = None  # set: stop, stay registered, start again

    # -- the one door to the core -------------------------------------------------------------

    def send(self, make: Callable[[float], object]) -> bool | None:
        """Decide ``make(at)``; True when the core accepted it (or found it satisfied).

        A refusal returns False; a fenced one also queues the reply it carries. Lost races (a
        conflict, an append whose outcome was unknown and did not land) are retried with a
        fresh stamp; None means the store could not be written this turn (nothing was decided:
        the caller may try again later).
        """
        [ok] = self.send_all([make])
        return ok

    def send_all(self, makes: Sequence[Callable[[float], object]]) -> list[bool | None]:
        """:meth:`send` for several commands stored in one append (group commit): what each
        would have returned alone. A batch of job requests pays one durable write, so a burst
        of requests does not starve the other nodes' heartbeats of the store."""
        commands: list[object] = []
        for _ in range(SEND_TRIES):
            at = max(self.clock(), self.driver.state.now)
            commands = [make(at) for make in makes]
            try:
                outcomes = self.driver.handle_all(commands)
            except (ConcurrencyConflict, AppendOutcomeUnknown, TimeWentBackwards):
                self.driver.catch_up()
                continue
            except StoreError as exc:
                # busy, unreachable, throttled: this turn is lost, the next one tries again
                self.log("warning", "store_error", command=type(commands[0]).__name__,
                         error=str(exc))
                return [None] * len(commands)
            done: list[bool | None] = []
            for command, outcome in zip(commands, outcomes, strict=True):
                if isinstance(outcome, DomainError):
                    self._refused(command, outcome)
                    if isinstance(outcome, Fenced):  # the sender (this node) is stale: the
                        self._effects.append((outcome.reply, True))  # reply catches it up
                    done.append(False)
                else:
                    self._effects.extend((e, True) for e in outcome)
                    done.append(True)
            return done
        self.log("warning", "command_retries_exhausted", command=type(commands[0]).__name__)
        return [None] * len(commands)

    def _on_tail(self, events: list[object]) -> None:
        # Events read from the log (other writers'): their effects, some of them for this node.
        self._effects.extend((e, False) for e in effects_of(events, self.driver.state))

    def _on_events(self, events: Any) -> None:
        # Every folded batch, this node's and others': keep what to run for each job.
        for e in events:
            t = type(e)
            if t is jobs.JobSubmitted:
                self._specs[e.job_id] = e.spec
            elif t is jobs.JobCompleted or t is jobs.JobDeadLettered:
                self._specs.pop(e.token.job_id, None)
            elif t is ev.NodeStatusChanged and e.node == self.name:
                self.log("info", "status", status=e.status.value, reasons=list(e.reasons))
            elif t in _MEMBERSHIP_EVENTS and self._on_members is not None:
                self._on_members(self.driver.state.nodes)

    def _refused(self, command: object, exc: DomainError) -> None:
        what = type(command).__name__
        if isinstance(exc, (StaleLease, UnknownJob)):
            job = getattr(getattr(command, "token", None), "job_id", None)
            self.log("warning", "late_work_refused", command=what, job=job, reason=str(exc),
                     detail=getattr(command, "reason", ""))
        else:
            self.log("warning", "refused", command=what, error=type(exc).__name__,
                     reason=str(exc))
