"""The helper-table gateway: the one place where the SQL of datajoint-link's helper tables lives.

The agent is the only writer of helper tables. What it writes is decided
elsewhere, without SQL (`consumers.integrity`: `decide_pull`,
`decide_delete`, `Action.helper_after`, `ACK_RULES`); this module turns
those decisions into statements over one connection (a DictCursor) for one
link. It never commits: the caller owns the transaction, so that the helper
rows it locks stay locked until everything the request writes is written.
Statements that name keys are cut into chunks (`foundation.sql.chunks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pymysql

from consumers.agent.errors import Refused
from consumers.integrity import ACK_RULES, NEW_HELPER_ROW, Acked, AckRule, HelperRow, Process
from foundation import keys as keycodec
from foundation.links import LinkSpec
from foundation.sql import chunks, in_clause, quote, table_name

Statement = tuple[str, list[Any]]  # SQL text and its parameters


def keyed_statements(
    head: str,
    primary_key: Sequence[str],
    key_texts: Sequence[str],
    params: Sequence[Any] = (),
    tail: str = "",
    tail_params: Sequence[Any] = (),
) -> Iterator[Statement]:
    """`head` (ending in WHERE) naming the entities `key_texts`, one statement per chunk of keys; `tail` follows."""
    for chunk in chunks(key_texts):
        keys = [keycodec.decode(k) for k in chunk]
        yield (
            f"{head} {in_clause(primary_key, len(keys))}{tail}",
            [*params, *(k[c] for k in keys for c in primary_key), *tail_params],
        )


def ack_statements(link: LinkSpec, rule: AckRule, key_texts: Sequence[str]) -> list[Statement]:
    """One acknowledgement rule (consumers.integrity.ACK_RULES) as one guarded statement per chunk of keys.

    The guard is in the WHERE clause: a helper row not in the state the rule
    expects is left alone, so a repeated or stale acknowledgement changes nothing.
    """
    helper = table_name(link.helper_db, link.helper_table)
    pk = link.primary_key
    guard = " AND `process`=%s"
    guard_params: list[Any] = [rule.guard.process.value]
    if rule.guard.is_flagged is not None:
        guard += " AND `is_flagged`=%s"
        guard_params.append("TRUE" if rule.guard.is_flagged else "FALSE")
    if rule.set_process is None:
        return list(keyed_statements(f"DELETE FROM {helper} WHERE", pk, key_texts, (), guard, guard_params))
    sets = "`process`=%s" + (", `is_deprecated`='TRUE'" if rule.set_deprecated else "")
    head = f"UPDATE {helper} SET {sets} WHERE"
    return list(keyed_statements(head, pk, key_texts, [rule.set_process.value], guard, guard_params))


class HelperTable:
    """The helper table of one link, over the agent's connection (a DictCursor, not autocommit)."""

    def __init__(self, db: pymysql.connections.Connection[Any], link: LinkSpec) -> None:
        self._db = db
        self._link = link
        self._pk = list(link.primary_key)
        self._name = table_name(link.helper_db, link.helper_table)

    def ensure(self) -> None:
        """Create the helper table as datajoint-link declares it, with its foreign key to the source.

        Refused when a table of that name exists and is not a helper table of the link's source table.
        """
        link = self._link
        with self._db.cursor() as cur:
            cur.execute(
                "SELECT column_name AS name, column_type AS type, column_comment AS comment, "
                "character_set_name AS charset, collation_name AS collation "
                "FROM information_schema.columns WHERE table_schema=%s AND table_name=%s AND column_key='PRI' "
                "ORDER BY ordinal_position",
                (link.source_db, link.source_table),
            )
            pk = cur.fetchall()
            # A string key keeps its character set and collation: the foreign key needs them equal.
            columns = [
                f"{quote(c['name'])} {c['type']}"
                + (f" CHARACTER SET {c['charset']} COLLATE {c['collation']}" if c["charset"] else "")
                + f" NOT NULL COMMENT {self._db.escape(c['comment'])}"
                for c in pk
            ]
            names = ", ".join(quote(c["name"]) for c in pk)
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {quote(link.helper_db)}")
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {self._name} ("
                + ", ".join(columns)
                + ', `process` enum("PULL","DELETE","NONE") NOT NULL COMMENT ""'
                + ', `is_flagged` enum("TRUE","FALSE") NOT NULL COMMENT ""'
                + ', `is_deprecated` enum("TRUE","FALSE") NOT NULL COMMENT ""'
                + f", PRIMARY KEY ({names})"
                + f", FOREIGN KEY ({names}) REFERENCES {table_name(link.source_db, link.source_table)} ({names})"
                + " ON UPDATE CASCADE ON DELETE RESTRICT"
                + ') ENGINE=InnoDB, COMMENT "djlink helper table: sharing state of each entity"'
            )
            cur.execute(
                "SELECT column_name AS name FROM information_schema.columns WHERE table_schema=%s AND table_name=%s",
                (link.helper_db, link.helper_table),
            )
            found = {row["name"] for row in cur.fetchall()}
        lacking = [c for c in [*(c["name"] for c in pk), *HelperRow.COLUMNS] if c not in found]
        if lacking:  # CREATE TABLE IF NOT EXISTS met a table of that name that is something else
            raise Refused(
                f"{link.helper_db}.{link.helper_table} exists and is not a helper table of "
                f"{link.source_db}.{link.source_table} (it lacks {', '.join(lacking)}); name another helper table"
            )

    def keys(self) -> list[str]:
        """The keys of every entity the helper table names (to continue from one that existed before the link)."""
        with self._db.cursor() as cur:
            cur.execute(f"SELECT {', '.join(quote(c) for c in self._pk)} FROM {self._name}")
            return [keycodec.encode(row, self._pk) for row in cur.fetchall()]

    def rows(self, key_texts: Sequence[str]) -> dict[str, HelperRow]:
        """The helper rows of the entities, by key, locked for update until the commit."""
        found = self._select(self._name, "*", key_texts, "FOR UPDATE")
        return {keycodec.encode(row, self._pk): HelperRow.from_sql(row) for row in found}

    def at_source(self, key_texts: Sequence[str]) -> set[str]:
        """Which of the entities have their master row at the source; locked (shared) until the commit, so
        that it stays there until the helper rows referencing it are written."""
        source = table_name(self._link.source_db, self._link.source_table)
        columns = ", ".join(quote(c) for c in self._pk)
        return {
            keycodec.encode(row, self._pk) for row in self._select(source, columns, key_texts, "LOCK IN SHARE MODE")
        }

    def _select(self, table: str, columns: str, key_texts: Sequence[str], lock: str) -> list[dict[str, Any]]:
        """`columns` of the rows of `table` with the entities' keys, locked by `lock`."""
        found: list[dict[str, Any]] = []
        with self._db.cursor() as cur:
            for sql, params in keyed_statements(
                f"SELECT {columns} FROM {table} WHERE", self._pk, key_texts, (), f" {lock}"
            ):
                cur.execute(sql, params)
                found.extend(cur.fetchall())
        return found

    def activate(self, key_texts: Sequence[str]) -> None:
        """Insert the helper rows of newly activated entities (NEW_HELPER_ROW); Refused when the server will not."""
        if not key_texts:
            return
        cols = [*self._pk, *HelperRow.COLUMNS]
        sql = f"INSERT INTO {self._name} ({', '.join(quote(c) for c in cols)}) VALUES ({', '.join(['%s'] * len(cols))})"
        new = NEW_HELPER_ROW.to_sql()
        rows = [[keycodec.decode(k)[c] for c in self._pk] + [new[c] for c in HelperRow.COLUMNS] for k in key_texts]
        with self._db.cursor() as cur:
            try:
                cur.executemany(sql, rows)
            except pymysql.err.IntegrityError as exc:
                raise Refused(f"cannot activate entities of {self._link.link_id}: {exc.args[-1]}") from exc

    def set_process(self, key_texts: Sequence[str], process: Process) -> None:
        """Set the entities' `process` (a REPULL or MARK_DELETE: `Action.helper_after`)."""
        head = f"UPDATE {self._name} SET `process`=%s WHERE"
        self._execute(keyed_statements(head, self._pk, key_texts, [process.value]))

    def acknowledge(self, acked: Acked, key_texts: Sequence[str]) -> None:
        """Apply the acknowledgement rules of `acked` (ACK_RULES) to the entities, in order."""
        if not key_texts:
            return
        for rule in ACK_RULES[acked]:
            self._execute(ack_statements(self._link, rule, key_texts))

    def _execute(self, statements: Iterable[Statement]) -> None:
        with self._db.cursor() as cur:
            for sql, params in statements:
                cur.execute(sql, params)
