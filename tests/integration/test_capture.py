"""The capture over real services: exactly-once under kill -9, and nothing unlinked leaves the server."""

from __future__ import annotations

import dataclasses
import random
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import defaultdict
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

import schemas
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.gtid import parse_position
from foundation.kafka import produce, producer, read_to_end
from foundation.links import LinkSpec
from foundation.topics import SchemaTopic, Topics
from link.requests import Requests
from tests.conftest import Site, admin, wait_for
from tests.integration.test_pull import read_topic


def create_table(site: Site, db: str, table: str) -> None:
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{db}`")
        cur.execute(
            f"CREATE TABLE `{db}`.`{table}` (id int NOT NULL, seq int NOT NULL, PRIMARY KEY (id)) ENGINE=InnoDB"
        )
    conn.close()


def register(site: Site, table: str) -> LinkSpec:
    spec = LinkSpec.new(site.source_schema, table, site.helper_schema, f"{table}_helper", site.dest_schema)
    replies = Requests(Settings.from_env(site.pipeline_env())).ask("REGISTER", spec, [], 60)
    assert next(replies)["status"] == "ACCEPTED"
    return spec


def committed_count(site: Site, topic: str) -> int:
    """Offsets taken on the topic (events, tombstones and transaction markers): grows as the capture commits."""
    c = Consumer({"bootstrap.servers": site.env["DJLINK_KAFKA_BOOTSTRAP"], "group.id": f"{site.tag}-watch"})
    try:
        return int(c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1])
    finally:
        c.close()


class Writer(threading.Thread):
    """A steady, bounded write load: inserts, updates and deletes in transactions of 1-3 rows."""

    def __init__(self, site: Site, db: str, table: str, limit: int = 20000, existing: dict[int, int] | None = None):
        super().__init__(daemon=True)
        self.site, self.db, self.table, self.limit = site, db, table, limit
        self.existing = dict(existing or {})
        self.expected: dict[int, list[tuple[str, int | None]]] = defaultdict(list)
        self.stop = threading.Event()
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        rng = random.Random(7)
        conn = admin(self.site.env, "SOURCE")
        conn.autocommit(False)
        live = dict(self.existing)
        next_id, seq = max(live, default=0) + 1, max(live.values(), default=0)
        t = f"`{self.db}`.`{self.table}`"
        with conn.cursor() as cur:
            while not self.stop.is_set() and self.transactions < self.limit:
                done: list[tuple[int, str, int | None]] = []
                for _ in range(rng.randint(1, 3)):
                    seq += 1
                    choice = rng.random()
                    if not live or choice < 0.4:
                        cur.execute(f"INSERT INTO {t} (id, seq) VALUES (%s, %s)", (next_id, seq))
                        live[next_id] = seq
                        done.append((next_id, "c", seq))
                        next_id += 1
                    elif choice < 0.85:
                        key = rng.choice(list(live))
                        cur.execute(f"UPDATE {t} SET seq=%s WHERE id=%s", (seq, key))
                        live[key] = seq
                        done.append((key, "u", seq))
                    else:
                        key = rng.choice(list(live))
                        cur.execute(f"DELETE FROM {t} WHERE id=%s", (key,))
                        del live[key]
                        done.append((key, "d", None))
                conn.commit()
                self.transactions += 1
                for key, op, value in done:
                    self.expected[key].append((op, value))
        conn.close()


def events_by_key(events: list[dict[str, Any]]) -> dict[int, list[tuple[str, int | None]]]:
    result: dict[int, list[tuple[str, int | None]]] = defaultdict(list)
    for e in events:
        if e["op"] in ("c", "u", "d"):
            row = e["after"] if e["after"] is not None else e["before"]
            result[row["id"]].append((e["op"], None if e["after"] is None else e["after"]["seq"]))
    return result


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(site: Site) -> None:
    create_table(site, site.source_schema, "counter")
    site.start("agent")
    register(site, "counter")
    topic = Topics(site.topic_prefix).table(site.source_schema, "counter")
    capture = site.start("capture")
    writer = Writer(site, site.source_schema, "counter")
    writer.start()
    rng = random.Random(11)
    kills = 0
    try:
        for _ in range(10):
            # Kill once the capture has committed a random number of further offsets: mid-stream, not at rest.
            target = committed_count(site, topic) + rng.randint(1, 300)
            wait_for(lambda t=target: committed_count(site, topic) >= t, 60, "the capture to make progress")
            capture.kill()
            capture.wait(10)
            kills += 1
            capture = site.start("capture")
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None, writer.error
    assert kills == 10 and writer.transactions > 100
    expected_events = sum(len(v) for v in writer.expected.values())

    def all_events() -> list[dict[str, Any]] | None:
        events = [e for e in read_topic(site, topic) if e["op"] != "r"]
        return events if len(events) >= expected_events else None

    try:
        events = wait_for(all_events, 120, f"{expected_events} committed events")
    except BaseException:
        capture.terminate()
        print("CAPTURE STDERR", capture.communicate(timeout=30)[1][-5000:])
        raise
    assert events_by_key(events) == writer.expected  # every change exactly once, in source order per key
    assert len(events) == expected_events


def test_only_linked_tables_reach_kafka(site: Site) -> None:
    unrelated = f"{site.tag}_unrelated"
    create_table(site, site.source_schema, "linked")
    create_table(site, unrelated, "private")
    site.start("agent")
    register(site, "linked")
    site.start("capture")
    conn = admin(site.env, "SOURCE")
    try:
        with conn.cursor() as cur:
            for i in range(5):
                cur.execute(f"INSERT INTO `{unrelated}`.`private` VALUES ({i}, {i})")
                cur.execute(f"INSERT INTO `{site.source_schema}`.`linked` VALUES ({i}, {i})")
            # Both in one transaction too: only the linked row may leave.
            conn.autocommit(False)
            cur.execute(f"INSERT INTO `{unrelated}`.`private` VALUES (100, 100)")
            cur.execute(f"INSERT INTO `{site.source_schema}`.`linked` VALUES (100, 100)")
            conn.commit()
        topics = Topics(site.topic_prefix)
        linked = topics.table(site.source_schema, "linked")
        events = wait_for(lambda: (e := read_topic(site, linked)) and len(e) >= 6 and e, 60, "the linked rows")
        assert sorted(e["after"]["id"] for e in events) == [0, 1, 2, 3, 4, 100]
        names = AdminClient({"bootstrap.servers": site.env["DJLINK_KAFKA_BOOTSTRAP"]}).list_topics(timeout=10).topics
        ours = [n for n in names if n.startswith(f"{site.topic_prefix}.")]
        assert not [n for n in ours if unrelated in n]
        # No event anywhere under our prefix names the unrelated schema.
        for name in ours:
            if name.startswith(f"{site.topic_prefix}.{site.tag}"):
                assert all(e.get("source", {}).get("db") != unrelated for e in read_topic(site, name))
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{unrelated}`")
        conn.close()


