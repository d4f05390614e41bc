"""Every column type DataJoint 0.14 declares on MariaDB, bit-exact on all three paths.

One source table holds one column per type and four rows (typical values, low
extremes, high extremes, NULLs). One pipeline (capture and agent in one process,
the applier in another, both with a non-UTC TZ) serves the whole module. Each
value must arrive exactly as the Python value given here:

1. streamed from the binlog (op 'c', inserted after the link was registered),
2. read by a snapshot for a pull (op 'r'),
3. written by the applier (the destination row equals the source row, compared
   in SQL on representations that lose nothing).

And the façade must declare a destination table whose columns are the source's.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import datajoint as dj
import numpy as np
import pytest

from foundation.topics import Topics
from link import link
from tests.conftest import Site, admin, open_site, wait_for
from tests.integration.test_pull import read_topic

UTC = dt.UTC
CAPTURE_TZ = "America/New_York"  # the pipeline's process time zone: TIMESTAMPs must still be UTC
TABLE = "types"
ROWS = {1: "typical", 2: "low", 3: "high", 4: "null"}


def f32(x: float) -> float:
    """The FLOAT (IEEE single) nearest to x, as the Python float Avro `float` decodes to."""
    result: float = struct.unpack("<f", struct.pack("<f", x))[0]
    return result


def dec(text: str, scale: int) -> Decimal:
    """A DECIMAL(p, scale) value as the database holds it: exactly `scale` fractional digits."""
    whole, _, frac = text.partition(".")
    return Decimal(f"{whole}.{frac.ljust(scale, '0')}" if scale else whole)


def micros(text: str) -> int:
    """A TIME literal ('-838:59:59.999999') as the signed microseconds of the schema's time-micros-signed."""
    sign = -1 if text.startswith("-") else 1
    hms, _, frac = text.lstrip("-").partition(".")
    h, m, s = (int(p) for p in hms.split(":"))
    return sign * (((h * 60 + m) * 60 + s) * 1_000_000 + int(frac.ljust(6, "0")))


