"""`djlink verify` on a large linked table, against a full table transfer compared in Python, in the same run.

    python -m bench.verify                       # N = 1,000,000 entities, 2 part rows each
    python -m bench.verify --entities 100000     # a quicker run
    python -m bench.verify --help

The table: N entities of a DataJoint-like `recording` (int key, varchar,
date, double, datetime(6), a nullable varchar, a 128-byte longblob) with P
part rows each in `recording__channel` (default 2: tinyint key, double,
varchar). It is written directly at both servers with bulk SQL (INSERT ...
SELECT from MariaDB's `seq_<a>_to_<b>` tables, without the binlog at the
source), not through the pipeline: the source rows, one helper row per entity
marking it Shared (process NONE, not flagged, not deprecated), and the same
rows at the destination. The link is registered on a fresh prefix's links
topic as the source agent would, and then, each timed with the CPU seconds of
both servers and of this process:

1. **djlink verify**, in this process (`djlink.verify.command.verify_link`,
   chunks of `--chunk-size` entities): entities/s, the queries it sent.
2. **Full table transfer** (the peer): in one consistent snapshot at each
   server, every shared master and part row of the source (joined with the
   helper rows) and every row of the destination, ordered by key, streamed
   with PyMySQL's SSCursor and compared tuple by tuple in Python.
3. **One planted difference**: one part row's `gain` changed at the
   destination, then verify again: what the drill-down to that entity costs.

Prints entities/s and CPU seconds per 100,000 entities for each, and the
ratio verify / full transfer. Figures, never assertions; the schemas and
topics are dropped afterwards (unless --keep). With DJLINK_TEST_EXTERNAL=1,
the servers' processes are found by the ports they listen on (when they run
on this machine) so that their CPU seconds count.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql

from bench.capture import register_link
from bench.common import CpuMeter, cleanup, connect, say, service_pids, services_env
from djlink.verify import command, servers
from djlink.verify.compare import LinkResult, Options
from foundation.config import Settings
from foundation.links import LinkSpec
from foundation.topics import Topics

MASTER, PART, HELPER = "recording", "recording__channel", "outbound"
LOAD_STEP = 100_000  # entities per INSERT ... SELECT while loading
FETCH = 10_000  # rows per fetchmany of the full transfer

MASTER_DDL = """CREATE TABLE {db}.`recording` (
  `recording_id` int unsigned NOT NULL COMMENT 'recording number',
  `subject` varchar(32) NOT NULL COMMENT 'who',
  `session_date` date NOT NULL COMMENT 'which session',
  `value` double NOT NULL COMMENT 'a measurement',
  `recorded_at` datetime(6) NOT NULL COMMENT 'when',
  `note` varchar(255) DEFAULT NULL COMMENT 'a remark, or none',
  `trace` longblob NOT NULL COMMENT ':<djblob>:a small serialized array',
  PRIMARY KEY (`recording_id`)
) ENGINE=InnoDB COMMENT='benchmark table (DataJoint manual table)'"""

PART_DDL = """CREATE TABLE {db}.`recording__channel` (
  `recording_id` int unsigned NOT NULL COMMENT 'recording number',
  `channel` tinyint unsigned NOT NULL COMMENT 'electrode',
  `gain` double NOT NULL COMMENT 'amplifier gain',
  `label` varchar(16) NOT NULL COMMENT 'its name',
  PRIMARY KEY (`recording_id`, `channel`),
  FOREIGN KEY (`recording_id`) REFERENCES {db}.`recording` (`recording_id`)
) ENGINE=InnoDB COMMENT='its part table'"""

HELPER_DDL = """CREATE TABLE {helper} (
  `recording_id` int unsigned NOT NULL COMMENT 'recording number',
  `process` enum('PULL','DELETE','NONE') NOT NULL COMMENT '',
  `is_flagged` enum('TRUE','FALSE') NOT NULL COMMENT '',
  `is_deprecated` enum('TRUE','FALSE') NOT NULL COMMENT '',
  PRIMARY KEY (`recording_id`),
  FOREIGN KEY (`recording_id`) REFERENCES {db}.`recording` (`recording_id`) ON UPDATE CASCADE ON DELETE RESTRICT
) ENGINE=InnoDB COMMENT='djlink helper table: sharing state of each entity'"""

# The same expressions at both servers make the same rows (s: the entity's number, c: the part's).
MASTER_ROW = (
    "s.seq, CONCAT('mouse ', s.seq % 1000), DATE'2020-01-01' + INTERVAL (s.seq % 3650) DAY, s.seq / 7e0, "
    "TIMESTAMP'2020-01-01 00:00:00' + INTERVAL (s.seq * 1001) MICROSECOND, "
    "IF(s.seq % 10 = 0, NULL, CONCAT('note ', s.seq)), REPEAT(UNHEX(MD5(s.seq)), 8)"
)
PART_ROW = "s.seq, c.seq, s.seq + c.seq / 10e0, CONCAT('ch', c.seq)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=1_000_000, help="N, entities (default 1000000)")
    parser.add_argument("--parts", type=int, default=2, help="part rows per entity (default 2, at most 255)")
    parser.add_argument("--chunk-size", type=int, default=1000, help="verify's entities per checksum (default 1000)")
    parser.add_argument("--progress", action="store_true", help="show verify's progress bar")
    parser.add_argument("--skip-peer", action="store_true", help="skip the full table transfer")
    parser.add_argument("--keep", action="store_true", help="keep the schemas and topics")
    args = parser.parse_args(argv)
    if args.entities < 2 or not 1 <= args.parts <= 255:
        parser.error("--entities must be at least 2 and --parts between 1 and 255")
    return args


# -- where the CPU seconds go ------------------------------------------------------------------------------------


def listening_pid(port: int) -> int | None:
    """The process on this machine listening on TCP `port` (IPv4 or IPv6), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    return None


