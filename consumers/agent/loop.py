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
from foundation.catalog import Catalog
from foundation.config import Settings
from foundation.dberrors import describe, is_transient
from foundation.dead_letters import DeadLetter
from foundation.kafka import consumer, ok, producer, where
from foundation.links import LinkRegistry, LinkSpec
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


class SourceAgent:
    """The only writer of helper tables, on the source site; `run` until told to stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self._codec = schemas.Codec()
        self._catalog = Catalog(self._connect)

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
        self._p = producer(s, transactional_id=topics.agent_group)
        self._p.init_transactions(60)  # fences a predecessor still running, aborts its open transaction
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
                self._auto_pulls()
                msg = c.poll(0.1)
                if not ok(msg):
                    continue
                with transaction(self._p):
                    if msg.value() is not None:
                        self._handle(msg)
                    topic, partition, offset = where(msg)
                    at = TopicPartition(topic, partition, offset + 1)
                    self._p.send_offsets_to_transaction([at], c.consumer_group_metadata(), 30)
        finally:
            c.close()
            self._auto.close()
            self._registrar.close()
            self._registry.close()
            self._db.close()

    def _answer_registrations(self) -> None:
        """Reply ACCEPTED to the registrations whose signal the capture has read (or after CAPTURE_WAIT_S without).

        A pull or delete whose link changed on the way (`Registrar.register`) gets this reply too, after its own.
        """
        confirmed = self._registrar.confirmed()
        if not confirmed:
            return
        with transaction(self._p):
            for done in confirmed:
                note = (
                    ""
                    if done.seen
                    else " (the capture has not confirmed it yet: is `djlink run --role capture` running?)"
                )
                self._out.reply(done.request_id, "ACCEPTED", message=f"link {done.link_id} registered{note}")

    def _auto_pulls(self) -> None:
        """Pull the new master rows that their link's auto-pull policy approves: one Kafka transaction
        with the offsets of the change events read, as for any message the agent handles."""
        if self._registry.refresh(0) or self._auto.missing:
            self._auto.follow()
        approved = self._auto.take()
        if approved is None:
            return
        with transaction(self._p):
            self._db.ping(reconnect=True)
            for link_id, keys in approved.keys.items():
                link = self._registry.links[link_id]
                requests.pull_or_delete(self._db, self._out, link, f"auto:{uuid.uuid4()}", "PULL", keys)
            self._p.send_offsets_to_transaction(approved.offsets, self._auto.group_metadata(), 30)
        if approved.keys:
            metrics.AUTO_PULLS.inc(sum(len(k) for k in approved.keys.values()))
            log.info("auto-pull: %s", ", ".join(f"{len(k)} new rows of {i}" for i, k in approved.keys.items()))

    def _handle(self, msg: Message) -> None:
        """Decode the message and hand it to its handler; an undecodable one is dead-lettered."""
        try:
            record = self._codec.decode(msg.value() or b"")
        except schemas.DecodeError as exc:
            topic, partition, offset = where(msg)
            self._out.dead_letter(DeadLetter(topic, partition, offset, msg.key(), msg.value(), str(exc), "decode"))
            log.warning("dead-lettered undecodable message %s[%d]@%d: %s", topic, partition, offset, exc)
            return
        self._db.ping(reconnect=True)
        if msg.topic() == self.topics.acks:
            self._ack(record)
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
                requests.pull_or_delete(self._db, self._out, done.link, rid, cmd["kind"], cmd["keys"])
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

    def _ack(self, ack: dict[str, Any]) -> None:
        """An acknowledgement from the applier, for the link it names (read to the links topic's end if new)."""
        self._registry.refresh(0)
        link = self._registry.links.get(ack["link_id"])
        if link is None:
            self._registry.catch_up()
            link = self._registry.links[ack["link_id"]]
        requests.acknowledge(self._db, self._out, link, ack)
        metrics.ACKS.inc()
