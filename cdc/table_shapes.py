"""The capture's cache of table shapes: which columns each captured table has, read once and kept.

Shapes come from the catalog (`foundation.catalog`); a DDL statement drops
cached entries, so the next change reads the table again. A row event also
describes its own shape (`shape_from_table_map`), which is the right one at
its position even while the capture replays binlog older than the table.
"""

from __future__ import annotations

from typing import Any

from foundation.catalog import Catalog
from schemas.tables import Column, TableShape


class TableShapes:
    """Shapes by (db, table), read through `catalog` when not cached."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._shapes: dict[tuple[str, str], TableShape] = {}

    # The binlog reader's thread forgets shapes (on DDL) while the coordinator's reads them: each method
    # reads the cache once and returns what it holds itself, never the cache again.

    def shape(self, db: str, table: str) -> TableShape:
        shape = self._shapes.get((db, table))
        if shape is None:
            shape = self._shapes[(db, table)] = self._catalog.shape(db, table)
        return shape

    def fresh(self, db: str, table: str) -> TableShape:
        """The shape as the server has it now (read again, and cached): for reads that must match the table."""
        shape = self._catalog.shape(db, table)
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

    def close(self) -> None:
        self._catalog.close()


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
