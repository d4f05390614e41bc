"""Capture speed: raw binlog decoding vs. the capture's committed events into Kafka, on one fixed binlog.

    python -m bench.capture                 # N = 100000 row changes
    python -m bench.capture --rows 5000     # a quick run
    python -m bench.capture --profile /tmp/capture.prof   # the capture under cProfile (slower; for hot spots)

1. Creates a fresh source schema with one DataJoint-like table (int primary
   key, varchar, double, datetime(6), a small longblob) and an unrelated
   schema with the same table, and records the source's `@@gtid_binlog_pos`.
2. Writes a fixed binlog: N row changes of the linked table, half as
   single-row transactions and half as 100-row transactions, inserts then a
   share of updates; plus changes in the unrelated schema (10 % of all by
   default), interleaved (both readers must read and skip them).
3. Raw decode: python-mysql-replication iterates exactly that binlog range
   (start GTID to the GTID position after the load), no Kafka, touching every
   row of the linked table: rows/s. It reads blocking, as the capture does,
   and stops at the end position itself (see README.md). Also with
   `freeze_schema=True`, for reference (the capture does not use it).
4. Capture: registers the link on the links topic as the source agent does,
   starts `python -m djlink run --role capture` at the start GTID, and counts,
   with a read_committed consumer, the committed (non-null) events on the
   table's change topic until all N arrived: events/s from "djlink: ready".
5. Prints both figures and their ratio (the issue's target: >= 0.8), then
   drops the schemas and the benchmark's topics (unless --keep).

Timing is printed, never asserted. Services come from `devtools.services`
(started when not running), so the source user is root.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import os
import pstats
import queue
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pymysql
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from pymysql.constants import CLIENT
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import MariadbGtidEvent, QueryEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

import schemas
from bench.common import ROOT, cleanup, connect, cpu_seconds, say, services_env
from cdc.rows import RowReader, decode_rows
from devtools.services import binlog_settings
from foundation.config import Settings
from foundation.kafka import produce, producer
from foundation.links import LinkSpec
from foundation.topics import Admin, Topics

TABLE = "recording"
OWN_DECODE = "djlink's own decode (freeze_schema + cdc.rows, no Kafka)"
ROW_EVENTS = (WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent)

DDL = """CREATE TABLE {db}.`{table}` (
  `recording_id` int NOT NULL COMMENT 'recording number',
  `label` varchar(64) NOT NULL COMMENT 'what was recorded',
  `value` double NOT NULL COMMENT 'a measurement',
  `recorded_at` datetime(6) NOT NULL COMMENT 'when',
  `payload` longblob COMMENT ':<djblob>:small serialized array',
  PRIMARY KEY (`recording_id`)
) ENGINE=InnoDB COMMENT='benchmark table (DataJoint manual table)'"""


def add_workload_options(ap: argparse.ArgumentParser) -> None:
    """The load's shape, shared with bench/debezium.py (which writes the same workload)."""
    ap.add_argument("--batch", type=int, default=100, help="rows per multi-row transaction")
    ap.add_argument("--single-share", type=float, default=0.5, help="share of N written as single-row transactions")
    ap.add_argument("--update-share", type=float, default=0.2, help="share of N that are UPDATEs (after the inserts)")
    ap.add_argument(
        "--unrelated-share", type=float, default=0.1, help="share of all changes that go to the unrelated schema"
    )
    ap.add_argument("--blob-bytes", type=int, default=128, help="size of each row's longblob")
    ap.add_argument("--workers", type=int, default=4, help="connections writing the load in parallel")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.capture",
        description="Capture speed: raw binlog decode rate vs. the capture's committed events/s into Kafka, "
        "on the same binlog range. Prints figures; asserts nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--rows", type=int, default=100_000, help="row changes of the linked table (N)")
    add_workload_options(ap)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed for each phase")
    ap.add_argument("--seed", type=int, default=1, help="random seed of the load (ids, order, payloads)")
    ap.add_argument("--repeat", type=int, default=1, help="raw decode runs per variant; the median counts")
    ap.add_argument("--skip-raw", action="store_true", help="measure only the capture")
    ap.add_argument("--no-frozen", action="store_true", help="skip the raw decode with freeze_schema=True")
    ap.add_argument(
        "--profile",
        metavar="PATH",
        help="run the capture under cProfile (every thread; bench/profile_capture.py), write PATH, print hot spots",
    )
    ap.add_argument(
        "--capture-root",
        metavar="DIR",
        default=str(ROOT),
        help="source tree whose capture runs (e.g. `git archive HEAD | tar -x -C DIR` for an A/B comparison)",
    )
    ap.add_argument(
        "--profile-clock",
        choices=["cpu", "wall", "off"],
        default="cpu",
        help="with --profile: cpu: each thread's CPU time (hot spots); wall: includes waits (Kafka commits, socket "
        "reads, the GIL); off: no profiler, only each thread's CPU seconds",
    )
    ap.add_argument(
        "--freeze-schema-experiment",
        action="store_true",
        help="run the capture (in bench/profile_capture.py) with python-mysql-replication's freeze_schema=True: "
        "what caching TABLE_MAP parsing would gain (not safe across ALTER TABLE as is)",
    )
    ap.add_argument("--capture-log", metavar="PATH", help="write the capture process's stderr (its log) to PATH")
    ap.add_argument("--keep", action="store_true", help="keep the schemas and topics afterwards")
    args = ap.parse_args(argv)
    if (
        args.rows < 2
        or args.batch < 1
        or args.repeat < 1
        or not 0 <= args.single_share <= 1
        or not 0 <= args.update_share <= 0.5
        or not 0 <= args.unrelated_share < 0.9
    ):
        ap.error(
            "need --rows >= 2, --batch >= 1, --repeat >= 1, 0 <= --single-share <= 1, 0 <= --update-share <= 0.5, "
            "0 <= --unrelated-share < 0.9"
        )
    return args


