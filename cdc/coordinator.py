"""The capture's coordinator: one process, one transactional producer, two sources.

It checks the source server, follows the links topic (so links declared at run
time are captured without a restart), starts the binlog source, serves
snapshot signals from the source agent with the snapshot source, and hands
every unit from either source to the event dispatcher.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import pymysql
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

import schemas
from cdc import preconditions
from cdc.dispatcher import EventDispatcher
from cdc.events import ChangeUnit
from cdc.schema_history import SchemaHistory
from cdc.snapshot import SnapshotSource
from cdc.streaming import BinlogSource, StreamFailed
from djlink.config import Settings
from djlink.links import LinkRegistry, LinkSpec
from djlink.topics import Admin, SchemaTopic, Topics, consumer, producer

log = logging.getLogger(__name__)


class Capture:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self._captured: frozenset[tuple[str, str]] = frozenset()
        self._history = SchemaHistory(self._connect)

    def _connect(self, **extra: Any) -> Any:
        return pymysql.connect(
            **self.settings.source.connect_args(), charset="utf8mb4", init_command="SET time_zone='+00:00'", **extra
        )

    def _is_captured(self, db: str, table: str) -> bool:
        return (db, table) in self._captured

    def _capture(self, links: dict[str, LinkSpec]) -> None:
        self._captured = frozenset(t for spec in links.values() for t in spec.captured_tables())

    def _on_ddl(self, db: str, query: str) -> None:
        self._history.forget(db)

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        conn = self._connect()
        try:
            preconditions.check(conn)
            with conn.cursor() as cur:
                cur.execute("SELECT @@gtid_binlog_pos")
                start_gtid = s.capture_start_gtid or cur.fetchone()[0] or ""
        finally:
            conn.close()
        admin = Admin(s)
        admin.ensure_control(self.topics)
        registry = LinkRegistry(s, self.topics)
        registry.catch_up()
        self._capture(registry.links)

        p = producer(s, transactional_id=f"{self.topics.prefix}-capture")
        p.init_transactions(30)
        dispatcher = EventDispatcher(p, self.topics, admin, self._history, SchemaTopic(s, self.topics))
        snapshots = SnapshotSource(self._connect, self._history, s.capture_server_id, s.snapshot_chunk_size)

        units: queue.Queue[Any] = queue.Queue(maxsize=1000)
        binlog = BinlogSource(s.source, s.capture_server_id, start_gtid, self._is_captured, units, self._on_ddl)
        binlog.start()

        signals = consumer(s, f"{self.topics.prefix}-capture")
        tp = TopicPartition(self.topics.signals, 0)
        committed = signals.committed([tp], timeout=10)[0].offset
        signals.assign([TopicPartition(self.topics.signals, 0, committed if committed >= 0 else OFFSET_BEGINNING)])
        codec = schemas.Codec()
        log.info("capture ready from GTID %s", start_gtid or "(start)")
        if on_ready:
            on_ready()
        try:
            while not stop.is_set():
                if registry.refresh(0):
                    self._capture(registry.links)
                msg = signals.poll(0)
                if msg is not None and msg.error() is None and msg.value():
                    signal = codec.decode(msg.value())
                    link = LinkSpec.from_avro(signal["link"])
                    registry.links[link.link_id] = link
                    self._capture(registry.links)
                    for unit in snapshots.read(link, signal["keys"], signal["request_id"]):
                        dispatcher.dispatch(unit)
                    signals.commit(message=msg, asynchronous=False)
                try:
                    item = units.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(item, StreamFailed):
                    raise item.error
                assert isinstance(item, ChangeUnit)
                dispatcher.dispatch(item)
        finally:
            binlog.stop()
            signals.close()
            registry.close()
            p.flush(10)
            self._history.close()
