"""Registering a link at the source site: what is refused, what is made, and who is told, in that order.

A link is checked first without touching anything (`check`: the allow-list,
a helper table already keeping another link's state, identifier lengths),
then read from the catalog (its part tables, primary key, in-store
attributes). Its topics come next, so that a link Kafka refuses leaves no
helper table behind; then the helper table; then the link is published, the
capture told, and a helper table that existed before the link adopted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import pymysql
from confluent_kafka import KafkaError, Message, TopicPartition

from consumers.agent.auto_pull import AutoPull
from consumers.agent.errors import Refused
from consumers.agent.helper_table import HelperTable
from consumers.agent.outgoing import Outgoing
from foundation.catalog import Catalog, UnknownTable
from foundation.config import Settings
from foundation.kafka import consumer, where
from foundation.links import LinkRegistry, LinkSpec
from foundation.sql import chunks
from foundation.topics import Admin, TopicRefused, Topics

log = logging.getLogger(__name__)
MAX_IDENTIFIER = 64  # characters of a MariaDB schema or table name
ADOPT_CHUNK_KEYS = 10_000  # keys per snapshot signal when continuing from an existing helper table
CAPTURE_WAIT_S = 5.0  # how long a REGISTER reply waits for the capture to read the new link's signal


def check(settings: Settings, requested: LinkSpec, existing: LinkSpec | None) -> None:
    """Refuse a link the source site does not allow, before anything is made.

    `existing` is the link registered under the same helper table, if any:
    one helper table keeps the state of one source table for one destination.
    """
    if not settings.schema_allowed(requested.source_db):
        raise Refused(
            f"source schema '{requested.source_db}' is not shared by this source site; "
            f"its operator can allow it in DJLINK_ALLOWED_SCHEMAS"
        )
    ends = (requested.source_db, requested.source_table, requested.destination_db)
    if existing is not None and (existing.source_db, existing.source_table, existing.destination_db) != ends:
        raise Refused(
            f"helper table {requested.link_id} already keeps the state of {existing.source_db}."
            f"{existing.source_table} for destination schema {existing.destination_db}; name another helper "
            f"table for {requested.source_db}.{requested.source_table} -> {requested.destination_db}"
        )
    for what, name in (("helper schema", requested.helper_db), ("helper table", requested.helper_table)):
        if len(name) > MAX_IDENTIFIER:
            raise Refused(f"the {what} name '{name}' has {len(name)} characters; MariaDB allows {MAX_IDENTIFIER}")


@dataclass(frozen=True)
class Registered:
    """A link as registered; `answered_later`: the capture was told of it, and `Registrar.confirmed` will name
    the request once it has read the link (a REGISTER is answered then, not now)."""

    link: LinkSpec
    answered_later: bool


@dataclass(frozen=True)
class Confirmation:
    """A registration to answer now: the capture read its link's signal (`seen`), or stayed silent too long."""

    request_id: str
    link_id: str
    seen: bool


@dataclass(frozen=True)
class _Awaited:
    signal_offset: int
    link_id: str
    deadline: float  # time.monotonic() after which the request is answered without the capture's word


