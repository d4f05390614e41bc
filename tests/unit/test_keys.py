"""Canonical key strings: the direct path for ints and strings writes exactly what json.dumps writes."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

import schemas
from foundation import keys
from foundation.keys import KeyReason


def reference(key: dict[str, Any], attributes: list[str] | None = None) -> str:
    """The canonical form as defined: JSON of the plain values, keys sorted, no spaces."""
    names = attributes if attributes is not None else sorted(key)
    return json.dumps({n: keys._plain(key[n]) for n in names}, sort_keys=True, separators=(",", ":"))


KEYS = [
    {"id": 1},
    {"b": -(2**63), "a": 2**64 - 1},
    {"subject": "mouse 🐭", "session": 3},
    {"name": 'quote " back \\ slash \n tab \t é', "z": 0},
    {"é": "x", "e": "y"},
    {"flag": True, "id": 2},  # bool is no int here: json writes true
    {"id": np.int64(7), "s": "x"},
    {"when": dt.datetime(2024, 2, 29, 23, 59, 59, 123456), "id": 1},
    {"u": uuid.UUID(int=5), "blob": b"\x00\xff"},
    {"d": Decimal("1.50"), "f": 0.1},
    {},
]


@pytest.mark.parametrize("key", KEYS, ids=[str(i) for i in range(len(KEYS))])
def test_encode_writes_what_json_dumps_writes(key: dict[str, Any]) -> None:
    assert keys.encode(key) == reference(key)
    names = list(reversed(list(key)))
    assert keys.encode({**key, "extra": 1}, names) == reference(key, names)


def test_encode_round_trips_through_decode() -> None:
    key = {"subject": "m🐭", "session": 3, "blob": b"\x01"}
    assert keys.decode(keys.encode(key)) == key


def test_whole_decimals_are_ints_as_datajoint_gives_them() -> None:
    # bigint unsigned travels as Avro decimal(20,0): Decimal at the applier, numpy uint64 from a DataJoint fetch.
    assert keys.encode({"serial": Decimal("5000000001")}) == keys.encode({"serial": np.uint64(5000000001)})
    assert keys.encode({"serial": Decimal("5000000001")}) == '{"serial":5000000001}'
    assert keys.encode({"price": Decimal("5.00")}) == '{"price":"5.00"}'  # a scale: as written, both sides


def test_a_refused_key_crosses_kafka_as_a_record_whatever_its_strings_hold() -> None:
    key = keys.encode({"name": "a: b", "n": 1})
    entry = KeyReason(key, "deprecated at the source")
    codec = schemas.Codec()
    record = {"request_id": "r", "status": "PROGRESS", "refused": [entry.to_avro()], "ts_ms": 0}
    decoded = codec.decode(codec.encode(schemas.FIXED["reply"], record))
    assert [KeyReason.from_avro(r) for r in decoded["refused"]] == [entry]
    assert str(entry) == f"{key}: deprecated at the source"


def test_parse_takes_what_encode_writes_for_each_kind_of_key_column() -> None:
    columns = {"id": "int", "at": "datetime", "raw": "binary", "price": "decimal", "ratio": "double"}
    key = {"id": 7, "at": dt.datetime(2026, 1, 2, 3, 4, 5), "raw": b"\x00\xff", "price": Decimal("1.50"), "ratio": 0.5}
    text = keys.encode(key)
    assert keys.parse(text, columns) == keys.decode(text)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not json", "is not JSON"),
        ("[1]", "is not a JSON object"),
        ('{"id":1,"other":2}', "does not name the primary key (id) and nothing else"),
        ('{"id) OR 1=1 --":1}', "does not name the primary key"),
        ('{"id":"1 OR 1=1"}', "wrong kind (id is int)"),
        ('{"id":true}', "wrong kind"),
        ('{"id":null}', "wrong kind"),
        ('{"id":[1]}', "wrong kind"),
    ],
)
def test_parse_refuses_what_is_not_a_key_of_the_table_and_says_why(text: str, why: str) -> None:
    with pytest.raises(keys.BadKey, match=re.escape(why)):
        keys.parse(text, {"id": "int"})


def test_parse_refuses_a_binary_value_that_is_not_base64() -> None:
    with pytest.raises(keys.BadKey, match="wrong kind"):
        keys.parse('{"raw":{"$b64":"***"}}', {"raw": "binary"})
    with pytest.raises(keys.BadKey, match="wrong kind"):
        keys.parse('{"raw":"plain"}', {"raw": "varbinary"})
