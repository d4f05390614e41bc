"""The local launcher against the running services: `up` again starts no second set, and says where they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import services
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(
    os.environ.get("DJLINK_TEST_EXTERNAL") == "1", reason="the services are external: the launcher is not used"
)


def processes_with(marker: str) -> list[int]:
    """The pids whose command line contains `marker` (the launcher's shell wrappers have exited)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(proc.name))
    return found


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devtools.services", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_up_again_starts_no_second_set_and_every_command_agrees_where_they_are(services_env: dict[str, str]) -> None:
    sd = services.state_dir()
    before = services._running(sd)
    assert set(before) == {"source", "dest", "kafka"}

    again = cli("up")
    assert again.returncode == 0, again.stderr
    assert "services already running" in again.stderr
    assert services._running(sd) == before  # the same three processes, none started
    for name, marker in services._markers(sd).items():
        assert processes_with(marker) == [before[name]], name  # and no other process of that datadir/config

    exported = dict(line.removeprefix("export ").split("=", 1) for line in again.stdout.splitlines())
    assert exported == services_env
    assert json.loads((sd / "services.json").read_text()) == services_env
    assert services.load_env() == services_env

    status = cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name, pid in before.items():
        assert f"running, pid {pid}," in status.stdout, name

    # What the services say about themselves matches: two servers, one with a row-based binlog.
    for side, binlog in (("SOURCE", "ON"), ("DEST", "OFF")):
        conn = services.admin_connection(services_env, side)
        with conn.cursor() as cur:
            cur.execute(
                "SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@binlog_row_metadata, @@server_id, "
                "@@binlog_expire_logs_seconds"
            )
            log_bin, fmt, image, metadata, server_id, keep = cur.fetchone()
        conn.close()
        assert ("ON" if log_bin else "OFF") == binlog, side
        if side == "SOURCE":
            assert (fmt, image, metadata, server_id) == ("ROW", "FULL", "FULL", 1)
            assert keep == services.BINLOG_KEEP_S  # tests and benchmarks must not fill the disk with binlog
        else:
            assert server_id == 2
