"""Memory of every djlink role (capture, agent, applier) during three workloads, against "< 300 MB and flat
in table size" (issue 14, item 4).

    python -m bench.memory                                    # the issue's sizes (about 10 minutes here)
    python -m bench.memory --snapshot-rows 20000 --pull-entities 5000 --blob-entities 200   # a quick run
    python -m bench.memory --only blobs --blob-chunk-size 20  # one workload, the capture's chunks lowered
    python -m bench.memory --help

Each workload runs on a pipeline of its own: `djlink run --role capture`,
`--role agent` and `--role applier` as three processes (as bench/pull.py
starts them), fresh schemas and a fresh topic prefix, so each role's peak is
that workload's. The source rows are written by bulk SQL (INSERT ... SELECT
from MariaDB's `seq_<a>_to_<b>` tables, as bench/verify.py does) without the
binlog: the capture reads them with snapshot reads, never from the binlog.

1. **snapshot**: an initial snapshot (`DJLINK_SNAPSHOT_MODE=initial`) of a
   DataJoint Manual table `Session` of N rows (default 1,000,000; an int key,
   a varchar, a double and a 128-byte longblob), linked by the façade
   (`@link`): the capture publishes every row to the table's change topic;
   the applier reads and ignores them. Progress: the change topic's
   committed offsets (a read_committed consumer's watermark) over N; done
   when the capture logs that the snapshot is done.
2. **pull**: a pull of N entities of workload W (bench/pull.py: `Recording`
   with an 8 KiB longblob and 4 `Recording.Channel` part rows each; default
   100,000): `Recording().source.pull()` in this process. Progress: master
   rows at the destination (`SELECT COUNT(*)`, polled) over N.
3. **blobs**: a pull of N entities of W with a 1 MiB longblob instead of 8 KiB
   (default 2,000), the same way. `--blob-chunk-size` sets the capture's
   `DJLINK_SNAPSHOT_CHUNK_SIZE` for it (default: djlink's default, 500).

A thread samples each role's resident memory (VmRSS of /proc/<pid>/status)
every 0.5 s with the progress; the report gives, per role, the RSS when the
pipeline was ready, in the first samples taken once 10 %, 50 % and 100 % of
the work was done (with the progress each shows: a pull's progress moves by
the applier's transactions), the peak (VmHWM) at the end, and the growth from
10 % to 100 % ("flat in table size": nothing should grow with the rows seen);
every sample goes to a samples.csv beside the roles' logs, with the applier's
`djlink_applier_pending_units` (read from its /metrics): the units it has
read and not applied yet. `--tracemalloc ROLE` writes where that role's live
Python memory was allocated once the work is done. `--commit REV`
runs the roles from a commit without the checkout's uncommitted changes. A
role above --rss-limit MiB stops the workload (the machine has no swap).
Figures, never assertions; the schemas and topics are dropped after each
workload (unless --keep).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datajoint as dj
import numpy as np
from confluent_kafka import Consumer, TopicPartition

from bench.common import ROOT, cleanup, connect, facade, say, services_env, source_host
from bench.pull import declare_source
from djlink.process import NotReady, start_roles
from foundation.config import Settings
from foundation.topics import Topics

ROLES = ("capture", "agent", "applier")
WORKLOADS = ("snapshot", "pull", "blobs")
TARGET_MIB = 300
LOAD_STEP = 50_000  # rows per INSERT ... SELECT while loading
INTERVAL = 0.5  # seconds between samples
# sitecustomize.py of the role run with --tracemalloc: SIGUSR1 writes its live memory by call path.
TRACE_HOOK = """import os, signal, tracemalloc

def _dump(*_):
    out = os.environ["BENCH_TRACEMALLOC_OUT"]
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snap.statistics("traceback")
    with open(out + ".part", "w") as f:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        f.write(f"{sum(s.size for s in stats) / 2**20:.1f} MiB traced live, {peak:.1f} MiB at the peak\\n")
        for stat in stats[:12]:
            f.write(f"\\n{stat.size / 2**20:.1f} MiB in {stat.count} blocks, allocated at (innermost last):\\n")
            f.write("\\n".join(stat.traceback.format(limit=14)) + "\\n")
    os.replace(out + ".part", out)

if os.environ.get("BENCH_TRACEMALLOC_OUT"):
    tracemalloc.start(14)
    signal.signal(signal.SIGUSR1, _dump)
