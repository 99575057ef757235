"""Proxy settings: validation, secrets only as ciphertext, and the restart a change needs."""

from __future__ import annotations

from pathlib import Path

import pytest
from rig import Rig, names

from shir.core import (
    ProxyMode,
    ProxySettings,
    RestartHostService,
    SaveProxySettings,
    handle,
)
from shir.core.codec import decode, encode
from shir.core.proxy import InvalidProxySettings, check_proxy, proxy_of, saved_proxy
from shir.core.snapshot import restore, snapshot_bytes

SEALED_USER = b"SHP\x01sealed-user"
SEALED_PASSWORD = b"SHP\x01sealed-password"


def custom(address: str = "proxy.contoso.com", port: int = 8888, **kw: bytes) -> ProxySettings:
    return ProxySettings(ProxyMode.CUSTOM, address, port, **kw)


@pytest.mark.parametrize(
    "settings",
    [
        ProxySettings(),
        ProxySettings(ProxyMode.SYSTEM),
        custom(),
        custom("10.0.0.5", 3128),
        custom("[2001:db8::1]", 1),
        custom("2001:db8::1", 65535),
        custom("proxy", 80, user=SEALED_USER),
        custom("proxy.contoso.com.", 80, user=SEALED_USER, password=SEALED_PASSWORD),
    ],
)
def test_valid_settings_pass(settings: ProxySettings) -> None:
    check_proxy(settings)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        (custom(""), "needs an address"),
        (custom("user:secret@proxy.contoso.com"), "must not contain a user or password"),
        (custom("http://proxy.contoso.com"), "without a scheme"),
        (custom("proxy.contoso.com:8080"), "port in its own field"),
        (custom("proxy .contoso.com"), "no spaces"),
        (custom("-bad.contoso.com"), "not a valid host name"),
        (custom("a" * 64 + ".com"), "not a valid host name"),
        (custom("10.0.0.256"), "not a valid host name"),
        (custom("x" * 254), "at most 253"),
        (custom(port=0), "port from 1 to 65535"),
        (custom(port=65536), "port from 1 to 65535"),
        (custom(port=True), "port from 1 to 65535"),  # type: ignore[arg-type]
        (custom(password=SEALED_PASSWORD), "needs a user name"),
        (custom(user=b"x" * 5000), "at most 4096 bytes"),
        (ProxySettings(ProxyMode.NONE, "proxy.contoso.com", 80), "choose mode 'custom'"),
        (ProxySettings(ProxyMode.SYSTEM, port=8080), "choose mode 'custom'"),
    ],
)
def test_invalid_settings_are_refused_with_what_to_do(settings: ProxySettings, says: str) -> None:
    with pytest.raises(InvalidProxySettings) as info:
        check_proxy(settings)
    assert says in str(info.value)
    assert "secret" not in str(info.value)  # the smuggled password is never echoed


@pytest.fixture
def c() -> Rig:
    return Rig.online(1)


def test_saving_a_change_restarts_the_host_service_of_that_node(c: Rig) -> None:
    s = custom(user=SEALED_USER, password=SEALED_PASSWORD)
    d = handle(c.state, SaveProxySettings("n1", s, 2.0))
    assert names(d.events) == ["ProxySettingsSaved"]
    assert d.effects == (RestartHostService(
        "n1", "proxy settings changed to custom proxy proxy.contoso.com:8888 (with user and "
        "password)"),)
    c.state = d.state
    assert proxy_of(c.state.model(), "n1") == s
    assert c.handle(SaveProxySettings("n1", s, 3.0)) == ()  # the same again: no restart
    assert names(c.handle(SaveProxySettings("n1", ProxySettings(), 4.0))) == [
        "ProxySettingsSaved"]


def test_secrets_appear_only_as_ciphertext_and_never_in_reprs(c: Rig) -> None:
    s = custom(user=SEALED_USER, password=SEALED_PASSWORD)
    (e,) = c.handle(SaveProxySettings("n1", s, 2.0))
    assert "sealed" not in repr(e) and "<19 bytes encrypted>" in repr(e)
    assert decode(encode(e)) == e
    assert restore(snapshot_bytes(c.state)) == c.state


def test_unknown_node_and_bad_settings_leave_state_unchanged(c: Rig) -> None:
    c.refused(SaveProxySettings("n9", custom(), 2.0))
    c.refused(SaveProxySettings("n1", custom(port=0), 2.0), InvalidProxySettings)


def test_a_new_node_of_the_same_name_starts_without_proxy(c: Rig) -> None:
    assert saved_proxy(c.state, "n1") is None  # nothing saved: its host brings the machine's
    c.handle(SaveProxySettings("n1", custom(), 2.0))
    assert saved_proxy(c.state, "n1") == custom()
    c.handle(SaveProxySettings("n1", ProxySettings(), 2.5))
    assert saved_proxy(c.state, "n1") == ProxySettings()  # saved as none: not "nothing saved"
    c.remove("n1", at=3)
    assert saved_proxy(c.state, "n1") is None
    c.register("n1", at=4)
    assert proxy_of(c.state.model(), "n1") == ProxySettings()
    assert saved_proxy(c.state, "n1") is None


def test_a_host_seals_the_secrets_and_only_it_can_open_them(tmp_path: Path) -> None:
    from shir.adapters.protect import PortableProtector, TamperedCiphertext
    from shir.adapters.proxy import open_proxy_secrets, seal_proxy_settings

    here = PortableProtector(tmp_path / "machine.key", machine_id="m1", user="svc")
    s = seal_proxy_settings(here, ProxyMode.CUSTOM, "proxy.contoso.com", 8888, "svc-proxy",
                            "pa55-w0rd")
    assert b"pa55-w0rd" not in s.password and b"svc-proxy" not in s.user
    assert "pa55" not in repr(s)
    check_proxy(s)
    assert open_proxy_secrets(here, s) == ("svc-proxy", "pa55-w0rd")
    swapped = ProxySettings(s.mode, s.address, s.port, s.password, s.user)
    with pytest.raises(TamperedCiphertext):  # bound to its purpose: no swapping the fields
        open_proxy_secrets(here, swapped)
    with pytest.raises(InvalidProxySettings, match="needs a user name"):
        seal_proxy_settings(here, ProxyMode.CUSTOM, "p", 80, password="x")
    assert seal_proxy_settings(here, ProxyMode.NONE) == ProxySettings()