def naive(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass(frozen=True)
class Col:
    """A column: its DataJoint type, and per non-NULL row the SQL parameter inserted and the value expected."""

    name: str
    dj_type: str
    values: tuple[tuple[Any, Any], tuple[Any, Any], tuple[Any, Any]]  # (parameter, expected) per row 1..3

    def expected(self) -> dict[int, Any]:
        return {1: self.values[0][1], 2: self.values[1][1], 3: self.values[2][1], 4: None}

    def parameters(self) -> dict[int, Any]:
        return {1: self.values[0][0], 2: self.values[1][0], 3: self.values[2][0], 4: None}

    @property
    def is_float(self) -> bool:
        return self.dj_type.split("(")[0] in ("float", "double")


def same(*values: Any) -> tuple[tuple[Any, Any], tuple[Any, Any], tuple[Any, Any]]:
    a, b, c = values
    return (a, a), (b, b), (c, c)


def typed(convert: Any, *texts: Any) -> tuple[tuple[Any, Any], tuple[Any, Any], tuple[Any, Any]]:
    a, b, c = texts
    return (a, convert(a)), (b, convert(b)), (c, convert(c))


BLOB = dj.blob.pack(np.array([[1.5, -2.0], [np.pi, np.inf]]))
BIG_BLOB = dj.blob.pack(np.arange(10_000, dtype=np.float64))  # zlib-compressed ('ZL123'), ~15 kB
assert BIG_BLOB.startswith(b"ZL123")
FLT_MAX = f32(3.4028234663852886e38)
D65 = "9" * 35 + "." + "9" * 30
UUID_TYPICAL = uuid.UUID("0b5e1f6a-2c3d-4e5f-8a9b-0c1d2e3f4000")  # trailing zero byte: BINARY(16) pads with 0x00
JSON_BIG = json.dumps({"k": "🐭" * 1000, "n": [1, 2.5, None, True]}, ensure_ascii=False)

COLUMNS = [
    Col("c_tinyint", "tinyint", same(42, -128, 127)),
    Col("c_tinyint_u", "tinyint unsigned", same(200, 0, 255)),
    Col("c_smallint", "smallint", same(-1234, -32768, 32767)),
    Col("c_smallint_u", "smallint unsigned", same(40000, 0, 65535)),
    Col("c_mediumint", "mediumint", same(-123456, -8388608, 8388607)),
    Col("c_mediumint_u", "mediumint unsigned", same(9000000, 0, 16777215)),
    Col("c_int", "int", same(-123456789, -2147483648, 2147483647)),
    Col("c_int_u", "int unsigned", same(3000000000, 0, 4294967295)),
    Col("c_bigint", "bigint", same(-1234567890123, -9223372036854775808, 9223372036854775807)),
    Col("c_bigint_u", "bigint unsigned", typed(Decimal, 12345678901234567890, 0, 18446744073709551615)),
    Col("c_bool", "bool", same(1, 0, 1)),
    Col("c_float", "float", same(f32(123456.789), -FLT_MAX, FLT_MAX)),
    Col("c_float_tiny", "float", same(f32(1.00000012), f32(-1.17549435e-38), f32(1.401298464324817e-45))),
    Col("c_double", "double", same(0.1 + 0.2, -1.7976931348623157e308, 1.7976931348623157e308)),
    Col("c_double_tiny", "double", same(1 / 3, -2.2250738585072014e-308, 5e-324)),
    Col("c_decimal", "decimal(65,30)", typed(lambda t: dec(t, 30), "1234.5", "-" + D65, D65)),
    Col("c_decimal_small", "decimal(5,2)", typed(lambda t: dec(t, 2), "-0.01", "-999.99", "999.99")),
    Col("c_decimal_int", "decimal(20,0)", typed(lambda t: dec(t, 0), "-1", "-" + "9" * 20, "9" * 20)),
    Col("c_char", "char(8)", same("ab🐭é", "", "🐭" * 8)),
    Col("c_varchar", "varchar(255)", same("émoji 🐭 中文 \t\n\"'\\ end", "", "🐭" * 255)),
    # Labels stay in the BMP: MariaDB's metadata (SHOW CREATE TABLE, information_schema) is utf8mb3 and shows
    # a 4-byte character of an ENUM label as '?', so no tool can re-declare such a column from it.
    Col("c_enum", "enum('a','b c','ü中')", same("b c", "a", "ü中")),
    Col("c_date", "date", typed(dt.date.fromisoformat, "2024-02-29", "1000-01-01", "9999-12-31")),
    Col("c_time", "time", typed(micros, "123:45:06", "-838:59:59", "838:59:59")),
    Col("c_time3", "time(3)", typed(micros, "-00:00:00.001", "-838:59:59.999", "838:59:59.999")),
    Col("c_time6", "time(6)", typed(micros, "-12:34:56.789012", "-838:59:59.999999", "838:59:59.999999")),
    Col("c_datetime", "datetime", typed(naive, "2024-02-29 23:59:59", "1000-01-01 00:00:00", "9999-12-31 23:59:59")),
    Col(
        "c_datetime3",
        "datetime(3)",
        typed(naive, "2024-02-29 23:59:59.123", "1000-01-01 00:00:00.001", "9999-12-31 23:59:59.999"),
    ),
    Col(
        "c_datetime6",
        "datetime(6)",
        typed(naive, "2024-02-29 23:59:59.999999", "1000-01-01 00:00:00.000001", "9999-12-31 23:59:59.999999"),
    ),
    # Inserted in a UTC session; 07:30 UTC is 03:30 in New York that day (the DST switch).
    Col("c_timestamp", "timestamp", typed(utc, "2024-03-10 07:30:00", "1970-01-01 00:00:01", "2038-01-19 03:14:07")),
    Col(
        "c_timestamp6",
        "timestamp(6)",
        typed(utc, "2024-03-10 07:30:00.123456", "1970-01-01 00:00:01.000001", "2038-01-19 03:14:07.999999"),
    ),
    Col("c_year", "year", same(2024, 1901, 2155)),
    Col("c_tinyblob", "tinyblob", same(b"mYm\x00\x00\xff", b"", bytes(range(255)))),
    Col("c_blob", "blob", same(BLOB, b"", bytes(range(256)) * 255)),
    Col("c_mediumblob", "mediumblob", same(BLOB, b"", BIG_BLOB)),
    Col("c_longblob", "longblob", same(BLOB, b"", BIG_BLOB)),
    Col("c_uuid", "uuid", same(UUID_TYPICAL.bytes, bytes(16), b"\xff" * 16)),
    Col("c_json", "json", same('{"a": [1, 2.5, "🐭"], "b": null}', "null", JSON_BIG)),
    Col("c_attach", "attach", same(b"trace.npy\0" + BLOB, b"empty.txt\0", "🐭 data.bin".encode() + b"\0" + BIG_BLOB)),
]
BY_NAME = {c.name: c for c in COLUMNS}


def declare_source(site: Site) -> Any:
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{site.source_schema}` CHARACTER SET utf8mb4")
    conn.close()
    schema = dj.Schema(site.source_schema, connection=site.source_dj())
    body = "\n".join(f"{c.name} = null : {c.dj_type}" for c in COLUMNS)

    class Types(dj.Manual):
        definition = f"id : int\n---\n{body}\n"

    return schema(Types)


def column_lines(site: Site, side: str, db: str) -> dict[str, str]:
    """Each column's line of SHOW CREATE TABLE: its full declaration (type, charset, default, CHECK, comment)."""
    conn = admin(site.env, side)
    with conn.cursor() as cur:
        cur.execute(f"SHOW CREATE TABLE `{db}`.`{TABLE}`")
        ddl = cur.fetchone()[1]
    conn.close()
    # Integer display widths carry no value (DataJoint's heading drops them: bool's tinyint(1) comes back tinyint(4)).
    lines = [re.sub(r"int\(\d+\)", "int", line.strip().rstrip(",")) for line in ddl.splitlines()]
    return {line.split("`")[1]: line for line in lines if line.startswith("`")}


def clone_destination(site: Site) -> None:
    """The destination table with the source's own DDL, so the applier is tested on identical columns.

    How the façade declares destination tables is tested on its own (`test_facade_declares_...`).
    """
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"SHOW CREATE TABLE `{site.source_schema}`.`{TABLE}`")
        ddl = cur.fetchone()[1]
    conn.close()
    conn = admin(site.env, "DEST")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{site.dest_schema}` CHARACTER SET utf8mb4")
        cur.execute(f"USE `{site.dest_schema}`")
        cur.execute(ddl)
    conn.close()


def insert(site: Site, row_ids: list[int]) -> None:
    """The rows, with plain SQL in a UTC session, in one transaction."""
    names = ", ".join(["id", *(c.name for c in COLUMNS)])
    marks = ", ".join(["%s"] * (len(COLUMNS) + 1))
    conn = admin(site.env, "SOURCE", charset="utf8mb4", init_command="SET time_zone='+00:00'")
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO `{site.source_schema}`.`{TABLE}` ({names}) VALUES ({marks})",
            [[i, *(c.parameters()[i if i in ROWS else 1] for c in COLUMNS)] for i in row_ids],
        )
    conn.close()


