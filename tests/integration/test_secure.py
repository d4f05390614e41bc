"""Two sites over Kafka's SASL_SSL listener with ACLs on: each runs with its own SCRAM principal, limited to
the ACLs `foundation.acls` documents, and the broker itself refuses what a site may not do.

The local broker always has that listener (`djlink services up --secure` drops its PLAINTEXT one as well).
The test harness keeps the PLAINTEXT listener's super-user access for making and removing the test's ACLs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from devtools import services
from djlink.process import start_roles
from foundation import acls
from foundation.config import Settings
from foundation.kafka import admin_client, produce, producer
from foundation.topics import Admin, Topics
from tests.conftest import ROOT, Site, wait_for
from tests.integration.test_errors import one_error_line, run
from tests.integration.test_metrics import free_port, get
from tests.integration.test_mirror import source_sql, view
from tests.integration.test_pull import declare_source

SASL_KEYS = (*services.KAFKA_SECURITY_KEYS, "DJLINK_KAFKA_BOOTSTRAP")


def kafka_of(site_name: str) -> dict[str, str]:
    """A site's Kafka settings: the SASL_SSL listener, its SCRAM principal, the local CA."""
    return {k: v for k, v in services.site_env(site_name).items() if k in SASL_KEYS}


@pytest.fixture
def secured(site: Site) -> Iterator[Site]:
    """The site's topic prefix with the documented ACLs of each site's principal (removed afterwards)."""
    admin = admin_client(Settings.from_env(site.env))  # the PLAINTEXT listener: a super user
    topics = Topics(site.topic_prefix)
    entries = [
        *acls.site_acls(topics, acls.Site.source, f"User:{services.SITES['source']}"),
        *acls.site_acls(topics, acls.Site.destination, f"User:{services.SITES['destination']}"),
    ]
    for site_name, user in services.SITES.items():  # as an operator would: `djlink acls --apply`
        done = subprocess.run(
            [sys.executable, "-m", "djlink", "acls", "--site", site_name, "--principal", f"User:{user}", "--apply"],
            env=site.pipeline_env(),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 0 and "ACL entries for" in done.stdout, done.stderr
    try:
        yield site
    finally:
        site.stop()
        acls.remove(admin, entries)


def start(site: Site, log: Path, *roles: str, **env: str) -> subprocess.Popen[str]:
    """`djlink run --verbose` for `roles`, logging at DEBUG into `log` (a file: a pipe could fill and block)."""
    command = [sys.executable, "-m", "djlink", "run", "--verbose", *(a for r in roles for a in ("--role", r))]
    with open(log, "a") as out:
        proc = start_roles(list(roles), site.pipeline_env(**env), ROOT, stderr=out, command=command)
    site.processes.append(proc)
    return proc


def refused(settings: Settings, topic: str) -> KafkaError | None:
    """What the broker answers to one record produced to `topic` with `settings` (None: accepted)."""
    p = producer(settings)
    errors: list[KafkaError | None] = []
    produce(p, topic, b"forged", b"forged", lambda err, _msg: errors.append(err))
    p.flush(30)
    assert errors, f"no delivery report for {topic}"
    return errors[0]


def test_a_pull_a_mirrored_update_a_flag_and_a_flagged_delete_over_sasl_ssl_with_acls(
    secured: Site, tmp_path: Path
) -> None:
    site = secured
    source_kafka, dest_kafka = kafka_of("source"), kafka_of("destination")
    assert source_kafka["DJLINK_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    logs = {"source": tmp_path / "source.log", "destination": tmp_path / "destination.log"}
    ports = {"source": free_port(), "destination": free_port()}
    start(site, logs["source"], "capture", "agent", DJLINK_METRICS_PORT=str(ports["source"]), **source_kafka)
    start(site, logs["destination"], "applier", DJLINK_METRICS_PORT=str(ports["destination"]), **dest_kafka)
    declare_source(site, 3)
    site.connect_facade()
    os.environ.update(dest_kafka)  # the notebook is at the destination site (open_site restores the environment)
    from link import link

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        """The linked copy."""

    summary = (Recording().source & "recording_id <= 2").pull(timeout=60)
    assert (summary.pulled, summary.in_flight) == (2, []), summary
    assert view(site, "DEST", (1, 2)) == view(site, "SOURCE", (1, 2))

    source_sql(site, f"UPDATE `{site.source_schema}`.recording SET subject='mirrored' WHERE recording_id=1")
    wait_for(lambda: view(site, "DEST", (1,))[0][0][1] == "mirrored", 60, "the update at the destination")
    assert view(site, "DEST", (1, 2)) == view(site, "SOURCE", (1, 2))

    source_sql(site, f"UPDATE `{site.helper_schema}`.outbound SET is_flagged='TRUE' WHERE recording_id=2")
    wait_for(lambda: Recording().source.flagged == [{"recording_id": 2}], 30, "the flag seen by the façade")
    deleted = (Recording() & Recording().source.flagged).delete(timeout=60)
    assert (deleted.deleted, deleted.in_flight) == (1, []), deleted
    assert view(site, "DEST", (2,)) == ([], [])
    assert view(site, "DEST", (1,)) == view(site, "SOURCE", (1,))

    # Nothing leaks: no secret in what the roles logged at DEBUG, served as metrics or gave up as dead letters,
    # nor in what an operator's commands print. (A record the agent cannot read, to have a dead letter.)
    def djlink(*args: str) -> tuple[int, str]:
        done = subprocess.run(
            [sys.executable, "-m", "djlink", *args],
            env=site.pipeline_env(**dest_kafka),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        return done.returncode, done.stdout + done.stderr

    dest_settings = Settings.from_env(site.pipeline_env(**dest_kafka))
    assert refused(dest_settings, Topics(site.topic_prefix).commands) is None
    code, dead = wait_for(lambda: (answer := djlink("dead-letters", "--json"))[0] == 4 and answer, 60, "a dead letter")
    assert '"reason"' in dead
    metrics = {f"{name} metrics": get(port, "/metrics")[1] for name, port in ports.items()}
    assert all("djlink_" in text for text in metrics.values())
    site.stop()
    code, status = djlink("status", "--json")
    assert code == 0, status
    outputs = {name: path.read_text() for name, path in logs.items()} | metrics
    outputs |= {"status": status, "dead letters": dead}
    assert "djlink: ready" not in outputs["source"]  # the log holds stderr only; READY went to stdout
    assert len(outputs["source"]) > 1000, "the roles logged at DEBUG"
    secrets = {
        "source SASL password": source_kafka["DJLINK_KAFKA_SASL_PASSWORD"],
        "destination SASL password": dest_kafka["DJLINK_KAFKA_SASL_PASSWORD"],
        "link user's password": site.link_pass,
        "destination password": site.env["DJLINK_DEST_PASSWORD"],
    }
    leaks = [f"{what} in {where}" for what, key in secrets.items() for where, text in outputs.items() if key in text]
    assert leaks == []


def test_the_broker_refuses_what_a_site_may_not_write(secured: Site) -> None:
    topics = Topics(secured.topic_prefix)
    change_topic = topics.table(secured.source_schema, "recording")
    Admin(Settings.from_env(secured.env)).ensure([change_topic, *topics.control()])
    destination = Settings.from_env({**secured.pipeline_env(), **kafka_of("destination")})
    source = Settings.from_env({**secured.pipeline_env(), **kafka_of("source")})
    denied = KafkaError.TOPIC_AUTHORIZATION_FAILED
    # A destination cannot forge change events, transactions, links or the capture's checkpoints.
    for topic in (change_topic, topics.transaction, topics.links, topics.capture_offsets, topics.schemas):
        error = refused(destination, topic)
        assert error is not None and error.code() == denied, (topic, error)
    # The source cannot speak for a destination.
    for topic in (topics.acks, topics.flags, topics.commands):
        error = refused(source, topic)
        assert error is not None and error.code() == denied, (topic, error)
    # What each site must write, it can.
    assert refused(destination, topics.commands) is None
    assert refused(source, topics.links) is None


def test_plaintext_and_wrong_credentials_are_refused_by_the_broker(secured: Site) -> None:
    dest = kafka_of("destination")
    wrong = run(secured, "applier", **{**dest, "DJLINK_KAFKA_SASL_PASSWORD": "wrong", "DJLINK_STARTUP_TIMEOUT": "10"})
    line = one_error_line(wrong)
    assert "Kafka refused the credentials" in line and "DJLINK_KAFKA_SASL_" in line, line
    plain = {**dest, "DJLINK_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT", "DJLINK_STARTUP_TIMEOUT": "10"}
    plaintext = run(secured, "applier", **plain)
    line = one_error_line(plaintext)
    assert line.startswith("error: cannot reach Kafka at") and "SECURITY_PROTOCOL=SASL_SSL" in line, line
    assert dest["DJLINK_KAFKA_SASL_PASSWORD"] not in wrong.stderr + plaintext.stderr


def test_services_env_gives_each_site_its_own_principal() -> None:
    source, dest = services.site_env("source"), services.site_env("destination")
    assert source["DJLINK_KAFKA_SASL_USERNAME"] != dest["DJLINK_KAFKA_SASL_USERNAME"]
    assert source["DJLINK_KAFKA_SASL_PASSWORD"] != dest["DJLINK_KAFKA_SASL_PASSWORD"]
    assert Path(source["DJLINK_KAFKA_SSL_CA_LOCATION"]).is_file()
    done = subprocess.run(
        [sys.executable, "-m", "devtools.services", "env", "--site", "destination"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "export DJLINK_KAFKA_SASL_USERNAME=djlink-dest" in done.stdout


@pytest.mark.parametrize(
    ("role", "other_site", "refused_for"),
    [
        ("capture", "destination", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED"),
        ("agent", "destination", "TRANSACTIONAL_ID_AUTHORIZATION_FAILED"),
        ("applier", "source", "GROUP_AUTHORIZATION_FAILED"),
    ],
)
def test_a_role_run_with_the_other_sites_principal_stops_with_one_line(
    secured: Site, role: str, other_site: str, refused_for: str
) -> None:
    done = run(secured, role, **kafka_of(other_site))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]  # after the capture's warnings about the link user's privileges
    assert line.startswith(f"error: Kafka refused this principal ({refused_for}"), line
    assert "djlink acls --site" in line
