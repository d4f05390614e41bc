"""The applier: writes pulled entities into the destination server, one unit at a time, exactly once.

It consumes the change topics of every link and the transaction topic
(`read_committed`), gathers each unit's events until the unit's END says it
is complete, writes the unit's master and part rows in ONE destination
transaction, then acknowledges the entities to the source agent.

Exactly once. The offsets consumed are stored in the destination database
(`consumers.offsets_store`, database `DJLINK_APPLIER_STATE_DB`, default
`djlink_applier`), in the same transaction as the rows of the unit they
complete, together with the unit's id and the unit's ack (sent after the
commit, resent at the next start when a crash came first). The stored
offsets are a cut that never passes a message of an unfinished unit and
never splits a unit (`offsets_store.safe_offsets`), so a restart reads every
unit either not at all or whole. A unit read again whole is refused by its
id (`applied_units`, kept 7 days: Kafka's default retention, beyond which a
unit cannot come back; pruned at most once an hour): that id check is what
makes a replay (offsets restored from an old backup, a COMMIT whose
connection dropped and is retried) skip a unit instead of applying it twice.
Units the applier does not apply (streamed source transactions, helper-table
changes) move the stored offsets on in a small transaction of their own, at
most once a second. The applier assigns itself every partition of the topics
it follows (no group rebalancing: a unit's events span several topics and
one consumer must read them all) and starts each at its stored offset;
Kafka's committed offsets are also written, for lag monitoring only. One
applier per deployment: a second one finds the lock the first holds in the
destination server (`GET_LOCK`) and stops with a clear error.

Dead letters. A message that cannot be decoded goes to `<prefix>.dead-letter`
on its own (stage 'decode'); a unit the destination refuses (missing table or
column, a value it rejects, ...) is rolled back, each of its events goes
there with the database's reason (stage 'apply'), the unit is recorded as
finished ('dead-letter') with its offsets, and the applier goes on; so do
events whose END never comes (stage 'gather': strays, or a unit whose END was
undecodable), recognised once an END produced 30 s after them has been read.
A dead letter is delivered before any offset past it is stored (at least
once: a crash may repeat one; topic, partition and offset identify it).
Lost connections, deadlocks and lock timeouts are not the unit's fault: the
applier reconnects and retries the transaction instead. One log line per
dead-lettered message or unit.

Entities, mirroring, flags. The applier also reads the helper tables' change
topics and keeps, per entity, its helper row as last captured and whether its
rows are here (`entities` in the state database, saved with the unit that
changed it). A source transaction's changes to master and part rows are
applied only for entities that are shared (process NONE, not deprecated:
Shared or Tainted) or received (process PULL, rows already here); changes of
any other entity are not the destination's business. A change of an entity's
flags (`is_flagged`, `is_deprecated`) is published on the compacted
`<prefix>.flags` topic after its commit (outbox column `flag_pending`):
a record while flagged or deprecated, a tombstone once neither.

Order and batches. Units are applied strictly in the order the capture
produced them (their ENDs' order), many per destination transaction (at most
DJLINK_APPLIER_BATCH_UNITS units, MAX_BATCH_EVENTS events), with one multi-row statement
per run of rows of one table. A source transaction read again is recognised
by its GTID (`source_positions`: the last sequence number applied per
replication domain), a snapshot unit by its id (`applied_units`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import pymysql
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

import schemas
from consumers.integrity import ACKED_AS, EntityState, HelperRow, Outcome, decide_process, needs_presence
from consumers.offsets_store import (
    PRUNE_EVERY_S,
    Finished,
    Offset,
    OffsetsStore,
    Partition,
    UnitOffsets,
    changed,
    cutoff,
    safe_offsets,
)
from foundation import keys as keycodec
from foundation.config import ConfigError, Settings
from foundation.dberrors import describe, is_transient
from foundation.dead_letters import DeadLetter
from foundation.gtid import Gtid, parse_gtid
from foundation.kafka import consumer, now_ms, produce, producer, where
from foundation.keys import KeyReason
from foundation.links import LinkRegistry, LinkSpec, destination_name, external_table
from foundation.sql import in_clause, quote
from foundation.stores import ObjectError, Store, StoreError, Stores, copy_object, holds
from foundation.topics import Admin, SchemaTopic, Topics
from schemas.registry import registry_at
from schemas.tables import EnvelopeReader

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_EVERY_S = 1.0  # store offsets that moved without applying anything at most this often
# Events whose END has not come although an END produced this much later has: their END is lost (strays).
ORPHAN_AFTER_MS = 30_000
MAX_COPIED_REMEMBERED = 100_000  # objects known copied (skipped while the destination has them)
TRANSACTION_FIELDS = frozenset({"status", "id", "data_collections", "request_id", "link_id"})
ER_NO_SUCH_TABLE = 1146
WAITING_WARN_S = 5.0  # warn when the next unit in order has been incomplete this long
MAX_BATCH_EVENTS = 20_000  # events per destination transaction, at most (a unit is never split)
UNKNOWN_SCHEMA_TTL_S = 10.0  # a fingerprint the schema topic lacked is not looked up again this soon


def kafka_ts(msg: Message) -> int:
    """A message's Kafka timestamp (producer's create time), ms since epoch; 0 when it has none."""
    _kind, ts = msg.timestamp()
    return int(ts) if ts is not None and ts > 0 else 0


def read_past(
    partitions: list[Partition],
    end_ts_ms: int,
    read_ts: dict[Partition, int],
    consumed: dict[Partition, int],
    high: Callable[[Partition], int],
) -> bool:
    """Whether each partition that could still hold a unit's missing events has been read past the unit.

    Past: a message produced after the unit's END (Kafka timestamp
    `end_ts_ms`) was read there, since the capture produces a unit's events
    before its END; or the partition is read to its end (`high`: its high
    watermark as last fetched, negative when unknown). Only then are the
    events missing rather than late: catching up a backlog reads the
    transaction topic far ahead of the change topics.
    """
    for partition in partitions:
        if read_ts.get(partition, -1) > end_ts_ms:
            continue
        end = high(partition)
        if end < 0 or consumed.get(partition, 0) < end:
            return False
    return True


class Unappliable(Exception):
    """The destination refused a unit's rows: the unit goes to the dead-letter topic."""


class DeadLetterUndelivered(Exception):
    """Kafka did not confirm a dead letter: stop before any offset past it is stored."""


@dataclass(frozen=True)
class Event:
    """One change event of a unit, decoded, with its original bytes (for the dead-letter topic)."""

    collection: str  # 'db.table'
    envelope: dict[str, Any]
    convert: dict[str, Any]
    key: bytes | None
    value: bytes | None
    ts_ms: int  # the message's Kafka timestamp


