"""The offset context: where the capture resumes reading the binlog.

A checkpoint is a record on the compacted `<prefix>.capture-offsets` topic,
written in the SAME Kafka transaction as the events of the source
transactions it covers (Kafka Connect's exactly-once source design, KIP-618),
and only on transaction boundaries. After a crash, `init_transactions`
aborts whatever the dead capture had open, and the last committed checkpoint
is exactly where the committed events end.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import Producer

import schemas
from foundation.config import Settings
from foundation.kafka import now_ms, produce, read_to_end
from foundation.topics import Topics


@dataclass(frozen=True)
class Checkpoint:
    gtid_position: str
    file: str = ""
    pos: int = 0
    ts_ms: int = 0


class OffsetContext:
    def __init__(self, settings: Settings, topics: Topics, name: str) -> None:
        self._settings = settings
        self._topic = topics.capture_offsets
        self.name = name
        self._codec = schemas.Codec()

    def load(self, timeout_s: float = 30) -> Checkpoint | None:
        """The last committed checkpoint of this capture, or None.

        Call after the producer's `init_transactions`: that aborts a crashed
        predecessor's open transaction, which would otherwise hold back what a
        read_committed reader can see.
        """
        found: Checkpoint | None = None
        for msg in read_to_end(self._settings, self._topic, timeout_s):
            if msg.key() == self.name.encode() and msg.value() is not None:
                r = self._codec.decode(msg.value())
                found = Checkpoint(r["gtid_position"], r["file"], r["pos"], r["ts_ms"])
        return found

    def load_snapshots(self) -> dict[str, tuple[str | None, bool]]:
        """Initial snapshot progress per link id: (last key published, done)."""
        prefix = f"{self.name}/snapshot/".encode()
        found: dict[str, tuple[str | None, bool]] = {}
        for msg in read_to_end(self._settings, self._topic):
            key = msg.key()
            if key is not None and key.startswith(prefix) and msg.value() is not None:
                r = self._codec.decode(msg.value())
                found[r["link_id"]] = (r["last_key"], r["done"])
        return found

    def record_snapshot(self, p: Producer, link_id: str, last_key: str | None, done: bool) -> None:
        """Produce initial snapshot progress inside the caller's open Kafka transaction."""
        value = {"capture": self.name, "link_id": link_id, "last_key": last_key, "done": done, "ts_ms": now_ms()}
        key = f"{self.name}/snapshot/{link_id}"
        produce(p, self._topic, key, self._codec.encode(schemas.FIXED["snapshot_progress"], value))

    def record(self, p: Producer, checkpoint: Checkpoint) -> None:
        """Produce the checkpoint inside the caller's open Kafka transaction."""
        value = {
            "capture": self.name,
            "gtid_position": checkpoint.gtid_position,
            "file": checkpoint.file,
            "pos": checkpoint.pos,
            "ts_ms": checkpoint.ts_ms,
        }
        produce(p, self._topic, self.name, self._codec.encode(schemas.FIXED["checkpoint"], value))
