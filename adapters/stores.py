"""Open an event store named by a URL, as ``--store`` on the command line names it.

Accepted forms:

``sqlite:///PATH``
    The embedded default: a SQLite file shared by the node processes of one machine
    (:class:`~shir.adapters.sqlitestore.SQLiteEventStore`). Everything after ``sqlite:///`` is
    the path, as in SQLAlchemy: ``sqlite:///runtime.db`` is relative to the working folder and
    ``sqlite:////var/lib/shir/runtime.db`` is absolute.
``file://PATH``
    A directory of the file store, for one process only (it is locked):
    ``file:///var/lib/shir/events``.
An Azure Storage connection string
    ``DefaultEndpointsProtocol=...;AccountName=...;AccountKey=...`` (or ``SharedAccessSignature=``
    instead of the key), optionally with ``Container=NAME`` (a shir addition, taken out before
    the string reaches the SDK); the container defaults to ``container``.
An account or container URL with a SAS
    ``https://ACCOUNT.blob.core.windows.net/CONTAINER?sv=...&sig=...``; without a container in
    the path, ``container`` names it.

Nothing here repeats a connection string, key or SAS: errors name the scheme, the path or the
endpoint without its query string. An unknown scheme, a missing file and an unreachable
endpoint each raise :class:`StoreUrlError` or a :class:`~shir.core.store.StoreError` subclass
whose message says what to do.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from shir.core.store import EventStore, StoreError

if TYPE_CHECKING:
    from shir.adapters.proxy import ClientProxy

__all__ = ["DEFAULT_CONTAINER", "StoreUrlError", "describe_store_url", "open_store"]

DEFAULT_CONTAINER = "shir"

_FORMS = (
    "sqlite:///PATH, file://PATH, an Azure Storage connection string, or a Blob account URL "
    "with a SAS (https://ACCOUNT.blob.core.windows.net/CONTAINER?sv=...&sig=...)"
)
_CONNECTION_STRING_KEYS = re.compile(
    r"(?i)(^|;)\s*(DefaultEndpointsProtocol|AccountName|AccountKey|BlobEndpoint|"
    r"SharedAccessSignature|UseDevelopmentStorage|EndpointSuffix)\s*="
)


class StoreUrlError(StoreError, ValueError):
    """The ``--store`` value names no store this shir can open."""


def _is_connection_string(url: str) -> bool:
    return "://" not in url.split(";", 1)[0] and bool(_CONNECTION_STRING_KEYS.search(url))


def describe_store_url(url: str) -> str:
    """``url`` with every secret taken out, for logs and status output."""
    if url.startswith(("sqlite:", "file:")):
        return url
    if _is_connection_string(url):
        names = {}
        for part in url.split(";"):
            key, _, value = part.partition("=")
            names[key.strip().lower()] = value.strip()
        where = names.get("blobendpoint") or names.get("accountname") or "?"
        return f"azure-blob:{where} (connection string)"
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return f"{parts.scheme}://{parts.netloc}{parts.path}"
    return f"{parts.scheme or '?'}:... (unrecognised)"


def open_store(
    url: str, *, create: bool = True, container: str = DEFAULT_CONTAINER,
    check_reachable: bool = True, proxy: ClientProxy | None = None, **options: Any,
) -> EventStore:
    """The event store that ``url`` names (see the module doc for the forms).

    ``create=False`` refuses a SQLite file or store directory that does not exist yet (for a
    node joining a runtime). ``check_reachable`` makes one request to a Blob endpoint so that a
    wrong address or credential fails here, with a message, not at the first append.
    ``options`` go to the store's constructor (``busy_timeout_s``, ``fsync``,
    ``segment_max_appends``, SDK client options...). ``proxy`` is the node's proxy, applied to
    a Blob store's client (a SQLite or file store is local: no proxy applies).
    """
    if not isinstance(url, str) or not url.strip():
        raise StoreUrlError(f"no store given: name one as {_FORMS}")
    url = url.strip()
    if url.startswith("sqlite:"):
        return _open_sqlite(url, create, options)
    if url.startswith("file:"):
        return _open_file(url, create, options)
    connection_string = _is_connection_string(url)
    scheme = "" if connection_string else urlsplit(url).scheme.lower()
    if proxy is not None and (connection_string or scheme in ("http", "https")):
        options = {**proxy.blob_options(), **options, "via": proxy.describe()}
    if connection_string:
        return _open_blob_connection_string(url, create, container, check_reachable, options)
    if scheme in ("http", "https"):
        return _open_blob_url(url, create, container, check_reachable, options)
    shown = f"scheme {scheme + '://'!r}" if scheme else "a value with no scheme"
    raise StoreUrlError(f"cannot open a store from {shown}: name the store as {_FORMS}")


def _open_sqlite(url: str, create: bool, options: dict[str, Any]) -> EventStore:
    from shir.adapters.sqlitestore import SQLiteEventStore

    if not url.startswith("sqlite:///") or len(url) == len("sqlite:///"):
        raise StoreUrlError(
            f"{url!r} is not a SQLite store URL: write sqlite:///PATH (three slashes, then the "
            "path; sqlite:////abs/path for an absolute one)"
        )
    path = url[len("sqlite:///"):]
    if os.path.isdir(path):
        raise StoreUrlError(f"{url!r}: {path} is a folder; give the path of the SQLite file")
    return SQLiteEventStore(path, create=create, **options)


def _open_file(url: str, create: bool, options: dict[str, Any]) -> EventStore:
    from shir.adapters.filestore import FileEventStore

    path = url[len("file://"):] if url.startswith("file://") else ""
    if not path:
        raise StoreUrlError(f"{url!r} is not a file store URL: write file:///PATH/TO/FOLDER")
    if not create and not os.path.isdir(path):
        raise StoreError(
            f"there is no file store at {path}: check the path, or create the runtime first"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreUrlError(f"{url!r}: {path} is a file; the file store is a folder")
    return FileEventStore(path, **options)


def _split_container(connection_string: str, container: str) -> tuple[str, str]:
    kept = []
    for part in connection_string.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip().lower() == "container":
            container = value.strip()
        elif part.strip():
            kept.append(part)
    return ";".join(kept), container


def _open_blob_connection_string(
    url: str, create: bool, container: str, check_reachable: bool, options: dict[str, Any]
) -> EventStore:
    blob = _blob_module()
    connection_string, container = _split_container(url, container)
    store_options = _store_options(options)
    store = blob.BlobEventStore.from_connection_string(
        connection_string, container, **store_options, **options
    )
    return _checked(store, create, check_reachable)


def _open_blob_url(
    url: str, create: bool, container: str, check_reachable: bool, options: dict[str, Any]
) -> EventStore:
    blob = _blob_module()  # says what to install if the SDK is missing
    from azure.storage.blob import ContainerClient

    from shir.adapters.blobstore_service import check_container_name

    parts = urlsplit(url)
    path = [p for p in parts.path.split("/") if p]
    # Azurite and other emulators put the account in the path: http://host:port/ACCOUNT/...
    emulated = not parts.hostname or not parts.hostname.endswith(".core.windows.net")
    account_segments = 1 if emulated else 0
    if len(path) > account_segments + 1:
        raise StoreUrlError(
            f"{describe_store_url(url)}: a Blob store URL names an account and at most one "
            "container (https://ACCOUNT.blob.core.windows.net/CONTAINER?SAS)"
        )
    if len(path) == account_segments + 1:
        container = path[-1]
    account = "/".join(path[:account_segments])
    account_url = f"{parts.scheme}://{parts.netloc}" + (f"/{account}" if account else "")
    credential = parts.query or None  # the SAS token; SDK errors never show it
    store_options = _store_options(options)
    check_container_name(container)
    client = ContainerClient(account_url, container, credential=credential, **options)
    return _checked(blob.BlobEventStore(client, **store_options), create, check_reachable)


def _store_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options.pop(k) for k in ("segment_max_appends", "via") if k in options}


def _blob_module() -> Any:
    try:
        from shir.adapters import blobstore
    except ImportError:
        raise StoreUrlError(
            "the Azure Blob store needs the azure extra: pip install 'shir[azure]'"
        ) from None
    return blobstore


def _checked(store: Any, create: bool, check_reachable: bool) -> EventStore:
    """``store`` after one request that proves the endpoint, credential and container work."""
    if not check_reachable:
        return cast(EventStore, store)
    try:
        exists = store.container_exists()
    except StoreError:
        store.close()
        raise
    if not exists and not create:
        store.close()
        raise StoreError(
            f"{store!r}: the container does not exist: check its name, or create the "
            "runtime first"
        )
    return cast(EventStore, store)
