"""What every benchmark needs: the services' settings, connections, a fresh pipeline, and cleaning up."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import datajoint as dj

from devtools import services
from djlink.process import NotReady, start_roles
from foundation.config import Settings
from foundation.topics import delete_prefixed

ROOT = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    print(text, flush=True)


def services_env() -> dict[str, str]:
    """The local services (started when not running), or external ones with DJLINK_TEST_EXTERNAL=1."""
    if os.environ.get("DJLINK_TEST_EXTERNAL") == "1":
        return {k: os.environ[k] for k in services.ENV_KEYS if k in os.environ or k not in services.TLS_ENV_KEYS}
    return services.load_env() or services.up(quiet=True)


def connect(env: dict[str, str], side: str = "SOURCE", **extra: Any) -> Any:
    """An administrator's connection to the source or destination server (autocommit)."""
    return services.admin_connection(env, side, **extra)


def start_pipeline(
    env: dict[str, str], roles: list[str], overrides: dict[str, str], timeout: float = 120, profile: str | None = None
) -> Any:
    """`djlink run` with these roles in a subprocess, once it says it is ready; its log goes to a temp file.

    `profile`: run the (single) role under bench/profile_capture.py, writing that cProfile file on SIGTERM."""
    log = open(f"/tmp/bench-{'-'.join(roles)}-{os.getpid()}.log", "w")
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT), **overrides}
    command = None
    if profile:
        command = [sys.executable, str(ROOT / "bench" / "profile_capture.py"), profile]
        full["BENCH_PROFILE_ROLE"] = roles[0]
    try:
        return start_roles(roles, full, ROOT, log, timeout, command)
    except NotReady:
        raise SystemExit(f"`djlink run {' '.join(roles)}` did not become ready; see {log.name}") from None


def facade(env: dict[str, str], pipeline: dict[str, str]) -> Any:
    """Point the façade at the services and this pipeline (environment, dj.config); return `link.link`."""
    os.environ.update({k: v for k, v in env.items() if k.startswith("DJLINK_")} | pipeline)
    os.environ["LINK_USER"], os.environ["LINK_PASS"] = env["DJLINK_SOURCE_USER"], env["DJLINK_SOURCE_PASSWORD"]
    dj.config.update(
        {
            "database.host": f"{env['DJLINK_DEST_HOST']}:{env['DJLINK_DEST_PORT']}",
            "database.user": env["DJLINK_DEST_USER"],
            "database.password": env["DJLINK_DEST_PASSWORD"],
            "database.use_tls": False,
            "safemode": False,
        }
    )
    dj.conn(reset=True)
    from link import link

    return link


def source_host(env: dict[str, str]) -> str:
    return f"{env['DJLINK_SOURCE_HOST']}:{env['DJLINK_SOURCE_PORT']}"


@contextmanager
def cleanup(
    env: dict[str, str], databases: list[str], prefix: str, keep: bool, dest_databases: list[str] | None = None
) -> Iterator[None]:
    """Drop the benchmark's schemas (source and destination) and topics afterwards, unless kept."""
    try:
        yield
    finally:
        dest_databases = dest_databases or []
        if keep:
            say(f"kept schemas {', '.join(databases + dest_databases)} and topics {prefix}.*")
        else:
            for side, names in (("SOURCE", databases), ("DEST", dest_databases)):
                try:
                    conn = connect(env, side)
                    with conn.cursor() as cur:
                        # A helper table's foreign key to its source table refused DROP DATABASE of the source
                        # schema, silently: every run left its 80 MB at the source, and later runs read a source
                        # server whose buffer pool no longer held their tables (slower, and more CPU).
                        cur.execute("SET FOREIGN_KEY_CHECKS=0")
                        for db in names:
                            cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
                    conn.close()
                except Exception as exc:  # a figure already printed stays valid; say what is left behind
                    say(f"  could not drop the benchmark's schemas at the {side.lower()}: {exc}")
            with suppress(Exception):
                delete_prefixed(Settings.from_env(env), prefix)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_pids() -> dict[str, int]:
    """The local services' processes (source and destination MariaDB, Kafka), by name; {} for external ones."""
    if os.environ.get("DJLINK_TEST_EXTERNAL") == "1":
        return {}
    found = {}
    for name in (services.SOURCE.name, services.DEST.name, services.KAFKA):
        with suppress(OSError, ValueError):
            found[name] = int((services.state_dir() / name / "pid").read_text().strip())
    return found


class CpuMeter:
    """CPU seconds each named process uses between `start()` and `stop()`: where a run's time goes."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.used = {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}

    def report(self, wall: float) -> str:
        total = sum(self.used.values())
        parts = ", ".join(f"{name} {s:.1f}" for name, s in sorted(self.used.items(), key=lambda x: -x[1]))
        return f"CPU seconds during the {wall:.1f} s: {parts}; total {total:.1f} ({total / wall:.2f} CPUs busy)"
