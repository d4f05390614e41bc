"""`djlink verify`'s decisions without services: drill-down over rows kept in dictionaries, its SQL text, its report."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from consumers.integrity import HelperRow, Process, expected_at_destination
from djlink.verify import report, sql
from djlink.verify.compare import (
    Key,
    KeyRange,
    LinkShape,
    ObjectFinding,
    Options,
    Problem,
    StoreSpec,
    Sums,
    TableSpec,
    Verification,
    common_columns,
    diff_rows,
    pieces,
)
from schemas.tables import Column

MASTER = TableSpec("rec", ("id",), ("id", "subject", "trace"), is_master=True)
PART = TableSpec("rec__ch", ("id", "ch"), ("id", "ch", "gain"))
SHAPE = LinkShape("h.outbound", ("id",), MASTER, (PART,))
SHARED = HelperRow(Process.NONE)


def within(key: Key, scope: KeyRange) -> bool:
    return (scope.after is None or key > scope.after) and (scope.upto is None or key <= scope.upto)


def digest(values: Sequence[Any]) -> int:
    return int.from_bytes(hashlib.md5(repr(tuple(values)).encode()).digest()[:8], "big")


@dataclass
class Rows:
    """One side: rows by table and row key; `helpers` makes it the source (it counts only what they say)."""

    tables: dict[str, dict[Key, tuple[Any, ...]]]
    helpers: dict[Key, HelperRow] | None = None
    asked: list[str] = field(default_factory=list)

    def _counted(self, entity: Key) -> bool:
        return self.helpers is None or (
            entity in self.helpers and expected_at_destination(self.helpers[entity]) is not False
        )

    def _rows(self, table: TableSpec, scope: KeyRange) -> dict[Key, tuple[Any, ...]]:
        rows = self.tables.get(table.name, {}).items()
        return {k: v for k, v in rows if within(k[:1], scope) and self._counted(k[:1])}

    def sums(self, table: TableSpec, scope: KeyRange) -> Sums:
        self.asked.append("sums")
        found = self._rows(table, scope)
        x = 0
        for v in found.values():
            x ^= digest(v)
        return Sums(len(found), x)

    def entity_sums(self, table: TableSpec, scope: KeyRange) -> dict[Key, Sums]:
        self.asked.append("entity_sums")
        out: dict[Key, Sums] = {}
        for k, v in self._rows(table, scope).items():
            s = out.get(k[:1], Sums(0, 0))
            out[k[:1]] = Sums(s.count + 1, s.digest ^ digest(v))
        return out

    def row_digests(self, table: TableSpec, entities: Sequence[Key]) -> dict[Key, int]:
        return {k: digest(v) for k, v in self.tables.get(table.name, {}).items() if k[:1] in entities}

    def column_digests(self, table: TableSpec, rows: Sequence[Key]) -> dict[Key, tuple[int, ...]]:
        return {k: tuple(digest([c]) for c in v) for k, v in self.tables.get(table.name, {}).items() if k in rows}

    def boundary(self, scope: KeyRange, step: int) -> Key | None:
        if self.helpers is None:
            keys = sorted(k[:1] for k in self._rows(MASTER, scope))
        else:  # the source walks its helper rows
            keys = sorted(k for k in self.helpers if self._counted(k) and within(k, scope))
        return keys[step - 1] if len(keys) >= step else None

    def object_sums(self, store: StoreSpec, scope: KeyRange) -> Sums:
        return Sums(0, 0)

    def object_digests(self, store: StoreSpec, scope: KeyRange) -> dict[bytes, int]:
        return {}

    def helper_rows(self, scope: KeyRange) -> dict[Key, HelperRow]:
        return dict(self.helpers or {})

    def in_flight(self, limit: int) -> tuple[int, list[Key]]:
        flying = sorted(k for k, h in (self.helpers or {}).items() if expected_at_destination(h) is None)
        return len(flying), flying[:limit]

    def object_contents(self, store: StoreSpec, scope: KeyRange) -> list[ObjectFinding]:
        return []

    def notes(self) -> list[str]:
        return []


def copy(n: int) -> dict[str, dict[Key, tuple[Any, ...]]]:
    return {
        "rec": {(i,): (i, f"mouse {i}", bytes([i % 256]) * 10) for i in range(1, n + 1)},
        "rec__ch": {(i, c): (i, c, 0.5 * c) for i in range(1, n + 1) for c in range(3)},
    }


def run(source: Rows, destination: Rows, **options: int) -> Any:
    return Verification(SHAPE, source, destination, Options(**options)).run()  # type: ignore[arg-type]


def test_equal_sides_are_equal_in_one_checksum_per_table_and_chunk() -> None:
    n = 2500
    destination = Rows(copy(n))
    result = run(Rows(copy(n), {(i,): SHARED for i in range(1, n + 1)}), destination)
    assert (result.equal, result.compared, result.chunks) == (True, n, 3)  # up to 1000, up to 2000, and the open end
    assert set(destination.asked) == {"sums"}


def test_a_changed_byte_and_a_missing_part_row_are_found_and_nothing_else() -> None:
    n = 3000
    dest = copy(n)
    dest["rec"][(1234,)] = (1234, "mouse 1234", b"\x00" * 10)
    del dest["rec__ch"][(77, 2)]
    destination = Rows(dest)
    result = run(Rows(copy(n), {(i,): SHARED for i in range(1, n + 1)}), destination, per_entity=50, fanout=4)
    assert [(f.key, f.problem, [(d.table, d.missing, d.changed) for d in f.rows]) for f in result.entities] == [
        ((77,), Problem.DIFFERENT, [("rec__ch", ((77, 2),), ())]),
        ((1234,), Problem.DIFFERENT, [("rec", (), (((1234,), ("trace",)),))]),
    ]
    # Drill-down compared small ranges entity by entity, never a whole chunk.
    assert destination.asked.count("entity_sums") <= 4


def test_missing_extra_deprecated_and_in_flight_entities_are_told_apart() -> None:
    source = copy(6)
    dest = copy(6)
    del dest["rec"][(2,)]
    for c in range(3):
        del dest["rec__ch"][(2, c)]
    helpers = {
        (1,): SHARED,
        (2,): SHARED,  # missing
        (3,): HelperRow(Process.NONE, is_flagged=True),  # Tainted: still compared, equal
        (4,): HelperRow(Process.NONE, is_flagged=True, is_deprecated=True),  # deprecated, still there: extra
        (5,): HelperRow(Process.PULL),  # in flight, there or not
    }
    del dest["rec"][(5,)]
    # 6 has no helper row but is at the destination: extra
    result = run(Rows(source, helpers), Rows(dest))
    assert [(f.key, f.problem, f.detail) for f in result.entities] == [
        ((2,), Problem.MISSING, ""),
        ((4,), Problem.EXTRA, "deprecated at the source"),
        ((6,), Problem.EXTRA, "not shared (no helper row)"),
    ]
    assert (result.in_flight, result.in_flight_keys) == (1, [(5,)])


def test_a_destination_with_many_extra_entities_is_cut_at_its_own_keys() -> None:
    dest = copy(5000)
    result = run(Rows(copy(10), {(i,): SHARED for i in range(1, 11)}), Rows(dest), per_entity=100, fanout=10)
    assert [f.key for f in result.entities] == [(i,) for i in range(11, 5001)]
    assert {f.problem for f in result.entities} == {Problem.EXTRA}


def test_entities_are_expected_at_the_destination_as_their_helper_rows_say() -> None:
    assert expected_at_destination(None) is False
    assert expected_at_destination(HelperRow(Process.NONE)) is True
    assert expected_at_destination(HelperRow(Process.NONE, is_flagged=True)) is True  # Tainted
    assert expected_at_destination(HelperRow(Process.NONE, True, True)) is False  # Deprecated
    for process in (Process.PULL, Process.DELETE):
        for flagged in (False, True):
            assert expected_at_destination(HelperRow(process, flagged)) is None


def test_rows_and_ranges_helpers() -> None:
    assert diff_rows("t", {(1,): 1, (2,): 2, (3,): 3}, {(2,): 2, (3,): 4, (4,): 4}) == diff_rows(
        "t", {(1,): 1, (2,): 2, (3,): 3}, {(2,): 2, (3,): 4, (4,): 4}
    )
    d = diff_rows("t", {(1,): 1, (2,): 2, (3,): 3}, {(2,): 2, (3,): 4, (4,): 4})
    assert (d.missing, d.extra, d.changed) == (((1,),), ((4,),), (((3,), ()),))
    assert pieces(KeyRange(None, None), [(3,), (7,)]) == [
        KeyRange(None, (3,)),
        KeyRange((3,), (7,)),
        KeyRange((7,), None),
    ]
    assert common_columns("t", ["a", "b", "c"], ["c", "a", "b"]) == (("a", "b", "c"), None)
    assert common_columns("t", ["a", "b"], ["a", "x"]) == (
        ("a",),
        "t: the destination table lacks b and has x, which the source has not",
    )
    assert common_columns("t", ["a"], None) == (("a",), None)


def test_each_value_is_self_delimiting_null_differs_from_empty_and_text_is_compared_in_utf8mb4() -> None:
    text = Column("label", "varchar", "varchar(16)", True)
    blob = Column("trace", "longblob", "longblob", False)
    single = Column("gain", "float", "float", False)
    assert sql.field(text) == (
        "IFNULL(CONCAT(OCTET_LENGTH(CAST(CONVERT(t.`label` USING utf8mb4) AS BINARY)), ':', "
        "CAST(CONVERT(t.`label` USING utf8mb4) AS BINARY)), 'N')"
    )
    assert "CONVERT" not in sql.field(blob) and "CAST(t.`trace` AS BINARY)" in sql.field(blob)
    assert "CAST(t.`gain` AS DOUBLE)" in sql.field(single)


@pytest.mark.parametrize(
    ("scope", "where", "params"),
    [
        (KeyRange(), "TRUE", []),
        (KeyRange((1,), None), "t.`a` >= %s AND ((t.`a` > %s))", [1, 1]),
        (
            KeyRange((1, "x"), (5, "y")),
            "t.`a` >= %s AND ((t.`a` > %s) OR (t.`a` = %s AND t.`b` > %s)) AND "
            "t.`a` <= %s AND ((t.`a` < %s) OR (t.`a` = %s AND t.`b` <= %s))",
            [1, 1, 1, "x", 5, 5, 5, "y"],
        ),
    ],
)
def test_a_key_range_is_written_column_by_column(scope: KeyRange, where: str, params: list[Any]) -> None:
    assert sql.in_range(["a", "b"] if scope.after and len(scope.after) == 2 else ["a"], scope, "t") == (where, params)


def test_the_report_names_each_entity_by_its_key_and_exits_4_when_not_equal() -> None:
    dest = copy(3)
    del dest["rec__ch"][(1, 2)]
    result = run(Rows(copy(3), {(i,): SHARED for i in (1, 2, 3)}), Rows(dest))
    text = list(report.lines([result], "djlink"))
    assert text[0].startswith("h.outbound: NOT equal: 3 entities compared in 1 chunk; 0 missing, 0 extra, 1 different")
    assert '  different {"id":1}' in text
    assert "    rec__ch: row (1, 2) missing at the destination" in text
    assert report.exit_code([result]) == 4
    assert report.as_json([result])["links"][0]["entities"][0]["rows"][0]["missing"] == [[1, 2]]
    assert report.exit_code([run(Rows(copy(3), {(i,): SHARED for i in (1, 2, 3)}), Rows(copy(3)))]) == 0
