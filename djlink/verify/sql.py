"""The SQL text of `djlink verify`: a row as one canonical byte string, key ranges, and the checksums over them.

Both servers are sent the same expressions, built from the source's catalog
(column names, order and types), so that equal rows hash equal on either side:

- every non-NULL value becomes `<byte length>:<bytes>`, so that no value can
  run into the next one (a blob may hold any byte) and NULL, written `N`,
  differs from every value, the empty string included (`0:`);
- text (char, varchar, text, enum, set, json) is compared as its characters,
  in utf8mb4 whatever the column's character set; binary and blob columns as
  their bytes;
- FLOAT is widened to DOUBLE before it is written (MariaDB writes a FLOAT
  with 6 significant digits, which would make different floats equal; a
  DOUBLE is written in its shortest form that reads back exactly);
- TIMESTAMP is written in the session's time zone, which `servers` sets to
  UTC on both sides; the other types (integers, DECIMAL, dates, times, BIT,
  UUID...) as MariaDB writes them.

The checksum of a set of rows is their count and the XOR of the first 64 bits
of each row's MD5 (pt-table-checksum's method: each server computes it, only
the two numbers travel). Rows are unique by their primary key, so no two
equal rows cancel out; a difference goes unseen with probability 2^-64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from djlink.verify.compare import KeyRange
from foundation.sql import quote
from schemas.tables import Column

TEXT = {"char", "varchar", "tinytext", "text", "mediumtext", "longtext", "enum", "set", "json"}

# The helper rows whose entities the source side counts: those to be at the destination (process NONE, not
# deprecated: Shared or Tainted) and those in flight (PULL or DELETE), which drill-down then leaves aside.
# The SQL form of `consumers.integrity.expected_at_destination(row) is not False`.
COUNTED = "(h.`process` <> 'NONE' OR h.`is_deprecated` = 'FALSE')"

# The `~external_<store>` columns that say which object a tracking row is (DataJoint 0.14); its `timestamp`
# says only when the row was written at that site.
TRACKING_COLUMNS = ("hash", "size", "attachment_name", "filepath", "contents_hash")

Statement = tuple[str, list[Any]]


def value(column: Column, alias: str = "t") -> str:
    """One column as canonical bytes (see the module docstring); NULL stays NULL."""
    ref = f"{alias}.{quote(column.name)}"
    if column.data_type in TEXT:
        ref = f"CONVERT({ref} USING utf8mb4)"
    elif column.data_type == "float":
        ref = f"CAST({ref} AS DOUBLE)"
    return f"CAST({ref} AS BINARY)"


def field(column: Column, alias: str = "t") -> str:
    """One column as a self-delimiting field: `<length>:<bytes>`, or `N` for NULL."""
    v = value(column, alias)
    return f"IFNULL(CONCAT(OCTET_LENGTH({v}), ':', {v}), 'N')"


def row(columns: Sequence[Column], alias: str = "t") -> str:
    """A whole row as one byte string, its columns in the order given."""
    return "CONCAT(" + ", ".join(field(c, alias) for c in columns) + ")"


def digest(expression: str) -> str:
    """The first 64 bits of the MD5 of `expression`, as an unsigned integer."""
    return f"CAST(CONV(LEFT(MD5({expression}), 16), 16, 10) AS UNSIGNED)"


def aggregate(expression: str) -> str:
    """The checksum of a set of rows: their count and the XOR of their digests (0 for no rows)."""
    return f"COUNT(*), IFNULL(BIT_XOR({digest(expression)}), 0)"


def columns(names: Sequence[str], alias: str) -> str:
    return ", ".join(f"{alias}.{quote(c)}" for c in names)


def in_range(names: Sequence[str], scope: KeyRange, alias: str) -> Statement:
    """The condition that a key (columns `names` of `alias`) lies in `scope`: after its lower bound, up to and
    including its upper one. A composite key is compared column by column, as an index is ordered, in a form
    the optimizer reads as a range of the index (a row comparison `(a, b) > (x, y)` it would not)."""
    parts: list[str] = []
    params: list[Any] = []
    cols = [f"{alias}.{quote(c)}" for c in names]
    for bound, lead, strict, last in ((scope.after, ">=", ">", ">"), (scope.upto, "<=", "<", "<=")):
        if bound is None:
            continue
        ors = []
        params.append(bound[0])  # the leading column's own bound, which the optimizer turns into a range
        for i, col in enumerate(cols):
            eqs = [f"{cols[j]} = %s" for j in range(i)]
            ors.append("(" + " AND ".join([*eqs, f"{col} {last if i == len(cols) - 1 else strict} %s"]) + ")")
            params.extend(bound[: i + 1])
        parts.append(f"{cols[0]} {lead} %s AND (" + " OR ".join(ors) + ")")
    return (" AND ".join(parts) or "TRUE"), params


def in_keys(names: Sequence[str], keys: Sequence[tuple[Any, ...]], alias: str) -> Statement:
    """The condition that a key (columns `names` of `alias`) is one of `keys`."""
    if not keys:
        return "FALSE", []
    one = "(" + ", ".join(["%s"] * len(names)) + ")"
    return f"({columns(names, alias)}) IN ({', '.join([one] * len(keys))})", [v for k in keys for v in k]


def helper_join(helper: str, names: Sequence[str]) -> str:
    """`JOIN <helper> h ON` the entity's key, restricted to the helper rows the source side counts."""
    on = " AND ".join(f"h.{quote(c)} = t.{quote(c)}" for c in names)
    return f"JOIN {helper} h ON {on} AND {COUNTED}"
