"""The Blob event store's container handle, and the SDK's errors told in words without secrets.

Credentials: the connection string or credential lives only inside the SDK client. Errors name
the endpoint (without its query string), the container, the blob and the service's error code,
never the key or SAS token; SDK errors are not chained into them. The SDK's own logs redact
credentials; urllib3 logs each request's URL at DEBUG, which with a SAS holds the signature, so
:class:`BlobContainer` adds a filter to that logger that redacts ``sig=``.

This module is separate because every request the store sends, on the read, the append and the
snapshot path alike, fails through :meth:`BlobContainer.fail`, and what it may say about a
failure (which words, which secrets it must leave out) is a concern of its own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    ResourceExistsError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobClient, ContainerClient

from shir.adapters.proxy import proxy_refused, redact_userinfo
from shir.core.store import StoreError

__all__ = [
    "BlobContainer",
    "BlobServiceError",
    "InvalidConnectionString",
    "InvalidContainerName",
    "check_container_name",
    "describe_bad_connection_string",
    "error_code",
    "status_of",
]

# Azure's rule: 3-63 characters, lowercase letters, digits and single hyphens between them.
_CONTAINER_NAME = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_SECRET_LOOKING = re.compile(
    r"(?i)(sig|signature|accountkey|sharedaccesssignature|secret|token|password)=[^&;\s'\"]*"
)
_T = TypeVar("_T")


class BlobServiceError(StoreError):
    """The Blob service refused a request, or could not be reached; the message says why."""

    def __init__(
        self, message: str, status: int | None = None, error_code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class InvalidConnectionString(StoreError, ValueError):
    """The connection string cannot be parsed (its content is never repeated)."""


class InvalidContainerName(StoreError, ValueError):
    """A container name that Azure does not accept."""


def status_of(exc: AzureError) -> int | None:
    """The HTTP status of the answer ``exc`` carries; None when no answer came."""
    return getattr(exc, "status_code", None)


def error_code(exc: AzureError) -> str:
    """The service's error code in ``exc`` (``"ContainerNotFound"``...); empty if none."""
    code = getattr(exc, "error_code", None)
    # The SDK gives the codes it maps to no exception class as StorageErrorCode members, whose
    # str() is "StorageErrorCode.SERVER_BUSY": the service's own code is their value.
    return str(getattr(code, "value", code) or "")


def check_container_name(name: str) -> str:
    """``name`` if Azure accepts it as a container name, else :class:`InvalidContainerName`."""
    if not isinstance(name, str) or not _CONTAINER_NAME.fullmatch(name):
        raise InvalidContainerName(
            f"invalid container name {name!r}: Azure wants 3-63 characters of lowercase "
            "letters, digits and single hyphens, starting and ending with a letter or digit"
        )
    return name


def describe_bad_connection_string(connection_string: object) -> str:
    """Why a connection string the SDK refused is malformed, without repeating its content."""
    # Only key names are repeated, and only when they look like names: a user who pasted a
    # bare key in place of the string must not see it echoed.
    keys = []
    if isinstance(connection_string, str):
        for part in connection_string.split(";"):
            name, sep, _ = part.partition("=")
            if sep and re.fullmatch(r"[A-Za-z]{1,40}", name.strip()):
                keys.append(name.strip())
    found = f"it has the keys {', '.join(keys)}" if keys else "it has no Key=Value pairs"
    return (
        "the Azure Storage connection string is malformed (its content is not shown): "
        f"{found}; expected DefaultEndpointsProtocol, AccountName, and AccountKey or "
        "SharedAccessSignature (plus BlobEndpoint for an emulator), as the portal's Access keys "
        "page shows it"
    )


def _redact(text: str) -> str:
    """The first line of an SDK message, shortened, with anything that looks secret removed."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = redact_userinfo(line)  # a proxy URL's user and password
    return _SECRET_LOOKING.sub(r"\1=(redacted)", line)[:200]


class _RedactSignatures(logging.Filter):
    """Takes SAS signatures out of urllib3's log records, which hold whole request URLs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _SECRET_LOOKING.sub(r"\1=(redacted)", a) if isinstance(a, str) else a
                for a in record.args
            )
        return True


def _guard_transport_logs() -> None:
    # The SDK redacts its own logs, but the HTTP library under it logs each request line at
    # DEBUG, and with a SAS credential that line carries the signature.
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RedactSignatures) for f in logger.filters):
        logger.addFilter(_RedactSignatures())