@dataclass
class PendingUnit:
    """The events of one unit seen so far, and its END once it arrives."""

    end: dict[str, Any] | None = None
    end_offset: Offset | None = None
    end_ts_ms: int = 0  # the END's Kafka timestamp
    events: dict[Offset, Event] = field(default_factory=dict)
    have: Counter[str] = field(default_factory=Counter)  # events per collection, kept with `events`

    def add(self, at: Offset, event: Event) -> None:
        if at not in self.events:
            self.have[event.collection] += 1
        self.events[at] = event

    def complete(self, tracked: set[str]) -> bool:
        if self.end is None:
            return False
        for dc in self.end["data_collections"] or []:
            if dc["data_collection"] in tracked and self.have[dc["data_collection"]] < dc["event_count"]:
                return False
        return True

    def offsets(self) -> list[Offset]:
        return list(self.events) + ([self.end_offset] if self.end_offset else [])

    def where(self, finished: bool) -> UnitOffsets:
        return UnitOffsets(self.end_offset[2] if self.end_offset else None, tuple(self.offsets()), finished)


EntityKey = tuple[str, str]  # link id, canonical primary key
Target = tuple[str, str]  # destination db, table
TrackedKey = tuple[str, str, bytes]  # source db, store, hash: one `~external_<store>` row


@dataclass
class Plan:
    """What one unit does at the destination: decided before its transaction, from the entity states."""

    unit_id: str
    unit: PendingUnit
    link_id: str | None  # a pull's link; None for a source transaction (mirrored) or an initial snapshot
    gtid: Gtid | None  # of a source transaction; other units are claimed by id
    writes: list[tuple[str, Target, list[dict[str, Any]]]] = field(default_factory=list)
    states: dict[EntityKey, EntityState] = field(default_factory=dict)  # as the unit leaves them
    flags: dict[EntityKey, int] = field(default_factory=dict)  # flag changed -> source commit ms
    tracked: dict[TrackedKey, dict[str, Any] | None] = field(default_factory=dict)  # `~external` rows captured
    ack: bytes | None = None
    entities: list[EntityKey] = field(default_factory=list)  # a processing unit's entities

    def write(self, kind: str, target: Target, row: dict[str, Any]) -> None:
        """Add a row; consecutive rows of one kind, table and shape share one statement."""
        last = self.writes[-1] if self.writes else None
        if last is not None and last[0] == kind and last[1] == target and last[2][0].keys() == row.keys():
            last[2].append(row)
        else:
            self.writes.append((kind, target, [row]))


def merged_writes(plans: list[Plan]) -> list[tuple[str, Target, list[dict[str, Any]]]]:
    """The writes of several plans in order, consecutive ones of one kind, table and shape merged."""
    merged: list[tuple[str, Target, list[dict[str, Any]]]] = []
    for plan in plans:
        for kind, target, rows in plan.writes:
            last = merged[-1] if merged else None
            if last is not None and last[0] == kind and last[1] == target and last[2][0].keys() == rows[0].keys():
                last[2].extend(rows)
            else:
                merged.append((kind, target, list(rows)))
    return merged


class DeadLetters:
    """Produces dead-letter records and makes sure Kafka has them before offsets move past them."""

    def __init__(self, p: Any, topic: str, codec: schemas.Codec) -> None:
        self._p = p
        self._topic = topic
        self._codec = codec
        self._unconfirmed = 0
        self._failures: list[str] = []
        self.sent = 0

    def send(
        self, at: Offset, key: bytes | None, value: bytes | None, reason: str, stage: str, unit_id: str | None = None
    ) -> None:
        data = DeadLetter(*at, key, value, reason, stage, unit_id).encode(self._codec)
        produce(self._p, self._topic, at[0], data, self._delivered)
        self._unconfirmed += 1
        self.sent += 1

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        self._unconfirmed -= 1
        if err is not None:
            self._failures.append(str(err))

    def confirm(self, timeout_s: float = 30) -> None:
        """Wait until Kafka has every dead letter sent so far; raise when it does not."""
        if self._unconfirmed == 0 and not self._failures:
            return
        self._p.flush(timeout_s)
        if self._unconfirmed > 0 or self._failures:
            raise DeadLetterUndelivered(
                f"{self._unconfirmed} dead letters unconfirmed after {timeout_s:.0f} s, "
                f"{len(self._failures)} failed ({'; '.join(self._failures[:3])})"
            )


