"""What the source server must provide before the capture may start."""

from __future__ import annotations

from typing import Any

REQUIRED = {
    "log_bin": "ON",
    "binlog_format": "ROW",
    "binlog_row_image": "FULL",
    "binlog_row_metadata": "FULL",
}


class PreconditionError(Exception):
    """The source server is not configured for row-based capture."""


def check(conn: Any) -> None:
    """Raise PreconditionError naming the first wrong setting and how to fix it."""
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
