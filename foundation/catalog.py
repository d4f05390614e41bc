"""The DataJoint catalog of a server, read from INFORMATION_SCHEMA: table shapes, part tables, in-store columns.

The capture caches shapes over it (`cdc.table_shapes`); the source agent asks
it what a newly registered link consists of (its part tables, its primary
key, its in-store attributes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pymysql

from foundation.links import EXTERNAL_PREFIX
from schemas.tables import Column, TableShape


class UnknownTable(Exception):
    """A table that the connected user cannot see (dropped, never made, or no privilege)."""


class Catalog:
    """Reads the catalog over one connection of its own, opened (and reopened) on demand."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect  # () -> a PyMySQL connection (tuples, not dicts)
        self._conn: pymysql.connections.Connection[Any] | None = None

    def _cursor(self) -> Any:
        if self._conn is None or not self._conn.open:
            self._conn = self._connect()
        self._conn.ping(reconnect=True)
        return self._conn.cursor()

    def shape(self, db: str, table: str) -> TableShape:
        """The table's columns and primary key as the server has them now; UnknownTable when it cannot see it."""
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

    def close(self) -> None:
        if self._conn is not None and self._conn.open:
            self._conn.close()
