"""Primary keys as canonical JSON strings: what crosses Kafka instead of SQL text.

The façade (from DataJoint), the capture (from the binlog and snapshot reads)
and the applier (from Avro) each see a key's values as different Python types;
`encode` maps all of them to one string, so keys compare equal across sites.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, uuid.UUID):
        return _plain(value.bytes)
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None).isoformat(sep=" ")
    if isinstance(value, Decimal) and value.as_tuple().exponent == 0:
        # A whole number as Avro's decimal gives it (bigint unsigned, decimal(n,0)); DataJoint gives an int.
        return int(value)
    if isinstance(value, dt.date | dt.time | dt.timedelta | Decimal):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars from DataJoint fetches
        return value.item()
    return value


def plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """Attribute values as JSON-able values, compared the way keys are (see `encode`)."""
    return {k: _plain(v) for k, v in values.items()}


@functools.lru_cache(maxsize=4096)
def _quoted(name: str) -> str:
    return json.dumps(name)


def encode(key: Mapping[str, Any], attributes: Sequence[str] | None = None) -> str:
    """The canonical string of a key (only `attributes`, when given).

    Keys of ints and strings (nearly all: the applier encodes one per row) are
    written directly, as `json.dumps` would write them; others go through it.
    """
    names = sorted(attributes if attributes is not None else key)
    parts = []
    for n in names:
        value = key[n]
        kind = type(value)
        if kind is int:
            parts.append(f"{_quoted(n)}:{value}")
        elif kind is str:
            parts.append(f"{_quoted(n)}:{json.dumps(value)}")
        else:
            return _encode(key, names)
    return "{" + ",".join(parts) + "}"


def _encode(key: Mapping[str, Any], names: Sequence[str]) -> str:
    return json.dumps({n: _plain(key[n]) for n in names}, sort_keys=True, separators=(",", ":"))


def decode(text: str) -> dict[str, Any]:
    """A key as SQL parameters: bytes where bytes were, strings MariaDB compares as the column's type."""
    raw = json.loads(text)
    return {k: base64.b64decode(v["$b64"]) if isinstance(v, dict) else v for k, v in raw.items()}


@dataclass(frozen=True)
class KeyReason:
    """An entity that was not done, and why: how refusals and failures cross Kafka (Avro `djlink.KeyReason`)."""

    key: str  # canonical key JSON (`encode`)
    reason: str

    def to_avro(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason}

    @classmethod
    def from_avro(cls, record: Mapping[str, Any]) -> KeyReason:
        return cls(str(record["key"]), str(record["reason"]))

    def __str__(self) -> str:
        """`<key>: <reason>`, as `pull()` and `delete()` list it for the user."""
        return f"{self.key}: {self.reason}"
