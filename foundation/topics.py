"""Kafka topics of a deployment: their names, group names and transactional ids, creation, the schema topic.

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

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

import schemas
from foundation.config import ConfigError, Settings
from foundation.kafka import MAX_MESSAGE_BYTES, Malformed, admin_client, produce, read_to_end

_TOPIC_BAD = re.compile(r"[^A-Za-z0-9._]")
log = logging.getLogger(__name__)


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
        # Consumer groups and transactional ids: one per role and deployment.
        self.capture_group = f"{prefix}-capture"  # also the capture's transactional id and checkpoint name
        self.agent_group = f"{prefix}-agent"  # also the source agent's transactional id
        self.auto_pull_group = f"{prefix}-agent-auto"
        self.applier_group = f"{prefix}-applier"  # Kafka offsets for lag monitoring; the real ones are in the DB

    def facade_group(self, request_id: str) -> str:
        """The group of the façade's reader of the replies to one request (it commits nothing)."""
        return f"{self.prefix}-facade-{request_id}"

    def reader_group(self, topic: str) -> str:
        """The group of a reader that assigns partitions itself and commits nothing."""
        return f"{topic}-reader"

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


class _Said(logging.Handler):
    """What librdkafka logged while a probe waited: the cause of a failure it reports only as a timeout."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < 1000:
            self.lines.append(record.getMessage())

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def first(self, text: str) -> str:
        found = next((line for line in self.lines if text in line), "")
        return found[found.find(text) :][:200]


class TopicRefused(Exception):
    """Kafka will not create a topic by that name (it collides with another, or is invalid)."""


class KafkaUnavailable(Exception):
    """The broker does not answer."""


class Admin:
    """Creates topics once, remembering what exists."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._admin = admin_client(settings)
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise KafkaUnavailable, in words for the user, when the broker does not answer in time."""
        quiet = logging.getLogger("djlink.kafka.check")
        quiet.propagate = False  # librdkafka's per-attempt connection errors would bury the one line we print
        quiet.setLevel(logging.DEBUG)  # to `said` only: the connection failures are INFO
        said = _Said()
        quiet.addHandler(said)
        probe = admin_client(self._settings, quiet)
        try:
            probe.list_topics(timeout=self._settings.startup_timeout_s)
        except KafkaException as exc:
            probe.poll(0)  # serves the log queue: what librdkafka said while it waited
            bootstrap = self._settings.kafka_bootstrap
            if said.has("SASL authentication error"):
                raise KafkaUnavailable(
                    f"Kafka refused the credentials of {bootstrap}: check DJLINK_KAFKA_SASL_USERNAME, "
                    "DJLINK_KAFKA_SASL_PASSWORD and DJLINK_KAFKA_SASL_MECHANISM"
                ) from None
            if said.has("SSL handshake failed") or said.has("certificate verify failed"):
                raise KafkaUnavailable(
                    f"TLS with Kafka at {bootstrap} failed ({said.first('SSL handshake failed')}): check that "
                    "this listener speaks TLS (DJLINK_KAFKA_SECURITY_PROTOCOL), DJLINK_KAFKA_SSL_CA_LOCATION, and "
                    "that the broker's certificate names the host you connect to"
                ) from None
            hint = "check DJLINK_KAFKA_BOOTSTRAP and that the broker runs"
            if said.has("APIVERSION_QUERY"):  # a listener that speaks TLS or SASL hangs up on a plain client
                hint = "the broker hangs up on this client: does it need DJLINK_KAFKA_SECURITY_PROTOCOL=SASL_SSL?"
            raise KafkaUnavailable(
                f"cannot reach Kafka at {bootstrap} "
                f"within {self._settings.startup_timeout_s:.0f} s ({exc.args[0].str() if exc.args else exc}); {hint}"
            ) from None
        finally:
            quiet.removeHandler(said)

    def ensure(self, names: Iterable[str], compacted: bool = False, partitions: int = 1) -> None:
        with self._lock:
            missing = [n for n in names if n not in self._known]
            if not missing:
                return
            metadata = self._admin.list_topics(timeout=10).topics
            existing = set(metadata)
            create = [n for n in missing if n not in existing]
            # Rows with big blobs, and pulls of many keys, exceed Kafka's default 1 MB per message.
            config = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
            if compacted:
                config["cleanup.policy"] = "compact"
            if self._settings.topic_min_insync_replicas is not None:
                config["min.insync.replicas"] = str(self._settings.topic_min_insync_replicas)
            replicas = self._settings.topic_replication_factor  # -1: the cluster's default.replication.factor
            if create:
                futures = self._admin.create_topics(
                    [NewTopic(n, num_partitions=partitions, replication_factor=replicas, config=config) for n in create]
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
                        if error.code() in (KafkaError.INVALID_REPLICATION_FACTOR, KafkaError.POLICY_VIOLATION):
                            raise ConfigError(
                                f"Kafka cannot create topic {name} with DJLINK_TOPIC_REPLICATION_FACTOR={replicas}: "
                                f"{error.str()} (-1, the default, takes the cluster's default.replication.factor)"
                            ) from None
                        if error.code() in (KafkaError.TOPIC_EXCEPTION, KafkaError.INVALID_CONFIG):
                            # e.g. a name that collides with another once '.' and '_' are taken as one
                            raise TopicRefused(f"Kafka refused the topic {name}: {error.str()}") from None
                        raise
            self._warn_few_replicas({n: metadata[n] for n in missing if n in existing})
            self._raise_message_limit([n for n in missing if n in existing])
            self._known.update(missing)
            _wait_for_metadata(self._admin, create)

    def _warn_few_replicas(self, topics: dict[str, Any]) -> None:
        """One line per existing topic with fewer replicas than DJLINK_TOPIC_REPLICATION_FACTOR asks for."""
        wanted = self._settings.topic_replication_factor
        for name, meta in topics.items():
            have = min((len(p.replicas) for p in meta.partitions.values()), default=0)
            if 0 < wanted and have < wanted:
                log.warning(
                    "topic %s has %d replica(s), fewer than DJLINK_TOPIC_REPLICATION_FACTOR=%d: losing a broker can "
                    "lose what it holds; raise them with kafka-reassign-partitions",
                    name,
                    have,
                    wanted,
                )

    def _raise_message_limit(self, names: list[str]) -> None:
        """Topics created before djlink raised the limit (or by hand) take messages up to MAX_MESSAGE_BYTES too."""
        names = self._below_message_limit(names)
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

    def _below_message_limit(self, names: list[str]) -> list[str]:
        """Those of `names` whose max.message.bytes is below djlink's (or cannot be read: then try to raise it)."""
        if not names:
            return []
        below = []
        resources = [ConfigResource(ResourceType.TOPIC, n) for n in names]
        for resource, fut in self._admin.describe_configs(resources).items():
            try:
                entry = fut.result(timeout=30).get("max.message.bytes")
            except KafkaException:
                entry = None
            if entry is None or int(entry.value or 0) < MAX_MESSAGE_BYTES:
                below.append(resource.name)
        return below

    def ensure_control(self, topics: Topics) -> None:
        self.check()
        by_kind: dict[bool, list[str]] = {True: [], False: []}
        for name, compacted in topics.control().items():
            by_kind[compacted].append(name)
        for compacted, names in by_kind.items():
            self.ensure(names, compacted=compacted)


def delete_prefixed(settings: Settings, prefix: str, timeout_s: float = 30) -> int:
    """Delete every topic named `<prefix>.*` (a test's or a benchmark's); return how many there were."""
    admin = admin_client(settings)
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


class SchemaTopic:
    """Publishes schemas to `<prefix>.schemas` and resolves fingerprints from it."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self._settings = settings
        self._topic = topics.schemas
        self._published: set[bytes] = set()
        self._seen: dict[bytes, str] = {}
        self._malformed = Malformed(self._topic)

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
        for msg in read_to_end(self._settings, self._topic):
            if not msg.value():
                continue
            try:
                body = json.loads(msg.value())  # type: ignore[arg-type]
                fingerprint, text = bytes.fromhex(body["fingerprint"]), body["schema"]
                if not isinstance(text, str):
                    raise TypeError("its schema is not a JSON string")
            except (ValueError, KeyError, TypeError) as exc:  # a record that is not a schema must not stop anyone
                self._malformed.skip(msg, exc)
                continue
            self._seen[fingerprint] = text
