"""Mirroring latency: source commit to destination row visible, for shared rows updated at a steady rate;
and how soon a flag set at the source is known at the destination.

    python -m bench.latency                      # 1,000 and 2,000 rows/s, 15 s each
    python -m bench.latency --rates 100 --seconds 5
    python -m bench.latency --help

1. Declares a source table of E entities (default 500; a varchar and a small
   longblob, one part row each), starts the pipeline (`djlink run --role
   capture --role agent`, `djlink run --role applier`) and pulls all of them:
   every row is Shared, so every update is mirrored.
2. For each rate R: W writers (default 4, each its own connection, as
   several users write at once) update `subject` of a random entity to a new
   sequence number, each an autocommit UPDATE, on the shared schedule
   t0 + i/R (writer i mod W takes update i), noting when each COMMIT
   returned. The rate the writers reached is printed next to the one asked
   for: one connection alone reaches about 500 rows/s here. A watcher (a process
   of its own, so that the writers do not delay its polls) reads the
   destination's `subject` column every `--poll-ms` (default 5 ms) and notes
   when each sequence number first appears. Latency = seen - committed, for
   every update that was not overwritten before the watcher saw it (its
   resolution is the poll interval). Prints the achieved rate, p50, p95, p99,
   max, and each percentile as a ratio to the issue's target (p50 < 20 ms,
   p99 < 100 ms); then the time each update spent in each stage (commit ->
   produced, produced -> readable in Kafka, readable -> applied), from a
   read_committed subscriber of the change topic in the watcher's process.
   `--trace N`: N single updates on the quiet pipeline, stage by stage.
3. Flags: sets `is_flagged='TRUE'` on F helper rows (default 50), one at a
   time, each after the previous one is known, and times until the
   applier's entity state lists it (the state `Table().source.flagged` reads):
   p50 and max (target: within one second).

Figures, never assertions. Schemas and topics are dropped afterwards (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import datajoint as dj
import numpy as np
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import (
    ROOT,
    CpuMeter,
    cleanup,
    connect,
    facade,
    say,
    service_pids,
    services_env,
    source_host,
    start_pipeline,
)
from foundation.config import Settings
from foundation.kafka import consumer, end_offset, ok
from foundation.topics import Topics

TARGETS = {"p50": 20.0, "p99": 100.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1000,2000", help="update rates to measure, rows/s (default 1000,2000)")
    parser.add_argument("--writers", type=int, default=4, help="connections writing the load (default 4)")
    parser.add_argument("--seconds", type=float, default=15, help="seconds of load per rate (default 15)")
    parser.add_argument("--entities", type=int, default=500, help="shared entities updated (default 500)")
    parser.add_argument("--flags", type=int, default=50, help="flags to time (default 50; 0 skips)")
    parser.add_argument("--poll-ms", type=float, default=5, help="the watcher's polling interval (default 5)")
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        help="also time N single updates on the quiet pipeline, stage by stage (default 0)",
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the floor: the same load through a pipeline with no logic (bench/latency_floor.py)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the schemas and topics")
    return parser.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class EventWatcher(threading.Thread):
    """Follows a change topic as a read_committed subscriber does, noting for each `subject` value (the last one
    matching `pattern` in an event, the after image) its event's Kafka timestamp (when the capture produced it)
    and when it became readable (its Kafka transaction committed and fetched)."""

    def __init__(self, env: dict[str, str], prefix: str, topic: str, pattern: bytes) -> None:
        super().__init__(daemon=True)
        settings = Settings.from_env({**env, "DJLINK_TOPIC_PREFIX": prefix})
        self._c = consumer(settings, f"{prefix}-latency-{uuid.uuid4().hex[:6]}")
        partitions = self._c.list_topics(topic, timeout=10).topics[topic].partitions
        # At each partition's end as it is now, so that every update made after this is seen.
        self._c.assign(
            [TopicPartition(topic, p, end_offset(self._c, TopicPartition(topic, p), 30)) for p in partitions]
        )
        self._pattern = re.compile(pattern)
        self.received: dict[str, tuple[float, float]] = {}  # subject -> (produced, received), seconds
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            msg = self._c.poll(0.05)
            if not ok(msg):
                continue
            # The row images' strings are plain UTF-8 in the Avro body; the after image is the last.
            found = self._pattern.findall(msg.value() or b"")
            if found:
                self.received.setdefault(found[-1].decode(), (msg.timestamp()[1] / 1000, time.time()))

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)
        self._c.close()


class Watcher:
    """Notes when each `subject` value first shows at the destination, and when its change event was produced and
    readable in Kafka, in a process of its own (in this one, the writers' threads would delay its polls, and it
    theirs)."""

    def __init__(self, env: dict[str, str], table: str, poll_s: float, kafka: tuple[str, str, bytes]) -> None:
        self._stop = multiprocessing.Event()
        self._ours, theirs = multiprocessing.Pipe()
        self._process = multiprocessing.get_context("fork").Process(
            target=self._watch, args=(env, table, poll_s, kafka, self._stop, theirs), daemon=True
        )
        self.seen: dict[str, float] = {}
        self.received: dict[str, tuple[float, float]] = {}

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def start(self) -> None:
        self._process.start()
        self._ours.recv()  # following the change topic

    def ask(self) -> dict[str, float]:
        """What it has seen so far."""
        self._ours.send("seen?")
        self.seen, self.received = self._ours.recv()
        return self.seen

    def stop(self) -> dict[str, float]:
        self.ask()
        self._stop.set()
        self._process.join(10)
        return self.seen

    @staticmethod
    def _watch(
        env: dict[str, str], table: str, poll_s: float, kafka: tuple[str, str, bytes], stop: Any, pipe: Any
    ) -> None:
        seen: dict[str, float] = {}
        events = EventWatcher(env, *kafka)
        events.start()
        pipe.send("ready")
        conn = connect(env, "DEST")
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute(f"SELECT subject FROM {table}")
                now = time.time()
                for (subject,) in cur.fetchall():
                    seen.setdefault(subject, now)
                if pipe.poll():
                    pipe.recv()
                    pipe.send((seen, dict(events.received)))
                stop.wait(poll_s)
        conn.close()
        events.stop()


STAGES = ("commit -> produced", "produced -> readable", "readable -> applied")


def say_stages(stages: list[tuple[float, float, float]]) -> None:
    """p50 and p90 of each stage (seconds in, ms out)."""
    say(
        "  stages p50 (p90) ms: "
        + "; ".join(
            f"{label} {percentile([1000 * s[k] for s in stages], 50):.1f} "
            f"({percentile([1000 * s[k] for s in stages], 90):.1f})"
            for k, label in enumerate(STAGES)
        )
    )


def mirror_latency(
    env: dict[str, str],
    names: dict[str, str],
    prefix: str,
    rate: float,
    args: argparse.Namespace,
    pids: dict[str, int],
    floor_topic: str | None = None,
) -> dict[int, float] | None:
    """One rate's load, timed; through djlink's pipeline, or the floor's (`floor_topic`: its Kafka topic)."""
    topic = floor_topic or Topics(prefix).table(names["source"], "sample")
    tag = "f" if floor_topic else "r"  # a value the watcher has not seen yet: each run writes its own
    kafka = (prefix, topic, rb"%s%d-\d+" % (tag.encode(), int(rate)))
    watcher = Watcher(env, f"`{names['dest']}`.`sample`", args.poll_ms / 1000, kafka)
    watcher.start()
    cpu = CpuMeter({**pids, "watcher": watcher.pid, "writers (this process)": os.getpid()})
    committed: dict[str, tuple[float, int]] = {}  # subject -> (commit time, entity)
    n = int(rate * args.seconds)
    rng = random.Random(int(rate))
    plan = [(i, rng.randint(1, args.entities)) for i in range(n)]
    lock = threading.Lock()
    started = time.time() + 0.2  # every writer connected first

    def write(share: list[tuple[int, int]]) -> None:
        conn = connect(env, "SOURCE")
        with conn.cursor() as cur:
            for i, entity in share:
                delay = started + i / rate - time.time()
                if delay > 0:
                    time.sleep(delay)  # the load's schedule, not synchronisation
                subject = f"{tag}{int(rate)}-{i}"
                cur.execute(f"UPDATE `{names['source']}`.`sample` SET subject=%s WHERE sample_id=%s", (subject, entity))
                done = time.time()
                with lock:
                    committed[subject] = (done, entity)
        conn.close()

    writers = [threading.Thread(target=write, args=(plan[k :: args.writers],)) for k in range(args.writers)]
    cpu.start()
    load_began = time.time()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    cpu.stop()
    wall = time.time() - load_began
    elapsed = max(t for t, _ in committed.values()) - started
    deadline = time.time() + 60
    # Each entity's last value as the source has it (commit returns of two writers may come in either order).
    src = connect(env, "SOURCE")
    with src.cursor() as cur:
        cur.execute(f"SELECT subject FROM `{names['source']}`.`sample` WHERE subject LIKE %s", (f"{tag}{int(rate)}-%",))
        final = [subject for (subject,) in cur.fetchall()]
    src.close()
    while time.time() < deadline and not all(s in watcher.ask() for s in final):
        time.sleep(0.2)  # a condition polled, with a deadline
    watcher.stop()
    latencies = [1000 * (watcher.seen[s] - t) for s, (t, _) in committed.items() if s in watcher.seen]
    lost = [s for s in final if s not in watcher.seen]
    label = "floor, " if floor_topic else ""
    if not latencies:
        say(f"{label}{rate:,.0f} rows/s: nothing seen at the destination")
        return None
    p = {q: percentile(latencies, q) for q in (50, 95, 99)}
    say(
        f"{label}{rate:,.0f} rows/s (reached {n / elapsed:,.0f} with {args.writers} writers): "
        f"{len(latencies):,} of {n:,} updates timed, "
        f"p50 {p[50]:.0f} ms, p95 {p[95]:.0f} ms, p99 {p[99]:.0f} ms, max {max(latencies):.0f} ms"
        + (f"; {len(lost)} final values never seen" if lost else "")
    )
    say(
        f"  ratio to target: p50 {p[50] / TARGETS['p50']:.2f} x 20 ms, p99 {p[99] / TARGETS['p99']:.2f} x 100 ms "
        "(below 1 meets it)"
    )
    stages = [
        (produced - t, got - produced, watcher.seen[s] - got)
        for s, (t, _) in committed.items()
        if s in watcher.seen and s in watcher.received
        for produced, got in [watcher.received[s]]
    ]
    if stages:
        say_stages(stages)
    say(f"  {cpu.report(wall)}")
    pipeline = sum(v for k, v in cpu.used.items() if k in pids)
    say(f"  the pipeline and its services: {1e6 * pipeline / n:,.0f} CPU-us per update (the load and watcher apart)")
    return p


