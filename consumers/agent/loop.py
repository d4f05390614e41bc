"""The source agent's run loop: one Kafka transaction per message, and the dispatch of each to its handler.

The agent consumes commands (link registrations, pull and delete requests)
from the destination site and acknowledgements from the applier, and hands
each to `consumers.agent.registration` or `consumers.agent.requests`; the
registrations the capture has confirmed and the rows an auto-pull policy
approves are handled between messages, each in a Kafka transaction too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pymysql
import pymysql.cursors
from confluent_kafka import KafkaException, Message, Producer, TopicPartition

import schemas
from consumers.agent import metrics, requests
from consumers.agent.auto_pull import AutoPull
from consumers.agent.errors import Refused
from consumers.agent.outgoing import Outgoing
from consumers.agent.registration import Registrar
from foundation import grants
from foundation import keys as keycodec
from foundation.catalog import Catalog, UnknownTable
from foundation.config import Settings
from foundation.dberrors import describe, is_transient, waiting_out
from foundation.dead_letters import DeadLetter
from foundation.kafka import Transactional, consumer, ok, where
from foundation.links import LinkRegistry, LinkSpec
from foundation.sql import chunks
from foundation.topics import Admin, SchemaTopic, Topics

log = logging.getLogger(__name__)


@contextlib.contextmanager
def transaction(p: Producer) -> Iterator[None]:
    """A Kafka transaction around the block: committed when it ends, aborted when it raises."""
    p.begin_transaction()
    try:
        yield
        p.commit_transaction(30)
    except BaseException:
        with contextlib.suppress(KafkaException):
            p.abort_transaction(10)
        raise


class _Forged(Exception):
    """A record that decodes but is not about this deployment's links and keys: dead-lettered, never applied."""


