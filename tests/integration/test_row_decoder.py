"""The capture's compiled row reader (`cdc.rows`) decodes exactly what python-mysql-replication decodes.

Random values of every column type the reader handles (and NULLs among them)
are inserted, updated and deleted on the real source server; the same binlog
range is then read twice, once decoded by the library and once by `RowReader`,
and every value must be identical: same type, same bits. A table with SET and
BIT columns must fall back to the library.
"""

from __future__ import annotations

import datetime as dt
import random
import struct
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import MariadbGtidEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

import cdc.decoders  # noqa: F401 - the library's TIME(fsp) fix, as the capture runs it
from cdc.rows import Row, RowReader, library_rows
from devtools.services import binlog_settings
from tests.conftest import admin
from tests.integration.test_types import identical as same_bits

ROWS = 150
RNG = random.Random(20261127)


def _int(bits: int, unsigned: bool) -> Callable[[], int]:
    lo, hi = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return lambda: RNG.choice([lo, hi, 0, RNG.randint(lo, hi), RNG.randint(-100, 100) if not unsigned else 7])


def _float32() -> float:
    while True:
        (value,) = struct.unpack("<f", RNG.getrandbits(32).to_bytes(4, "little"))
        if value == value and abs(value) != float("inf"):
            return float(value)


def _float64() -> float:
    while True:
        (value,) = struct.unpack("<d", RNG.getrandbits(64).to_bytes(8, "little"))
        if value == value and abs(value) != float("inf"):
            return float(value)


def _decimal(p: int, s: int) -> Callable[[], str]:
    def make() -> str:
        whole = "".join(RNG.choice("0123456789") for _ in range(RNG.randint(1, p - s))) if p > s else "0"
        frac = "".join(RNG.choice("0123456789") for _ in range(s))
        return ("-" if RNG.random() < 0.5 else "") + whole + ("." + frac if s else "")

    return make


def _text(n: int) -> Callable[[], str]:
    alphabet = "aZ09 é中🐭\t'\"\\"
    return lambda: "".join(RNG.choice(alphabet) for _ in range(RNG.randint(0, n)))


def _bytes(n: int) -> Callable[[], bytes]:
    return lambda: RNG.randbytes(RNG.randint(0, n))


def _time(fsp: int) -> Callable[[], str]:
    def make() -> str:
        micros = RNG.choice([0, RNG.randint(0, 999_999), 999_999])
        seconds = RNG.choice([0, 1, RNG.randint(0, 838 * 3600 + 59 * 60 + 59)])
        sign = "-" if RNG.random() < 0.5 else ""
        h, rest = divmod(seconds, 3600)
        frac = f"{micros:06d}"[:fsp]
        return f"{sign}{h}:{rest // 60:02d}:{rest % 60:02d}" + (f".{frac}" if fsp else "")

    return make


def _datetime(fsp: int, lo: int, hi: int) -> Callable[[], str]:
    def make() -> str:
        when = dt.datetime(lo, 1, 1) + dt.timedelta(seconds=RNG.randint(0, (hi - lo) * 365 * 86_400))
        frac = f"{RNG.randint(0, 999_999):06d}"[:fsp]
        return when.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if fsp else "")

    return make


def _date() -> str:
    return (dt.date(1000, 1, 1) + dt.timedelta(days=RNG.randint(0, 3_287_000))).isoformat()