def exact_sql(c: Col) -> str:
    """A representation of the stored value that loses nothing (FLOAT and DOUBLE print rounded as text)."""
    if c.is_float:
        return f"CAST(`{c.name}` AS DOUBLE)"
    return f"HEX(CAST(`{c.name}` AS BINARY))"


def stored(site: Site, side: str, db: str) -> dict[int, dict[str, tuple[int, Any]]]:
    """Per row and column: (IS NULL, the exact representation)."""
    conn = admin(site.env, side, init_command="SET time_zone='+00:00'")
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT id, {', '.join(f'`{c.name}` IS NULL, {exact_sql(c)}' for c in COLUMNS)} "
            f"FROM `{db}`.`{TABLE}` ORDER BY id"
        )
        result: dict[int, dict[str, Any]] = {}
        for row in cur.fetchall():
            values = iter(row[1:])
            result[row[0]] = {}
            for c in COLUMNS:
                is_null, value = next(values), next(values)
                if c.is_float and value is not None:
                    value = repr(value)  # shortest round-trip text: one per IEEE double, -0.0 included
                result[row[0]][c.name] = (is_null, value)
    conn.close()
    return result


def identical(actual: Any, expected: Any) -> bool:
    """Same type and same value, down to the bit (floats) and the scale (decimals) and the time zone."""
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, float):
        return struct.pack("<d", actual) == struct.pack("<d", expected)
    if isinstance(expected, Decimal):
        return bool(actual.as_tuple() == expected.as_tuple())
    if isinstance(expected, dt.datetime):
        return bool(actual == expected and actual.utcoffset() == expected.utcoffset())
    return bool(actual == expected)


def mismatches(c: Col, events: dict[int, dict[str, Any]]) -> list[str]:
    wrong = []
    for row_id, expected in c.expected().items():
        if row_id not in events:
            wrong.append(f"row {ROWS[row_id]}: no event")
            continue
        actual = events[row_id][c.name]
        if not identical(actual, expected):
            wrong.append(f"row {ROWS[row_id]}: got {actual!r:.200}, expected {expected!r:.200}")
    return wrong


@dataclass
class Results:
    streamed: dict[int, dict[str, Any]]  # id -> `after` of its op 'c' event
    snapshot: dict[int, dict[str, Any]]  # id -> `after` of its op 'r' event
    source: dict[int, dict[str, tuple[int, Any]]]  # id -> column -> (IS NULL, exact representation)
    destination: dict[int, dict[str, tuple[int, Any]]]
    pull_problem: str  # empty when the pull completed
    declaration_error: str | None  # how the façade failed to declare a destination table itself
    declared: tuple[dict[str, str], dict[str, str]]  # column lines of SHOW CREATE TABLE: source, façade-declared


