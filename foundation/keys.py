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


# The most entities one pull or delete request may name: the façade sends larger ones in parts, and the agent
# refuses a request naming more (one helper-table transaction and one snapshot signal per request).
MAX_REQUEST_KEYS = 100_000

_INTEGER = frozenset({"tinyint", "smallint", "mediumint", "int", "bigint", "year"})
_NUMBER = frozenset({"float", "double", "decimal"})
_BINARY = frozenset({"binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob"})


class BadKey(ValueError):
    """A key text from another site that is not a key of the table: says what is wrong with it."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _fits(data_type: str, value: Any) -> bool:
    """Whether a JSON value is what `encode` writes for a column of this type."""
    if isinstance(value, bool) or value is None:
        return False
    if data_type in _INTEGER:
        return isinstance(value, int)
    if data_type in _NUMBER:
        return isinstance(value, int | float) or (data_type == "decimal" and isinstance(value, str))
    if data_type in _BINARY:
        if not (isinstance(value, dict) and set(value) == {"$b64"} and isinstance(value["$b64"], str)):
            return False
        try:
            base64.b64decode(value["$b64"], validate=True)
        except ValueError:
            return False
        return True
    return isinstance(value, str | int | float)


def parse(text: str, columns: Mapping[str, str]) -> dict[str, Any]:
    """A key text another site sent, checked against the table's primary key (`columns`: name -> data type),
    as SQL parameters (see `decode`); BadKey naming what is wrong: not a JSON object, other attributes than the
    primary key's, or a value that is not of its column's kind."""
    try:
        raw = json.loads(text)
    except (ValueError, TypeError):
        raise BadKey(f"key {_shown(str(text))} is not JSON") from None
    if not isinstance(raw, dict):
        raise BadKey(f"key {_shown(text)} is not a JSON object")
    if set(raw) != set(columns):
        raise BadKey(f"key {_shown(text)} does not name the primary key ({', '.join(columns)}) and nothing else")
    wrong = [n for n, v in raw.items() if not _fits(columns[n], v)]
    if wrong:
        kinds = ", ".join(f"{n} is {columns[n]}" for n in wrong)
        raise BadKey(f"key {_shown(text)} has a value of the wrong kind ({kinds})")
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
