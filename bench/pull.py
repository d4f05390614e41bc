"""Pull throughput of workload W through the whole event path, against the database's own limit and
datajoint-link 0.11, measured in the same run on the same servers.

    python -m bench.pull                      # N = 10,000 entities; datajoint-link on 1,000 of them
    python -m bench.pull --entities 2000      # a quicker run
    python -m bench.pull --help

Workload W: N entities of a DataJoint Manual table `Recording`, each master row
with an 8 KiB longblob (1,024 float64, DataJoint-serialized) and 4 part rows
(`Recording.Channel`).

1. INSERT ... SELECT: the same rows copied inside the source server into a
   schema with the same tables (master, then parts, one transaction): the
   database's own limit, entities/s.
2. djlink: `djlink run --role capture`, `--role agent` (source site) and
   `--role applier` (destination site) as three processes, then in
   this process the façade: `@link(...)` and `Recording().source.pull()` of
   all N (snapshot reads, Kafka, the applier's transactions, acks): entities/s
   from the call to its return (every entity acknowledged and Shared).
3. datajoint-link 0.11 from PyPI, in its own venv (`bench/.venv-datajoint-link`,
   created on first use: datajoint-link 0.11, datajoint 0.14, PyMySQL < 1.2),
   pulling the first M of the same rows (its cost is linear in the entities:
   one at a time, about 15 statements each): entities/s.

Prints the three rates and djlink's ratio to each, and the ratio of CPU
seconds per entity, djlink's to the floor's (issue 14: >= 0.8 x the floor,
<= 1.5 x its CPU; the consumers issue's >= 0.75 x INSERT ... SELECT was
blocked). Figures, never assertions; schemas and topics are dropped
afterwards (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import datajoint as dj
import numpy as np

from bench import floor
from bench.capture import print_hot_spots
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

ROLES = ("capture", "agent", "applier")
PROFILE = "/tmp/bench-pull.prof"
DL_VENV = ROOT / "bench" / ".venv-datajoint-link"
DL_REQUIREMENTS = ["datajoint-link==0.11", "datajoint>=0.14.3,<0.15", "pymysql<1.2"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pull", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=10_000, help="N, entities of workload W (default 10000)")
    parser.add_argument(
        "--datajoint-link-entities",
        type=int,
        default=1000,
        help="M, how many of them datajoint-link pulls (default 1000; 0 skips it)",
    )
    parser.add_argument("--progress", action="store_true", help="show the façade's progress bar")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the pull may take (default 1800)")
    parser.add_argument("--keep", action="store_true", help="keep the schemas and topics")
    parser.add_argument("--no-floor", action="store_true", help="skip the no-logic pipeline (bench/floor.py)")
    parser.add_argument(
        "--profile",
        choices=ROLES,
        help=f"run this role under cProfile (every thread's CPU time), write {PROFILE} and print its hot spots",
    )
    return parser.parse_args(argv)


def declare_source(connection: Any, schema_name: str, n: int) -> None:
    """Workload W at the source."""
    schema = dj.Schema(schema_name, connection=connection)

    @schema
    class Recording(dj.Manual):
        definition = """
        recording_id : int
        ---
        subject : varchar(32)
        trace : longblob     # 8 KiB: 1,024 float64
        """

        class Channel(dj.Part):
            definition = """
            -> master
            channel : tinyint
            ---
            gain : double
            """

    rng = np.random.default_rng(7)
    for start in range(1, n + 1, 500):
        ids = range(start, min(n, start + 499) + 1)
        Recording.insert({"recording_id": i, "subject": f"m{i}", "trace": rng.random(1024)} for i in ids)
        Recording.Channel.insert({"recording_id": i, "channel": c, "gain": i + c / 10} for i in ids for c in range(4))


def insert_select(env: dict[str, str], source: str, copy: str, n: int) -> float:
    """Seconds the source server takes to copy W into another schema of its own, in one transaction."""
    conn = connect(env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{copy}`")
        for table in ("recording", "recording__channel"):
            cur.execute(f"CREATE TABLE `{copy}`.`{table}` LIKE `{source}`.`{table}`")
        cur.execute(
            f"ALTER TABLE `{copy}`.`recording__channel` ADD FOREIGN KEY (recording_id) "
            f"REFERENCES `{copy}`.`recording` (recording_id)"
        )
        started = time.perf_counter()
        cur.execute("START TRANSACTION")
        cur.execute(f"INSERT INTO `{copy}`.`recording` SELECT * FROM `{source}`.`recording`")
        cur.execute(f"INSERT INTO `{copy}`.`recording__channel` SELECT * FROM `{source}`.`recording__channel`")
        cur.execute("COMMIT")
        seconds = time.perf_counter() - started
        cur.execute(f"SELECT COUNT(*) FROM `{copy}`.`recording`")
        assert cur.fetchone()[0] == n
    conn.close()
    return seconds


def djlink_pull(
    env: dict[str, str], names: dict[str, str], prefix: str, args: argparse.Namespace
) -> tuple[float, float]:
    """Seconds djlink's façade takes to pull all of W through the pipeline (processes started first), and the CPU
    seconds every process (services, roles, the façade) spent meanwhile."""
    pipeline = {"DJLINK_TOPIC_PREFIX": prefix, "DJLINK_ALLOWED_SCHEMAS": names["source"]}
    pipeline["DJLINK_CAPTURE_SERVER_ID"] = str(7000 + uuid.uuid4().int % 100000)
    applier_state = {"DJLINK_APPLIER_STATE_DB": f"{names['source']}_applier"}
    processes = [
        start_pipeline(
            env,
            [role],
            pipeline | (applier_state if role == "applier" else {}),
            profile=PROFILE if role == args.profile else None,
        )
        for role in ROLES
    ]
    try:
        link = facade(env, pipeline)

        @link(source_host(env), names["source"], names["helper"], "outbound", names["dest"])
        class Recording:
            """djlink's copy."""

        table: Any = Recording
        pids = service_pids() | {role: proc.pid for role, proc in zip(ROLES, processes, strict=True)}
        meter = CpuMeter(pids | {"façade (this process)": os.getpid()})
        meter.start()
        started = time.perf_counter()
        summary = table().source.pull(display_progress=args.progress, timeout=args.timeout)
        seconds = time.perf_counter() - started
        meter.stop()
        say("  " + meter.report(seconds))
        if summary.pulled != args.entities:
            raise SystemExit(f"djlink pulled {summary.pulled} of {args.entities} entities: {summary}")
        return seconds, sum(meter.used.values())
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            proc.wait(30)


