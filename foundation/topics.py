"""Kafka for djlink: topic names, topic creation, clients, the schema topic.

Every topic name is built here from the topic prefix, so a test (or a second
deployment on the same broker) isolates itself by choosing another prefix.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

import schemas
from foundation.config import Settings

_TOPIC_BAD = re.compile(r"[^A-Za-z0-9._]")
KAFKA_LOG = logging.getLogger("djlink.kafka")  # librdkafka's own log lines, through Python logging
log = logging.getLogger(__name__)
# The largest message on djlink's topics: a row change (two images of a row) or a pull's list of keys.
# Bigger values belong in an external store (blob@, attach@), which djlink copies outside Kafka.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class Topics:
    """The names of a deployment's topics."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.links = f"{prefix}.links"
        self.commands = f"{prefix}.commands"
        self.replies = f"{prefix}.replies"
        self.signals = f"{prefix}.signals"
        self.acks = f"{prefix}.acks"
        self.transaction = f"{prefix}.transaction"
        self.schemas = f"{prefix}.schemas"
        self.dead_letter = f"{prefix}.dead-letter"
        self.capture_offsets = f"{prefix}.capture-offsets"
        self.flags = f"{prefix}.flags"

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - a deployment has few Topics objects, and each lives long
    def table(self, db: str, table: str) -> str:
        """Change topic of a table, Debezium style `<prefix>.<db>.<table>`.

        Characters Kafka does not allow (`#` of lookup tables, `~` of external
        tables) become `-` and their hex code; table names never contain `-`,
        so the mapping is one to one.
        """
        esc = lambda s: _TOPIC_BAD.sub(lambda m: f"-{ord(m.group()):02x}", s)  # noqa: E731
        return f"{self.prefix}.{esc(db)}.{esc(table)}"

    def control(self) -> dict[str, bool]:
        """Control topics and whether each is compacted."""
        return {
            self.links: True,
            self.schemas: True,
            self.capture_offsets: True,
            self.flags: True,
            self.commands: False,
            self.replies: False,
            self.signals: False,
            self.acks: False,
            self.transaction: False,
            self.dead_letter: False,
        }


class TopicRefused(Exception):
    """Kafka will not create a topic by that name (it collides with another, or is invalid)."""


class KafkaUnavailable(Exception):
    """The broker does not answer."""


class Admin:
    """Creates topics once, remembering what exists."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "logger": KAFKA_LOG})  # type: ignore[dict-item]
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise KafkaUnavailable, in words for the user, when the broker does not answer in time."""
        quiet = logging.getLogger("djlink.kafka.check")
        quiet.propagate = False  # librdkafka's per-attempt connection errors would bury the one line we print
        probe = AdminClient({"bootstrap.servers": self._settings.kafka_bootstrap, "logger": quiet})  # type: ignore[dict-item]
        try:
            probe.list_topics(timeout=self._settings.startup_timeout_s)
        except KafkaException as exc:
            raise KafkaUnavailable(
                f"cannot reach Kafka at {self._settings.kafka_bootstrap} "
                f"within {self._settings.startup_timeout_s:.0f} s ({exc.args[0].str() if exc.args else exc}); "
                "check DJLINK_KAFKA_BOOTSTRAP and that the broker runs"
            ) from exc

    def ensure(self, names: Iterable[str], compacted: bool = False, partitions: int = 1) -> None:
        with self._lock:
            missing = [n for n in names if n not in self._known]
            if not missing:
                return
            existing = set(self._admin.list_topics(timeout=10).topics)
            create = [n for n in missing if n not in existing]
            # Rows with big blobs, and pulls of many keys, exceed Kafka's default 1 MB per message.
            config = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
            if compacted:
                config["cleanup.policy"] = "compact"
            if create:
                futures = self._admin.create_topics(
                    [NewTopic(n, num_partitions=partitions, replication_factor=1, config=config) for n in create]
                )
                for name, fut in futures.items():
                    try:
                        fut.result(timeout=30)
                    except KafkaException as exc:
                        error = exc.args[0] if exc.args else None
                        if not isinstance(error, KafkaError):
                            raise
                        if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                            continue
                        if error.code() in (KafkaError.TOPIC_EXCEPTION, KafkaError.INVALID_CONFIG):
                            # e.g. a name that collides with another once '.' and '_' are taken as one
                            raise TopicRefused(f"Kafka refused the topic {name}: {error.str()}") from None
                        raise
            self._raise_message_limit([n for n in missing if n in existing])
            self._known.update(missing)
            _wait_for_metadata(self._admin, create)

    def _raise_message_limit(self, names: list[str]) -> None:
        """Topics created before djlink raised the limit (or by hand) take messages up to MAX_MESSAGE_BYTES too."""
        if not names:
            return
        entry = ConfigEntry("max.message.bytes", str(MAX_MESSAGE_BYTES), incremental_operation=AlterConfigOpType.SET)
        resources = [ConfigResource(ResourceType.TOPIC, n, incremental_configs=[entry]) for n in names]
        for resource, fut in self._admin.incremental_alter_configs(resources).items():
            try:
                fut.result(timeout=30)
            except KafkaException as exc:
                log.warning(
                    "topic %s keeps its message size limit (%s): rows over it cannot be published",
                    resource.name,
                    exc.args[0].str(),
                )

    def ensure_control(self, topics: Topics) -> None:
        self.check()
        by_kind: dict[bool, list[str]] = {True: [], False: []}
        for name, compacted in topics.control().items():
            by_kind[compacted].append(name)
        for compacted, names in by_kind.items():
            self.ensure(names, compacted=compacted)


