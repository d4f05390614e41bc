"""The applier's SQL at the destination: a plan's writes, and which entities are there.

A write that the destination refuses (a missing table or column, a value it
rejects) raises `Unappliable`; the connection's own faults (lost connection,
deadlock, lock wait timeout) propagate as they are, for the caller to retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pymysql

from consumers.applier.planning import Plan, Write, WriteKind, merged_writes
from foundation import grants
from foundation import keys as keycodec
from foundation.dberrors import describe, is_transient
from foundation.links import LinkSpec, destination_name
from foundation.sql import chunks, in_clause, quote, table_name

ER_NO_SUCH_TABLE = 1146


class Unappliable(Exception):
    """The destination refused a unit's rows."""


def write(cur: Any, plans: Sequence[Plan]) -> None:
    """The plans' rows, in order; Unappliable when the destination refuses them (not for the connection's faults)."""
    try:
        for w in merged_writes(plans):
            _WRITERS[w.kind](cur, w)
    except pymysql.err.MySQLError as exc:
        if is_transient(exc) or grants.from_error(exc, "applier"):  # not the unit's fault: never dead-lettered
            raise
        raise Unappliable(f"destination refused the unit: {describe(exc)}") from exc


def refusal(cur: Any, plans: Sequence[Plan]) -> str | None:
    """Why the destination refuses the plans' writes, or None when it takes them (the caller rolls them back)."""
    try:
        write(cur, plans)
    except Unappliable as exc:
        return describe(exc.__cause__) if exc.__cause__ is not None else str(exc)
    return None


def present(cur: Any, link: LinkSpec, key_texts: Sequence[str]) -> set[str]:
    """Which of these entities have their master row at the destination now (none when its table is not made)."""
    pk = list(link.primary_key)
    table = table_name(link.destination_db, destination_name(link.source_table))
    found: set[str] = set()
    for chunk in chunks(key_texts):
        keys = [keycodec.decode(k) for k in chunk]
        try:
            cur.execute(
                f"SELECT {', '.join(quote(c) for c in pk)} FROM {table} WHERE {in_clause(pk, len(keys))}",
                [k[c] for k in keys for c in pk],
            )
        except pymysql.err.ProgrammingError as exc:
            if exc.args[0] == ER_NO_SUCH_TABLE:
                return found
            raise
        found.update(keycodec.encode(dict(zip(pk, row, strict=True)), pk) for row in cur.fetchall())
    return found


def _upsert(cur: Any, w: Write) -> None:
    cols = list(w.rows[0])
    names = ", ".join(quote(c) for c in cols)
    update = ", ".join(f"{quote(c)}=VALUES({quote(c)})" for c in cols)
    sql = (
        f"INSERT INTO {table_name(*w.target)} ({names}) VALUES ({', '.join(['%s'] * len(cols))}) "
        f"ON DUPLICATE KEY UPDATE {update}"
    )
    cur.executemany(sql, [[r[c] for c in cols] for r in w.rows])


def _delete(cur: Any, w: Write) -> None:
    pk = list(w.rows[0])
    for chunk in chunks(w.rows):
        cur.execute(
            f"DELETE FROM {table_name(*w.target)} WHERE {in_clause(pk, len(chunk))}",
            [r[c] for r in chunk for c in pk],
        )


def _rekey(cur: Any, w: Write) -> None:
    for change in w.rows:
        key, row = change["key"], change["row"]
        cur.execute(
            f"UPDATE {table_name(*w.target)} SET {', '.join(f'{quote(c)}=%s' for c in row)} "
            f"WHERE {' AND '.join(f'{quote(c)}=%s' for c in key)}",
            [*row.values(), *key.values()],
        )


_WRITERS = {WriteKind.UPSERT: _upsert, WriteKind.DELETE: _delete, WriteKind.REKEY: _rekey}
