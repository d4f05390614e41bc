"""What the applier reports about itself, as Prometheus metrics (served on DJLINK_METRICS_PORT when set)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

UNITS = Counter("djlink_applier_units", "Units the applier finished, by how", ["outcome"])
ENTITIES = Counter("djlink_applier_entities", "Entities of processing units, by what was done with them", ["outcome"])
BATCH_UNITS = Histogram(
    "djlink_applier_batch_units", "Units per destination transaction", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500)
)
HELD_BYTES = Gauge("djlink_applier_held_bytes", "Bytes of events gathered, not applied yet (about, decoded)")
NARROWED = Counter("djlink_applier_reading_narrowed", "Times it read only what the unit all others wait for needs")
COMMIT_SECONDS = Histogram("djlink_applier_commit_seconds", "Time of a batch's destination transaction")
LAG_MS = Gauge(
    "djlink_applier_lag_ms", "How long ago the capture produced the last unit the applier finished, ms (0: idle)"
)
PENDING_UNITS = Gauge("djlink_applier_pending_units", "Units being gathered (events read, not applied yet)")
DEAD_LETTERS = Counter("djlink_applier_dead_letters", "Messages given up on the dead-letter topic")
OBJECTS = Counter("djlink_applier_objects_copied", "External objects copied to the destination store and verified")
OBJECT_BYTES = Counter("djlink_applier_object_bytes", "Bytes of the external objects copied")

ACK_OUTCOMES = {"keys": "arrived", "deleted": "deleted", "deprecate": "deprecated", "skipped": "skipped"}


def finished(outcome: str, count: int = 1) -> None:
    """`count` units finished: applied, mirrored, skipped or dead_lettered."""
    UNITS.labels(outcome).inc(count)


def acknowledged(ack: dict[str, object]) -> None:
    """A processing unit's entities, by their outcome (arrived, deleted, deprecated, skipped, failed)."""
    for field, outcome in (*ACK_OUTCOMES.items(), ("failed", "failed")):
        entries = ack.get(field) or []
        if isinstance(entries, list) and entries:
            ENTITIES.labels(outcome).inc(len(entries))


def behind(end_ts_ms: int) -> None:
    """The capture produced the unit just finished at `end_ts_ms` (its END's Kafka timestamp)."""
    LAG_MS.set(max(0.0, time.time() * 1000 - end_ts_ms) if end_ts_ms else 0.0)
