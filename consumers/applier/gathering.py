"""Gathering: a unit's events, from several topics, until its END says it is complete; and where a restart resumes.

A unit is one source transaction or one snapshot chunk. The capture writes
its change events (one per row, on each table's topic) and then its END
(on the transaction topic, with an event count per table) in one Kafka
transaction, so a `read_committed` consumer sees all of them or none; but it
reads them from several partitions, in no particular interleaving. A unit is
complete once every tracked table's count is met.

The offsets stored with each destination commit are a cut that never splits
a unit and never passes a message of an unfinished unit (`safe_offsets`), so
a restart reads every unit either not at all or whole.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from confluent_kafka import Message

Partition = tuple[str, int]  # (topic, partition): a key of offset maps, as confluent-kafka's TopicPartition names it


class Offset(NamedTuple):
    """Where one message sits."""

    topic: str
    partition: int
    offset: int

    @property
    def at(self) -> Partition:
        return (self.topic, self.partition)


def kafka_ts(msg: Message) -> int:
    """A message's Kafka timestamp (producer's create time), ms since epoch; 0 when it has none."""
    _kind, ts = msg.timestamp()
    return int(ts) if ts is not None and ts > 0 else 0


@dataclass(frozen=True)
class Event:
    """One change event of a unit, decoded, with its original bytes (for the dead-letter topic)."""

    collection: str  # 'db.table'
    envelope: dict[str, Any]
    convert: dict[str, Any]  # the value schema's converters of row images (schemas.tables.EnvelopeReader)
    key: bytes | None
    value: bytes | None
    ts_ms: int  # the message's Kafka timestamp


@dataclass
class PendingUnit:
    """The events of one unit seen so far, and its END once it arrives."""

    end: dict[str, Any] | None = None
    end_offset: Offset | None = None
    end_ts_ms: int = 0  # the END's Kafka timestamp
    events: dict[Offset, Event] = field(default_factory=dict)
    have: Counter[str] = field(default_factory=Counter)  # events per collection, kept with `events`
    size: int = 0  # bytes of the events' values, kept with `events`

    def add(self, at: Offset, event: Event) -> None:
        if at not in self.events:
            self.have[event.collection] += 1
            self.size += len(event.value or b"")
        self.events[at] = event

    def missing(self, tracked: frozenset[str]) -> dict[str, tuple[int, int]]:
        """Per tracked collection whose count the END names but whose events have not all come: (have, expected)."""
        assert self.end is not None
        return {
            dc["data_collection"]: (self.have[dc["data_collection"]], dc["event_count"])
            for dc in self.end["data_collections"] or []
            if dc["data_collection"] in tracked and self.have[dc["data_collection"]] < dc["event_count"]
        }

    def complete(self, tracked: frozenset[str]) -> bool:
        return self.end is not None and not self.missing(tracked)

    def concerns(self, tracked: frozenset[str]) -> bool:
        """Whether the END names a tracked collection: a unit of ours, not only of other links' tables."""
        assert self.end is not None
        return any(dc["data_collection"] in tracked for dc in self.end["data_collections"] or [])

    def offsets(self) -> list[Offset]:
        return list(self.events) + ([self.end_offset] if self.end_offset else [])

    def where(self, finished: bool) -> UnitOffsets:
        return UnitOffsets(self.end_offset.offset if self.end_offset else None, tuple(self.offsets()), finished)


@dataclass(frozen=True)
class UnitOffsets:
    """Where one unit's messages sit: what `safe_offsets` needs to know of it."""

    end: int | None  # offset of its END on the transaction topic; None while not seen
    offsets: tuple[Offset, ...]  # every message of the unit seen so far (events and END)
    finished: bool  # applied, skipped, dead-lettered or not ours: nothing left to do


def cutoff(units: Iterable[UnitOffsets]) -> float | None:
    """The END offset of the first unfinished unit (inf when none of them has its END yet; None: none unfinished).

    Units are produced one after another by one producer, so on every
    partition the messages of a unit precede those of every later unit, and
    the order of their ENDs on the (single-partition) transaction topic is
    their order. A unit whose END is not seen yet comes after every unit
    whose END is.
    """
    ends = [math.inf if u.end is None else u.end for u in units if not u.finished]
    return min(ends) if ends else None