# -- the source ---------------------------------------------------------------


def query_one(env: dict[str, str], sql: str) -> Any:
    conn = connect(env)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def gtid_pos(text: str) -> dict[int, int]:
    """A MariaDB GTID position (`0-1-100,1-2-7`) as domain -> sequence number."""
    result: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        domain, _server, seq = part.split("-")
        result[int(domain)] = int(seq)
    return result


Job = Callable[[Any], int]  # runs on a cursor, returns the row changes it made


@dataclasses.dataclass
class Load:
    jobs: list[list[Job]]  # phases, run one after the other (inserts, then updates)
    rows: int  # row changes of the table the job list was made for
    transactions: int


def plan(db: str, n: int, args: argparse.Namespace, rng: random.Random) -> Load:
    """Jobs writing `n` row changes to `db`.TABLE: single-row and multi-row transactions, inserts then updates."""
    table = f"`{db}`.`{TABLE}`"
    single = round(n * args.single_share)
    multi = n - single
    upd_single = round(single * args.update_share)
    upd_multi = round(multi * args.update_share)
    ins_single, ins_multi = single - upd_single, multi - upd_multi
    inserted = ins_single + ins_multi
    base = dt.datetime(2024, 1, 1)

    def row(i: int) -> tuple[Any, ...]:
        return (
            i,
            f"session {i} / {rng.randrange(1000)}",
            rng.random() * 100,
            base + dt.timedelta(seconds=i, microseconds=i % 997),
            rng.randbytes(args.blob_bytes),
        )

    insert = f"INSERT INTO {table} (recording_id, label, value, recorded_at, payload) VALUES (%s, %s, %s, %s, %s)"
    ids = list(range(1, inserted + 1))
    transactions = 0

    def statements(sqls: list[str]) -> Job:
        # Each statement commits on its own (autocommit): one transaction each, one round trip for all.
        def run(cur: Any) -> int:
            cur.execute(";".join(sqls))
            while cur.nextset():
                pass
            return len(sqls)

        return run

    def many(sql: str, params: list[tuple[Any, ...]]) -> Job:
        def run(cur: Any) -> int:
            return int(cur.executemany(sql, params))  # one multi-row INSERT statement: one transaction

        return run

    def one(sql: str, params: tuple[Any, ...]) -> Job:
        def run(cur: Any) -> int:
            return int(cur.execute(sql, params))

        return run

    # Phase 1: inserts. The first ins_single ids one row per transaction, the rest in blocks of `batch`.
    inserts: list[Job] = []
    esc = pymysql.converters.escape_item
    pending: list[str] = []
    for i in ids[:ins_single]:
        pending.append(insert % tuple(esc(v, "utf8mb4") for v in row(i)))
        if len(pending) == 200:
            inserts.append(statements(pending))
            pending = []
    if pending:
        inserts.append(statements(pending))
    transactions += ins_single
    rest = ids[ins_single:]
    for start in range(0, len(rest), args.batch):
        inserts.append(many(insert, [row(i) for i in rest[start : start + args.batch]]))
        transactions += 1

    # Phase 2: updates of existing rows (value + 1 always changes the row, so every one is logged).
    updates: list[Job] = []
    update = f"UPDATE {table} SET value = value + 1, label = CONCAT('updated ', recording_id) WHERE recording_id"
    pending = []
    for _ in range(upd_single):
        pending.append(f"{update} = {rng.randint(1, inserted)}")
        if len(pending) == 200:
            updates.append(statements(pending))
            pending = []
    if pending:
        updates.append(statements(pending))
    transactions += upd_single
    left = upd_multi
    while left > 0:
        k = min(args.batch, left, inserted)
        first = rng.randint(1, inserted - k + 1)
        updates.append(one(f"{update} BETWEEN %s AND %s", (first, first + k - 1)))
        transactions += 1
        left -= k
    return Load([inserts, updates], n, transactions)