def test_a_running_capture_publishes_rows_inserted_right_after_the_first_link(site: Site) -> None:
    """The REGISTER reply waits until the running capture has read the new link: the next insert is published."""
    site.start("capture", "agent")
    signals = Topics(site.topic_prefix).signals
    for table in ("first", "second"):
        create_table(site, site.source_schema, table)
        signal_at = committed_count(site, signals)  # the link's signal will be at this offset or later
        register(site, table)
        # Deterministic: the reply came only after the capture committed its read of the link's signal.
        capture_group = f"{site.topic_prefix}-capture"
        c = Consumer({"bootstrap.servers": site.env["DJLINK_KAFKA_BOOTSTRAP"], "group.id": capture_group})
        try:
            [read] = c.committed([TopicPartition(signals, 0)], timeout=10)
        finally:
            c.close()
        assert read.offset > signal_at, f"the capture had not read the signal of {table} when the link was accepted"
        conn = admin(site.env, "SOURCE")
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO `{site.source_schema}`.`{table}` VALUES (7, 7)")
        conn.close()
        topic = Topics(site.topic_prefix).table(site.source_schema, table)
        events = wait_for(lambda t=topic: read_topic(site, t), 30, f"the row inserted into {table}")  # type: ignore[misc]
        assert [e["after"]["id"] for e in events] == [7]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def seq(gtid_position: str) -> int:
    """Sequence number of domain 0 in a MariaDB GTID position."""
    return int(parse_position(gtid_position)[0].rsplit("-", 1)[1])


