"""Request and reply over Kafka: how the destination site asks the source site for anything."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import TopicPartition

import schemas
from foundation.config import Settings
from foundation.kafka import consumer, end_offset, now_ms, ok, produce, producer
from foundation.links import LinkSpec
from foundation.topics import Admin, Topics

log = logging.getLogger(__name__)


class Requests:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        Admin(settings).ensure_control(self.topics)
        self._p = producer(settings)
        self._codec = schemas.Codec()

    def ask(self, kind: str, link: LinkSpec, keys: list[str], timeout_s: float) -> Iterator[dict[str, Any]]:
        """Send a command and yield the replies to it until the caller stops or `timeout_s` passes."""
        rid = str(uuid.uuid4())
        c = consumer(self.settings, self.topics.facade_group(rid))
        try:
            # Replies are read from the end as it is now; a broker restarting is waited for within the timeout.
            high = end_offset(c, TopicPartition(self.topics.replies, 0), timeout_s)
            c.assign([TopicPartition(self.topics.replies, 0, high)])
            command = {"request_id": rid, "kind": kind, "link": link.to_avro(), "keys": keys, "ts_ms": now_ms()}
            produce(self._p, self.topics.commands, link.link_id, self._codec.encode(schemas.FIXED["command"], command))
            self._p.flush(30)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                msg = c.poll(min(0.2, max(0.0, deadline - time.monotonic())))
                if not ok(msg) or msg.key() != rid.encode():
                    continue
                try:
                    reply = self._codec.decode(msg.value())
                except schemas.DecodeError as exc:  # not a reply, whoever wrote it: not this request's answer
                    log.warning("skipped an undecodable record on %s: %s", self.topics.replies, exc)
                    continue
                yield reply
        finally:
            c.close()