def run_phase(env: dict[str, str], jobs: list[Job], workers: int, deadline: float) -> int:
    """Run `jobs` over `workers` connections in parallel; the row changes they made."""
    work: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        work.put(job)
    counts: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        n = 0
        try:
            conn = connect(env, client_flag=CLIENT.MULTI_STATEMENTS)
            try:
                with conn.cursor() as cur:
                    while not errors and time.monotonic() < deadline:
                        try:
                            job = work.get_nowait()
                        except queue.Empty:
                            break
                        n += job(cur)
            finally:
                conn.close()
        except BaseException as exc:
            errors.append(exc)
        finally:
            counts.append(n)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads) or not work.empty():
        raise TimeoutError("generating the load took longer than --timeout")
    return sum(counts)


def generate(env: dict[str, str], loads: list[Load], workers: int, rng: random.Random, timeout: float) -> int:
    """Run the loads' phases in order (inserts, then updates), each phase's jobs shuffled together."""
    done = 0
    deadline = time.monotonic() + timeout
    for phase in range(max(len(load.jobs) for load in loads)):
        jobs = [job for load in loads if phase < len(load.jobs) for job in load.jobs[phase]]
        rng.shuffle(jobs)
        done += run_phase(env, jobs, workers, deadline)
    return done


# -- raw decoding -------------------------------------------------------------


