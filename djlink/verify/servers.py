"""The two sides of `djlink verify` over SQL: each server computes its checksums in one read-only snapshot.

Each side holds one connection in a transaction `WITH CONSISTENT SNAPSHOT,
READ ONLY` (REPEATABLE READ, time zone UTC) for the whole of a link, so that
every question drill-down asks of it sees the same rows, and nothing it sends
can write. The source's snapshot is taken first: the destination's, taken
after it, already holds whatever the applier had applied of the source's
state by then, so an applier that keeps up makes no difference appear.

The source side counts the entities the helper table says should be at the
destination or are in flight (`sql.COUNTED`, joined on the entity's key); the
destination side counts every entity it has. Only checksums, keys and 64-bit
digests come back; rows never do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from consumers.integrity import HelperRow
from djlink.verify import sql
from djlink.verify.compare import (
    NO_ROWS,
    Key,
    KeyRange,
    LinkShape,
    ObjectFinding,
    StoreSpec,
    Sums,
    TableSpec,
    common_columns,
)
from foundation.catalog import Catalog, UnknownTable
from foundation.config import Database
from foundation.links import LinkSpec, destination_name, external_table
from foundation.sql import quote, table_name
from foundation.stores import Check, ObjectError, StoreError, Stores, relative_path
from schemas.tables import Column

MAX_CHECKED_OBJECTS = 1_000_000  # object hashes remembered as checked in the destination store (one read each)


class Snapshot:
    """One server, read in one consistent, read-only snapshot."""

    def __init__(self, database: Database) -> None:
        self._conn = database.connect(utc=True, autocommit=False)
        with self._conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")

    def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn.cursor() as cur:
            cur.execute(statement, list(params))
            return list(cur.fetchall())

    def close(self) -> None:
        try:
            self._conn.rollback()
        finally:
            self._conn.close()


@dataclass(frozen=True)
class Placed:
    """A table of a link at one side: where it is and the columns compared (None: not there)."""

    name: str | None  # `db`.`table`, quoted; None when the table does not exist at that side
    columns: tuple[Column, ...]


@dataclass
class Layout:
    """A link's tables at both sides, from the catalogs: what `Verification` compares and where it is."""

    shape: LinkShape
    source: dict[str, Placed] = field(default_factory=dict)  # by TableSpec.name, and 'store:<source store>'
    destination: dict[str, Placed] = field(default_factory=dict)
    in_store: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # source store -> (table, column)
    schema: list[str] = field(default_factory=list)  # destination tables whose columns differ


def _columns(catalog: Catalog, db: str, table: str) -> tuple[Column, ...] | None:
    try:
        return catalog.shape(db, table).columns
    except UnknownTable:
        return None


def layout(link: LinkSpec, source: Catalog, destination: Catalog) -> Layout:
    """The link's tables (master, parts, the tracking tables of its stores) as the two catalogs have them.

    Columns are the source's, in its order, kept where the destination has them too; a destination table
    that lacks one or has more is named in `schema`. Raises UnknownTable when a source table is not there."""
    tables: list[TableSpec] = []
    out = Layout(LinkShape(link.link_id, link.primary_key, TableSpec("", (), ())))
    for db, table in link.data_tables():
        shape = source.shape(db, table)
        dest_columns = _columns(destination, link.destination_db, destination_name(table))
        names, problem = common_columns(
            table, [c.name for c in shape.columns], None if dest_columns is None else [c.name for c in dest_columns]
        )
        if problem:
            out.schema.append(problem)
        kept = tuple(c for c in shape.columns if c.name in names)
        tables.append(TableSpec(table, shape.primary_key, names, is_master=table == link.source_table))
        out.source[table] = Placed(table_name(db, table), kept)
        dest_name = table_name(link.destination_db, destination_name(table)) if dest_columns is not None else None
        out.destination[table] = Placed(dest_name, kept)
    stores = []
    for store in link.external_stores():
        spec = StoreSpec(store, link.destination_store(store))
        stores.append(spec)
        shape = source.shape(link.source_db, external_table(store))
        kept = tuple(c for c in shape.columns if c.name in sql.TRACKING_COLUMNS)
        out.source[f"store:{store}"] = Placed(table_name(link.source_db, external_table(store)), kept)
        there = _columns(destination, link.destination_db, external_table(spec.destination)) is not None
        out.destination[f"store:{store}"] = Placed(
            table_name(link.destination_db, external_table(spec.destination)) if there else None, kept
        )
        out.in_store[store] = [(t, c) for t, c, s in link.externals if s == store]
    master, *parts = tables
    out.shape = LinkShape(link.link_id, link.primary_key, master, tuple(parts), tuple(stores))
    return out


