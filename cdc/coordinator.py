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
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

import schemas
from cdc import preconditions
from cdc.dispatcher import EventDispatcher
from cdc.events import ChangeUnit
from cdc.metrics import CaptureMetrics
from cdc.offsets import Checkpoint, OffsetContext
from cdc.placement import Held, coordinate, place
from cdc.snapshot import SnapshotSource
from cdc.streaming import BinlogSource, StreamFailed
from cdc.table_shapes import TableShapes
from foundation import grants
from foundation.catalog import Catalog
from foundation.config import Settings
from foundation.dead_letters import DeadLetter
from foundation.kafka import Transactional, consumer, ok, schema_registry, where
from foundation.links import MALFORMED, LinkRegistry, LinkSpec
from foundation.topics import Admin, SchemaTopic, Topics

log = logging.getLogger(__name__)
MAX_BATCH_UNITS = 1000  # source transactions per Kafka transaction
MAX_BATCH_EVENTS = 20000
MAX_HELD_CHUNKS = 2  # snapshot chunks read ahead of their place in the stream


class Capture:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self._captured: frozenset[tuple[str, str]] = frozenset()
        self._shapes = TableShapes(Catalog(self._connect))
        self._checked: set[LinkSpec] = set()
        self.metrics = CaptureMetrics()
        self.report_host = f"djlink-{self.topics.prefix}"[:60]  # how SHOW SLAVE HOSTS names this capture

    def _connect(self, **extra: Any) -> Any:
        return self.settings.source.connect(utc=True, **extra)

    def _is_captured(self, db: str, table: str) -> bool:
        return (db, table) in self._captured

    def _capture(self, links: dict[str, LinkSpec]) -> None:
        unchecked = [spec for spec in links.values() if spec not in self._checked]
        if unchecked:  # its SELECT on each new link's tables, before a snapshot would need it
            conn = self._connect()
            try:
                grants.check(conn, grants.RoleName.capture, unchecked)
            finally:
                conn.close()
            self._checked.update(unchecked)
        captured = frozenset(t for spec in links.values() for t in spec.captured_tables())
        if captured - getattr(self, "_captured", frozenset()):
            log.info("capturing %s", ", ".join(sorted(f"{db}.{t}" for db, t in captured - self._captured)))
        self._captured = captured

    def _on_ddl(self, db: str, query: str) -> None:
        # Not only `db`: that is the session's default database, and DataJoint alters `db`.`table` from a
        # session with none. DDL is rare; every shape is read again when next needed.
        self._shapes.forget()

    @staticmethod
    def _take(units: queue.Queue[Any]) -> tuple[list[ChangeUnit], Checkpoint | None, bool]:
        """What the binlog source has ready (waiting briefly for the first): units, the checkpoint after
        them, and whether that was all it had (not cut short by the batch limits)."""
        batch: list[ChangeUnit] = []
        checkpoint: Checkpoint | None = None
        events = 0
        timeout: float | None = 0.05
        while len(batch) < MAX_BATCH_UNITS and events < MAX_BATCH_EVENTS:
            try:
                item = units.get(timeout=timeout) if timeout else units.get_nowait()
            except queue.Empty:
                return batch, checkpoint, True
            timeout = None
            if isinstance(item, StreamFailed):
                raise item.error
            if isinstance(item, ChangeUnit):
                batch.append(item)
                events += len(item.changes)
            checkpoint = item.checkpoint
        return batch, checkpoint, False

    def _initial_snapshot_step(
        self, registry: LinkRegistry, snapshots: SnapshotSource, dispatcher: EventDispatcher
    ) -> Held | None:
        """The next chunk of the first link whose initial snapshot is not done (one chunk per call), to be placed
        in the stream like a pull's chunk, with the progress record that commits with it."""
        for link in registry.links.values():
            last, done = self._initial.get(link.link_id, (None, False))
            if done or not link.primary_key:
                continue
            following = snapshots.next_table_chunk(link, last)
            if following is None:
                dispatcher.publish([], progress=(link.link_id, last, True))
                self._initial[link.link_id] = (last, True)
                log.info("initial snapshot of %s done", link.link_id)
                return None
            unit, last = following
            self._initial[link.link_id] = (last, False)
            at = coordinate(unit.position.file, unit.position.pos)
            return Held(unit, at, progress=(link.link_id, last, False))
        return None

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        conn = self._connect()
        try:
            preconditions.check(conn, s.capture_server_id, self.report_host)
            with conn.cursor() as cur:
                cur.execute("SELECT @@gtid_binlog_pos")
                current = cur.fetchone()[0] or ""
        finally:
            conn.close()
        admin = Admin(s)
        admin.ensure_control(self.topics)
        registry = LinkRegistry(s, self.topics)
        registry.catch_up()
        self._capture(registry.links)

        name = self.topics.capture_group
        txn = Transactional(s, name, "capture")  # fences a crashed predecessor and aborts its open transaction
        offsets = OffsetContext(s, self.topics, name)
        registry_client = schema_registry(s)
        dispatcher = EventDispatcher(
            txn, self.topics, admin, self._shapes, SchemaTopic(s, self.topics), offsets, registry_client
        )
        checkpoint = offsets.load()
        if checkpoint is None:
            # Record where we start before anything else, so a crash from here on resumes here.
            checkpoint = Checkpoint(s.capture_start_gtid or current)
            dispatcher.publish([], checkpoint)
        log.info("capture resumes at GTID position %r", checkpoint.gtid_position)
        self._initial = offsets.load_snapshots() if s.snapshot_mode == "initial" else {}
        snapshots = SnapshotSource(self._connect, self._shapes, s.capture_server_id, s.snapshot_chunk_size, stop)

        units: queue.Queue[Any] = queue.Queue(maxsize=1000)
        binlog = BinlogSource(
            s.source,
            s.capture_server_id,
            checkpoint.gtid_position,
            self._is_captured,
            units,
            self._on_ddl,
            self.report_host,
        )
        binlog.start()

        signals = consumer(s, self.topics.capture_group)
        tp = TopicPartition(self.topics.signals, 0)
        committed = signals.committed([tp], timeout=10)[0].offset
        signals.assign([TopicPartition(self.topics.signals, 0, committed if committed >= 0 else OFFSET_BEGINNING)])
        codec = schemas.Codec()
        held: deque[Held] = deque()  # snapshot chunks read, waiting for their place in the stream
        reading: Iterator[tuple[ChangeUnit, bool]] | None = None  # the chunks of the signal being served
        consumed: Any = None  # that signal's offsets: they commit with its last chunk
        if on_ready:
            on_ready()
        try:
            while not stop.is_set():
                if registry.refresh(0):
                    self._capture(registry.links)
                msg = signals.poll(0) if not held and reading is None else None
                if ok(msg) and msg.value():
                    # The signal's offset commits with its last chunk: a crash re-reads the whole signal.
                    topic, partition, offset = where(msg)
                    consumed = ([TopicPartition(topic, partition, offset + 1)], signals.consumer_group_metadata())
                    try:
                        signal = codec.decode(msg.value())
                        link = LinkSpec.from_avro(signal["link"])
                        keys, request_id = list(signal["keys"]), signal["request_id"]
                    except MALFORMED as exc:  # dead-lettered with its offset: it never stops the capture again
                        reason = f"not a snapshot signal: {exc}"
                        dead = DeadLetter(topic, partition, offset, msg.key(), msg.value(), reason, "decode")
                        dispatcher.publish([], consumed=consumed, dead_letters=[dead])
                        log.warning("dead-lettered a malformed signal at offset %d: %s", offset, exc)
                        consumed = None
                        continue
                    registry.links[link.link_id] = link
                    self._capture(registry.links)
                    if keys:
                        reading = snapshots.read(link, keys, request_id)
                    else:  # nothing to read: commit the signal's offsets alone
                        dispatcher.publish([], consumed=consumed)
                if reading is not None and len(held) < MAX_HELD_CHUNKS:
                    # One chunk per turn: it is published as soon as the stream reaches it, while the next is read.
                    unit, last = next(reading)
                    at = coordinate(unit.position.file, unit.position.pos)
                    held.append(Held(unit, at, consumed if last else None))
                    if last:
                        reading = None
                if s.snapshot_mode == "initial" and not held and reading is None and units.qsize() < 100:
                    initial = self._initial_snapshot_step(registry, snapshots, dispatcher)
                    if initial is not None:
                        held.append(initial)
                reached = binlog.reached  # before taking: every unit up to here is in the queue
                batch, checkpoint, drained = self._take(units)
                released = progress = None
                if held:
                    waiting = list(held)
                    batch, released = place(held, batch, reached, drained)
                    placed = waiting[: len(waiting) - len(held)]  # place() releases from the front
                    progress = next((h.progress for h in reversed(placed) if h.progress is not None), None)
                if batch or checkpoint or released or progress:
                    dispatcher.publish(batch, checkpoint, consumed=released, progress=progress)
                    self.metrics.committed(batch, checkpoint, units.empty())
        finally:
            binlog.stop()
            signals.close()
            registry.close()
            txn.producer.flush(10)
            self._shapes.close()
