"""The MariaDB grants each role needs, and nothing more; and a check, at the server, that a role has them.

One statement of what each role's database user needs (docs/security.md prints it as a table, `djlink grants`
as GRANT statements), per link:

- **capture** (source): `REPLICATION SLAVE, BINLOG MONITOR ON *.*` to read the binlog, and `SELECT` on the
  source schema and the helper schema (the snapshot of the linked tables and their helper tables);
- **agent** (source): the helper schema (`SELECT, INSERT, UPDATE, DELETE, CREATE`: it makes the helper table
  at registration and keeps its rows), `SELECT` on the source schema (it checks the entities a request names;
  MariaDB asks no REFERENCES privilege for the helper table's foreign key to the linked table);
- **applier** (destination): `SELECT, INSERT, UPDATE, DELETE` on each destination schema, and its own state
  database (`SELECT, INSERT, UPDATE, DELETE, CREATE`);
- **façade** (the link user, at the source): `SELECT` on the source schema and the helper schema, nothing else:
  in djlink's deployment nothing at the source is writable with the credentials a scientist's notebook holds.

`check` asks the server itself, with statements that cannot change anything (each one either fails on the
privilege or on a column that is not there, and runs in a transaction that is rolled back), so that the
server's own rules decide: grants on a database or on each table, wildcards, roles. A missing grant is one
`MissingGrant` line naming the privilege, where, and the GRANT statement that fixes it. CREATE is probed as
`CREATE DATABASE IF NOT EXISTS` of a database that is there; the applier makes its state tables at start,
and `from_error` turns the server's refusal of that (or of anything later) into the same line.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pymysql

from foundation.links import LinkSpec, destination_name
from foundation.sql import quote, table_name

__all__ = ["Grant", "MissingGrant", "RoleName", "check", "from_error", "role_grants"]

DOCS = "docs/security.md lists each role's grants"

# The server's answers that mean "the privilege is there" to a probe (the name probed is not).
ER_NO_SUCH_TABLE = 1146
ER_BAD_FIELD = 1054
PASSED = {ER_NO_SUCH_TABLE, ER_BAD_FIELD}
# The server's answers that mean it is not.
DENIED = {1044, 1142, 1143, 1227, 1370}

PROBE_COLUMN = "`djlink_grant_probe`"  # a column no table has: a probe that passes the privilege stops on it


class RoleName(enum.StrEnum):
    capture = "capture"
    agent = "agent"
    applier = "applier"
    facade = "facade"


@dataclass(frozen=True)
class Grant:
    """Privileges on one database (or `*` for every one), and why the role needs them."""

    privileges: tuple[str, ...]
    database: str  # a database name, or "*" for the global privileges
    why: str

    @property
    def on(self) -> str:
        return "*.*" if self.database == "*" else f"{quote(self.database)}.*"

    def statement(self, user: str) -> str:
        return f"GRANT {', '.join(self.privileges)} ON {self.on} TO {user}"


class MissingGrant(Exception):
    """A role's database user lacks a privilege it needs: the one line says which, where, and the fix."""


def role_grants(
    role: RoleName, source_db: str, helper_db: str, destination_db: str, state_db: str = "djlink_applier"
) -> list[Grant]:
    """Everything `role` needs for one link (source, helper and destination schema), and nothing more."""
    if role is RoleName.capture:
        return [
            Grant(("REPLICATION SLAVE", "BINLOG MONITOR"), "*", "read the binlog and the server's position"),
            Grant(("SELECT",), source_db, "snapshot the linked tables"),
            Grant(("SELECT",), helper_db, "snapshot the helper tables"),
        ]
    if role is RoleName.agent:
        return [
            Grant(("SELECT", "INSERT", "UPDATE", "DELETE", "CREATE"), helper_db, "make and keep the helper table"),
            Grant(("SELECT",), source_db, "check the entities a request names"),
        ]
    if role is RoleName.applier:
        return [
            Grant(("SELECT", "INSERT", "UPDATE", "DELETE"), destination_db, "write the pulled rows"),
            Grant(("SELECT", "INSERT", "UPDATE", "DELETE", "CREATE"), state_db, "its offsets and entity states"),
        ]
    return [
        Grant(("SELECT",), source_db, "browse the source table"),
        Grant(("SELECT",), helper_db, "read the entities' states"),
    ]


@dataclass(frozen=True)
class _Probe:
    privilege: str
    database: str
    table: str

    def statement(self) -> str:
        t = table_name(self.database, self.table)
        return {
            "SELECT": f"SELECT {PROBE_COLUMN} FROM {t} WHERE FALSE",
            "INSERT": f"INSERT INTO {t} ({PROBE_COLUMN}) SELECT 1 FROM DUAL WHERE FALSE",
            "UPDATE": f"UPDATE {t} SET {PROBE_COLUMN} = 1 WHERE FALSE",
            "DELETE": f"DELETE FROM {t} WHERE FALSE",
            # a database-level CREATE: the database is there (a link's helper schema) or would be made anyway
            "CREATE": f"CREATE DATABASE IF NOT EXISTS {quote(self.database)}",
        }[self.privilege]