"""
DONE = re.compile(r"initial snapshot of \S+ done")  # the capture's log line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--snapshot-rows", type=int, default=1_000_000, help="rows of the initial snapshot (default 1000000)"
    )
    parser.add_argument(
        "--pull-entities", type=int, default=100_000, help="entities of workload W pulled (default 100000)"
    )
    parser.add_argument(
        "--blob-entities", type=int, default=2_000, help="entities with a 1 MiB blob pulled (default 2000)"
    )
    parser.add_argument("--blob-mib", type=int, default=1, help="MiB of each blob of the blobs workload (default 1)")
    parser.add_argument(
        "--blob-chunk-size",
        type=int,
        help="DJLINK_SNAPSHOT_CHUNK_SIZE for the blobs workload (default: djlink's, 500 entities)",
    )
    parser.add_argument("--only", choices=WORKLOADS, action="append", help="run only this workload (repeatable)")
    parser.add_argument(
        "--commit",
        metavar="REV",
        help="run the roles from this commit (`git archive` into a temporary folder), without the checkout's "
        "uncommitted changes; default: the checkout as it is. The façade runs from the checkout",
    )
    parser.add_argument(
        "--tracemalloc",
        choices=ROLES,
        help="run this role under tracemalloc (slower) and write, once the work is done, where its live memory "
        "was allocated (the top call paths) to tracemalloc.txt beside the logs",
    )
    parser.add_argument("--rss-limit", type=float, default=4000, help="MiB of any role that stops a workload")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds each workload may take (default 3600)")
    parser.add_argument("--keep", action="store_true", help="keep the schemas and topics")
    args = parser.parse_args(argv)
    if min(args.snapshot_rows, args.pull_entities, args.blob_entities, args.blob_mib) < 1:
        parser.error("sizes must be at least 1")
    return args


# -- memory ------------------------------------------------------------------------------------------------------


def status_kib(pid: int, field_name: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), or None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Sample:
    seconds: float
    progress: float  # fraction of the work done
    rss: dict[str, int]  # role -> KiB
    pending: int | None = None  # the applier's units read and not applied yet (its djlink_applier_pending_units)


@dataclass
class Sampler:
    """Samples the roles' RSS with the progress every INTERVAL s, in a thread, until stopped."""

    pids: dict[str, int]
    progress: Callable[[], float]
    limit_kib: float
    metrics_port: int | None = None  # the applier's /metrics
    samples: list[Sample] = field(default_factory=list)
    over: str | None = None  # 'role: MiB' once a role passed the limit
    failed: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def sample(self, progress: float | None = None) -> Sample:
        done = self.progress() if progress is None else progress
        rss = {role: status_kib(pid, "VmRSS") or 0 for role, pid in self.pids.items()}
        taken = Sample(time.monotonic() - self._started, done, rss, self.pending())
        self.samples.append(taken)
        for role, kib in rss.items():
            if kib > self.limit_kib and self.over is None:
                self.over = f"{role}: {kib / 1024:,.0f} MiB"
        return taken

    def pending(self) -> int | None:
        """The applier's gauge of units being gathered (events read, not applied yet), None if unknown."""
        if self.metrics_port is None:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return None
        found = re.search(r"^djlink_applier_pending_units (\S+)$", text, re.M)
        return int(float(found.group(1))) if found else None

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL):  # bounded: stop() ends it
            try:
                self.sample()
            except Exception as exc:  # a progress query that failed: keep sampling memory
                self.failed = f"{type(exc).__name__}: {exc}"
                self.samples.append(
                    Sample(
                        time.monotonic() - self._started,
                        self.samples[-1].progress if self.samples else 0.0,
                        {role: status_kib(pid, "VmRSS") or 0 for role, pid in self.pids.items()},
                    )
                )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def at(self, fraction: float) -> Sample | None:
        """The first sample taken once `fraction` of the work was done (the last one if none)."""
        return next((s for s in self.samples if s.progress >= fraction), self.samples[-1] if self.samples else None)

    def write(self, path: Path) -> None:
        """Every sample as CSV: seconds, progress, each role's RSS in MiB."""
        with path.open("w") as f:
            f.write(",".join(["seconds", "progress", *(f"{role}_mib" for role in ROLES), "applier_pending_units"]))
            for s in self.samples:
                rss = (f"{s.rss.get(role, 0) / 1024:.1f}" for role in ROLES)
                pending = "" if s.pending is None else str(s.pending)
                f.write("\n" + ",".join([f"{s.seconds:.1f}", f"{s.progress:.4f}", *rss, pending]))
            f.write("\n")


def mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f}"


def report(name: str, ready: dict[str, int], sampler: Sampler, peaks: dict[str, int | None]) -> list[str]:
    """The table of one workload: RSS at ready, 10/50/100 %, peak, growth 10 % -> 100 % (MiB)."""
    points = {label: sampler.at(f) for label, f in (("10 %", 0.1), ("50 %", 0.5), ("100 %", 1.0))}
    lines = [
        f"  {'role':<8} {'ready':>6} {'10 %':>6} {'50 %':>6} {'100 %':>6} {'peak':>6} {'10->100 %':>10}   (MiB)",
    ]
    for role in ROLES:
        at = {label: (s.rss.get(role) if s else None) for label, s in points.items()}
        ten, full = at["10 %"], at["100 %"]
        growth = f"{(full - ten) / 1024:+,.0f}" if ten is not None and full is not None else "-"
        peak = peaks.get(role)
        verdict = []
        if peak is not None and peak / 1024 >= TARGET_MIB:
            verdict.append(f"peak >= {TARGET_MIB} MiB")
        if ten is not None and full is not None and full - ten > max(10 * 1024, 0.1 * ten):
            verdict.append("grows")
        lines.append(
            f"  {role:<8} {mib(ready.get(role)):>6} {mib(at['10 %']):>6} {mib(at['50 %']):>6} "
            f"{mib(at['100 %']):>6} {mib(peak):>6} {growth:>10}   {'; '.join(verdict)}"
        )
    marks = ", ".join(f"{label} at {s.seconds:.0f} s ({s.progress:.0%})" for label, s in points.items() if s)
    known = [s for s in sampler.samples if s.pending is not None]
    if known:
        most = max(known, key=lambda s: s.pending or 0)
        top = max(sampler.samples, key=lambda s: s.rss.get("applier", 0))
        lines.append(
            f"  the applier's units read and not applied yet (djlink_applier_pending_units): at most {most.pending} "
            f"(at {most.seconds:.0f} s); {top.pending if top.pending is not None else '-'} at its highest RSS "
            f"({top.seconds:.0f} s)"
        )
    lines.append(f"  {len(sampler.samples)} samples every {INTERVAL} s; the first at or past each mark: {marks}")
    return lines


# -- the pipeline ------------------------------------------------------------------------------------------------


