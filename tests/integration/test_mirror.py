"""Mirroring and flags over real services: source changes of shared entities reach the destination; flags too."""

from __future__ import annotations

import time
from typing import Any

import pymysql

from consumers.applier.state_store import StateStore
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.kafka import read_to_end
from foundation.topics import Topics
from link import link
from tests.conftest import Site, admin, wait_for
from tests.integration.test_pull import declare_source, linked_recording, read_topic, rows


def pulled_site(site: Site, state_db: str, ids: list[int]) -> Any:
    """The pipeline running, the Recording table linked, `ids` pulled (Shared)."""
    _, Recording = linked_recording(site, helper="Outbound", DJLINK_APPLIER_STATE_DB=state_db)
    summary = (Recording().source & [{"recording_id": i} for i in ids]).pull()
    assert summary.pulled == len(ids), summary
    return Recording


def source_sql(site: Site, *statements: str) -> None:
    """Run statements at the source as its administrator, in ONE transaction."""
    conn = admin(site.env, "SOURCE")
    try:
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
        conn.commit()
    finally:
        conn.close()


def view(site: Site, side: str, ids: tuple[int, ...]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Master and part rows of `ids`, as SQL returns them (bytes compared as bytes)."""
    schema = site.source_schema if side == "SOURCE" else site.dest_schema
    where = f"recording_id IN ({', '.join(map(str, ids))})"
    conn = admin(site.env, side)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT * FROM `{schema}`.`recording` WHERE {where} ORDER BY recording_id")
            master = list(cur.fetchall())
            cur.execute(f"SELECT * FROM `{schema}`.`recording__channel` WHERE {where} ORDER BY recording_id, channel")
            parts = list(cur.fetchall())
    except pymysql.err.ProgrammingError:  # the destination table does not exist yet
        return [], []
    finally:
        conn.close()
    return master, parts


def test_changes_of_shared_entities_are_mirrored_and_of_others_not(site: Site, state_db: str) -> None:
    pulled_site(site, state_db, [1, 2])
    s, h = site.source_schema, site.helper_schema
    source_sql(
        site,
        # Entity 3 is not shared: none of its changes may arrive, although they share a transaction with 1's.
        f"UPDATE `{s}`.recording SET subject='renamed' WHERE recording_id IN (1, 3)",
        f"UPDATE `{s}`.recording__channel SET gain=-1 WHERE recording_id IN (1, 3) AND channel=1",
    )
    source_sql(
        site,
        f"INSERT INTO `{s}`.recording__channel (recording_id, channel, gain) VALUES (1, 7, 7.5), (3, 7, 7.5)",
        f"DELETE FROM `{s}`.recording__channel WHERE recording_id IN (2, 3) AND channel=0",
    )
    # A flagged (Tainted) entity still follows its source rows.
    source_sql(site, f"UPDATE `{h}`.outbound SET is_flagged='TRUE' WHERE recording_id=2")
    source_sql(site, f"UPDATE `{s}`.recording SET subject='tainted but mirrored' WHERE recording_id=2")

    # Applied in source order: once the last change is there, every earlier one has been decided.
    wait_for(
        lambda: view(site, "DEST", (2,))[0][:1] and view(site, "DEST", (2,))[0][0][1] == "tainted but mirrored",
        60,
        "the last change to reach the destination",
    )
    assert view(site, "DEST", (1, 2)) == view(site, "SOURCE", (1, 2))
    assert view(site, "DEST", (3,)) == ([], [])
    dest_parts = view(site, "DEST", (1, 2))[1]
    assert (1, 7, 7.5, None) in dest_parts and all(p[:2] != (2, 0) for p in dest_parts)


def flag_states(site: Site, state_db: str, link_id: str) -> list[tuple[str, bool]]:
    conn = admin(site.env, "DEST")
    try:
        with conn.cursor() as cur:
            return StateStore(state_db, f"{site.topic_prefix}-applier").flagged(cur, link_id)
    finally:
        conn.close()


def flags_topic(site: Site) -> dict[str, dict[str, Any] | None]:
    """The flags topic compacted by hand: the last value per key (None: tombstone)."""
    settings = Settings.from_env(site.pipeline_env())
    topic = Topics(site.topic_prefix).flags
    last: dict[str, dict[str, Any] | None] = {}
    decoded = iter(read_topic(site, topic))
    for msg in read_to_end(settings, topic):
        last[bytes(msg.key() or b"").decode()] = next(decoded) if msg.value() is not None else None
    return last


def test_a_flag_reaches_the_destination_and_unflagging_is_a_transition(site: Site, state_db: str) -> None:
    pulled_site(site, state_db, [1, 2, 3])
    link_id = f"{site.helper_schema}.outbound"
    one, two = keycodec.encode({"recording_id": 1}), keycodec.encode({"recording_id": 2})
    assert flag_states(site, state_db, link_id) == []

    started = time.monotonic()
    source_sql(site, f"UPDATE `{site.helper_schema}`.outbound SET is_flagged='TRUE' WHERE recording_id IN (1, 2)")
    wait_for(lambda: len(flag_states(site, state_db, link_id)) == 2, 30, "both flags at the destination")
    print(f"\nflag visible at the destination after {1000 * (time.monotonic() - started):.0f} ms")
    assert flag_states(site, state_db, link_id) == [(one, False), (two, False)]
    wait_for(lambda: len(flags_topic(site)) == 2, 30, "both flags on the flags topic")
    record = flags_topic(site)[f"{link_id} {one}"]
    assert record is not None
    assert (record["is_flagged"], record["is_deprecated"], record["process"]) == (True, False, "NONE")

    # Unflagging: a tombstone on the topic, the entity no longer listed; the other flag stays.
    source_sql(site, f"UPDATE `{site.helper_schema}`.outbound SET is_flagged='FALSE' WHERE recording_id=1")
    wait_for(lambda: flag_states(site, state_db, link_id) == [(two, False)], 30, "entity 1 unflagged")
    wait_for(lambda: flags_topic(site).get(f"{link_id} {one}", 0) is None, 30, "a tombstone for entity 1")
    assert flags_topic(site)[f"{link_id} {two}"] is not None
    # Nothing else moved: both entities are still at the destination, as at the source.
    assert rows(site, "DEST", site.dest_schema, "recording", "recording_id") == rows(
        site, "SOURCE", site.source_schema, "recording", "recording_id"
    )


def test_an_auto_pull_policy_shares_new_matching_rows_without_a_pull(site: Site, state_db: str) -> None:
    source_site = site.start("capture", "agent")
    site.start("applier", DJLINK_APPLIER_STATE_DB=state_db)
    Source = declare_source(site)  # rows 1..3
    Source.insert1({"recording_id": 4, "subject": "auto", "trace": b"before the policy"})
    site.connect_facade()

    @link(
        site.source_host,
        site.source_schema,
        site.helper_schema,
        "outbound",
        site.dest_schema,
        auto_pull={"subject": "auto"},
    )
    class Recording:
        pass

    # Inserted right after the first @link of the table: the running capture already captures it.
    for i, subject in ((10, "auto"), (11, "by hand"), (12, "auto")):
        Source.insert1({"recording_id": i, "subject": subject, "trace": bytes([i]) * 100})
        Source.Channel.insert1({"recording_id": i, "channel": 0, "gain": i, "label": subject})

    def shared() -> list[tuple[Any, ...]]:
        return rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id")

    # Nobody pulls: the new rows with subject 'auto' arrive, with their parts, and end Shared.
    wait_for(lambda: [r[0] for r in shared() if r[1] == "NONE"] == [10, 12], 60, "rows 10 and 12 shared")
    assert view(site, "DEST", (10, 11, 12)) == view(site, "SOURCE", (10, 12))
    # Rows from before the policy, and new rows it does not match, stay at the source until pulled.
    assert [r[0] for r in shared()] == [10, 12]
    summary = (Recording().source & {"recording_id": 11}).pull()
    assert summary.pulled == 1

    # A matching row deleted before the agent got to it cannot be shared; it must not hold up the others.
    source_site.terminate()
    source_site.wait(20)
    for i in (20, 21):
        Source.insert1({"recording_id": i, "subject": "auto", "trace": bytes([i]) * 10})
    (Source & {"recording_id": 20}).delete_quick()
    source_site = site.start("capture", "agent")
    wait_for(lambda: [r[0] for r in shared() if r[1] == "NONE"] == [10, 11, 12, 21], 60, "row 21 shared")
    assert [r[0] for r in shared()] == [10, 11, 12, 21]
    assert source_site.poll() is None, "the source site stopped"