@contextmanager
def floor_pipeline(env: dict[str, str], names: dict[str, str], prefix: str) -> Iterator[tuple[str, dict[str, int]]]:
    """`bench/latency_floor.py`'s two processes, following the source table and updating the destination's: its
    Kafka topic and the processes' pids."""
    topic = f"{prefix}.floor"
    admin = AdminClient({"bootstrap.servers": env["DJLINK_KAFKA_BOOTSTRAP"]})
    for future in admin.create_topics([NewTopic(topic, 1, -1)]).values():
        future.result(30)
    spec = {"env": env, "topic": topic, "server_id": 7000 + uuid.uuid4().int % 100000}
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children: dict[str, subprocess.Popen[str]] = {}
    try:
        for role, db in (("apply", names["dest"]), ("tail", names["source"])):
            child = subprocess.Popen(
                [sys.executable, "-m", "bench.latency_floor", "--role", role, json.dumps({**spec, "db": db})],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=child_env,
            )
            children[f"floor {role}"] = child
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise SystemExit(f"the floor's {role} process did not start")
        yield topic, {name: child.pid for name, child in children.items()}
    finally:
        for child in children.values():
            child.kill()
            child.wait(10)


def trace_stages(env: dict[str, str], names: dict[str, str], prefix: str, n: int) -> None:
    """N updates one at a time on an otherwise quiet pipeline, each timed stage by stage: the source's COMMIT
    returned; the capture produced its change event; it became readable; the destination shows it."""
    events = EventWatcher(env, prefix, Topics(prefix).table(names["source"], "sample"), rb"trace-\d{5}")
    events.start()
    src, dst = connect(env, "SOURCE"), connect(env, "DEST")
    stages: list[tuple[float, float, float]] = []
    totals: list[float] = []
    try:
        with src.cursor() as s_cur, dst.cursor() as d_cur:
            for i in range(n):
                subject, entity = f"trace-{i:05d}", 1 + i % 10
                update = f"UPDATE `{names['source']}`.`sample` SET subject=%s WHERE sample_id=%s"
                s_cur.execute(update, (subject, entity))
                committed = time.time()
                deadline = committed + 10
                seen = None
                while seen is None and time.time() < deadline:
                    d_cur.execute(f"SELECT 1 FROM `{names['dest']}`.`sample` WHERE subject=%s", (subject,))
                    if d_cur.fetchone():
                        seen = time.time()
                while subject not in events.received and time.time() < deadline:
                    time.sleep(0.001)  # a condition polled, with a deadline
                if seen is not None and subject in events.received:
                    produced, got = events.received[subject]
                    stages.append((produced - committed, got - produced, seen - got))
                    totals.append(1000 * (seen - committed))
                time.sleep(0.02)  # the next update on a quiet pipeline: the load's shape
    finally:
        events.stop()
        src.close()
        dst.close()
    if not stages:
        say("single updates: nothing timed")
        return
    say(
        f"single updates on a quiet pipeline: {len(stages)} of {n} timed, p50 {percentile(totals, 50):.1f} ms, "
        f"p90 {percentile(totals, 90):.1f} ms"
    )
    say_stages(stages)


