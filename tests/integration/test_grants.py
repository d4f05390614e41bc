"""Least privilege at the databases: each role runs with exactly the grants `foundation.grants` documents, and
one privilege less stops it with one line naming that privilege and the GRANT that restores it.

The link user, as the façade uses it, holds SELECT on the source and helper schemas only, and the source
server itself refuses its writes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pymysql
import pytest

from foundation.grants import RoleName, role_grants
from tests.conftest import Site, admin, wait_for
from tests.integration.test_errors import one_error_line, run
from tests.integration.test_mirror import source_sql, view
from tests.integration.test_pull import declare_source


@dataclass(frozen=True)
class User:
    role: RoleName
    side: str  # SOURCE or DEST
    name: str
    password: str

    @property
    def account(self) -> str:
        return f"'{self.name}'@'%'"

    def env(self, state_db: str) -> dict[str, str]:
        env = {f"DJLINK_{self.side}_USER": self.name, f"DJLINK_{self.side}_PASSWORD": self.password}
        return env | ({"DJLINK_APPLIER_STATE_DB": state_db} if self.role is RoleName.applier else {})


def grants_of(site: Site, role: RoleName, state_db: str) -> list[tuple[str, str]]:
    """(privilege, ON clause) of each privilege `role` is documented to need for the site's link."""
    found = role_grants(role, site.source_schema, site.helper_schema, site.dest_schema, state_db)
    return [(p, g.on) for g in found for p in g.privileges]


def execute(site: Site, side: str, *statements: str) -> None:
    conn = admin(site.env, side)
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
    conn.close()


@pytest.fixture
def least(site: Site, state_db: str) -> Iterator[dict[RoleName, User]]:
    """A database user per role holding exactly its documented grants; the link user with the façade's only."""
    users = {
        role: User(role, side, f"{site.tag}_{role.value[:3]}", uuid.uuid4().hex)
        for role, side in ((RoleName.capture, "SOURCE"), (RoleName.agent, "SOURCE"), (RoleName.applier, "DEST"))
    }
    for user in users.values():
        grants = role_grants(user.role, site.source_schema, site.helper_schema, site.dest_schema, state_db)
        execute(
            site,
            user.side,
            f"CREATE USER {user.account} IDENTIFIED BY '{user.password}'",
            *(g.statement(user.account) for g in grants),
        )
    link_user = f"'{site.link_user}'@'%'"
    facade = role_grants(RoleName.facade, site.source_schema, site.helper_schema, site.dest_schema)
    execute(
        site,
        "SOURCE",
        f"REVOKE ALL PRIVILEGES, GRANT OPTION FROM {link_user}",
        *(g.statement(link_user) for g in facade),
    )
    try:
        yield users
    finally:
        site.stop()
        for user in users.values():
            execute(site, user.side, f"DROP USER IF EXISTS {user.account}")


def test_every_role_with_exactly_its_grants_and_one_privilege_less_is_one_line(
    site: Site, least: dict[RoleName, User], state_db: str
) -> None:
    env = {role: user.env(state_db) for role, user in least.items()}
    for role in (RoleName.capture, RoleName.agent, RoleName.applier):
        site.start(role.value, **env[role])
    declare_source(site, 3)
    site.connect_facade()  # the link user: the façade's grants only
    from link import link

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        """The linked copy."""

    summary = (Recording().source & "recording_id <= 2").pull(timeout=60)
    assert (summary.pulled, summary.in_flight) == (2, []), summary
    assert view(site, "DEST", (1, 2)) == view(site, "SOURCE", (1, 2))
    source_sql(site, f"UPDATE `{site.source_schema}`.recording SET subject='mirrored' WHERE recording_id=1")
    wait_for(lambda: view(site, "DEST", (1,))[0][0][1] == "mirrored", 60, "the update at the destination")
    source_sql(site, f"UPDATE `{site.helper_schema}`.outbound SET is_flagged='TRUE' WHERE recording_id=2")
    wait_for(lambda: Recording().source.flagged == [{"recording_id": 2}], 30, "the flag seen by the façade")
    deleted = (Recording() & Recording().source.flagged).delete(timeout=60)
    assert (deleted.deleted, deleted.in_flight) == (1, []), deleted
    assert view(site, "DEST", (2,)) == ([], [])
    assert view(site, "DEST", (1,)) == view(site, "SOURCE", (1,))

    # Nothing at the source is writable with the link user's credentials: the server refuses.
    link_conn = pymysql.connect(
        host=site.env["DJLINK_SOURCE_HOST"],
        port=int(site.env["DJLINK_SOURCE_PORT"]),
        user=site.link_user,
        password=site.link_pass,
    )
    with link_conn.cursor() as cur:
        for statement in (
            f"UPDATE `{site.helper_schema}`.outbound SET is_flagged='FALSE'",
            f"DELETE FROM `{site.helper_schema}`.outbound",
            f"UPDATE `{site.source_schema}`.recording SET subject='forged'",
            f"CREATE TABLE `{site.helper_schema}`.forged (a INT)",
        ):
            with pytest.raises(pymysql.err.OperationalError) as refused:
                cur.execute(statement)
            assert refused.value.args[0] == 1142, statement
    link_conn.close()
    site.stop()

    # One privilege less, each in turn: the role stops at start with one line naming it and its GRANT.
    for role, user in least.items():
        for privilege, on in grants_of(site, role, state_db):
            execute(site, user.side, f"REVOKE {privilege} ON {on} FROM {user.account}")
            try:
                line = one_error_line(run(site, role.value, **env[role]))
            finally:
                execute(site, user.side, f"GRANT {privilege} ON {on} TO {user.account}")
            assert privilege in line and f"ON {on} TO {user.account}" in line, (role, privilege, line)


def test_a_grant_revoked_while_the_applier_runs_stops_it_without_dead_lettering_and_nothing_is_lost(
    site: Site, least: dict[RoleName, User], state_db: str
) -> None:
    env = {role: user.env(state_db) for role, user in least.items()}
    site.start("capture", **env[RoleName.capture])
    site.start("agent", **env[RoleName.agent])
    applier = site.start("applier", **env[RoleName.applier])
    declare_source(site, 2)
    site.connect_facade()
    from link import link

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        """The linked copy."""

    assert (Recording().source & "recording_id = 1").pull(timeout=60).pulled == 1
    account = least[RoleName.applier].account
    execute(site, "DEST", f"REVOKE INSERT ON `{site.dest_schema}`.* FROM {account}")
    summary = (Recording().source & "recording_id = 2").pull(timeout=5)
    assert summary.pulled == 0, summary
    wait_for(lambda: applier.poll() is not None, 60, "the applier to stop")
    assert applier.returncode == 1
    stderr = applier.stderr.read()  # type: ignore[union-attr]
    assert f"error: the applier's database user {account} lacks INSERT on `{site.dest_schema}`." in stderr, stderr
    assert "dead letter" not in stderr.lower()
    assert view(site, "DEST", (2,)) == ([], [])

    execute(site, "DEST", f"GRANT INSERT ON `{site.dest_schema}`.* TO {account}")
    site.start("applier", **env[RoleName.applier])
    wait_for(lambda: view(site, "DEST", (2,)) == view(site, "SOURCE", (2,)), 60, "entity 2 at the destination")
