"""``open_channel``: the URL forms, and clear refusals for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from shir.adapters.channel import ChannelError
from shir.adapters.channels import describe_channel_url, open_channel, servicebus_url_to_settings
from shir.adapters.embedded_channel import EmbeddedChannel


def test_sqlite_opens_the_embedded_channel(tmp_path: Path) -> None:
    with open_channel(f"sqlite:///{tmp_path}/c.db", lock_duration_s=5) as channel:
        assert isinstance(channel, EmbeddedChannel)


@pytest.mark.parametrize(("url", "match"), [
    ("", "no control channel given"),
    ("   ", "no control channel given"),
    ("amqp://host/q", r"scheme 'amqp://'.*servicebus://"),
    ("just-a-name", "a value with no scheme"),
    ("servicebus://host/q", "key name and key"),
    ("servicebus://:k@/q", "not a Service Bus channel URL"),
    ("servicebus://n:k@host/q?replies=x", r"unknown option\(s\) \['replies'\]"),
    ("servicebus://n:k@host:notaport/q", "port"),
])
def test_refusals_say_what_to_write(url: str, match: str) -> None:
    with pytest.raises(ChannelError, match=match):
        open_channel(url)


def test_a_servicebus_url_becomes_a_connection_string() -> None:
    conn, queue, reply = servicebus_url_to_settings(
        "servicebus://Root:a%2Fb%2Bc%3D@ns.servicebus.windows.net/jobs?reply=done")
    assert conn == ("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;"
                    "SharedAccessKey=a/b+c=")
    assert (queue, reply) == ("jobs", "done")
    conn, queue, reply = servicebus_url_to_settings("servicebus://R:k@127.0.0.1:5672?emulator=true")
    assert conn.endswith(";UseDevelopmentEmulator=true") and "127.0.0.1:5672" in conn
    assert (queue, reply) == (None, "shir-results")


def test_descriptions_hold_no_key() -> None:
    assert describe_channel_url("servicebus://Root:SECRET@ns.example/jobs?reply=r") == \
        "servicebus://ns.example/jobs"
    described = describe_channel_url(
        "Endpoint=sb://ns.example/;SharedAccessKeyName=Root;SharedAccessKey=SECRET;EntityPath=q")
    assert described == "servicebus://ns.example/q (connection string)"
    assert describe_channel_url("sqlite:///x.db") == "sqlite:///x.db"
