"""The source agent: the only writer of helper tables, on the source site.

It consumes commands (link registrations and pull requests) from the
destination site and acknowledgements from the applier, moves each entity
through the seed's states in the helper table, publishes links, asks the
capture for snapshot reads of newly activated entities, and answers each
request on the replies topic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pymysql
import pymysql.cursors
from confluent_kafka import KafkaException, Message, TopicPartition

import schemas
from cdc.schema_history import SchemaHistory, UnknownTable
from cdc.snapshot import in_clause, quote
from consumers.entity import NEW_HELPER_ROW, Action, decide_delete, decide_pull
from djlink import keys as keycodec
from djlink.config import Settings
from djlink.links import LinkRegistry, LinkSpec
from djlink.topics import Admin, SchemaTopic, Topics, consumer, now_ms, produce, producer, where

log = logging.getLogger(__name__)
HELPER_COLUMNS = ("process", "is_flagged", "is_deprecated")


class Refused(Exception):
    """A request the source site does not allow; the message goes back to the requester."""


class SourceAgent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self._codec = schemas.Codec()
        self._history = SchemaHistory(self._connect)

    def _connect(self, **extra: Any) -> Any:
        return pymysql.connect(**self.settings.source.connect_args(), charset="utf8mb4", **extra)

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        self._admin = Admin(s)
        self._admin.ensure_control(self.topics)
        self._registry = LinkRegistry(s, self.topics)
        self._registry.catch_up()
        self._db = self._connect(cursorclass=pymysql.cursors.DictCursor, autocommit=False)
        # Transactional: what a message makes the agent say (replies, snapshot signals, links) commits
        # with the message's offset, so a crash at any point neither loses it nor says it twice. The
        # helper table is written first; handling a message again finds it moved and does nothing twice.
        self._p = producer(s, transactional_id=f"{self.topics.prefix}-agent")
        self._p.init_transactions(60)  # fences a predecessor still running, aborts its open transaction
        self._p.begin_transaction()
        SchemaTopic(s, self.topics).publish_fixed(self._p)
        self._p.commit_transaction(30)
        # A static member (one agent per deployment): a restarted agent gets its partitions back at once
        # instead of after the dead one's session timeout.
        group = f"{self.topics.prefix}-agent"
        c = consumer(s, group, **{"group.instance.id": group})
        c.subscribe([self.topics.commands, self.topics.acks])
        if on_ready:
            on_ready()
        try:
            while not stop.is_set():
                msg = c.poll(0.1)
                if msg is None or msg.error() is not None:
                    continue
                self._p.begin_transaction()
                try:
                    if msg.value() is not None:
                        self._handle(msg)
                    topic, partition, offset = where(msg)
                    at = TopicPartition(topic, partition, offset + 1)
                    self._p.send_offsets_to_transaction([at], c.consumer_group_metadata(), 30)
                    self._p.commit_transaction(30)
                except BaseException:
                    with contextlib.suppress(KafkaException):
                        self._p.abort_transaction(10)
                    raise
        finally:
            c.close()
            self._registry.close()
            self._db.close()

    def _handle(self, msg: Message) -> None:
        try:
            record = self._codec.decode(msg.value() or b"")
        except schemas.DecodeError as exc:
            topic, partition, offset = where(msg)
            dead = {
                "topic": topic,
                "partition": partition,
                "offset": offset,
                "key": msg.key(),
                "value": msg.value(),
                "reason": str(exc),
                "stage": "decode",
                "unit_id": None,
                "ts_ms": now_ms(),
            }
            produce(self._p, self.topics.dead_letter, topic, self._codec.encode(schemas.FIXED["dead_letter"], dead))
            log.warning("dead-lettered undecodable message %s[%d]@%d: %s", topic, partition, offset, exc)
            return
        self._db.ping(reconnect=True)
        if msg.topic() == self.topics.acks:
            self._ack(record)
        else:
            self._command(record)

    # -- replies -----------------------------------------------------------

    def _reply(self, request_id: str, status: str, **fields: Any) -> None:
        record = {"request_id": request_id, "status": status, "ts_ms": now_ms(), **fields}
        produce(self._p, self.topics.replies, request_id, self._codec.encode(schemas.FIXED["reply"], record))

    # -- commands ----------------------------------------------------------

    def _command(self, cmd: dict[str, Any]) -> None:
        rid = cmd["request_id"]
        try:
            link = self._register(LinkSpec.from_avro(cmd["link"]))
            if cmd["kind"] == "REGISTER":
                self._reply(rid, "ACCEPTED", message=f"link {link.link_id} registered")
            else:
                self._request(rid, link, cmd["kind"], cmd["keys"])
        except Refused as exc:
            self._db.rollback()
            self._reply(rid, "REFUSED", message=str(exc))

    def _register(self, requested: LinkSpec) -> LinkSpec:
        s = self.settings
        if not s.schema_allowed(requested.source_db):
            raise Refused(
                f"source schema '{requested.source_db}' is not shared by this source site; "
                f"its operator can allow it in DJLINK_ALLOWED_SCHEMAS"
            )
        self._history.forget(requested.source_db)
        try:
            shape = self._history.shape(requested.source_db, requested.source_table)
        except UnknownTable as exc:
            raise Refused(str(exc)) from exc
        link = dataclasses.replace(
            requested,
            part_tables=tuple(self._history.part_tables(requested.source_db, requested.source_table)),
            primary_key=shape.primary_key,
        )
        self._ensure_helper_table(link)
        self._admin.ensure(self.topics.table(db, t) for db, t in link.captured_tables())
        self._registry.refresh(0)
        if self._registry.links.get(link.link_id) != link:
            produce(self._p, self.topics.links, link.link_id, self._codec.encode(schemas.FIXED["link"], link.to_avro()))
            self._p.flush(30)
            self._registry.links[link.link_id] = link
        return link

    def _ensure_helper_table(self, link: LinkSpec) -> None:
        """Create the helper table as datajoint-link declares it, with its foreign key to the source."""
        with self._db.cursor() as cur:
            cur.execute(
                "SELECT column_name AS name, column_type AS type, column_comment AS comment "
                "FROM information_schema.columns WHERE table_schema=%s AND table_name=%s AND column_key='PRI' "
                "ORDER BY ordinal_position",
                (link.source_db, link.source_table),
            )
            pk = cur.fetchall()
            columns = [f"{quote(c['name'])} {c['type']} NOT NULL COMMENT {self._db.escape(c['comment'])}" for c in pk]
            names = ", ".join(quote(c["name"]) for c in pk)
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {quote(link.helper_db)}")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {quote(link.helper_db)}.{quote(link.helper_table)} ("
                + ", ".join(columns)
                + ', `process` enum("PULL","DELETE","NONE") NOT NULL COMMENT ""'
                + ', `is_flagged` enum("TRUE","FALSE") NOT NULL COMMENT ""'
                + ', `is_deprecated` enum("TRUE","FALSE") NOT NULL COMMENT ""'
                + f", PRIMARY KEY ({names})"
                + f", FOREIGN KEY ({names}) REFERENCES {quote(link.source_db)}.{quote(link.source_table)} ({names})"
                + " ON UPDATE CASCADE ON DELETE RESTRICT"
                + ') ENGINE=InnoDB, COMMENT "djlink helper table: sharing state of each entity"'
            )
        self._db.commit()

    def _helper_rows(self, link: LinkSpec, key_texts: Sequence[str]) -> dict[str, dict[str, Any]]:
        pk = list(link.primary_key)
        result: dict[str, dict[str, Any]] = {}
        table = f"{quote(link.helper_db)}.{quote(link.helper_table)}"
        with self._db.cursor() as cur:
            for start in range(0, len(key_texts), 1000):
                chunk = [keycodec.decode(k) for k in key_texts[start : start + 1000]]
                cur.execute(
                    f"SELECT * FROM {table} WHERE {in_clause(pk, len(chunk))} FOR UPDATE",
                    [k[c] for k in chunk for c in pk],
                )
                for row in cur.fetchall():
                    result[keycodec.encode(row, pk)] = row
        return result

    def _request(self, rid: str, link: LinkSpec, kind: str, key_texts: list[str]) -> None:
        """A pull or a delete: move each entity's helper row as the seed would, then have them processed.

        Processing is a snapshot read of the entities' rows AND helper rows
        in one consistent read; the applier acts on the helper row it finds
        there (consumers.entity.decide_process) and acknowledges.
        """
        pk = list(link.primary_key)
        key_texts = list(dict.fromkeys(keycodec.encode(keycodec.decode(k), pk) for k in key_texts))
        helpers = self._helper_rows(link, key_texts)
        decide = decide_pull if kind == "PULL" else decide_delete
        moves: dict[Action, list[str]] = {action: [] for action in Action}
        refused: list[str] = []
        for k in key_texts:
            decision = decide(helpers.get(k))
            moves[decision.action].append(k)
            if decision.action in (Action.REFUSE, Action.REFUSE_AND_PROCESS):
                refused.append(f"{k}: {decision.reason}")
        if moves[Action.ACTIVATE]:
            cols = pk + list(HELPER_COLUMNS)
            sql = (
                f"INSERT INTO {self._helper(link)} "
                f"({', '.join(quote(c) for c in cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
            )
            rows = [
                [keycodec.decode(k)[c] for c in pk] + [NEW_HELPER_ROW[c] for c in HELPER_COLUMNS]
                for k in moves[Action.ACTIVATE]
            ]
            with self._db.cursor() as cur:
                try:
                    cur.executemany(sql, rows)
                except pymysql.err.IntegrityError as exc:
                    raise Refused(f"cannot activate entities of {link.link_id}: {exc.args[-1]}") from exc
        self._set_process(link, moves[Action.REPULL], "PULL")
        self._set_process(link, moves[Action.MARK_DELETE], "DELETE")
        self._db.commit()
        waited = [
            k for action in (Action.ACTIVATE, Action.PROCESS, Action.REPULL, Action.MARK_DELETE) for k in moves[action]
        ]
        done = moves[Action.DONE]
        self._reply(rid, "ACCEPTED", activated=len(waited), skipped=len(done), refused=refused, done=done)
        to_read = waited + moves[Action.REFUSE_AND_PROCESS]
        if to_read:
            signal = {
                "signal_id": rid,
                "kind": "SNAPSHOT_KEYS",
                "request_id": rid,
                "link": link.to_avro(),
                "keys": to_read,
                "ts_ms": now_ms(),
            }
            produce(self._p, self.topics.signals, link.link_id, self._codec.encode(schemas.FIXED["signal"], signal))

    @staticmethod
    def _helper(link: LinkSpec) -> str:
        return f"{quote(link.helper_db)}.{quote(link.helper_table)}"

    def _set_process(self, link: LinkSpec, key_texts: list[str], process: str) -> None:
        self._update(link, key_texts, f"UPDATE {self._helper(link)} SET `process`=%s WHERE", [process])

    def _update(self, link: LinkSpec, key_texts: Sequence[str], head: str, params: list[Any], where: str = "") -> None:
        """`head` (ending in WHERE) for the entities `key_texts`, 1,000 at a time; `where` narrows it."""
        pk = list(link.primary_key)
        with self._db.cursor() as cur:
            for start in range(0, len(key_texts), 1000):
                chunk = [keycodec.decode(k) for k in key_texts[start : start + 1000]]
                cur.execute(f"{head} {in_clause(pk, len(chunk))}{where}", [*params, *(k[c] for k in chunk for c in pk)])

    # -- acknowledgements ----------------------------------------------------

    def _ack(self, ack: dict[str, Any]) -> None:
        """Finish what the applier did, each step only from the state it expects (so a repeated ack is harmless).

        Pulled or kept: PULL -> NONE (Shared, or Tainted when flagged).
        Flagged before arriving: PULL -> NONE, deprecated (Deprecated).
        Deleted at the destination: DELETE -> helper row gone (Unshared), or,
        flagged, -> NONE, deprecated (Deprecated).
        """
        self._registry.refresh(0)
        link = self._registry.links.get(ack["link_id"])
        if link is None:
            self._registry.catch_up()
            link = self._registry.links[ack["link_id"]]
        table = self._helper(link)
        deprecated = f"UPDATE {table} SET `process`='NONE', `is_deprecated`='TRUE' WHERE"
        self._update(link, ack["keys"], f"UPDATE {table} SET `process`='NONE' WHERE `process`='PULL' AND", [])
        self._update(link, ack.get("deprecate") or [], deprecated, [], " AND `process`='PULL' AND `is_flagged`='TRUE'")
        deleted = ack.get("deleted") or []
        self._update(link, deleted, deprecated, [], " AND `process`='DELETE' AND `is_flagged`='TRUE'")
        self._update(link, deleted, f"DELETE FROM {table} WHERE", [], " AND `process`='DELETE'")
        self._db.commit()
        if ack["request_id"]:
            refused = [f"{k}: flagged at the source; now deprecated" for k in ack.get("deprecate") or []]
            refused += ack.get("skipped") or []
            self._reply(ack["request_id"], "PROGRESS", done=[*ack["keys"], *deleted], refused=refused)
