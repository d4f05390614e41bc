"""Expected failures: one clear line on stderr, exit code 1, no traceback."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import Site, admin


def run(site: Site, *roles: str, **env: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "djlink", "run"]
    for r in roles:
        args += ["--role", r]
    return subprocess.run(args, env=site.pipeline_env(**env), capture_output=True, text=True, timeout=60)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_capture_refuses_a_source_without_full_row_metadata(site: Site) -> None:
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute("SET GLOBAL binlog_row_metadata='MINIMAL'")
    try:
        proc = run(site, "capture")
    finally:
        with conn.cursor() as cur:
            cur.execute("SET GLOBAL binlog_row_metadata='FULL'")
        conn.close()
    assert one_error_line(proc) == (
        "error: source server has binlog_row_metadata=MINIMAL, capture needs FULL: "
        "SET GLOBAL binlog_row_metadata='FULL' and add binlog_row_metadata=FULL to the server's configuration"
    )


def test_wrong_password_is_one_clear_line(site: Site) -> None:
    line = one_error_line(run(site, "agent", DJLINK_SOURCE_PASSWORD="wrong"))
    assert line.startswith("error: database refused the login")


def test_capture_user_without_binlog_privileges_is_told_the_grant(site: Site) -> None:
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"REVOKE BINLOG MONITOR ON *.* FROM '{site.link_user}'@'%'")
    conn.close()
    assert one_error_line(run(site, "capture")) == (
        f"error: capture user '{site.link_user}'@'%' lacks BINLOG MONITOR: "
        f"GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO '{site.link_user}'@'%'"
    )


def test_capture_server_id_must_differ_from_the_sources(site: Site) -> None:
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute("SELECT @@server_id")
        source_id = cur.fetchone()[0]
    conn.close()
    line = one_error_line(run(site, "capture", DJLINK_CAPTURE_SERVER_ID=str(source_id)))
    assert line.startswith(f"error: DJLINK_CAPTURE_SERVER_ID={source_id} is the source server's own server_id")


def test_unreachable_kafka_is_one_clear_line(site: Site) -> None:
    line = one_error_line(run(site, "agent", DJLINK_KAFKA_BOOTSTRAP="127.0.0.1:1", DJLINK_STARTUP_TIMEOUT="5"))
    assert line.startswith("error: cannot reach Kafka at 127.0.0.1:1")


def test_kafka_client_properties_reach_every_client_and_a_wrong_one_is_one_line(site: Site) -> None:
    """DJLINK_KAFKA_SECURITY_PROTOCOL=SSL against the plaintext broker: the role cannot reach it (the property
    reached the client); a property librdkafka does not know is named in one line."""
    line = one_error_line(run(site, "agent", DJLINK_KAFKA_SECURITY_PROTOCOL="SSL", DJLINK_STARTUP_TIMEOUT="3"))
    assert line.startswith("error: TLS with Kafka at ") and "DJLINK_KAFKA_SECURITY_PROTOCOL" in line, line
    line = one_error_line(run(site, "applier", DJLINK_KAFKA_NO_SUCH_THING="1"))
    assert line.startswith("error: Kafka client settings (DJLINK_KAFKA_*): ") and "no.such.thing" in line


def test_status_of_a_prefix_whose_capture_never_ran_says_so_without_a_traceback(site: Site) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "djlink", "status"], env=site.pipeline_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == [
        f"capture {site.topic_prefix}-capture: no checkpoint yet (it has never run on this prefix)",
        f"applier {site.topic_prefix}-applier: no links on this prefix yet",
    ]
    assert "Traceback" not in proc.stderr


def test_a_replication_factor_the_cluster_cannot_give_is_one_line_naming_the_setting(site: Site) -> None:
    """Topics are created with the cluster's default replication unless told otherwise; the single local broker
    cannot keep three replicas, and says so through djlink in one line."""
    line = one_error_line(run(site, "agent", DJLINK_TOPIC_REPLICATION_FACTOR="3"))
    assert line.startswith("error: Kafka cannot create topic ") and "DJLINK_TOPIC_REPLICATION_FACTOR=3" in line