def test_capture_reports_throughput_lag_and_position(site: Site) -> None:
    create_table(site, site.source_schema, "measured")
    site.start("agent")
    register(site, "measured")
    port = free_port()
    site.start("capture", DJLINK_METRICS_PORT=str(port))
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        for i in range(5):
            cur.execute(f"INSERT INTO `{site.source_schema}`.`measured` VALUES ({i}, {i})")
        cur.execute("SELECT @@gtid_binlog_pos")
        position = cur.fetchone()[0]
    conn.close()

    def scrape() -> str | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return text if (metric(text, "djlink_capture_events_total") or 0) >= 5 else None

    text = wait_for(scrape, 30, "5 events in the capture's metrics")
    assert metric(text, "djlink_capture_units_total") == 5
    lag = metric(text, "djlink_capture_lag_ms")
    assert lag is not None and 0 <= lag < 60_000
    # Other writers may share the server: the committed position is at or after our last insert.
    committed = re.search(r'gtid_position="([^"]*)"', text)
    assert committed and seq(committed.group(1)) >= seq(position)

    status = subprocess.run(
        [sys.executable, "-m", "djlink", "status"], env=site.pipeline_env(), capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    reported = re.search(r"committed up to GTID (\S+)", status.stdout)
    assert reported and seq(reported.group(1)) >= seq(position), status.stdout


def test_snapshot_reads_during_concurrent_changes_leave_the_consumer_at_the_source_state(site: Site) -> None:
    create_table(site, site.source_schema, "churn")
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO `{site.source_schema}`.`churn` VALUES (%s, %s)", [(i, 0) for i in range(1, 601)])
    site.start("agent")
    spec = register(site, "churn")
    site.start("capture", DJLINK_SNAPSHOT_CHUNK_SIZE="20")
    writer = Writer(site, site.source_schema, "churn", limit=3000, existing={i: 0 for i in range(1, 601)})
    writer.start()
    try:
        snapshot_under_load(site, spec, writer)
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None
    with conn.cursor() as cur:
        cur.execute(f"SELECT id, seq FROM `{site.source_schema}`.`churn`")
        source = dict(cur.fetchall())
    conn.close()
    topic = Topics(site.topic_prefix).table(site.source_schema, "churn")

    def folded() -> dict[int, int] | None:
        view: dict[int, int] = {}
        for e in read_topic(site, topic):
            if e["op"] == "d":
                view.pop(e["before"]["id"], None)
            else:
                view[e["after"]["id"]] = e["after"]["seq"]
        # Keys 1..600 come from the snapshot, the writer's new keys from the stream.
        return view if view == source else None

    wait_for(folded, 60, "the consumer's view to equal the source")
    assert writer.transactions > 50
    # Each chunk sits in the stream where it was read: a key's values never go back in time, even briefly,
    # and no row comes back after its delete. (Published when read, a chunk would be followed by
    # transactions it already contains, and the view would step back to them.)
    last: dict[int, int | None] = {}
    chunks = 0
    for e in read_topic(site, topic):
        key = (e["before"] or e["after"])["id"]
        seq = None if e["op"] == "d" else e["after"]["seq"]
        chunks += e["op"] == "r"
        if key in last:
            before = last[key]
            assert before is not None, f"key {key} came back after its delete ({e['op']})"
            assert seq is None or seq >= before, f"key {key} went back from seq {before} to {seq} ({e['op']})"
        last[key] = seq
    assert chunks > 0


def snapshot_under_load(site: Site, spec: LinkSpec, writer: Writer) -> None:
    # Snapshot every key while the writer updates and deletes them (30 chunks, each its own consistent read).
    settings = Settings.from_env(site.pipeline_env())
    topics = Topics(site.topic_prefix)
    signal = {
        "signal_id": "s1",
        "kind": "SNAPSHOT_KEYS",
        "request_id": "r1",
        "link": dataclasses.replace(spec, primary_key=("id",)).to_avro(),
        "keys": [keycodec.encode({"id": i}) for i in range(1, 601)],
        "ts_ms": 0,
    }
    p = producer(settings)
    produce(p, topics.signals, spec.link_id, schemas.Codec().encode(schemas.FIXED["signal"], signal))
    p.flush(10)
    # The capture commits the signal's offset with its last chunk: then the whole snapshot is in Kafka.
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{site.topic_prefix}-capture"})
    try:
        tp = TopicPartition(topics.signals, 0)
        wait_for(lambda: c.committed([tp], timeout=10)[0].offset >= 1, 60, "the snapshot to complete")
    finally:
        c.close()


def test_alter_table_yields_new_schema_versions_and_rows_on_both_sides_decode(site: Site) -> None:
    create_table(site, site.source_schema, "evolving")
    site.start("agent")
    register(site, "evolving")
    capture = site.start("capture")
    capture.terminate()  # it has checkpointed where it started; what follows is replayed on restart
    capture.wait(20)
    table = f"`{site.source_schema}`.`evolving`"
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1, 10), (2, 20)")
        cur.execute(f"ALTER TABLE {table} ADD COLUMN note varchar(20) NULL")
        cur.execute(f"INSERT INTO {table} VALUES (3, 30, 'three')")
    site.start("capture")  # replays rows from before and after the ALTER, with today's table in front of it
    topic = Topics(site.topic_prefix).table(site.source_schema, "evolving")
    wait_for(lambda: len(read_topic(site, topic)) >= 3, 60, "the replayed rows")
    with conn.cursor() as cur:  # and one more change of shape while the capture follows live
        cur.execute(f"ALTER TABLE {table} DROP COLUMN seq")
        cur.execute(f"INSERT INTO {table} VALUES (4, 'four')")
    conn.close()
    events = wait_for(lambda: (e := read_topic(site, topic)) and len(e) >= 4 and e, 60, "the live row")
    assert [e["after"] for e in events] == [
        {"id": 1, "seq": 10},
        {"id": 2, "seq": 20},
        {"id": 3, "seq": 30, "note": "three"},
        {"id": 4, "note": "four"},
    ]
    settings = Settings.from_env(site.pipeline_env())
    codec = schemas.Codec(SchemaTopic(settings, Topics(site.topic_prefix)).resolve)
    versions = [codec.schema_of(m.value()).fingerprint for m in read_to_end(settings, topic)]
    assert len(set(versions)) == 3 and versions[0] == versions[1]


