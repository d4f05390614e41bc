"""Avro schemas of every djlink event, and the codec that writes and reads them.

The `.avsc` files beside this module are the schemas of the fixed event types
(commands, replies, signals, acks, links, transaction metadata) and the
envelope template of row changes; `schemas.tables` generates the row record of
each captured table from its columns. Values travel in Avro single-object
encoding (0xC3 0x01, the 8-byte CRC-64-AVRO fingerprint, the body), and every
schema a producer uses is published to the compacted `<prefix>.schemas` topic
keyed by its fingerprint, so a subscriber decodes any topic with Kafka alone.
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


class Codec:
    """Writes values in single-object encoding; reads them back by fingerprint.

    `resolve` is asked for a schema the codec has not seen (the schema topic
    reader); it returns the schema JSON or None.
    """

    def __init__(self, resolve: Callable[[bytes], str | None] | None = None, fixed: bool = True) -> None:
        """`fixed=False`: know no schema beforehand, not even djlink's own (a subscriber's view)."""
        self._by_fp: dict[bytes, Schema] = {s.fingerprint: s for s in FIXED.values()} if fixed else {}
        self._resolve = resolve

    def add(self, schema: Schema) -> None:
        self._by_fp[schema.fingerprint] = schema

    def encode(self, schema: Schema, record: dict[str, Any]) -> bytes:
        out = io.BytesIO()
        out.write(MAGIC)
        out.write(schema.fingerprint)
        fastavro.schemaless_writer(out, schema.parsed, record)
        return out.getvalue()

    def schema_of(self, data: bytes | None) -> Schema:
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

    def decode(self, data: bytes | None) -> dict[str, Any]:
        schema = self.schema_of(data)
        assert data is not None
        try:
            record: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema.parsed, None)  # type: ignore[assignment]
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError(f"corrupt Avro body for {schema.subject}: {exc}") from exc
        return record