@dataclasses.dataclass
class RawResult:
    rows: int
    skipped_events: int
    transactions: int
    reconnects: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class ReconnectCounter(logging.Handler):
    """Counts (and silences) python-mysql-replication's warnings that it reconnected after a lost connection."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Re-request the connection" in record.getMessage():
            self.count += 1

    @contextmanager
    def installed(self) -> Iterator[ReconnectCounter]:
        lib = logging.getLogger("pymysqlreplication")
        saved = lib.propagate
        lib.addHandler(self)
        lib.propagate = False
        try:
            yield self
        finally:
            lib.removeHandler(self)
            lib.propagate = saved


def raw_decode(
    env: dict[str, str], start: str, end: str, db: str, freeze_schema: bool, timeout: float, compiled: bool = False
) -> RawResult:
    """Iterate the binlog from `start` to `end` as the capture reads it, no Kafka; count the table's rows.

    Like the capture, it moves `auto_position` to each committed transaction, so
    that a reconnect (the library's own, after a lost connection) resumes there
    instead of replaying the range; rows count when their transaction commits.
    With `compiled`, rows are decoded by the capture's own reader (`cdc.rows`) instead of the library's.
    """
    pending = {d: s for d, s in gtid_pos(end).items() if gtid_pos(start).get(d) != s}
    t0, cpu0 = time.perf_counter(), time.process_time()
    stream = BinLogStreamReader(
        connection_settings=binlog_settings(env),
        server_id=7000 + uuid.uuid4().int % 100_000,
        is_mariadb=True,
        auto_position=start,
        # Blocking, as the capture reads; we stop at `end` ourselves. Non-blocking dumps (which end with an EOF
        # packet) were reset by this MariaDB again and again while others wrote, and each reset replays the range.
        blocking=True,
        freeze_schema=freeze_schema,
        only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent, MariadbGtidEvent, XidEvent, QueryEvent],
    )
    rows = in_transaction = skipped = transactions = 0
    current: MariadbGtidEvent | None = None
    readers: dict[int, RowReader | None] = {}
    with ReconnectCounter().installed() as reconnects:
        try:
            for ev in stream:
                if isinstance(ev, MariadbGtidEvent):
                    current, in_transaction = ev, 0
                elif isinstance(ev, ROW_EVENTS):
                    if ev.schema == db and ev.table == TABLE and compiled:
                        if ev.table_id not in readers:
                            readers[ev.table_id] = RowReader.compile(ev.columns)
                        for before, after in decode_rows(ev, readers[ev.table_id]):
                            values = after if after is not None else before
                            if values is not None and values["recording_id"] is not None:
                                in_transaction += 1
                    elif ev.schema == db and ev.table == TABLE:
                        for row in ev.rows:
                            values = row["after_values"] if "after_values" in row else row["values"]
                            if values["recording_id"] is not None:  # touch the decoded row
                                in_transaction += 1
                    else:
                        skipped += 1
                elif isinstance(ev, XidEvent) or (isinstance(ev, QueryEvent) and ev.query.upper() != "BEGIN"):
                    transactions += 1
                    rows += in_transaction
                    in_transaction = 0
                    if current is not None:
                        stream.auto_position = current.gtid
                        if pending.get(current.domain_id, 1 << 64) <= current.gtid_seq_no:
                            del pending[current.domain_id]
                            if not pending:
                                break
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"raw decoding took more than {timeout:.0f} s")
        finally:
            stream.close()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return RawResult(rows, skipped, transactions, reconnects.count, seconds, cpu)


# -- the capture --------------------------------------------------------------


@dataclasses.dataclass
class CaptureResult:
    events: int
    from_start: float  # seconds from process start to the N-th committed event
    from_ready: float  # seconds from "djlink: ready" to the N-th committed event
    first_event: float  # seconds from ready to the first committed event
    cpu_seconds: float  # user + system of the capture process (all its threads)
    reconnects: int  # binlog connections the source dropped (the library's "Re-request the connection")
    cpu_at_ready: float = 0.0  # CPU seconds of the capture process when it said "djlink: ready" (from /proc)
    cpu_at_done: float = 0.0  # ... when the N-th event arrived (from /proc)
    half: float = 0.0  # seconds from ready to the (N/2)-th committed event

    @property
    def second_half_rate(self) -> float:
        """Events/s over the second half of the events (warmed up)."""
        seconds = self.from_ready - self.half
        return (self.events - self.events // 2) / seconds if seconds > 0 else 0.0

    @property
    def rate(self) -> float:
        return self.events / self.from_ready if self.from_ready > 0 else 0.0


def create_schemas(env: dict[str, str], names: list[str]) -> None:
    """Fresh schemas on the source, each with the benchmark's table."""
    conn = connect(env)
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"CREATE DATABASE `{name}`")
            cur.execute(DDL.format(db=f"`{name}`", table=TABLE))
    conn.close()