class SqlSide:
    """The questions of `compare.Side` as SQL over one snapshot; the source and the destination differ only in
    which rows they count (`_join`) and where their tables are."""

    def __init__(self, snapshot: Snapshot, link: LinkSpec, placed: dict[str, Placed], in_store: Any) -> None:
        self.snapshot = snapshot
        self.link = link
        self.placed = placed
        self.in_store: dict[str, list[tuple[str, str]]] = in_store
        self.pk = list(link.primary_key)

    # what the source and the destination do differently
    def _join(self) -> str:
        return ""

    def _entities_table(self) -> str | None:
        """The table whose rows are this side's entities, aliased for `boundary` (None: none here)."""
        return self.placed[self.link.source_table].name

    def _entities_alias(self) -> str:
        return "t"

    # compare.Side
    def sums(self, table: TableSpec, scope: KeyRange) -> Sums:
        found = self._from(table, scope, sql.aggregate(sql.row(self.placed[table.name].columns)))
        return Sums(int(found[0][0]), int(found[0][1])) if found else NO_ROWS

    def entity_sums(self, table: TableSpec, scope: KeyRange) -> dict[Key, Sums]:
        keys = sql.columns(self.pk, "t")
        select = f"{keys}, {sql.aggregate(sql.row(self.placed[table.name].columns))}"
        n = len(self.pk)
        return {
            tuple(r[:n]): Sums(int(r[n]), int(r[n + 1])) for r in self._from(table, scope, select, f" GROUP BY {keys}")
        }

    def row_digests(self, table: TableSpec, entities: Sequence[Key]) -> dict[Key, int]:
        select = f"{sql.columns(table.row_key, 't')}, {sql.digest(sql.row(self.placed[table.name].columns))}"
        n = len(table.row_key)
        return {tuple(r[:n]): int(r[n]) for r in self._keyed(table, select, self.pk, entities)}

    def column_digests(self, table: TableSpec, rows: Sequence[Key]) -> dict[Key, tuple[int, ...]]:
        by_name = {c.name: c for c in self.placed[table.name].columns}
        digests = ", ".join(sql.digest(sql.field(by_name[c])) for c in table.columns)
        n = len(table.row_key)
        select = f"{sql.columns(table.row_key, 't')}, {digests}"
        return {tuple(r[:n]): tuple(int(v) for v in r[n:]) for r in self._keyed(table, select, table.row_key, rows)}

    def boundary(self, scope: KeyRange, step: int) -> Key | None:
        table = self._entities_table()
        if table is None:
            return None
        alias = self._entities_alias()
        where, params = sql.in_range(self.pk, scope, alias)
        cols = sql.columns(self.pk, alias)
        found = self.snapshot.rows(
            f"SELECT {cols} FROM {table} {alias} WHERE {where}{self._counted()} ORDER BY {cols} LIMIT 1 OFFSET %s",
            [*params, step - 1],
        )
        return tuple(found[0]) if found else None

    def _counted(self) -> str:
        return ""

    def object_sums(self, store: StoreSpec, scope: KeyRange) -> Sums:
        found = self._objects(store, scope, sql.aggregate(sql.row(self.placed[f"store:{store.source}"].columns, "e")))
        return Sums(int(found[0][0]), int(found[0][1])) if found else NO_ROWS

    def object_digests(self, store: StoreSpec, scope: KeyRange) -> dict[bytes, int]:
        select = f"e.`hash`, {sql.digest(sql.row(self.placed[f'store:{store.source}'].columns, 'e'))}"
        return {bytes(r[0]): int(r[1]) for r in self._objects(store, scope, select)}

    # SQL
    def _from(self, table: TableSpec, scope: KeyRange, select: str, tail: str = "") -> list[tuple[Any, ...]]:
        name = self.placed[table.name].name
        if name is None:
            return []
        where, params = sql.in_range(self.pk, scope, "t")
        return self.snapshot.rows(f"SELECT {select} FROM {name} t {self._join()} WHERE {where}{tail}", params)

    def _keyed(self, table: TableSpec, select: str, names: Sequence[str], keys: Sequence[Key]) -> list[tuple[Any, ...]]:
        name = self.placed[table.name].name
        if name is None or not keys:
            return []
        where, params = sql.in_keys(names, keys, "t")
        return self.snapshot.rows(f"SELECT {select} FROM {name} t {self._join()} WHERE {where}", params)

    def _objects(self, store: StoreSpec, scope: KeyRange, select: str) -> list[tuple[Any, ...]]:
        """`select` over the tracking rows (alias e) of the objects the rows of the entities in `scope` reference."""
        tracking = self.placed[f"store:{store.source}"].name
        referencing = []
        params: list[Any] = []
        for table, column in self.in_store[store.source]:
            name = self.placed[table].name
            if name is None:
                continue
            where, p = sql.in_range(self.pk, scope, "t")
            referencing.append(f"SELECT t.{quote(column)} AS `hash` FROM {name} t {self._join()} WHERE {where}")
            params.extend(p)
        if tracking is None or not referencing:
            return []
        used = " UNION ".join(referencing)  # UNION, not UNION ALL: an object referenced twice counts once
        return self.snapshot.rows(f"SELECT {select} FROM ({used}) r JOIN {tracking} e ON e.`hash` = r.`hash`", params)