COLUMNS: list[tuple[str, Callable[[], Any]]] = [
    ("tinyint", _int(8, False)),
    ("tinyint unsigned", _int(8, True)),
    ("smallint", _int(16, False)),
    ("smallint unsigned", _int(16, True)),
    ("mediumint", _int(24, False)),
    ("mediumint unsigned", _int(24, True)),
    ("int", _int(32, False)),
    ("int unsigned", _int(32, True)),
    ("bigint", _int(64, False)),
    ("bigint unsigned", _int(64, True)),
    ("float", _float32),
    ("double", _float64),
    ("decimal(65,30)", _decimal(65, 30)),
    ("decimal(5,2)", _decimal(5, 2)),
    ("decimal(20,0)", _decimal(20, 0)),
    ("decimal(10,10)", _decimal(10, 10)),
    ("decimal(19,9)", _decimal(19, 9)),
    ("decimal(13,4)", _decimal(13, 4)),
    ("char(8)", _text(8)),
    ("varchar(255)", _text(255)),
    ("varchar(300)", _text(300)),
    ("varchar(40) character set latin1", lambda: "".join(RNG.choice("abcéüß ") for _ in range(RNG.randint(0, 40)))),
    ("text", _text(500)),
    ("longtext", _text(2000)),  # DataJoint's json is MariaDB's longtext
    ("enum('a','b c','ü中')", lambda: RNG.choice(["a", "b c", "ü中"])),
    ("date", _date),
    *((f"time({fsp})", _time(fsp)) for fsp in range(7)),
    *((f"datetime({fsp})", _datetime(fsp, 1000, 9999)) for fsp in range(7)),
    *((f"timestamp({fsp}) null", _datetime(fsp, 1971, 2037)) for fsp in (0, 3, 5, 6)),
    ("year", lambda: RNG.randint(1901, 2155)),
    ("tinyblob", _bytes(255)),
    ("blob", _bytes(3000)),
    ("mediumblob", _bytes(3000)),
    ("longblob", _bytes(20_000)),
    ("binary(16)", lambda: RNG.choice([uuid.uuid4().bytes, bytes(16), b"\x01" + bytes(15)])),
    ("varbinary(20)", _bytes(20)),
]


def random_row(i: int) -> list[Any]:
    return [i, *(None if RNG.random() < 0.15 else make() for _, make in COLUMNS)]


def gtid_pos(conn: Any) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT @@gtid_binlog_pos")
        return str(cur.fetchone()[0])


def identical(library: Any, ours: Any) -> bool:
    """As `test_types.identical` (type and bits); the library's one quirk excepted: an empty binary value is
    '' (Python decodes b'' to '' without looking the 'binary' codec up), where the compiled reader gives b''."""
    return (library == "" and ours == b"") or same_bits(ours, library)


def read_range(
    env: dict[str, str], start: str, end: str, db: str, compiled: bool
) -> Iterator[tuple[str, Row | None, Row | None]]:
    """(table, before, after) for every row change of `db` between two GTID positions."""
    last = {d: s for d, s in (p.split("-", 1) for p in end.split(",") if p)}
    stream = BinLogStreamReader(
        connection_settings=binlog_settings(env),
        server_id=9000 + uuid.uuid4().int % 100_000,
        is_mariadb=True,
        auto_position=start,
        blocking=True,
        freeze_schema=True,
        only_events=[MariadbGtidEvent, XidEvent, WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent],
    )
    readers: dict[int, RowReader | None] = {}
    gtid = ""
    try:
        for ev in stream:
            if isinstance(ev, MariadbGtidEvent):
                gtid = ev.gtid
            elif isinstance(ev, XidEvent):
                domain, rest = gtid.split("-", 1)
                if last.get(domain) == rest:
                    return
            elif ev.schema == db:
                images = None
                if compiled:
                    if ev.table_id not in readers:
                        readers[ev.table_id] = RowReader.compile(ev.columns)
                    reader = readers[ev.table_id]
                    if ev.table == "odd":
                        assert reader is None, "SET and BIT columns must fall back to the library"
                    else:
                        assert reader is not None, "every column of this table has a compiled decoder"
                        images = reader.rows(ev)
                        assert images is not None
                for before, after in images if images is not None else library_rows(ev):
                    yield ev.table, before, after
    finally:
        stream.close()


