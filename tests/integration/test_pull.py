"""One pull, end to end, through the event path (binlog/snapshot -> Kafka -> applier)."""

from __future__ import annotations

import threading
from typing import Any

import datajoint as dj
import numpy as np
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

import schemas
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.kafka import read_to_end
from foundation.topics import SchemaTopic, Topics
from link import LinkError, link
from tests.conftest import Site, admin, wait_for


def declare_source(site: Site, n: int = 3) -> Any:
    """A master with a longblob and a part table, rows 1..n, declared while the pipeline runs."""
    schema = dj.Schema(site.source_schema, connection=site.source_dj())

    @schema
    class Recording(dj.Manual):
        definition = """
        recording_id : int
        ---
        subject : varchar(32)   # who was recorded
        trace : longblob
        """

        class Channel(dj.Part):
            definition = """
            -> master
            channel : tinyint
            ---
            gain : double
            label = null : varchar(16)
            """

    for i in range(1, n + 1):
        Recording.insert1({"recording_id": i, "subject": f"mouse-{i} 🐭", "trace": np.random.rand(100 * i)})
        Recording.Channel.insert({"recording_id": i, "channel": c, "gain": 0.25 * c, "label": None} for c in range(3))
    return Recording


def linked_recording(site: Site, n: int = 3, helper: str = "outbound", **applier_env: str) -> tuple[Any, Any]:
    """The pipeline running, the source declared while it runs (rows 1..n), its table linked through the
    façade: (the source class, the linked class)."""
    site.start("capture", "agent")
    site.start("applier", **applier_env)
    Source = declare_source(site, n)  # after the services started: picked up without a restart
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, helper, site.dest_schema)
    class Recording:
        """The linked copy."""

    return Source, Recording


def rows(site: Site, side: str, schema: str, table: str, order: str) -> list[tuple[Any, ...]]:
    conn = admin(site.env, side)
    with conn.cursor() as cur:
        cur.execute(f"SELECT * FROM `{schema}`.`{table}` ORDER BY {order}")
        result = list(cur.fetchall())
    conn.close()
    return result


def read_topic(site: Site, topic: str) -> list[dict[str, Any]]:
    """Every committed value of a topic, decoded with nothing but Kafka (schema topic included)."""
    settings = Settings.from_env(site.pipeline_env())
    # Knowing no schema beforehand: what a subscriber with nothing but Kafka has.
    codec = schemas.Codec(SchemaTopic(settings, Topics(site.topic_prefix)).resolve, fixed=False)
    return [codec.decode(m.value()) for m in read_to_end(settings, topic) if m.value() is not None]


def test_pull_through_kafka_leaves_exactly_the_requested_entities(site: Site) -> None:
    Source, Recording = linked_recording(site, helper="Outbound")  # the helper table named as a class

    assert len(Recording().source) == 3
    summary = (Recording().source & [{"recording_id": 1}, {"recording_id": 2}]).pull()
    assert (summary.pulled, summary.skipped, summary.refused, summary.in_flight) == (2, 0, [], [])

    # Exactly the requested master and part rows, byte-identical (compared in SQL, not through DataJoint).
    src_master = rows(site, "SOURCE", site.source_schema, "recording", "recording_id")
    dst_master = rows(site, "DEST", site.dest_schema, "recording", "recording_id")
    assert dst_master == src_master[:2]
    src_parts = rows(site, "SOURCE", site.source_schema, "recording__channel", "recording_id, channel")
    dst_parts = rows(site, "DEST", site.dest_schema, "recording__channel", "recording_id, channel")
    assert dst_parts == [r for r in src_parts if r[0] in (1, 2)]
    assert len(dst_parts) == 6
    # And DataJoint reads them back as the source has them.
    np.testing.assert_array_equal(
        (Recording() & {"recording_id": 2}).fetch1("trace"), (Source() & {"recording_id": 2}).fetch1("trace")
    )
    assert Recording.Channel().fetch("label").tolist() == [None] * 6

    # The helper table holds one row per pulled entity, in datajoint-link's format.
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id") == [
        (1, "NONE", "FALSE", "FALSE"),
        (2, "NONE", "FALSE", "FALSE"),
    ]

    # The rows travelled through Kafka: snapshot reads on the master's and the part's change topics.
    topics = Topics(site.topic_prefix)
    master_events = read_topic(site, topics.table(site.source_schema, "recording"))
    snapshot_rows = [e["after"] for e in master_events if e["op"] == "r"]
    assert sorted(r["recording_id"] for r in snapshot_rows) == [1, 2]
    assert {r["recording_id"]: r["trace"] for r in snapshot_rows} == {r[0]: r[2] for r in src_master[:2]}
    part_events = read_topic(site, topics.table(site.source_schema, "recording__channel"))
    assert sorted((e["after"]["recording_id"], e["after"]["channel"]) for e in part_events if e["op"] == "r") == [
        (i, c) for i in (1, 2) for c in range(3)
    ]
    # The master row and its parts are one unit (one snapshot chunk, read with the helper rows it was
    # decided on), so they were applied together.
    units = {e["transaction"]["id"] for e in master_events + part_events if e["op"] == "r"}
    assert len(units) == 1
    ends = [t for t in read_topic(site, topics.transaction) if t["id"] in units]
    assert [(t["status"], t["event_count"]) for t in ends] == [("END", 2 + 2 + 6)]
    helper_reads = [e for e in read_topic(site, topics.table(site.helper_schema, "outbound")) if e["op"] == "r"]
    assert [(e["after"]["process"], e["transaction"]["id"] in units) for e in helper_reads] == [("PULL", True)] * 2

    # Pulling again: already shared, nothing duplicated.
    again = (Recording().source & {"recording_id": 1}).pull()
    assert (again.pulled, again.skipped) == (0, 1)
    assert len(Recording()) == 2


