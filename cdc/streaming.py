"""The binlog source: reads the source server's binlog and cuts it into change units.

A thread, because python-mysql-replication blocks while it waits for the next
event; it hands each committed transaction that touched a captured table to the
coordinator through a queue, with the GTID position after it (the checkpoint).
Tables are filtered here, on the client: the server sends every schema's events.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pymysql
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import HeartbeatLogEvent, MariadbGtidEvent, QueryEvent, RotateEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

import cdc.decoders  # noqa: F401 - corrects the library's TIME(fsp) decoder
from cdc.events import ChangeUnit, Position, PositionMarker, RowChange
from cdc.offsets import Checkpoint
from cdc.placement import coordinate
from cdc.rows import RowReader, decode_rows
from cdc.table_shapes import shape_from_table_map
from foundation.config import Database
from foundation.dberrors import describe, is_transient
from foundation.gtid import format_position, parse_position
from schemas.tables import TableShape

log = logging.getLogger(__name__)
MARKER_INTERVAL_S = 1.0
# The server sends a heartbeat with its binlog coordinates after this long without events: how soon a
# snapshot chunk read while the source is idle is placed in the stream (see cdc.placement).
HEARTBEAT_S = 0.05
READ_TIMEOUT_S = 30
MIN_RECONNECT_PAUSE_S, MAX_RECONNECT_PAUSE_S = 0.5, 5.0  # between attempts to reach a source server gone away


FL_STANDALONE = 1  # MariaDB GTID event flag: the group is one statement without BEGIN/COMMIT (DDL)
FL_PREPARED_XA = 64  # MariaDB GTID event flag: XA START ... XA PREPARE (its XA COMMIT comes later, apart)


class UnsupportedTransaction(Exception):
    """The binlog holds a transaction the capture cannot publish faithfully; the message says which and why."""


class BinlogUnavailable(Exception):
    """The source server no longer has the binlog from the capture's position (purged): the message says how to
    recover (`djlink resnapshot`, docs/faults.md)."""


BINLOG_GONE = 1236  # ER_MASTER_FATAL_ERROR_READING_BINLOG: the position asked for is not in the server's binlog


class StreamFailed:
    """Put on the queue when the binlog thread dies, so the coordinator stops loudly."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class BinlogSource(threading.Thread):
    def __init__(
        self,
        db: Database,
        server_id: int,
        start_position: str,
        is_captured: Callable[[str, str], bool],
        out: queue.Queue[Any],
        on_ddl: Callable[[str, str], None],
        report_host: str,
    ) -> None:
        super().__init__(name="binlog-source", daemon=True)
        self._db = db
        self._server_id = server_id
        self._gtids = parse_position(start_position)
        self._is_captured = is_captured
        self._out = out
        self._on_ddl = on_ddl
        self._report_host = report_host
        self._stream: BinLogStreamReader | None = None
        self._stopping = threading.Event()
        self._last_marker = time.monotonic()
        # By binlog table id: the table's shape and its compiled row reader (None: the library decodes).
        self._tables: dict[int, tuple[TableShape, RowReader | None]] = {}
        # Binlog coordinates up to which every transaction has been handed over (put on the queue or
        # skipped); written by this thread only, after the put, so a reader who sees it sees the units.
        self.reached: tuple[int, int] = (-1, 0)

    def stop(self) -> None:
        self._stopping.set()
        # The library logs a warning and reconnects when its socket goes; we are leaving, say nothing.
        logging.getLogger("pymysqlreplication").setLevel(logging.ERROR)
        conn = getattr(self._stream, "_stream_connection", None)
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            # close() would wait for the reading thread's lock; shutting the socket down wakes it instead.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        try:
            self._follow()
        except (UnsupportedTransaction, BinlogUnavailable) as exc:  # the user's to fix: the message says how
            self._out.put(StreamFailed(exc))
        except BaseException as exc:  # reported to the coordinator
            if not self._stopping.is_set():
                log.exception("binlog source failed")
                self._out.put(StreamFailed(exc))

    def _follow(self) -> None:
        """Read the binlog until stopped; the source server going away (a restart, a failover) is waited for.

        The library reconnects by itself after a lost socket, but not when the server is not there to take
        the new connection, and it ends the stream when a server shutting down says so. Either way the
        stream is opened again after the last transaction handed over, once the server answers: a
        transaction cut off by the restart is read again whole (docs/faults.md).
        """
        pause = MIN_RECONNECT_PAUSE_S
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self._read()
                if self._stopping.is_set():
                    return
                why = "the source server ended the binlog stream (shutting down?)"
            except pymysql.err.MySQLError as exc:
                if exc.args and exc.args[0] == BINLOG_GONE:
                    raise BinlogUnavailable(
                        f"the source server's binlog no longer holds the capture's position "
                        f"{format_position(self._gtids)!r} (purged before the capture read it: {describe(exc)}); "
                        "the changes made since are lost to the capture. Recover: stop every capture of this "
                        "prefix, run `djlink resnapshot` at the source site, start the capture again, then run "
                        "`djlink verify` (docs/faults.md)"
                    ) from None
                if not is_transient(exc) or self._stopping.is_set():
                    raise
                why = f"the source server is unreachable: {describe(exc)}"
            self._close_stream()
            if time.monotonic() - started > MAX_RECONNECT_PAUSE_S:  # it had been reading: a new outage
                pause = MIN_RECONNECT_PAUSE_S
            log.warning("%s; reading the binlog again after %s in %.1f s", why, format_position(self._gtids), pause)
            self._stopping.wait(pause)
            pause = min(pause * 2, MAX_RECONNECT_PAUSE_S)

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def _read(self) -> None:
        self._tables.clear()  # table ids are the server's: a new connection may be to a restarted one
        self._stream = stream = BinLogStreamReader(
            # The server sends a heartbeat every HEARTBEAT_S when idle: silence this long is a dead
            # connection (the library reconnects), not a quiet source. Without it, a half-open
            # connection stalls the capture until TCP keepalive gives up, hours later.
            connection_settings=self._db.binlog_settings(read_timeout=READ_TIMEOUT_S),
            server_id=self._server_id,
            blocking=True,
            resume_stream=True,
            slave_heartbeat=HEARTBEAT_S,
            is_mariadb=True,
            auto_position=format_position(self._gtids),
            report_slave=self._report_host,
            # Parse each table map once (it dominated decoding); DDL clears them, see below.
            freeze_schema=True,
            only_events=[
                MariadbGtidEvent,
                HeartbeatLogEvent,
                QueryEvent,
                XidEvent,
                RotateEvent,
                WriteRowsEvent,
                UpdateRowsEvent,
                DeleteRowsEvent,
            ],
        )
        unit: ChangeUnit | None = None
        domain = 0
        standalone = True  # the current event group has no BEGIN/COMMIT (DDL); set by each GTID event
        prepared_xa = False  # the current event group is the first half of an XA transaction
        for ev in stream:
            if self._stopping.is_set():
                return
            if isinstance(ev, RotateEvent):
                # A new binlog file (also after a server restart, which numbers its tables anew): table ids
                # may now name other tables, and a long-lived reader would collect every id MariaDB ever gave
                # (it gives a new one whenever a table is reopened, e.g. after FLUSH TABLES).
                stream.table_map.clear()
                self._tables.clear()
                # Also what the server sends first after the library reconnects: a transaction cut off by the
                # lost connection is sent again whole, from the last position handed over.
                unit = None
            elif isinstance(ev, HeartbeatLogEvent):
                # Sent only when the server has nothing more to send: everything up to here is handed over.
                if unit is None:
                    self.reached = coordinate(ev.ident.rstrip("\x00"), ev.packet.log_pos)
            elif isinstance(ev, MariadbGtidEvent):
                if unit is not None and unit.changes:
                    if prepared_xa:  # its group ends with an XA PREPARE event, which the library cannot read
                        raise UnsupportedTransaction(
                            f"source transaction {unit.id} is an XA transaction that changed captured tables: "
                            "djlink cannot capture XA transactions (XA PREPARE, then XA COMMIT later); change "
                            "linked tables in ordinary transactions (or XA ... ONE PHASE), then restart the "
                            f"capture with DJLINK_CAPTURE_START_GTID after {unit.id} once its rows are dealt with"
                        )
                    # Not seen before: stop, and be restarted from the last checkpoint rather than lose it.
                    raise RuntimeError(f"binlog transaction {unit.id} ended without COMMIT or XID")
                standalone = bool(ev.flags & FL_STANDALONE)
                prepared_xa = bool(ev.flags & FL_PREPARED_XA)
                domain = ev.domain_id
                unit = ChangeUnit(
                    ev.gtid,
                    Position(stream.log_file, ev.packet.log_pos, ev.gtid, ev.timestamp * 1000, ev.server_id),
                    snapshot=False,
                )
            elif isinstance(ev, WriteRowsEvent | UpdateRowsEvent | DeleteRowsEvent):
                if unit is None or not self._is_captured(ev.schema, ev.table):
                    continue
                table_map = self._tables.get(ev.table_id)
                if table_map is None:
                    shape = shape_from_table_map(ev.schema, ev.table, ev.columns, ev.primary_key)
                    table_map = self._tables[ev.table_id] = (shape, RowReader.compile(ev.columns))
                shape, reader = table_map
                db, table = ev.schema, ev.table
                op = "u" if isinstance(ev, UpdateRowsEvent) else "d" if isinstance(ev, DeleteRowsEvent) else "c"
                changes = unit.changes
                for i, (before, after) in enumerate(decode_rows(ev, reader)):
                    changes.append(RowChange(db, table, op, before, after, i, shape))
            elif isinstance(ev, XidEvent) or (isinstance(ev, QueryEvent) and ev.query.upper() == "COMMIT"):
                self._commit(stream, unit, domain, ev.packet.log_pos)
                unit = None
            elif isinstance(ev, QueryEvent) and not standalone:
                # Inside a transaction: BEGIN, SAVEPOINT, RELEASE SAVEPOINT, ROLLBACK TO ... are statements of
                # the transaction, not DDL (DDL commits implicitly and comes as a standalone group). A
                # ROLLBACK ends it: what is logged before it changed non-transactional tables and stays.
                if ev.query.upper() == "ROLLBACK":
                    self._commit(stream, unit, domain, ev.packet.log_pos)
                    unit = None
            elif isinstance(ev, QueryEvent):
                schema = ev.schema.decode() if isinstance(ev.schema, bytes) else ev.schema
                # A DDL statement: table maps parsed before it no longer describe the tables.
                stream.table_map.clear()
                self._tables.clear()
                self._on_ddl(schema, ev.query)
                self._commit(stream, unit, domain, ev.packet.log_pos)
                unit = None

    def _commit(self, stream: BinLogStreamReader, unit: ChangeUnit | None, domain: int, end_pos: int) -> None:
        """A source transaction ended: hand it over with the position after it."""
        if unit is None:
            self.reached = coordinate(stream.log_file, end_pos)
            return
        self._gtids[domain] = unit.id
        position = format_position(self._gtids)
        # Reconnects must resume after this transaction, not replay from the start (docs/binlog.md).
        stream.auto_position = position
        checkpoint = Checkpoint(position, unit.position.file, end_pos, unit.position.ts_ms)
        if unit.changes:
            unit.checkpoint = checkpoint
            self._out.put(unit)
            self._last_marker = time.monotonic()
        elif time.monotonic() - self._last_marker > MARKER_INTERVAL_S:
            self._out.put(PositionMarker(checkpoint))
            self._last_marker = time.monotonic()
        self.reached = coordinate(stream.log_file, end_pos)
