"""SQL text shared by every component that talks to MariaDB: identifiers, key lists, chunks of keys.

Statements that name many keys (`WHERE (a, b) IN (...)`) are cut into chunks
of KEYS_PER_STATEMENT so that no statement grows past the server's packet and
placeholder limits, however many entities one request names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

KEYS_PER_STATEMENT = 1000  # keys named in one `IN (...)`


def quote(name: str) -> str:
    """A MariaDB identifier, quoted (a backtick inside it doubled)."""
    return "`" + name.replace("`", "``") + "`"


def table_name(db: str, table: str) -> str:
    """`db`.`table`, quoted."""
    return f"{quote(db)}.{quote(table)}"


def in_clause(columns: Sequence[str], n: int) -> str:
    """`(a, b) IN ((%s, %s), ...)` for n keys."""
    cols = ", ".join(quote(c) for c in columns)
    one = "(" + ", ".join(["%s"] * len(columns)) + ")"
    return f"({cols}) IN ({', '.join([one] * n)})"


def chunks(items: Sequence[T], size: int = KEYS_PER_STATEMENT) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
