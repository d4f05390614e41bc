"""Row schemas of captured tables, generated from their columns.

One function maps a MariaDB column to an Avro type; two convert values between
what the database drivers give (PyMySQL for snapshot reads, python-mysql-
replication for the binlog) and what that Avro type holds. The envelope around
the row record is the template `envelope.avsc`.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import io
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import fastavro

from schemas import FIXED, DecodeError, Schema, avro_long, avro_string, body_start, expand, load_avsc, make_schema

_NAME_BAD = re.compile(r"[^A-Za-z0-9_]")
_LENGTH = re.compile(r"\((\d+)\)")
UTC = dt.UTC


@dataclass(frozen=True)
class Column:
    """One column as INFORMATION_SCHEMA.COLUMNS describes it."""

    name: str
    data_type: str  # lower case, e.g. 'int', 'varchar', 'decimal'
    column_type: str  # full, e.g. 'int(10) unsigned', "enum('a','b')"
    nullable: bool
    numeric_precision: int | None = None
    numeric_scale: int | None = None

    @property
    def unsigned(self) -> bool:
        return "unsigned" in self.column_type

    @property
    def length(self) -> int | None:
        """The declared length of `binary(16)`, `char(8)`...; None when the type has none."""
        m = _LENGTH.search(self.column_type)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TableShape:
    """The columns and primary key of one table at one point of its history."""

    db: str
    table: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


@functools.lru_cache(maxsize=4096)
def avro_name(text: str) -> str:
    """A legal Avro name for a SQL identifier (`#lookup`, `~external_x`, `2021_db`)."""
    name = _NAME_BAD.sub("_", text)
    return name if name and not name[0].isdigit() else f"_{name}"


def avro_type(column: Column) -> Any:
    """The Avro type of a column's (non-null) values."""
    t = column.data_type
    if t in ("tinyint", "smallint", "mediumint", "year"):
        return "int"
    if t == "int":
        return "long" if column.unsigned else "int"
    if t == "bigint":
        if column.unsigned:
            return {"type": "bytes", "logicalType": "decimal", "precision": 20, "scale": 0}
        return "long"
    if t == "float":
        return "float"
    if t == "double":
        return "double"
    if t == "decimal":
        return {
            "type": "bytes",
            "logicalType": "decimal",
            "precision": column.numeric_precision or 10,
            "scale": column.numeric_scale or 0,
        }
    if t in ("binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob", "bit"):
        return "bytes"
    if t == "date":
        return {"type": "int", "logicalType": "date"}
    if t == "datetime":
        return {"type": "long", "logicalType": "local-timestamp-micros"}
    if t == "timestamp":
        return {"type": "long", "logicalType": "timestamp-micros"}
    if t == "time":
        return {"type": "long", "djlink.type": "time-micros-signed"}
    return "string"  # char, varchar, text types, enum, set, json


def row_record(shape: TableShape, prefix: str) -> dict[str, Any]:
    fields = []
    for c in shape.columns:
        t = avro_type(c)
        fields.append(
            {"name": avro_name(c.name), "type": ["null", t], "default": None}
            if c.nullable
            else {"name": avro_name(c.name), "type": t}
        )
    return {
        "type": "record",
        "name": "Value",
        "namespace": f"{avro_name(prefix)}.{avro_name(shape.db)}.{avro_name(shape.table)}",
        "fields": fields,
    }


def key_record(shape: TableShape, prefix: str) -> dict[str, Any]:
    pk = [shape.column(n) for n in shape.primary_key]
    return {
        "type": "record",
        "name": "Key",
        "namespace": f"{avro_name(prefix)}.{avro_name(shape.db)}.{avro_name(shape.table)}",
        "fields": [{"name": avro_name(c.name), "type": avro_type(c)} for c in pk],
    }


def _fixed_named() -> dict[str, Any]:
    named: dict[str, Any] = {}
    for name in ("source", "transaction_block"):
        fastavro.parse_schema(load_avsc(name), named_schemas=named)
    return named


_NAMED = _fixed_named()


def envelope_schema(shape: TableShape, prefix: str) -> Schema:
    """The value schema of the table's change topic."""
    record = row_record(shape, prefix)
    envelope = copy.deepcopy(load_avsc("envelope"))
    envelope["namespace"] = record["namespace"]
    for field in envelope["fields"]:
        if field["type"] == ["null", "Value"]:
            field["type"] = ["null", record if field["name"] == "before" else "Value"]
    return make_schema(f"{prefix}.{shape.db}.{shape.table}-value", expand(envelope, _NAMED))


def key_schema(shape: TableShape, prefix: str) -> Schema:
    """The key schema of the table's change topic."""
    return make_schema(f"{prefix}.{shape.db}.{shape.table}-key", key_record(shape, prefix))