def test_a_pull_is_moved_in_parts_and_a_part_the_source_refuses_refuses_only_its_entities(site: Site) -> None:
    """With DJLINK_AGENT_KEYS_PER_TRANSACTION=4, a pull of 10 marks its helper rows in source transactions of at
    most 4 (so the applier never holds a unit of the whole request); a part the source server refuses (a trigger
    here) refuses its 4 entities with the server's reason, the other parts arrive, and nothing is lost: once the
    source takes them, pulling again completes them."""
    site.start("capture", "agent", DJLINK_AGENT_KEYS_PER_TRANSACTION="4")
    site.start("applier")
    declare_source(site, 10)
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        """The linked copy."""

    src = admin(site.env, "SOURCE")
    with src.cursor() as cur:
        cur.execute(
            f"CREATE TRIGGER `{site.helper_schema}`.`no_six` BEFORE INSERT ON `{site.helper_schema}`.`outbound` "
            "FOR EACH ROW BEGIN IF NEW.recording_id = 6 THEN "
            "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'recording 6 may not leave'; END IF; END"
        )
    summary = Recording().source.pull(timeout=60)
    assert summary.pulled == 6, summary
    assert len(summary.refused) == 4, summary
    for i, reason in zip((5, 6, 7, 8), sorted(summary.refused), strict=True):
        assert reason.startswith(f'{{"recording_id":{i}}}: the source server refused it: (1644) recording 6 may not')
        assert reason.endswith("; not done"), reason
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording", "recording_id")] == [1, 2, 3, 4, 9, 10]
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id") == [
        (i, "NONE", "FALSE", "FALSE") for i in (1, 2, 3, 4, 9, 10)
    ]
    # The agent's inserts of helper rows came in two source transactions, of 4 and 2 (the refused part rolled back).
    helper = read_topic(site, Topics(site.topic_prefix).table(site.helper_schema, "outbound"))
    marked: dict[str, list[int]] = {}
    for e in helper:
        if e["op"] == "c":
            marked.setdefault(e["transaction"]["id"], []).append(e["after"]["recording_id"])
    assert sorted(marked.values()) == [[1, 2, 3, 4], [9, 10]]

    with src.cursor() as cur:
        cur.execute(f"DROP TRIGGER `{site.helper_schema}`.`no_six`")
    src.close()
    again = Recording().source.pull(timeout=60)
    assert (again.pulled, again.skipped, again.refused) == (4, 6, []), again
    assert rows(site, "DEST", site.dest_schema, "recording", "recording_id") == rows(
        site, "SOURCE", site.source_schema, "recording", "recording_id"
    )


def test_link_to_a_schema_the_source_site_does_not_allow_is_refused(site: Site) -> None:
    site.start("capture", "agent", DJLINK_ALLOWED_SCHEMAS="some_other_*")
    declare_source(site)
    site.connect_facade()
    with pytest.raises(LinkError, match="DJLINK_ALLOWED_SCHEMAS"):

        @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
        class Recording:
            pass