def delete_prefixed(bootstrap: str, prefix: str, timeout_s: float = 30) -> int:
    """Delete every topic named `<prefix>.*` (a test's or a benchmark's); return how many there were."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": KAFKA_LOG})  # type: ignore[dict-item]
    names = [t for t in admin.list_topics(timeout=timeout_s).topics if t.startswith(f"{prefix}.")]
    if names:
        for future in admin.delete_topics(names, operation_timeout=timeout_s).values():
            future.result(timeout_s)
    return len(names)


def _wait_for_metadata(admin: AdminClient, names: list[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending and time.monotonic() < deadline:
        md = admin.list_topics(timeout=5).topics
        pending = {n for n in pending if n not in md or md[n].error is not None or not md[n].partitions}
        if pending:
            time.sleep(0.05)


def producer(settings: Settings, transactional_id: str | None = None, **extra: Any) -> Producer:
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.max.bytes": MAX_MESSAGE_BYTES + 1024 * 1024,  # room for the record batch around one message
        "partitioner": "murmur2_random",  # agree with Java clients on key -> partition
        "logger": KAFKA_LOG,
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
    conf.update(extra)
    return Producer(conf)


def consumer(settings: Settings, group_id: str, **extra: Any) -> Consumer:
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group_id,
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "topic.metadata.refresh.interval.ms": 5000,
        "logger": KAFKA_LOG,
    }
    conf.update(extra)
    return Consumer(conf)


def produce(p: Producer, topic: str, key: bytes | str | None, value: bytes | None) -> None:
    """Produce, waiting for room in the local queue instead of failing."""
    while True:
        try:
            p.produce(topic, key=key, value=value)
            return
        except BufferError:
            p.poll(0.1)


class SchemaTopic:
    """Publishes schemas to `<prefix>.schemas` and resolves fingerprints from it."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self._settings = settings
        self._topic = topics.schemas
        self._published: set[bytes] = set()
        self._seen: dict[bytes, str] = {}

    def publish(self, p: Producer, schema: schemas.Schema) -> None:
        """Produce the schema once per process (inside the caller's transaction, if any)."""
        if schema.fingerprint in self._published:
            return
        body = {
            "fingerprint": schema.fingerprint.hex(),
            "subject": schema.subject,
            "schema": json.dumps(schema.definition),
        }
        produce(p, self._topic, schema.fingerprint.hex(), json.dumps(body).encode())
        self._published.add(schema.fingerprint)

    def publish_fixed(self, p: Producer) -> None:
        """Publish the schemas of every fixed event type, so Kafka alone decodes every topic."""
        for schema in schemas.FIXED.values():
            self.publish(p, schema)

    def resolve(self, fingerprint: bytes) -> str | None:
        """The schema JSON of a fingerprint, reading the schema topic to its end if needed."""
        if fingerprint not in self._seen:
            self._read_all()
        return self._seen.get(fingerprint)

    def _read_all(self) -> None:
        for msg in read_to_end(self._settings.kafka_bootstrap, self._topic):
            if msg.value():
                body = json.loads(msg.value())  # type: ignore[arg-type]
                self._seen[bytes.fromhex(body["fingerprint"])] = body["schema"]


def read_to_end(bootstrap: str, topic: str, timeout_s: float = 30) -> list[Message]:
    """Every committed message of partition 0 of `topic`, from the beginning to its current end.

    The end is where the topic ended when the call started: for a
    read_committed consumer the watermark query answers the last stable
    offset, so an open transaction of an active producer does not keep us
    waiting; at rest the partition-EOF event comes after the transaction
    markers (they take offsets but are never delivered).
    """
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-reader",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    found: list[Message] = []
    try:
        tp = TopicPartition(topic, 0, OFFSET_BEGINNING)
        low, high = c.get_watermark_offsets(tp, timeout=10)
        if high <= low:
            return found
        c.assign([tp])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msg in c.consume(1000, 0.2):
                error = msg.error()
                if error is None:
                    found.append(msg)
                elif error.code() == KafkaError._PARTITION_EOF:
                    return found
            if c.position([TopicPartition(topic, 0)])[0].offset >= high:
                return found
        raise TimeoutError(f"could not read topic {topic} to its end within {timeout_s} s")
    finally:
        c.close()


def where(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


def now_ms() -> int:
    return int(time.time() * 1000)
