"""What went to the dead-letter topic, for people: `djlink dead-letters`.

The applier dead-letters a message it cannot decode (stage 'decode'), every
event of a unit the destination refused ('apply'), and events whose unit never
completed ('gather'); see `schemas/dead_letter.avsc`. The topic holds the
original bytes and the reason. This module reads it with Kafka alone and
tells, one line per message or unit, when, what and why, and what to do.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import schemas
from foundation.config import Settings
from foundation.gtid import parse_gtid
from foundation.kafka import admin_client, read_to_end
from foundation.topics import Topics

ADVICE = {
    "decode": "decode: not a readable djlink event; see who produced it to that topic (its bytes: --json)",
    "snapshot": "snapshot: the read of a pull or delete; its entities stayed as they were; "
    "once the cause in the reason is fixed, pull (or delete) them again",
    "transaction": "transaction: a source transaction; the changes it carried for shared entities are missing at the "
    "destination; to bring those entities up to date, delete them there and pull them again "
    "(DataJoint's delete also takes the rows that depend on them)",
}


def kind(unit_id: str | None) -> str:
    """'decode' (a message without a unit), 'transaction' (a source transaction, GTID `d-s-n`) or 'snapshot'."""
    if unit_id is None:
        return "decode"
    return "transaction" if parse_gtid(unit_id) is not None else "snapshot"


@dataclass
class Entry:
    """One line of the report: an undecodable message, or a unit with all its dead-lettered events."""

    stage: str
    first_ms: int
    reason: str
    unit_id: str | None = None
    where: str = ""  # topic[partition]@offset of an undecodable message
    tables: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        when = dt.datetime.fromtimestamp(self.first_ms / 1000, dt.UTC).isoformat(timespec="seconds")
        if self.unit_id is None:
            what = self.where
        else:
            events = sum(self.tables.values())
            counts = ", ".join(f"{t} {n}" for t, n in sorted(self.tables.items()))
            what = f"{kind(self.unit_id)} {self.unit_id} ({events} event{'s' if events != 1 else ''}: {counts})"
        return f"{when}  {self.stage:<6}  {what}: {self.reason}"


def summarize(records: Iterable[dict[str, Any]]) -> list[Entry]:
    """Group dead-letter records: one entry per unit (and stage), one per message without a unit; oldest first.

    Delivery of dead letters is at least once: a record repeated by a crash (same topic, partition and
    offset) counts once.
    """
    entries: dict[tuple[str, str], Entry] = {}
    seen: set[tuple[str, int, int]] = set()
    for r in records:
        at = (r["topic"], r["partition"], r["offset"])
        if at in seen:
            continue
        seen.add(at)
        where = f"{r['topic']}[{r['partition']}]@{r['offset']}"
        group = (r["stage"], r["unit_id"] if r["unit_id"] is not None else where)
        entry = entries.get(group)
        if entry is None:
            entry = entries[group] = Entry(r["stage"], r["ts_ms"], r["reason"], r["unit_id"], where)
        entry.tables[r["topic"]] += 1
    return sorted(entries.values(), key=lambda e: e.first_ms)


def report(entries: list[Entry], topic: str) -> Iterator[str]:
    """The report's lines: a count, one line per entry, then what to do for each kind present."""
    if not entries:
        yield f"no dead letters on {topic}"
        return
    yield f"{len(entries)} dead-lettered unit(s) or message(s) on {topic}:"
    yield from (e.line() for e in entries)
    yield from (ADVICE[k] for k in sorted({kind(e.unit_id) for e in entries}))


def as_json(record: dict[str, Any]) -> str:
    """A record as one JSON line, its original key and value in base64."""
    plain = {k: v for k, v in record.items() if k not in ("key", "value")}
    for k in ("key", "value"):
        plain[k] = base64.b64encode(record[k]).decode() if record[k] is not None else None
    return json.dumps(plain, sort_keys=True)


def read(settings: Settings) -> tuple[str, list[dict[str, Any]]]:
    """The dead-letter topic's name and every record on it (none when the topic does not exist yet)."""
    topic = Topics(settings.topic_prefix).dead_letter
    metadata = admin_client(settings).list_topics(timeout=10)
    if topic not in metadata.topics:
        return topic, []
    codec = schemas.Codec()
    return topic, [codec.decode(m.value()) for m in read_to_end(settings, topic)]
