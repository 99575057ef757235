"""The intranet channel's messages and their framing on a (TLS) socket.

Every message is one frame::

    b"SI" | format (1 byte, = 1) | type (1 byte) | body length (u32, big-endian) | body

The reader checks the magic, the type and the length against that type's limit *before* it reads
the body, so a peer cannot make a node read (or allocate) more than the limit: an oversized frame
is refused with its body unread. Types and bodies:

- ``INTRODUCE``: a certificate (DER, at most 16 KiB) a node hands over before it can connect
  with it (see :mod:`shir.adapters.intranet`); answered with ``ACK`` or ``REFUSED``;
- ``PING``: 8 random bytes, answered with ``PONG`` carrying the same bytes;
- ``ENVELOPE``: credential id (u16 length + UTF-8), version (u64), then the sealed envelope
  (at most :data:`shir.core.credentials.MAX_ENVELOPE_BYTES`); answered with ``ACK``/``REFUSED``;
- ``REFUSED``: a UTF-8 reason (at most 1 KiB), after which the sender closes.
"""

from __future__ import annotations

import enum
import socket
import struct
import time

import attrs

from shir.adapters.intranet_tls import IntranetError
from shir.core.credentials import MAX_ENVELOPE_BYTES

__all__ = [
    "HEADER",
    "EnvelopeMessage",
    "MessageType",
    "OversizedMessage",
    "ProtocolError",
    "limit_of",
    "read_frame",
    "write_frame",
]

HEADER = struct.Struct(">2sBBI")
_MAGIC = b"SI"
_FORMAT = 1
MAX_REASON_BYTES = 1024


class ProtocolError(IntranetError):
    """The peer sent bytes that are not a well-formed intranet message."""


class OversizedMessage(ProtocolError):
    """A frame announced a body over its type's limit; the body was not read."""


class MessageType(enum.IntEnum):
    """What a frame carries."""

    INTRODUCE = 1
    PING = 2
    PONG = 3
    ENVELOPE = 4
    ACK = 5
    REFUSED = 6


_LIMITS = {
    MessageType.INTRODUCE: 16 * 1024,
    MessageType.PING: 8,
    MessageType.PONG: 8,
    MessageType.ENVELOPE: 2 + 128 + 8 + MAX_ENVELOPE_BYTES,  # id field, version, envelope
    MessageType.ACK: 0,
    MessageType.REFUSED: MAX_REASON_BYTES,
}


def limit_of(mtype: MessageType) -> int:
    """The largest body a frame of ``mtype`` may carry, in bytes."""
    return _LIMITS[mtype]


def write_frame(sock: socket.socket, mtype: MessageType, body: bytes = b"") -> None:
    """Send one frame (the caller's socket timeout bounds the wait)."""
    if len(body) > _LIMITS[mtype]:
        raise OversizedMessage(
            f"a {mtype.name} message of {len(body)} bytes is over its {_LIMITS[mtype]}-byte "
            "limit and was not sent"
        )
    sock.sendall(HEADER.pack(_MAGIC, _FORMAT, int(mtype), len(body)) + body)


def _read_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    parts: list[bytes] = []
    remaining = n
    while remaining:  # each recv returns at least one byte or ends the loop: at most n turns
        if deadline is not None:  # a peer trickling bytes cannot stretch the wait
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the peer did not send the whole message in time")
            sock.settimeout(left)
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            raise ProtocolError(f"the peer closed the connection {n - remaining} bytes into a "
                                f"{n}-byte read")
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def read_frame(sock: socket.socket, deadline: float | None = None) -> tuple[MessageType, bytes]:
    """Read one frame: its type and body. The length is checked before the body is read.

    ``deadline`` (a ``time.monotonic()`` value) bounds the whole read, not each ``recv``.
    """
    magic, fmt, raw_type, length = HEADER.unpack(_read_exact(sock, HEADER.size, deadline))
    if magic != _MAGIC:
        raise ProtocolError("the peer does not speak the shir intranet protocol (bad magic)")
    if fmt != _FORMAT:
        raise ProtocolError(f"the peer speaks intranet format {fmt}; this node speaks "
                            f"{_FORMAT}: run the same shir version on every node")
    try:
        mtype = MessageType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown intranet message type {raw_type}") from None
    if length > _LIMITS[mtype]:
        raise OversizedMessage(
            f"a {mtype.name} message of {length} bytes is over its {_LIMITS[mtype]}-byte "
            "limit; refused without reading it"
        )
    return mtype, _read_exact(sock, length, deadline)


@attrs.frozen
class EnvelopeMessage:
    """A sealed credential envelope on its way to one node; its bytes are never printed."""

    credential_id: str
    version: int
    envelope: bytes = attrs.field(repr=lambda e: f"<{len(e)} bytes>")

    def encode(self) -> bytes:
        """The ``ENVELOPE`` body."""
        raw_id = self.credential_id.encode("utf-8")
        if not 1 <= len(raw_id) <= 128:
            raise ProtocolError(f"credential id of {len(raw_id)} bytes: ids are 1-128 bytes")
        if not 0 <= self.version < 2**64:
            raise ProtocolError(f"credential version {self.version} does not fit 64 bits")
        return struct.pack(">H", len(raw_id)) + raw_id + struct.pack(">Q", self.version) + bytes(
            self.envelope)

    @classmethod
    def decode(cls, body: bytes) -> EnvelopeMessage:
        """Parse an ``ENVELOPE`` body; :class:`ProtocolError` if malformed."""
        if len(body) < 2:
            raise ProtocolError("an ENVELOPE message is truncated")
        (n,) = struct.unpack_from(">H", body, 0)
        if not 1 <= n <= 128 or len(body) < 2 + n + 8:
            raise ProtocolError("an ENVELOPE message has a malformed credential id or version")
        try:
            credential_id = body[2 : 2 + n].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("an ENVELOPE message's credential id is not UTF-8") from None
        (version,) = struct.unpack_from(">Q", body, 2 + n)
        return cls(credential_id, version, bytes(body[2 + n + 8 :]))
