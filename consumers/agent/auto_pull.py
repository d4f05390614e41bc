"""Auto-pull: new master rows that a link's policy approves are pulled without being asked for.

A link's `auto_pull` policy (`LinkSpec.auto_pull_match`) names attribute
values; `approves` says whether an inserted row has all of them, and
`AutoPull` follows the master tables' change topics to find such rows. The
pulls themselves are ordinary requests (`consumers.agent.requests`), made by
the agent's loop in one Kafka transaction with the offsets read here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TopicPartition

import schemas
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.kafka import consumer, end_offset, ok, schema_registry, where
from foundation.links import LinkRegistry
from foundation.topics import SchemaTopic, Topics
from schemas.tables import EnvelopeReader

log = logging.getLogger(__name__)
FOLLOW_WAIT_S = 10.0  # how long the agent waits for a change topic created a moment ago to be usable


def approves(policy: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether a new master row has every attribute value the policy names.

    Values are compared as keys are (`keycodec.plain`: a datetime as its ISO
    text, bytes as {"$b64": ...}, a whole Decimal as an int), since the policy
    is JSON and the row comes from Avro. An attribute the row lacks matches
    no value, not even null.
    """
    plain = keycodec.plain(row)
    return all(name in plain and plain[name] == value for name, value in policy.items())


@dataclass(frozen=True)
class Approved:
    """What one read of the change topics found: the approved new rows' keys per link id, and the offsets after
    everything read (approved or not), to commit with the pulls."""

    keys: dict[str, list[str]]
    offsets: list[TopicPartition]


class AutoPull:
    """Reads the master tables' change topics of links with an auto-pull policy, for rows it approves.

    Partitions are assigned by hand (the topics change with the links; a
    group's static member would keep an old assignment across a restart);
    the offsets read commit in the agent's Kafka transactions, under the
    group `<prefix>-agent-auto`. A policy turned on starts at the topic's
    end: it approves rows inserted from then on.
    """

    def __init__(self, settings: Settings, topics: Topics, registry: LinkRegistry) -> None:
        self._topics = topics
        self._registry = registry
        self._c = consumer(settings, topics.auto_pull_group)
        self._codec = schemas.Codec(SchemaTopic(settings, topics).resolve, registry=schema_registry(settings))
        self._envelopes = EnvelopeReader(self._codec)
        self._following: dict[str, str] = {}  # master topic -> link id
        self.missing: list[str] = []  # wanted topics not assigned yet

    def follow(self) -> None:
        """Assign the master topics of links whose policy is on; drop those whose policy went off."""
        wanted = {
            self._topics.table(link.source_db, link.source_table): link.link_id
            for link in self._registry.links.values()
            if link.auto_pull_match() is not None
        }
        gone = [t for t in self._following if t not in wanted]
        if gone:
            self._c.incremental_unassign([TopicPartition(t, p) for t in gone for p in self._partitions(t)])
        new = [TopicPartition(t, p) for t in wanted if t not in self._following for p in self._partitions(t)]
        assigned = {tp.topic for tp in new}
        # A topic whose partitions the broker does not report yet is tried again (see `missing`).
        self.missing = [t for t in wanted if t not in self._following and t not in assigned]
        if new:
            committed = self._c.committed(new, timeout=10)
            for tp, done in zip(new, committed, strict=True):
                if done.offset >= 0:
                    tp.offset = done.offset
                else:
                    tp.offset = end_offset(self._c, tp, FOLLOW_WAIT_S)
            self._c.incremental_assign(new)
        self._following = {t: link_id for t, link_id in wanted.items() if t not in self.missing}

    def _partitions(self, topic: str) -> list[int]:
        """The topic's partitions; a topic just created may take a moment to be reported."""
        deadline = time.monotonic() + FOLLOW_WAIT_S
        while True:
            meta = self._c.list_topics(topic, timeout=10).topics.get(topic)
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            if time.monotonic() > deadline:
                return []
            time.sleep(0.1)

    def take(self) -> Approved | None:
        """The new rows approved since the last call, and the offsets after what was read; None when nothing was."""
        if not self._following:
            return None
        messages = [m for m in self._c.consume(500, 0) if ok(m)]
        if not messages:
            return None
        approved: dict[str, list[str]] = {}
        offsets: dict[tuple[str, int], int] = {}
        for msg in messages:
            topic, partition, offset = where(msg)
            offsets[(topic, partition)] = offset + 1
            link = self._registry.links.get(self._following.get(topic, ""))
            policy = link.auto_pull_match() if link is not None else None
            if link is None or policy is None or msg.value() is None:
                continue
            try:
                vschema = self._codec.schema_of(msg.value())
                envelope = self._codec.decode(msg.value())
                after = EnvelopeReader.image(envelope, self._envelopes.converters(vschema), "after")
            except schemas.DecodeError as exc:  # the applier dead-letters it; here it approves nothing
                log.warning("auto-pull skips an undecodable event %s[%d]@%d: %s", topic, partition, offset, exc)
                continue
            if envelope["op"] != "c" or after is None:
                continue
            if approves(policy, after):
                approved.setdefault(link.link_id, []).append(keycodec.encode(after, list(link.primary_key)))
        return Approved(approved, [TopicPartition(t, p, o) for (t, p), o in offsets.items()])

    def group_metadata(self) -> Any:
        """The consumer group's metadata, for sending the offsets read to the agent's Kafka transaction."""
        return self._c.consumer_group_metadata()

    def close(self) -> None:
        self._c.close()
