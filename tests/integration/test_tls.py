"""TLS to both MariaDB servers: every role, the binlog stream and the façade encrypt, and the servers prove it.

The local servers offer TLS with a certificate from a CA the launcher made (DJLINK_*_TLS_CA). Users created
`REQUIRE SSL` cannot log in over plain text, so a pull by such users is a pull over TLS end to end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import services
from foundation.tls import Tls, TlsError
from tests.conftest import Site, admin
from tests.integration.test_errors import one_error_line, run
from tests.integration.test_metrics import free_port
from tests.integration.test_pull import linked_recording


def require_ssl(site: Site) -> tuple[str, str]:
    """The link user made `REQUIRE SSL`; a destination user for the applier, `REQUIRE SSL` too."""
    user, password = f"{site.tag}_app", uuid.uuid4().hex
    src = admin(site.env, "SOURCE")
    with src.cursor() as cur:
        cur.execute(f"ALTER USER '{site.link_user}'@'%' REQUIRE SSL")
    src.close()
    dst = admin(site.env, "DEST")
    with dst.cursor() as cur:
        cur.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}' REQUIRE SSL")
        cur.execute(f"GRANT ALL PRIVILEGES ON *.* TO '{user}'@'%'")
    dst.close()
    return user, password


def drop_user(site: Site, user: str) -> None:
    dst = admin(site.env, "DEST")
    with dst.cursor() as cur:
        cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
    dst.close()


def test_a_pull_by_users_the_servers_let_in_only_over_tls_arrives(site: Site) -> None:
    assert site.env.get("DJLINK_SOURCE_TLS") == "verify", "the local services offer TLS and their CA"
    app_user, app_pass = require_ssl(site)
    try:
        # Plain text is refused by the servers themselves: what follows is encrypted because it has to be.
        line = one_error_line(run(site, "agent", DJLINK_SOURCE_TLS="off"))
        assert line.startswith("error: database refused the login")
        _, Recording = linked_recording(site, n=3, DJLINK_DEST_USER=app_user, DJLINK_DEST_PASSWORD=app_pass)
        summary = (Recording().source & "recording_id <= 2").pull()  # the façade's source connection too
        assert summary.pulled == 2
        assert len(Recording()) == 2 and len(Recording.Channel()) == 6
    finally:
        site.stop()
        drop_user(site, app_user)


def test_a_server_certificate_that_does_not_verify_is_one_line(site: Site, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=another CA",
         "-keyout", str(tmp_path / "other-ca.key"), "-out", str(other_ca)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    line = one_error_line(run(site, "agent", DJLINK_SOURCE_TLS="verify", DJLINK_SOURCE_TLS_CA=str(other_ca)))
    assert line.startswith("error: the certificate of the server at ") and "DJLINK_SOURCE_TLS_CA" in line


@pytest.fixture(scope="module")
def plaintext_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real MariaDB server that offers no TLS at all (`--skip-ssl`), on a free loopback port."""
    sd = tmp_path_factory.mktemp("plain")
    db = services._MariaDB("plain", "plain-text MariaDB", "DJLINK_PLAIN", server_id=9, binlog=False)
    mariadbd, install_db = services._ensure_mariadb(sd, print)
    (sd / db.name).mkdir()
    services._init_datadir(install_db, sd, db)
    port = free_port()
    argv = [a for a in services._mariadb_argv(mariadbd, sd, db, port) if not a.startswith("--ssl")] + ["--skip-ssl"]
    pid = services._spawn(argv, sd / db.name / "console.log", sd / db.name)
    try:
        deadline = time.monotonic() + 60
        while services._mariadb_probe(port, "") == "down":
            assert time.monotonic() < deadline, (sd / db.name / "error.log").read_text()[-2000:]
            time.sleep(0.2)
        yield port
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("role", ["agent", "capture"])
def test_required_tls_against_a_server_without_tls_is_one_line(site: Site, plaintext_server: int, role: str) -> None:
    host = f"127.0.0.1:{plaintext_server}"
    proc = run(site, role, DJLINK_SOURCE_PORT=str(plaintext_server), DJLINK_SOURCE_TLS="required")
    assert one_error_line(proc) == (
        f"error: the server at {host} does not offer TLS but DJLINK_SOURCE_TLS=required: enable TLS on it "
        "(ssl_cert, ssl_key) or set DJLINK_SOURCE_TLS=preferred"
    )


def test_tls_settings_that_cannot_work_are_refused_before_connecting() -> None:
    with pytest.raises(TlsError, match="DJLINK_DEST_TLS=verify needs the CA"):
        Tls.from_env({"DJLINK_DEST_TLS": "verify"}, "DJLINK_DEST")
    with pytest.raises(TlsError, match="is not one of off, preferred, required, verify"):
        Tls.from_env({"DJLINK_SOURCE_TLS": "yes"}, "DJLINK_SOURCE")
    with pytest.raises(TlsError, match="go together"):
        Tls.from_env({"DJLINK_SOURCE_TLS_CERT": "c.pem"}, "DJLINK_SOURCE")
    required = Tls.from_env({"DJLINK_SOURCE_TLS": "required"}, "DJLINK_SOURCE")
    refusal = required.refused(Exception(2026, "SSL is required but the server doesn't support it"), "db:3306")
    assert refusal is not None and str(refusal) == (
        "the server at db:3306 does not offer TLS but DJLINK_SOURCE_TLS=required: enable TLS on it "
        "(ssl_cert, ssl_key) or set DJLINK_SOURCE_TLS=preferred"
    )
