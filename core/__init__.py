"""shir.core: the pure decision logic of a self-hosted integration runtime.

No I/O, no clocks, no threads: time is an argument, randomness a passed-in generator, and every
decision comes back as values (events and effects) for a driver to carry out.

    state = initial()
    d = handle(state, CreateRuntime(...))   # -> Decision(state, events, effects)
    deadline = next_deadline(d.state)       # send Tick(at=deadline) then
"""

from shir.core.commands import (
    CreateRuntime,
    FinishUpgrade,
    Heartbeat,
    RegenerateAuthKey,
    RegisterNode,
    RemoveNode,
    StartUpgrade,
    Tick,
)
from shir.core.decide import decide, next_deadline
from shir.core.effects import AnnounceDispatcher, Disconnect, StartSession, effects_of
from shir.core.errors import DomainError, ShirError
from shir.core.events import (
    AuthKeyRegenerated,
    DispatcherChanged,
    HeartbeatReceived,
    NodeRegistered,
    NodeRejoined,
    NodeRemoved,
    NodeStatusChanged,
    RuntimeCreated,
    UpgradeFinished,
    UpgradeStarted,
    VersionExpiryWarned,
)
from shir.core.keys import AuthKey
from shir.core.model import KeyName, NodeMetrics, NodeStatus, RuntimeSettings, RuntimeStatus
from shir.core.service import Decision, handle
from shir.core.state import Node, RuntimeInfo, RuntimeState, SpentState, evolve, fold, initial

__all__ = [
    "AnnounceDispatcher",
    "AuthKey",
    "AuthKeyRegenerated",
    "CreateRuntime",
    "Decision",
    "Disconnect",
    "DispatcherChanged",
    "DomainError",
    "FinishUpgrade",
    "Heartbeat",
    "HeartbeatReceived",
    "KeyName",
    "Node",
    "NodeMetrics",
    "NodeRegistered",
    "NodeRejoined",
    "NodeRemoved",
    "NodeStatus",
    "NodeStatusChanged",
    "RegenerateAuthKey",
    "RegisterNode",
    "RemoveNode",
    "RuntimeCreated",
    "RuntimeInfo",
    "RuntimeSettings",
    "RuntimeState",
    "RuntimeStatus",
    "ShirError",
    "SpentState",
    "StartSession",
    "StartUpgrade",
    "Tick",
    "UpgradeFinished",
    "UpgradeStarted",
    "VersionExpiryWarned",
    "decide",
    "effects_of",
    "evolve",
    "fold",
    "handle",
    "initial",
    "next_deadline",
]