class BlobContainer:
    """A :class:`~azure.storage.blob.ContainerClient` with what its errors may name.

    ``via`` names the proxy the client goes through (``ClientProxy.describe()``), for errors;
    empty when it connects directly. Raises :class:`InvalidContainerName` for a name Azure
    refuses.
    """

    def __init__(self, client: ContainerClient, via: str = "") -> None:
        self.client = client
        self.name = check_container_name(client.container_name)
        parts = urlsplit(client.url)
        # Never the query string: with a SAS credential it holds the signature.
        self.endpoint = f"{parts.scheme}://{parts.netloc}{parts.path.rsplit('/', 1)[0]}"
        # A SAS from a connection string lives in the URL, not in ``credential``.
        self._has_credential = client.credential is not None or "sig=" in parts.query
        self._via = via
        _guard_transport_logs()

    def blob(self, name: str) -> BlobClient:
        """A client for the blob ``name`` of the container (no request)."""
        return self.client.get_blob_client(name)

    def where(self, blob: str) -> str:
        """The blob's URL without a query string, for messages."""
        return f"{self.endpoint}/{self.name}/{blob}"

    def create(self) -> None:
        """Create the container; another writer creating it meanwhile is fine."""
        try:
            self.client.create_container()
        except ResourceExistsError:
            pass  # created meanwhile by another writer
        except AzureError as exc:
            self.fail(exc, "create the container")

    def write(self, request: Callable[[], _T], doing: str) -> _T:
        """``request()``, and once more after creating the container if it was missing."""
        try:
            return request()
        except AzureError as exc:
            if error_code(exc) != "ContainerNotFound":
                self.fail(exc, doing)
        self.create()
        try:
            return request()
        except AzureError as exc:
            self.fail(exc, doing)

    def fail(self, exc: AzureError, doing: str) -> NoReturn:
        """Raise a :class:`BlobServiceError` for ``exc`` that names no secret."""
        where = f"{self.endpoint}/{self.name}"
        status, code = status_of(exc), error_code(exc)
        if self._via and proxy_refused(exc):
            message = (
                f"{where}: the {self._via} refused this node's proxy credentials while trying "
                f"to {doing} (HTTP 407 Proxy Authentication Required): set the proxy's user "
                "and password again with shir node proxy (they are not shown here)"
            )
        elif self._via and isinstance(exc, ServiceRequestError):
            message = (
                f"could not reach the Blob endpoint {self.endpoint} through the {self._via} "
                f"to {doing} ({_redact(str(exc))}): check the proxy's address and port "
                "(shir node proxy), that it is running, and that it lets this endpoint through"
            )
        elif isinstance(exc, ServiceRequestError):
            message = (
                f"could not reach the Blob endpoint {self.endpoint} to {doing} "
                f"({_redact(str(exc))}): check BlobEndpoint (or AccountName and EndpointSuffix) "
                "in the connection string, the network, and that the service is running"
            )
        elif isinstance(exc, ServiceResponseError):
            message = (
                f"the connection to {self.endpoint} failed while trying to {doing} "
                f"({_redact(str(exc))}); retry"
            )
        elif isinstance(exc, ClientAuthenticationError) and status is None:
            # Raised before anything was sent: signing with the key, or getting a token, failed.
            if type(exc).__name__ == "AzureSigningError":  # the SDK's (private) signing error
                hint = (
                    "the AccountKey is not a valid base64 account key (it is not shown here): "
                    "copy key1 or key2 again from the storage account's Access keys page"
                )
            else:
                hint = f"the credential could not get a token ({_redact(str(exc))})"
            message = f"{where}: could not sign the request to {doing}: {hint}"
        elif status in (401, 403):
            hint = (
                "the AccountKey, SharedAccessSignature or token is wrong, expired, or lacks "
                "permission on this container (it is not shown here)"
                if self._has_credential
                else "the connection string has no AccountKey or SharedAccessSignature: add one"
            )
            message = (
                f"{where}: the storage account refused to let this store {doing} "
                f"({code or 'access denied'}, HTTP {status}): {hint}"
            )
        else:
            request_id = ""
            response = getattr(exc, "response", None)
            if response is not None:
                request_id = str(response.headers.get("x-ms-request-id") or "")
            detail = (
                f"({code or 'no error code'}, HTTP {status}"
                f"{', request id ' + request_id if request_id else ''})"
            )
            if status is not None and (status >= 500 or status in (408, 429)):
                # Throttling (503 ServerBusy) and failures: nothing the user sent was wrong.
                message = (
                    f"{where}: the Blob service failed to {doing} {detail}: it is throttling "
                    "this account or failing, and the SDK's retries ran out; retry later "
                    "(the client option retry_total sets how often the SDK retries)"
                )
            else:
                message = f"{where}: the Blob service refused to {doing} {detail}"
        raise BlobServiceError(message, status, code or None) from None
