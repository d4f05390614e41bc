"""The destination server, as the applier uses it: transactions retried on the connection's faults, and a fence.

A lost connection, a deadlock or a lock wait timeout is not the unit's fault:
the transaction is run again on a fresh connection. A COMMIT whose answer is
lost may or may not have happened; the retry finds its units claimed
(`StateStore.finished_among`) and does not apply them twice. Any other error
rolls back and propagates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from foundation import grants
from foundation.config import ConfigError, Database
from foundation.dberrors import describe, is_transient
from foundation.links import LinkSpec

log = logging.getLogger(__name__)
T = TypeVar("T")


class Destination:
    """One connection for the applier's transactions, and one that holds the applier's lock."""

    def __init__(self, database: Database, stop: threading.Event) -> None:
        self._database = database
        self._stop = stop
        self._db: Any = None
        self._lock: Any = None
        self._account: str | None = None
        self._suspect = False  # the last transaction failed: check the connection (and reconnect) first

    def connect(self) -> None:
        self._db = self._database.connect(utc=True, autocommit=False)
        self._account = grants.account(self._db)

    def transact(self, work: Callable[[Any], T], commit: bool = True) -> T:
        """Run `work(cursor)` as one transaction (rolled back instead when not `commit`: a trial)."""
        delay = 0.1
        while True:
            try:
                # Only after a failure: a round trip before every transaction cost the applier a tenth of its
                # time under a steady load. A connection lost while idle fails the first statement instead,
                # which is retried like any other transient error, after this ping reconnects.
                if self._suspect:
                    self._db.ping(reconnect=True)
                    self._suspect = False
                with self._db.cursor() as cur:
                    result = work(cur)
                if commit:
                    self._db.commit()
                else:  # a trial: nothing of it stays
                    self._db.rollback()
                return result
            except BaseException as exc:
                self._suspect = True
                self._rollback()
                missing = grants.from_error(exc, "applier", self._account)
                if missing is not None:  # the deployment's fault, not the unit's: stop, naming the grant
                    raise missing from None
                if not is_transient(exc) or self._stop.is_set():
                    raise
                log.warning("destination database: %s; retrying in %.1f s", describe(exc), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def check_grants(self, links: Iterable[LinkSpec], state_tables: Sequence[tuple[str, str]]) -> None:
        """MissingGrant when the applier's user lacks a privilege on these links' tables or its state tables."""
        conn = self._database.connect(utc=True)
        try:
            grants.check(conn, grants.RoleName.applier, links, state_tables)
        finally:
            conn.close()

    def _rollback(self) -> None:
        try:
            self._db.rollback()
        except Exception:  # the connection is gone: nothing to roll back, ping reconnects
            pass

    def fence(self, name: str, deployment: str) -> None:
        """Hold a lock in the destination that a second applier of this deployment cannot take."""
        self._lock = self._database.connect(utc=True, autocommit=False)
        with self._lock.cursor() as cur:
            cur.execute("SELECT GET_LOCK(%s, 0)", (name[:64],))
            (got,) = cur.fetchone()
        if got != 1:
            raise ConfigError(
                f"another applier of deployment '{deployment}' is running against this destination "
                "(it holds the lock); run one applier per topic prefix"
            )

    def close(self) -> None:
        for conn in (self._db, self._lock):
            if conn is not None:
                conn.close()