class SourceSql(SqlSide):
    """The source: its entities are the helper rows to be at the destination or in flight (`sql.COUNTED`)."""

    def __init__(self, snapshot: Snapshot, link: LinkSpec, layout: Layout) -> None:
        super().__init__(snapshot, link, layout.source, layout.in_store)
        self.helper = table_name(link.helper_db, link.helper_table)

    def _join(self) -> str:
        return sql.helper_join(self.helper, self.pk)

    def _entities_table(self) -> str | None:
        return self.helper

    def _entities_alias(self) -> str:
        return "h"

    def _counted(self) -> str:
        return f" AND {sql.COUNTED}"

    def counted(self) -> int:
        """How many entities the source counts (for the progress bar)."""
        return int(self.snapshot.rows(f"SELECT COUNT(*) FROM {self.helper} h WHERE {sql.COUNTED}")[0][0])

    def helper_rows(self, scope: KeyRange) -> dict[Key, HelperRow]:
        where, params = sql.in_range(self.pk, scope, "h")
        n = len(self.pk)
        found = self.snapshot.rows(
            f"SELECT {sql.columns(self.pk, 'h')}, h.`process`, h.`is_flagged`, h.`is_deprecated` "
            f"FROM {self.helper} h WHERE {where}",
            params,
        )
        return {tuple(r[:n]): HelperRow.from_sql(dict(zip(HelperRow.COLUMNS, r[n:], strict=True))) for r in found}

    def in_flight(self, limit: int) -> tuple[int, list[Key]]:
        cols = sql.columns(self.pk, "h")
        where = f"FROM {self.helper} h WHERE h.`process` <> 'NONE'"
        count = int(self.snapshot.rows(f"SELECT COUNT(*) {where}")[0][0])
        keys = [tuple(r) for r in self.snapshot.rows(f"SELECT {cols} {where} ORDER BY {cols} LIMIT %s", [limit])]
        return count, keys


class DestinationSql(SqlSide):
    """The destination: its entities are the rows of its master table; it also reads the objects' bytes."""

    def __init__(self, snapshot: Snapshot, link: LinkSpec, layout: Layout, stores: Stores | None) -> None:
        super().__init__(snapshot, link, layout.destination, layout.in_store)
        self.stores = stores  # None: object contents not checked
        self._checked: set[tuple[str, bytes]] = set()
        self._notes: dict[str, str] = {}

    def object_contents(self, store: StoreSpec, scope: KeyRange) -> list[ObjectFinding]:
        if self.stores is None or store.destination in self._notes:
            return []
        try:
            target = self.stores[store.destination]
        except StoreError as exc:
            self._notes[store.destination] = f"object contents in store '{store.destination}' not checked: {exc}"
            return []
        columns = self.placed[f"store:{store.source}"].columns
        names = [c.name for c in columns]
        found: list[ObjectFinding] = []
        for r in self._objects(store, scope, ", ".join(f"e.{quote(n)}" for n in names)):
            tracked = dict(zip(names, r, strict=True))
            seen = (store.destination, bytes(tracked["hash"]))
            if seen in self._checked:
                continue
            if len(self._checked) < MAX_CHECKED_OBJECTS:
                self._checked.add(seen)
            check = Check(tracked)
            try:
                for chunk in target.chunks(relative_path(tracked, self.link.destination_db, target.subfolding)):
                    check.update(chunk)
                problem = check.mismatch()
            except ObjectError as exc:
                problem = str(exc)
            except StoreError as exc:
                self._notes[store.destination] = f"object contents in store '{store.destination}' not checked: {exc}"
                return found
            if problem is not None:
                found.append(ObjectFinding(store.destination, seen[1], f"in the store: {problem}"))
        return found

    def notes(self) -> list[str]:
        return list(self._notes.values())
