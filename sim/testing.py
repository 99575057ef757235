"""Property-based failover testing: Hypothesis strategies and a stateful cluster machine.

One import for users' own tests. The code lives in ``shir.sim.core_strategies`` (strategies for
the core's values), ``shir.sim.strategies`` (faults, scenarios, the machine's set-ups, profiles,
``to_toml``), ``shir.sim.machine`` (the machine; its docstring is the theory of operation),
``shir.sim.failure`` (what a failing run reports, ``replay``) and ``shir.sim.invariants``
(``ClusterChecks``); this module re-exports their public names. The strategies
(:func:`node_metrics`, :func:`commands`, :func:`events`, :func:`faults`,
:func:`fault_schedules`, :func:`scenarios`) build valid values for a user's own tests. Profiles
``shir-quick`` (the machine's default) and ``shir-ci`` (1000 examples) are registered on import;
``SHIR_HYPOTHESIS_PROFILE`` picks one (:func:`profile`).
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
