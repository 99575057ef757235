"""Moved to :mod:`shir.core.driver`; kept as an alias until the simulator imports it from there."""

from shir.core.driver import AppendOutcomeUnknown, Driver

__all__ = ["AppendOutcomeUnknown", "Driver"]
