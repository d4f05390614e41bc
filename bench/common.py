"""What every benchmark needs: the services' settings, connections, a fresh pipeline, and cleaning up."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pymysql
from confluent_kafka.admin import AdminClient

from djlink import services

ROOT = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    print(text, flush=True)


def services_env() -> dict[str, str]:
    """The local services (started when not running), or external ones with DJLINK_TEST_EXTERNAL=1."""
    if os.environ.get("DJLINK_TEST_EXTERNAL") == "1":
        return {k: os.environ[k] for k in services.ENV_KEYS}
    return services.load_env() or services.up(quiet=True)


def connect(env: dict[str, str], side: str = "SOURCE", **extra: Any) -> Any:
    """An administrator's connection to the source or destination server (autocommit)."""
    return pymysql.connect(
        host=env[f"DJLINK_{side}_HOST"],
        port=int(env[f"DJLINK_{side}_PORT"]),
        user=env[f"DJLINK_{side}_USER"],
        password=env[f"DJLINK_{side}_PASSWORD"],
        autocommit=True,
        charset="utf8mb4",
        **extra,
    )


def start_pipeline(env: dict[str, str], roles: list[str], overrides: dict[str, str], timeout: float = 120) -> Any:
    """`djlink run` with these roles in a subprocess, once it says it is ready; its log goes to a temp file."""
    args = [sys.executable, "-m", "djlink", "run"]
    for role in roles:
        args += ["--role", role]
    log = open(f"/tmp/bench-{'-'.join(roles)}-{os.getpid()}.log", "w")
    proc = subprocess.Popen(
        args,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT), **overrides},
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=ROOT,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        if "djlink: ready" in line:
            return proc
    proc.kill()
    raise SystemExit(f"`djlink run {' '.join(roles)}` did not become ready; see {log.name}")


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
                with suppress(Exception):
                    conn = connect(env, side)
                    with conn.cursor() as cur:
                        for db in names:
                            cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
                    conn.close()
            with suppress(Exception):
                admin = AdminClient({"bootstrap.servers": env["DJLINK_KAFKA_BOOTSTRAP"]})
                names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{prefix}.")]
                if names:
                    for fut in admin.delete_topics(names, operation_timeout=30).values():
                        with suppress(Exception):
                            fut.result(30)