def probes(role: RoleName, link: LinkSpec) -> list[_Probe]:
    """What `check` asks the server for `role` on `link`: each privilege on a table it needs it for."""
    masters = [link.source_table, *link.part_tables]
    if role is RoleName.capture:
        return [
            *(_Probe("SELECT", link.source_db, t) for t in masters),
            _Probe("SELECT", link.helper_db, link.helper_table),
        ]
    if role is RoleName.agent:
        helper = [
            _Probe(p, link.helper_db, link.helper_table) for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "CREATE")
        ]
        return [_Probe("SELECT", link.source_db, link.source_table), *helper]
    if role is RoleName.applier:
        found = [
            _Probe(p, link.destination_db, destination_name(t))
            for t in masters
            for p in ("SELECT", "INSERT", "UPDATE", "DELETE")
        ]
        return found
    return [_Probe("SELECT", link.source_db, link.source_table), _Probe("SELECT", link.helper_db, link.helper_table)]


def check(conn: Any, role: RoleName, links: Iterable[LinkSpec], state_tables: Sequence[tuple[str, str]] = ()) -> None:
    """MissingGrant for the first privilege `role`'s user lacks on these links' tables, or on the applier's own
    tables (`state_tables`, with CREATE on their database); returns when it has them all."""
    todo = [p for link in links for p in probes(role, link)]
    todo += [_Probe(p, db, t) for db, t in state_tables for p in ("SELECT", "INSERT", "UPDATE", "DELETE")]
    todo += [_Probe("CREATE", db, "") for db in dict.fromkeys(db for db, _ in state_tables)]
    if not todo:
        return
    with conn.cursor() as cur:
        for probe in dict.fromkeys(todo):
            cur.execute("START TRANSACTION")
            try:
                cur.execute(probe.statement())
            except pymysql.err.MySQLError as exc:
                code = exc.args[0] if exc.args else 0
                if code in DENIED:
                    raise MissingGrant(
                        _line(
                            role,
                            _account(cur),
                            probe.privilege,
                            probe.database,
                            probe.table if probe.privilege != "CREATE" else None,
                        )
                    ) from None
                if code not in PASSED:
                    raise
            finally:
                cur.execute("ROLLBACK")


def account(conn: Any) -> str:
    """The account the server knows this connection as, `'name'@'host'` (the host of its grants)."""
    with conn.cursor() as cur:
        return _account(cur)


def _account(cur: Any) -> str:
    cur.execute("SELECT CURRENT_USER() AS user")
    row = cur.fetchone()
    name, _, host = str(row["user"] if isinstance(row, dict) else row[0]).rpartition("@")  # a DictCursor's too
    return f"'{name}'@'{host}'"


def _line(role: str, user: str, privilege: str, database: str, table: str | None) -> str:
    where = table_name(database, table) if table else quote(database)
    return (
        f"the {role}'s database user {user} lacks {privilege} on {where}: "
        f"GRANT {privilege} ON {quote(database)}.* TO {user} ({DOCS})"
    )


# "INSERT command denied to user 'u'@'localhost' for table `db`.`t`" (1142), and its column (1143) and
# database (1044: "Access denied for user 'u'@'%' to database 'db'") forms.
_TABLE_DENIED = re.compile(
    r"^(\w+) command denied to user '([^']*)'@'([^']*)' for table [`']([^`']+)[`']\.[`']([^`']+)"
)
_DB_DENIED = re.compile(r"^Access denied for user '([^']*)'@'([^']*)' to database '([^']+)'")


def from_error(exc: BaseException, role: str, account: str | None = None) -> MissingGrant | None:
    """A privilege error of the server during the role's work as one MissingGrant line; None for other errors.
    `account` (see `account`) names the grants' host; the server's message names the connection's."""
    if not isinstance(exc, pymysql.err.MySQLError) or len(exc.args) < 2 or exc.args[0] not in DENIED:
        return None
    text = str(exc.args[1])
    m = _TABLE_DENIED.match(text)
    if m:
        privilege, name, host, database, table = m.groups()
        return MissingGrant(_line(role, account or f"'{name}'@'{host}'", privilege, database, table))
    m = _DB_DENIED.match(text)
    if m:
        name, host, database = m.groups()
        return MissingGrant(
            f"the {role}'s database user '{name}'@'{host}' has no privilege on {quote(database)} ({DOCS}): {text}"
        )
    return MissingGrant(f"the {role}'s database user lacks a privilege: {text} ({DOCS})")