def prepare_capture(env: dict[str, str], db: str, prefix: str, start_gtid: str) -> tuple[str, dict[str, str]]:
    """Register the link of `db`.TABLE under `prefix`; the change topic and the capture's environment from
    `start_gtid` (with a fresh server id)."""
    settings = Settings.from_env({**env, "DJLINK_TOPIC_PREFIX": prefix})
    topics = Topics(prefix)
    spec = dataclasses.replace(
        LinkSpec.new(db, TABLE, f"{db}_helper", f"~{TABLE}_outbound", f"{db}_dest"), primary_key=("recording_id",)
    )
    register_link(settings, topics, spec)
    capture_env = {
        **env,
        "DJLINK_TOPIC_PREFIX": prefix,
        "DJLINK_CAPTURE_START_GTID": start_gtid,
        "DJLINK_CAPTURE_SERVER_ID": str(6000 + uuid.uuid4().int % 100_000),
    }
    return topics.table(db, TABLE), capture_env


def register_link(settings: Settings, topics: Topics, spec: LinkSpec) -> None:
    """What the agent's registration (consumers.agent.registration) does for the capture: topics, then the link."""
    admin = Admin(settings)
    admin.ensure_control(topics)
    admin.ensure(topics.table(db, t) for db, t in spec.captured_tables())
    p = producer(settings)
    produce(p, topics.links, spec.link_id, schemas.Codec().encode(schemas.FIXED["link"], spec.to_avro()))
    if p.flush(30):
        raise RuntimeError("the link record was not delivered")


