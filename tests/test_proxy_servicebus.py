"""The node's proxy applied to the Service Bus channel: AMQP over WebSockets through the proxy.

What is verified here, honestly: the unchanged SDK, configured by shir's options, opens its
connection through the proxy (the test forward proxy records a ``CONNECT`` to the namespace's
host and port 443 with the right Proxy-Authorization), a refused password gives an error naming
the proxy (never the password), and ``none`` talks to the test broker directly with the proxy
variables set. What is not: the AMQP-over-WebSockets exchange itself (the test broker speaks
plain AMQP and no WebSockets, and the proxy carries no traffic off this machine), so the
CONNECT is answered ``502`` and the channel then fails with an error that names the proxy.
"""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip("azure.servicebus")
pytest.importorskip("websocket")

from fwdproxy import PASSWORD, USER, ForwardProxy, basic, sealed_custom
from sbhooks import BrokerHooks

from shir.adapters.channel import ChannelError, JobRequest
from shir.adapters.channels import open_channel
from shir.adapters.protect import PortableProtector
from shir.adapters.proxy import client_proxy
from shir.adapters.servicebus import ServiceBusChannel
from shir.core.proxy import ProxyMode, ProxySettings

KEY = "canary-SasKey-" + uuid.uuid4().hex
NAMESPACE = "shir-proxy-test.servicebus.windows.net"
AZURE = f"Endpoint=sb://{NAMESPACE}/;SharedAccessKeyName=send;SharedAccessKey={KEY}"
QUICK = {"settle_timeout_s": 2.0, "attempts": 1, "sdk_options": {"retry_total": 0}}


def _send_fails(channel: ServiceBusChannel) -> str:
    with pytest.raises(ChannelError) as info:
        channel.send([JobRequest("m-1", "touch", b"{}")])
    channel.close()
    message = str(info.value)
    for secret in (PASSWORD, KEY):
        assert secret not in message
    return message


def _connects(proxy: ForwardProxy, auth: str) -> list[str]:
    seen = proxy.seen
    assert seen, "the SDK never reached the proxy"
    assert all(s.method == "CONNECT" and s.target == f"{NAMESPACE}:443" for s in seen)
    assert all(s.authorization == auth for s in seen)
    return [s.target for s in seen]


def test_a_custom_proxy_carries_amqp_over_websockets_to_the_namespace(
    proxy: ForwardProxy, protector: PortableProtector, clean_env: pytest.MonkeyPatch,
) -> None:
    cp = sealed_custom(protector, proxy.port)
    assert cp.servicebus_options(NAMESPACE)["http_proxy"]["proxy_port"] == proxy.port
    channel = open_channel(AZURE, proxy=cp, **QUICK)
    assert isinstance(channel, ServiceBusChannel)
    message = _send_fails(channel)
    _connects(proxy, basic(USER, PASSWORD))
    assert f"through the custom proxy 127.0.0.1:{proxy.port}" in message


def test_a_refused_proxy_password_is_named_never_shown(
    proxy: ForwardProxy, protector: PortableProtector, clean_env: pytest.MonkeyPatch,
) -> None:
    wrong = "canary-wrong-" + uuid.uuid4().hex
    channel = ServiceBusChannel(AZURE, proxy=sealed_custom(protector, proxy.port, wrong), **QUICK)
    message = _send_fails(channel)
    assert wrong not in message
    assert f"custom proxy 127.0.0.1:{proxy.port}" in message and "407" in message
    assert "shir node proxy" in message
    assert proxy.seen and not any(s.allowed for s in proxy.seen)


def test_the_system_proxy_is_the_one_the_environment_names(
    proxy: ForwardProxy, protector: PortableProtector, clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("HTTPS_PROXY", proxy.url_for())
    system = client_proxy(ProxySettings(ProxyMode.SYSTEM), protector)
    _send_fails(ServiceBusChannel(AZURE, proxy=system, **QUICK))
    _connects(proxy, basic(USER, PASSWORD))
    # NO_PROXY naming the namespace's domain: AMQP over TCP, no proxy
    clean_env.setenv("NO_PROXY", "localhost,.servicebus.windows.net")
    assert client_proxy(ProxySettings(ProxyMode.SYSTEM), protector).servicebus_options(
        NAMESPACE) == {}


def test_no_proxy_talks_to_the_broker_directly_despite_the_variables(
    sb_hooks: BrokerHooks, proxy: ForwardProxy, protector: PortableProtector,
    clean_env: pytest.MonkeyPatch,
) -> None:
    proxy.name_in_every_variable(clean_env)
    queue = sb_hooks.new_queue(5.0, 3)
    channel = ServiceBusChannel(sb_hooks.connection_string, queue=queue,
                                reply_queue=sb_hooks.new_queue(60, 10),
                                proxy=client_proxy(ProxySettings(), protector))
    try:
        channel.send([JobRequest("direct-1", "touch", b"{}")])
        got = channel.receive(1, 5.0)
        assert [r.request.message_id for r in got] == ["direct-1"]
        channel.complete(got[0].lock_token)
    finally:
        channel.close()
    assert proxy.seen == []
