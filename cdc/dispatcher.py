"""The event dispatcher: turns a change unit into Kafka records, atomically.

Each unit (source transaction or snapshot chunk) becomes, in ONE Kafka
transaction: the schemas it needs (on the schema topic), a keyed envelope per
row change on its table's topic (and a tombstone after each delete), and the
unit's END on the transaction topic (no BEGIN: it told consumers nothing and
cost two extra records per single-row transaction). The END's per-table counts tell
a consumer when it holds the whole unit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

import schemas
from cdc.events import ChangeUnit, RowChange
from cdc.offsets import Checkpoint, OffsetContext
from cdc.table_shapes import TableShapes
from foundation.dead_letters import DeadLetter
from foundation.kafka import Transactional, now_ms, produce
from foundation.topics import Admin, SchemaTopic, Topics
from schemas import FIXED
from schemas.registry import Registry
from schemas.tables import EnvelopeWriter, RowEncoder, TableShape, envelope_schema, key_schema

VERSION = "0.1.0"
log = logging.getLogger(__name__)
ConsumedOffsets = tuple[list[TopicPartition], Any]  # offsets and the consumer's group metadata
# Where an event sits: its `source` block (encoded, without `row`), its unit's transaction id (encoded),
# its position among the unit's events and among those of its table.
_Place = tuple[bytes, bytes, int, int]


MAX_SHAPE_PAIRS = 10_000  # (binlog shape, current shape) decisions kept


def same_version(described: TableShape, current: TableShape) -> bool:
    """Whether a binlog event's shape is the table's current one: the same column names, and the same
    decimal precision and scale (the binlog's table map does not say nullability, nor every type detail)."""
    if len(described.columns) != len(current.columns):
        return False
    for a, b in zip(described.columns, current.columns, strict=True):
        if a.name != b.name:
            return False
        if a.data_type == "decimal" and (a.numeric_precision, a.numeric_scale) != (
            b.numeric_precision,
            b.numeric_scale,
        ):
            return False
    return True


@dataclass
class _Compiled:
    shape: TableShape
    key_schema: schemas.Schema
    value_schema: schemas.Schema
    encode: RowEncoder
    key_fields: list[str]
    writer: EnvelopeWriter
    published: bool = False  # both schemas on the schema topic
    header: bytes | None = None  # of its values: the magic and the fingerprint, or the registry id


class EventDispatcher:
    def __init__(
        self,
        producer: Transactional,
        topics: Topics,
        admin: Admin,
        shapes: TableShapes,
        schema_topic: SchemaTopic,
        offsets: OffsetContext,
        registry: Registry | None = None,
    ) -> None:
        self._txn = producer  # a new producer after a lost broker connection, taken before each transaction
        self._p = producer.producer
        self._offsets = offsets
        self._topics = topics
        self._admin = admin
        self._shapes = shapes
        self._schema_topic = schema_topic
        self._codec = schemas.Codec(registry=registry)
        self._schemas: dict[TableShape, _Compiled] = {}
        self._by_shape: dict[int, _Compiled] = {}  # by id(): hashing a shape per row costs more than encoding it
        self._same_columns: dict[tuple[int, int], tuple[TableShape, TableShape, bool]] = {}
        # (db, table) -> its change topic, and the registry subjects of its keys and values (None: no registry)
        self._topic_of: dict[tuple[str, str], tuple[str, str | None, str | None]] = {}

    def _compiled(self, shape: TableShape) -> _Compiled:
        """Per shape, once: its schemas (published once), its row encoder and its key fields."""
        found = self._by_shape.get(id(shape))
        if found is None or found.shape is not shape:
            if len(self._by_shape) >= MAX_SHAPE_PAIRS:  # new shape objects come with every table reopen
                self._by_shape.clear()
            if shape not in self._schemas:  # equal shapes read twice share their schemas
                kschema = key_schema(shape, self._topics.prefix)
                vschema = envelope_schema(shape, self._topics.prefix)
                self._schemas[shape] = _Compiled(
                    shape,
                    kschema,
                    vschema,
                    RowEncoder(shape),
                    [f["name"] for f in kschema.definition["fields"]],
                    EnvelopeWriter(vschema),
                )
            found = self._by_shape[id(shape)] = self._schemas[shape]
            found.shape = shape
        return found

    def publish(
        self,
        units: Sequence[ChangeUnit],
        checkpoint: Checkpoint | None = None,
        consumed: ConsumedOffsets | None = None,
        progress: tuple[str, str | None, bool] | None = None,
        dead_letters: Sequence[DeadLetter] = (),
    ) -> None:
        """Publish units, then the checkpoint after the last of them and any consumed offsets: one Kafka transaction.

        `dead_letters`: signals that could not be read, given up with the offsets that move past them.

        Many source transactions may share one Kafka transaction (that is what
        makes the capture fast); each stays a unit of its own for consumers,
        and the checkpoint still sits on a source transaction boundary.
        """
        self._admin.ensure({self._topics.table(c.db, c.table) for u in units for c in u.changes})
        self._p = self._txn.ready()
        self._p.begin_transaction()
        try:
            self._schema_topic.publish_fixed(self._p)  # once per process: published schemas are remembered
            for unit in units:
                self._unit(unit)
            if checkpoint is not None:
                self._offsets.record(self._p, checkpoint)
            if progress is not None:
                self._offsets.record_snapshot(self._p, *progress)
            for dead in dead_letters:
                produce(self._p, self._topics.dead_letter, dead.topic, dead.encode(self._codec))
            if consumed is not None:
                self._p.send_offsets_to_transaction(consumed[0], consumed[1])
            self._p.commit_transaction()
        except BaseException:
            self._abort()
            raise

    def _shape(self, change: RowChange) -> TableShape:
        """The current shape from INFORMATION_SCHEMA, unless the binlog event says the row had another one."""
        shape = self._shapes.shape(change.db, change.table)
        described = change.binlog_shape
        if described is None or described is shape:
            return shape
        key = (id(described), id(shape))
        known = self._same_columns.get(key)
        if known is None:
            if len(self._same_columns) >= MAX_SHAPE_PAIRS:  # table ids churn (FLUSH TABLES): start over
                self._same_columns.clear()
            # The pair is kept with the answer, so that neither id can be reused by another shape meanwhile.
            known = self._same_columns[key] = (described, shape, same_version(described, shape))
        return shape if known[2] else described

    def _unit(self, unit: ChangeUnit) -> None:
        counts: Counter[str] = Counter()
        now = now_ms()
        pos = unit.position
        sources: dict[tuple[str, str], bytes] = {}  # what `source` says for every row of a table, encoded
        transaction = EnvelopeWriter.transaction(unit.id)
        for order, change in enumerate(unit.changes, 1):
            collection = f"{change.db}.{change.table}"
            counts[collection] += 1
            where = (change.db, change.table)
            if where not in sources:
                sources[where] = EnvelopeWriter.source(
                    {
                        "version": VERSION,
                        "connector": "mariadb",
                        "name": self._topics.prefix,
                        "ts_ms": pos.ts_ms,
                        "snapshot": "true" if unit.snapshot else "false",
                        "db": change.db,
                        "table": change.table,
                        "server_id": pos.server_id,
                        "gtid": pos.gtid,
                        "file": pos.file,
                        "pos": pos.pos,
                    }
                )
            names = self._topic_of.get(where)
            if names is None:
                topic = self._topics.table(*where)
                subjects = (f"{topic}-key", f"{topic}-value") if self._codec.registry else (None, None)
                names = self._topic_of[where] = (topic, *subjects)
            self._row(change, names, (sources[where], transaction, order, counts[collection]), now)
        self._transaction_event(unit, "END", counts)

    def _abort(self) -> None:
        try:
            self._p.abort_transaction()
        except KafkaException:
            log.exception("could not abort the Kafka transaction")

    def _row(self, change: RowChange, names: tuple[str, str | None, str | None], place: _Place, now: int) -> None:
        topic = names[0]
        shape = self._shape(change)
        try:
            compiled, key, value = self._encoded(shape, change, names, place, now)
        except (ValueError, TypeError, OverflowError):
            if change.binlog_shape is None or change.binlog_shape is shape:
                raise
            # Logged before a change of column types that kept their names (a narrower decimal, NOT NULL):
            # the row has the shape its binlog event describes.
            compiled, key, value = self._encoded(change.binlog_shape, change, names, place, now)
        if not compiled.published:
            self._schema_topic.publish(self._p, compiled.key_schema)
            self._schema_topic.publish(self._p, compiled.value_schema)
            compiled.published = True
        produce(self._p, topic, key, value)
        if change.op == "d":
            produce(self._p, topic, key, None)

    def _encoded(
        self, shape: TableShape, change: RowChange, names: tuple[str, str | None, str | None], place: _Place, now: int
    ) -> tuple[_Compiled, bytes, bytes]:
        """The event's key and value, encoded with the schemas of `shape`."""
        _, key_subject, value_subject = names
        compiled = self._compiled(shape)
        encode = compiled.encode
        before = None if change.before is None else encode(change.before)
        after = None if change.after is None else encode(change.after)
        image = after if after is not None else before
        assert image is not None
        key = self._codec.encode(compiled.key_schema, {n: image[n] for n in compiled.key_fields}, key_subject)
        if compiled.header is None:
            compiled.header = self._codec.header(compiled.value_schema, value_subject)
        source, transaction, total_order, collection_order = place
        writer = compiled.writer
        value = writer.value(
            compiled.header,
            writer.image(before),
            writer.image(after),
            source,
            change.row,
            change.op,
            now,
            transaction,
            total_order,
            collection_order,
        )
        return compiled, key, value

    def _transaction_event(self, unit: ChangeUnit, status: str, counts: Counter[str] | None) -> None:
        record = {
            "status": status,
            "id": unit.id,
            "event_count": None if counts is None else sum(counts.values()),
            "data_collections": None
            if counts is None
            else [{"data_collection": k, "event_count": v} for k, v in counts.items()],
            "ts_ms": now_ms(),
            "request_id": unit.request_id,
            "link_id": unit.link_id,
        }
        subject = f"{self._topics.transaction}-value" if self._codec.registry else None
        produce(self._p, self._topics.transaction, unit.id, self._codec.encode(FIXED["transaction"], record, subject))
