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
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pymysql
import pymysql.cursors
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

import schemas
from consumers.integrity import ACK_RULES, NEW_HELPER_ROW, Acked, AckRule, Action, HelperRow, decide_delete, decide_pull
from foundation import keys as keycodec
from foundation.catalog import Catalog, UnknownTable
from foundation.config import Settings
from foundation.dberrors import describe, is_transient
from foundation.dead_letters import DeadLetter
from foundation.kafka import consumer, now_ms, produce, producer, where
from foundation.keys import KeyReason
from foundation.links import LinkRegistry, LinkSpec
from foundation.sql import chunks, in_clause, quote
from foundation.topics import Admin, SchemaTopic, TopicRefused, Topics
from schemas.registry import registry_at
from schemas.tables import EnvelopeReader

log = logging.getLogger(__name__)
MAX_IDENTIFIER = 64  # characters of a MariaDB schema or table name
ADOPT_CHUNK_KEYS = 10_000  # keys per snapshot signal when continuing from an existing helper table
# What a topic created a moment ago answers until its leader is elected and known (not all flagged retriable).
NEW_TOPIC_ERRORS = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._TIMED_OUT,
    }
)
FOLLOW_WAIT_S = 10.0  # how long the agent waits for a change topic created a moment ago to be usable
CAPTURE_WAIT_S = 5.0  # how long a REGISTER reply waits for the capture to read the new link's signal


class Refused(Exception):
    """A request the source site does not allow; the message goes back to the requester."""


