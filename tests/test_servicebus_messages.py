"""The Service Bus message format: round trips, and untrusted bodies refused before decoding."""

from __future__ import annotations

from types import SimpleNamespace

import msgpack
import pytest

from shir.adapters.channel import ChannelError, JobRequest
from shir.adapters.servicebus_messages import (
    MAX_FIELD_BYTES,
    Secret,
    decode_request,
    encode_request,
    parse_connection_string,
    result_id,
    scrub,
)


def message(body: object, message_id: object = "m-1") -> SimpleNamespace:
    return SimpleNamespace(body=body, message_id=message_id)


def test_a_request_round_trips_whatever_the_body_sections() -> None:
    sent = JobRequest("m-1", "copy", b"\x00spec", credential=b"sealed\xff")
    raw = encode_request(sent)
    assert decode_request(message(raw)) == sent
    assert decode_request(message(iter([raw[:5], raw[5:]]))) == sent  # several data sections


@pytest.mark.parametrize(("body", "why"), [
    (b"\xc1", "not msgpack"),
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({"v": 1, "kind": "x", "spec": "text", "credential": b""}), "'spec'"),
    (msgpack.packb({"v": 1, "kind": "x", "spec": b""}), "'credential'"),
    (b"\xc6\xff\xff\xff\xff", "not msgpack"),  # claims a 4 GiB bin: refused, not allocated
    (b"x" * (2 * MAX_FIELD_BYTES + 5000), "more than"),
    ({"a": 1}, "not data"),
])
def test_bodies_that_are_not_requests_are_refused(body: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode_request(message(body))


def test_the_message_id_is_checked() -> None:
    raw = encode_request(JobRequest("m", "k"))
    for bad in (None, "", "x" * 129, 7):
        with pytest.raises(ValueError, match="message id"):
            decode_request(message(raw, bad))
    with pytest.raises(ChannelError, match="1-128"):
        encode_request(JobRequest("x" * 129, "k"))
    with pytest.raises(ChannelError, match="too large"):
        encode_request(JobRequest("m", "k", b"x" * (MAX_FIELD_BYTES + 1)))


def test_result_ids_are_one_per_request_and_outcome() -> None:
    assert result_id("m", "completed") == result_id("m", "completed")
    assert len({result_id("m", "completed"), result_id("m", "failed"),
                result_id("n", "completed")}) == 3
    assert len(result_id("x" * 128, "dead_lettered")) <= 128


def test_secrets_are_scrubbed_and_never_printed() -> None:
    text = ("Endpoint=sb://ns/;SharedAccessKeyName=R;SharedAccessKey=K3y/+=;x "
            "SharedAccessSignature=SharedAccessSignature sr=a&sig=S1g%3D&se=1 and KEYWORD")
    cleaned = scrub(text, "KEYWORD")
    for secret in ("K3y", "S1g", "KEYWORD"):
        assert secret not in cleaned
    assert "SharedAccessKeyName=R" in cleaned and "Endpoint=sb://ns/" in cleaned
    hidden = Secret("K3y")
    assert "K3y" not in f"{hidden!r} {hidden} {[hidden]}" and hidden.reveal() == "K3y"


def test_connection_strings_are_checked_without_echoing_them() -> None:
    assert parse_connection_string(
        "Endpoint=sb://ns/;SharedAccessKeyName=R;SharedAccessKey=K3y=;")["sharedaccesskey"] \
        == "K3y="
    for bad in ("Endpoint=sb://ns/;SharedAccessKeyName=R", "SharedAccessKey=K3y",
                "Endpoint=https://ns/;SharedAccessKey=K3y", "K3y"):
        with pytest.raises(ChannelError) as refused:
            parse_connection_string(bad)
        assert "K3y" not in str(refused.value)
