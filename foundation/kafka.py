"""Kafka clients for every role, the façade and the command line: built here, and only here.

Whatever a client needs to reach the cluster (bootstrap servers today;
security settings tomorrow) is added in `client_config`, so producers,
consumers and admin clients of every component get it at once. Also the one
"produce, waiting for room in the local queue" and the reading of a topic to
its end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeGuard, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from foundation.config import ConfigError, Settings
from schemas.registry import Registry, registry_at

KAFKA_LOG = logging.getLogger("djlink.kafka")  # librdkafka's own log lines, through Python logging


class ClientLog:
    """librdkafka's log lines (its internals: GETPID retries while a broker starts, reconnects, ...) at DEBUG.

    What matters to a user reaches djlink as an error it handles or reports in its own words; the lines
    themselves are for `djlink run --verbose`.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def log(self, level: int, msg: str, *args: Any) -> None:
        self._logger.log(logging.DEBUG, msg, *args)


CLIENT_LOG = ClientLog(KAFKA_LOG)
log = logging.getLogger(__name__)


class Malformed:
    """Records of a topic that are not what it carries, skipped: said once per offset and process.

    For compacted topics every role reads from the beginning at every start (links, schemas): a record there
    that stopped a reader would stop it for good, since the next start reads it again.
    """

    def __init__(self, topic: str) -> None:
        self._topic = topic
        self._said: set[int] = set()

    def skip(self, msg: Message, reason: BaseException | str) -> None:
        offset = msg.offset() or 0
        if offset not in self._said:
            self._said.add(offset)
            log.warning("skipped a malformed record on %s at offset %d: %s", self._topic, offset, reason)


# What the broker answers a principal whose ACLs lack what it asked for: fatal for a role (it will not pass by
# waiting), and the user's to fix with the site's ACLs (foundation.acls, `djlink acls`).
AUTHORIZATION_ERRORS = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)


# What a partition answers while its leader is not (yet) known: a topic created a moment ago, a broker
# restarting, lost (its connection handle torn down mid-request: _DESTROY_BROKER) or a leader moving. Not all
# are flagged retriable; each passes by waiting.
UNSETTLED_ERRORS = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._TIMED_OUT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TRANSPORT,
        KafkaError._DESTROY_BROKER,
    }
)


def watermarks(c: Consumer, tp: TopicPartition, wait_s: float) -> tuple[int, int]:
    """The partition's low and high watermarks, waiting up to `wait_s` for a partition whose leader is not
    known yet (a topic created a moment ago, a broker restarting); the client's error after that."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            low, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=5)
            return int(low), int(high)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            unsettled = isinstance(error, KafkaError) and (error.code() in UNSETTLED_ERRORS or error.retriable())
            if not unsettled or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def end_offset(c: Consumer, tp: TopicPartition, wait_s: float) -> int:
    """The partition's end (high watermark), as `watermarks` waits for it."""
    return watermarks(c, tp, wait_s)[1]


def ok(msg: Message | None) -> TypeGuard[Message]:
    """True for a message that carries a record; False for None and consumer events (EOF, transient errors).

    An authorization error raises: a consumer told it may not read a topic or use its group would otherwise
    wait for ever, polling nothing.
    """
    if msg is None:
        return False
    error = msg.error()
    if error is None:
        return True
    if error.code() in AUTHORIZATION_ERRORS:
        raise KafkaException(error)
    return False


