"""What the applier has consumed and done, kept in the destination database itself.

The applier's exactly-once guarantee rests on this module: the Kafka offsets
it has consumed up to, the id of every unit it has finished, and the acks it
still owes are written with the SAME destination transaction as the rows a
unit produced, so a crash at any point either keeps all of them or none.

Three tables in the applier's own database on the destination server (its
name is `DJLINK_APPLIER_STATE_DB`, default `djlink_applier`), each keyed by
consumer group so several deployments (topic prefixes) can share one server:

- `offsets`: per partition the next offset to read: a cut that never splits a
  unit and never passes a message of a unit not finished (see
  `safe_offsets`); the applier seeks every assigned partition here on start
  and on every rebalance.
- `applied_units`: one row per finished unit, `outcome` 'applied' or
  'dead-letter'. Inserting it is the first statement of a unit's transaction
  and its primary key refuses a unit finished before, so even a unit read
  again (a finished unit after the cut, offsets restored from an old backup,
  an ambiguous COMMIT retried after a lost connection) is never applied twice. Rows are deleted 7 days after
  their unit (Kafka's default retention: older units cannot come back from
  Kafka anyway), at most once an hour, never while their ack is unsent.
- the ack outbox, as two columns of `applied_units` (`ack_pending`, `ack`):
  the ack to the source agent is stored with the rows and sent after the
  commit; a crash between the commit and its delivery resends it at the next
  start (the agent's handling of acks is idempotent). Without it a crash in
  that window would lose the ack for good, since the unit is never replayed.

Only SQL lives here; transactions are the caller's (every method takes a cursor).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pymysql

from cdc.snapshot import quote
from djlink.config import ConfigError

STATE_DB_ENV = "DJLINK_APPLIER_STATE_DB"
DEFAULT_STATE_DB = "djlink_applier"
RETENTION_S = 7 * 24 * 3600  # how long a finished unit's id is kept (Kafka's default log.retention.hours)
PRUNE_EVERY_S = 3600.0
PRUNE_BATCH = 10_000
ER_DUP_ENTRY = 1062

Partition = tuple[str, int]  # topic, partition
Offset = tuple[str, int, int]  # topic, partition, offset


def state_db_name(env: Mapping[str, str] | None = None) -> str:
    """The applier's database on the destination server: DJLINK_APPLIER_STATE_DB or `djlink_applier`."""
    env = os.environ if env is None else env
    name = env.get(STATE_DB_ENV) or DEFAULT_STATE_DB
    if not re.fullmatch(r"[A-Za-z0-9_$]{1,64}", name):
        raise ConfigError(f"{STATE_DB_ENV} must be a plain database name (letters, digits, _ and $), not {name!r}")
    return name


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
        if unit.finished and unit.end is not None and unit.end < first:
            continue  # in the finished prefix
        for topic, partition, offset in unit.offsets:
            key = (topic, partition)
            floor[key] = min(offset, floor.get(key, offset))
    return {key: min(next_offset, floor.get(key, next_offset)) for key, next_offset in consumed.items()}


def changed(offsets: Mapping[Partition, int], stored: Mapping[Partition, int]) -> dict[Partition, int]:
    """The offsets that differ from what is stored."""
    return {key: value for key, value in offsets.items() if stored.get(key) != value}


@dataclass(frozen=True)
class Finished:
    """A unit found already finished: how it ended and the ack it still owes (None when sent)."""

    outcome: str
    pending_ack: bytes | None


