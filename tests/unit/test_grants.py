"""The documented grants per role, and the one line a privilege error of the server becomes."""

from __future__ import annotations

import pymysql

from foundation.grants import RoleName, from_error, probes, role_grants
from foundation.links import LinkSpec


def test_each_role_gets_its_grants_and_the_facade_only_reads():
    statements = {
        role: [g.statement("'u'@'%'") for g in role_grants(role, "lab", "lab_link", "copy", "state")]
        for role in RoleName
    }
    assert statements[RoleName.capture] == [
        "GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO 'u'@'%'",
        "GRANT SELECT ON `lab`.* TO 'u'@'%'",
        "GRANT SELECT ON `lab_link`.* TO 'u'@'%'",
    ]
    assert statements[RoleName.applier] == [
        "GRANT SELECT, INSERT, UPDATE, DELETE ON `copy`.* TO 'u'@'%'",
        "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE ON `state`.* TO 'u'@'%'",
    ]
    assert statements[RoleName.facade] == [
        "GRANT SELECT ON `lab`.* TO 'u'@'%'",
        "GRANT SELECT ON `lab_link`.* TO 'u'@'%'",
    ]
    # Only the applier touches the destination; nothing at the source but the helper schema is writable.
    assert not any("`copy`" in s for r in (RoleName.capture, RoleName.agent) for s in statements[r])
    source_writes = [s for r in RoleName if r is not RoleName.applier for s in statements[r] if "INSERT" in s]
    assert source_writes == ["GRANT SELECT, INSERT, UPDATE, DELETE, CREATE ON `lab_link`.* TO 'u'@'%'"]


def test_probes_change_nothing():
    link = LinkSpec.new("lab", "recording", "lab_link", "outbound", "copy")
    for role in RoleName:
        for probe in probes(role, link):
            sql = probe.statement()
            assert "WHERE FALSE" in sql or sql.startswith("CREATE DATABASE IF NOT EXISTS"), sql


def test_a_servers_privilege_error_names_the_grant_that_fixes_it():
    denied = pymysql.err.OperationalError(
        1142, "INSERT command denied to user 'app'@'10.0.0.7' for table `copy`.`recording`"
    )
    assert str(from_error(denied, "applier")) == (
        "the applier's database user 'app'@'10.0.0.7' lacks INSERT on `copy`.`recording`: "
        "GRANT INSERT ON `copy`.* TO 'app'@'10.0.0.7' (docs/security.md lists each role's grants)"
    )
    no_db = pymysql.err.OperationalError(1044, "Access denied for user 'app'@'%' to database 'state'")
    assert str(from_error(no_db, "applier")).startswith(
        "the applier's database user 'app'@'%' has no privilege on `state`"
    )
    assert from_error(pymysql.err.OperationalError(2013, "Lost connection"), "applier") is None
    assert from_error(ValueError("x"), "applier") is None
