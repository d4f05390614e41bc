"""Database errors, as the consumers tell them apart: the connection's fault (retry) or the request's."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import pymysql

__all__ = ["TRANSIENT_ERRORS", "describe", "is_transient", "waiting_out"]

T = TypeVar("T")
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.5, 5.0  # between attempts while a server is unreachable

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


def waiting_out(
    attempt: Callable[[], T],
    stop: threading.Event,
    warn: Callable[[BaseException, float], None],
    after_failure: Callable[[], None] | None = None,
) -> T:
    """`attempt()`, run again while it fails on a transient database error (a restart, a failover): after each
    failure `after_failure()` (a rollback), `warn(error, pause)`, then a pause (0.5 s doubling to 5 s). Any
    other error, or any error once `stop` is set, is raised. The attempt must be safe to run again."""
    pause = FIRST_PAUSE_S
    while True:
        try:
            return attempt()
        except (pymysql.err.MySQLError, ConnectionError, TimeoutError) as exc:
            if not is_transient(exc) or stop.is_set():
                raise
            if after_failure is not None:
                after_failure()
            warn(exc, pause)
            stop.wait(pause)
            pause = min(pause * 2, LONGEST_PAUSE_S)
