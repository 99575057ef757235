"""The root of every error shir raises on purpose.

Each subclass names what was wrong in its message and, where the caller can fix it, what to do.
Messages never contain secrets (auth keys, passwords, credential plaintext).
"""

from __future__ import annotations

__all__ = ["DomainError", "ShirError"]


class ShirError(Exception):
    """Base class of all errors raised by shir."""


class DomainError(ShirError):
    """A command was refused by the core; the state it was given is unchanged."""