def start_roles_at(
    root: Path,
    env: dict[str, str],
    overrides: dict[str, str],
    log_dir: Path,
    traced: str | None = None,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """`djlink run --role X` for each role, from `root`, each once ready; logs in `log_dir`. The `traced` role
    runs under tracemalloc (TRACE_HOOK)."""
    procs: dict[str, Any] = {}
    try:
        for role in ROLES:
            log = open(log_dir / f"{role}.log", "w")  # the child's stderr, for as long as it runs
            full = {**os.environ, **env, "PYTHONPATH": str(root), **overrides}
            if role == "applier" and metrics_port is not None:
                full["DJLINK_METRICS_PORT"] = str(metrics_port)
            if role == traced:
                (log_dir / "hook").mkdir()
                (log_dir / "hook" / "sitecustomize.py").write_text(TRACE_HOOK)
                full["PYTHONPATH"] = f"{log_dir / 'hook'}{os.pathsep}{root}"
                full["BENCH_TRACEMALLOC_OUT"] = str(log_dir / "tracemalloc.txt")
            try:
                procs[role] = start_roles([role], full, root, log, 120)
            except NotReady:
                raise SystemExit(f"`djlink run --role {role}` did not become ready; see {log.name}") from None
    except BaseException:
        stop_roles(procs)
        raise
    return procs


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the applier's /metrics)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dump_traces(proc: Any, out: Path, timeout: float = 300) -> None:
    """Ask the role under tracemalloc for its live memory by call path (SIGUSR1) and wait for the file."""
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not out.exists() and time.monotonic() < deadline and proc.poll() is None:  # bounded: the deadline
        time.sleep(1)
    say(f"  tracemalloc: {out if out.exists() else 'no answer from the role'}")


def stop_roles(procs: dict[str, Any]) -> None:
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def export(rev: str, folder: Path) -> str:
    """The checkout's commit `rev` as files in `folder` (git archive): its short hash."""
    short = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", short], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(folder)], stdin=archive.stdout, check=True)
    if archive.wait(60) != 0:
        raise SystemExit(f"git archive {rev} failed")
    return short


def commit_of(root: Path) -> str:
    """`git rev-parse --short HEAD` of `root` (+ uncommitted changes to the pipeline's code), or 'unknown'."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "cdc", "consumers", "link", "foundation", "djlink"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{head} + uncommitted changes" if dirty else head


# -- the source tables -------------------------------------------------------------------------------------------


def blob_header(floats: int) -> bytes:
    """DataJoint's serialization of a float64 vector of `floats`, without its data (which follows it)."""
    packed: bytes = dj.blob.pack(np.zeros(floats), compress=False)
    return packed[: len(packed) - 8 * floats]


Statements = Callable[[int, int], list[tuple[str, tuple[Any, ...]]]]


def bulk(env: dict[str, str], db: str, statements: Statements, n: int) -> None:
    """Rows 1..n at the source in LOAD_STEP-row transactions of `statements(lo, hi)`, not in the binlog."""
    conn = connect(env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = 0")  # the capture reads these with snapshot reads only
        for lo in range(1, n + 1, LOAD_STEP):  # bounded: n / LOAD_STEP steps
            cur.execute("START TRANSACTION")
            for sql, params in statements(lo, min(n, lo + LOAD_STEP - 1)):
                cur.execute(sql, params)
            cur.execute("COMMIT")
        cur.execute(f"ANALYZE TABLE `{db}`.`recording`")
        cur.fetchall()
    conn.close()


def source_connection(env: dict[str, str]) -> dj.Connection:
    return dj.Connection(source_host(env), env["DJLINK_SOURCE_USER"], env["DJLINK_SOURCE_PASSWORD"], use_tls=False)


def declare_session(env: dict[str, str], db: str, n: int) -> None:
    """The snapshot's table: `Session`, n rows with a 128-byte longblob (16 float64), by bulk SQL."""
    schema = dj.Schema(db, connection=source_connection(env))

    @schema
    class Session(dj.Manual):
        definition = """
        session_id : int
        ---
        subject : varchar(32)
        value : double
        trace : longblob     # 128 bytes: 16 float64
        """

    header = blob_header(16)

    def rows(lo: int, hi: int) -> list[tuple[str, tuple[Any, ...]]]:
        return [
            (
                f"INSERT INTO `{db}`.`session` SELECT s.seq, CONCAT('m', MOD(s.seq, 1000)), s.seq / 7e0, "
                f"CONCAT(%s, REPEAT(UNHEX(MD5(s.seq)), 8)) FROM `{db}`.`seq_{lo}_to_{hi}` s",
                (header,),
            )
        ]

    bulk(env, db, rows, n)


def declare_w(env: dict[str, str], db: str, n: int, floats: int) -> None:
    """Workload W (bench/pull.py's tables), n entities with a blob of `floats` float64 and 4 part rows each."""
    declare_source(source_connection(env), db, 0)
    header = blob_header(floats)
    repeat = floats * 8 // 16  # UNHEX(MD5()): 16 bytes, different for every entity

    def rows(lo: int, hi: int) -> list[tuple[str, tuple[Any, ...]]]:
        seq = f"`{db}`.`seq_{lo}_to_{hi}` s"
        return [
            (
                f"INSERT INTO `{db}`.`recording` SELECT s.seq, CONCAT('m', s.seq), "
                f"CONCAT(%s, REPEAT(UNHEX(MD5(s.seq)), {repeat})) FROM {seq}",
                (header,),
            ),
            (
                f"INSERT INTO `{db}`.`recording__channel` SELECT s.seq, c.seq, s.seq + c.seq / 10e0 "
                f"FROM {seq} JOIN `{db}`.`seq_0_to_3` c",
                (),
            ),
        ]

    bulk(env, db, rows, n)


# -- the workloads -----------------------------------------------------------------------------------------------


def dest_count(env: dict[str, str], table: str, n: int) -> Callable[[], float]:
    """Progress of a pull: master rows at the destination over n (its own connection, for the sampler)."""
    conn = connect(env, "DEST")

    def progress() -> float:
        with conn.cursor() as cur:
            try:
                cur.execute(f"SELECT COUNT(*) FROM {table}")
            except Exception as exc:  # the table not made yet
                if "doesn't exist" in str(exc):
                    return 0.0
                raise
            return float(cur.fetchone()[0]) / n

    return progress


def snapshot_progress(env: dict[str, str], prefix: str, db: str, n: int, log: Path) -> tuple[Callable[[], float], Any]:
    """Progress of the initial snapshot: the change topic's committed end over n, 1.0 once the capture logs it
    done. Returns it and a function giving the topic's committed end offset."""
    settings = Settings.from_env({**env, "DJLINK_TOPIC_PREFIX": prefix})
    counter = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            **settings.kafka_properties,
            "group.id": f"{prefix}-bench-memory",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    tp = TopicPartition(Topics(prefix).table(db, "session"), 0)

    def end() -> int:
        try:
            return int(counter.get_watermark_offsets(tp, timeout=5, cached=False)[1])
        except Exception:  # the topic not made yet
            return 0

    def progress() -> float:
        if DONE.search(log.read_text(errors="replace")):
            return 1.0
        return min(end() / n, 0.999)

    return progress, end


@dataclass
class Outcome:
    name: str
    size: str
    seconds: float
    lines: list[str]
    peaks: dict[str, int | None]


def run_workload(name: str, env: dict[str, str], args: argparse.Namespace, root: Path) -> Outcome:
    tag = uuid.uuid4().hex[:8]
    base = f"bench_memory_{tag}"
    names = {"source": f"{base}_src", "helper": f"{base}_helper", "dest": f"{base}_dst"}
    state_db = f"{base}_applier"
    prefix = f"bench-memory-{tag}"
    pipeline = {
        "DJLINK_TOPIC_PREFIX": prefix,
        "DJLINK_ALLOWED_SCHEMAS": names["source"],
        "DJLINK_CAPTURE_SERVER_ID": str(8000 + uuid.uuid4().int % 100000),
        "DJLINK_APPLIER_STATE_DB": state_db,
    }
    if name == "snapshot":
        n, size = args.snapshot_rows, f"{args.snapshot_rows:,} rows (128-byte longblob), initial snapshot"
        pipeline["DJLINK_SNAPSHOT_MODE"] = "initial"
    elif name == "pull":
        n, size = args.pull_entities, f"{args.pull_entities:,} entities of W (8 KiB longblob + 4 part rows)"
    else:
        n = args.blob_entities
        size = f"{n:,} entities of W with a {args.blob_mib} MiB longblob (+ 4 part rows)"
        if args.blob_chunk_size:
            pipeline["DJLINK_SNAPSHOT_CHUNK_SIZE"] = str(args.blob_chunk_size)
    settings_note = ", ".join(f"{k}={v}" for k, v in pipeline.items() if k in ("DJLINK_SNAPSHOT_CHUNK_SIZE",))
    say(f"\n{name}: {size}{f' ({settings_note})' if settings_note else ''}")
    log_dir = Path(f"/tmp/bench-memory-{tag}")
    log_dir.mkdir()
    # the helper first: its foreign key to the source table keeps that from being dropped before it
    with cleanup(env, [names["helper"], names["source"]], prefix, args.keep, [names["dest"], state_db]):
        started = time.perf_counter()
        if name == "snapshot":
            declare_session(env, names["source"], n)
        else:
            declare_w(env, names["source"], n, 1024 if name == "pull" else args.blob_mib * 131072)
        say(f"  source filled (bulk SQL, no binlog) in {time.perf_counter() - started:.1f} s")

        metrics_port = free_port()
        procs = start_roles_at(root, env, pipeline, log_dir, args.tracemalloc, metrics_port)
        pids = {role: proc.pid for role, proc in procs.items()}
        try:
            ready = {role: status_kib(pid, "VmRSS") or 0 for role, pid in pids.items()}
            end: Callable[[], int] | None = None
            if name == "snapshot":
                progress, end = snapshot_progress(env, prefix, names["source"], n, log_dir / "capture.log")
            else:
                progress = dest_count(env, f"`{names['dest']}`.`recording`", n)
            sampler = Sampler(pids, progress, args.rss_limit * 1024, metrics_port)
            link = facade(env, pipeline)
            seconds, note = drive(name, link, env, names, n, sampler, procs, args)
            peaks = {role: status_kib(pid, "VmHWM") for role, pid in pids.items()}
            if args.tracemalloc:
                dump_traces(procs[args.tracemalloc], log_dir / "tracemalloc.txt")
        finally:
            stop_roles(procs)
        rate = f"{n / seconds:,.0f} {'rows' if name == 'snapshot' else 'entities'}/s" if seconds else ""
        say(f"  {note} in {seconds:.1f} s ({rate}); the roles' logs and samples.csv in {log_dir}")
        if end is not None:
            say(f"  change topic's committed end offset: {end():,} ({n:,} rows + transaction markers)")
        if sampler.failed:
            say(f"  a progress query failed once: {sampler.failed}")
        sampler.write(log_dir / "samples.csv")
        lines = report(name, ready, sampler, peaks)
        for line in lines:
            say(line)
        if name != "snapshot":
            entities_rows = query_count(env, f"`{state_db}`.`entities`")
            say(f"  the applier's state: {entities_rows} rows in {state_db}.entities")
    return Outcome(name, size, seconds, lines, peaks)


def query_count(env: dict[str, str], table: str) -> str:
    conn = connect(env, "DEST")
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {table}")
            return f"{cur.fetchone()[0]:,}"
    except Exception as exc:
        return f"unknown ({exc})"
    finally:
        conn.close()


def drive(
    name: str,
    link: Any,
    env: dict[str, str],
    names: dict[str, str],
    n: int,
    sampler: Sampler,
    procs: dict[str, Any],
    args: argparse.Namespace,
) -> tuple[float, str]:
    """Start the work (link the table; pull it), sample until it is done: (seconds, what was done)."""
    deadline = time.monotonic() + args.timeout
    started = time.perf_counter()
    sampler.start()
    try:
        if name == "snapshot":

            @link(source_host(env), names["source"], names["helper"], "outbound", names["dest"])
            class Session:
                """djlink's copy."""

            while not sampler.samples or sampler.samples[-1].progress < 1.0:  # bounded: the deadline
                check(sampler, procs, deadline)
                time.sleep(INTERVAL)
            seconds = time.perf_counter() - started
            sampler.stop()
            sampler.sample(1.0)
            return seconds, f"initial snapshot of {n:,} rows published"

        @link(source_host(env), names["source"], names["helper"], "outbound", names["dest"])
        class Recording:
            """djlink's copy."""

        table: Any = Recording
        outcome: dict[str, Any] = {}

        def pull() -> None:
            try:
                outcome["summary"] = table().source.pull(timeout=args.timeout)
            except BaseException as exc:  # reported below
                outcome["error"] = exc

        puller = threading.Thread(target=pull, daemon=True, name="pull")
        puller.start()
        while puller.is_alive():  # bounded: the deadline (the pull's own timeout is the same)
            check(sampler, procs, deadline)
            puller.join(INTERVAL)
        seconds = time.perf_counter() - started
        sampler.stop()
        sampler.sample(1.0 if "summary" in outcome else None)
        if "error" in outcome:
            raise SystemExit(f"the pull failed: {outcome['error']!r}")
        summary = outcome["summary"]
        if summary.pulled != n:
            say(f"  warning: pulled {summary.pulled} of {n}: {summary}")
        return seconds, f"pull of {summary.pulled:,} entities"
    finally:
        sampler.stop()


def check(sampler: Sampler, procs: dict[str, Any], deadline: float) -> None:
    """Stop a workload whose time is up, whose role exited or passed the RSS limit."""
    if time.monotonic() > deadline:
        done = sampler.samples[-1].progress if sampler.samples else 0.0
        raise SystemExit(f"the workload did not finish in time (progress {done:.0%})")
    for role, proc in procs.items():
        if proc.poll() is not None:
            raise SystemExit(f"`djlink run --role {role}` exited with {proc.returncode}")
    if sampler.over:
        raise SystemExit(f"a role passed --rss-limit: {sampler.over}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = services_env()
    with tempfile.TemporaryDirectory(prefix="djlink-bench-memory-") as folder:
        root, commit = ROOT, commit_of(ROOT)
        if args.commit:
            root, commit = Path(folder), export(args.commit, Path(folder))
        say(f"bench/memory: RSS of each role against < {TARGET_MIB} MiB and flat in table size; roles at {commit}")
        return run_all(env, args, root)


def run_all(env: dict[str, str], args: argparse.Namespace, root: Path) -> int:
    say(f"  load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    outcomes = []
    for name in args.only or WORKLOADS:
        outcomes.append(run_workload(name, env, args, root))
    say("\nsummary (MiB; target: peak < 300 and flat from 10 % to 100 %)")
    for outcome in outcomes:
        peaks = ", ".join(f"{role} {mib(outcome.peaks.get(role))}" for role in ROLES)
        say(f"  {outcome.name}: {outcome.size}, {outcome.seconds:.0f} s; peak {peaks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
