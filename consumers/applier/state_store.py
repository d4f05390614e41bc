"""The applier's state store: what it has consumed and done, kept in the destination database itself.

The applier's exactly-once guarantee rests on this module: the Kafka offsets
it has consumed up to, the id of every unit it has finished, and the acks it
still owes are written with the SAME destination transaction as the rows a
unit produced, so a crash at any point either keeps all of them or none.

Three tables in the applier's own database on the destination server (its
name is `DJLINK_APPLIER_STATE_DB`, default `djlink_applier`), each keyed by
consumer group so several deployments (topic prefixes) can share one server:

- `offsets`: per partition the next offset to read: a cut that never splits a
  unit and never passes a message of a unit not finished (see
  `gathering.safe_offsets`); the applier seeks every assigned partition here on start
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

- `entities`: per entity of a link, its helper row as last captured (process,
  flags) and whether its rows are at the destination: what mirroring and
  flags are decided on, saved with the unit that changed it. `flag_pending`
  is the outbox of the flags topic, as `ack_pending` is of acks.
- `source_positions`: per MariaDB replication domain, the sequence number of
  the last source transaction applied. Source transactions reach the applier
  in commit order, so one that is not past it was applied before: a replay
  is a no-op without one row per source transaction (which, mirrored, would
  be thousands a second).

Only SQL lives here; transactions are the caller's (every method takes a cursor).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pymysql

from consumers.applier.gathering import Partition
from consumers.integrity import EntityKey, EntityState, HelperRow, Process
from foundation.gtid import parse_gtid
from foundation.sql import chunks, quote

RETENTION_S = 7 * 24 * 3600  # how long a finished unit's id is kept (Kafka's default log.retention.hours)
PRUNE_EVERY_S = 3600.0
PRUNE_BATCH = 10_000
ER_DUP_ENTRY = 1062


class TrackedKey(NamedTuple):
    """One `~external_<store>` row of a source schema: which object it tracks."""

    source_db: str
    store: str
    digest: bytes  # the `hash` column: DataJoint's content UUID of the object


@dataclass(frozen=True)
class Finished:
    """A unit found already finished: how it ended and the ack it still owes (None when sent)."""

    outcome: str
    pending_ack: bytes | None


class StateStore:
    """The applier's tables for one consumer group, through the caller's cursor."""

    def __init__(self, database: str, group: str) -> None:
        self.database = database
        self.group = group
        self._offsets = f"{quote(database)}.`offsets`"
        self._units = f"{quote(database)}.`applied_units`"
        self._entities = f"{quote(database)}.`entities`"
        self._positions = f"{quote(database)}.`source_positions`"
        self._objects = f"{quote(database)}.`tracked_objects`"

    @property
    def tables(self) -> list[tuple[str, str]]:
        """(database, table) of each of its tables."""
        return [
            (self.database, name)
            for name in ("offsets", "applied_units", "entities", "source_positions", "tracked_objects")
        ]

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
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._entities} ("
            "`consumer_group` varchar(255) NOT NULL,"
            " `link_id` varchar(255) NOT NULL,"
            " `key_hash` binary(20) NOT NULL COMMENT 'SHA-1 of entity_key',"
            " `entity_key` text NOT NULL COMMENT 'the primary key, canonical JSON (foundation.keys)',"
            " `process` enum('PULL','DELETE','NONE') NULL COMMENT 'of the helper row; NULL: no helper row',"
            " `is_flagged` enum('TRUE','FALSE') NOT NULL DEFAULT 'FALSE',"
            " `is_deprecated` enum('TRUE','FALSE') NOT NULL DEFAULT 'FALSE',"
            " `at_destination` tinyint(1) NOT NULL DEFAULT 0,"
            " `flag_pending` tinyint(1) NOT NULL DEFAULT 0 COMMENT '1 while the flags topic lacks the change',"
            " `updated_at` timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),"
            " PRIMARY KEY (`consumer_group`, `link_id`, `key_hash`),"
            " KEY `by_flag` (`consumer_group`, `link_id`, `is_flagged`)"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            " COMMENT 'djlink applier: the sharing state of each entity, as the helper table says'"
        )
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._positions} ("
            "`consumer_group` varchar(255) NOT NULL,"
            " `domain_id` int unsigned NOT NULL,"
            " `seq_no` bigint unsigned NOT NULL COMMENT 'of the last source transaction applied',"
            " `gtid` varchar(64) NOT NULL,"
            " PRIMARY KEY (`consumer_group`, `domain_id`)"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            " COMMENT 'djlink applier: how far the source transactions are applied, per replication domain'"
        )

        cur.execute(
            f"CREATE TABLE IF NOT EXISTS {self._objects} ("
            "`consumer_group` varchar(255) NOT NULL,"
            " `source_db` varchar(64) NOT NULL,"
            " `store` varchar(64) NOT NULL,"
            " `hash` binary(16) NOT NULL,"
            " `size` bigint unsigned NOT NULL,"
            " `attachment_name` varchar(255) NULL,"
            " `filepath` varchar(1000) NULL,"
            " `contents_hash` binary(16) NULL,"
            " `timestamp` timestamp NULL,"
            " PRIMARY KEY (`consumer_group`, `source_db`, `store`, `hash`)"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            " COMMENT 'djlink applier: the source stores'' ~external rows as captured'"
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

    def finished_among(self, cur: Any, unit_ids: list[str]) -> dict[str, Finished]:
        """The units of `unit_ids` that finished before, locked until the transaction ends."""
        found: dict[str, Finished] = {}
        for chunk in chunks(unit_ids):
            cur.execute(
                f"SELECT `unit_id`, `outcome`, IF(`ack_pending`, `ack`, NULL) FROM {self._units} "
                f"WHERE `consumer_group`=%s AND `unit_id` IN ({', '.join(['%s'] * len(chunk))}) FOR UPDATE",
                (self.group, *chunk),
            )
            for unit_id, outcome, ack in cur.fetchall():
                found[unit_id] = Finished(outcome, None if ack is None else bytes(ack))
        return found

    def claim_many(self, cur: Any, units: list[tuple[str, str | None, bytes | None]]) -> None:
        """Record (unit id, link id, ack) as applied: units `finished_among` did not find."""
        if units:
            cur.executemany(
                f"INSERT INTO {self._units} (`consumer_group`, `unit_id`, `outcome`, `link_id`, `ack_pending`, `ack`) "
                "VALUES (%s, %s, 'applied', %s, %s, %s)",
                [(self.group, unit_id, link_id, int(ack is not None), ack) for unit_id, link_id, ack in units],
            )

    # -- entities ------------------------------------------------------------------

    _STATE_COLUMNS = "`link_id`, `entity_key`, `process`, `is_flagged`, `is_deprecated`, `at_destination`"

    def load_states(self, cur: Any, keys: Sequence[EntityKey]) -> dict[EntityKey, EntityState]:
        """The states of those of `keys` the store has (an entity it lacks is Unshared and not here)."""
        states: dict[EntityKey, EntityState] = {}
        for chunk in chunks(keys):
            cur.execute(
                f"SELECT {self._STATE_COLUMNS} FROM {self._entities} WHERE `consumer_group`=%s AND "
                f"(`link_id`, `key_hash`) IN ({', '.join(['(%s, %s)'] * len(chunk))})",
                (self.group, *(v for link_id, key in chunk for v in (link_id, key_hash(key)))),
            )
            states.update(_states(cur.fetchall()))
        return states

    def load_flag_pending(self, cur: Any) -> dict[EntityKey, EntityState]:
        """The states of the entities whose flag change the flags topic may lack."""
        cur.execute(
            f"SELECT {self._STATE_COLUMNS} FROM {self._entities} WHERE `consumer_group`=%s AND `flag_pending`=1",
            (self.group,),
        )
        return _states(cur.fetchall())

    def save_entities(
        self, cur: Any, states: Mapping[EntityKey, EntityState], flag_changed: Iterable[EntityKey]
    ) -> None:
        """Write entity states (forgettable ones deleted unless their flag change is unsent)."""
        flagged = set(flag_changed)
        keep = [(k, s) for k, s in states.items() if not s.forgettable() or k in flagged]
        drop = [k for k, s in states.items() if s.forgettable() and k not in flagged]
        if keep:
            cur.executemany(
                f"INSERT INTO {self._entities} (`consumer_group`, `link_id`, `key_hash`, `entity_key`, `process`, "
                "`is_flagged`, `is_deprecated`, `at_destination`, `flag_pending`) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE `process`=VALUES(`process`), "
                "`is_flagged`=VALUES(`is_flagged`), `is_deprecated`=VALUES(`is_deprecated`), "
                "`at_destination`=VALUES(`at_destination`), `flag_pending`=`flag_pending` OR VALUES(`flag_pending`)",
                [
                    (
                        self.group,
                        link_id,
                        key_hash(key),
                        key,
                        s.process.value if s.process is not None else None,
                        _bool(s.is_flagged),
                        _bool(s.is_deprecated),
                        int(s.at_destination),
                        int((link_id, key) in flagged),
                    )
                    for (link_id, key), s in keep
                ],
            )
        self._delete_entities(cur, drop, "")

    def flags_sent(self, cur: Any, entities: Iterable[EntityKey]) -> None:
        """The flags topic has these entities' changes: clear the outbox, forget entities with nothing left."""
        done = list(entities)
        self._on_entities(cur, f"UPDATE {self._entities} SET `flag_pending`=0", done)
        self._delete_entities(cur, done, " AND `process` IS NULL AND `at_destination`=0")

    def _delete_entities(self, cur: Any, entities: list[EntityKey], condition: str) -> None:
        self._on_entities(cur, f"DELETE FROM {self._entities}", entities, condition)

    def _on_entities(self, cur: Any, head: str, entities: Sequence[EntityKey], condition: str = "") -> None:
        """`head` (an UPDATE or DELETE of `entities`) for these (link id, key) pairs, 1,000 at a time."""
        for chunk in chunks(entities):
            cur.execute(
                f"{head} WHERE `consumer_group`=%s AND "
                f"(`link_id`, `key_hash`) IN ({', '.join(['(%s, %s)'] * len(chunk))}){condition}",
                (self.group, *(v for link_id, key in chunk for v in (link_id, key_hash(key)))),
            )

    def flagged(self, cur: Any, link_id: str) -> list[tuple[str, bool]]:
        """(entity key, deprecated) of every flagged entity of a link, as the applier last saw the helper table."""
        cur.execute(
            f"SELECT `entity_key`, `is_deprecated` FROM {self._entities} "
            "WHERE `consumer_group`=%s AND `link_id`=%s AND `is_flagged`='TRUE' ORDER BY `entity_key`",
            (self.group, link_id),
        )
        return [(key, deprecated == "TRUE") for key, deprecated in cur.fetchall()]

    # -- source positions ------------------------------------------------------------

    def load_positions(self, cur: Any) -> dict[int, int]:
        """Per replication domain, the sequence number of the last source transaction applied."""
        cur.execute(f"SELECT `domain_id`, `seq_no` FROM {self._positions} WHERE `consumer_group`=%s", (self.group,))
        return {int(domain): int(seq) for domain, seq in cur.fetchall()}

    def save_positions(self, cur: Any, gtids: Mapping[int, str]) -> None:
        if gtids:
            cur.executemany(
                f"INSERT INTO {self._positions} (`consumer_group`, `domain_id`, `seq_no`, `gtid`) "
                "VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE `seq_no`=VALUES(`seq_no`), `gtid`=VALUES(`gtid`)",
                [(self.group, d, _seq_no(g), g) for d, g in sorted(gtids.items())],
            )

    # -- tracked objects ---------------------------------------------------------------

    def save_tracked(self, cur: Any, rows: Mapping[TrackedKey, Mapping[str, Any] | None]) -> None:
        """Keep the `~external` rows captured ((source db, store, hash) -> row; None: deleted at the source)."""
        gone = [(self.group, *k) for k, row in rows.items() if row is None]
        if gone:
            cur.executemany(
                f"DELETE FROM {self._objects} "
                "WHERE `consumer_group`=%s AND `source_db`=%s AND `store`=%s AND `hash`=%s",
                gone,
            )
        kept = [(k, row) for k, row in rows.items() if row is not None]
        if kept:
            cur.executemany(
                f"REPLACE INTO {self._objects} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        self.group,
                        db,
                        store,
                        digest,
                        row["size"],
                        row.get("attachment_name"),
                        row.get("filepath"),
                        row.get("contents_hash"),
                        row.get("timestamp"),
                    )
                    for (db, store, digest), row in kept
                ],
            )

    def load_tracked(self, cur: Any, key: TrackedKey) -> dict[str, Any] | None:
        """The `~external_<store>` row of an object as last captured, or None."""
        cur.execute(
            f"SELECT `hash`, `size`, `attachment_name`, `filepath`, `contents_hash`, `timestamp` FROM {self._objects} "
            "WHERE `consumer_group`=%s AND `source_db`=%s AND `store`=%s AND `hash`=%s",
            (self.group, *key),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return dict(
            zip(("hash", "size", "attachment_name", "filepath", "contents_hash", "timestamp"), row, strict=True)
        )

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
        for chunk in chunks(list(unit_ids)):
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


def key_hash(entity_key: str) -> bytes:
    return hashlib.sha1(entity_key.encode()).digest()


def _states(rows: Iterable[tuple[Any, ...]]) -> dict[EntityKey, EntityState]:
    states = {}
    for link_id, key, process, flagged, deprecated, here in rows:
        helper = HelperRow(Process(process), flagged == "TRUE", deprecated == "TRUE") if process else None
        states[EntityKey(link_id, key)] = EntityState(helper, bool(here))
    return states


def _bool(value: bool) -> str:
    return "TRUE" if value else "FALSE"


def _seq_no(gtid: str) -> int:
    parsed = parse_gtid(gtid)
    if parsed is None:
        raise ValueError(f"not a MariaDB GTID: {gtid!r}")
    return parsed.seq_no
