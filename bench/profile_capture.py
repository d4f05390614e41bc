"""Run the capture as `djlink run --role capture` does, with every Python thread under cProfile.

    python bench/profile_capture.py OUT.prof [cpu|wall|off]    # configured by DJLINK_* like `djlink run`

`python -m cProfile -m djlink run` profiles only the main thread, which merely
waits: the capture's work happens in the `capture` thread (coordinator and
event dispatcher) and the `binlog-source` thread. This wrapper gives every
thread its own profiler and, on SIGTERM or SIGINT, stops the capture and
writes the merged statistics to OUT.prof, each thread's to OUT.<thread>.prof,
and each thread's CPU seconds to stderr. Used by `bench/capture.py --profile`.

The clock is each thread's CPU time by default (`cpu`): the capture's two
Python threads share the GIL, so wall-clock profiles charge every function
with the time it waited for the other thread. `wall` shows blocking waits
(Kafka commits, socket reads) instead. `off` profiles nothing and only
reports each thread's CPU seconds, undistorted by the profiler's overhead.

BENCH_PROFILE_ROLE=agent|applier profiles that role instead (`bench/pull.py --profile`).

BENCH_FREEZE_SCHEMA=1 makes the capture's binlog reader use
python-mysql-replication's `freeze_schema=True` (an experiment: how much
caching TABLE_MAP parsing would gain; not safe across ALTER TABLE as is).
"""

from __future__ import annotations

import cProfile
import functools
import logging
import os
import pstats
import signal
import sys
import threading
import time
from typing import Any

from djlink.process import READY
from djlink.run import Role, run_roles
from foundation.config import Settings

_profiles: list[tuple[str, cProfile.Profile]] = []
_cpu: dict[str, float] = {}
_lock = threading.Lock()
_bootstrap_inner = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]
_clock = time.thread_time


_enabled = True


def _profiled_bootstrap(self: threading.Thread) -> None:
    profile = cProfile.Profile(_clock)
    if _enabled:
        with _lock:
            _profiles.append((self.name, profile))
        profile.enable()
    try:
        _bootstrap_inner(self)
    finally:
        profile.disable()
        with _lock:
            _cpu[self.name] = time.thread_time()


def _write(out: str) -> None:
    merged: pstats.Stats | None = None
    with _lock:
        profiles = list(_profiles)
    for name, profile in profiles:
        try:
            stats = pstats.Stats(profile)
        except TypeError:  # a thread that never called anything
            continue
        stats.dump_stats(f"{out.removesuffix('.prof')}.{name}.prof")
        if merged is None:
            merged = stats
        else:
            merged.add(stats)
    if merged is not None:
        merged.dump_stats(out)
    for name, seconds in sorted(_cpu.items(), key=lambda kv: -kv[1]):
        print(f"profile: thread {name}: {seconds:.1f} s CPU", file=sys.stderr)


def main(argv: list[str]) -> int:
    global _clock, _enabled
    if len(argv) not in (1, 2) or argv[1:] not in ([], ["cpu"], ["wall"], ["off"]):
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[0]
    _clock = time.perf_counter if argv[1:] == ["wall"] else time.thread_time
    _enabled = argv[1:] != ["off"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")  # as `djlink run`
    setattr(threading.Thread, "_bootstrap_inner", _profiled_bootstrap)  # noqa: B010
    if os.environ.get("BENCH_FREEZE_SCHEMA") == "1":
        import cdc.streaming

        cdc.streaming.BinLogStreamReader = functools.partial(  # type: ignore[misc]
            cdc.streaming.BinLogStreamReader, freeze_schema=True
        )
        print("profile: experiment: the binlog reader runs with freeze_schema=True", file=sys.stderr)
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        role = Role(os.environ.get("BENCH_PROFILE_ROLE", "capture"))
        run_roles([role], Settings.from_env(), stop, lambda: print(READY, flush=True))
    finally:
        # The binlog thread ends once the capture shut its socket down; give it a moment to record its profile.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()
        ):
            time.sleep(0.05)
        _write(out)
        if _enabled:
            print(f"profile: written to {out}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