def datajoint_link_pull(env: dict[str, str], names: dict[str, str], m: int) -> float:
    """Seconds datajoint-link 0.11 takes to pull the first m entities of W (its venv made on first use)."""
    python = DL_VENV / "bin" / "python"
    if not python.exists():
        say(f"  creating {DL_VENV} with {', '.join(DL_REQUIREMENTS)} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(DL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *DL_REQUIREMENTS], check=True)
    cfg = {
        "source_host": source_host(env),
        "source_user": env["DJLINK_SOURCE_USER"],
        "source_password": env["DJLINK_SOURCE_PASSWORD"],
        "dest_host": f"{env['DJLINK_DEST_HOST']}:{env['DJLINK_DEST_PORT']}",
        "dest_user": env["DJLINK_DEST_USER"],
        "dest_password": env["DJLINK_DEST_PASSWORD"],
        "source_schema": names["source"],
        "helper_schema": names["dl_helper"],
        "dest_schema": names["dl_dest"],
        "entities": m,
    }
    done = subprocess.run(
        [str(python), str(ROOT / "bench" / "datajoint_link_pull.py"), json.dumps(cfg)],
        capture_output=True,
        text=True,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"datajoint-link failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["entities"] != m:
        raise SystemExit(f"datajoint-link pulled {result['entities']} of {m} entities")
    return float(result["seconds"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = services_env()
    tag = uuid.uuid4().hex[:8]
    base = f"bench_pull_{tag}"
    names = {
        "source": f"{base}_src",
        "helper": f"{base}_helper",
        "copy": f"{base}_copy",
        "dl_helper": f"{base}_dlhelper",
        "floor": f"{base}_floor",
        "dest": f"{base}_dst",
        "dl_dest": f"{base}_dldst",
    }
    prefix = f"bench-pull-{tag}"
    m = min(args.datajoint_link_entities, args.entities)
    say(f"bench/pull: workload W, N={args.entities:,} entities (8 KiB longblob + 4 part rows each)")
    src, dst = (f"{env[f'DJLINK_{s}_HOST']}:{env[f'DJLINK_{s}_PORT']}" for s in ("SOURCE", "DEST"))
    say(f"  source {src}, destination {dst}, Kafka {env['DJLINK_KAFKA_BOOTSTRAP']}")
    say(f"  load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    source_dbs = [names["source"], names["helper"], names["copy"], names["dl_helper"]]
    dest_dbs = [names["dest"], names["dl_dest"], f"{names['source']}_applier"]
    with cleanup(env, source_dbs, prefix, args.keep, dest_dbs):
        source = dj.Connection(
            f"{env['DJLINK_SOURCE_HOST']}:{env['DJLINK_SOURCE_PORT']}",
            env["DJLINK_SOURCE_USER"],
            env["DJLINK_SOURCE_PASSWORD"],
            use_tls=False,
        )
        started = time.perf_counter()
        declare_source(source, names["source"], args.entities)
        say(f"  source filled in {time.perf_counter() - started:.1f} s")

        limit_s = insert_select(env, names["source"], names["copy"], args.entities)
        limit = args.entities / limit_s
        say(f"INSERT ... SELECT on the source server: {limit:,.0f} entities/s ({limit_s:.2f} s)")

        floor_rate = floor_cpu = None
        if not args.no_floor:
            meter = CpuMeter(service_pids())
            meter.start()
            floor_result = floor.run(env, names["source"], names["floor"], args.entities)
            meter.stop()
            floor_s = floor_result["seconds"]
            floor_rate = args.entities / floor_s
            say(
                f"floor, a no-logic pipeline (SELECT, Avro rows, Kafka, INSERT; bench/floor.py): "
                f"{floor_rate:,.0f} entities/s ({floor_s:.2f} s)"
            )
            say(f"  {meter.report(floor_s)}; + its two processes {floor_result['cpu_seconds']:.1f} (with start-up)")
            floor_cpu = sum(meter.used.values()) + floor_result["cpu_seconds"]
            cpus = os.cpu_count() or 1
            bound = args.entities / (floor_cpu / cpus)
            say(
                f"  with all {cpus} CPUs busy all the time, the floor's work ({floor_cpu:.1f} CPU-s) allows at most "
                f"{bound:,.0f} entities/s = {bound / limit:.2f} x INSERT ... SELECT"
            )

        ours_s, ours_cpu = djlink_pull(env, names, prefix, args)
        ours = args.entities / ours_s
        say(f"djlink pull through Kafka: {ours:,.0f} entities/s ({ours_s:.2f} s)")

        if args.profile:
            print_hot_spots(PROFILE, roots="cdc|consumers|djlink|schemas")
        if m:
            theirs_s = datajoint_link_pull(env, names, m)
            theirs = m / theirs_s
            say(f"datajoint-link 0.11: {theirs:,.1f} entities/s ({m:,} entities in {theirs_s:.2f} s)")
        say(f"ratio djlink / INSERT ... SELECT: {ours / limit:.2f} (the consumers issue's target >= 0.75, blocked)")
        if floor_rate and floor_cpu:
            say(f"ratio floor / INSERT ... SELECT: {floor_rate / limit:.2f}")
            say(f"ratio djlink / floor: {ours / floor_rate:.2f} (issue 14 target >= 0.8)")
            say(
                f"ratio of CPU seconds per entity, djlink / floor: {ours_cpu / floor_cpu:.2f} (issue 14 target <= 1.5; "
                f"{ours_cpu:.1f} against {floor_cpu:.1f}, the floor's with its processes' start-up)"
            )
        if m:
            say(f"ratio djlink / datajoint-link: {ours / theirs:,.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
