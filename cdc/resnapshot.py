"""Recovery from a purged binlog: the capture starts again from the source's current position, and every entity
the links share is read again, so the destination catches up with what the lost part of the binlog held.

`djlink resnapshot` runs this while the capture is stopped (docs/faults.md).
In ONE Kafka transaction, under the capture's own transactional id (which
fences a capture still running and aborts what it left open), it writes

- a snapshot signal per chunk of helper-table keys of each link, as the
  source agent's signals for a pull are written: the capture serves them
  when it starts again, each chunk read in one consistent read and placed in
  the stream where its position says (cdc.placement), and the applier
  processes each entity as its helper row then says. A Shared or Tainted
  entity is written again whole, its part rows that the source no longer has
  removed (consumers.applier.planning); an interrupted pull or delete
  completes; a flag set meanwhile reaches the destination with its helper row;
- a checkpoint at the source server's current GTID position, so the capture
  reads on from there, not from the position the server no longer has.

Nothing is written at either database. Running it twice reads the entities twice, which changes nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import schemas
from cdc.offsets import Checkpoint, OffsetContext
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.kafka import Transactional, now_ms, produce
from foundation.links import LinkSpec, snapshot_signal
from foundation.sql import chunks, quote
from foundation.topics import Admin, Topics

log = logging.getLogger(__name__)
SIGNAL_KEYS = 10_000  # keys per snapshot signal (a signal record stays well under Kafka's 1 MB message limit)


@dataclass(frozen=True)
class Resnapshot:
    """What `resnapshot` asked for: the new start position and the entities to read again, per link id."""

    request_id: str
    gtid_position: str
    entities: dict[str, int]


def helper_keys(settings: Settings, link: LinkSpec) -> list[str]:
    """The keys of every entity the link's helper table names, in key order."""
    pk = list(link.primary_key)
    conn = settings.source.connect(utc=True)
    try:
        with conn.cursor() as cur:
            columns = ", ".join(quote(c) for c in pk)
            cur.execute(f"SELECT {columns} FROM {quote(link.helper_db)}.{quote(link.helper_table)} ORDER BY {columns}")
            return [keycodec.encode(dict(zip(pk, row, strict=True)), pk) for row in cur.fetchall()]
    finally:
        conn.close()


def current_position(settings: Settings) -> str:
    """The source server's GTID position now (where a capture started now would read on from)."""
    conn = settings.source.connect(utc=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@gtid_binlog_pos")
            return str(cur.fetchone()[0] or "")
    finally:
        conn.close()


def resnapshot(settings: Settings, links: Sequence[LinkSpec]) -> Resnapshot:
    """Move the capture's checkpoint to the source's current position and signal a read of every shared entity."""
    topics = Topics(settings.topic_prefix)
    Admin(settings).ensure_control(topics)
    # The position first, then the keys: an entity whose helper row appears in between is in the stream after it.
    position = current_position(settings)
    keys = {link.link_id: helper_keys(settings, link) for link in links}
    request_id = f"resnapshot:{uuid.uuid4()}"
    name = topics.capture_group
    txn = Transactional(settings, name, "capture")  # fences a capture still running with this id
    codec = schemas.Codec()
    p = txn.ready()
    p.begin_transaction()
    try:
        for link in links:
            for n, chunk in enumerate(chunks(keys[link.link_id], SIGNAL_KEYS)):
                signal = snapshot_signal(link, list(chunk), request_id, f"{request_id}:{link.link_id}:{n}")
                produce(p, topics.signals, link.link_id, codec.encode(schemas.FIXED["signal"], signal))
        OffsetContext(settings, topics, name).record(p, Checkpoint(position, ts_ms=now_ms()))
        p.commit_transaction()
    except BaseException:
        p.abort_transaction()
        raise
    finally:
        p.flush(10)
    done = Resnapshot(request_id, position, {link_id: len(k) for link_id, k in keys.items()})
    log.info("resnapshot %s: capture to resume at %r, %s", request_id, position, done.entities)
    return done
