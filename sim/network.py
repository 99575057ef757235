"""The simulated network: links with latency, partitions and message faults.

Three channels: heartbeats (node -> service over HTTPS), the control channel (jobs, both ways,
a Service Bus queue in the product) and the intranet (node <-> node, port 8060: only its
reachability matters here).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shir.sim.faults import Fault
    from shir.sim.world import World

__all__ = ["CONTROL", "HB", "INTRANET", "SERVICE", "Network"]

SERVICE = "service"
HB, CONTROL, INTRANET = "hb", "control", "intranet"


class Network:
    """Links, partitions and message faults."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self.w = world
        self.rng = rng
        self.blocked: Counter[tuple[str, str, str]] = Counter()
        self.message_faults: list[Fault] = []  # active drop/duplicate/delay/reorder

    def link_ok(self, src: str, dst: str, channel: str) -> bool:
        """Does ``src`` reach ``dst`` on ``channel`` now?"""
        return not self.blocked.get((src, dst, channel)) and not self.blocked.get(
            (src, "*", channel)
        )

    def send(self, src: str, dst: str, channel: str, deliver: Callable[[], object]) -> None:
        """Deliver (call ``deliver``) after the link's latency, unless cut or dropped."""
        if self.blocked and not self.link_ok(src, dst, channel):
            return
        spec = self.w.scenario.network
        rng = self.rng
        delay = spec.latency_s + rng.random() * spec.jitter_s
        if not self.message_faults:
            self.w.later(delay, deliver)
            return
        copies = 1
        for f in self.message_faults:
            if f.node is not None and f.node not in (src, dst):
                continue
            k = f.kind
            if k == "drop" and rng.random() < f.probability:
                return
            if k == "duplicate" and rng.random() < f.probability:
                copies += 1
            elif k == "delay":
                delay += f.extra_s
            elif k == "reorder" and rng.random() < f.probability:
                delay += rng.random() * f.extra_s
        for i in range(copies):
            self.w.later(delay + i * spec.latency_s, deliver)