def test_initial_snapshot_publishes_every_row_once_and_resumes_after_kill_9(site: Site) -> None:
    create_table(site, site.source_schema, "existing")
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO `{site.source_schema}`.`existing` VALUES (%s, %s)", [(i, i) for i in range(60)])
    site.start("agent")
    register(site, "existing")
    topic = Topics(site.topic_prefix).table(site.source_schema, "existing")
    mode = {"DJLINK_SNAPSHOT_MODE": "initial", "DJLINK_SNAPSHOT_CHUNK_SIZE": "3"}
    capture = site.start("capture", **mode)
    wait_for(lambda: read_topic(site, topic), 60, "the first snapshot chunk")
    capture.kill()  # mid-snapshot: 20 chunks, each its own Kafka transaction with the progress record
    capture.wait(10)
    site.start("capture", **mode)
    snapshot = wait_for(
        lambda: (r := [e for e in read_topic(site, topic) if e["op"] == "r"]) and len(r) >= 60 and r,
        60,
        "all 60 rows",
    )
    assert sorted(e["after"]["id"] for e in snapshot) == list(range(60))  # each exactly once
    assert all(e["source"]["snapshot"] == "true" for e in snapshot)
    with conn.cursor() as cur:  # and streaming carries on after it
        cur.execute(f"UPDATE `{site.source_schema}`.`existing` SET seq = 100 WHERE id = 5")
    conn.close()
    update = wait_for(lambda: [e for e in read_topic(site, topic) if e["op"] == "u"], 60, "the update")
    assert update[0]["after"] == {"id": 5, "seq": 100}