class Registrar:
    """Registers links, and tells which registrations the capture has confirmed since.

    Writes helper tables over the agent's connection and produces with its
    transactional producer (`out`), in whatever Kafka transaction is open.
    """

    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        registry: LinkRegistry,
        admin: Admin,
        catalog: Catalog,
        db: pymysql.connections.Connection[Any],
        out: Outgoing,
        auto: AutoPull,
    ) -> None:
        self._settings = settings
        self._topics = topics
        self._registry = registry
        self._admin = admin
        self._catalog = catalog
        self._db = db
        self._out = out
        self._auto = auto
        self._awaited: dict[str, _Awaited] = {}  # request id -> the signal the capture is to read
        # Only to read the capture's committed signal offsets; never joins its group.
        self._capture_group = consumer(settings, topics.capture_group)

    def register(self, requested: LinkSpec, request_id: str) -> Registered:
        """Register the link (again: a pull or a delete names its link too), making what it lacks."""
        self._registry.refresh(0)
        check(self._settings, requested, self._registry.links.get(requested.link_id))
        link = self._complete(requested)
        try:  # the topics first: a link Kafka refuses leaves no helper table behind
            self._admin.ensure(self._topics.table(db, t) for db, t in link.captured_tables())
        except TopicRefused as exc:
            raise Refused(str(exc)) from exc
        HelperTable(self._db, link).ensure()
        self._db.commit()
        self._registry.refresh(0)
        first = link.link_id not in self._registry.links
        if self._registry.links.get(link.link_id) != link:
            self._out.link(link)
            self._out.flush()
            self._registry.links[link.link_id] = link
            # Before the reply: a policy turned on approves every row inserted after the requester hears back.
            self._auto.follow()
            self._tell_capture(link, request_id)
            if first:
                self._adopt(link, request_id)
        return Registered(link, request_id in self._awaited)

    def _complete(self, requested: LinkSpec) -> LinkSpec:
        """The link with what the catalog says of its source table: part tables, primary key, in-store attributes."""
        db, table = requested.source_db, requested.source_table
        try:
            shape = self._catalog.shape(db, table)
        except UnknownTable as exc:
            raise Refused(str(exc)) from exc
        parts = self._catalog.part_tables(db, table)
        return dataclasses.replace(
            requested,
            part_tables=tuple(parts),
            primary_key=shape.primary_key,
            externals=tuple(self._catalog.external_columns(db, [table, *parts])),
        )

    def _tell_capture(self, link: LinkSpec, request_id: str) -> None:
        """Signal the capture with the new link; the request's reply waits until it has read the signal.

        The running capture learns links from the links topic in its own
        time, and its binlog reader drops the rows of tables it does not know
        yet: rows inserted right after the reply would never be published
        (an auto-pulled row would never arrive). Having read the signal, it
        captures the link's tables from then on.
        """
        delivered: list[int] = []

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                delivered.append(where(msg)[2])

        self._out.signal(link, [], request_id, on_delivery=on_delivery)
        self._out.flush()
        if delivered:
            self._awaited[request_id] = _Awaited(delivered[0], link.link_id, time.monotonic() + CAPTURE_WAIT_S)
        log.info("told the capture of link %s (signal at offset %s)", link.link_id, delivered)

    def _adopt(self, link: LinkSpec, request_id: str) -> None:
        """Continue from a helper table that existed before the link (a datajoint-link deployment switching).

        Every entity it names is processed once, as datajoint-link's `process`
        step would: Shared ones are read again (which tells the applier their
        state, so they are mirrored from now on), interrupted pulls and
        deletes complete, Tainted and Deprecated ones stay as they are.
        """
        keys = HelperTable(self._db, link).keys()
        self._db.commit()
        if not keys:
            return
        log.info("link %s: continuing from its existing helper table (%d entities)", link.link_id, len(keys))
        for n, chunk in enumerate(chunks(keys, ADOPT_CHUNK_KEYS)):
            signal_id = f"{request_id}:adopt:{n * ADOPT_CHUNK_KEYS}"
            self._out.signal(link, list(chunk), request_id, signal_id=signal_id)

    def confirmed(self) -> list[Confirmation]:
        """The registrations to answer now (the capture read their signal, or CAPTURE_WAIT_S passed); forgotten here."""
        if not self._awaited:
            return []
        tp = TopicPartition(self._topics.signals, 0)
        read = self._capture_group.committed([tp], timeout=5)[0].offset
        due = [
            Confirmation(rid, awaited.link_id, read > awaited.signal_offset)
            for rid, awaited in self._awaited.items()
            if read > awaited.signal_offset or time.monotonic() > awaited.deadline
        ]
        for done in due:
            log.info(
                "link %s: capture %s (its signal offset %s)", done.link_id, "confirmed" if done.seen else "silent", read
            )
            del self._awaited[done.request_id]
        return due

    def close(self) -> None:
        self._capture_group.close()
