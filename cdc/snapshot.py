"""The snapshot source: reads given entities (master row and part rows) in one consistent read.

Used for pulls of rows that existed before the capture saw them. Each chunk
of keys is one REPEATABLE READ transaction started WITH CONSISTENT SNAPSHOT,
so a master and its parts are read as of one instant, and the binlog position
of that instant is recorded with them.

A chunk holds at most `chunk_size` entities and about CHUNK_BYTES of rows:
the first chunk of a read is small, each next one as many entities as the
last one's bytes per entity allow. A chunk is held whole, here and in the
applier, so entities of large blobs come a few at a time.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pymysql.cursors

from cdc.events import ChangeUnit, Position, RowChange
from cdc.table_shapes import TableShapes
from foundation import keys as keycodec
from foundation.dberrors import describe, waiting_out
from foundation.links import LinkSpec, external_table
from foundation.sql import in_clause, quote
from schemas.tables import select_expression

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK_BYTES = 8 * 1024 * 1024  # of row values in one snapshot chunk, about
FIRST_CHUNK = 20  # entities in a read's first chunk, before their size is known


class SnapshotSource:
    def __init__(
        self, connect: Any, shapes: TableShapes, server_id: int, chunk_size: int, stop: threading.Event | None = None
    ) -> None:
        self._connect = connect
        self._shapes = shapes
        self._server_id = server_id
        self._chunk_size = chunk_size
        self._stop = stop or threading.Event()
        self._table_chunk: dict[str, int] = {}  # per link, entities in the initial snapshot's next chunk

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        """`attempt()`, again after a wait while the source server is unreachable (a restart, a failover): each
        chunk is one consistent read of its own, so reading it again is reading it once."""

        def warn(exc: BaseException, pause: float) -> None:
            log.warning("the source server is unreachable (%s); reading %s again in %.1f s", describe(exc), what, pause)

        return waiting_out(attempt, self._stop, warn)

    def read(self, link: LinkSpec, key_texts: Sequence[str], request_id: str) -> Iterator[tuple[ChangeUnit, bool]]:
        """The entities' chunks, each read when asked for (so each is published before the next is read),
        with whether it is the last."""
        master = self._retrying("the table's shape", lambda: self._shapes.shape(link.source_db, link.source_table))
        pk = link.primary_key or master.primary_key
        held: list[Any] = []  # the connection, while it works

        def read_chunk(chunk: list[dict[str, Any]]) -> ChangeUnit:
            if not held:
                held.append(self._connect(cursorclass=pymysql.cursors.DictCursor))
            try:
                return self._read_chunk(held[0], link, pk, chunk, request_id)
            except BaseException:
                held.pop().close()
                raise

        try:
            start, count = 0, min(self._chunk_size, FIRST_CHUNK)
            while start < len(key_texts):
                chunk = [keycodec.decode(k) for k in key_texts[start : start + count]]
                unit = self._retrying(f"a snapshot chunk of {link.link_id}", functools.partial(read_chunk, chunk))
                start += len(chunk)
                yield unit, start >= len(key_texts)
                count = self._next_count(unit, len(chunk))
        finally:
            for conn in held:
                conn.close()

    def next_table_chunk(self, link: LinkSpec, after: str | None) -> tuple[ChangeUnit, str] | None:
        """The initial snapshot's next chunk: master keys after `after` in key order, with their parts.

        The unit names no link and no request: it is for subscribers, and the
        applier applies only what a pull asked for. None when the table is done.
        """
        return self._retrying(f"the initial snapshot of {link.link_id}", lambda: self._next_table_chunk(link, after))

    def _next_table_chunk(self, link: LinkSpec, after: str | None) -> tuple[ChangeUnit, str] | None:
        master = self._shapes.shape(link.source_db, link.source_table)
        pk = list(link.primary_key or master.primary_key)
        cols = ", ".join(quote(c) for c in pk)
        where, params = "", []
        if after is not None:
            last = keycodec.decode(after)
            where = f"WHERE ({cols}) > ({', '.join(['%s'] * len(pk))})"
            params = [last[c] for c in pk]
        count = self._table_chunk.get(link.link_id, min(self._chunk_size, FIRST_CHUNK))
        conn = self._connect(cursorclass=pymysql.cursors.DictCursor)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"SELECT {cols} FROM {quote(link.source_db)}.{quote(link.source_table)} {where} "
                    f"ORDER BY {cols} LIMIT {int(count)}",
                    params,
                )
                keys = list(cur.fetchall())
            conn.commit()
            if not keys:
                return None
            unit = self._read_chunk(conn, link, pk, keys, None)
        finally:
            conn.close()
        self._table_chunk[link.link_id] = self._next_count(unit, len(keys))
        unit.link_id = None
        return unit, keycodec.encode(keys[-1], pk)

    def _next_count(self, unit: ChangeUnit, entities: int) -> int:
        """Entities in the next chunk: as many as CHUNK_BYTES holds at this chunk's bytes per entity."""
        size = sum(_size(v) for change in unit.changes for v in (change.after or {}).values())
        fits = CHUNK_BYTES * entities // size if size else self._chunk_size
        return max(1, min(self._chunk_size, fits))

    def _read_chunk(
        self, conn: Any, link: LinkSpec, pk: Sequence[str], chunk: list[dict[str, Any]], request_id: str | None
    ) -> ChangeUnit:
        params = [k[c] for k in chunk for c in pk]
        where = in_clause(pk, len(chunk))
        with conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            cur.execute("SHOW STATUS LIKE 'binlog_snapshot_%'")
            status = {r["Variable_name"].lower(): r["Value"] for r in cur.fetchall()}  # MariaDB says Binlog_...
            # The GTID position at the snapshot's own coordinates (@@gtid_binlog_pos may already be later).
            cur.execute(
                "SELECT BINLOG_GTID_POS(%s, %s) AS g",
                (status.get("binlog_snapshot_file", ""), int(status.get("binlog_snapshot_position", 0) or 0)),
            )
            gtid = cur.fetchone()["g"] or None
            changes: list[RowChange] = []
            # The tracking rows of the objects the entities reference, then the helper rows, then the data,
            # all in this one read: the applier copies those objects and acts on the helper state of then.
            # Each table's columns are read afresh: an ALTER the binlog reader has not reached yet may have
            # changed them (and one after this snapshot began makes the SELECT fail with 1412, not lie).
            for store in link.external_stores():
                db, table = link.source_db, external_table(store)
                refs = [(t, c) for t, c, st in link.externals if st == store]
                union = " UNION ".join(f"SELECT {quote(c)} FROM {quote(db)}.{quote(t)} WHERE {where}" for t, c in refs)
                columns = ", ".join(select_expression(c) for c in self._shapes.fresh(db, table).columns)
                cur.execute(
                    f"SELECT {columns} FROM {quote(db)}.{quote(table)} WHERE hash IN ({union})", params * len(refs)
                )
                changes.extend(RowChange(db, table, "r", None, row) for row in cur.fetchall())
            for db, table in [(link.helper_db, link.helper_table), *link.data_tables()]:
                columns = ", ".join(select_expression(c) for c in self._shapes.fresh(db, table).columns)
                cur.execute(f"SELECT {columns} FROM {quote(db)}.{quote(table)} WHERE {where}", params)
                changes.extend(RowChange(db, table, "r", None, row) for row in cur.fetchall())
            conn.commit()
        position = Position(
            status.get("binlog_snapshot_file", ""),
            int(status.get("binlog_snapshot_position", 0) or 0),
            gtid,
            int(time.time() * 1000),
            self._server_id,
        )
        return ChangeUnit(f"snapshot:{uuid.uuid4()}", position, True, changes, request_id, link.link_id)


def _size(value: Any) -> int:
    """About how many bytes a row value takes (its length for bytes and text, 8 for the rest)."""
    return len(value) if isinstance(value, bytes | str) else 8