def test_savepoints_inside_a_transaction_keep_it_one_unit_and_lose_no_row(site: Site) -> None:
    """MariaDB logs SAVEPOINT (and ROLLBACK TO, RELEASE) as statements inside the transaction even with ROW
    binlogging, as nested transactions of ORMs do; they are not DDL and must not cut the transaction."""
    create_table(site, site.source_schema, "nested")
    site.start("capture", "agent")
    register(site, "nested")
    conn = admin(site.env, "SOURCE")
    conn.autocommit(False)
    table = f"`{site.source_schema}`.`nested`"
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1, 1)")
        cur.execute("SAVEPOINT first")
        cur.execute(f"INSERT INTO {table} VALUES (2, 2)")
        cur.execute("RELEASE SAVEPOINT first")
        cur.execute("SAVEPOINT second")
        cur.execute(f"INSERT INTO {table} VALUES (3, 3)")
        cur.execute("ROLLBACK TO SAVEPOINT second")
        cur.execute(f"INSERT INTO {table} VALUES (4, 4)")
    conn.commit()
    with conn.cursor() as cur:  # and the next transaction is a unit of its own
        cur.execute(f"UPDATE {table} SET seq = 5 WHERE id = 1")
    conn.commit()
    conn.close()
    topic = Topics(site.topic_prefix).table(site.source_schema, "nested")
    events = wait_for(lambda: (e := read_topic(site, topic)) and len(e) >= 4 and e, 30, "the two transactions")
    assert [(e["op"], e["after"]["id"]) for e in events] == [("c", 1), ("c", 2), ("c", 4), ("u", 1)]
    units = [e["transaction"]["id"] for e in events]
    assert units[0] == units[1] == units[2] != units[3]
    ends = {t["id"]: t["event_count"] for t in read_topic(site, Topics(site.topic_prefix).transaction)}
    assert (ends[units[0]], ends[units[3]]) == (3, 1)

    # Reopened tables get new binlog table ids, a new binlog file clears the maps: rows still decode.
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute("FLUSH TABLES")
        cur.execute(f"INSERT INTO {table} VALUES (7, 7)")
        cur.execute("FLUSH BINARY LOGS")
        cur.execute(f"UPDATE {table} SET seq = 8 WHERE id = 7")
    conn.close()
    events = wait_for(lambda: (e := read_topic(site, topic)) and len(e) >= 6 and e, 30, "the rows after the flushes")
    assert [(e["op"], e["after"]) for e in events[4:]] == [("c", {"id": 7, "seq": 7}), ("u", {"id": 7, "seq": 8})]


def test_an_xa_transaction_on_a_captured_table_stops_the_capture_with_one_clear_line(site: Site) -> None:
    """Its rows are logged before an XA PREPARE event the binlog library cannot read: refusing beats losing."""
    create_table(site, site.source_schema, "xa")
    capture = site.start("capture", "agent")
    register(site, "xa")
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute("XA START 'djlink-test'")
        cur.execute(f"INSERT INTO `{site.source_schema}`.`xa` VALUES (1, 1)")
        cur.execute("XA END 'djlink-test'")
        cur.execute("XA PREPARE 'djlink-test'")
        cur.execute("XA COMMIT 'djlink-test'")
        cur.execute(
            f"INSERT INTO `{site.source_schema}`.`xa` VALUES (2, 2)"
        )  # the next transaction ends the XA's group
    conn.close()
    assert capture.wait(30) == 1
    assert capture.stderr is not None
    err = capture.stderr.read()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "cannot capture XA transactions" in lines[0], err
    assert "Traceback" not in err, err


def test_a_pull_after_an_alter_by_a_session_without_a_default_database_reads_the_new_columns(site: Site) -> None:
    """DataJoint alters tables as `db`.`table` from a connection with no database selected: the binlog's
    statement then names no schema, and the snapshot reads must still see the table's new shape."""
    create_table(site, site.source_schema, "shifting")
    site.start("capture", "agent")
    spec = register(site, "shifting")
    table = f"`{site.source_schema}`.`shifting`"
    conn = admin(site.env, "SOURCE")  # no default database
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1, 1), (2, 2)")
    requests = Requests(Settings.from_env(site.pipeline_env()))
    topic = Topics(site.topic_prefix).table(site.source_schema, "shifting")

    def pull_and_read(key: int) -> dict[str, Any]:
        replies = requests.ask("PULL", spec, [keycodec.encode({"id": key})], 60)
        try:
            assert next(replies)["status"] == "ACCEPTED"
        finally:
            replies.close()
        reads = wait_for(
            lambda: [e for e in read_topic(site, topic) if e["op"] == "r" and e["after"]["id"] == key],
            30,
            f"the snapshot read of {key}",
        )
        return dict(reads[0]["after"])

    assert pull_and_read(1) == {"id": 1, "seq": 1}
    with conn.cursor() as cur:
        cur.execute(f"ALTER TABLE {table} ADD COLUMN note varchar(8) NOT NULL DEFAULT 'new'")
    conn.close()
    assert pull_and_read(2) == {"id": 2, "seq": 2, "note": "new"}