def test_a_link_the_source_server_cannot_make_is_refused_and_the_agent_goes_on(site: Site) -> None:
    agent = site.start("capture", "agent")
    site.start("applier")
    declare_source(site)
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:  # a table of the helper schema that is not a helper table
        cur.execute(f"CREATE DATABASE `{site.helper_schema}`")
        cur.execute(f"CREATE TABLE `{site.helper_schema}`.`notes` (id int PRIMARY KEY, text varchar(8))")
    conn.close()
    site.connect_facade()
    with pytest.raises(LinkError, match=r"the helper table name 'h+' has 70 characters; MariaDB allows 64"):

        @link(site.source_host, site.source_schema, site.helper_schema, "h" * 70, site.dest_schema)
        class Recording:
            pass

    with pytest.raises(LinkError, match=r"notes exists and is not a helper table .* lacks recording_id, process"):

        @link(site.source_host, site.source_schema, site.helper_schema, "notes", site.dest_schema)
        class Recording:  # type: ignore[no-redef]
            pass

    assert agent.poll() is None, "the source site stopped"

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:  # type: ignore[no-redef]
        pass

    assert (Recording().source & {"recording_id": 1}).pull().pulled == 1

    # The same helper table for another destination would mix two links' states: refused, the first one kept.
    with pytest.raises(LinkError, match=r"helper table \S+ already keeps the state of \S+\.recording"):

        @link(site.source_host, site.source_schema, site.helper_schema, "outbound", f"{site.dest_schema}_b")
        class Recording:  # type: ignore[no-redef]
            pass

    assert (Recording().source & {"recording_id": 2}).pull().pulled == 1


def test_pull_of_a_restriction_matching_nothing_says_so(site: Site) -> None:
    _, Recording = linked_recording(site)

    summary = (Recording().source & "recording_id > 100").pull()
    assert summary.requested == 0 and "matches no source rows" in summary.message


def test_the_progress_bar_shows_entities_done_of_total_and_rows_per_second(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    _, Recording = linked_recording(site)

    summary = Recording().source.pull(display_progress=True)
    assert (summary.pulled, summary.rows) == (3, 12), summary  # 3 masters with 3 parts each
    bar = capsys.readouterr().err.splitlines()[-1]
    assert "pull: 100%" in bar and "3/3" in bar and "rows/s" in bar and "entity/s" in bar, bar


def test_keys_cross_sites_as_the_same_text() -> None:
    assert keycodec.encode({"b": b"\x00\xff", "a": 1}) == '{"a":1,"b":{"$b64":"AP8="}}'


def test_a_row_bigger_than_kafkas_default_message_size_is_pulled_and_mirrored(site: Site) -> None:
    # The table's change topic exists already with Kafka's default limit of 1 MB per message (made by an
    # older djlink, or by hand): djlink raises it when it takes the topic on.
    topic = Topics(site.topic_prefix).table(site.source_schema, "recording")
    kafka = AdminClient({"bootstrap.servers": site.env["DJLINK_KAFKA_BOOTSTRAP"]})
    limit = {"max.message.bytes": "1048588"}
    kafka.create_topics([NewTopic(topic, num_partitions=1, replication_factor=-1, config=limit)])[topic].result(30)
    site.start("capture", "agent")
    site.start("applier")
    Source = declare_source(site, 1)
    big = np.random.default_rng(7).random(400_000)  # 3.2 MB serialized: Kafka's default limit is 1 MB
    Source.insert1({"recording_id": 2, "subject": "big", "trace": big})
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        pass

    assert (Recording().source & {"recording_id": 2}).pull().pulled == 1
    assert np.array_equal((Recording & {"recording_id": 2}).fetch1("trace"), big)
    # An update carries both images: some 6.4 MB in one change event.
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"UPDATE `{site.source_schema}`.recording SET subject='bigger' WHERE recording_id=2")
    conn.close()
    wait_for(lambda: (Recording & {"recording_id": 2}).fetch1("subject") == "bigger", 30, "the mirrored update")
    configs = kafka.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
    [described] = [fut.result(30) for fut in configs.values()]
    assert int(described["max.message.bytes"].value) >= 64 * 1024 * 1024


