"""The floor of any pull through Kafka on these servers: W's rows moved by a pipeline with no logic at all.

    python -m bench.floor SOURCE_DB DEST_DB N      # run by bench/pull.py; prints one JSON line

Two processes, as djlink's capture and applier are two:

- *reader*: per chunk of 500 entities, SELECTs the master and part rows at the
  source, encodes each row with fastavro (a plain record of the row, no
  envelope), and produces them in one Kafka transaction, then an end marker;
- *writer*: consumes `read_committed`, decodes each row, and at each end
  marker INSERTs the chunk at the destination (executemany, one transaction).

No helper rows, no acknowledgements, no integrity checks, no schema topic: it
does a strict subset of what a djlink pull must do, so its rate bounds djlink's
from above on the same machine. `bench/pull.py` prints it as a third reference.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from devtools.services import admin_connection as connect
from devtools.services import load_env

ROOT = Path(__file__).resolve().parent.parent  # not bench.common's: it imports DataJoint, slow to start
CHUNK = 500
MASTER = fastavro.parse_schema(
    {
        "type": "record",
        "name": "Recording",
        "fields": [
            {"name": "recording_id", "type": "int"},
            {"name": "subject", "type": "string"},
            {"name": "trace", "type": "bytes"},
        ],
    }
)
PART = fastavro.parse_schema(
    {
        "type": "record",
        "name": "Channel",
        "fields": [
            {"name": "recording_id", "type": "int"},
            {"name": "channel", "type": "int"},
            {"name": "gain", "type": "double"},
        ],
    }
)
END = b"end"


def encode(schema: Any, row: dict[str, Any]) -> bytes:
    """A row as a plain fastavro record (no header, no fingerprint)."""
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, row)
    return out.getvalue()


def _decode(schema: Any, data: bytes | None) -> Any:
    assert data is not None
    return fastavro.schemaless_reader(io.BytesIO(data), schema, None)


def reader(env: dict[str, str], topic: str, db: str, n: int) -> None:
    import pymysql.cursors

    conn = connect(env, "SOURCE", cursorclass=pymysql.cursors.DictCursor)
    p = Producer(
        {"bootstrap.servers": env["DJLINK_KAFKA_BOOTSTRAP"], "transactional.id": topic, "linger.ms": 5}
        | {"message.max.bytes": 16 << 20}
    )
    p.init_transactions(30)
    print("ready", flush=True)
    sys.stdin.readline()  # "go": start-up is not timed
    with conn.cursor() as cur:
        cur.execute(f"SELECT recording_id FROM `{db}`.recording ORDER BY recording_id")
        ids = [r["recording_id"] for r in cur.fetchall()][:n]
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            marks = ", ".join(["%s"] * len(chunk))
            cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            cur.execute(f"SELECT * FROM `{db}`.recording WHERE recording_id IN ({marks})", chunk)
            masters = cur.fetchall()
            cur.execute(f"SELECT * FROM `{db}`.recording__channel WHERE recording_id IN ({marks})", chunk)
            parts = cur.fetchall()
            conn.commit()
            p.begin_transaction()
            for row in masters:
                p.produce(topic, key=b"m", value=encode(MASTER, row))
            for row in parts:
                p.produce(topic, key=b"p", value=encode(PART, row))
            p.produce(topic, key=END, value=END)
            p.commit_transaction()
    conn.close()


def follow(env: dict[str, str], topic: str) -> Consumer:
    """A plain `read_committed` consumer of partition 0 of `topic`, from its beginning."""
    c = Consumer(
        {
            "bootstrap.servers": env["DJLINK_KAFKA_BOOTSTRAP"],
            "group.id": topic,
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    c.assign([TopicPartition(topic, 0, 0)])
    return c


def writer(env: dict[str, str], topic: str, db: str, n: int) -> None:
    conn = connect(env, "DEST")
    conn.autocommit(False)
    c = follow(env, topic)
    masters: list[tuple[Any, ...]] = []
    parts: list[tuple[Any, ...]] = []
    done = 0
    print("ready", flush=True)
    with conn.cursor() as cur:
        while done < n:
            for msg in c.consume(1000, 0.05):
                if msg.error() is not None:
                    continue
                key = msg.key()
                if key == b"m":
                    m = _decode(MASTER, msg.value())
                    masters.append((m["recording_id"], m["subject"], m["trace"]))
                elif key == b"p":
                    q = _decode(PART, msg.value())
                    parts.append((q["recording_id"], q["channel"], q["gain"]))
                else:
                    cur.executemany(f"INSERT INTO `{db}`.recording VALUES (%s, %s, %s)", masters)
                    cur.executemany(f"INSERT INTO `{db}`.recording__channel VALUES (%s, %s, %s)", parts)
                    conn.commit()
                    done += len(masters)
                    masters, parts = [], []
    c.close()
    conn.close()


def run(env: dict[str, str], source_db: str, dest_db: str, n: int) -> dict[str, Any]:
    """Copy the tables' shape to `dest_db`, run writer and reader, return seconds and CPU seconds of each."""
    src, dst = connect(env, "SOURCE"), connect(env, "DEST")
    with src.cursor() as cur, dst.cursor() as out:
        out.execute(f"CREATE DATABASE `{dest_db}`")
        for table in ("recording", "recording__channel"):
            cur.execute(f"SHOW CREATE TABLE `{source_db}`.`{table}`")
            out.execute(f"USE `{dest_db}`")
            out.execute(cur.fetchone()[1])
    src.close()
    topic = f"bench-floor-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": env["DJLINK_KAFKA_BOOTSTRAP"]})
    for future in admin.create_topics([NewTopic(topic, 1, -1, config={"max.message.bytes": str(16 << 20)})]).values():
        future.result(30)
    args = [sys.executable, "-m", "bench.floor", "--role"]
    spec = json.dumps({"env": env, "topic": topic, "source": source_db, "dest": dest_db, "n": n})
    child_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = []
    try:
        for role in ("writer", "reader"):
            child = subprocess.Popen(
                [*args, role, spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=child_env
            )
            children.append(child)
            assert child.stdout is not None and child.stdout.readline().strip() == "ready", f"the {role} did not start"
        writer_proc, reader_proc = children
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        assert reader_proc.stdin is not None
        reader_proc.stdin.write("go\n")
        reader_proc.stdin.flush()
        if writer_proc.wait(600) or reader_proc.wait(60):
            raise SystemExit("the floor pipeline failed")
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        with dst.cursor() as out:
            out.execute(f"SELECT COUNT(*) FROM `{dest_db}`.recording")
            if out.fetchone()[0] != n:
                raise SystemExit("the floor pipeline did not copy every entity")
    finally:
        for child in children:
            child.kill()
        with dst.cursor() as out:
            out.execute(f"DROP DATABASE IF EXISTS `{dest_db}`")
        dst.close()
        admin.delete_topics([topic])
    return {"seconds": seconds, "cpu_seconds": cpu}


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--role":
        spec = json.loads(argv[2])
        role = reader if argv[1] == "reader" else writer
        role(spec["env"], spec["topic"], spec["source"] if role is reader else spec["dest"], spec["n"])
        return 0
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    env = load_env()
    if env is None:
        print("the local services are not running: python -m devtools.services up", file=sys.stderr)
        return 1
    print(json.dumps(run(env, argv[0], argv[1], int(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
