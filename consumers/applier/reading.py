"""Reading: the applier's Kafka consumer, which partitions it follows, and each message into its unit.

Partitions are assigned by hand, not by the consumer group: there is one
applier per deployment (a lock in the destination says so), its offsets live
in the destination database, and a group would only add rebalances (with a
static member, a restart after the subscription grew even kept the old,
smaller assignment). A new partition starts at its stored offset, or at the
beginning. Kafka's committed offsets are written too, for lag monitoring
only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

import schemas
from consumers.applier import metrics
from consumers.applier.delivery import DeadLetters
from consumers.applier.gathering import Event, Gathering, Offset, Partition, PendingUnit, kafka_ts, read_past
from consumers.applier.routing import Routes
from foundation.kafka import ok, where
from foundation.links import LinkRegistry, LinkSpec
from foundation.topics import SchemaTopic, Topics
from schemas.tables import EnvelopeReader

log = logging.getLogger(__name__)
UNKNOWN_SCHEMA_TTL_S = 10.0  # a fingerprint the schema topic lacked is not looked up again this soon
TRANSACTION_FIELDS = frozenset({"status", "id", "data_collections", "request_id", "link_id"})
POLL_S = 0.05  # how long a round waits for its first message
MAX_TAKEN = 500  # messages taken per round, at most


class KnownSchemas:
    """The schemas events are written with, looked up on the schema topic when not known yet."""

    def __init__(self, schema_topic: SchemaTopic) -> None:
        self._schema_topic = schema_topic
        self._unknown: dict[bytes, float] = {}
        self._key_columns_of: dict[bytes, list[str]] = {}  # key schema fingerprint -> primary key columns
        self.codec: schemas.Codec | None = None  # the codec resolving through `resolve`, once made

    def resolve(self, fingerprint: bytes) -> str | None:
        """The schema topic, asked at most once per UNKNOWN_SCHEMA_TTL_S for a fingerprint it lacked."""
        if self._unknown.get(fingerprint, 0.0) > time.monotonic():
            return None
        text = self._schema_topic.resolve(fingerprint)
        if text is None:
            self._unknown[fingerprint] = time.monotonic() + UNKNOWN_SCHEMA_TTL_S
        return text

    def key_columns(self, event: Event) -> list[str]:
        """The primary key columns of an event's table, from its Kafka key's schema."""
        if event.key is None:
            raise ValueError(f"a change event of {event.collection} without a key")
        assert self.codec is not None
        vschema = self.codec.schema_of(event.key)
        if vschema.fingerprint not in self._key_columns_of:
            self._key_columns_of[vschema.fingerprint] = [f["name"] for f in vschema.definition["fields"]]
        return self._key_columns_of[vschema.fingerprint]


class Reader:
    """Follows the topics of the links, and takes what Kafka has into the gathering."""

    def __init__(
        self,
        c: Consumer,
        topics: Topics,
        codec: schemas.Codec,
        gathering: Gathering,
        dead_letters: DeadLetters,
    ) -> None:
        self._c = c
        self._topics = topics
        self._codec = codec
        self._envelopes = EnvelopeReader(codec)
        self._gathering = gathering
        self._dead_letters = dead_letters
        self.routes = Routes()
        self._wanted: list[str] = []
        self._subscribed: list[str] = []  # topics whose partitions are assigned
        self._assigned: set[Partition] = set()
        self._retry_assign_at = 0.0
        self._committed: dict[Partition, int] = {}
        self._paused: set[Partition] = set()

    def follow(self, links: Mapping[str, LinkSpec], stored: Mapping[Partition, int]) -> None:
        """Follow the topics of `links`: assign every partition of each topic not assigned yet, at `stored`."""
        self.routes = Routes.of(links, self._topics)
        self._wanted = wanted = self.routes.topics(self._topics.transaction)
        missing = [t for t in wanted if t not in self._subscribed]
        if not missing:
            return
        topics = self._c.list_topics(timeout=10).topics
        partitions = []
        for topic in missing:
            meta = topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                self._retry_assign_at = time.monotonic() + 1.0  # not created yet: try again in a second
                continue
            for number in sorted(meta.partitions):
                at = (topic, number)
                partitions.append(TopicPartition(topic, number, stored.get(at, OFFSET_BEGINNING)))
                self._assigned.add(at)
                if at in stored:
                    self._gathering.consumed[at] = stored[at]
            self._subscribed.append(topic)
        if partitions:
            self._c.incremental_assign(partitions)
            log.info("applier follows %d more partitions (%d topics in all)", len(partitions), len(self._subscribed))

    def read_only(self, topics: set[str] | None) -> None:
        """Fetch only the partitions of `topics` (None: all again); the others are paused, not given up."""
        pause = set() if topics is None else {p for p in self._assigned if p[0] not in topics}
        if pause == self._paused:
            return
        if self._paused - pause:
            self._c.resume([TopicPartition(t, n) for t, n in self._paused - pause])
        if pause - self._paused:
            self._c.pause([TopicPartition(t, n) for t, n in pause - self._paused])
        if topics is None:
            log.info("the applier reads every topic again")
        elif not self._paused:
            metrics.NARROWED.inc()
            log.info("the applier holds too much it cannot apply yet; it reads only %s", ", ".join(sorted(topics)))
        self._paused = pause

    def behind(self) -> bool:
        """Whether some wanted topic was not there yet and it is time to look again."""
        return len(self._subscribed) < len(self._wanted) and time.monotonic() > self._retry_assign_at

    def take(self, registry: LinkRegistry) -> bool:
        """Take what Kafka has; True when it taught us of new links (follow them).

        Waits for the first message only, then takes what is there (consume(n, t) would wait the whole
        timeout for n messages, and every mirrored change would pay it).
        """
        first = self._c.poll(POLL_S)
        learned = False
        for msg in [first, *self._c.consume(MAX_TAKEN - 1, 0)] if first is not None else []:
            if ok(msg) and self._route(msg, registry):
                learned = True
        return learned

    def _route(self, msg: Message, registry: LinkRegistry) -> bool:
        """Take one message into its unit; True when it taught us of new links."""
        at = Offset(*where(msg))
        ts_ms = kafka_ts(msg)
        self._gathering.read(at, ts_ms)
        value = msg.value()
        if value is None:
            return False  # tombstone
        if at.topic == self._topics.transaction:
            try:
                record = self._codec.decode(value)
            except schemas.DecodeError as exc:
                self._reject(msg, str(exc))
                return False
            if not TRANSACTION_FIELDS <= record.keys():
                self._reject(msg, "not a transaction event")
                return False
            if record["status"] != "END":
                return False
            self._gathering.end(record["id"], record, at, ts_ms)
            # Links are published before their first event; a unit of a table not known yet means
            # the links topic is behind this consumer, not that the unit is someone else's. (Helper
            # tables are known too: their units, one per ack, would otherwise each wait for the links topic.)
            captured = self.routes.captured
            unknown = [dc for dc in record["data_collections"] or [] if dc["data_collection"] not in captured]
            return bool(unknown) and registry.catch_up()
        collection = self.routes.by_topic.get(at.topic)
        if collection is None:
            return False
        try:
            vschema, envelope = self._envelopes.decode(value)
            convert = self._envelopes.converters(vschema)
        except schemas.DecodeError as exc:
            self._reject(msg, str(exc))
            return False
        block = envelope.get("transaction")
        if not block or not block.get("id"):
            self._reject(msg, f"{vschema.subject}: change event without a transaction block")
            return False
        event = Event(collection, envelope, convert, msg.key(), value, ts_ms)
        self._gathering.unit(block["id"]).add(at, event)
        return False

    def _reject(self, msg: Message, reason: str) -> None:
        """Dead-letter one undecodable message."""
        at = Offset(*where(msg))
        self._dead_letters.send(at, msg.key(), msg.value(), reason, "decode")
        log.warning("dead-lettered undecodable message %s[%d]@%d: %s", *at, reason)

    def read_past(self, unit: PendingUnit) -> bool:
        """Whether the change topics that lack the unit's events have been read past it (`gathering.read_past`)."""
        topics = self.routes.topics_of(set(unit.missing(self.routes.tracked)))

        def high(partition: Partition) -> int:
            return int(self._c.get_watermark_offsets(TopicPartition(*partition), cached=True)[1])

        partitions = [p for p in self._assigned if p[0] in topics]
        # The consumer's position, not the last message read + 1: a transactional partition ends with a commit
        # marker that is never delivered, and the position moves past it.
        positions = {
            (tp.topic, tp.partition): tp.offset
            for tp in self._c.position([TopicPartition(*p) for p in partitions])
            if tp.offset >= 0
        }
        consumed = {p: max(self._gathering.consumed.get(p, 0), positions.get(p, 0)) for p in partitions}
        return read_past(partitions, unit.end_ts_ms, self._gathering.read_ts, consumed, high)

    def commit(self, stored: Mapping[Partition, int]) -> None:
        """The stored offsets, also as the group's Kafka offsets: for lag monitoring only (`djlink status`).

        Where nothing is pending (the stored offset is what was consumed), the consumer's position counts:
        it has moved past the commit marker a transactional partition ends with, which no consumer receives,
        so an applier at rest shows no lag.
        """
        mine = [a for a in stored if a in self._assigned]
        positions = {
            (tp.topic, tp.partition): tp.offset
            for tp in (self._c.position([TopicPartition(*a) for a in mine]) if mine else [])
            if tp.offset >= 0
        }
        wanted = {
            a: max(o, positions.get(a, o)) if o == self._gathering.consumed.get(a) else o
            for a, o in stored.items()
            if a in self._assigned
        }
        todo = {a: o for a, o in wanted.items() if self._committed.get(a) != o}
        if not todo:
            return
        try:
            self._c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()], asynchronous=True)
            self._committed.update(todo)
        except KafkaException as exc:
            log.debug("Kafka offset commit (monitoring only) failed: %s", exc)

    def close(self) -> None:
        self._c.close()
