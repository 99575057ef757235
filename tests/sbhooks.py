"""Per-test queues and fault hooks on the Service Bus test broker (``tests/sbbroker.py``).

The hooks travel as messages to the broker's ``$testhooks`` entity, sent with the SDK itself;
they exist only in the test broker (Azure has no such entity).
"""

from __future__ import annotations

import uuid
from typing import Any

from azure.servicebus import ServiceBusClient, ServiceBusMessage


class BrokerHooks:
    """One connection to the test broker for configuring queues and injecting faults."""

    def __init__(self, connection_string: str) -> None:
        self.connection_string = connection_string
        self._client = ServiceBusClient.from_connection_string(connection_string)
        self._sender = self._client.get_queue_sender("$testhooks")

    def hook(self, hook: str, entity: str = "", **props: Any) -> None:
        """Send one hook; ``props`` use underscores where the broker's names have hyphens."""
        wire = {k.replace("_", "-"): v for k, v in props.items()}
        self._sender.send_messages(
            ServiceBusMessage(b"", application_properties={"hook": hook, "entity": entity, **wire})
        )

    def new_queue(self, lock_duration_s: float, max_delivery_count: int,
                  duplicate_detection: bool = True) -> str:
        """A fresh queue name, configured on the broker (as a namespace's queue would be)."""
        name = "q-" + uuid.uuid4().hex[:12]
        self.hook("configure", name, lock_duration_s=float(lock_duration_s),
                  max_delivery_count=max_delivery_count, duplicate_detection=duplicate_detection)
        return name

    def close(self) -> None:
        self._sender.close()
        self._client.close()
