"""Fixtures over real services: two MariaDB servers and a Kafka broker.

Where they come from, in order: environment variables naming external servers
(DJLINK_TEST_EXTERNAL=1 with the DJLINK_SOURCE_*/DJLINK_DEST_*/DJLINK_KAFKA_BOOTSTRAP
keys), else the project's local launcher (`devtools.services.up`), which installs
and starts them. Each test gets its own schemas, topic prefix and link user, so
tests never see each other's data.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datajoint as dj
import pytest

from devtools import services
from devtools.services import ENV_KEYS
from djlink.process import NotReady, start_roles
from foundation.config import Settings
from foundation.topics import delete_prefixed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def services_env() -> dict[str, str]:
    if os.environ.get("DJLINK_TEST_EXTERNAL") == "1":
        return {k: os.environ[k] for k in ENV_KEYS if k in os.environ or k not in services.TLS_ENV_KEYS}
    started = time.monotonic()
    env = services.up(quiet=True)
    print(f"\nservices ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return env


def admin(env: dict[str, str], side: str, **extra: Any) -> Any:
    return services.admin_connection(env, side, **extra)


def tally(report: dict[str, Any]) -> dict[str, int]:
    """What a `djlink verify --json` report says was checked, lost and duplicated, in entities.

    Lost: shared entities missing at the destination, or there with rows missing or changed. Duplicated:
    entities there that the source does not share, or shared ones with rows the source does not have (a
    primary key keeps a row from being there twice; a change applied twice shows as one of these)."""
    checked = lost = duplicated = 0
    for link in report["links"]:
        checked += link["compared"]
        for entity in link["entities"]:
            rows = entity["rows"]
            lost += entity["problem"] == "missing" or any(r["missing"] or r["changed"] for r in rows)
            duplicated += entity["problem"] == "extra" or any(r["extra"] for r in rows)
    return {"checked": checked, "lost": lost, "duplicated": duplicated}


def record_fault(kind: str, injected: int, recovered_s: float, report: dict[str, Any]) -> None:
    """One line for `bench/faults.py`'s table (to the file DJLINK_FAULT_REPORT names; nothing when unset):
    the fault, how many were injected, how long the pipeline took to be equal again, and verify's tally."""
    path = os.environ.get("DJLINK_FAULT_REPORT")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    record = {"test": test, "kind": kind, "injected": injected, "recovery_s": round(recovered_s, 1), **tally(report)}
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


def wait_for(condition: Any, timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll `condition` every `interval` s until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Site:
    """One test's names and credentials."""

    env: dict[str, str]
    tag: str
    source_schema: str
    helper_schema: str
    dest_schema: str
    link_user: str
    link_pass: str
    topic_prefix: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def source_host(self) -> str:
        return f"{self.env['DJLINK_SOURCE_HOST']}:{self.env['DJLINK_SOURCE_PORT']}"

    def source_dj(self) -> dj.Connection:
        return dj.Connection(
            self.source_host, self.env["DJLINK_SOURCE_USER"], self.env["DJLINK_SOURCE_PASSWORD"], use_tls=False
        )

    def pipeline_env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(
            {
                "DJLINK_SOURCE_USER": self.link_user,
                "DJLINK_SOURCE_PASSWORD": self.link_pass,
                "DJLINK_ALLOWED_SCHEMAS": f"{self.tag}_*",
                "DJLINK_TOPIC_PREFIX": self.topic_prefix,
                "DJLINK_CAPTURE_SERVER_ID": str(6000 + uuid.uuid4().int % 100000),
                "DJLINK_TIMEOUT": "60",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(overrides)
        return env

    def start(self, *roles: str, timeout: float = 90, **overrides: str) -> subprocess.Popen[str]:
        """Run `djlink run` for `roles` in a subprocess and wait for it to say it is ready."""
        try:
            proc = start_roles(list(roles), self.pipeline_env(**overrides), ROOT, timeout=timeout)
        except NotReady as exc:
            raise AssertionError(str(exc)) from None
        self.processes.append(proc)
        return proc

    def connect_facade(self) -> None:
        """Point the façade at this test's services: dj.config for the destination, env for the rest."""
        dj.config.update(
            {
                "database.host": f"{self.env['DJLINK_DEST_HOST']}:{self.env['DJLINK_DEST_PORT']}",
                "database.user": self.env["DJLINK_DEST_USER"],
                "database.password": self.env["DJLINK_DEST_PASSWORD"],
                "database.use_tls": False,
                "safemode": False,
            }
        )
        dj.conn(reset=True)
        for key, value in self.pipeline_env().items():
            if key.startswith("DJLINK_"):
                os.environ[key] = value
        os.environ["LINK_USER"], os.environ["LINK_PASS"] = self.link_user, self.link_pass

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is not None and proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
                # It died by itself: show why (pytest prints this with the test's failure).
                print(f"`{' '.join(proc.args[3:])}` exited with {proc.returncode}:", proc.stderr.read()[-3000:])  # type: ignore[index,union-attr]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@contextlib.contextmanager
def open_site(services_env: dict[str, str]) -> Iterator[Site]:
    """A fresh site: its own schemas, topic prefix and link user; all removed afterwards."""
    tag = f"t{uuid.uuid4().hex[:10]}"
    s = Site(
        services_env,
        tag,
        f"{tag}_source",
        f"{tag}_helper",
        f"{tag}_dest",
        f"{tag}_link",
        uuid.uuid4().hex,
        f"test-{tag}",
    )
    conn = admin(services_env, "SOURCE")
    with conn.cursor() as cur:
        # datajoint-link's privileges, plus what reading the binlog needs.
        cur.execute(f"CREATE USER '{s.link_user}'@'%' IDENTIFIED BY '{s.link_pass}'")
        cur.execute(f"GRANT SELECT, REFERENCES ON `{s.source_schema}`.* TO '{s.link_user}'@'%'")
        cur.execute(f"GRANT ALL PRIVILEGES ON `{s.helper_schema}`.* TO '{s.link_user}'@'%'")
        cur.execute(f"GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO '{s.link_user}'@'%'")
    conn.close()
    # connect_facade() points the environment at the site: put it back afterwards.
    saved = {k: v for k, v in os.environ.items() if k.startswith("DJLINK_") or k in ("LINK_USER", "LINK_PASS")}
    try:
        yield s
    finally:
        s.stop()
        for k in [k for k in os.environ if k.startswith("DJLINK_") or k in ("LINK_USER", "LINK_PASS")]:
            del os.environ[k]
        os.environ.update(saved)
        conn = admin(services_env, "SOURCE")
        with conn.cursor() as cur:
            for db in (s.helper_schema, s.source_schema):
                cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
            cur.execute(f"DROP USER IF EXISTS '{s.link_user}'@'%'")
        conn.close()
        conn = admin(services_env, "DEST")
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{s.dest_schema}`")
        conn.close()
        # Left behind, thousands of test topics slow a long-lived development broker down.
        with contextlib.suppress(Exception):
            delete_prefixed(Settings.from_env(services_env), s.topic_prefix)


@pytest.fixture
def site(services_env: dict[str, str]) -> Iterator[Site]:
    with open_site(services_env) as s:
        yield s


@pytest.fixture
def state_db(site: Site) -> Iterator[str]:
    """The applier's own database on the destination server, one per test."""
    name = f"{site.tag}_applier"
    yield name
    site.stop()  # the applier first: it writes there until it stops
    conn = admin(site.env, "DEST")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def scalar(conn: Any, sql: str, *args: Any) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]