def test_a_pull_that_times_out_says_what_is_in_flight_and_pulling_again_completes_it(site: Site) -> None:
    site.start("capture", "agent")  # no applier yet: nothing can complete
    declare_source(site)
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        pass

    source = Recording().source
    assert len(source) == 3 and "recording_id" in repr(source) and "mouse-1" in repr(source)  # browsed as in DataJoint
    wanted = source & "recording_id < 3"
    summary = wanted.pull(timeout=3)
    assert summary.pulled == 0 and summary.in_flight == ['{"recording_id":1}', '{"recording_id":2}'], summary
    assert "2 still in flight (they complete in the background; pull again to wait)" in str(summary)

    site.start("applier")
    again = wanted.pull(timeout=60)
    assert again.pulled + again.skipped == 2 and not again.in_flight, again
    # Each entity once, as at the source.
    assert (
        rows(site, "DEST", site.dest_schema, "recording", "recording_id")
        == rows(site, "SOURCE", site.source_schema, "recording", "recording_id")[:2]
    )
    parts = rows(site, "DEST", site.dest_schema, "recording__channel", "recording_id, channel")
    assert parts == rows(site, "SOURCE", site.source_schema, "recording__channel", "recording_id, channel")[:6]


def test_an_entity_the_destination_refuses_fails_alone_and_the_others_of_its_chunk_arrive(site: Site) -> None:
    """One row of a pull that the destination cannot store (its column is narrower there) fails that entity,
    with the destination's reason, and not the chunk: the others arrive, and it stays Activated."""
    Source, Recording = linked_recording(site, n=3)
    Source.insert1({"recording_id": 7, "subject": "a subject far too long for it", "trace": b"x"})
    dest = admin(site.env, "DEST")
    with dest.cursor() as cur:
        cur.execute(f"ALTER TABLE `{site.dest_schema}`.`recording` MODIFY subject varchar(12) NOT NULL")
    summary = (Recording().source & [{"recording_id": i} for i in (1, 2, 7)]).pull(timeout=60)
    assert summary.pulled == 2, summary
    [failure] = summary.failed
    assert failure.startswith('{"recording_id":7}: the destination refused it: (1406) Data too long'), failure
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording", "recording_id")] == [1, 2]
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording__channel", "recording_id")] == [1] * 3 + [
        2
    ] * 3
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id") == [
        (1, "NONE", "FALSE", "FALSE"),
        (2, "NONE", "FALSE", "FALSE"),
        (7, "PULL", "FALSE", "FALSE"),
    ]
    # Once the destination takes it, pulling again completes it.
    with dest.cursor() as cur:
        cur.execute(f"ALTER TABLE `{site.dest_schema}`.`recording` MODIFY subject varchar(32) NOT NULL")
    dest.close()
    again = (Recording().source & {"recording_id": 7}).pull(timeout=60)
    assert (again.pulled, again.failed) == (1, []), again


def test_a_pull_far_larger_than_the_applier_may_hold_arrives_whole(site: Site) -> None:
    """With DJLINK_APPLIER_HELD_MB=1, an applier started once a pull of 3,000 entities is all in Kafka: while the
    first unit (the helper rows the agent wrote, one source transaction of 3,000 events) is not all read, it reads
    only what that unit still needs, not the snapshot chunks behind it; and it never waits for itself."""
    from tests.integration.test_metrics import free_port, samples  # it imports this module

    site.start("capture", "agent")
    n = 3000
    schema = dj.Schema(site.source_schema, connection=site.source_dj())

    @schema
    class Sample(dj.Manual):
        definition = """
        sample_id : int
        ---
        value : double
        """

    Sample.insert({"sample_id": i, "value": i / 7} for i in range(1, n + 1))
    site.connect_facade()

    linked = link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)

    class Sample:  # type: ignore[no-redef]  # the linked copy, named as the source table
        pass

    Copy: Any = linked(Sample)
    done: dict[str, Any] = {}
    puller = threading.Thread(target=lambda: done.update(summary=Copy().source.pull(timeout=300)))
    puller.start()
    data = Topics(site.topic_prefix).table(site.source_schema, "sample")
    wait_for(lambda: sum(e["op"] == "r" for e in read_topic(site, data)) == n, 120, "the pull's rows in Kafka")
    port = free_port()
    site.start("applier", DJLINK_APPLIER_HELD_MB="1", DJLINK_METRICS_PORT=str(port))
    puller.join(300)
    assert (done["summary"].pulled, done["summary"].refused) == (n, [])
    assert rows(site, "DEST", site.dest_schema, "sample", "sample_id") == rows(
        site, "SOURCE", site.source_schema, "sample", "sample_id"
    )
    assert samples(port).get(("djlink_applier_reading_narrowed_total", ()), 0) >= 1
