"""``shir node proxy``: input checked before anything is saved, secrets sealed, never echoed."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from node_helpers import shir

from shir.adapters.protect import default_protector
from shir.adapters.proxy import client_proxy, load_home_proxy
from shir.adapters.stores import open_store
from shir.core.proxy import ProxyMode, ProxySettings, saved_proxy
from shir.core.state import fold, initial

PASSWORD = "canary-CliPx-" + uuid.uuid4().hex


def _runtime(tmp_path: Path) -> str:
    store = f"sqlite:///{tmp_path / 'rt.db'}"
    shir("runtime", "create", "--store", store, "--name", "rt")
    return store


def _proxy(store: str, home: Path, *args: str, env: dict[str, str] | None = None,
           check: bool = False):
    return shir("node", "proxy", "--store", store, "--name", "n1", "--home", str(home), *args,
                env=env, check=check)


def _saved(store: str):
    s = open_store(store, create=False)
    try:
        return fold(initial(), s.read("runtime"))
    finally:
        s.close()


@pytest.mark.parametrize(("args", "says"), [
    (("custom", "--address", "http://proxy.contoso.com", "--port", "3128"), "without a scheme"),
    (("custom", "--address", "bob:pw@proxy.contoso.com", "--port", "3128"),
     "must not contain a user or password"),
    (("custom", "--address", "proxy.contoso.com", "--port", "70000"), "port from 1 to 65535"),
    (("custom", "--port", "3128"), "needs an address"),
    (("none", "--address", "proxy.contoso.com"), "choose mode 'custom'"),
    (("custom", "--address", "proxy.contoso.com", "--port", "3128", "--password", PASSWORD),
     "needs a user name"),
    (("socks",), "invalid choice"),
])
def test_bad_input_exits_2_with_what_is_wrong_and_saves_nothing(
    tmp_path: Path, args: tuple[str, ...], says: str,
) -> None:
    store = _runtime(tmp_path)
    out = _proxy(store, tmp_path / "home", *args)
    assert out.returncode == 2 and says in out.stderr
    assert "Traceback" not in out.stderr and PASSWORD not in out.stdout + out.stderr
    assert not (tmp_path / "home" / "proxy.settings").exists()


def test_a_node_not_registered_yet_keeps_it_in_its_home_for_its_first_run(
    tmp_path: Path,
) -> None:
    store = _runtime(tmp_path)
    home = tmp_path / "home"
    out = _proxy(store, home, "custom", "--address", "proxy.contoso.com", "--port", "3128",
                 "--user", "svc", env={"SHIR_PROXY_PASSWORD": PASSWORD}, check=True)
    assert "not registered yet" in out.stdout and PASSWORD not in out.stdout + out.stderr
    kept = load_home_proxy(home)
    assert kept.mode is ProxyMode.CUSTOM and kept.port == 3128
    assert PASSWORD.encode() not in (home / "proxy.settings").read_bytes()
    opened = client_proxy(kept, default_protector(home), environ={})
    assert opened.password == PASSWORD and opened.user == "svc"  # sealed, then opened here
    assert saved_proxy(_saved(store), "n1") is None  # nothing in the log for it yet


def test_a_password_on_the_command_line_works_with_a_warning_and_is_never_shown(
    tmp_path: Path,
) -> None:
    store = _runtime(tmp_path)
    out = _proxy(store, tmp_path / "home", "custom", "--address", "10.0.0.5", "--port", "8080",
                 "--user", "svc", "--password", PASSWORD, check=True)
    assert "warning" in out.stderr and "SHIR_PROXY_PASSWORD" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    assert load_home_proxy(tmp_path / "home").password


def test_a_setting_that_cannot_reach_the_store_is_refused_and_not_kept(
    tmp_path: Path, azurite_connection_string: str,
) -> None:
    from fwdproxy import ForwardProxy

    with ForwardProxy() as gone:
        port = gone.port  # nothing listens there once it is stopped
    store = f"{azurite_connection_string.rstrip(';')};Container=pxcli-{uuid.uuid4().hex[:8]}"
    shir("runtime", "create", "--store", store, "--name", "rt")
    out = _proxy(store, tmp_path / "home", "custom", "--address", "127.0.0.1", "--port",
                 str(port), "--user", "svc", env={"SHIR_PROXY_PASSWORD": PASSWORD})
    assert out.returncode == 2 and f"custom proxy 127.0.0.1:{port}" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert load_home_proxy(tmp_path / "home") == ProxySettings()


def test_a_home_of_another_node_is_refused_and_nothing_is_saved(tmp_path: Path) -> None:
    # The setting is sealed with the home's key and kept in the home: given node n2's home,
    # node n1 could never open it, and n2 would start with n1's proxy.
    from shir.adapters.node_credentials import node_keys

    store = _runtime(tmp_path)
    home = tmp_path / "home-of-n2"
    runtime_id = _saved(store).runtime.runtime_id  # type: ignore[union-attr]
    node_keys(home, runtime_id, "n2")  # what n2's first run makes in its home
    out = _proxy(store, home, "none")
    assert out.returncode == 2
    assert f"is the identity of node 'n2' of runtime {runtime_id!r}, not of node 'n1'" in (
        out.stderr) and "Traceback" not in out.stderr
    assert not (home / "proxy.settings").exists()
    assert saved_proxy(_saved(store), "n1") is None
    again = shir("node", "proxy", "--store", store, "--name", "n2", "--home", str(home), "none")
    assert again.returncode == 0, again.stderr  # its own node's name is fine