def refusal(exc: BaseException) -> str | None:
    """One line for an authorization error of the broker, naming what to grant; None for anything else."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if not isinstance(error, KafkaError) or error.code() not in AUTHORIZATION_ERRORS:
        return None
    parts = error.str().split(": Broker: ")[-1].rstrip(".").split(": ")
    text = ": ".join(p for i, p in enumerate(parts) if p not in parts[:i])  # the broker repeats itself
    return (
        f"Kafka refused this principal ({error.name()}: {text}); grant it the ACLs of its site "
        "(`djlink acls --site source|destination` prints them)"
    )


# The largest message on djlink's topics: a row change (two images of a row) or a pull's list of keys.
# Bigger values belong in an external store (blob@, attach@), which djlink copies outside Kafka.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

DeliveryCallback = Callable[[KafkaError | None, Message], None]
T = TypeVar("T")


def client_config(settings: Settings, logger: ClientLog | logging.Logger = CLIENT_LOG) -> dict[str, Any]:
    """What every Kafka client of djlink is configured with, whatever its kind: the bootstrap servers and every
    `DJLINK_KAFKA_<PROPERTY>` setting (security.protocol, sasl.*, ssl.*, ...), as librdkafka takes them."""
    return {"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_properties, "logger": logger}


def _client(kind: Callable[[dict[str, Any]], T], conf: dict[str, Any]) -> T:
    """A client of `kind`; a property librdkafka does not take is one line naming the setting to fix."""
    try:
        return kind(conf)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        text = error.str() if isinstance(error, KafkaError) else str(error)
        raise ConfigError(f"Kafka client settings (DJLINK_KAFKA_*): {text}") from None


def producer(settings: Settings, transactional_id: str | None = None, **extra: Any) -> Producer:
    """An idempotent producer (transactional when given an id), partitioning keys as Java clients do."""
    conf: dict[str, Any] = {
        **client_config(settings),
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.max.bytes": MAX_MESSAGE_BYTES + 1024 * 1024,  # room for the record batch around one message
        "partitioner": "murmur2_random",  # agree with Java clients on key -> partition
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
    conf.update(extra)
    return _client(Producer, conf)


class Transactional:
    """A transactional producer, made anew before the next transaction once a broker connection was lost.

    librdkafka (2.16) can keep a stale group coordinator after a broker restart, and then
    `send_offsets_to_transaction` waits forever, whatever its timeout (librdkafka issues #5456 and #5511):
    the role would stop without a word. A new producer looks its coordinators up afresh, and its
    `init_transactions` fences the old one (docs/faults.md).
    """

    def __init__(self, settings: Settings, transactional_id: str, name: str) -> None:
        self._settings, self._id, self._name = settings, transactional_id, name
        self._lost = False
        self.producer = self._make()

    def _make(self) -> Producer:
        p = producer(self._settings, transactional_id=self._id, error_cb=self._on_error)
        p.init_transactions(60)  # fences a predecessor still running, aborts its open transaction
        return p

    def _on_error(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._lost = True

    def ready(self) -> Producer:
        """The producer for the next transaction (call between transactions, when Kafka answers again)."""
        self.producer.poll(0)  # serves the error callback
        if self._lost:
            self._lost = False
            log.info("%s: the Kafka connection was lost and is back: a new transactional producer", self._name)
            self.producer = self._make()
        return self.producer


def consumer(settings: Settings, group_id: str, **extra: Any) -> Consumer:
    """A `read_committed` consumer that commits nothing by itself and starts at the beginning of a partition."""
    conf: dict[str, Any] = {
        **client_config(settings),
        "group.id": group_id,
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "topic.metadata.refresh.interval.ms": 5000,
    }
    conf.update(extra)
    return _client(Consumer, conf)


def admin_client(settings: Settings, logger: ClientLog | logging.Logger = CLIENT_LOG) -> AdminClient:
    """An admin client (topic creation, metadata, deletion)."""
    return _client(AdminClient, client_config(settings, logger))


def schema_registry(settings: Settings) -> Registry | None:
    """The schema registry client (DJLINK_SCHEMA_REGISTRY_URL and _<PROPERTY>), or None when none is configured."""
    return registry_at(settings.schema_registry_url, settings.schema_registry_properties)


def produce(
    p: Producer, topic: str, key: bytes | str | None, value: bytes | None, on_delivery: DeliveryCallback | None = None
) -> None:
    """Produce, waiting for room in the local queue instead of failing."""
    while True:
        try:
            if on_delivery is None:
                p.produce(topic, key=key, value=value)
            else:
                p.produce(topic, key=key, value=value, on_delivery=on_delivery)
            return
        except BufferError:
            p.poll(0.1)


def read_to_end(settings: Settings, topic: str, timeout_s: float = 30) -> list[Message]:
    """Every committed message of partition 0 of `topic`, from the beginning to its current end.

    The end is where the topic ended when the call started: for a
    read_committed consumer the watermark query answers the last stable
    offset, so an open transaction of an active producer does not keep us
    waiting; at rest the partition-EOF event comes after the transaction
    markers (they take offsets but are never delivered). A topic that does not exist (yet) holds nothing.
    """
    c = consumer(settings, f"{topic}-reader", **{"enable.partition.eof": True})  # as Topics.reader_group names it
    found: list[Message] = []
    try:
        tp = TopicPartition(topic, 0, OFFSET_BEGINNING)
        try:
            low, high = c.get_watermark_offsets(tp, timeout=10)
        except KafkaException as exc:
            code = exc.args[0].code() if exc.args and isinstance(exc.args[0], KafkaError) else None
            if code in (KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                return found
            raise
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
