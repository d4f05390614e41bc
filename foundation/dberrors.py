"""Database errors, as the consumers tell them apart: the connection's fault (retry) or the request's."""

from __future__ import annotations

import pymysql

__all__ = ["TRANSIENT_ERRORS", "describe", "is_transient"]

# Errors of the connection or of concurrency, not of the unit: reconnect and retry, never dead-letter.
TRANSIENT_ERRORS = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1205,  # lock wait timeout
        1213,  # deadlock
        1927,  # connection was killed
        2002,  # cannot connect (socket)
        2003,  # cannot connect (TCP)
        2006,  # server has gone away
        2013,  # lost connection during query
        2055,  # lost connection (system error)
        4031,  # disconnected by the server for inactivity
    }
)


def is_transient(exc: BaseException) -> bool:
    """Whether a database error is the connection's (retry) rather than the data's (dead-letter)."""
    if isinstance(exc, pymysql.err.InterfaceError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, pymysql.err.MySQLError):
        return bool(exc.args) and exc.args[0] in TRANSIENT_ERRORS
    return False


def describe(exc: BaseException) -> str:
    """A database error in one line: `(code) message`."""
    if isinstance(exc, pymysql.err.MySQLError) and len(exc.args) >= 2:
        return f"({exc.args[0]}) {exc.args[1]}"
    return f"{type(exc).__name__}: {exc}"
