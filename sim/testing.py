"""Property-based failover testing: Hypothesis strategies and a stateful cluster machine.

Theory of operation
-------------------
:class:`ClusterMachine` is a Hypothesis ``RuleBasedStateMachine`` whose system under test is a
simulated cluster: a :class:`~shir.sim.world.World`, the simulator's own, driving the core
through the same :class:`~shir.core.driver.Driver`. Its rules do only what a scenario file can
say (a node joins, hibernates, crashes, is partitioned, a key is regenerated, any other fault
kind, time passes), each at the current simulated time, and every one is recorded. So whatever
the machine finds, the recorded schedule reproduces in the simulator: on failure it is printed
as a scenario TOML (:func:`to_toml`) with the ``shir sim run FILE --seed N`` command that
replays it, and Hypothesis has already shrunk it.

Replaying is exact, byte for byte, because the machine builds its World the way a scenario run
does and makes SimPy order simultaneous events as the replay will:

- every node the run may ever have is declared from the start (the network draws a latency for
  each message to each of them, joined or not); a node that never joined is written with a
  ``join_at_s`` far past the end;
- injections at one instant are applied before anything else happens at that instant (as the
  replay's fault timers, scheduled at set-up, come first), faults in recorded order, then joins
  in node order;
- the machine's own times lie on a grid (0.25, 1.25, 2.25, ...), never on the whole or half
  seconds where set-up timers fire and nodes that joined at 0 heartbeat, so no injection ties
  with an event the replay would order differently;
- the World runs with an endless duration; the end is chosen at teardown (at or after the
  workload stops), and there, as the replay's timers would, the machine takes the snapshot,
  heals every fault and drains.

``tests/test_property_machine.py`` checks this: the event log of random machine runs hashes the
same as ``World(machine.scenario()).run()``.

The invariants are the simulator's checkers (:class:`~shir.sim.invariants.Checkers`) plus
:class:`ClusterChecks`, which also watch the commands the core accepts: one dispatcher per
term, no dispatch under an old term, no lease held by an Offline node and none used after its
node went Offline. ``shir sim run`` checks only the former; :func:`replay` runs a scenario with
both.

The code lives in ``shir.sim.strategies`` (strategies, profiles, ``to_toml``),
``shir.sim.machine`` (the machine, ``replay``) and ``shir.sim.invariants`` (``ClusterChecks``);
this module re-exports their public names. The strategies (:func:`node_metrics`,
:func:`commands`, :func:`events`, :func:`faults`, :func:`fault_schedules`, :func:`scenarios`)
build valid values for a user's own tests. Profiles ``shir-quick`` (the machine's default) and
``shir-ci`` (1000 examples) are registered on import; ``SHIR_HYPOTHESIS_PROFILE`` picks one
(:func:`profile`).
"""

from __future__ import annotations

from shir.sim.invariants import ClusterChecks
from shir.sim.machine import (
    ClusterMachine,
    ClusterSetup,
    Failure,
    cluster_setups,
    final_violations,
    replay,
)
from shir.sim.strategies import (
    CREDENTIALS,
    EVENT_OVERRIDES,
    NEVER_S,
    NODE_NAMES,
    PROFILES,
    VERSIONS,
    auth_keys,
    commands,
    events,
    fault_schedules,
    faults,
    node_metrics,
    profile,
    runtime_settings,
    scenarios,
    strategy_for_type,
    to_toml,
)

__all__ = [
    "CREDENTIALS",
    "EVENT_OVERRIDES",
    "NEVER_S",
    "NODE_NAMES",
    "PROFILES",
    "VERSIONS",
    "ClusterChecks",
    "ClusterMachine",
    "ClusterSetup",
    "Failure",
    "auth_keys",
    "cluster_setups",
    "commands",
    "events",
    "fault_schedules",
    "faults",
    "final_violations",
    "node_metrics",
    "profile",
    "replay",
    "runtime_settings",
    "scenarios",
    "strategy_for_type",
    "to_toml",
]
