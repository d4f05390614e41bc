"""Dead-letter records: a message djlink could not decode or apply, with its original bytes and the reason.

Every component that gives a message up builds its record here (schema
`schemas/dead_letter.avsc`), keyed by the original topic, so that
`djlink dead-letters` reads them all alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import schemas
from foundation.kafka import now_ms


@dataclass(frozen=True)
class DeadLetter:
    """One message given up: where it was, its bytes, why, and at which stage (decode, apply, gather)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    stage: str
    unit_id: str | None = None

    def encode(self, codec: schemas.Codec) -> bytes:
        """The record's value on the dead-letter topic (its key is `self.topic`)."""
        record = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "value": self.value,
            "reason": self.reason,
            "stage": self.stage,
            "unit_id": self.unit_id,
            "ts_ms": now_ms(),
        }
        return codec.encode(schemas.FIXED["dead_letter"], record)