def test_rows_logged_before_a_change_of_column_types_replay_with_the_types_they_had(site: Site) -> None:
    """Same column names, other types: a narrower decimal scale, a column made NOT NULL. Rows logged before the
    ALTER and replayed after it cannot be encoded with today's table; they keep the shape the binlog gives."""
    conn = admin(site.env, "SOURCE")
    table = f"`{site.source_schema}`.`retyped`"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{site.source_schema}`")
        cur.execute(f"CREATE TABLE {table} (id int NOT NULL PRIMARY KEY, amount decimal(8,4), note varchar(8) NULL)")
    site.start("agent")
    register(site, "retyped")
    capture = site.start("capture")
    capture.terminate()  # it has checkpointed where it started; what follows is replayed on restart
    capture.wait(20)
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1, 12.3456, NULL)")
        cur.execute(f"UPDATE {table} SET note = '' WHERE note IS NULL")
        cur.execute(f"ALTER TABLE {table} MODIFY amount decimal(8,2), MODIFY note varchar(8) NOT NULL")
        cur.execute(f"INSERT INTO {table} VALUES (2, 7.5, 'two')")
    conn.close()
    site.start("capture")
    topic = Topics(site.topic_prefix).table(site.source_schema, "retyped")
    events = wait_for(lambda: (e := read_topic(site, topic)) and len(e) >= 3 and e, 60, "the replayed rows")
    assert [(e["op"], e["after"]) for e in events] == [
        ("c", {"id": 1, "amount": Decimal("12.3456"), "note": None}),
        ("u", {"id": 1, "amount": Decimal("12.3456"), "note": ""}),
        ("c", {"id": 2, "amount": Decimal("7.50"), "note": "two"}),
    ]


def test_a_link_whose_topic_name_collides_in_kafka_is_refused_and_the_agent_goes_on(site: Site) -> None:
    """Kafka takes '.' and '_' in topic names as one: `<db>.spike_sorting` and `<db>_spike.sorting` collide."""
    agent = site.start("agent")
    other_db = f"{site.source_schema}_spike"
    create_table(site, site.source_schema, "spike_sorting")
    create_table(site, other_db, "sorting")
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"GRANT SELECT, REFERENCES ON `{other_db}`.* TO '{site.link_user}'@'%'")
    conn.close()
    try:
        register(site, "spike_sorting")
        spec = LinkSpec.new(other_db, "sorting", site.helper_schema, "sorting_helper", site.dest_schema)
        replies = Requests(Settings.from_env(site.pipeline_env())).ask("REGISTER", spec, [], 60)
        reply = next(replies)
        assert reply["status"] == "REFUSED", reply
        assert f"Kafka refused the topic {Topics(site.topic_prefix).table(other_db, 'sorting')}" in reply["message"]
        assert "collides" in reply["message"]
        assert agent.poll() is None, "the agent stopped"
    finally:
        conn = admin(site.env, "SOURCE")
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{other_db}`")
        conn.close()


def test_an_initial_snapshot_under_concurrent_updates_never_moves_a_row_back_in_time(site: Site) -> None:
    """Each chunk of an initial snapshot is placed in the stream where its consistent read was taken, as a pull's
    chunks are: a subscriber never sees a row's value go back (a chunk published ahead of older updates would)."""
    create_table(site, site.source_schema, "growing")
    rows_n = 300
    conn = admin(site.env, "SOURCE")
    table = f"`{site.source_schema}`.`growing`"
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {table} VALUES (%s, 0)", [(i,) for i in range(rows_n)])
    site.start("agent")
    register(site, "growing")
    stop = threading.Event()

    def write() -> None:  # every update raises a row's seq: a row's values only ever grow
        rng, value = random.Random(3), 0
        c = admin(site.env, "SOURCE")
        with c.cursor() as cur:
            while not stop.is_set() and value < 20_000:
                value += 1
                cur.execute(f"UPDATE {table} SET seq = %s WHERE id = %s", (value, rng.randrange(rows_n)))
        c.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        site.start("capture", DJLINK_SNAPSHOT_MODE="initial", DJLINK_SNAPSHOT_CHUNK_SIZE="3")
        topic = Topics(site.topic_prefix).table(site.source_schema, "growing")
        wait_for(lambda: len([e for e in read_topic(site, topic) if e["op"] == "r"]) >= rows_n, 120, "the snapshot")
    finally:
        stop.set()
        writer.join(30)
    seen: dict[int, int] = {}
    for e in read_topic(site, topic):
        key, value = e["after"]["id"], e["after"]["seq"]
        assert value >= seen.get(key, 0), f"row {key} went back from {seen[key]} to {value} ({e['op']})"
        seen[key] = value
    assert len(seen) == rows_n
