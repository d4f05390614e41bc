"""What the source server must provide before the capture may start.

Each failure is a `PreconditionError` whose message names the setting and the
statement that fixes it, in one line.
"""

from __future__ import annotations

import logging
from typing import Any

import pymysql

log = logging.getLogger(__name__)

REQUIRED = {
    "log_bin": "ON",
    "binlog_format": "ROW",
    "binlog_row_image": "FULL",
    "binlog_row_metadata": "FULL",
}
# A privilege the capture needs, and the grants that include it (MariaDB 10.5+ renamed REPLICATION CLIENT).
PRIVILEGES = {
    "REPLICATION SLAVE": ("REPLICATION SLAVE", "ALL PRIVILEGES"),
    "BINLOG MONITOR": ("BINLOG MONITOR", "REPLICATION CLIENT", "SUPER", "ALL PRIVILEGES"),
}


class PreconditionError(Exception):
    """The source server or the capture's configuration does not allow row-based capture."""


def check(conn: Any, server_id: int, report_host: str) -> None:
    """Raise PreconditionError for the first thing that is wrong."""
    _check_settings(conn)
    _check_privileges(conn)
    _check_server_id(conn, server_id, report_host)


def _check_settings(conn: Any) -> None:
    with conn.cursor() as cur:
        for name, want in REQUIRED.items():
            cur.execute("SHOW GLOBAL VARIABLES LIKE %s", (name,))
            row = cur.fetchone()
            have = row[1] if row else "(missing)"
            if str(have).upper() != want:
                if name == "log_bin":
                    fix = "start the server with --log-bin (it cannot be changed at run time)"
                else:
                    fix = f"SET GLOBAL {name}='{want}' and add {name}={want} to the server's configuration"
                raise PreconditionError(f"source server has {name}={have}, capture needs {want}: {fix}")


def _check_privileges(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        user, _, host = cur.fetchone()[0].rpartition("@")
        cur.execute("SHOW GRANTS")
        global_grants = " ".join(r[0].upper() for r in cur.fetchall() if " ON *.* " in r[0].upper())
    missing = [p for p, covered_by in PRIVILEGES.items() if not any(c in global_grants for c in covered_by)]
    if missing:
        raise PreconditionError(
            f"capture user '{user}'@'{host}' lacks {' and '.join(missing)}: "
            f"GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO '{user}'@'{host}'"
        )


def _check_server_id(conn: Any, server_id: int, report_host: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT @@server_id")
        source_id = int(cur.fetchone()[0])
        if server_id == source_id:
            raise PreconditionError(
                f"DJLINK_CAPTURE_SERVER_ID={server_id} is the source server's own server_id: "
                "choose another number, unique among the source's replicas"
            )
        try:
            cur.execute("SHOW SLAVE HOSTS")
            replicas = cur.fetchall()
        except pymysql.err.OperationalError:
            log.debug("cannot list the source's replicas (needs REPLICATION MASTER ADMIN); server id not checked")
            return
    for row in replicas:
        if int(row[0]) == server_id and row[1] != report_host:
            raise PreconditionError(
                f"DJLINK_CAPTURE_SERVER_ID={server_id} is already used by replica '{row[1]}' of the source: "
                "choose another number, unique among the source's replicas"
            )