def safe_offsets(consumed: Mapping[Partition, int], units: Iterable[UnitOffsets]) -> dict[Partition, int]:
    """Per partition, the next offset a restart may resume at: a cut that splits no unit.

    `consumed` is the next offset after the last message taken from each
    partition. Every unit before the first unfinished one (the finished
    prefix) lies wholly behind the cut; that unit and every later one, also
    finished ones, wholly at or after it: read again, a finished unit is
    skipped whole (its id is in `applied_units`, or it is not ours), never
    met by its END without its events or the other way round. Per-partition
    floors alone would not do: a finished unit's events could fall behind
    the cut while its END, held back by an earlier unfinished unit, did not.
    """
    units = list(units)
    first = cutoff(units)
    if first is None:
        return dict(consumed)
    floor: dict[Partition, int] = {}
    for unit in units:
        if unit.finished and (unit.end is None or unit.end < first):
            # In the finished prefix; or a finished unit without an END (a stray given up): nothing of it is
            # on the transaction topic to be met again without its events, so it holds no partition back.
            continue
        for topic, partition, offset in unit.offsets:
            key = (topic, partition)
            floor[key] = min(offset, floor.get(key, offset))
    return {key: min(next_offset, floor.get(key, next_offset)) for key, next_offset in consumed.items()}


def changed(offsets: Mapping[Partition, int], stored: Mapping[Partition, int]) -> dict[Partition, int]:
    """The offsets that differ from what is stored."""
    return {key: value for key, value in offsets.items() if stored.get(key) != value}


def read_past(
    partitions: list[Partition],
    end_ts_ms: int,
    read_ts: Mapping[Partition, int],
    consumed: Mapping[Partition, int],
    high: Callable[[Partition], int],
) -> bool:
    """Whether each partition that could still hold a unit's missing events has been read past the unit.

    Past: a message produced after the unit's END (Kafka timestamp
    `end_ts_ms`) was read there, since the capture produces a unit's events
    before its END; or the partition is read to its end (`high`: its high
    watermark as last fetched, negative when unknown). Only then are the
    events missing rather than late: catching up a backlog reads the
    transaction topic far ahead of the change topics.
    """
    for partition in partitions:
        if read_ts.get(partition, -1) > end_ts_ms:
            continue
        end = high(partition)
        if end < 0 or consumed.get(partition, 0) < end:
            return False
    return True


class Gathering:
    """The units being gathered and the finished ones a restart may still read again; what has been consumed."""

    def __init__(self) -> None:
        self.pending: dict[str, PendingUnit] = {}
        self._finished: dict[str, UnitOffsets] = {}
        self.consumed: dict[Partition, int] = {}  # next offset after the last message taken, per partition
        self.read_ts: dict[Partition, int] = {}  # Kafka timestamp of the last message read, per partition
        self.latest_end_ms = 0  # Kafka timestamp of the newest END read

    def read(self, at: Offset, ts_ms: int) -> None:
        """A message was taken from `at` (whatever it turns out to be)."""
        self.consumed[at.at] = at.offset + 1
        self.read_ts[at.at] = ts_ms

    def unit(self, unit_id: str) -> PendingUnit:
        """The unit being gathered under this id, new if none (not setdefault: a PendingUnit per event)."""
        unit = self.pending.get(unit_id)
        if unit is None:
            unit = self.pending[unit_id] = PendingUnit()
        return unit

    def end(self, unit_id: str, record: dict[str, Any], at: Offset, ts_ms: int) -> None:
        self.latest_end_ms = max(self.latest_end_ms, ts_ms)
        unit = self.unit(unit_id)
        unit.end, unit.end_offset, unit.end_ts_ms = record, at, ts_ms

    def held(self) -> tuple[int, int]:
        """Events and bytes gathered and not applied yet."""
        units = self.pending.values()
        return sum(len(u.events) for u in units), sum(u.size for u in units)

    def ended(self) -> list[str]:
        """Ids of the units whose END has come, in the order they were produced."""
        ends = sorted((u.end_offset.offset, unit_id) for unit_id, u in self.pending.items() if u.end_offset)
        return [unit_id for _, unit_id in ends]

    def orphans(self, older_than_ms: int) -> list[str]:
        """Units without an END whose newest event is `older_than_ms` older than the newest END read."""
        return [
            unit_id
            for unit_id, unit in self.pending.items()
            if unit.end is None
            and unit.events
            and self.latest_end_ms - max(e.ts_ms for e in unit.events.values()) > older_than_ms
        ]

    def finish(self, unit_id: str) -> PendingUnit:
        """Take a unit out of the gathering; its offsets may now move on (see `safe_offsets`)."""
        unit = self.pending.pop(unit_id)
        self._finished[unit_id] = unit.where(finished=True)
        return unit

    def safe_offsets(self) -> dict[Partition, int]:
        """The cut a restart may resume at now (see `safe_offsets`)."""
        units = [u.where(finished=False) for u in self.pending.values()] + list(self._finished.values())
        first = cutoff(units)
        # Finished units wholly behind the first unfinished one are behind every future cut: forget them.
        for unit_id, unit in list(self._finished.items()):
            if first is None or unit.end is None or unit.end < first:
                del self._finished[unit_id]
        return safe_offsets(self.consumed, units)
