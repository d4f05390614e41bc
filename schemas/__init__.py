"""Avro schemas of every djlink event, and the codec that writes and reads them.

The `.avsc` files beside this module are the schemas of the fixed event types
(commands, replies, signals, acks, links, transaction metadata) and the
envelope template of row changes; `schemas.tables` generates the row record of
each captured table from its columns. Values travel in Avro single-object
encoding (0xC3 0x01, the 8-byte CRC-64-AVRO fingerprint, the body), and every
schema a producer uses is published to the compacted `<prefix>.schemas` topic
keyed by its fingerprint, so a subscriber decodes any topic with Kafka alone.
With a Confluent-compatible registry configured, change events use the
Confluent wire format instead (`schemas.registry`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

from schemas.registry import WIRE_MAGIC, Registry

HERE = Path(__file__).parent
MAGIC = b"\xc3\x01"

# Load order matters: later files refer to names defined by earlier ones.
_FIXED = [
    "source",
    "transaction_block",
    "transaction",
    "link",
    "command",
    "reply",
    "signal",
    "ack",
    "checkpoint",
    "dead_letter",
    "snapshot_progress",
    "flag",
]


class DecodeError(Exception):
    """A message that is not a djlink Avro value, or whose schema is unknown."""


@dataclass(frozen=True)
class Schema:
    """A parsed schema with its fingerprint: what the codec needs to write it."""

    subject: str
    definition: dict[str, Any]
    parsed: Any
    fingerprint: bytes

    @property
    def canonical(self) -> str:
        return str(fastavro.schema.to_parsing_canonical_form(self.parsed))


def load_avsc(name: str) -> dict[str, Any]:
    """The JSON of `schemas/<name>.avsc`."""
    result: dict[str, Any] = json.loads((HERE / f"{name}.avsc").read_text())
    return result


def expand(definition: dict[str, Any], named: dict[str, Any]) -> dict[str, Any]:
    """Inline every named type a definition refers to, so it stands alone."""
    parsed = fastavro.parse_schema(definition, named_schemas=dict(named))
    result: dict[str, Any] = fastavro.schema.expand_schema(parsed)  # type: ignore[assignment]
    return result


def make_schema(subject: str, definition: dict[str, Any]) -> Schema:
    parsed = fastavro.parse_schema(definition)
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    fp = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    return Schema(subject, definition, parsed, fp)


def _load_fixed() -> dict[str, Schema]:
    named: dict[str, Any] = {}
    result: dict[str, Schema] = {}
    for name in _FIXED:
        definition = expand(load_avsc(name), named)
        fastavro.parse_schema(load_avsc(name), named_schemas=named)  # adds its names to `named`
        result[name] = make_schema(f"djlink.{name}", definition)
    return result


FIXED: dict[str, Schema] = _load_fixed()


def avro_long(n: int) -> bytes:
    """An Avro int or long as written: zigzag, then little-endian base 128 (what fastavro writes)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def avro_string(text: str) -> bytes:
    """An Avro string as written: its UTF-8 length, then its UTF-8 bytes."""
    data = text.encode()
    return avro_long(len(data)) + data


def body_start(data: bytes) -> int:
    """Where the Avro body of a value `Codec.schema_of` has read starts: after the wire format's magic and
    registry id, or after the single-object encoding's magic and fingerprint."""
    return 5 if data[:1] == WIRE_MAGIC else 10


class Codec:
    """Writes values in single-object encoding (or, given a registry and a subject, in the Confluent wire
    format); reads both back, by fingerprint or by registry id.

    `resolve` is asked for a schema the codec has not seen (the schema topic
    reader); it returns the schema JSON or None.
    """

    def __init__(
        self,
        resolve: Callable[[bytes], str | None] | None = None,
        fixed: bool = True,
        registry: Registry | None = None,
    ) -> None:
        """`fixed=False`: know no schema beforehand, not even djlink's own (a subscriber's view)."""
        self._by_fp: dict[bytes, Schema] = {s.fingerprint: s for s in FIXED.values()} if fixed else {}
        self._by_id: dict[int, Schema] = {}
        self._resolve = resolve
        self.registry = registry

    def add(self, schema: Schema) -> None:
        self._by_fp[schema.fingerprint] = schema

    def encode(self, schema: Schema, record: dict[str, Any], subject: str | None = None) -> bytes:
        """Single-object encoding; the Confluent wire format when the codec has a registry and `subject` is given."""
        out = io.BytesIO()
        out.write(self.header(schema, subject))
        fastavro.schemaless_writer(out, schema.parsed, record)
        return out.getvalue()

    def header(self, schema: Schema, subject: str | None = None) -> bytes:
        """What comes before the Avro body in `encode`: magic and fingerprint, or magic and registry id."""
        if self.registry is not None and subject is not None:
            return WIRE_MAGIC + self.registry.id_for(subject, schema.fingerprint, schema.definition).to_bytes(4, "big")
        return MAGIC + schema.fingerprint

    def schema_of(self, data: bytes | None) -> Schema:
        if data is not None and len(data) >= 5 and data[:1] == WIRE_MAGIC:
            return self._registered(int.from_bytes(data[1:5], "big"))
        if data is None or len(data) < 10 or data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object encoded value")
        fp = data[2:10]
        schema = self._by_fp.get(fp)
        if schema is None and self._resolve is not None:
            text = self._resolve(fp)
            if text is not None:
                definition = json.loads(text)
                schema = make_schema(definition.get("name", "?"), definition)
                self._by_fp[fp] = schema
        if schema is None:
            raise DecodeError(f"unknown schema fingerprint {fp.hex()}")
        return schema

    def _registered(self, schema_id: int) -> Schema:
        schema = self._by_id.get(schema_id)
        if schema is None:
            if self.registry is None:
                raise DecodeError(f"a Confluent wire-format value (schema id {schema_id}) and no registry configured")
            text = self.registry.text(schema_id)
            if text is None:
                raise DecodeError(f"schema id {schema_id} unknown to the registry {self.registry.url}")
            definition = json.loads(text)
            schema = self._by_id[schema_id] = make_schema(definition.get("name", "?"), definition)
        return schema

    def decode(self, data: bytes | None) -> dict[str, Any]:
        return self.decode_with_schema(data)[1]

    def decode_with_schema(self, data: bytes | None) -> tuple[Schema, dict[str, Any]]:
        """The writer's schema and the decoded value."""
        schema = self.schema_of(data)
        assert data is not None
        try:
            body = io.BytesIO(data[body_start(data) :])
            record: dict[str, Any] = fastavro.schemaless_reader(body, schema.parsed, None)  # type: ignore[assignment]
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError(f"corrupt Avro body for {schema.subject}: {exc}") from exc
        return schema, record
