"""Open a control channel named by a URL, as ``--channel`` on the command line names it.

Accepted forms:

``sqlite:///PATH``
    The embedded channel (:class:`~shir.adapters.embedded_channel.EmbeddedChannel`): a SQLite
    file, which may be the event store's own file.
``servicebus://KEYNAME:KEY@NAMESPACE[:PORT]/QUEUE[?reply=QUEUE&emulator=true]``
    Azure Service Bus (:class:`~shir.adapters.servicebus.ServiceBusChannel`, ``shir[azure]``).
    The key is percent-encoded (``/`` ``%2F``, ``+`` ``%2B``, ``=`` ``%3D``); NAMESPACE is the
    host name (``NAME.servicebus.windows.net``); QUEUE defaults to ``shir-jobs`` and ``reply``
    to ``shir-results``; ``emulator=true`` means plain AMQP on PORT (the Service Bus emulator or
    shir's test broker), never for Azure.
A Service Bus connection string
    ``Endpoint=sb://NAMESPACE/;SharedAccessKeyName=NAME;SharedAccessKey=KEY`` as the portal shows
    it (or with ``SharedAccessSignature=``), optionally ``EntityPath=QUEUE`` and the shir
    addition ``ReplyQueue=QUEUE`` (taken out before the string reaches the SDK).

Nothing here repeats a key or a SAS: :func:`describe_channel_url` gives the form to log, and
errors name the scheme, the path or the namespace only.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from shir.adapters.channel import ChannelError, ControlChannel

__all__ = ["describe_channel_url", "open_channel", "servicebus_url_to_settings"]

_FORMS = (
    "sqlite:///PATH, servicebus://KEYNAME:KEY@NAMESPACE/QUEUE, or a Service Bus connection "
    "string (Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...)"
)


def _is_connection_string(url: str) -> bool:
    head = url.split(";", 1)[0].strip().lower()
    return head.startswith("endpoint=") or "endpoint=sb://" in url.lower()


def _split_shir_settings(connection_string: str) -> tuple[str, str | None]:
    """The connection string without ``ReplyQueue=``, and that setting's value."""
    kept, reply = [], None
    for part in connection_string.strip().rstrip(";").split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "replyqueue":
            reply = value.strip()
        else:
            kept.append(part)
    return ";".join(kept), reply


def servicebus_url_to_settings(url: str) -> tuple[str, str | None, str]:
    """``(connection string, queue or None, reply queue)`` for a ``servicebus://`` URL."""
    from shir.adapters.servicebus import DEFAULT_REPLY_QUEUE

    parts = urlsplit(url)
    if parts.scheme != "servicebus" or not parts.hostname:
        raise ChannelError(f"not a Service Bus channel URL: write {_FORMS}")
    if not parts.username or parts.password is None:
        raise ChannelError(
            "the servicebus:// URL needs the key name and key before the namespace: "
            "servicebus://KEYNAME:KEY@NAMESPACE/QUEUE (percent-encode the key)"
        )
    query = {k.lower(): v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"reply", "emulator"}
    if unknown:
        raise ChannelError(
            f"the servicebus:// URL has unknown option(s) {sorted(unknown)}: only reply= and "
            "emulator= are known"
        )
    try:
        port = parts.port
    except ValueError:
        raise ChannelError(
            f"the servicebus:// URL's port is not a number: write {_FORMS}"
        ) from None
    host = parts.hostname + (f":{port}" if port else "")
    connection_string = (
        f"Endpoint=sb://{host}/;SharedAccessKeyName={unquote(parts.username)};"
        f"SharedAccessKey={unquote(parts.password)}"
    )
    if query.get("emulator", "").lower() == "true":
        connection_string += ";UseDevelopmentEmulator=true"
    queue = parts.path.strip("/") or None
    return connection_string, queue, query.get("reply") or DEFAULT_REPLY_QUEUE


def describe_channel_url(url: str) -> str:
    """``url`` with every secret taken out, for logs and status output."""
    url = url.strip()
    if url.startswith("sqlite:"):
        return url
    if url.startswith("servicebus:"):
        parts = urlsplit(url)
        where = parts.netloc.rpartition("@")[2]  # the key name and key stay out
        return f"servicebus://{where or '?'}{parts.path}"
    if _is_connection_string(url):
        settings = {}
        for part in url.split(";"):
            key, _, value = part.partition("=")
            settings[key.strip().lower()] = value.strip()
        where = settings.get("endpoint", "?").removeprefix("sb://").strip("/")
        queue = settings.get("entitypath", "")
        return f"servicebus://{where}/{queue} (connection string)"
    return f"{urlsplit(url).scheme or '?'}:... (unrecognised)"


def open_channel(url: str, **options: Any) -> ControlChannel:
    """The control channel that ``url`` names (see the module doc for the forms).

    ``options`` go to the channel's constructor (``lock_duration_s`` for the embedded one;
    ``settle_timeout_s``, ``attempts``, ``sdk_options``, ``proxy`` for Service Bus). A
    ``proxy`` (the node's) applies to Service Bus only: the embedded channel is a local file.
    """
    if not isinstance(url, str) or not url.strip():
        raise ChannelError(f"no control channel given: name one as {_FORMS}")
    url = url.strip()
    if url.startswith("sqlite:"):
        from shir.adapters.embedded_channel import EmbeddedChannel

        options.pop("proxy", None)
        return EmbeddedChannel.from_url(url, **options)
    if url.startswith("servicebus:"):
        from shir.adapters.servicebus import ServiceBusChannel

        return ServiceBusChannel.from_url(url, **options)
    if _is_connection_string(url):
        from shir.adapters.servicebus import ServiceBusChannel

        connection_string, reply = _split_shir_settings(url)
        if reply:
            options.setdefault("reply_queue", reply)
        return ServiceBusChannel(connection_string, **options)
    scheme = urlsplit(url).scheme.lower()
    shown = f"scheme {scheme + '://'!r}" if scheme else "a value with no scheme"
    raise ChannelError(f"cannot open a control channel from {shown}: name it as {_FORMS}")
