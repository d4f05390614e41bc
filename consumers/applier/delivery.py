"""What the applier owes Kafka: dead letters before any offset past them is stored, and its outboxes.

An outbox holds records whose cause is committed at the destination (an
ack with its unit's rows, a flag change with its entity's state) and sends
them until Kafka confirms them, then marks them sent in the state store; a
crash in between sends them again at the next start (their consumers are
idempotent). The acks and the flags topic use the same outbox.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from confluent_kafka import KafkaError, Message

import schemas
from consumers.applier.gathering import Offset
from consumers.applier.metrics import DEAD_LETTERS
from consumers.integrity import EntityKey, EntityState
from foundation.dead_letters import DeadLetter
from foundation.kafka import now_ms, produce

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)


def flag_value(codec: schemas.Codec, key: EntityKey, state: EntityState, source_ts_ms: int) -> bytes | None:
    """What the compacted flags topic says of an entity: a record while it is flagged or deprecated, a tombstone
    (None) once it is neither."""
    if state.flag() == (False, False):
        return None
    record = {
        "link_id": key.link_id,
        "key": key.key,
        "is_flagged": state.is_flagged,
        "is_deprecated": state.is_deprecated,
        "process": state.process.value if state.process is not None else None,
        "source_ts_ms": source_ts_ms,
        "ts_ms": now_ms(),
    }
    return codec.encode(schemas.FIXED["flag"], record)


class DeadLetterUndelivered(Exception):
    """Kafka did not confirm a dead letter: stop before any offset past it is stored."""


class DeadLetters:
    """Produces dead-letter records and makes sure Kafka has them before offsets move past them."""

    def __init__(self, p: Any, topic: str, codec: schemas.Codec) -> None:
        self._p = p
        self._topic = topic
        self._codec = codec
        self._unconfirmed = 0
        self._failures: list[str] = []
        self.sent = 0

    def send(
        self, at: Offset, key: bytes | None, value: bytes | None, reason: str, stage: str, unit_id: str | None = None
    ) -> None:
        data = DeadLetter(at.topic, at.partition, at.offset, key, value, reason, stage, unit_id).encode(self._codec)
        produce(self._p, self._topic, at.topic, data, self._delivered)
        self._unconfirmed += 1
        self.sent += 1
        DEAD_LETTERS.inc()

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        self._unconfirmed -= 1
        if err is not None:
            self._failures.append(str(err))

    def confirm(self, timeout_s: float = 30) -> None:
        """Wait until Kafka has every dead letter sent so far; raise when it does not."""
        if self._unconfirmed == 0 and not self._failures:
            return
        self._p.flush(timeout_s)
        if self._unconfirmed > 0 or self._failures:
            raise DeadLetterUndelivered(
                f"{self._unconfirmed} dead letters unconfirmed after {timeout_s:.0f} s, "
                f"{len(self._failures)} failed ({'; '.join(self._failures[:3])})"
            )


class Outbox(Generic[K]):
    """Records committed at the destination, sent to Kafka until it confirms them; `mark_sent` records that."""

    def __init__(self, what: str, mark_sent: Callable[[list[K]], None]) -> None:
        self._what = what  # for the log: 'acks', 'flag changes'
        self._mark_sent = mark_sent
        self._pending: dict[K, tuple[str, str | bytes, bytes | None]] = {}

    def put(self, item: K, topic: str, key: str | bytes, value: bytes | None) -> None:
        """Owe this record (replacing one owed for the same item: the newest is what counts)."""
        self._pending[item] = (topic, key, value)

    def __len__(self) -> int:
        return len(self._pending)

    def owed(self) -> dict[K, tuple[str, str | bytes, bytes | None]]:
        """What is owed now: item -> (topic, key, value)."""
        return dict(self._pending)

    def send(self, p: Any) -> None:
        """Send everything owed through producer `p`; what Kafka confirms is marked sent and dropped, the rest
        stays for the next round."""
        if not self._pending:
            return
        delivered: list[K] = []

        def confirmed(item: K) -> Callable[[KafkaError | None, Message], None]:
            def callback(err: KafkaError | None, _msg: Message) -> None:
                if err is None:
                    delivered.append(item)

            return callback

        for item, (topic, key, value) in self._pending.items():
            produce(p, topic, key, value, confirmed(item))
        p.flush(30)
        if not delivered:
            log.warning("Kafka confirmed none of %d %s; retrying", len(self._pending), self._what)
            return
        self._mark_sent(delivered)
        for item in delivered:
            self._pending.pop(item, None)
