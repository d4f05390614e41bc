"""What the agent writes to Kafka: replies, snapshot signals, link records and dead letters, encoded in one place.

Everything here is produced by the agent's one transactional producer, in
the Kafka transaction open at the time (the one of the message being
handled, see `consumers.agent.loop`), so it commits with that message's
offset or not at all.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Producer

import schemas
from foundation.dead_letters import DeadLetter
from foundation.kafka import DeliveryCallback, now_ms, produce
from foundation.links import LinkSpec, snapshot_signal
from foundation.topics import Topics


class Outgoing:
    def __init__(self, p: Producer, codec: schemas.Codec, topics: Topics) -> None:
        self._p = p
        self._codec = codec
        self._topics = topics

    def use(self, p: Producer) -> None:
        """Produce with `p` from now on (the agent renewed its transactional producer)."""
        self._p = p

    def reply(self, request_id: str, status: str, **fields: Any) -> None:
        """An answer to a command on the replies topic (ACCEPTED, REFUSED, PROGRESS), keyed by its request id."""
        record = {"request_id": request_id, "status": status, "ts_ms": now_ms(), **fields}
        produce(self._p, self._topics.replies, request_id, self._codec.encode(schemas.FIXED["reply"], record))

    def signal(
        self,
        link: LinkSpec,
        keys: list[str],
        request_id: str,
        signal_id: str | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """A snapshot signal to the capture: read these entities of `link` (none: just learn the link)."""
        value = self._codec.encode(schemas.FIXED["signal"], snapshot_signal(link, keys, request_id, signal_id))
        produce(self._p, self._topics.signals, link.link_id, value, on_delivery)

    def link(self, link: LinkSpec) -> None:
        """Publish the link on the compacted links topic."""
        produce(self._p, self._topics.links, link.link_id, self._codec.encode(schemas.FIXED["link"], link.to_avro()))

    def dead_letter(self, dead: DeadLetter) -> None:
        """A message given up, on the dead-letter topic keyed by its original topic."""
        produce(self._p, self._topics.dead_letter, dead.topic, dead.encode(self._codec))

    def flush(self, timeout_s: float = 30) -> None:
        """Deliver what was produced so far (to learn a signal's offset, or before relying on a link record)."""
        self._p.flush(timeout_s)