def select_expression(column: Column) -> str:
    """How a snapshot read selects a column so that PyMySQL receives its exact value.

    Values cross PyMySQL's text protocol as the server prints them, which is
    exact for every type but FLOAT: MariaDB prints it with 6 significant digits
    (123456.789 arrives as 123457.0, FLT_MAX as 3.40282e38). Widened to DOUBLE
    it prints exactly; Avro `float` narrows it back without loss.
    """
    name = "`" + column.name.replace("`", "``") + "`"
    if column.data_type == "float":
        return f"CAST({name} AS DOUBLE) AS {name}"
    return name


def to_avro(column: Column, value: Any) -> Any:
    """A driver value (PyMySQL or python-mysql-replication) as its Avro type holds it."""
    if value is None:
        return None
    t = column.data_type
    if t == "bigint" and column.unsigned:
        return Decimal(value)
    if t == "decimal":
        return value if isinstance(value, Decimal) else Decimal(str(value))
    if t == "timestamp":
        if isinstance(value, dt.datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value
        return value
    if t == "time":
        if isinstance(value, dt.timedelta):
            return (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
        if isinstance(value, dt.time):
            return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond
        return value
    if t == "bit" and isinstance(value, str):  # the binlog's '0101': the bits, as PyMySQL's big-endian bytes
        return int(value, 2).to_bytes((len(value) + 7) // 8, "big")
    if avro_type(column) == "bytes" and isinstance(value, str):
        value = value.encode()  # python-mysql-replication gives '' for an empty binary value
    if t == "binary":
        # The binlog drops BINARY(n)'s trailing 0x00 padding (a uuid ending in 00 arrives short, an
        # all-zero one as ''); the stored value always has n bytes, as PyMySQL reads it.
        return bytes(value).ljust(column.length or len(value), b"\x00")
    if avro_type(column) == "string" and isinstance(value, bytes | bytearray):
        return bytes(value).decode()
    if isinstance(value, set):  # SET columns from the binlog
        return ",".join(sorted(value))
    return value


def from_avro(column: Column, value: Any) -> Any:
    """An Avro value as a parameter for PyMySQL on the destination (session time zone UTC)."""
    if value is None:
        return None
    t = column.data_type
    if t == "timestamp" and isinstance(value, dt.datetime):
        return value.astimezone(UTC).replace(tzinfo=None)
    if t == "time":
        return dt.timedelta(microseconds=value)
    return value


# Types whose driver values are already what Avro holds: no conversion per value.
_AS_IS = {"tinyint", "smallint", "mediumint", "int", "year", "float", "double", "datetime", "date"}
_TEXT = {"char", "varchar", "tinytext", "text", "mediumtext", "longtext", "enum"}
_BLOB = {"varbinary", "tinyblob", "blob", "mediumblob", "longblob"}


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes | bytearray) else value


def _blob(value: Any) -> Any:
    return value.encode() if isinstance(value, str) else value


def _converter(column: Column) -> Any:
    """`to_avro` for one column, specialised for the common types (None: the value as it is)."""
    t = column.data_type
    if t in _AS_IS:
        return None
    if t in _TEXT:
        return _text
    if t in _BLOB:
        return _blob
    return functools.partial(to_avro, column)


class RowEncoder:
    """`row_to_avro` for one shape, with per-column work done once: the hot path of the capture."""

    def __init__(self, shape: TableShape) -> None:
        self._plan: list[tuple[str, str, Any]] = []
        for c in shape.columns:
            self._plan.append((c.name, avro_name(c.name), _converter(c)))

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        get = row.get
        return {
            avro: get(name) if convert is None or (value := get(name)) is None else convert(value)
            for name, avro, convert in self._plan
        }


class EnvelopeWriter:
    """Writes one table's change envelopes from parts, byte for byte what fastavro writes for the whole record.

    Avro writes a record as its fields one after the other, so the parts that
    do not change from row to row are encoded once: the `source` block of a
    unit's rows of one table (all but `row`, its last field) and the unit's
    transaction id. Only the row images go through fastavro, with the row
    record's schema; the rest are a few varints. Alone, a small row's event
    costs 4.5 us against 11 for the whole record (bench/README, capture).
    """

    def __init__(self, envelope: Schema) -> None:
        before = envelope.definition["fields"][0]
        assert before["name"] == "before" and before["type"][0] == "null", envelope.subject
        self._row = fastavro.parse_schema(before["type"][1])

    def image(self, record: dict[str, Any] | None) -> bytes:
        """The `before` or `after` field: the union's null, or its row branch and the row."""
        if record is None:
            return b"\x00"
        out = io.BytesIO()
        out.write(b"\x02")
        fastavro.schemaless_writer(out, self._row, record)
        return out.getvalue()

    @staticmethod
    def source(block: dict[str, Any]) -> bytes:
        """The `source` field without its last one, `row` (which `value` appends)."""
        out = io.BytesIO()
        fastavro.schemaless_writer(out, FIXED["source"].parsed, {**block, "row": 0})
        return out.getvalue()[:-1]  # the row, 0, is one byte

    @staticmethod
    def transaction(unit_id: str) -> bytes:
        """The `transaction` field's union branch and its `id`, the part shared by a unit's events."""
        return b"\x02" + avro_string(unit_id)

    @staticmethod
    def value(
        header: bytes,
        before: bytes,
        after: bytes,
        source: bytes,
        row: int,
        op: str,
        ts_ms: int,
        transaction: bytes,
        total_order: int,
        collection_order: int,
    ) -> bytes:
        """The whole value: header, then the envelope's fields in the order of `envelope.avsc`."""
        return b"".join(
            (
                header,
                before,
                after,
                source,
                avro_long(row),
                avro_string(op),
                b"\x02",  # ts_ms: the union's long
                avro_long(ts_ms),
                transaction,
                avro_long(total_order),
                avro_long(collection_order),
            )
        )


def row_to_avro(shape: TableShape, row: dict[str, Any]) -> dict[str, Any]:
    return {avro_name(c.name): to_avro(c, row.get(c.name)) for c in shape.columns}


def row_from_avro(shape: TableShape, record: dict[str, Any]) -> dict[str, Any]:
    return {c.name: from_avro(c, record.get(avro_name(c.name))) for c in shape.columns}


def _non_null(t: Any) -> Any:
    if isinstance(t, list):
        rest = [x for x in t if x != "null"]
        return rest[0] if len(rest) == 1 else rest
    return t


def sql_converters(value_record: dict[str, Any]) -> dict[str, Any]:
    """Per field of a row record whose Avro value is not already a PyMySQL parameter, the function that
    turns it into one (fields not named pass as they are).

    Read from the schema itself (its logical types), so a consumer needs
    nothing but the schema topic to write rows back into MariaDB.
    """
    result: dict[str, Any] = {}
    for f in value_record["fields"]:
        t = _non_null(f["type"])
        if isinstance(t, dict) and t.get("logicalType") == "timestamp-micros":
            result[f["name"]] = lambda v: None if v is None else v.astimezone(UTC).replace(tzinfo=None)
        elif isinstance(t, dict) and t.get("djlink.type") == "time-micros-signed":
            result[f["name"]] = lambda v: None if v is None else dt.timedelta(microseconds=v)
    return result


def _layout(t: Any) -> Any:
    """What of an Avro type decides how its bytes are read: names, docs and defaults left out."""
    if isinstance(t, list):
        return [_layout(x) for x in t]
    if isinstance(t, dict):
        if t.get("type") == "record":
            return ("record", [(f["name"], _layout(f["type"])) for f in t["fields"]])
        return {k: _layout(v) for k, v in t.items() if k not in ("doc", "default", "name", "namespace", "aliases")}
    return t


_SOURCE_HEAD = {**FIXED["source"].definition, "name": "SourceHead", "fields": FIXED["source"].definition["fields"][:-1]}
_TAIL = {  # what follows the `source` block's head: its `row`, then the envelope's last three fields
    "type": "record",
    "name": "EnvelopeTail",
    "namespace": "djlink",
    "fields": [
        FIXED["source"].definition["fields"][-1],
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": ["null", "long"]},
        {"name": "transaction", "type": ["null", copy.deepcopy(FIXED["transaction_block"].definition)]},
    ],
}
_ENVELOPE_LAYOUT = ("before", "after", "source", "op", "ts_ms", "transaction")


class EnvelopeParts:
    """Reads one table's change envelopes from parts, what `EnvelopeWriter` writes (and fastavro for the whole
    record): the same dicts as decoding the whole record, for two thirds of its CPU (alone, 5.8 against 8.9 us
    for an event of a small row, 7.5 against 10.4 with an 8 KiB blob; bench/README).

    The row images go through fastavro with the row record's schema. The
    `source` block's head (all but `row`) is the same for a unit's rows of
    one table, so the bytes of the last one decoded are kept: an event that
    starts its block with the same bytes has the same head (Avro reads a value
    from its bytes alone, one field after the other), which is not decoded
    again. The rest (`row`, `op`, `ts_ms`, `transaction`) is one small record.
    """

    _HEAD = fastavro.parse_schema(copy.deepcopy(_SOURCE_HEAD))
    _TAIL = fastavro.parse_schema(copy.deepcopy(_TAIL))

    def __init__(self, envelope: Schema) -> None:
        fields = envelope.definition["fields"]
        self._row = fastavro.parse_schema(copy.deepcopy(fields[0]["type"][1]))
        self._head: bytes | None = None
        self._source: dict[str, Any] = {}

    @staticmethod
    def fits(envelope: Schema) -> bool:
        """Whether `envelope` has the layout of `envelope.avsc` (any other is decoded whole)."""
        fields = envelope.definition.get("fields")
        if not isinstance(fields, list) or tuple(f.get("name") for f in fields) != _ENVELOPE_LAYOUT:
            return False
        before, after = fields[0]["type"], fields[1]["type"]
        if not (isinstance(before, list) and len(before) == 2 and before[0] == "null" and isinstance(before[1], dict)):
            return False
        # `after` may name the row record `before` defines, or repeat it.
        if not (isinstance(after, list) and len(after) == 2 and after[0] == "null"):
            return False
        if after[1] != before[1].get("name") and _layout(after[1]) != _layout(before[1]):
            return False
        tail = [_layout(f["type"]) for f in fields[2:]]
        return tail == [_layout(FIXED["source"].definition), *(_layout(f["type"]) for f in _TAIL["fields"][1:])]

    def _image(self, data: bytes, fo: io.BytesIO) -> Any:
        """The `before` or `after` field at `fo`'s position: its union's branch (0 null, 1 the row), then the row."""
        at = fo.tell()
        fo.seek(at + 1)
        if data[at] == 0:
            return None
        if data[at] != 2:  # branch 1, zigzag-encoded
            raise ValueError(f"byte {at} ({data[at]:#04x}) is neither branch of the union ['null', row]")
        return fastavro.schemaless_reader(fo, self._row, None)

    def decode(self, data: bytes, start: int) -> dict[str, Any]:
        """The envelope written at `data[start:]` (any exception on corrupt bytes: the caller says DecodeError)."""
        read = fastavro.schemaless_reader
        fo = io.BytesIO(data)
        fo.seek(start)
        before = self._image(data, fo)
        after = self._image(data, fo)
        at = fo.tell()
        head = self._head
        if head is not None and data.startswith(head, at):
            fo.seek(at + len(head))
        else:
            self._source = read(fo, self._HEAD, None)  # type: ignore[assignment]
            self._head = data[at : fo.tell()]
        tail: dict[str, Any] = read(fo, self._TAIL, None)  # type: ignore[assignment]
        return {
            "before": before,
            "after": after,
            "source": {**self._source, "row": tail["row"]},
            "op": tail["op"],
            "ts_ms": tail["ts_ms"],
            "transaction": tail["transaction"],
        }


class EnvelopeReader:
    """Decodes change events of any table into rows of PyMySQL parameters, one converter set per schema."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self._converters: dict[bytes, dict[str, Any]] = {}
        self._parts: dict[bytes, EnvelopeParts | None] = {}  # per value schema; None: decoded whole

    def decode(self, data: bytes | None) -> tuple[Schema, dict[str, Any]]:
        """The writer's schema and the decoded envelope, as `Codec.decode_with_schema` gives them (DecodeError on
        bad data); an envelope of `envelope.avsc`'s layout is read from parts (`EnvelopeParts`)."""
        vschema = self.codec.schema_of(data)
        assert data is not None
        if vschema.fingerprint not in self._parts:
            self._parts[vschema.fingerprint] = EnvelopeParts(vschema) if EnvelopeParts.fits(vschema) else None
        parts = self._parts[vschema.fingerprint]
        if parts is None:
            return self.codec.decode_with_schema(data)  # type: ignore[no-any-return]
        try:
            return vschema, parts.decode(data, body_start(data))
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError(f"corrupt Avro body for {vschema.subject}: {str(exc) or type(exc).__name__}") from exc

    def converters(self, vschema: Any) -> dict[str, Any]:
        """Per column, Avro value -> PyMySQL parameter; DecodeError when `vschema` is no change envelope."""
        if vschema.fingerprint not in self._converters:
            fields = {f["name"]: f["type"] for f in vschema.definition.get("fields", [])}
            before = fields.get("before")
            if not {"before", "after", "op", "transaction"} <= fields.keys() or not isinstance(before, list):
                raise DecodeError(f"{vschema.subject} is not a change event envelope")
            record = next((t for t in before if isinstance(t, dict) and t.get("type") == "record"), None)
            if record is None:
                raise DecodeError(f"{vschema.subject} is not a change event envelope")
            self._converters[vschema.fingerprint] = sql_converters(record)
        return self._converters[vschema.fingerprint]

    @staticmethod
    def image(envelope: dict[str, Any], convert: dict[str, Any], side: str) -> dict[str, Any] | None:
        """The `before` or `after` row of a decoded envelope as PyMySQL parameters (None when absent)."""
        row = envelope[side]
        if row is None:
            return None
        out = dict(row)
        for name, to_sql in convert.items():
            if name in out:
                out[name] = to_sql(out[name])
        return out
