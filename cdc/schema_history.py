"""Table shapes: the columns and primary key of each captured table.

Read from INFORMATION_SCHEMA and cached; a DDL statement on a table drops its
entry, so the next change re-reads it.
"""

from __future__ import annotations

from typing import Any

import pymysql

from djlink.links import EXTERNAL_PREFIX
from schemas.tables import Column, TableShape


class UnknownTable(Exception):
    """A captured table that the capture user cannot see (dropped, or no privilege)."""


class SchemaHistory:
    def __init__(self, connect: Any) -> None:
        self._connect = connect  # () -> pymysql connection
        self._conn: pymysql.connections.Connection[Any] | None = None
        self._shapes: dict[tuple[str, str], TableShape] = {}

    def _cursor(self) -> Any:
        if self._conn is None or not self._conn.open:
            self._conn = self._connect()
        self._conn.ping(reconnect=True)
        return self._conn.cursor()

    # The binlog reader's thread forgets shapes (on DDL) while the coordinator's reads them: each method
    # reads the cache once and returns what it holds itself, never the cache again.

    def shape(self, db: str, table: str) -> TableShape:
        shape = self._shapes.get((db, table))
        if shape is None:
            shape = self._shapes[(db, table)] = self._read(db, table)
        return shape

    def fresh(self, db: str, table: str) -> TableShape:
        """The shape as the server has it now (read again, and cached): for reads that must match the table."""
        shape = self._read(db, table)
        cached = self._shapes.get((db, table))
        if cached is not None and cached == shape:
            return cached  # the same object as before: what was compiled for it stays valid
        self._shapes[(db, table)] = shape
        return shape

    def forget(self, db: str | None = None, table: str | None = None) -> None:
        """Drop cached shapes: of one table, of one schema, or (db None) all of them."""
        for key in list(self._shapes):
            if db is None or (key[0] == db and (table is None or key[1] == table)):
                self._shapes.pop(key, None)

    def part_tables(self, db: str, master: str) -> list[str]:
        """DataJoint part tables of a master: `<master>__<part>` in the same schema."""
        with self._cursor() as cur:
            cur.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema=%s AND table_name LIKE %s "
                "ORDER BY table_name",
                (db, master.replace("_", "\\_") + "\\_\\_%"),
            )
            return [r[0] for r in cur.fetchall()]

    def external_columns(self, db: str, tables: list[str]) -> list[tuple[str, str, str]]:
        """(table, column, store) of the in-store attributes of `tables`: their foreign keys to `~external_<store>`."""
        if not tables:
            return []
        with self._cursor() as cur:
            cur.execute(
                "SELECT table_name, column_name, referenced_table_name FROM information_schema.key_column_usage "
                f"WHERE table_schema=%s AND table_name IN ({', '.join(['%s'] * len(tables))}) "
                "AND referenced_table_schema=%s AND referenced_table_name LIKE %s ORDER BY table_name, column_name",
                (db, *tables, db, EXTERNAL_PREFIX.replace("_", "\\_") + "%"),
            )
            return [(r[0], r[1], r[2][len(EXTERNAL_PREFIX) :]) for r in cur.fetchall()]

    def _read(self, db: str, table: str) -> TableShape:
        with self._cursor() as cur:
            cur.execute(
                "SELECT column_name, data_type, column_type, is_nullable, numeric_precision, numeric_scale, column_key "
                "FROM information_schema.columns WHERE table_schema=%s AND table_name=%s ORDER BY ordinal_position",
                (db, table),
            )
            rows = cur.fetchall()
        if not rows:
            raise UnknownTable(f"table `{db}`.`{table}` does not exist or the capture user cannot see it")
        columns = tuple(Column(r[0], r[1].lower(), r[2].lower(), r[3] == "YES", r[4], r[5]) for r in rows)
        pk = tuple(r[0] for r in rows if r[6] == "PRI")
        return TableShape(db, table, columns, pk)

    def close(self) -> None:
        if self._conn is not None and self._conn.open:
            self._conn.close()


# python-mysql-replication's FIELD_TYPE codes -> INFORMATION_SCHEMA data types.
_FIELD_TYPES = {
    1: "tinyint",
    2: "smallint",
    3: "int",
    4: "float",
    5: "double",
    7: "timestamp",
    8: "bigint",
    9: "mediumint",
    10: "date",
    11: "time",
    12: "datetime",
    13: "year",
    14: "date",
    16: "bit",
    17: "timestamp",
    18: "datetime",
    19: "time",
    245: "json",
    246: "decimal",
    247: "enum",
    248: "set",
    255: "geometry",
}


def _data_type(col: Any) -> str:
    binary = getattr(col, "character_set_name", None) == "binary"
    if col.type in (15, 253):  # VARCHAR, VAR_STRING
        return "varbinary" if binary else "varchar"
    if col.type == 254:  # STRING
        return "binary" if binary else "char"
    if col.type in (249, 250, 251, 252):  # the BLOB family
        return "longblob" if binary else "longtext"
    return _FIELD_TYPES.get(col.type, "longblob")


def shape_from_table_map(db: str, table: str, columns: Any, primary_key: Any) -> TableShape:
    """The shape a binlog row event itself describes (binlog_row_metadata=FULL names its columns).

    It is right at the event's position even when the table has changed since,
    which INFORMATION_SCHEMA is not while the capture replays older binlog.
    Nullability is not part of the column metadata the library keeps, so every
    column outside the primary key is taken as nullable (a safe superset).
    """
    pk = (primary_key,) if isinstance(primary_key, str) else tuple(primary_key or ())
    result = []
    for col in columns:
        data_type = _data_type(col)
        length = getattr(col, "max_length", None)
        column_type = f"{data_type}({length})" if data_type == "binary" and length else data_type
        if getattr(col, "unsigned", False):
            column_type += " unsigned"
        result.append(
            Column(
                col.name,
                data_type,
                column_type,
                col.name not in pk,
                getattr(col, "precision", None),
                getattr(col, "decimals", None),
            )
        )
    return TableShape(db, table, tuple(result), pk)