class SourceAgent:
    """The only writer of helper tables, on the source site; `run` until told to stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self._codec = schemas.Codec()
        self._catalog = Catalog(self._connect)
        self._key_types: dict[LinkSpec, dict[str, str]] = {}

    def _connect(self, **extra: Any) -> Any:
        return self.settings.source.connect(**extra)

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        s, topics = self.settings, self.topics
        admin = Admin(s)
        admin.ensure_control(topics)
        self._registry = LinkRegistry(s, topics)
        self._registry.catch_up()
        self._db = self._connect(cursorclass=pymysql.cursors.DictCursor, autocommit=False)
        grants.check(self._db, grants.RoleName.agent, self._registry.links.values())
        self._account = grants.account(self._db)
        # Transactional: what a message makes the agent say (replies, snapshot signals, links) commits
        # with the message's offset, so a crash at any point neither loses it nor says it twice. The
        # helper table is written first; handling a message again finds it moved and does nothing twice.
        self._txn = Transactional(s, topics.agent_group, "agent")
        self._p = self._txn.producer
        with transaction(self._p):
            SchemaTopic(s, topics).publish_fixed(self._p)
        self._out = Outgoing(self._p, self._codec, topics)
        # A static member (one agent per deployment): a restarted agent gets its partitions back at once
        # instead of after the dead one's session timeout.
        c = consumer(s, topics.agent_group, **{"group.instance.id": topics.agent_group})
        c.subscribe([topics.commands, topics.acks])
        self._auto = AutoPull(s, topics, self._registry)
        self._auto.follow()
        self._registrar = Registrar(s, topics, self._registry, admin, self._catalog, self._db, self._out, self._auto)
        if on_ready:
            on_ready()
        try:
            while not stop.is_set():
                self._answer_registrations()
                self._auto_pulls(stop)
                msg = c.poll(0.1)
                if not ok(msg):
                    continue
                topic, partition, offset = where(msg)
                what = f"the message {topic}[{partition}]@{offset}"
                self._waiting_out_the_source(stop, what, functools.partial(self._handle_in_transaction, c, msg))
        finally:
            c.close()
            self._auto.close()
            self._registrar.close()
            self._registry.close()
            self._db.close()

    def _handle_in_transaction(self, c: Any, msg: Message) -> None:
        """One message handled in one Kafka transaction, with its consumed offset."""
        self._renew_after_outage()
        with transaction(self._p):
            if msg.value() is not None:
                self._handle(msg)
            topic, partition, offset = where(msg)
            at = TopicPartition(topic, partition, offset + 1)
            self._p.send_offsets_to_transaction([at], c.consumer_group_metadata(), 30)

    def _waiting_out_the_source(self, stop: threading.Event, what: str, step: Callable[[], None]) -> None:
        """Run `step` (one Kafka transaction); while the source server is unreachable (a restart, a failover)
        or answers a transient error, abort, wait (0.5 s doubling to 5 s, a warning each time) and run it
        again. Every step is idempotent (the helper table is written first and each change only from the
        state it expects), so running one again does nothing twice."""

        def warn(exc: BaseException, pause: float) -> None:
            metrics.SOURCE_WAITS.inc()
            log.warning("the source server is unreachable (%s); %s again in %.1f s", describe(exc), what, pause)

        def roll_back() -> None:
            with contextlib.suppress(Exception):
                self._db.rollback()

        waiting_out(step, stop, warn, roll_back)

    def _renew_after_outage(self) -> None:
        """The producer for the next transaction: a new one after a lost broker connection (Transactional)."""
        p = self._txn.ready()
        if p is not self._p:
            self._p = p
            self._out.use(p)

    def _answer_registrations(self) -> None:
        """Reply ACCEPTED to the registrations whose signal the capture has read (or after CAPTURE_WAIT_S without).

        A pull or delete whose link changed on the way (`Registrar.register`) gets this reply too, after its own.
        """
        confirmed = self._registrar.confirmed()
        if not confirmed:
            return
        self._renew_after_outage()
        with transaction(self._p):
            for done in confirmed:
                note = (
                    ""
                    if done.seen
                    else " (the capture has not confirmed it yet: is `djlink run --role capture` running?)"
                )
                self._out.reply(done.request_id, "ACCEPTED", message=f"link {done.link_id} registered{note}")

    def _auto_pulls(self, stop: threading.Event) -> None:
        """Pull the new master rows that their link's auto-pull policy approves: one Kafka transaction
        with the offsets of the change events read, as for any message the agent handles."""
        if self._registry.refresh(0) or self._auto.missing:
            self._auto.follow()
        approved = self._auto.take()
        if approved is None:
            return

        def pull() -> None:
            self._renew_after_outage()
            with transaction(self._p):
                self._db.ping(reconnect=True)
                for link_id, keys in approved.keys.items():
                    link = self._registry.links[link_id]
                    columns = self._key_columns(link)
                    for part in chunks(keys, keycodec.MAX_REQUEST_KEYS):
                        rid = f"auto:{uuid.uuid4()}"
                        requests.pull_or_delete(
                            self._db,
                            self._out,
                            link,
                            rid,
                            "PULL",
                            part,
                            columns,
                            self.settings.agent_keys_per_transaction,
                        )
                self._p.send_offsets_to_transaction(approved.offsets, self._auto.group_metadata(), 30)

        self._waiting_out_the_source(stop, "the auto-pulls", pull)
        if approved.keys:
            metrics.AUTO_PULLS.inc(sum(len(k) for k in approved.keys.values()))
            log.info("auto-pull: %s", ", ".join(f"{len(k)} new rows of {i}" for i, k in approved.keys.items()))

    def _key_columns(self, link: LinkSpec) -> dict[str, str]:
        """The link's primary key as the source table has it: name -> data type, in key order (read once per
        link and process)."""
        found = self._key_types.get(link)
        if found is None:
            try:
                shape = self._catalog.shape(link.source_db, link.source_table)
            except UnknownTable as exc:
                raise Refused(str(exc)) from None
            types = {c.name: c.data_type for c in shape.columns}
            found = self._key_types[link] = {name: types.get(name, "") for name in link.primary_key}
        return found

    def _handle(self, msg: Message) -> None:
        """Decode the message and hand it to its handler; an undecodable one, or an acknowledgement that is not
        about a link and keys of this deployment, is dead-lettered with the reason."""
        try:
            record = self._codec.decode(msg.value() or b"")
            if msg.topic() == self.topics.acks:
                link = self._acked_link(record)
        except (schemas.DecodeError, _Forged) as exc:
            stage = "decode" if isinstance(exc, schemas.DecodeError) else "validate"
            topic, partition, offset = where(msg)
            self._out.dead_letter(DeadLetter(topic, partition, offset, msg.key(), msg.value(), str(exc), stage))
            log.warning("dead-lettered message %s[%d]@%d: %s", topic, partition, offset, exc)
            return
        self._db.ping(reconnect=True)
        if msg.topic() == self.topics.acks:
            requests.acknowledge(self._db, self._out, link, record)
            metrics.ACKS.inc()
        else:
            self._command(record)

    def _command(self, cmd: dict[str, Any]) -> None:
        """A REGISTER, PULL or DELETE: the link registered (again), then the request; refusals are replied."""
        rid = cmd["request_id"]
        metrics.COMMANDS.labels(cmd["kind"]).inc()
        try:
            requested = LinkSpec.from_avro(cmd["link"])
            registered = self._registry.links.get(requested.link_id)
            if cmd["kind"] != "REGISTER" or requested.auto_pull is None:  # only a REGISTER sets the policy
                requested = dataclasses.replace(requested, auto_pull=registered.auto_pull if registered else None)
            done = self._registrar.register(requested, rid)
            if cmd["kind"] != "REGISTER":
                columns = self._key_columns(done.link)
                requests.pull_or_delete(
                    self._db,
                    self._out,
                    done.link,
                    rid,
                    cmd["kind"],
                    cmd["keys"],
                    columns,
                    self.settings.agent_keys_per_transaction,
                )
            elif not done.answered_later:
                self._out.reply(rid, "ACCEPTED", message=f"link {done.link.link_id} registered")
        except Refused as exc:
            self._db.rollback()
            metrics.REFUSALS.labels("request").inc()
            self._out.reply(rid, "REFUSED", message=str(exc))
        except pymysql.err.MySQLError as exc:
            if is_transient(exc):
                raise  # the connection's fault, not the request's: restarted, the agent reads it again
            # The request's fault (an identifier too long, a foreign key the server cannot make, a missing
            # privilege): refused with the server's words, and the agent goes on with the next one.
            self._db.rollback()
            metrics.REFUSALS.labels("request").inc()
            missing = grants.from_error(exc, "agent", self._account)
            why = str(missing) if missing else f"the source server refused it: {describe(exc)}"
            self._out.reply(rid, "REFUSED", message=why)
            log.warning("request %s refused: %s", rid, why)

    def _acked_link(self, ack: dict[str, Any]) -> LinkSpec:
        """The registered link an acknowledgement is about (read to the links topic's end if new), its keys
        checked; _Forged when it names a link or keys this deployment does not have."""
        self._registry.refresh(0)
        link = self._registry.links.get(ack["link_id"])
        if link is None:
            self._registry.catch_up()
            link = self._registry.links.get(ack["link_id"])
        if link is None:
            raise _Forged(f"an acknowledgement for link {ack['link_id']!r}, which is not registered")
        try:
            columns = self._key_columns(link)
        except Refused as exc:
            raise _Forged(f"an acknowledgement for link {link.link_id}: {exc}") from None
        for field in ("keys", "deleted", "deprecate"):
            for text in ack.get(field) or []:
                try:
                    keycodec.parse(text, columns)
                except keycodec.BadKey as exc:
                    raise _Forged(f"an acknowledgement with a bad {field} entry: {exc}") from None
        return link
