"""The binlog source: reads the source server's binlog and cuts it into change units.

A thread, because python-mysql-replication blocks while it waits for the next
event; it hands each committed transaction that touched a captured table to the
coordinator through a queue. Tables are filtered here, on the client: the server
sends every schema's events.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import MariadbGtidEvent, QueryEvent, RotateEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from cdc.events import ChangeUnit, Position, RowChange
from djlink.config import Database

log = logging.getLogger(__name__)


class StreamFailed:
    """Put on the queue when the binlog thread dies, so the coordinator stops loudly."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class BinlogSource(threading.Thread):
    def __init__(
        self,
        db: Database,
        server_id: int,
        start_gtid: str,
        is_captured: Callable[[str, str], bool],
        out: queue.Queue[Any],
        on_ddl: Callable[[str, str], None],
    ) -> None:
        super().__init__(name="binlog-source", daemon=True)
        self._db = db
        self._server_id = server_id
        self._gtid = start_gtid
        self._is_captured = is_captured
        self._out = out
        self._on_ddl = on_ddl
        self._stream: BinLogStreamReader | None = None
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        conn = getattr(self._stream, "_stream_connection", None)
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            # close() would wait for the reading thread's lock; shutting the socket down wakes it instead.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        try:
            self._read()
        except BaseException as exc:
            if not self._stopping.is_set():
                log.exception("binlog source failed")
                self._out.put(StreamFailed(exc))

    def _read(self) -> None:
        self._stream = stream = BinLogStreamReader(
            connection_settings={
                "host": self._db.host,
                "port": self._db.port,
                "user": self._db.user,
                "passwd": self._db.password,
            },
            server_id=self._server_id,
            blocking=True,
            resume_stream=True,
            is_mariadb=True,
            auto_position=self._gtid,
            only_events=[
                MariadbGtidEvent,
                QueryEvent,
                XidEvent,
                RotateEvent,
                WriteRowsEvent,
                UpdateRowsEvent,
                DeleteRowsEvent,
            ],
        )
        unit: ChangeUnit | None = None
        for ev in stream:
            if self._stopping.is_set():
                return
            if isinstance(ev, MariadbGtidEvent):
                unit = ChangeUnit(
                    ev.gtid,
                    Position(stream.log_file, ev.packet.log_pos, ev.gtid, ev.timestamp * 1000, ev.server_id),
                    snapshot=False,
                )
            elif isinstance(ev, WriteRowsEvent | UpdateRowsEvent | DeleteRowsEvent):
                if unit is None or not self._is_captured(ev.schema, ev.table):
                    continue
                for i, row in enumerate(ev.rows):
                    if isinstance(ev, WriteRowsEvent):
                        unit.changes.append(RowChange(ev.schema, ev.table, "c", None, row["values"], i))
                    elif isinstance(ev, UpdateRowsEvent):
                        unit.changes.append(
                            RowChange(ev.schema, ev.table, "u", row["before_values"], row["after_values"], i)
                        )
                    else:
                        unit.changes.append(RowChange(ev.schema, ev.table, "d", row["values"], None, i))
            elif isinstance(ev, XidEvent) or (isinstance(ev, QueryEvent) and ev.query.upper() == "COMMIT"):
                self._commit(stream, unit)
                unit = None
            elif isinstance(ev, QueryEvent) and ev.query.upper() != "BEGIN":
                schema = ev.schema.decode() if isinstance(ev.schema, bytes) else ev.schema
                self._on_ddl(schema, ev.query)
                self._commit(stream, unit)
                unit = None

    def _commit(self, stream: BinLogStreamReader, unit: ChangeUnit | None) -> None:
        if unit is not None:
            # Reconnects must resume after this transaction, not replay from the start (NOTES.md).
            stream.auto_position = unit.id
            if unit.changes:
                self._out.put(unit)