def flag_latency(env: dict[str, str], names: dict[str, str], state_db: str, group: str, flags: int) -> None:
    src, dst = connect(env, "SOURCE"), connect(env, "DEST")
    times: list[float] = []
    with src.cursor() as s_cur, dst.cursor() as d_cur:
        for entity in range(1, flags + 1):
            s_cur.execute(f"UPDATE `{names['helper']}`.`outbound` SET is_flagged='TRUE' WHERE sample_id=%s", (entity,))
            committed = time.time()
            deadline = committed + 30
            while time.time() < deadline:
                d_cur.execute(
                    f"SELECT COUNT(*) FROM `{state_db}`.entities WHERE consumer_group=%s AND is_flagged='TRUE'",
                    (group,),
                )
                if d_cur.fetchone()[0] >= entity:
                    times.append(1000 * (time.time() - committed))
                    break
    src.close()
    dst.close()
    if times:
        say(
            f"flags: {len(times)} of {flags} known at the destination, p50 {statistics.median(times):.0f} ms, "
            f"max {max(times):.0f} ms (ratio of max to the 1 s target: {max(times) / 1000:.2f})"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = services_env()
    tag = uuid.uuid4().hex[:8]
    base = f"bench_latency_{tag}"
    names = {"source": f"{base}_src", "helper": f"{base}_helper", "dest": f"{base}_dst"}
    state_db = f"{base}_applier"
    prefix = f"bench-latency-{tag}"
    say(f"bench/latency: {args.entities} shared entities; rates {args.rates} rows/s, {args.seconds:g} s each")
    say(f"  load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    with cleanup(env, [names["source"], names["helper"]], prefix, args.keep, [names["dest"], state_db]):
        source = dj.Connection(
            f"{env['DJLINK_SOURCE_HOST']}:{env['DJLINK_SOURCE_PORT']}",
            env["DJLINK_SOURCE_USER"],
            env["DJLINK_SOURCE_PASSWORD"],
            use_tls=False,
        )
        schema = dj.Schema(names["source"], connection=source)

        @schema
        class Sample(dj.Manual):
            definition = """
            sample_id : int
            ---
            subject : varchar(32)
            data : longblob
            """

            class Part(dj.Part):
                definition = """
                -> master
                ---
                value : double
                """

        rng = np.random.default_rng(3)
        Sample.insert({"sample_id": i, "subject": "-", "data": rng.random(16)} for i in range(1, args.entities + 1))
        Sample.Part.insert({"sample_id": i, "value": i} for i in range(1, args.entities + 1))

        pipeline = {
            "DJLINK_TOPIC_PREFIX": prefix,
            "DJLINK_ALLOWED_SCHEMAS": names["source"],
            "DJLINK_CAPTURE_SERVER_ID": str(7000 + uuid.uuid4().int % 100000),
        }
        processes = [
            start_pipeline(env, ["capture", "agent"], pipeline),
            start_pipeline(env, ["applier"], pipeline | {"DJLINK_APPLIER_STATE_DB": state_db}),
        ]
        try:
            link = facade(env, pipeline)

            @link(source_host(env), names["source"], names["helper"], "outbound", names["dest"])
            class Sample:  # type: ignore[no-redef]
                """The shared copy."""

            table: Any = Sample
            summary = table().source.pull(timeout=300)
            say(f"  pulled: {summary}")
            pids = {**service_pids(), "capture+agent": processes[0].pid, "applier": processes[1].pid}
            rates = [float(r) for r in args.rates.split(",") if r.strip()]
            djlink = {rate: mirror_latency(env, names, prefix, rate, args, pids) for rate in rates}
            if args.trace:
                trace_stages(env, names, prefix, args.trace)
            if args.flags:
                flag_latency(env, names, state_db, f"{prefix}-applier", min(args.flags, args.entities))
        finally:
            for proc in processes:
                proc.terminate()
            for proc in processes:
                proc.wait(30)
        if args.floor:
            say("the floor, djlink stopped (bench/latency_floor.py: binlog, Avro rows in Kafka transactions, UPDATE):")
            with floor_pipeline(env, names, prefix) as (topic, floor_pids):
                floor = {
                    rate: mirror_latency(env, names, prefix, rate, args, {**service_pids(), **floor_pids}, topic)
                    for rate in rates
                }
            for rate in rates:
                ours, theirs = djlink[rate], floor[rate]
                if ours and theirs:
                    say(
                        f"{rate:,.0f} rows/s: djlink / floor p50 {ours[50] / theirs[50]:.2f} "
                        f"({ours[50]:.0f} / {theirs[50]:.0f} ms), p99 {ours[99] / theirs[99]:.2f} "
                        f"({ours[99]:.0f} / {theirs[99]:.0f} ms)"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