def server_pids(env: dict[str, str]) -> dict[str, int]:
    """The services' processes: the local ones by their pid files, external ones on this machine by their ports."""
    found = service_pids()
    if found:
        return found
    for name, port in (("source", env["DJLINK_SOURCE_PORT"]), ("dest", env["DJLINK_DEST_PORT"])):
        host = env[f"DJLINK_{'SOURCE' if name == 'source' else 'DEST'}_HOST"]
        pid = listening_pid(int(port)) if host in ("127.0.0.1", "localhost", "::1") else None
        if pid is not None:
            found[name] = pid
    return found


@contextmanager
def metered(pids: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Wall and CPU seconds of a block: {'seconds', 'cpu', 'report'} once it ends."""
    meter = CpuMeter(pids)
    out: dict[str, Any] = {}
    meter.start()
    started = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - started
        meter.stop()
        out["cpu"] = sum(meter.used.values())
        out["report"] = meter.report(out["seconds"])


@contextmanager
def counted_queries() -> Iterator[list[int]]:
    """How many statements verify's snapshots send while the block runs (the benchmark's own instrument)."""
    count = [0]
    original = servers.Snapshot.rows

    def rows(self: servers.Snapshot, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
        count[0] += 1
        return original(self, statement, params)

    servers.Snapshot.rows = rows  # type: ignore[method-assign]
    try:
        yield count
    finally:
        servers.Snapshot.rows = original  # type: ignore[method-assign]


# -- the table at both servers -----------------------------------------------------------------------------------


def load(env: dict[str, str], names: dict[str, str], n: int, parts: int) -> None:
    """The source rows, their helper rows (Shared) and the same rows at the destination, by bulk SQL."""
    for side in ("SOURCE", "DEST"):
        db = f"`{names['source' if side == 'SOURCE' else 'dest']}`"
        conn = connect(env, side)
        with conn.cursor() as cur:
            if side == "SOURCE":
                cur.execute("SET SESSION sql_log_bin = 0")  # no binlog: nothing for any capture to read
            cur.execute("SET SESSION foreign_key_checks = 0, unique_checks = 0")
            cur.execute(f"CREATE DATABASE {db}")
            cur.execute(MASTER_DDL.format(db=db))
            cur.execute(PART_DDL.format(db=db))
            helper = f"`{names['helper']}`.`{HELPER}`"
            if side == "SOURCE":
                cur.execute(f"CREATE DATABASE `{names['helper']}`")
                cur.execute(HELPER_DDL.format(helper=helper, db=db))
            for lo in range(1, n + 1, LOAD_STEP):  # bounded: N / LOAD_STEP statements of each kind
                seq = f"{db}.`seq_{lo}_to_{min(n, lo + LOAD_STEP - 1)}` s"
                cur.execute("START TRANSACTION")
                cur.execute(f"INSERT INTO {db}.`{MASTER}` SELECT {MASTER_ROW} FROM {seq}")
                cur.execute(
                    f"INSERT INTO {db}.`{PART}` SELECT {PART_ROW} FROM {seq} JOIN {db}.`seq_0_to_{parts - 1}` c"
                )
                if side == "SOURCE":
                    cur.execute(f"INSERT INTO {helper} SELECT s.seq, 'NONE', 'FALSE', 'FALSE' FROM {seq}")
                cur.execute("COMMIT")
            cur.execute(f"ANALYZE TABLE {db}.`{MASTER}`, {db}.`{PART}`")
            cur.fetchall()
        conn.close()


# -- the two ways to compare -------------------------------------------------------------------------------------


def run_verify(settings: Settings, link_id: str, args: argparse.Namespace) -> tuple[LinkResult, int]:
    """`djlink verify LINK` in this process: its result and the statements it sent."""
    with counted_queries() as count:
        [spec] = command.links(settings, [link_id])
        result = command.verify_link(settings, spec, Options(chunk_size=args.chunk_size), True, args.progress)
    return result, count[0]


def stream(conn: Any, statement: str) -> Iterator[tuple[Any, ...]]:
    """The rows of `statement`, unbuffered (SSCursor), fetched FETCH at a time."""
    with conn.cursor(pymysql.cursors.SSCursor) as cur:
        cur.execute(statement)
        while rows := cur.fetchmany(FETCH):  # bounded: the result set ends
            yield from rows


def merge(source: Iterator[tuple[Any, ...]], destination: Iterator[tuple[Any, ...]], key: int) -> tuple[int, set[Any]]:
    """Two row streams ordered by their first `key` columns: (rows compared, entities that differ)."""
    compared, differ = 0, set()
    a, b = next(source, None), next(destination, None)
    while a is not None or b is not None:  # bounded: every turn consumes a row of one stream or both
        if b is None or (a is not None and a[:key] < b[:key]):
            assert a is not None
            differ.add(a[0])  # missing at the destination
            a = next(source, None)
        elif a is None or b[:key] < a[:key]:
            differ.add(b[0])  # extra at the destination
            b = next(destination, None)
        else:
            compared += 1
            if a != b:
                differ.add(a[0])
            a, b = next(source, None), next(destination, None)
    return compared, differ


def full_transfer(env: dict[str, str], names: dict[str, str]) -> tuple[int, set[Any]]:
    """Every shared row of both tables from both servers, ordered by key, compared in Python: (master rows
    compared, entities that differ)."""
    src, dst = connect(env, "SOURCE", autocommit=False), connect(env, "DEST", autocommit=False)
    try:
        for conn in (src, dst):
            with conn.cursor() as cur:
                cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        shared = (
            f"JOIN `{names['helper']}`.`{HELPER}` h ON h.recording_id = t.recording_id "
            "AND h.process = 'NONE' AND h.is_deprecated = 'FALSE'"
        )
        differ: set[Any] = set()
        entities = 0
        for table, order in ((MASTER, "t.recording_id"), (PART, "t.recording_id, t.channel")):
            compared, found = merge(
                stream(src, f"SELECT t.* FROM `{names['source']}`.`{table}` t {shared} ORDER BY {order}"),
                stream(dst, f"SELECT t.* FROM `{names['dest']}`.`{table}` t ORDER BY {order}"),
                key=1 if table == MASTER else 2,
            )
            differ |= found
            if table == MASTER:
                entities = compared
        return entities, differ
    finally:
        for conn in (src, dst):
            conn.rollback()
            conn.close()


# -- the run -----------------------------------------------------------------------------------------------------


def rate_line(label: str, entities: int, run: dict[str, Any]) -> str:
    per = run["cpu"] / entities * 100_000 if entities else 0.0
    return (
        f"{label}: {entities / run['seconds']:,.0f} entities/s ({entities:,} in {run['seconds']:.1f} s), "
        f"{per:.1f} CPU-s per 100,000 entities"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = services_env()
    tag = uuid.uuid4().hex[:8]
    base = f"bench_verify_{tag}"
    names = {"source": f"{base}_src", "helper": f"{base}_helper", "dest": f"{base}_dest"}
    prefix = f"bench-verify-{tag}"
    n = args.entities
    pids = server_pids(env) | {"bench (this process)": os.getpid()}
    say(f"bench/verify: N={n:,} entities of `{MASTER}` with {args.parts} `{PART}` rows each")
    say(f"  verify's chunks of {args.chunk_size} entities")
    for side in ("SOURCE", "DEST"):
        say(f"  {side.lower()} {env[f'DJLINK_{side}_HOST']}:{env[f'DJLINK_{side}_PORT']}")
    say(f"  CPU seconds of: {', '.join(sorted(pids))}")
    say(f"  load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

    # the helper first: its foreign key to the source table keeps that from being dropped before it
    with cleanup(env, [names["helper"], names["source"]], prefix, args.keep, [names["dest"]]):
        started = time.perf_counter()
        load(env, names, n, args.parts)
        say(f"load (both servers, bulk SQL): {time.perf_counter() - started:.1f} s")

        settings = Settings.from_env({**env, "DJLINK_TOPIC_PREFIX": prefix})
        spec = LinkSpec.new(names["source"], MASTER, names["helper"], HELPER, names["dest"])
        spec = dataclasses.replace(spec, part_tables=(PART,), primary_key=("recording_id",))
        register_link(settings, Topics(prefix), spec)

        # 1. verify, all equal
        with metered(pids) as equal:
            result, queries = run_verify(settings, spec.link_id, args)
        say(rate_line("djlink verify (equal)", result.compared, equal))
        say(f"  {result.chunks:,} chunks, {queries:,} queries; {equal['report']}")
        if not result.equal or result.compared != n:
            say(f"  warning: expected {n:,} equal entities, got {result.compared:,}, equal={result.equal}")

        # 2. the peer: a full table transfer
        peer: dict[str, Any] = {}
        if not args.skip_peer:
            with metered(pids) as peer:
                entities, differ = full_transfer(env, names)
            say(rate_line("full table transfer (SSCursor, compared in Python)", entities, peer))
            say(f"  {peer['report']}")
            if differ or entities != n:
                say(f"  warning: the full transfer compared {entities:,} entities, {len(differ)} differ")

        # 3. one planted difference, found by drill-down
        planted = n // 2
        conn = connect(env, "DEST")
        with conn.cursor() as cur:
            cur.execute(
                f"UPDATE `{names['dest']}`.`{PART}` SET gain = gain + 1 WHERE recording_id = %s AND channel = 0",
                (planted,),
            )
        conn.close()
        with metered(pids) as drill:
            found, drill_queries = run_verify(settings, spec.link_id, args)
        say(rate_line("djlink verify (one planted difference)", found.compared, drill))
        named = [(f.key, f.problem.value, [(d.table, d.changed) for d in f.rows]) for f in found.entities]
        say(f"  {drill_queries:,} queries ({drill_queries - queries:+,} for the drill-down); found {named}")
        say(f"  {drill['report']}")
        if named != [((planted,), "different", [(PART, (((planted, 0), ("gain",)),))])]:
            say(f"  warning: expected entity {planted} different in {PART}.gain")

        say("")
        say(rate_line("djlink verify", result.compared, equal))
        if peer:
            say(rate_line("full table transfer", n, peer))
            say(
                f"ratio verify / full transfer: {peer['seconds'] / equal['seconds']:.2f}x the rate; the transfer "
                f"took {peer['cpu'] / equal['cpu']:.2f}x the CPU seconds"
            )
        say(
            f"drill-down to one planted difference: {drill['seconds'] - equal['seconds']:+.2f} s (run to run noise "
            "included), "
            f"{drill_queries - queries:+,} queries"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