def declare_with_the_facade(site: Site) -> tuple[str | None, tuple[dict[str, str], dict[str, str]]]:
    """A second link of the source table, into a fresh destination schema that the façade declares itself."""
    db = f"{site.dest_schema}_decl"
    error = None
    try:

        @link(site.source_host, site.source_schema, site.helper_schema, "outbound_decl", db)
        class Types:
            """Declared by the façade."""

    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    try:
        declared = column_lines(site, "DEST", db) if error is None else {}
    finally:
        conn = admin(site.env, "DEST")
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
        conn.close()
    return error, (column_lines(site, "SOURCE", site.source_schema), declared)


@pytest.fixture(scope="module")
def types_site(services_env: dict[str, str]) -> Iterator[Site]:
    """The conftest `site`, once for the module: own schemas, topic prefix and link user."""
    with open_site(services_env) as s:
        yield s


def pipeline_log(site: Site) -> str:
    """What the pipeline printed (it is stopped first): the cause when a pull does not complete."""
    site.stop()
    return "\n".join(p.stderr.read()[-3000:] for p in site.processes if p.stderr is not None)


@pytest.fixture(scope="module")
def results(types_site: Site) -> Results:
    site = types_site
    declare_source(site)
    insert(site, [0])  # a canary, to know when the capture follows the link
    clone_destination(site)
    # Two processes, so that the capture keeps serving snapshots should the applier fail on a value.
    site.start("capture", "agent", TZ=CAPTURE_TZ)
    site.start("applier", TZ=CAPTURE_TZ)
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Types:
        """Every type."""

    # Once the canary's pull is acknowledged the capture has taken the link's snapshot signal, so it
    # captures the table: rows inserted from now on stream.
    canary = (Types().source & {"id": 0}).pull(timeout=30)
    assert canary.pulled == 1, f"{canary}\n{pipeline_log(site)}"
    insert(site, list(ROWS))
    topic = Topics(site.topic_prefix).table(site.source_schema, TABLE)

    def streamed() -> dict[int, dict[str, Any]]:
        found = {e["after"]["id"]: e["after"] for e in read_topic(site, topic) if e["op"] == "c"}
        return found if set(ROWS) <= set(found) else {}

    wait_for(streamed, timeout=30, what="the streamed inserts on the change topic")
    summary = (Types().source & [{"id": i} for i in ROWS]).pull(timeout=20)
    declaration_error, declared = declare_with_the_facade(site)
    events = read_topic(site, topic)
    complete = (summary.pulled, summary.refused, summary.in_flight) == (len(ROWS), [], [])
    return Results(
        streamed={e["after"]["id"]: e["after"] for e in events if e["op"] == "c"},
        snapshot={e["after"]["id"]: e["after"] for e in events if e["op"] == "r"},
        source=stored(site, "SOURCE", site.source_schema),
        destination=stored(site, "DEST", site.dest_schema),
        pull_problem="" if complete else f"pull: {summary}\n{pipeline_log(site)}",
        declaration_error=declaration_error,
        declared=declared,
    )


NAMES = [c.name for c in COLUMNS]


@pytest.mark.parametrize("name", NAMES)
def test_binlog_streaming_is_bit_exact(results: Results, name: str) -> None:
    assert mismatches(BY_NAME[name], results.streamed) == []


@pytest.mark.parametrize("name", NAMES)
def test_snapshot_read_is_bit_exact(results: Results, name: str) -> None:
    assert mismatches(BY_NAME[name], results.snapshot) == []


@pytest.mark.parametrize("name", NAMES)
def test_applier_writes_the_source_row_bit_exactly(results: Results, name: str) -> None:
    c = BY_NAME[name]
    assert not results.pull_problem
    # The source holds what the test inserted, so that the comparison below compares the right thing.
    assert [results.source[i][name][0] for i in ROWS] == [0, 0, 0, 1]
    if c.is_float:
        assert [results.source[i][name][1] for i in (1, 2, 3)] == [repr(c.expected()[i]) for i in (1, 2, 3)]
    wrong = {
        ROWS[i]: (results.source[i][name], results.destination.get(i, {}).get(name))
        for i in ROWS
        if results.destination.get(i, {}).get(name) != results.source[i][name]
    }
    assert wrong == {}, "row: (source, destination)"


def test_facade_declares_every_type_at_the_destination_as_the_source_has_it(results: Results) -> None:
    assert results.declaration_error is None
    source, declared = results.declared
    assert {n: declared.get(n) for n in NAMES if declared.get(n) != source[n]} == {}
