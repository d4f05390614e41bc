"""The applier: writes pulled entities into the destination server, one unit at a time.

It consumes the change topics of every link and the transaction topic
(`read_committed`), gathers each unit's events until the unit's END says it
is complete, writes the unit's master and part rows in ONE destination
transaction, then acknowledges the entities to the source agent.

Snapshot units read for a pull are applied; mirroring of streamed changes to
shared rows, and the exactly-once offset store, come with the consumers issue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pymysql
from confluent_kafka import Message, TopicPartition

import schemas
from cdc.snapshot import quote
from djlink import keys as keycodec
from djlink.config import Settings
from djlink.links import LinkRegistry, LinkSpec, destination_name
from djlink.topics import Admin, SchemaTopic, Topics, consumer, now_ms, produce, producer, where
from schemas.tables import sql_converters

log = logging.getLogger(__name__)
Offset = tuple[str, int, int]  # topic, partition, offset


@dataclass
class PendingUnit:
    """The events of one unit seen so far, and its END once it arrives."""

    end: dict[str, Any] | None = None
    end_offset: Offset | None = None
    events: dict[Offset, tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=dict)

    def complete(self, tracked: set[str]) -> bool:
        if self.end is None:
            return False
        for dc in self.end["data_collections"] or []:
            if dc["data_collection"] in tracked:
                have = sum(1 for coll, _, _ in self.events.values() if coll == dc["data_collection"])
                if have < dc["event_count"]:
                    return False
        return True

    def offsets(self) -> list[Offset]:
        return list(self.events) + ([self.end_offset] if self.end_offset else [])


class Applier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self._schema_topic = SchemaTopic(settings, self.topics)
        self._codec = schemas.Codec(self._schema_topic.resolve)
        self._pending: dict[str, PendingUnit] = {}
        self._by_topic: dict[str, str] = {}  # change topic -> 'db.table'
        self._links_of: dict[str, LinkSpec] = {}  # 'db.table' -> link
        self._links: dict[str, LinkSpec] = {}
        self._converters: dict[bytes, dict[str, Any]] = {}
        self._consumed: dict[tuple[str, int], int] = {}
        self.units_applied = 0

    def _connect(self) -> Any:
        return pymysql.connect(
            **self.settings.destination.connect_args(),
            charset="utf8mb4",
            autocommit=False,
            init_command="SET time_zone='+00:00'",
        )

    def _follow(self, links: dict[str, LinkSpec]) -> list[str]:
        self._links = dict(links)
        self._by_topic = {}
        self._links_of = {}
        for link in links.values():
            for db, table in link.data_tables():
                self._by_topic[self.topics.table(db, table)] = f"{db}.{table}"
                self._links_of[f"{db}.{table}"] = link
        return [self.topics.transaction, *sorted(self._by_topic)]

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        Admin(s).ensure_control(self.topics)
        registry = LinkRegistry(s, self.topics)
        registry.catch_up()
        self._db = self._connect()
        self._p = producer(s)
        c = consumer(s, f"{self.topics.prefix}-applier")
        c.subscribe(self._follow(registry.links))
        if on_ready:
            on_ready()
        try:
            while not stop.is_set():
                if registry.refresh(0):
                    c.subscribe(self._follow(registry.links))
                messages = c.consume(500, 0.05)
                for msg in messages:
                    if msg.error() is None and self._route(msg, registry):
                        c.subscribe(self._follow(registry.links))
                if messages:
                    self._apply_complete()
                    self._commit(c)
        finally:
            c.close()
            registry.close()
            self._p.flush(10)
            self._db.close()

    def _route(self, msg: Message, registry: LinkRegistry) -> bool:
        """Take one message into its unit; True when it taught us of new links (resubscribe)."""
        offset = where(msg)
        topic = offset[0]
        self._consumed[(topic, offset[1])] = offset[2] + 1
        if msg.value() is None:
            return False  # tombstone
        if topic == self.topics.transaction:
            record = self._codec.decode(msg.value())
            if record["status"] != "END":
                return False
            unit = self._pending.setdefault(record["id"], PendingUnit())
            unit.end, unit.end_offset = record, offset
            # Links are published before their first event; a unit of a table not known yet means
            # the links topic is behind this consumer, not that the unit is someone else's.
            unknown = [dc for dc in record["data_collections"] or [] if dc["data_collection"] not in self._links_of]
            if unknown and registry.catch_up():
                self._follow(registry.links)
                return True
            return False
        collection = self._by_topic.get(topic)
        if collection is None:
            return False
        vschema = self._codec.schema_of(msg.value())
        envelope = self._codec.decode(msg.value())
        unit_id = envelope["transaction"]["id"]
        if vschema.fingerprint not in self._converters:
            value_record = next(f for f in vschema.definition["fields"] if f["name"] == "before")["type"][1]
            self._converters[vschema.fingerprint] = sql_converters(value_record)
        self._pending.setdefault(unit_id, PendingUnit()).events[offset] = (
            collection,
            envelope,
            self._converters[vschema.fingerprint],
        )
        return False

    def _apply_complete(self) -> None:
        tracked = set(self._links_of)
        for unit_id, unit in list(self._pending.items()):
            if unit.end is None:
                continue
            if not any(dc["data_collection"] in tracked for dc in unit.end["data_collections"] or []):
                del self._pending[unit_id]
                continue
            if unit.complete(tracked):
                self._apply(unit_id, unit)
                del self._pending[unit_id]

    def _apply(self, unit_id: str, unit: PendingUnit) -> None:
        end = unit.end
        assert end is not None
        if end["link_id"] is None:
            return  # a streamed source transaction: mirroring comes with the consumers issue
        link = self._links[end["link_id"]]
        rows: dict[str, list[dict[str, Any]]] = {}
        for _offset, (collection, envelope, convert) in sorted(
            unit.events.items(), key=lambda e: e[1][1]["transaction"]["total_order"]
        ):
            after = envelope["after"]
            if envelope["op"] == "r" and after is not None:
                rows.setdefault(collection, []).append({k: convert[k](v) for k, v in after.items()})
        self._db.ping(reconnect=True)
        try:
            with self._db.cursor() as cur:
                for db, table in link.data_tables():  # master first: parts reference it
                    batch = rows.get(f"{db}.{table}")
                    if batch:
                        self._upsert(cur, link.destination_db, destination_name(table), batch)
            self._db.commit()
        except Exception:
            self._db.rollback()
            raise
        master_rows = rows.get(f"{link.source_db}.{link.source_table}", [])
        ack = {
            "link_id": link.link_id,
            "unit_id": unit_id,
            "request_id": end["request_id"],
            "keys": [keycodec.encode(r, list(link.primary_key)) for r in master_rows],
            "ts_ms": now_ms(),
        }
        produce(self._p, self.topics.acks, link.link_id, self._codec.encode(schemas.FIXED["ack"], ack))
        self._p.flush(30)
        self.units_applied += 1

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

    def _commit(self, c: Any) -> None:
        """Commit consumed offsets, but never past an event of a unit still being gathered."""
        floor: dict[tuple[str, int], int] = {}
        for unit in self._pending.values():
            for topic, part, off in unit.offsets():
                floor[(topic, part)] = min(off, floor.get((topic, part), off))
        offsets = [TopicPartition(t, p, min(o, floor.get((t, p), o))) for (t, p), o in self._consumed.items()]
        if offsets:
            c.commit(offsets=offsets, asynchronous=True)
