"""The applier over real services: exactly-once apply under kill -9, and dead letters that do not stop it."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import datajoint as dj
import numpy as np

import schemas
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.kafka import produce, producer, read_to_end
from foundation.links import LinkSpec
from foundation.topics import SchemaTopic, Topics
from link import link
from link.requests import Requests
from tests.conftest import Site, admin, scalar, wait_for
from tests.integration.test_pull import declare_source, read_topic, rows


def declare_recordings(site: Site, n: int) -> Any:
    """A master with an 8 KB longblob and two part rows per entity, rows 1..n."""
    schema = dj.Schema(site.source_schema, connection=site.source_dj())

    @schema
    class Recording(dj.Manual):
        definition = """
        recording_id : int
        ---
        subject : varchar(32)
        trace : longblob
        """

        class Channel(dj.Part):
            definition = """
            -> master
            channel : tinyint
            ---
            gain : double
            """

    Recording.insert({"recording_id": i, "subject": f"m{i}", "trace": np.random.rand(1000)} for i in range(1, n + 1))
    Recording.Channel.insert(
        {"recording_id": i, "channel": c, "gain": i + c / 10} for i in range(1, n + 1) for c in range(2)
    )
    return Recording


@dataclass(frozen=True)
class Linked:
    """Recordings linked through the façade: its table class, the link, and a requester of pulls and deletes."""

    Recording: Any
    spec: LinkSpec
    requests: Requests


def linked_recordings(site: Site, n: int) -> Linked:
    """`n` recordings declared at the source (the roles are the caller's to start) and linked through the façade."""
    declare_recordings(site, n)
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        pass

    spec = LinkSpec.new(site.source_schema, "recording", site.helper_schema, "outbound", site.dest_schema)
    return Linked(Recording, spec, Requests(Settings.from_env(site.pipeline_env())))


def ask(requests: Requests, kind: str, spec: LinkSpec, ids: list[int], timeout: float = 90) -> dict[str, Any]:
    """Send a pull or delete and return the agent's acceptance (its entities are then in flight)."""
    replies = requests.ask(kind, spec, [keycodec.encode({"recording_id": i}) for i in ids], timeout)
    try:
        accepted = next(replies)
    finally:
        replies.close()
    assert accepted["status"] == "ACCEPTED", accepted
    return accepted


def pull_without_waiting(requests: Requests, spec: LinkSpec, ids: list[int]) -> None:
    """Send a PULL and return once the agent accepted it (the entities are then in flight)."""
    accepted = ask(requests, "PULL", spec, ids, 60)
    assert accepted["activated"] == len(ids), accepted


def units_of(site: Site, spec: LinkSpec) -> dict[str, tuple[int, int]]:
    """Snapshot units published for a link: unit id -> (offset of its END on the transaction topic, master rows)."""
    settings = Settings.from_env(site.pipeline_env())
    codec = schemas.Codec()
    master = f"{spec.source_db}.{spec.source_table}"
    found: dict[str, tuple[int, int]] = {}
    for msg in read_to_end(settings, Topics(site.topic_prefix).transaction):
        record = codec.decode(msg.value())
        if record["status"] == "END" and record["link_id"] == spec.link_id:
            entities = sum(dc["event_count"] for dc in record["data_collections"] if dc["data_collection"] == master)
            found[record["id"]] = (int(msg.offset() or 0), entities)
    return found


def test_applier_killed_at_random_moments_applies_every_unit_exactly_once(site: Site, state_db: str) -> None:
    n, per_pull = 300, 25
    # One unit per destination transaction: batched, a pull's units would mostly commit together, and
    # the kills would rarely fall between two of them.
    one_unit_per_transaction = {"DJLINK_APPLIER_STATE_DB": state_db, "DJLINK_APPLIER_BATCH_UNITS": "1"}
    site.start("capture", "agent", DJLINK_SNAPSHOT_CHUNK_SIZE="3")  # 100 units: many moments to be killed in
    applier = site.start("applier", **one_unit_per_transaction)
    linked = linked_recordings(site, n)
    spec, requests = linked.spec, linked.requests
    dest = admin(site.env, "DEST")
    count = f"SELECT COUNT(*) FROM `{site.dest_schema}`.`recording`"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    replays = kills = mid_flight = resent = 0
    try:
        for start in range(1, n + 1, per_pull):
            pull_without_waiting(requests, spec, list(range(start, start + per_pull)))
            # Kill once the destination has grown by a random amount short of what is in flight: mid-stream.
            # (Polled every millisecond: the applier takes only some 50 ms for a pull's 9 units.)
            requested, have = start + per_pull - 1, scalar(dest, count)
            target = have + rng.randint(1, max(1, requested - 1 - have))
            wait_for(
                lambda t=target: scalar(dest, count) >= t, 60, f"{target} entities at the destination", interval=0.001
            )  # a moment that lasts milliseconds
            applier.kill()
            applier.wait(10)
            kills += 1
            assert applier.stderr is not None
            said = applier.stderr.read()
            replays += said.count("was finished before")
            resent += "resending the acks" in said
            mid_flight += scalar(dest, count) < requested
            applier = site.start("applier", **one_unit_per_transaction)
        wait_for(lambda: scalar(dest, count) == n, 120, f"all {n} entities at the destination")
        src = admin(site.env, "SOURCE")
        shared = f"SELECT COUNT(*) FROM `{site.helper_schema}`.`outbound` WHERE process='NONE'"
        wait_for(lambda: scalar(src, shared) == n, 60, "every helper row to be process='NONE'")
        src.close()
    finally:
        print(f"\nseed {seed}: {kills} kills, {mid_flight} mid-flight, {replays} units read again", file=sys.stderr)
        print(f"acks resent by {resent} restarted appliers", file=sys.stderr)
    assert kills >= 10

    # Exactly the pulled entities, byte-identical to the source, each once (compared in SQL row by row).
    src_master = rows(site, "SOURCE", site.source_schema, "recording", "recording_id")
    assert rows(site, "DEST", site.dest_schema, "recording", "recording_id") == src_master
    assert [r[0] for r in src_master] == list(range(1, n + 1))
    src_parts = rows(site, "SOURCE", site.source_schema, "recording__channel", "recording_id, channel")
    assert rows(site, "DEST", site.dest_schema, "recording__channel", "recording_id, channel") == src_parts
    assert len(src_parts) == 2 * n
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id") == [
        (i, "NONE", "FALSE", "FALSE") for i in range(1, n + 1)
    ]

    # Every published unit was applied, and recorded as applied once (the table's primary key refuses a
    # second application); none was given up, and every ack reached the agent.
    published = units_of(site, spec)
    assert sum(entities for _, entities in published.values()) == n  # each entity read in exactly one unit
    group = f"{site.topic_prefix}-applier"
    with dest.cursor() as cur:
        cur.execute(
            f"SELECT unit_id, outcome, ack_pending FROM `{state_db}`.applied_units WHERE consumer_group=%s", (group,)
        )
        finished = {unit_id: (outcome, ack_pending) for unit_id, outcome, ack_pending in cur.fetchall()}
    assert finished == {unit_id: ("applied", 0) for unit_id in published}
    assert read_topic(site, Topics(site.topic_prefix).dead_letter) == []

    # The stored offsets have moved past the last unit.
    def stored_transaction_offset() -> int:
        return int(
            scalar(
                dest,
                f"SELECT next_offset FROM `{state_db}`.offsets WHERE consumer_group=%s AND topic=%s",
                group,
                Topics(site.topic_prefix).transaction,
            )
            or 0
        )

    last_end = max(end for end, _ in published.values())
    wait_for(lambda: stored_transaction_offset() > last_end, 10, "the offsets to be stored")

    # Offsets lost (say, an old backup of them restored): every unit is read again, and none is applied
    # again. A second application would show, as it would overwrite the rows changed here.
    applier.kill()
    applier.wait(10)
    caught_up = stored_transaction_offset()
    with dest.cursor() as cur:
        cur.execute(f"UPDATE `{site.dest_schema}`.`recording` SET subject='changed at the destination'")
        cur.execute(f"UPDATE `{state_db}`.offsets SET next_offset=0 WHERE consumer_group=%s", (group,))
    applier = site.start("applier", **one_unit_per_transaction)
    wait_for(lambda: stored_transaction_offset() >= caught_up, 60, "the applier to read everything again")
    applier.terminate()
    _, err = applier.communicate(timeout=30)
    unseen = [u for u in published if f"unit {u} was finished before" not in err]
    assert not unseen, f"{len(unseen)} units not reported as finished before: {unseen[:5]}\n{err[-3000:]}"
    changed = f"SELECT COUNT(*) FROM `{site.dest_schema}`.`recording` WHERE subject='changed at the destination'"
    assert scalar(dest, changed) == n
    dest.close()