def run_capture(
    env: dict[str, str],
    topic: str,
    expected: int,
    profile: str | None,
    timeout: float,
    root: Path,
    log_path: str | None = None,
    profile_clock: str = "cpu",
) -> CaptureResult:
    settings = Settings.from_env(env)
    counter = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{settings.topic_prefix}-bench-counter",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,
        }
    )
    counter.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    if profile:
        # The wrapper comes from this checkout, the capture it runs from `root`.
        args = [sys.executable, str(ROOT / "bench" / "profile_capture.py"), profile, profile_clock]
    elif env.get("BENCH_FREEZE_SCHEMA") == "1":
        args = [sys.executable, str(ROOT / "bench" / "profile_capture.py"), os.devnull, "off"]
    else:
        args = [sys.executable, "-m", "djlink", "run", "--role", "capture"]
    stderr = tempfile.TemporaryFile("w+")
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(
        args,
        env={**os.environ, **env, "PYTHONPATH": str(root)},
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    ready_at: list[float] = []
    cpu_ready: list[float] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "djlink: ready" in line and not ready_at:
                ready_at.append(time.monotonic())
                cpu_ready.append(cpu_seconds(proc.pid))

    threading.Thread(target=pump, daemon=True).start()
    count = 0
    first = half = done = cpu_done = 0.0
    done_wall = float("inf")
    next_report = started + 10
    try:
        while count < expected:
            now = time.monotonic()
            if now - started > timeout:
                raise TimeoutError(f"the capture committed {count} of {expected} events in {timeout:.0f} s")
            if proc.poll() is not None:
                stderr.seek(0)
                raise RuntimeError(f"the capture exited with {proc.returncode}:\n{stderr.read()[-3000:]}")
            if now >= next_report:
                say(f"  ... {count:,} events committed after {now - started:.0f} s")
                next_report += 10
            for msg in counter.consume(10_000, 0.1):
                if msg.error() is None and msg.value() is not None:
                    count += 1
                    if count == 1:
                        first = time.monotonic()
                    if count == expected // 2:
                        half = time.monotonic()
                    if count >= expected:
                        done, done_wall = time.monotonic(), time.time()
                        cpu_done = cpu_seconds(proc.pid)
                        break
    finally:
        counter.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60 if profile else 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        stderr.seek(0)
        log = stderr.read()
        stderr.close()
        if log_path:
            Path(log_path).write_text(log)
        reconnects = count_reconnects(log, before=done_wall)
        for line in log.splitlines():
            if line.startswith("profile:"):
                say(f"  {line}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    ready = ready_at[0] if ready_at else started
    return CaptureResult(
        count,
        done - started,
        done - ready,
        first - ready,
        (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime),
        reconnects,
        cpu_ready[0] if cpu_ready else 0.0,
        cpu_done,
        half - ready,
    )


def count_reconnects(log: str, before: float) -> int:
    """The library's reconnects in a `djlink run` log, up to wall time `before` (stopping the capture causes one)."""
    count = 0
    stamp = 0.0
    for line in log.splitlines():
        with suppress(ValueError):
            stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if "Re-request the connection" in line and stamp < before:
            count += 1
    return count


def print_hot_spots(path: str, limit: int = 25, roots: str = "cdc|djlink|schemas") -> None:
    """The profile's top functions by cumulative time in djlink's code, then by own time anywhere."""
    if not Path(path).exists():
        say(f"no profile at {path}")
        return
    stats = pstats.Stats(path)
    stats.sort_stats("cumulative")
    say(f"\nprofile {path}: top {limit} by cumulative time in {', '.join(r + '/' for r in roots.split('|'))}")
    stats.print_stats(rf"/({roots})/", limit)
    stats.sort_stats("tottime")
    say(f"profile {path}: top {limit} by own time, anywhere")
    stats.print_stats(limit)


# -- main ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = services_env()
    tag = uuid.uuid4().hex[:8]
    db, other = f"bench_capture_{tag}", f"bench_capture_{tag}_unrelated"
    prefix = f"bench-capture-{tag}"
    rng = random.Random(args.seed)
    n_other = round(args.rows * args.unrelated_share / (1 - args.unrelated_share))
    say(f"bench/capture: N={args.rows:,} row changes of `{db}`.`{TABLE}` + {n_other:,} in `{other}` (not linked)")
    say(f"  source {env['DJLINK_SOURCE_HOST']}:{env['DJLINK_SOURCE_PORT']}, Kafka {env['DJLINK_KAFKA_BOOTSTRAP']}")
    say(f"  load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

    with cleanup(env, [db, other], prefix, args.keep):
        # 1. Schemas, then the start position.
        create_schemas(env, [db, other])
        start_gtid = query_one(env, "SELECT @@gtid_binlog_pos") or ""

        # 2. The fixed binlog.
        load = plan(db, args.rows, args, rng)
        unrelated = plan(other, n_other, args, rng)
        t0 = time.perf_counter()
        written = generate(env, [load, unrelated], args.workers, rng, args.timeout)
        gen_s = time.perf_counter() - t0
        end_gtid = query_one(env, "SELECT @@gtid_binlog_pos") or ""
        say(
            f"generation: {written:,} row changes in {load.transactions + unrelated.transactions:,} transactions "
            f"({load.transactions:,} on the linked table) in {gen_s:.1f} s ({written / gen_s:,.0f} rows/s); "
            f"binlog range {start_gtid} .. {end_gtid}"
        )

        # 3. Raw decoding of that range.
        raws: list[tuple[str, RawResult]] = []
        if not args.skip_raw:
            variants = [("raw decode", False, False)]
            if not args.no_frozen:
                variants += [("raw decode, freeze_schema", True, False), (OWN_DECODE, True, True)]
            for label, frozen, own in variants:
                runs = [
                    raw_decode(env, start_gtid, end_gtid, db, frozen, args.timeout, own) for _ in range(args.repeat)
                ]
                r = sorted(runs, key=lambda x: x.rate)[len(runs) // 2]  # the median run
                raws.append((label, r))
                if len(runs) > 1:
                    label += f" (median of {len(runs)}: {', '.join(f'{x.rate:,.0f}' for x in runs)} rows/s)"
                say(
                    f"{label}: {r.rows:,} rows of the linked table in {r.seconds:.1f} s = {r.rate:,.0f} rows/s "
                    f"({r.cpu_seconds:.1f} s CPU; {r.transactions:,} transactions, {r.skipped_events:,} row events "
                    f"of other tables skipped; {r.reconnects} reconnects)"
                )
                if r.reconnects:
                    say(f"  warning: the source dropped the connection {r.reconnects} times (included in the rate)")
                if r.rows != args.rows:
                    say(f"  warning: expected {args.rows:,} rows, decoded {r.rows:,}")

        # 4. The capture into Kafka.
        topic, capture_env = prepare_capture(env, db, prefix, start_gtid)
        if args.freeze_schema_experiment:
            capture_env["BENCH_FREEZE_SCHEMA"] = "1"
        say(
            f"capture: {'profiled ' if args.profile else ''}{'freeze_schema ' if args.freeze_schema_experiment else ''}"
            f"`djlink run --role capture` from GTID {start_gtid}, "
            f"code in {args.capture_root}"
        )
        c = run_capture(
            capture_env,
            topic,
            args.rows,
            args.profile,
            args.timeout,
            Path(args.capture_root),
            args.capture_log,
            args.profile_clock,
        )
        say(
            f"capture into Kafka: {c.events:,} committed events in {c.from_ready:.1f} s from ready "
            f"({c.from_start:.1f} s from process start; first event {c.first_event:.2f} s after ready) "
            f"= {c.rate:,.0f} events/s ({c.events / c.from_start:,.0f} from start); "
            f"capture process {c.cpu_seconds:.1f} s CPU; {c.reconnects} binlog reconnects"
        )

        if c.reconnects:
            say(f"  warning: the source dropped the capture's binlog connection {c.reconnects} times")

        # 5. Figures.
        say("")
        say(f"generation: {gen_s:.1f} s for {written:,} row changes")
        for label, r in raws:
            say(f"{label}: {r.rate:,.0f} rows/s ({r.seconds:.1f} s)")
        say(f"capture into Kafka: {c.rate:,.0f} events/s ({c.from_ready:.1f} s from ready)")
        if raws:
            raw = raws[0][1]
            line = f"ratio capture/raw: {c.rate / raw.rate:.2f} (target >= 0.8)"
            if len(raws) > 1:
                line += f"; vs. raw with freeze_schema: {c.rate / raws[1][1].rate:.2f}"
            say(line)
            if len(raws) > 2:
                say(
                    f"ratio capture/{OWN_DECODE}: {c.rate / raws[2][1].rate:.2f} (1 - this is the share of the "
                    "capture's time that Kafka, Avro and checkpointing cost)"
                )
            say(
                f"CPU: raw decode {raw.cpu_seconds / raw.rows * 1e6:,.0f} µs/row, capture process "
                f"{c.cpu_seconds / c.events * 1e6:,.0f} µs/event (all its threads, start-up included); "
                f"CPU ratio raw/capture {raw.cpu_seconds / raw.rows / (c.cpu_seconds / c.events):.2f}"
            )
            say(
                f"summary: raw decode: {raw.rate:,.0f} rows/s; capture into Kafka: {c.rate:,.0f} events/s; "
                f"ratio {c.rate / raw.rate:.2f} (target >= 0.8)"
            )
        if args.profile and args.profile_clock != "off":
            say("  (profiled run: cProfile slows the capture; take its rate as a lower bound)")
            print_hot_spots(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