class SourceAgent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self._codec = schemas.Codec()
        self._catalog = Catalog(self._connect)

    def _connect(self, **extra: Any) -> Any:
        return self.settings.source.connect(**extra)

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
        self._p = producer(s, transactional_id=self.topics.agent_group)
        self._p.init_transactions(60)  # fences a predecessor still running, aborts its open transaction
        self._p.begin_transaction()
        SchemaTopic(s, self.topics).publish_fixed(self._p)
        self._p.commit_transaction(30)
        # A static member (one agent per deployment): a restarted agent gets its partitions back at once
        # instead of after the dead one's session timeout.
        group = self.topics.agent_group
        c = consumer(s, group, **{"group.instance.id": group})
        c.subscribe([self.topics.commands, self.topics.acks])
        self._auto = AutoPull(s, self.topics, self._registry)
        self._auto.follow()
        self._awaiting_capture: dict[str, tuple[int, str, float]] = {}  # REGISTER id -> (signal offset, link, until)
        # Only to read the capture's committed signal offsets; never joins its group.
        self._capture_group = consumer(s, self.topics.capture_group)
        if on_ready:
            on_ready()
        try:
            while not stop.is_set():
                self._answer_registrations()
                self._auto_pulls()
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
            self._auto.close()
            self._capture_group.close()
            self._registry.close()
            self._db.close()

    def _tell_capture(self, link: LinkSpec, rid: str) -> None:
        """Signal the capture with the new link; the REGISTER reply waits until it has read the signal.

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

        self._p.produce(
            self.topics.signals,
            key=link.link_id,
            value=self._signal(rid, rid, link, []),
            on_delivery=on_delivery,
        )
        self._p.flush(30)
        if delivered:
            self._awaiting_capture[rid] = (delivered[0], link.link_id, time.monotonic() + CAPTURE_WAIT_S)
        log.info("told the capture of link %s (signal at offset %s)", link.link_id, delivered)

    def _answer_registrations(self) -> None:
        """Reply to REGISTER commands whose signal the capture has read (or after CAPTURE_WAIT_S without)."""
        if not self._awaiting_capture:
            return
        tp = TopicPartition(self.topics.signals, 0)
        read = self._capture_group.committed([tp], timeout=5)[0].offset
        done = [
            (rid, link_id, read > offset)
            for rid, (offset, link_id, deadline) in self._awaiting_capture.items()
            if read > offset or time.monotonic() > deadline
        ]
        if not done:
            return
        self._p.begin_transaction()
        for rid, link_id, seen in done:
            log.info("link %s: capture %s (its signal offset %s)", link_id, "confirmed" if seen else "silent", read)
            note = "" if seen else " (the capture has not confirmed it yet: is `djlink run --role capture` running?)"
            self._reply(rid, "ACCEPTED", message=f"link {link_id} registered{note}")
            del self._awaiting_capture[rid]
        self._p.commit_transaction(30)

    def _auto_pulls(self) -> None:
        """Pull the new master rows that their link's auto-pull policy approves: one Kafka transaction
        with the offsets of the change events read, as for any message the agent handles."""
        if self._registry.refresh(0) or self._auto.missing:
            self._auto.follow()
        taken = self._auto.take()
        if taken is None:
            return
        approved, offsets = taken
        self._p.begin_transaction()
        try:
            self._db.ping(reconnect=True)
            for link_id, keys in approved.items():
                link = self._registry.links[link_id]
                self._request(f"auto:{uuid.uuid4()}", link, "PULL", keys)
            self._p.send_offsets_to_transaction(offsets, self._auto.group_metadata(), 30)
            self._p.commit_transaction(30)
        except BaseException:
            with contextlib.suppress(KafkaException):
                self._p.abort_transaction(10)
            raise
        if approved:
            log.info("auto-pull: %s", ", ".join(f"{len(k)} new rows of {i}" for i, k in approved.items()))

    def _handle(self, msg: Message) -> None:
        try:
            record = self._codec.decode(msg.value() or b"")
        except schemas.DecodeError as exc:
            topic, partition, offset = where(msg)
            dead = DeadLetter(topic, partition, offset, msg.key(), msg.value(), str(exc), "decode")
            produce(self._p, self.topics.dead_letter, topic, dead.encode(self._codec))
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
            requested = LinkSpec.from_avro(cmd["link"])
            registered = self._registry.links.get(requested.link_id)
            if cmd["kind"] != "REGISTER" or requested.auto_pull is None:  # only a REGISTER sets the policy
                requested = dataclasses.replace(requested, auto_pull=registered.auto_pull if registered else None)
            link = self._register(requested, rid)
            if cmd["kind"] != "REGISTER":
                self._request(rid, link, cmd["kind"], cmd["keys"])
            elif rid not in self._awaiting_capture:  # else answered once the capture has read the link
                self._reply(rid, "ACCEPTED", message=f"link {link.link_id} registered")
        except Refused as exc:
            self._db.rollback()
            self._reply(rid, "REFUSED", message=str(exc))
        except pymysql.err.MySQLError as exc:
            if is_transient(exc):
                raise  # the connection's fault, not the request's: restarted, the agent reads it again
            # The request's fault (an identifier too long, a foreign key the server cannot make, a missing
            # privilege): refused with the server's words, and the agent goes on with the next one.
            self._db.rollback()
            self._reply(rid, "REFUSED", message=f"the source server refused it: {describe(exc)}")
            log.warning("request %s refused by the source server: %s", rid, describe(exc))

    def _register(self, requested: LinkSpec, rid: str) -> LinkSpec:
        s = self.settings
        if not s.schema_allowed(requested.source_db):
            raise Refused(
                f"source schema '{requested.source_db}' is not shared by this source site; "
                f"its operator can allow it in DJLINK_ALLOWED_SCHEMAS"
            )
        self._registry.refresh(0)
        existing = self._registry.links.get(requested.link_id)
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
        try:
            shape = self._catalog.shape(requested.source_db, requested.source_table)
        except UnknownTable as exc:
            raise Refused(str(exc)) from exc
        parts = self._catalog.part_tables(requested.source_db, requested.source_table)
        link = dataclasses.replace(
            requested,
            part_tables=tuple(parts),
            primary_key=shape.primary_key,
            externals=tuple(self._catalog.external_columns(requested.source_db, [requested.source_table, *parts])),
        )
        try:  # the topics first: a link Kafka refuses leaves no helper table behind
            self._admin.ensure(self.topics.table(db, t) for db, t in link.captured_tables())
        except TopicRefused as exc:
            raise Refused(str(exc)) from exc
        self._ensure_helper_table(link)
        self._registry.refresh(0)
        first = link.link_id not in self._registry.links
        if self._registry.links.get(link.link_id) != link:
            produce(self._p, self.topics.links, link.link_id, self._codec.encode(schemas.FIXED["link"], link.to_avro()))
            self._p.flush(30)
            self._registry.links[link.link_id] = link
            # Before the reply: a policy turned on approves every row inserted after the requester hears back.
            self._auto.follow()
            self._tell_capture(link, rid)
            if first:
                self._adopt(link, rid)
        return link

    def _adopt(self, link: LinkSpec, rid: str) -> None:
        """Continue from a helper table that existed before the link (a datajoint-link deployment switching).

        Every entity it names is processed once, as datajoint-link's `process`
        step would: Shared ones are read again (which tells the applier their
        state, so they are mirrored from now on), interrupted pulls and
        deletes complete, Tainted and Deprecated ones stay as they are.
        """
        pk = list(link.primary_key)
        with self._db.cursor() as cur:
            cur.execute(f"SELECT {', '.join(quote(c) for c in pk)} FROM {self._helper(link)}")
            keys = [keycodec.encode(row, pk) for row in cur.fetchall()]
        self._db.commit()
        if not keys:
            return
        log.info("link %s: continuing from its existing helper table (%d entities)", link.link_id, len(keys))
        for start in range(0, len(keys), ADOPT_CHUNK_KEYS):
            chunk = keys[start : start + ADOPT_CHUNK_KEYS]
            produce(self._p, self.topics.signals, link.link_id, self._signal(f"{rid}:adopt:{start}", rid, link, chunk))

    def _signal(self, signal_id: str, request_id: str, link: LinkSpec, keys: list[str]) -> bytes:
        """A snapshot signal to the capture: read these entities of `link` (none: just learn the link)."""
        signal = {
            "signal_id": signal_id,
            "kind": "SNAPSHOT_KEYS",
            "request_id": request_id,
            "link": link.to_avro(),
            "keys": keys,
            "ts_ms": now_ms(),
        }
        return self._codec.encode(schemas.FIXED["signal"], signal)

    def _ensure_helper_table(self, link: LinkSpec) -> None:
        """Create the helper table as datajoint-link declares it, with its foreign key to the source."""
        with self._db.cursor() as cur:
            cur.execute(
                "SELECT column_name AS name, column_type AS type, column_comment AS comment, "
                "character_set_name AS charset, collation_name AS collation "
                "FROM information_schema.columns WHERE table_schema=%s AND table_name=%s AND column_key='PRI' "
                "ORDER BY ordinal_position",
                (link.source_db, link.source_table),
            )
            pk = cur.fetchall()
            # A string key keeps its character set and collation: the foreign key needs them equal.
            columns = [
                f"{quote(c['name'])} {c['type']}"
                + (f" CHARACTER SET {c['charset']} COLLATE {c['collation']}" if c["charset"] else "")
                + f" NOT NULL COMMENT {self._db.escape(c['comment'])}"
                for c in pk
            ]
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
            cur.execute(
                "SELECT column_name AS name FROM information_schema.columns WHERE table_schema=%s AND table_name=%s",
                (link.helper_db, link.helper_table),
            )
            found = {row["name"] for row in cur.fetchall()}
        self._db.commit()
        lacking = [c for c in [*(c["name"] for c in pk), *HelperRow.COLUMNS] if c not in found]
        if lacking:  # CREATE TABLE IF NOT EXISTS met a table of that name that is something else
            raise Refused(
                f"{link.helper_db}.{link.helper_table} exists and is not a helper table of "
                f"{link.source_db}.{link.source_table} (it lacks {', '.join(lacking)}); name another helper table"
            )

    def _helper_rows(self, link: LinkSpec, key_texts: Sequence[str]) -> dict[str, HelperRow]:
        """The helper rows of the entities, by key, locked for update until the commit."""
        rows = self._rows_of(link, f"{quote(link.helper_db)}.{quote(link.helper_table)}", "*", key_texts, "FOR UPDATE")
        return {keycodec.encode(row, list(link.primary_key)): HelperRow.from_sql(row) for row in rows}

    def _source_keys(self, link: LinkSpec, key_texts: Sequence[str]) -> set[str]:
        """Which of the entities have their master row at the source; locked (shared) until the commit, so
        that it stays there until the helper rows referencing it are written."""
        pk = list(link.primary_key)
        table = f"{quote(link.source_db)}.{quote(link.source_table)}"
        rows = self._rows_of(link, table, ", ".join(quote(c) for c in pk), key_texts, "LOCK IN SHARE MODE")
        return {keycodec.encode(row, pk) for row in rows}

    def _rows_of(
        self, link: LinkSpec, table: str, columns: str, key_texts: Sequence[str], lock: str
    ) -> list[dict[str, Any]]:
        """`columns` of the rows of `table` with the entities' keys, 1,000 keys per SELECT, locked by `lock`."""
        pk = list(link.primary_key)
        found: list[dict[str, Any]] = []
        with self._db.cursor() as cur:
            for start in range(0, len(key_texts), 1000):
                chunk = [keycodec.decode(k) for k in key_texts[start : start + 1000]]
                cur.execute(
                    f"SELECT {columns} FROM {table} WHERE {in_clause(pk, len(chunk))} {lock}",
                    [k[c] for k in chunk for c in pk],
                )
                found.extend(cur.fetchall())
        return found

    def _request(self, rid: str, link: LinkSpec, kind: str, key_texts: list[str]) -> None:
        """A pull or a delete: move each entity's helper row as the seed would, then have them processed.

        Processing is a snapshot read of the entities' rows AND helper rows
        in one consistent read; the applier acts on the helper row it finds
        there (consumers.integrity.decide_process) and acknowledges.
        """
        pk = list(link.primary_key)
        key_texts = list(dict.fromkeys(keycodec.encode(keycodec.decode(k), pk) for k in key_texts))
        helpers = self._helper_rows(link, key_texts)
        decide = decide_pull if kind == "PULL" else decide_delete
        moves: dict[Action, list[str]] = {action: [] for action in Action}
        refused: list[KeyReason] = []
        for k in key_texts:
            decision = decide(helpers.get(k))
            moves[decision.action].append(k)
            if decision.action in (Action.REFUSE, Action.REFUSE_AND_PROCESS):
                refused.append(KeyReason(k, decision.reason))
        if moves[Action.ACTIVATE]:
            # Only rows still at the source: one deleted since it was chosen (by a restriction, or by an
            # auto-pull policy reading its insert) is refused alone, not the whole request with it.
            present = self._source_keys(link, moves[Action.ACTIVATE])
            for k in moves[Action.ACTIVATE]:
                if k not in present:
                    reason = f"not in {link.source_db}.{link.source_table} (deleted since it was chosen?)"
                    refused.append(KeyReason(k, reason))
            moves[Action.ACTIVATE] = [k for k in moves[Action.ACTIVATE] if k in present]
        if moves[Action.ACTIVATE]:
            cols = pk + list(HelperRow.COLUMNS)
            sql = (
                f"INSERT INTO {self._helper(link)} "
                f"({', '.join(quote(c) for c in cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
            )
            new = NEW_HELPER_ROW.to_sql()
            rows = [
                [keycodec.decode(k)[c] for c in pk] + [new[c] for c in HelperRow.COLUMNS]
                for k in moves[Action.ACTIVATE]
            ]
            with self._db.cursor() as cur:
                try:
                    cur.executemany(sql, rows)
                except pymysql.err.IntegrityError as exc:
                    raise Refused(f"cannot activate entities of {link.link_id}: {exc.args[-1]}") from exc
        for action in (Action.REPULL, Action.MARK_DELETE):
            if moves[action]:
                after = action.helper_after(helpers[moves[action][0]])
                assert after is not None
                self._set_process(link, moves[action], after.process.value)
        self._db.commit()
        waited = [
            k for action in (Action.ACTIVATE, Action.PROCESS, Action.REPULL, Action.MARK_DELETE) for k in moves[action]
        ]
        done = moves[Action.DONE]
        refused_records = [r.to_avro() for r in refused]
        self._reply(rid, "ACCEPTED", activated=len(waited), skipped=len(done), refused=refused_records, done=done)
        to_read = waited + moves[Action.REFUSE_AND_PROCESS]
        if to_read:
            produce(self._p, self.topics.signals, link.link_id, self._signal(rid, rid, link, to_read))

    @staticmethod
    def _helper(link: LinkSpec) -> str:
        return f"{quote(link.helper_db)}.{quote(link.helper_table)}"

    def _set_process(self, link: LinkSpec, key_texts: list[str], process: str) -> None:
        self._update(link, key_texts, f"UPDATE {self._helper(link)} SET `process`=%s WHERE", [process])

    def _update(
        self,
        link: LinkSpec,
        key_texts: Sequence[str],
        head: str,
        params: Sequence[Any],
        where: str = "",
        where_params: Sequence[Any] = (),
    ) -> None:
        """`head` (ending in WHERE) for the entities `key_texts`, 1,000 at a time; `where` narrows it."""
        pk = list(link.primary_key)
        with self._db.cursor() as cur:
            for chunk in chunks(key_texts):
                keys = [keycodec.decode(k) for k in chunk]
                cur.execute(
                    f"{head} {in_clause(pk, len(keys))}{where}",
                    [*params, *(k[c] for k in keys for c in pk), *where_params],
                )

    # -- acknowledgements ----------------------------------------------------

    def _apply_rule(self, link: LinkSpec, rule: AckRule, key_texts: Sequence[str]) -> None:
        """One acknowledgement rule (consumers.integrity.ACK_RULES) as one guarded statement per key chunk."""
        if not key_texts:
            return
        guard = " AND `process`=%s"
        guard_params: list[Any] = [rule.guard.process.value]
        if rule.guard.is_flagged is not None:
            guard += " AND `is_flagged`=%s"
            guard_params.append("TRUE" if rule.guard.is_flagged else "FALSE")
        if rule.set_process is None:
            self._update(link, key_texts, f"DELETE FROM {self._helper(link)} WHERE", [], guard, guard_params)
            return
        sets = "`process`=%s" + (", `is_deprecated`='TRUE'" if rule.set_deprecated else "")
        head = f"UPDATE {self._helper(link)} SET {sets} WHERE"
        self._update(link, key_texts, head, [rule.set_process.value], guard, guard_params)

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
        for acked in Acked:  # in the order of ACK_RULES: a rule's result never satisfies a later one's guard
            for rule in ACK_RULES[acked]:
                self._apply_rule(link, rule, ack.get(acked.value) or [])
        self._db.commit()
        deleted = ack.get("deleted") or []
        if ack["request_id"]:
            refused = [
                KeyReason(k, "flagged at the source; now deprecated").to_avro() for k in ack.get("deprecate") or []
            ]
            refused += ack.get("skipped") or []
            failed = ack.get("failed") or []
            done = [*ack["keys"], *deleted]
            rows = ack.get("rows", 0)
            self._reply(ack["request_id"], "PROGRESS", done=done, refused=refused, failed=failed, rows=rows)


