"""Fixtures shared by the whole suite: where the loopback services of `scripts/test` listen.

`scripts/test` starts Azurite, PostgreSQL and the Service Bus test broker on free loopback ports
and exports their addresses.
Run without it, tests that need a service are skipped; with SHIR_REQUIRE_SERVICES=1 (set under
CI) they fail instead, so a broken set-up can never pass as "all skipped".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

import pytest

HOW_TO_RUN = "run the suite with scripts/test, which starts it on a loopback port"


def unavailable(what: str) -> NoReturn:
    """Skip the current test because `what` is missing, or fail it when services are required."""
    message = f"{what}; {HOW_TO_RUN}"
    if os.environ.get("SHIR_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} (SHIR_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


def service_env(variable: str, service: str) -> str:
    value = os.environ.get(variable, "")
    if not value:
        unavailable(f"{service} is not running ({variable} is not set)")
    return value


@pytest.fixture(scope="session")
def azurite_connection_string() -> str:
    """Connection string for the Azurite blob emulator (well-known dev account)."""
    return service_env("SHIR_AZURITE_CONNECTION_STRING", "Azurite (Azure Blob emulator)")


@pytest.fixture(scope="session")
def pg_odbc() -> str:
    """Full ODBC connection string for the throwaway PostgreSQL database `shir` (psqlODBC)."""
    return service_env("SHIR_PG_ODBC", "PostgreSQL")


@pytest.fixture(scope="session")
def require_odbc_driver() -> Callable[[str, str], None]:
    """Call as `require_odbc_driver("SQLite3", "libsqliteodbc")`: skips or fails when absent."""
    pyodbc = pytest.importorskip("pyodbc")

    def require(driver: str, debian_package: str) -> None:
        if driver not in pyodbc.drivers():
            unavailable(f"the ODBC driver {{{driver}}} is not installed ({debian_package})")

    return require


@pytest.fixture(scope="session")
def servicebus_connection_string() -> str:
    """Connection string of the Service Bus test broker (tests/sbbroker.py, not Azure)."""
    return service_env("SHIR_SB_CONNECTION_STRING", "the Service Bus test broker")


@pytest.fixture(scope="session")
def sb_hooks(servicebus_connection_string: str):  # type: ignore[no-untyped-def]
    """Queues and fault hooks on the test broker (see tests/sbhooks.py)."""
    from sbhooks import BrokerHooks  # needs azure-servicebus: scripts/test installs shir[azure]

    hooks = BrokerHooks(servicebus_connection_string)
    yield hooks
    hooks.close()


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                   "no_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable set (a proxy test sets the ones it wants on the monkeypatch)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def protector(tmp_path):  # type: ignore[no-untyped-def]
    """A portable protector with its key in the test's folder (the machine's, for a test)."""
    from shir.adapters.protect import PortableProtector

    return PortableProtector(tmp_path / "protector.key", machine_id="m", user="svc")


@pytest.fixture
def proxy():  # type: ignore[no-untyped-def]
    """The test forward proxy (tests/fwdproxy.py) demanding its USER and PASSWORD."""
    from fwdproxy import PASSWORD, USER, ForwardProxy

    with ForwardProxy(USER, PASSWORD) as p:
        yield p