class OffsetsStore:
    """The applier's tables for one consumer group, through the caller's cursor."""

    def __init__(self, database: str, group: str) -> None:
        self.database = database
        self.group = group
        self._offsets = f"{quote(database)}.`offsets`"
        self._units = f"{quote(database)}.`applied_units`"

    def ensure(self, cur: Any) -> None:
        """Create the database and tables when missing."""
        cur.execute(f"CREATE DATABASE IF NOT EXISTS {quote(self.database)}")
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._offsets} ("
            "`consumer_group` varchar(255) NOT NULL,"
            " `topic` varchar(255) NOT NULL,"
            " `partition` int NOT NULL,"
            " `next_offset` bigint NOT NULL COMMENT 'the next offset to read',"
            " `updated_at` timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),"
            " PRIMARY KEY (`consumer_group`, `topic`, `partition`)"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            " COMMENT 'djlink applier: consumed Kafka offsets, written with the rows they produced'"
        )
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._units} ("
            "`consumer_group` varchar(255) NOT NULL,"
            " `unit_id` varchar(255) NOT NULL COMMENT 'source GTID or snapshot:<uuid>',"
            " `outcome` enum('applied','dead-letter') NOT NULL,"
            " `link_id` varchar(255) NULL,"
            " `applied_at` timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),"
            " `ack_pending` tinyint(1) NOT NULL DEFAULT 0 COMMENT '1 while the ack to the agent is unsent',"
            " `ack` longblob NULL COMMENT 'the ack (Avro) while unsent',"
            " PRIMARY KEY (`consumer_group`, `unit_id`),"
            " KEY `by_age` (`consumer_group`, `applied_at`),"
            " KEY `by_ack` (`consumer_group`, `ack_pending`)"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            " COMMENT 'djlink applier: every finished unit, so none is applied twice; outbox of acks'"
        )

    def load_offsets(self, cur: Any) -> dict[Partition, int]:
        cur.execute(
            f"SELECT `topic`, `partition`, `next_offset` FROM {self._offsets} WHERE `consumer_group`=%s", (self.group,)
        )
        return {(topic, int(partition)): int(offset) for topic, partition, offset in cur.fetchall()}

    def save_offsets(self, cur: Any, offsets: Mapping[Partition, int]) -> None:
        if not offsets:
            return
        cur.executemany(
            f"INSERT INTO {self._offsets} (`consumer_group`, `topic`, `partition`, `next_offset`) "
            "VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE `next_offset`=VALUES(`next_offset`)",
            [(self.group, topic, partition, offset) for (topic, partition), offset in sorted(offsets.items())],
        )

    def claim(
        self, cur: Any, unit_id: str, outcome: str, link_id: str | None, ack: bytes | None = None
    ) -> Finished | None:
        """Record a unit as finished; None when it is new, else how it had finished before.

        Meant as the first statement of the unit's transaction: a unit that
        had finished is then left alone (the failed INSERT changes nothing).
        """
        try:
            cur.execute(
                f"INSERT INTO {self._units} (`consumer_group`, `unit_id`, `outcome`, `link_id`, `ack_pending`, `ack`) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (self.group, unit_id, outcome, link_id, int(ack is not None), ack),
            )
            return None
        except pymysql.err.IntegrityError as exc:
            if exc.args[0] != ER_DUP_ENTRY:
                raise
        cur.execute(
            f"SELECT `outcome`, IF(`ack_pending`, `ack`, NULL) FROM {self._units} "
            "WHERE `consumer_group`=%s AND `unit_id`=%s",
            (self.group, unit_id),
        )
        found, ack_bytes = cur.fetchone()
        return Finished(found, None if ack_bytes is None else bytes(ack_bytes))

    def outcome(self, cur: Any, unit_id: str) -> str | None:
        """How a unit finished ('applied', 'dead-letter'), or None when it has not."""
        cur.execute(
            f"SELECT `outcome` FROM {self._units} WHERE `consumer_group`=%s AND `unit_id`=%s", (self.group, unit_id)
        )
        row = cur.fetchone()
        return None if row is None else str(row[0])

    def unsent_acks(self, cur: Any) -> list[tuple[str, str, bytes]]:
        """(unit id, link id, ack) of every committed unit whose ack Kafka has not confirmed."""
        cur.execute(
            f"SELECT `unit_id`, `link_id`, `ack` FROM {self._units} "
            "WHERE `consumer_group`=%s AND `ack_pending`=1 ORDER BY `applied_at`",
            (self.group,),
        )
        return [(unit_id, link_id, bytes(ack)) for unit_id, link_id, ack in cur.fetchall()]

    def acks_sent(self, cur: Any, unit_ids: Iterable[str]) -> None:
        ids = list(unit_ids)
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            cur.execute(
                f"UPDATE {self._units} SET `ack_pending`=0, `ack`=NULL "
                f"WHERE `consumer_group`=%s AND `unit_id` IN ({', '.join(['%s'] * len(chunk))})",
                (self.group, *chunk),
            )

    def prune(self, cur: Any, retention_s: int = RETENTION_S) -> int:
        """Forget units finished more than `retention_s` ago whose ack is sent; how many were forgotten."""
        cur.execute(
            f"DELETE FROM {self._units} WHERE `consumer_group`=%s AND `ack_pending`=0 "
            "AND `applied_at` < CURRENT_TIMESTAMP(3) - INTERVAL %s SECOND LIMIT %s",
            (self.group, retention_s, PRUNE_BATCH),
        )
        return int(cur.rowcount)