class AutoPull:
    """Reads the master tables' change topics of links with an auto-pull policy, for rows it approves.

    Partitions are assigned by hand (the topics change with the links; a
    group's static member would keep an old assignment across a restart);
    the offsets read commit in the agent's Kafka transactions, under the
    group `<prefix>-agent-auto`. A policy turned on starts at the topic's
    end: it approves rows inserted from then on.
    """

    def __init__(self, settings: Settings, topics: Topics, registry: LinkRegistry) -> None:
        self._topics = topics
        self._registry = registry
        self._c = consumer(settings, topics.auto_pull_group)
        self._codec = schemas.Codec(
            SchemaTopic(settings, topics).resolve, registry=registry_at(settings.schema_registry_url)
        )
        self._envelopes = EnvelopeReader(self._codec)
        self._following: dict[str, str] = {}  # master topic -> link id
        self.missing: list[str] = []  # wanted topics not assigned yet

    def follow(self) -> None:
        """Assign the master topics of links whose policy is on; drop those whose policy went off."""
        wanted = {
            self._topics.table(link.source_db, link.source_table): link.link_id
            for link in self._registry.links.values()
            if link.auto_pull_match() is not None
        }
        gone = [t for t in self._following if t not in wanted]
        if gone:
            self._c.incremental_unassign([TopicPartition(t, p) for t in gone for p in self._partitions(t)])
        new = [TopicPartition(t, p) for t in wanted if t not in self._following for p in self._partitions(t)]
        assigned = {tp.topic for tp in new}
        # A topic whose partitions the broker does not report yet is tried again (see `missing`).
        self.missing = [t for t in wanted if t not in self._following and t not in assigned]
        if new:
            committed = self._c.committed(new, timeout=10)
            for tp, done in zip(new, committed, strict=True):
                if done.offset >= 0:
                    tp.offset = done.offset
                else:
                    tp.offset = self._end(tp)
            self._c.incremental_assign(new)
        self._following = {t: link_id for t, link_id in wanted.items() if t not in self.missing}

    def _end(self, tp: TopicPartition) -> int:
        """The partition's end, waiting out a topic created a moment ago (its leader not elected yet)."""
        deadline = time.monotonic() + FOLLOW_WAIT_S
        while True:
            try:
                return int(self._c.get_watermark_offsets(tp, timeout=5)[1])
            except KafkaException as exc:
                error = exc.args[0]
                settling = error.code() in NEW_TOPIC_ERRORS or error.retriable()
                if not settling or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _partitions(self, topic: str) -> list[int]:
        """The topic's partitions; a topic just created may take a moment to be reported."""
        deadline = time.monotonic() + FOLLOW_WAIT_S
        while True:
            meta = self._c.list_topics(topic, timeout=10).topics.get(topic)
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            if time.monotonic() > deadline:
                return []
            time.sleep(0.1)

    def take(self) -> tuple[dict[str, list[str]], list[TopicPartition]] | None:
        """New rows approved per link and the offsets after what was read; None when nothing was read."""
        if not self._following:
            return None
        messages = [m for m in self._c.consume(500, 0) if m.error() is None]
        if not messages:
            return None
        approved: dict[str, list[str]] = {}
        offsets: dict[tuple[str, int], int] = {}
        for msg in messages:
            topic, partition, offset = where(msg)
            offsets[(topic, partition)] = offset + 1
            link = self._registry.links.get(self._following.get(topic, ""))
            match = link.auto_pull_match() if link is not None else None
            if link is None or match is None or msg.value() is None:
                continue
            try:
                vschema = self._codec.schema_of(msg.value())
                envelope = self._codec.decode(msg.value())
                after = EnvelopeReader.image(envelope, self._envelopes.converters(vschema), "after")
            except schemas.DecodeError as exc:  # the applier dead-letters it; here it approves nothing
                log.warning("auto-pull skips an undecodable event %s[%d]@%d: %s", topic, partition, offset, exc)
                continue
            if envelope["op"] != "c" or after is None:
                continue
            plain = keycodec.plain(after)
            if all(plain.get(name) == value for name, value in match.items()):
                approved.setdefault(link.link_id, []).append(keycodec.encode(after, list(link.primary_key)))
        return approved, [TopicPartition(t, p, o) for (t, p), o in offsets.items()]

    def group_metadata(self) -> Any:
        return self._c.consumer_group_metadata()

    def close(self) -> None:
        self._c.close()
