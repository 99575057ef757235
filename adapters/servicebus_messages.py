"""Job requests and results as Service Bus messages, and the connection string's secrets.

A request is one message: ``message_id`` = the job's idempotency key, ``subject`` = its kind,
the body a msgpack map ``{"v": 1, "kind", "spec", "credential"}`` (the credential is ciphertext
sealed for the runtime). A result is ``{"v": 1, "message_id", "job_id", "outcome", "detail",
"at"}`` on the reply queue, with an id that is one per (request, outcome). Bodies come from the
network: their sizes are bounded before they are decoded, and a body that is not what it should
be raises ``ValueError``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack

from shir.adapters.channel import ChannelError, JobRequest

__all__ = [
    "CONTENT_TYPE",
    "MALFORMED_REASON",
    "MAX_DESCRIPTION",
    "MAX_REASON",
    "RESULT_CONTENT_TYPE",
    "Secret",
    "decode_fields",
    "decode_request",
    "encode_request",
    "epoch",
    "parse_connection_string",
    "result_id",
    "scrub",
]

MALFORMED_REASON = "MalformedJobRequest"
CONTENT_TYPE = "application/vnd.shir.job-request+msgpack"
RESULT_CONTENT_TYPE = "application/vnd.shir.job-result+msgpack"
MAX_FIELD_BYTES = 64 * 1024  # spec and credential each, as the embedded channel
MAX_BODY_BYTES = 2 * MAX_FIELD_BYTES + 4096
MAX_REASON = 1024  # DeadLetterReason; the full text goes in the description (4096)
MAX_DESCRIPTION = 4096



class Secret:
    """A string that no repr, str or format shows."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


_SECRET_PATTERNS = (
    re.compile(r"(?i)(SharedAccessKey\s*=\s*)[^;\s'\"]+"),
    re.compile(r"(?i)(SharedAccessSignature\s*=\s*)[^;'\"]+"),
    re.compile(r"(?i)(sig=)[^&;\s'\"]+"),
)


def scrub(text: str, *secrets: str) -> str:
    """``text`` with each of ``secrets`` and every key, SAS and ``sig=`` value replaced."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def parse_connection_string(connection_string: str) -> dict[str, str]:
    """The connection string's settings by lower-cased name; raises ChannelError when malformed."""
    settings: dict[str, str] = {}
    for part in connection_string.strip().rstrip(";").split(";"):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ChannelError(
                "the Service Bus connection string is malformed: write Endpoint=sb://NAMESPACE/;"
                "SharedAccessKeyName=NAME;SharedAccessKey=KEY (as the portal shows it)"
            )
        settings[key.strip().lower()] = value.strip()
    if not settings.get("endpoint", "").lower().startswith("sb://"):
        raise ChannelError(
            "the Service Bus connection string has no Endpoint=sb://NAMESPACE/: copy it from the "
            "namespace's Shared access policies"
        )
    if not (settings.get("sharedaccesskey") or settings.get("sharedaccesssignature")):
        raise ChannelError(
            "the Service Bus connection string has neither SharedAccessKey nor "
            "SharedAccessSignature: copy the whole string from the namespace's Shared access "
            "policies"
        )
    return settings


def encode_request(r: JobRequest) -> bytes:
    if not isinstance(r, JobRequest):
        raise ChannelError(f"send takes JobRequest objects, got {type(r).__name__}")
    if not r.message_id or len(r.message_id) > 128:
        raise ChannelError(
            f"a job request's message_id must be 1-128 characters, got {len(r.message_id)}"
        )
    if len(r.spec) > MAX_FIELD_BYTES or len(r.credential) > MAX_FIELD_BYTES:
        raise ChannelError(
            f"job request {r.message_id!r} is too large (spec {len(r.spec)} bytes, credential "
            f"{len(r.credential)} bytes; at most {MAX_FIELD_BYTES} each)"
        )
    body: bytes = msgpack.packb(
        {"v": 1, "kind": r.kind, "spec": bytes(r.spec), "credential": bytes(r.credential)}
    )
    return body


def _body(message: Any) -> bytes:
    body = message.body
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, Iterator | list | tuple):
        return b"".join(bytes(part) for part in body)
    raise ValueError(f"the body is a {type(body).__name__}, not data")


def decode_fields(message: Any, need: Mapping[str, type]) -> dict[str, Any]:
    """The msgpack map of ``message``'s body with ``need``'s fields of the right types."""
    raw = _body(message)
    if len(raw) > MAX_BODY_BYTES:
        raise ValueError(f"the body is {len(raw)} bytes, more than {MAX_BODY_BYTES}")
    try:
        fields = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_FIELD_BYTES,
                                 max_str_len=MAX_DESCRIPTION, max_map_len=16)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"the body is not msgpack ({type(exc).__name__})") from None
    if not isinstance(fields, dict):
        raise ValueError("the body is not a map")
    for name, kind in need.items():
        if not isinstance(fields.get(name), kind):
            raise ValueError(f"field {name!r} is missing or not {kind.__name__}")
    return fields


def decode_request(message: Any) -> JobRequest:
    message_id = message.message_id
    if not isinstance(message_id, str) or not 1 <= len(message_id) <= 128:
        raise ValueError("the message id is missing or longer than 128 characters")
    f = decode_fields(message, {"kind": str, "spec": bytes, "credential": bytes})
    return JobRequest(message_id, f["kind"], f["spec"], f["credential"])


def result_id(message_id: str, outcome: str) -> str:
    """The reply message's id: one per (request, outcome), so a resend is a duplicate."""
    return "result-" + hashlib.sha256(f"{message_id}\0{outcome}".encode()).hexdigest()[:48]


def epoch(when: Any) -> float:
    return float(when.timestamp()) if when is not None else 0.0
