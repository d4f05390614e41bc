"""djlink roles as child processes: start `djlink run --role ...` and wait until it says it is ready.

`djlink run` prints READY on stdout once its roles are up; the tests and the
benchmarks start their pipelines with `start_roles`.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

READY = "djlink: ready"


class NotReady(Exception):
    """The roles exited or stayed silent past the timeout; the message says what they wrote on stderr."""


def start_roles(
    roles: list[str],
    env: Mapping[str, str],
    cwd: Path,
    stderr: IO[Any] | int = subprocess.PIPE,
    timeout: float = 90,
    command: list[str] | None = None,
) -> subprocess.Popen[str]:
    """`djlink run` for `roles` in a child process, returned once it printed READY; NotReady otherwise.

    `command` runs instead of `djlink run --role ...` (a profiler wrapper that prints READY too)."""
    args = command or [sys.executable, "-m", "djlink", "run", *(arg for role in roles for arg in ("--role", role))]
    proc = subprocess.Popen(args, env=dict(env), stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=cwd)
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
        if READY in line:
            return proc
    proc.kill()
    err = ""
    if stderr == subprocess.PIPE:
        _, err = proc.communicate(timeout=10)
    raise NotReady(f"`djlink run {' '.join(roles)}` did not become ready: {(err or '')[-2000:]}")