def kill_connections_of(site: Site, user: str) -> int:
    conn = admin(site.env, "DEST")
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM information_schema.processlist WHERE user=%s", (user,))
        ids = [row[0] for row in cur.fetchall()]
        for i in ids:
            cur.execute(f"KILL CONNECTION {int(i)}")
    conn.close()
    return len(ids)


def test_poison_messages_and_a_refused_unit_go_to_the_dead_letter_topic_and_later_pulls_apply(
    site: Site, state_db: str
) -> None:
    # The applier logs in as its own user, so the test can cut its connections without touching anyone else's.
    app_user, app_pass = f"{site.tag}_app", uuid.uuid4().hex
    conn = admin(site.env, "DEST")
    with conn.cursor() as cur:
        cur.execute(f"CREATE USER '{app_user}'@'%' IDENTIFIED BY '{app_pass}'")
        for db in (site.dest_schema, state_db):
            cur.execute(f"GRANT ALL PRIVILEGES ON `{db}`.* TO '{app_user}'@'%'")
    try:
        poison_and_refusal(site, state_db, app_user, app_pass)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{app_user}'@'%'")
        conn.close()


def poison_and_refusal(site: Site, state_db: str, app_user: str, app_pass: str) -> None:
    site.start("capture", "agent")
    applier = site.start(
        "applier", DJLINK_APPLIER_STATE_DB=state_db, DJLINK_DEST_USER=app_user, DJLINK_DEST_PASSWORD=app_pass
    )
    declare_source(site)
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        pass

    settings = Settings.from_env(site.pipeline_env())
    topics = Topics(site.topic_prefix)
    master_topic = topics.table(site.source_schema, "recording")
    ack = schemas.FIXED["ack"]
    valid_ack = schemas.Codec().encode(ack, {"link_id": "x", "unit_id": "u", "keys": [], "ts_ms": 0})
    poison = {
        b"poison-bytes": (b"\x01" + os.urandom(40), "not an Avro single-object encoded value"),
        b"poison-confluent": (b"\x00" + os.urandom(40), "and no registry configured"),
        b"poison-fingerprint": (schemas.MAGIC + os.urandom(8) + b"\x02\x04", "unknown schema fingerprint"),
        b"poison-body": (schemas.MAGIC + ack.fingerprint + b"\x06ab", "corrupt Avro body"),
        b"poison-not-a-change": (valid_ack, "not a change event envelope"),
    }
    p = producer(settings)
    for key, (value, _) in poison.items():
        produce(p, master_topic, key, value)
    assert p.flush(10) == 0

    # A lost connection is not the data's fault: the applier reconnects, nothing is dead-lettered.
    wait_for(lambda: kill_connections_of(site, app_user) > 0, 10, "the applier's database connection")
    summary = (Recording().source & {"recording_id": 1}).pull(timeout=60)
    assert summary.pulled == 1, summary

    # Strays: a copy of entity 1's applied event, and the same event under a unit id that has no END. Produced
    # with a time two minutes back: the next END, far newer, says their own END is not coming.
    codec = schemas.Codec(SchemaTopic(settings, topics).resolve)
    applied = next(m.value() for m in read_to_end(settings, master_topic) if m.key() not in poison)
    assert applied is not None
    stray = codec.decode(applied)
    stray["transaction"]["id"] = f"stray:{uuid.uuid4()}"
    stray_value = codec.encode(codec.schema_of(applied), stray)
    back = int(time.time() * 1000) - 120_000
    for key, value in ((b"copy", applied), (b"stray", stray_value)):
        p.produce(master_topic, key=key, value=value, timestamp=back)
    assert p.flush(10) == 0

    # A unit the destination refuses (its part table is missing) is rolled back and dead-lettered whole.
    dest = admin(site.env, "DEST")
    with dest.cursor() as cur:
        cur.execute(f"RENAME TABLE `{site.dest_schema}`.`recording__channel` TO `{site.dest_schema}`.`away`")
    spec = LinkSpec.new(site.source_schema, "recording", site.helper_schema, "outbound", site.dest_schema)
    pull_without_waiting(Requests(settings), spec, [3])

    def dead_letters() -> list[dict[str, Any]]:
        return read_topic(site, topics.dead_letter)

    wait_for(lambda: len(dead_letters()) >= 11, 60, "11 dead letters")
    # Nothing of entity 3 arrived, not even its master row; it stays Activated (process PULL), a legal state.
    assert rows(site, "DEST", site.dest_schema, "recording", "recording_id") == [
        rows(site, "SOURCE", site.source_schema, "recording", "recording_id")[0]
    ]
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id") == [
        (1, "NONE", "FALSE", "FALSE"),
        (3, "PULL", "FALSE", "FALSE"),
    ]

    # The pipeline goes on: with the table back, a later pull applies, and pulling entity 3 again retries it.
    with dest.cursor() as cur:
        cur.execute(f"RENAME TABLE `{site.dest_schema}`.`away` TO `{site.dest_schema}`.`recording__channel`")
    summary = (Recording().source & [{"recording_id": 2}, {"recording_id": 3}]).pull(timeout=60)
    assert summary.pulled == 2, summary
    for table, order in (("recording", "recording_id"), ("recording__channel", "recording_id, channel")):
        source = rows(site, "SOURCE", site.source_schema, table, order)
        assert rows(site, "DEST", site.dest_schema, table, order) == source
    assert [r[1] for r in rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id")] == ["NONE"] * 3

    # Each poison message once, with its original bytes and the reason; then the five events of the refused unit.
    letters = dead_letters()
    decode = [d for d in letters if d["stage"] == "decode"]
    assert sorted(d["key"] for d in decode) == sorted(poison)
    for d in decode:
        value, reason = poison[d["key"]]
        assert d["topic"] == master_topic and d["value"] == value and reason in d["reason"], d
        assert d["unit_id"] is None
    raw = {(m.topic(), m.offset()): (m.key(), m.value()) for m in read_to_end(settings, master_topic)}
    for d in decode:
        assert raw[(d["topic"], d["offset"])] == (d["key"], d["value"])
    refused = [d for d in letters if d["stage"] == "apply"]
    assert len(refused) == 5  # helper row, master, 3 channels; nothing for entities 1 and 2, nor for the retry of 3
    assert len({d["unit_id"] for d in refused}) == 1
    assert all("(1146)" in d["reason"] for d in refused), refused[0]["reason"]
    events = [codec.decode(d["value"]) for d in refused]  # the original bytes, decoded with Kafka alone
    assert sorted((e["source"]["table"], e["after"]["recording_id"]) for e in events) == [
        ("outbound", 3),
        ("recording", 3),
        ("recording__channel", 3),
        ("recording__channel", 3),
        ("recording__channel", 3),
    ]
    # The stray goes there too; the copy of an applied event is dropped (its unit is finished).
    (lost,) = [d for d in letters if d["stage"] == "gather"]
    assert (lost["key"], lost["value"], lost["unit_id"]) == (b"stray", stray_value, stray["transaction"]["id"])
    assert "is not on the transaction topic" in lost["reason"]
    assert len(letters) == 11
    with dest.cursor() as cur:
        cur.execute(f"SELECT outcome FROM `{state_db}`.applied_units WHERE unit_id=%s", (refused[0]["unit_id"],))
        assert cur.fetchone() == ("dead-letter",)
    dest.close()
    assert applier.poll() is None  # still running: nothing stopped the pipeline

    # `djlink dead-letters` tells them apart: each undecodable message, the refused unit, the stray; and what to do.
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "djlink", "dead-letters", *args]
        return subprocess.run(command, env=site.pipeline_env(), capture_output=True, text=True, timeout=60)

    listed = cli()
    assert listed.returncode == 4, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == f"7 dead-lettered unit(s) or message(s) on {topics.dead_letter}:"
    decode_lines = [ln for ln in lines if "  decode  " in ln]
    assert sorted(ln.split("  decode  ", 1)[1].split(":", 1)[0] for ln in decode_lines) == sorted(
        f"{master_topic}[0]@{d['offset']}" for d in decode
    )
    helper_topic = topics.table(site.helper_schema, "outbound")
    part_topic = topics.table(site.source_schema, "recording__channel")
    (apply_line,) = [ln for ln in lines if "  apply   " in ln]
    counts = ", ".join(f"{t} {n}" for t, n in sorted([(helper_topic, 1), (master_topic, 1), (part_topic, 3)]))
    assert f"snapshot {refused[0]['unit_id']} (5 events: {counts}): " in apply_line, apply_line
    assert "(1146)" in apply_line
    (gather_line,) = [ln for ln in lines if "  gather  " in ln]
    assert f"snapshot {stray['transaction']['id']} (1 event: {master_topic} 1): " in gather_line
    assert [ln.split(":", 1)[0] for ln in lines[8:]] == ["decode", "snapshot"]
    assert "pull (or delete) them again" in lines[9]
    as_json = [json.loads(ln) for ln in cli("--json").stdout.splitlines()]
    assert sorted((d["offset"], base64.b64decode(d["value"])) for d in as_json) == sorted(
        (d["offset"], d["value"]) for d in letters
    )

    applier.terminate()
    _, err = applier.communicate(timeout=30)
    assert err.count("dead-lettered undecodable message") == len(poison), err  # one line each
    assert err.count("events dead-lettered") == 2, err  # one line per unit: the refused one and the stray
    assert "dropped 1 events of unit" in err and "finished before (applied)" in err, err


