"""`djlink status`: where the capture and the applier are, read from Kafka alone (it runs anywhere).

The capture's position is its checkpoint (`<prefix>.capture-offsets`); the applier's is what it commits to its
consumer group for monitoring (its exactly-once offsets live in the destination database, which a site
without destination credentials cannot read), against the end of each partition it follows.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import TopicPartition

from cdc.offsets import OffsetContext
from consumers.applier.routing import Routes
from foundation.config import Settings
from foundation.kafka import admin_client, consumer
from foundation.links import LinkRegistry
from foundation.topics import Topics


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # the applier's next offset; None: it has committed none there yet
    end: int  # the partition's end (last stable offset for read_committed)

    @property
    def lag(self) -> int:
        """Messages (events, ENDs and commit markers) the applier has not consumed yet."""
        return max(0, self.end - (self.committed or 0))


@dataclass
class Status:
    prefix: str
    capture_group: str
    capture_gtid: str | None = None  # None: no checkpoint yet
    capture_binlog: str | None = None
    capture_source_commit: str | None = None
    applier_group: str = ""
    links: int = 0
    applier: list[PartitionLag] = field(default_factory=list)

    @property
    def applier_lag(self) -> int:
        return sum(p.lag for p in self.applier)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["applier"] = [{**asdict(p), "lag": p.lag} for p in self.applier]
        out["applier_lag"] = self.applier_lag
        return out

    def lines(self) -> list[str]:
        if self.capture_gtid is None:
            lines = [f"capture {self.capture_group}: no checkpoint yet (it has never run on this prefix)"]
        else:
            lines = [
                f"capture {self.capture_group}: committed up to GTID {self.capture_gtid or '(start)'}",
                f"  binlog {self.capture_binlog}, source commit time {self.capture_source_commit or '-'}",
            ]
        if not self.links:
            lines.append(f"applier {self.applier_group}: no links on this prefix yet")
            return lines
        lines.append(
            f"applier {self.applier_group}: {self.applier_lag} messages behind on {len(self.applier)} partitions"
        )
        for p in sorted(self.applier, key=lambda p: (-p.lag, p.topic, p.partition)):
            if p.lag:
                lines.append(f"  {p.topic}[{p.partition}]: {p.lag} behind (at {p.committed}, end {p.end})")
        return lines


def read(settings: Settings) -> Status:
    topics = Topics(settings.topic_prefix)
    status = Status(topics.prefix, topics.capture_group, applier_group=topics.applier_group)
    checkpoint = OffsetContext(settings, topics, topics.capture_group).load()
    if checkpoint is not None:
        status.capture_gtid = checkpoint.gtid_position or ""
        status.capture_binlog = f"{checkpoint.file or '-'}:{checkpoint.pos}"
        if checkpoint.ts_ms:
            at = dt.datetime.fromtimestamp(checkpoint.ts_ms / 1000, dt.UTC)
            status.capture_source_commit = at.isoformat(timespec="seconds")
    links = {}
    if topics.links in admin_client(settings).list_topics(timeout=10).topics:  # not there before a link was made
        registry = LinkRegistry(settings, topics)
        try:
            registry.catch_up()
            links = dict(registry.links)
        finally:
            registry.close()
    status.links = len(links)
    if not links:
        return status
    c = consumer(settings, topics.applier_group)  # assigns nothing: reads the group's committed offsets only
    try:
        metadata = c.list_topics(timeout=10).topics
        partitions = [
            TopicPartition(topic, number)
            for topic in Routes.of(links, topics).topics(topics.transaction)
            if topic in metadata and metadata[topic].error is None
            for number in sorted(metadata[topic].partitions)
        ]
        committed = c.committed(partitions, timeout=10) if partitions else []
        for tp in committed:
            _, end = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            status.applier.append(PartitionLag(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else None, end))
    finally:
        c.close()
    return status
