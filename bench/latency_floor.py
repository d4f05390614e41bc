"""The floor of mirroring latency on these servers: updates carried by a pipeline with no logic at all.

    python -m bench.latency_floor --role tail|apply SPEC    # started by bench/latency.py, one process each

Two processes, as djlink's capture and applier are two, with the same
connections (TLS to both servers, as the local services' settings say):

- *tail*: follows the source's binlog (python-mysql-replication, blocking,
  from the GTID position at its start, the table map parsed once, rows decoded
  by djlink's own row reader `cdc.rows`) in a thread, as the capture does; its
  main thread takes every update the thread has ready and produces each one's
  `(sample_id, subject)` as a plain fastavro record in one Kafka transaction,
  then the next (one open transaction at a time, as a transactional producer
  must);
- *apply*: consumes `read_committed`, waits for the first message and takes
  what else is there, decodes, and UPDATEs those rows at the destination in one
  statement (`SET subject = CASE sample_id WHEN ... END`, the last change of
  each row; djlink writes a multi-row INSERT ... ON DUPLICATE KEY UPDATE) and
  one transaction.

No envelope, no END, no checkpoint, no entity states, no claims or source
positions, no acknowledgements: a strict subset of what djlink must do for a
mirrored update, so its latency bounds djlink's from below on the same machine
and under the same load. `bench/latency.py` measures it with the same writers
and watcher after djlink's rates (`--no-floor` skips it).
"""

from __future__ import annotations

import io
import json
import queue
import sys
import threading
from typing import Any

import fastavro
from confluent_kafka import Producer
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import HeartbeatLogEvent, RotateEvent, XidEvent
from pymysqlreplication.row_event import UpdateRowsEvent

from bench.floor import encode, follow
from cdc.rows import RowReader, decode_rows
from devtools.services import admin_connection, binlog_settings

ROW = fastavro.parse_schema(
    {
        "type": "record",
        "name": "Sample",
        "fields": [{"name": "sample_id", "type": "int"}, {"name": "subject", "type": "string"}],
    }
)
POLL_S = 0.05  # as the capture's and the applier's first wait
MAX_TAKEN = 500


def tail(env: dict[str, str], topic: str, db: str, server_id: int) -> None:
    conn = admin_connection(env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute("SELECT @@gtid_binlog_pos")
        start = cur.fetchone()[0]
    conn.close()
    p = Producer({"bootstrap.servers": env["DJLINK_KAFKA_BOOTSTRAP"], "transactional.id": topic, "linger.ms": 5})
    p.init_transactions(30)
    rows: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def read_binlog() -> None:
        stream = BinLogStreamReader(
            connection_settings=binlog_settings(env),
            server_id=server_id,
            blocking=True,
            resume_stream=True,
            slave_heartbeat=0.05,
            is_mariadb=True,
            auto_position=start,
            freeze_schema=True,
            only_schemas=[db],
            only_tables=["sample"],
            only_events=[RotateEvent, HeartbeatLogEvent, UpdateRowsEvent, XidEvent],
        )
        readers: dict[int, RowReader | None] = {}
        ready = False
        for ev in stream:
            if not ready:  # connected: the server sends a rotate event first
                rows.put(None)
                ready = True
            if isinstance(ev, UpdateRowsEvent) and ev.table == "sample":
                if ev.table_id not in readers:
                    readers[ev.table_id] = RowReader.compile(ev.columns)
                for _before, after in decode_rows(ev, readers[ev.table_id]):
                    assert after is not None
                    rows.put({"sample_id": after["sample_id"], "subject": after["subject"]})

    threading.Thread(target=read_binlog, daemon=True).start()
    assert rows.get(timeout=30) is None
    print("ready", flush=True)
    while True:
        try:
            first = rows.get(timeout=POLL_S)
        except queue.Empty:
            continue
        batch = [first]
        while True:
            try:
                batch.append(rows.get_nowait())
            except queue.Empty:
                break
        p.begin_transaction()
        for row in batch:
            assert row is not None
            p.produce(topic, value=encode(ROW, row))
        p.commit_transaction()


def apply(env: dict[str, str], topic: str, db: str) -> None:
    conn = admin_connection(env, "DEST", autocommit=False)
    c = follow(env, topic)
    print("ready", flush=True)
    with conn.cursor() as cur:
        while True:
            first = c.poll(POLL_S)
            if first is None:
                continue
            changes = []
            for msg in [first, *c.consume(MAX_TAKEN - 1, 0)]:
                value = msg.value() if msg.error() is None else None
                if value:
                    row: Any = fastavro.schemaless_reader(io.BytesIO(value), ROW, None)
                    changes.append((row["subject"], row["sample_id"]))
            if changes:
                latest = dict((sample_id, subject) for subject, sample_id in changes)  # the last change of each
                cases = " ".join(["WHEN %s THEN %s"] * len(latest))
                marks = ", ".join(["%s"] * len(latest))
                cur.execute(
                    f"UPDATE `{db}`.`sample` SET subject = CASE sample_id {cases} END WHERE sample_id IN ({marks})",
                    [v for pair in latest.items() for v in pair] + list(latest),
                )
                conn.commit()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "--role" or argv[1] not in ("tail", "apply"):
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(argv[2])
    if argv[1] == "tail":
        tail(spec["env"], spec["topic"], spec["db"], spec["server_id"])
    else:
        apply(spec["env"], spec["topic"], spec["db"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