def test_a_unit_missing_an_event_on_a_quiet_transactional_partition_is_given_up_not_waited_for(
    site: Site, state_db: str
) -> None:
    """A unit whose only event on a table was undecodable waits for it until a newer END and its partition
    read past it. The capture writes transactionally: the partition then ends with a commit marker, which no
    consumer receives, so 'read to its end' must count the marker; otherwise every later unit waits."""
    site.start("capture", "agent")
    site.start("applier", DJLINK_APPLIER_STATE_DB=state_db)
    Source = declare_source(site, 1)
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        pass

    assert (Recording().source & {"recording_id": 1}).pull(timeout=60).pulled == 1
    settings = Settings.from_env(site.pipeline_env())
    topics = Topics(site.topic_prefix)
    part_topic = topics.table(site.source_schema, "recording__channel")
    # One transaction, as the capture writes them: an undecodable part event and the END of its unit, from two
    # minutes ago; nothing is written to the part table's topic after it.
    back = int(time.time() * 1000) - 120_000
    end = {
        "status": "END",
        "id": "0-1-999999999",
        "event_count": 1,
        "data_collections": [{"data_collection": f"{site.source_schema}.recording__channel", "event_count": 1}],
        "ts_ms": back,
        "request_id": None,
        "link_id": None,
    }
    p = producer(settings, f"{site.tag}-test-tx")
    p.init_transactions(30)
    p.begin_transaction()
    p.produce(part_topic, key=b"poison", value=b"\x01not avro", timestamp=back - 1)
    p.produce(
        topics.transaction,
        key=b"0-1-999999999",
        value=schemas.Codec().encode(schemas.FIXED["transaction"], end),
        timestamp=back,
    )
    p.commit_transaction(30)

    # A later pull (of a master without parts: nothing new on the part topic) must not wait behind it.
    Source.insert1({"recording_id": 9, "subject": "no parts", "trace": b"x"})
    summary = (Recording().source & {"recording_id": 9}).pull(timeout=40)
    assert summary.pulled == 1, summary
    decode = [d for d in read_topic(site, topics.dead_letter) if d["stage"] == "decode"]
    assert [(d["topic"], d["key"]) for d in decode] == [(part_topic, b"poison")]