class Applier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.group = self.topics.applier_group
        self._schema_topic = SchemaTopic(settings, self.topics)
        self._unknown_schemas: dict[bytes, float] = {}
        self._codec = schemas.Codec(self._resolve_schema, registry=registry_at(settings.schema_registry_url))
        self._store = OffsetsStore(settings.applier_state_db, self.group)
        self._stop = threading.Event()
        self._pending: dict[str, PendingUnit] = {}
        self._finished: dict[str, UnitOffsets] = {}  # finished units a restart may still have to read again
        self._by_topic: dict[str, str] = {}  # change topic -> 'db.table'
        self._links_of: dict[str, LinkSpec] = {}  # 'db.table' -> link, data tables only
        self._helper_of: dict[str, LinkSpec] = {}  # 'db.table' of a helper table -> its link
        self._tracked: set[str] = set()  # 'db.table' of the tables read: data, external and helper tables
        self._store_of: dict[str, str] = {}  # 'db.~external_<store>' -> store
        self._in_store: dict[str, list[tuple[str, str]]] = {}  # 'db.table' -> (column, store) of in-store attributes
        self._source_stores = Stores(settings.source_stores, "DJLINK_SOURCE_STORES")
        self._destination_stores = Stores(settings.destination_stores, "DJLINK_DEST_STORES")
        # (destination store, db, hash, contents hash) of objects this process copied and verified: copied again
        # only when the destination no longer has them (cleaned up there after a delete, say).
        self._copied: set[tuple[str, str, bytes, bytes]] = set()
        self._checked: set[tuple[str, str, bytes, bytes]] = set()  # of those, found still there in this batch
        self._exclusions: dict[str, dict[EntityKey, str]] = {}  # unit -> entities left out of its plan, and why
        self._tracked_overlay: dict[TrackedKey, dict[str, Any] | None] = {}  # of the batch being planned
        self.objects_copied = 0
        self._entities: dict[EntityKey, EntityState] = {}
        self._positions: dict[int, int] = {}  # replication domain -> seq no of the last source transaction applied
        self._flag_outbox: dict[EntityKey, int] = {}  # flag changes committed, not yet on the flags topic
        self._flags_delivered: list[EntityKey] = []
        self._waiting_for: tuple[str, float, bool] | None = None  # unit id, since, warned
        self._key_columns_of: dict[bytes, list[str]] = {}  # key schema fingerprint -> primary key columns
        self._captured: set[str] = set()  # 'db.table' of every table the capture publishes for our links
        self._links: dict[str, LinkSpec] = {}
        self._subscribed: list[str] = []  # topics whose partitions are assigned
        self._wanted: list[str] = []
        self._retry_assign_at = 0.0
        self._assigned: set[Partition] = set()
        self._envelopes = EnvelopeReader(self._codec)
        self._consumed: dict[Partition, int] = {}
        self._read_ts: dict[Partition, int] = {}  # Kafka timestamp of the last message read, per partition
        self._stored: dict[Partition, int] = {}
        self._committed_to_kafka: dict[Partition, int] = {}
        self._last_progress = 0.0
        self._latest_end_ms = 0  # Kafka timestamp of the newest END read
        self._next_prune = 0.0
        self._outbox: dict[str, tuple[str, bytes]] = {}  # unit id -> (link id, ack) committed, not yet delivered
        self._delivered: list[str] = []
        self.units_applied = 0
        self.units_skipped = 0
        self.units_mirrored = 0
        self.units_dead_lettered = 0

    # -- connections ---------------------------------------------------------

    def _connect(self) -> Any:
        return self.settings.destination.connect(utc=True, autocommit=False)

    def _transact(self, work: Callable[[Any], T], commit: bool = True) -> T:
        """Run `work(cursor)` as one destination transaction; on a lost connection reconnect and run it again.

        A COMMIT whose connection drops may or may not have happened: the
        retry then finds its unit already finished (OffsetsStore.claim) and
        skips it. Any other error rolls back and propagates.
        """
        delay = 0.1
        while True:
            try:
                self._db.ping(reconnect=True)
                with self._db.cursor() as cur:
                    result = work(cur)
                if commit:
                    self._db.commit()
                else:  # a trial: nothing of it stays
                    self._db.rollback()
                return result
            except BaseException as exc:
                self._rollback()
                if not is_transient(exc) or self._stop.is_set():
                    raise
                log.warning("destination database: %s; retrying in %.1f s", describe(exc), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _rollback(self) -> None:
        try:
            self._db.rollback()
        except Exception:  # the connection is gone: nothing to roll back, ping reconnects
            pass

    def _resolve_schema(self, fingerprint: bytes) -> str | None:
        """The schema topic, asked at most once per UNKNOWN_SCHEMA_TTL_S for a fingerprint it lacked."""
        if self._unknown_schemas.get(fingerprint, 0.0) > time.monotonic():
            return None
        text = self._schema_topic.resolve(fingerprint)
        if text is None:
            self._unknown_schemas[fingerprint] = time.monotonic() + UNKNOWN_SCHEMA_TTL_S
        return text

    # -- subscription ----------------------------------------------------------

    def _follow(self, links: dict[str, LinkSpec]) -> list[str]:
        self._links = dict(links)
        self._by_topic = {}
        self._links_of = {}
        self._helper_of = {}
        self._store_of = {}
        self._in_store = {}
        for link in links.values():
            for db, table in link.data_tables():
                self._by_topic[self.topics.table(db, table)] = f"{db}.{table}"
                self._links_of[f"{db}.{table}"] = link
            self._by_topic[self.topics.table(link.helper_db, link.helper_table)] = link.helper_collection
            self._helper_of[link.helper_collection] = link
            for store in link.external_stores():
                collection = f"{link.source_db}.{external_table(store)}"
                self._by_topic[self.topics.table(link.source_db, external_table(store))] = collection
                self._store_of[collection] = store
            for table, column, store in link.externals:
                self._in_store.setdefault(f"{link.source_db}.{table}", []).append((column, store))
        self._tracked = set(self._links_of) | set(self._helper_of) | set(self._store_of)
        self._captured = {f"{db}.{table}" for link in links.values() for db, table in link.captured_tables()}
        return [self.topics.transaction, *sorted(self._by_topic)]

    def _subscribe(self, links: dict[str, LinkSpec]) -> None:
        """Follow the topics of `links`: assign every partition of each topic not assigned yet.

        Partitions are assigned by hand, not by the consumer group: there is
        one applier per deployment (`_fence`), its offsets live in the
        destination database, and a group would only add rebalances (with
        a static member, a restart after the subscription grew even kept the
        old, smaller assignment). A new partition starts at its stored offset,
        or at the beginning.
        """
        self._wanted = wanted = self._follow(links)
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
                offset = self._stored.get(at, OFFSET_BEGINNING)
                partitions.append(TopicPartition(topic, number, offset))
                self._assigned.add(at)
                if at in self._stored:
                    self._consumed[at] = self._stored[at]
            self._subscribed.append(topic)
        if partitions:
            self._c.incremental_assign(partitions)
            log.info("applier follows %d more partitions (%d topics in all)", len(partitions), len(self._subscribed))

    def _fence(self) -> None:
        """Hold a lock in the destination that a second applier of this deployment cannot take."""
        self._lock_conn = self._connect()
        with self._lock_conn.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (f"djlink-applier:{self.group}"[:64],))
            (got,) = cur.fetchone()
        if got != 1:
            raise ConfigError(
                f"another applier of deployment '{self.topics.prefix}' is running against this destination "
                "(it holds the lock); run one applier per topic prefix"
            )

    # -- the loop ----------------------------------------------------------------

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        self._stop = stop
        Admin(s).ensure_control(self.topics)
        registry = LinkRegistry(s, self.topics)
        registry.catch_up()
        self._db = self._connect()
        self._fence()
        self._transact(self._store.ensure)
        self._p = producer(s)
        self._schema_topic.publish_fixed(self._p)
        self._dead_letters = DeadLetters(self._p, self.topics.dead_letter, self._codec)
        for unit_id, link_id, ack in self._transact(self._store.unsent_acks):
            self._outbox[unit_id] = (link_id, ack)
        if self._outbox:
            log.info("resending the acks of %d units committed before the last stop", len(self._outbox))
        self._entities, unsent_flags = self._transact(self._store.load_entities)
        self._positions = self._transact(self._store.load_positions)
        self._flag_outbox = {key: 0 for key in unsent_flags}
        self._send_acks()
        self._send_flags()
        self._stored = self._transact(self._store.load_offsets)
        self._c = consumer(s, self.group)
        self._subscribe(registry.links)
        if on_ready:
            on_ready()
        clean = False
        try:
            while not stop.is_set():
                late = len(self._subscribed) < len(self._wanted) and time.monotonic() > self._retry_assign_at
                if registry.refresh(0) or late:
                    self._subscribe(registry.links)
                # Wait for the first message only; then take what is there (consume(n, t) would wait the
                # whole timeout for n messages, and every mirrored change would pay it).
                first = self._c.poll(0.05)
                for msg in [first, *self._c.consume(499, 0)] if first is not None else []:
                    if msg.error() is None and self._route(msg, registry):
                        self._subscribe(registry.links)
                self._dead_letters.confirm()
                self._apply_complete(registry)
                self._send_acks()
                self._send_flags()
                self._store_progress()
                self._prune()
            clean = True
        finally:
            # Only after a clean stop: leaving on an error, units taken out of the gathering may not have been
            # applied, and storing offsets past them would lose them. A restart re-reads from the last stored
            # offsets; what was applied is recognised (claims, source positions) and not applied twice.
            if clean:
                try:
                    self._dead_letters.confirm(10)
                    self._store_progress(force=True)
                except Exception as exc:
                    log.warning("could not store the final offsets: %s", describe(exc))
            self._c.close()
            registry.close()
            self._p.flush(10)
            self._db.close()
            self._lock_conn.close()

    def _route(self, msg: Message, registry: LinkRegistry) -> bool:
        """Take one message into its unit; True when it taught us of new links (resubscribe)."""
        at = where(msg)
        topic = at[0]
        self._consumed[(topic, at[1])] = at[2] + 1
        self._read_ts[(topic, at[1])] = kafka_ts(msg)
        value = msg.value()
        if value is None:
            return False  # tombstone
        if topic == self.topics.transaction:
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
            self._latest_end_ms = max(self._latest_end_ms, kafka_ts(msg))
            unit = self._unit(record["id"])
            unit.end, unit.end_offset, unit.end_ts_ms = record, at, kafka_ts(msg)
            # Links are published before their first event; a unit of a table not known yet means
            # the links topic is behind this consumer, not that the unit is someone else's. (Helper
            # tables are known too: their units, one per ack, would otherwise each wait for the links topic.)
            unknown = [dc for dc in record["data_collections"] or [] if dc["data_collection"] not in self._captured]
            return bool(unknown) and registry.catch_up()
        collection = self._by_topic.get(topic)
        if collection is None:
            return False
        try:
            vschema, envelope = self._codec.decode_with_schema(value)
            convert = self._envelopes.converters(vschema)
        except schemas.DecodeError as exc:
            self._reject(msg, str(exc))
            return False
        block = envelope.get("transaction")
        if not block or not block.get("id"):
            self._reject(msg, f"{vschema.subject}: change event without a transaction block")
            return False
        self._unit(block["id"]).add(at, Event(collection, envelope, convert, msg.key(), value, kafka_ts(msg)))
        return False

    def _unit(self, unit_id: str) -> PendingUnit:
        """The unit being gathered under this id, new if none (not setdefault: a PendingUnit per event)."""
        unit = self._pending.get(unit_id)
        if unit is None:
            unit = self._pending[unit_id] = PendingUnit()
        return unit

    def _reject(self, msg: Message, reason: str) -> None:
        """Dead-letter one undecodable message."""
        at = where(msg)
        self._dead_letters.send(at, msg.key(), msg.value(), reason, "decode")
        log.warning("dead-lettered undecodable message %s[%d]@%d: %s", *at, reason)

    # -- units -------------------------------------------------------------------

    def _reap_orphans(self) -> None:
        """Give up units whose END will not come: one produced well after their events has been read already.

        The capture commits a unit's events and its END in one Kafka
        transaction, so this happens only to strays (events copied onto a
        change topic) or units whose END was undecodable. A stray of a unit
        finished before is dropped; any other is dead-lettered.
        """
        for unit_id, unit in list(self._pending.items()):
            if unit.end is not None or not unit.events:
                continue
            newest = max(e.ts_ms for e in unit.events.values())
            if self._latest_end_ms - newest <= ORPHAN_AFTER_MS:
                continue
            self._finish(unit_id)
            reason = f"the END of unit {unit_id} is not on the transaction topic (a stray, or its END was lost)"
            self._give_up(unit_id, unit, None, reason, "gather")

    def _finish(self, unit_id: str) -> None:
        """Take a unit out of the gathering; its offsets may now move on (see offsets_store.safe_offsets)."""
        self._finished[unit_id] = self._pending.pop(unit_id).where(finished=True)

    def _apply_complete(self, registry: LinkRegistry) -> None:
        """Apply complete units in the order they were produced, many per destination transaction.

        Order is strict: a unit whose END has come but whose events have not
        all been read yet holds back every later one (a mirrored change must
        never overtake an older one). Its events come within milliseconds;
        if they have not come once an END produced ORPHAN_AFTER_MS later has
        been read and their change topics have been read past the unit
        (`_read_past`), they never will (undecodable, dead-lettered on their
        own), and the unit is given up.
        """
        self._reap_orphans()
        ended = sorted((unit.end_offset[2], unit_id) for unit_id, unit in self._pending.items() if unit.end_offset)
        batch: list[tuple[str, PendingUnit]] = []
        rows = 0
        for _, unit_id in ended:
            unit = self._pending[unit_id]
            assert unit.end is not None
            if not unit.complete(self._tracked):
                if self._latest_end_ms - unit.end_ts_ms <= ORPHAN_AFTER_MS or not self._read_past(unit):
                    self._note_waiting(unit_id, unit)
                    break
                self._apply_batch(batch, registry)
                batch, rows = [], 0
                self._finish(unit_id)
                reason = f"events of unit {unit_id} are missing from their change topics (undecodable?)"
                self._give_up(unit_id, unit, unit.end["link_id"], reason, "gather")
                continue
            self._finish(unit_id)
            if any(dc["data_collection"] in self._tracked for dc in unit.end["data_collections"] or []):
                batch.append((unit_id, unit))
                rows += len(unit.events)
            if len(batch) >= self.settings.applier_batch_units or rows >= MAX_BATCH_EVENTS:
                self._apply_batch(batch, registry)
                batch, rows = [], 0
        self._apply_batch(batch, registry)

    def _read_past(self, unit: PendingUnit) -> bool:
        """Whether the change topics have been read past the unit (see `read_past`)."""
        assert unit.end is not None
        have = unit.have
        topics = {
            topic
            for dc in unit.end["data_collections"] or []
            if dc["data_collection"] in self._tracked and have[dc["data_collection"]] < dc["event_count"]
            for topic, collection in self._by_topic.items()
            if collection == dc["data_collection"]
        }

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
        consumed = {p: max(self._consumed.get(p, 0), positions.get(p, 0)) for p in partitions}
        return read_past(partitions, unit.end_ts_ms, self._read_ts, consumed, high)

    def _note_waiting(self, unit_id: str, unit: PendingUnit) -> None:
        """Say so (once) when the unit every later one waits for has been incomplete for a while."""
        if self._waiting_for is None or self._waiting_for[0] != unit_id:
            self._waiting_for = (unit_id, time.monotonic(), False)
        elif not self._waiting_for[2] and time.monotonic() - self._waiting_for[1] > WAITING_WARN_S:
            assert unit.end is not None
            have = unit.have
            missing = {
                dc["data_collection"]: f"{have[dc['data_collection']]}/{dc['event_count']}"
                for dc in unit.end["data_collections"] or []
                if dc["data_collection"] in self._tracked and have[dc["data_collection"]] < dc["event_count"]
            }
            log.warning("unit %s has waited %.0f s for events (have/expected: %s)", unit_id, WAITING_WARN_S, missing)
            self._waiting_for = (unit_id, self._waiting_for[1], True)

    def _apply_batch(self, batch: list[tuple[str, PendingUnit]], registry: LinkRegistry) -> None:
        """Plan the units against the entity states, then commit them in one transaction.

        When the destination refuses the transaction, the units are committed
        one by one instead, so that only the refused one is dead-lettered;
        offsets are stored at the end then, claims and source positions keep
        a crash in between from applying a unit twice.
        """
        if not batch:
            return
        plans = self._plan_all(batch, registry)
        try:
            self._commit(plans, changed(self._safe_offsets(), self._stored))
            return
        except Unappliable as exc:
            if len(batch) == 1:
                self._settle(batch[0][0], batch[0][1], plans, exc, registry, store_offsets=True)
                return
            log.info("a batch of %d units was refused (%s); applying them one by one", len(batch), exc)
        for unit_id, unit in batch:
            plans = self._plan_all([(unit_id, unit)], registry)
            try:
                self._commit(plans, {})
            except Unappliable as exc:
                self._settle(unit_id, unit, plans, exc, registry, store_offsets=False)
        self._store_progress(force=True)

    def _settle(
        self,
        unit_id: str,
        unit: PendingUnit,
        plans: list[Plan],
        refusal: Unappliable,
        registry: LinkRegistry,
        store_offsets: bool,
    ) -> None:
        """A unit the destination refused. A pull's or delete's, when only some of its entities are refused, is
        applied without them (they are acknowledged as failed, with the reason, and stay as they were: pulling
        again retries them); any other is dead-lettered whole."""
        plan = plans[0] if plans else None
        if plan is not None and plan.link_id is not None and len(plan.entities) > 1:
            refused = self._refused_entities(unit_id, unit, registry, plan.entities)
            if refused and len(refused) < len(plan.entities):
                log.warning(
                    "unit %s: the destination refuses %d of its entities; applying the others", unit_id, len(refused)
                )
                self._exclusions[unit_id] = refused
                try:
                    offsets = changed(self._safe_offsets(), self._stored) if store_offsets else {}
                    self._commit(self._plan_all([(unit_id, unit)], registry), offsets)
                    return
                except Unappliable as exc:
                    refusal = exc
                finally:
                    self._exclusions.pop(unit_id, None)
        self._give_up(unit_id, unit, plan.link_id if plan else None, str(refusal), store_offsets=store_offsets)

    def _refused_entities(
        self, unit_id: str, unit: PendingUnit, registry: LinkRegistry, entities: list[EntityKey]
    ) -> dict[EntityKey, str]:
        """Which entities of a unit the destination refuses, each tried alone in a transaction rolled back."""
        refused: dict[EntityKey, str] = {}
        for entity in entities:
            self._exclusions[unit_id] = {e: "" for e in entities if e != entity}
            try:
                reason = self._transact(partial(self._try_writes, self._plan_all([(unit_id, unit)], registry)), False)
            finally:
                self._exclusions.pop(unit_id, None)
            if reason is not None:
                refused[entity] = f"the destination refused it: {reason}"
        return refused

    def _try_writes(self, plans: list[Plan], cur: Any) -> str | None:
        """The plans' writes, or why the destination refuses them (the caller rolls them back)."""
        try:
            self._write(cur, plans)
        except Unappliable as exc:
            return describe(exc.__cause__) if exc.__cause__ is not None else str(exc)
        return None

    def _plan_all(self, batch: list[tuple[str, PendingUnit]], registry: LinkRegistry) -> list[Plan]:
        """The plans of units with something to do; units that cannot be converted are given up."""
        plans: list[Plan] = []
        overlay: dict[EntityKey, EntityState] = {}
        self._tracked_overlay = {}
        self._checked = set()
        for unit_id, unit in batch:
            end = unit.end
            assert end is not None
            link: LinkSpec | None = None
            if end["link_id"] is not None:
                link = self._links.get(end["link_id"])
                if link is None and registry.catch_up():
                    self._subscribe(registry.links)
                    link = self._links.get(end["link_id"])
                if link is None:
                    reason = f"unknown link {end['link_id']!r}"
                    self._give_up(unit_id, unit, end["link_id"], reason, store_offsets=False)
                    continue
            try:
                plan = self._plan(unit_id, unit, link, overlay)
            except (ValueError, TypeError, KeyError, ArithmeticError, schemas.DecodeError) as exc:
                reason = f"cannot convert the unit's rows: {describe(exc)}"
                self._give_up(unit_id, unit, end["link_id"], reason, store_offsets=False)
                continue
            except (ObjectError, StoreError) as exc:  # a mirrored row's object: the unit cannot be applied whole
                self._give_up(unit_id, unit, end["link_id"], f"external object: {exc}", store_offsets=False)
                continue
            if plan is not None:
                plans.append(plan)
                overlay.update(plan.states)
                self._tracked_overlay.update(plan.tracked)
        return plans

    def _state(self, key: EntityKey, overlay: dict[EntityKey, EntityState]) -> EntityState:
        return overlay.get(key) or self._entities.get(key) or EntityState()

    def _plan(
        self, unit_id: str, unit: PendingUnit, link: LinkSpec | None, overlay: dict[EntityKey, EntityState]
    ) -> Plan | None:
        """What one unit does at the destination, decided against the entity states before it (None: nothing)."""
        gtid = parse_gtid(unit_id)
        if gtid is not None and gtid.seq_no <= self._positions.get(gtid.domain, -1):
            self.units_skipped += 1
            log.info("source transaction %s was applied before; skipped", unit_id)
            return None
        plan = Plan(unit_id, unit, link.link_id if link else None, gtid)
        local: dict[EntityKey, EntityState] = {}

        def state(key: EntityKey) -> EntityState:
            return local.get(key) or self._state(key, overlay)

        events = sorted(unit.events.values(), key=lambda e: e.envelope["transaction"]["total_order"])
        changes = [(e, self._image(e, "before"), self._image(e, "after")) for e in events]
        helpers: dict[EntityKey, HelperRow | None] = {}  # a processing unit's helper rows, as read
        for event, before, after in changes:
            helper_of = self._helper_of.get(event.collection)
            if helper_of is not None:
                image = after or before
                assert image is not None
                key = (helper_of.link_id, keycodec.encode(image, list(helper_of.primary_key)))
                old = state(key)
                helper = HelperRow.from_sql(after) if after is not None else None
                new = old.with_helper(helper)
                local[key] = new
                if old.flag() != new.flag():
                    plan.flags[key] = int(event.envelope["source"]["ts_ms"])
                if link is not None:
                    helpers[key] = helper
            store = self._store_of.get(event.collection)
            if store is not None:
                image = after or before
                assert image is not None
                plan.tracked[(event.collection.split(".", 1)[0], store, bytes(image["hash"]))] = after
        if link is not None:
            self._plan_processing(plan, link, changes, helpers, local, state, overlay.get)
        else:
            self._plan_mirroring(plan, changes, state)
        plan.states = local
        if not plan.writes and not plan.states and plan.ack is None and not plan.tracked:
            return None
        return plan

    @staticmethod
    def _image(event: Event, side: str) -> dict[str, Any] | None:
        """A row image of an event as PyMySQL parameters (None when the event has none)."""
        return EnvelopeReader.image(event.envelope, event.convert, side)

    def _plan_mirroring(
        self,
        plan: Plan,
        changes: list[tuple[Event, dict[str, Any] | None, dict[str, Any] | None]],
        state: Callable[[EntityKey], EntityState],
    ) -> None:
        """A source transaction: its changes to rows of shared entities, as they happened."""
        for event, before, after in changes:
            data_of = self._links_of.get(event.collection)
            if data_of is None:
                continue
            image = after or before
            assert image is not None
            if not state((data_of.link_id, keycodec.encode(image, list(data_of.primary_key)))).mirrored():
                continue
            target = (data_of.destination_db, destination_name(event.collection.split(".", 1)[1]))
            row_key = self._key_columns(event)
            if after is None:
                assert before is not None
                plan.write("delete", target, {c: before[c] for c in row_key})
                continue
            self._write_objects(plan, data_of, event.collection, after)  # before the row that references them
            if before is not None and any(before[c] != after[c] for c in row_key):
                # The primary key changed: an UPDATE, so that the parts' foreign keys cascade as at the source.
                plan.write("rekey", target, {"key": {c: before[c] for c in row_key}, "row": after})
            else:
                plan.write("upsert", target, after)

    def _objects_of(
        self, plan: Plan, link: LinkSpec, collection: str, row: dict[str, Any]
    ) -> list[tuple[str, dict[str, Any]]]:
        """(source store, tracking row) of each object `row` references, copied to the destination store and
        verified by content hash. Raises ObjectError or StoreError: then the row must not be applied."""
        found = []
        db = collection.split(".", 1)[0]
        for column, store in self._in_store.get(collection, ()):
            digest = row.get(column)
            if digest is None:
                continue
            key = (db, store, bytes(digest))
            tracked = plan.tracked.get(key) or self._tracked_overlay.get(key)
            if tracked is None:
                tracked = self._transact(partial(self._store.load_tracked, db=db, store=store, digest=key[2]))
            if tracked is None:
                raise ObjectError(f"no `{external_table(store)}` row captured for {column} of {collection}")
            destination = link.destination_store(store)
            target = self._destination_stores[destination]
            done = (destination, link.destination_db, key[2], bytes(tracked.get("contents_hash") or b""))
            if done not in self._copied or (done not in self._checked and not self._still_there(target, tracked, link)):
                if len(self._copied) >= MAX_COPIED_REMEMBERED:  # a filepath rewritten again and again
                    self._copied.clear()
                copy_object(tracked, self._source_stores[store], db, target, link.destination_db)
                self._copied.add(done)
                self.objects_copied += 1
            self._checked.add(done)
            found.append((store, tracked))
        return found

    @staticmethod
    def _still_there(target: Store, tracked: dict[str, Any], link: LinkSpec) -> bool:
        """Whether the destination store still has an object copied before; when it cannot say, copy again."""
        try:
            return holds(target, tracked, link.destination_db)
        except Exception as exc:
            log.info("could not look up an object in store '%s' (%s); copying it again", target.name, exc)
            return False

    def _write_objects(self, plan: Plan, link: LinkSpec, collection: str, row: dict[str, Any]) -> None:
        """Copy the objects `row` references, and write their tracking rows at the destination (before it)."""
        self._write_tracked(plan, link, self._objects_of(plan, link, collection, row))

    @staticmethod
    def _write_tracked(plan: Plan, link: LinkSpec, objects: list[tuple[str, dict[str, Any]]]) -> None:
        """Write the tracking rows of copied objects, in the destination schema's table of the mapped store."""
        for store, tracked in objects:
            plan.write("upsert", (link.destination_db, external_table(link.destination_store(store))), dict(tracked))

    def _plan_processing(
        self,
        plan: Plan,
        link: LinkSpec,
        changes: list[tuple[Event, dict[str, Any] | None, dict[str, Any] | None]],
        helpers: dict[EntityKey, HelperRow | None],
        local: dict[EntityKey, EntityState],
        state: Callable[[EntityKey], EntityState],
        in_batch: Callable[[EntityKey], EntityState | None],
    ) -> None:
        """A processing unit (a pull's or a delete's snapshot read): each entity as its helper row says.

        `in_batch`: an entity's state as an earlier unit of this batch (not committed yet) left it.
        """
        pk = list(link.primary_key)
        master = f"{link.source_db}.{link.source_table}"
        entities = dict.fromkeys(
            [*helpers, *((link.link_id, keycodec.encode(a, pk)) for e, _, a in changes if e.collection == master and a)]
        )
        plan.entities = list(entities)
        flagged_pulls = [k for k in entities if needs_presence(helpers.get(k))]
        present = self._present(link, [k[1] for k in flagged_pulls]) if flagged_pulls else set()
        for k in flagged_pulls:  # applied or removed by an earlier unit of this batch: the query cannot see it yet
            earlier = in_batch(k)
            if earlier is not None:
                (present.add if earlier.at_destination else present.discard)(k[1])
        outcomes = {k: decide_process(helpers.get(k), k[1] in present) for k in entities}
        applied: list[tuple[Event, EntityKey, dict[str, Any]]] = []  # the data rows of entities to apply
        for event, _, after in changes:
            if self._links_of.get(event.collection) is None or after is None:
                continue
            key = (link.link_id, keycodec.encode(after, pk))
            if outcomes.get(key, (Outcome.SKIP, ""))[0] is Outcome.APPLY:
                applied.append((event, key, after))
        # The objects first, entity by entity: one missing or not matching its hash keeps its entity out.
        objects: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        failed: dict[EntityKey, str] = dict(self._exclusions.get(plan.unit_id, {}))  # refused before (`_settle`)
        for i, (event, key, after) in enumerate(applied):
            if key in failed:
                continue
            try:
                objects[i] = self._objects_of(plan, link, event.collection, after)
            except (ObjectError, StoreError) as exc:
                failed[key] = f"external object: {exc}"
                log.warning("entity %s of %s not applied: %s", key[1], link.link_id, failed[key])
        written = 0
        for i, (event, key, after) in enumerate(applied):
            if key in failed:
                continue
            written += 1
            self._write_tracked(plan, link, objects.get(i, []))
            plan.write("upsert", (link.destination_db, destination_name(event.collection.split(".", 1)[1])), after)
        removed = [keycodec.decode(k[1]) for k, (o, _) in outcomes.items() if o is Outcome.REMOVE]
        for _db, table in reversed(link.data_tables()):  # parts first: they reference the master
            for key_row in removed:
                plan.write("delete", (link.destination_db, destination_name(table)), key_row)
        ack: dict[str, Any] = {"keys": [], "deleted": [], "deprecate": [], "skipped": [], "failed": [], "rows": written}
        for key, reason in failed.items():
            ack["failed"].append(KeyReason(key[1], reason).to_avro())
            del outcomes[key]
        for key, (outcome, reason) in outcomes.items():
            if outcome.at_destination_after is not None:
                local[key] = (local.get(key) or state(key)).after(outcome)
            if outcome is Outcome.SKIP:
                ack["skipped"].append(KeyReason(key[1], reason).to_avro())
            else:
                ack[ACKED_AS[outcome].value].append(key[1])
        assert plan.unit.end is not None
        ack.update(link_id=link.link_id, unit_id=plan.unit_id, request_id=plan.unit.end["request_id"], ts_ms=now_ms())
        plan.ack = self._codec.encode(schemas.FIXED["ack"], ack)

    def _present(self, link: LinkSpec, key_texts: list[str]) -> set[str]:
        """Which of these entities have their master row at the destination now."""
        pk = list(link.primary_key)
        table = f"{quote(link.destination_db)}.{quote(destination_name(link.source_table))}"

        def work(cur: Any) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(key_texts), 1000):
                chunk = [keycodec.decode(k) for k in key_texts[start : start + 1000]]
                try:
                    cur.execute(
                        f"SELECT {', '.join(quote(c) for c in pk)} FROM {table} WHERE {in_clause(pk, len(chunk))}",
                        [k[c] for k in chunk for c in pk],
                    )
                except pymysql.err.ProgrammingError as exc:
                    if exc.args[0] == ER_NO_SUCH_TABLE:
                        return found
                    raise
                found.update(keycodec.encode(dict(zip(pk, row, strict=True)), pk) for row in cur.fetchall())
            return found

        return self._transact(work)

    def _commit(self, plans: list[Plan], offsets: dict[Partition, int]) -> None:
        """Write the plans, their claims, entity states, source positions and `offsets` in ONE transaction."""
        if not plans and not offsets:
            return
        claims = [p.unit_id for p in plans if p.gtid is None]
        attempted: set[str] = set()  # units written by an earlier attempt of this call

        def work(cur: Any) -> tuple[dict[str, Finished], list[Plan]]:
            finished = self._store.finished_among(cur, claims) if claims else {}
            # Finished by an earlier attempt whose COMMIT happened but whose answer was lost: ours, and what
            # they did must still reach memory (entity states, flags, acks), though not be written again.
            ours = {u for u in finished if u in attempted}
            before = {u: f for u, f in finished.items() if u not in attempted}
            live = [p for p in plans if p.unit_id not in finished]
            attempted.update(p.unit_id for p in live)
            self._store.claim_many(cur, [(p.unit_id, p.link_id, p.ack) for p in live if p.gtid is None])
            self._write(cur, live)
            states = {k: s for p in live for k, s in p.states.items()}
            self._store.save_entities(cur, states, [k for p in live for k in p.flags])
            self._store.save_positions(cur, {p.gtid.domain: p.unit_id for p in live if p.gtid is not None})
            self._store.save_tracked(cur, {k: row for p in live for k, row in p.tracked.items()})
            self._store.save_offsets(cur, offsets)
            return before, [p for p in plans if p.unit_id in ours or p.unit_id not in finished]  # in order

        before, live = self._transact(work)
        self._stored.update(offsets)
        for plan in live:
            for key, new in plan.states.items():
                if new.forgettable():
                    self._entities.pop(key, None)
                else:
                    self._entities[key] = new
            for key, source_ts in plan.flags.items():
                self._flag_outbox[key] = source_ts
            if plan.gtid is not None:
                self._positions[plan.gtid.domain] = max(plan.gtid.seq_no, self._positions.get(plan.gtid.domain, -1))
            if plan.ack is not None and plan.link_id is not None:
                self._outbox[plan.unit_id] = (plan.link_id, plan.ack)
            if plan.link_id is not None:
                self.units_applied += 1
            else:
                self.units_mirrored += 1
        for unit_id, finished in before.items():
            self.units_skipped += 1
            log.info("unit %s was finished before (%s); skipped", unit_id, finished.outcome)
            link_id = next(p.link_id for p in plans if p.unit_id == unit_id)
            if finished.pending_ack is not None and link_id is not None:
                self._outbox[unit_id] = (link_id, finished.pending_ack)

    def _write(self, cur: Any, plans: list[Plan]) -> None:
        """The plans' rows; Unappliable when the destination refuses them (not for the connection's faults)."""
        try:
            for kind, (db, table), rows in merged_writes(plans):
                if kind == "upsert":
                    self._upsert(cur, db, table, rows)
                elif kind == "delete":
                    self._delete(cur, db, table, rows)
                else:
                    self._rekey(cur, db, table, rows)
        except pymysql.err.MySQLError as exc:
            if is_transient(exc):
                raise
            raise Unappliable(f"destination refused the unit: {describe(exc)}") from exc

    def _key_columns(self, event: Event) -> list[str]:
        """The primary key columns of an event's table, from its Kafka key's schema."""
        if event.key is None:
            raise ValueError(f"a change event of {event.collection} without a key")
        vschema = self._codec.schema_of(event.key)
        if vschema.fingerprint not in self._key_columns_of:
            self._key_columns_of[vschema.fingerprint] = [f["name"] for f in vschema.definition["fields"]]
        return self._key_columns_of[vschema.fingerprint]

    @staticmethod
    def _delete(cur: Any, db: str, table: str, rows: list[dict[str, Any]]) -> None:
        pk = list(rows[0])
        for start in range(0, len(rows), 1000):
            chunk = rows[start : start + 1000]
            cur.execute(
                f"DELETE FROM {quote(db)}.{quote(table)} WHERE {in_clause(pk, len(chunk))}",
                [r[c] for r in chunk for c in pk],
            )

    @staticmethod
    def _rekey(cur: Any, db: str, table: str, changes: list[dict[str, Any]]) -> None:
        for change in changes:
            key, row = change["key"], change["row"]
            cur.execute(
                f"UPDATE {quote(db)}.{quote(table)} SET {', '.join(f'{quote(c)}=%s' for c in row)} "
                f"WHERE {' AND '.join(f'{quote(c)}=%s' for c in key)}",
                [*row.values(), *key.values()],
            )

    @staticmethod
    def _upsert(cur: Any, db: str, table: str, batch: list[dict[str, Any]]) -> None:
        cols = list(batch[0])
        names = ", ".join(quote(c) for c in cols)
        update = ", ".join(f"{quote(c)}=VALUES({quote(c)})" for c in cols)
        sql = (
            f"INSERT INTO {quote(db)}.{quote(table)} ({names}) VALUES ({', '.join(['%s'] * len(cols))}) "
            f"ON DUPLICATE KEY UPDATE {update}"
        )
        cur.executemany(sql, [[r[c] for c in cols] for r in batch])

    def _give_up(
        self,
        unit_id: str,
        unit: PendingUnit,
        link_id: str | None,
        reason: str,
        stage: str = "apply",
        store_offsets: bool = True,
    ) -> None:
        """Dead-letter every event of a unit, then record it finished (with the offsets, unless told not to).

        A unit finished before (read again) is dropped instead: its events were applied or dead-lettered then.
        """
        outcome = self._transact(partial(self._store.outcome, unit_id=unit_id))
        gtid = parse_gtid(unit_id)
        applied_after = gtid is not None and gtid.seq_no <= self._positions.get(gtid.domain, -1)
        if outcome is None and unit.end is not None and applied_after:
            # Complete, read again after a restart: applied then (the order is strict). A unit whose END never
            # came is not that: it is dead-lettered below.
            outcome = "applied: a later source transaction of its domain was"
        if outcome is not None:
            log.info("dropped %d events of unit %s, finished before (%s)", len(unit.events), unit_id, outcome)
            return
        for at, event in sorted(unit.events.items()):
            self._dead_letters.send(at, event.key, event.value, reason, stage, unit_id)
        self._dead_letters.confirm()
        offsets = changed(self._safe_offsets(), self._stored) if store_offsets else {}

        def work(cur: Any) -> None:
            self._store.claim(cur, unit_id, "dead-letter", link_id)
            self._store.save_offsets(cur, offsets)

        self._transact(work)
        self._stored.update(offsets)
        self.units_dead_lettered += 1
        log.warning("unit %s of link %s: %d events dead-lettered: %s", unit_id, link_id, len(unit.events), reason)

    # -- acks, offsets, housekeeping -------------------------------------------------

    def _send_acks(self) -> None:
        """Deliver the acks of committed units, then mark them sent (undelivered ones stay for the next round)."""
        if not self._outbox:
            return
        self._delivered = []
        for unit_id, (link_id, ack) in self._outbox.items():
            while True:
                try:
                    self._p.produce(
                        self.topics.acks,
                        key=link_id,
                        value=ack,
                        on_delivery=self._ack_callback(unit_id),
                    )
                    break
                except BufferError:
                    self._p.poll(0.1)
        self._p.flush(30)
        if not self._delivered:
            log.warning("Kafka confirmed none of %d acks; retrying", len(self._outbox))
            return
        delivered = list(self._delivered)
        self._transact(lambda cur: self._store.acks_sent(cur, delivered))
        for unit_id in delivered:
            self._outbox.pop(unit_id, None)

    def _send_flags(self) -> None:
        """Publish committed flag changes on the compacted flags topic, then clear them from the outbox."""
        if not self._flag_outbox:
            return
        self._flags_delivered = []
        for key, source_ts in self._flag_outbox.items():
            state = self._entities.get(key) or EntityState()
            value = None
            if state.flag() != (False, False):
                record = {
                    "link_id": key[0],
                    "key": key[1],
                    "is_flagged": state.is_flagged,
                    "is_deprecated": state.is_deprecated,
                    "process": state.process,
                    "source_ts_ms": source_ts,
                    "ts_ms": now_ms(),
                }
                value = self._codec.encode(schemas.FIXED["flag"], record)
            while True:
                try:
                    self._p.produce(
                        self.topics.flags, key=f"{key[0]} {key[1]}", value=value, on_delivery=self._flag_callback(key)
                    )
                    break
                except BufferError:
                    self._p.poll(0.1)
        self._p.flush(30)
        delivered = list(self._flags_delivered)
        if not delivered:
            log.warning("Kafka confirmed none of %d flag changes; retrying", len(self._flag_outbox))
            return
        self._transact(lambda cur: self._store.flags_sent(cur, delivered))
        for key in delivered:
            self._flag_outbox.pop(key, None)

    def _flag_callback(self, key: EntityKey) -> Callable[[KafkaError | None, Message], None]:
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self._flags_delivered.append(key)

        return delivered

    def _ack_callback(self, unit_id: str) -> Callable[[KafkaError | None, Message], None]:
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self._delivered.append(unit_id)

        return delivered

    def _safe_offsets(self) -> dict[Partition, int]:
        units = [u.where(finished=False) for u in self._pending.values()] + list(self._finished.values())
        first = cutoff(units)
        # Finished units wholly behind the first unfinished one are behind every future cut: forget them.
        for unit_id, unit in list(self._finished.items()):
            if first is None or unit.end is None or unit.end < first:
                del self._finished[unit_id]
        return safe_offsets(self._consumed, units)

    def _store_progress(self, force: bool = False) -> None:
        """Store offsets that moved without a unit applied (at most once per PROGRESS_EVERY_S unless forced)."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        offsets = changed(self._safe_offsets(), self._stored)
        if offsets:
            self._dead_letters.confirm()
            self._transact(lambda cur: self._store.save_offsets(cur, offsets))
            self._stored.update(offsets)
        self._commit_to_kafka()

    def _commit_to_kafka(self) -> None:
        """The stored offsets, also as the group's Kafka offsets: for lag monitoring only."""
        todo = {a: o for a, o in self._stored.items() if a in self._assigned and self._committed_to_kafka.get(a) != o}
        if not todo:
            return
        try:
            self._c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in todo.items()], asynchronous=True)
            self._committed_to_kafka.update(todo)
        except KafkaException as exc:
            log.debug("Kafka offset commit (monitoring only) failed: %s", exc)

    def _prune(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        forgotten = self._transact(self._store.prune)
        if forgotten:
            log.info("forgot %d units finished more than 7 days ago", forgotten)