@pytest.fixture
def source_db(services_env: dict[str, str]) -> Iterator[str]:
    db = f"rowdec_{uuid.uuid4().hex[:10]}"
    yield db
    conn = admin(services_env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
    conn.close()


def test_compiled_row_reader_decodes_exactly_what_the_library_decodes(
    services_env: dict[str, str], source_db: str
) -> None:
    db = source_db
    conn = admin(services_env, "SOURCE", charset="utf8mb4", init_command="SET time_zone='+00:00'")
    columns = ", ".join(f"c{i} {sql}" for i, (sql, _) in enumerate(COLUMNS))
    names = ", ".join(f"c{i}" for i in range(len(COLUMNS)))
    marks = ", ".join(["%s"] * (len(COLUMNS) + 1))
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4")
        cur.execute(f"CREATE TABLE `{db}`.t (id int PRIMARY KEY, {columns})")
        cur.execute(f"CREATE TABLE `{db}`.odd (id int PRIMARY KEY, s set('x','y','z'), b bit(11), v varchar(5))")
        start = gtid_pos(conn)
        conn.begin()
        cur.executemany(f"INSERT INTO `{db}`.t (id, {names}) VALUES ({marks})", [random_row(i) for i in range(ROWS)])
        conn.commit()
        assignments = ", ".join(f"c{i} = %s" for i in range(len(COLUMNS)))
        for i in range(0, ROWS, 2):  # one event each: before and after images
            row = random_row(i)
            cur.execute(f"UPDATE `{db}`.t SET {assignments} WHERE id = %s", [*row[1:], i])
        cur.execute(f"DELETE FROM `{db}`.t WHERE id % 3 = 0")
        cur.execute(f"INSERT INTO `{db}`.odd VALUES (1, 'x,z', b'10110011101', 'ok'), (2, '', NULL, NULL)")
        cur.execute(f"UPDATE `{db}`.odd SET s = 'y' WHERE id = 2")
        end = gtid_pos(conn)
    conn.close()

    library = list(read_range(services_env, start, end, db, compiled=False))
    compiled = list(read_range(services_env, start, end, db, compiled=True))

    changes = sum(1 for table, _, _ in library if table == "t")
    assert changes == ROWS + ROWS // 2 + len(range(0, ROWS, 3)), "every row change of the range was read"
    assert len(compiled) == len(library)
    differences = []
    for (table, lb, la), (_, cb, ca) in zip(library, compiled, strict=True):
        for side, lib, ours in (("before", lb, cb), ("after", la, ca)):
            assert (lib is None) == (ours is None)
            if lib is None or ours is None:
                continue
            assert list(lib) == list(ours), "same columns in the same order"
            differences += [
                (table, side, name, lib[name], ours[name]) for name in lib if not identical(lib[name], ours[name])
            ]
    assert not differences, differences[:10]
    nulls = sum(1 for _, _, after in library if after for v in after.values() if v is None)
    assert nulls > 0, "NULLs were among the decoded values"


def test_where_the_library_differs_from_the_server_the_reader_gives_what_a_select_gives(
    services_env: dict[str, str], source_db: str
) -> None:
    """Snapshot reads (a SELECT) and the binlog must give the same values: a SET in definition order and ''
    when empty (the library: a Python set, None), YEAR 0000 (the library: 1900), latin1's five bytes that
    cp1252 leaves undefined (the library: UnicodeDecodeError, which stopped the capture)."""
    db = source_db
    conn = admin(services_env, "SOURCE", charset="utf8mb4")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4")
        cur.execute(
            f"CREATE TABLE `{db}`.w (id int PRIMARY KEY, s set('b','a','c') NOT NULL, y year NULL, "
            "l varchar(12) CHARACTER SET latin1 NULL)"
        )
        start = gtid_pos(conn)
        cur.execute(
            f"INSERT INTO `{db}`.w VALUES (1, 'a,b', 0, _latin1 X'818D8F909D41E9'), (2, '', 2024, 'plain'), "
            "(3, 'c,a,b', NULL, NULL)"
        )
        cur.execute(f"SELECT id, s, y, l FROM `{db}`.w ORDER BY id")
        selected = {r[0]: {"id": r[0], "s": r[1], "y": r[2], "l": r[3]} for r in cur.fetchall()}
        end = gtid_pos(conn)
    conn.close()

    decoded = {after["id"]: after for _, _, after in read_range(services_env, start, end, db, compiled=True) if after}
    assert decoded == selected
    assert selected[1] == {"id": 1, "s": "b,a", "y": 0, "l": "\x81\x8d\x8f\x90\x9dAé"}
    assert selected[2]["s"] == "" and selected[3]["s"] == "b,a,c"
