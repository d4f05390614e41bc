"""Hostile records at the trust boundary: skipped, refused or dead-lettered with the reason; no role stops.

The links topic is compacted and read from its beginning by every role at every start; the signals topic is
read by the capture; the schemas topic (compacted too) by every reader of change events that meets a schema
it does not know yet. A record there that is not what the topic carries once stopped the capture, the agent
and the applier for good (each restart read it again). Now the roles go on, and a pull afterwards works.

The commands and acknowledgements come from the other site: a request for a schema not allowed, for a table
that is not there, with a million keys or with keys that are not keys of the table (SQL in names and values
included) is refused whole with its reason; a forged acknowledgement is dead-lettered or changes nothing;
nothing at either site changes, and the row of the schema not allowed reaches no topic and no log.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any

import schemas
from foundation.config import Settings
from foundation.kafka import admin_client, produce, producer, read_to_end
from foundation.links import LinkSpec
from foundation.topics import Topics
from link.requests import Requests
from tests.conftest import Site, wait_for
from tests.integration.test_mirror import source_sql
from tests.integration.test_pull import linked_recording, rows


def test_garbage_on_the_links_signals_and_schemas_topics_stops_no_role_and_a_later_pull_arrives(site: Site) -> None:
    _, Recording = linked_recording(site, n=4)
    assert (Recording().source & "recording_id <= 2").pull().pulled == 2
    settings = Settings.from_env(site.pipeline_env())
    topics = Topics(site.topic_prefix)
    codec = schemas.Codec()
    a_reply = codec.encode(schemas.FIXED["reply"], {"request_id": "x", "status": "ACCEPTED", "ts_ms": 0})
    garbage = {
        "bytes": os.urandom(40),  # not Avro at all
        "not-ours": schemas.MAGIC + os.urandom(8) + b"\x02",  # an unknown fingerprint
        "another-record": a_reply,  # well-formed, but no link and no signal
    }
    p = producer(settings)
    for key, value in garbage.items():
        produce(p, topics.links, key, value)
        produce(p, topics.signals, key, value)
        produce(p, topics.schemas, key, value)  # read whenever a fingerprint is not known yet
    produce(p, topics.schemas, "half", b'{"fingerprint": "zz", "schema": 1}')
    p.flush(30)

    # The capture gives each malformed signal up on the dead-letter topic, with its offset and bytes.
    def dead_letters() -> list[dict[str, object]]:
        return [codec.decode(m.value()) for m in read_to_end(settings, topics.dead_letter) if m.value()]

    found = wait_for(lambda: len(dead_letters()) >= 3 and dead_letters(), 60, "the malformed signals dead-lettered")
    assert sorted(d["key"] for d in found) == sorted(k.encode() for k in garbage)
    assert {d["topic"] for d in found} == {topics.signals} and {d["stage"] for d in found} == {"decode"}
    assert all(d["value"] == garbage[str(d["key"], "ascii")] for d in found)

    # Every role still runs, and serves the next pull.
    assert (Recording().source & "recording_id = 3").pull().pulled == 1
    assert all(proc.poll() is None for proc in site.processes)

    # Restarted, each role reads the links topic from its beginning again, garbage included, and starts.
    site.stop()
    site.processes.clear()
    site.start("capture", "agent")
    site.start("applier")
    assert (Recording().source & "recording_id = 4").pull().pulled == 1
    assert len(dead_letters()) == 3  # the signals' offsets moved past them: not given up twice
    assert len(Recording()) == 4


def state_of_both_sites(site: Site) -> tuple[Any, ...]:
    """Every row that a hostile request could change: source, helper and destination tables."""
    return (
        rows(site, "SOURCE", site.source_schema, "recording", "recording_id"),
        rows(site, "SOURCE", site.source_schema, "recording__channel", "recording_id, channel"),
        rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id"),
        rows(site, "DEST", site.dest_schema, "recording", "recording_id"),
        rows(site, "DEST", site.dest_schema, "recording__channel", "recording_id, channel"),
    )


def test_hostile_commands_are_refused_forged_acks_and_flags_change_nothing_and_the_agent_goes_on(site: Site) -> None:
    _, Recording = linked_recording(site, n=3)
    assert (Recording().source & "recording_id = 1").pull().pulled == 1
    _, spec = Recording._djlink
    settings = Settings.from_env(site.pipeline_env())
    topics = Topics(site.topic_prefix)
    codec = schemas.Codec()
    asker = Requests(settings)
    before = state_of_both_sites(site)

    def refusal(kind: str, link: LinkSpec, keys: list[str]) -> str:
        for reply in asker.ask(kind, link, keys, 120):
            assert reply["status"] == "REFUSED", reply
            return str(reply["message"])
        raise AssertionError(f"no reply to {kind} {keys[:3]}")

    # A link to a schema the source site does not allow (with a row written while the capture runs), and to a
    # table that is not there.
    secret_db, marker = f"x{site.tag}_private", f"PRIVATE-{uuid.uuid4().hex}"
    source_sql(site, f"CREATE DATABASE `{secret_db}`")
    try:
        source_sql(site, f"CREATE TABLE `{secret_db}`.patient (id INT PRIMARY KEY, name VARCHAR(64))")
        source_sql(site, f"INSERT INTO `{secret_db}`.patient VALUES (1, '{marker}')")
        not_allowed = dataclasses.replace(spec, link_id=f"{secret_db}.forged", source_db=secret_db)
        not_allowed = dataclasses.replace(not_allowed, source_table="patient", helper_db=secret_db)
        assert "DJLINK_ALLOWED_SCHEMAS" in refusal("PULL", not_allowed, ['{"id":1}'])
        source_sql(site, f"UPDATE `{secret_db}`.patient SET name = CONCAT(name, '!')")
    finally:
        source_sql(site, f"DROP DATABASE `{secret_db}`")
    missing = dataclasses.replace(spec, link_id=f"{site.helper_schema}.forged", source_table="no_such_table")
    missing = dataclasses.replace(missing, helper_table="forged")
    assert "no_such_table" in refusal("PULL", missing, ['{"recording_id":1}'])

    # A million keys: refused whole, before anything is read.
    million = [f'{{"recording_id":{i}}}' for i in range(1_000_000)]
    assert "names 1,000,000 entities, more than the 100,000" in refusal("PULL", spec, million)

    # Keys that are not keys of the table, SQL in names and values included.
    for keys, why in (
        (["not json"], "is not JSON"),
        (["[1]"], "is not a JSON object"),
        (['{"nope":1}'], "does not name the primary key (recording_id)"),
        (['{"recording_id":2,"subject":"x"}'], "does not name the primary key"),
        (['{"recording_id`) OR 1=1; DROP TABLE recording; --":2}'], "does not name the primary key"),
        (['{"recording_id":"2 OR 1=1"}'], "wrong kind (recording_id is int)"),
        (['{"recording_id":{"$b64":"AA=="}}'], "wrong kind"),
        (['{"recording_id":null}'], "wrong kind"),
        (['{"recording_id":2}', '{"recording_id":true}'], "wrong kind"),  # one bad key refuses the request
    ):
        for kind in ("PULL", "DELETE"):
            message = refusal(kind, spec, keys)
            assert why in message and "nothing was done" in message, (keys, message)

    # Forged acknowledgements: for entities never pulled, for a link not registered, with keys that are not keys.
    def ack(link_id: str, keys: list[str]) -> bytes:
        record = {"link_id": link_id, "unit_id": "forged", "request_id": None, "keys": keys, "rows": 0, "ts_ms": 0}
        return codec.encode(schemas.FIXED["ack"], record)

    flag = {
        "link_id": spec.link_id,
        "key": '{"recording_id":3}',
        "is_flagged": True,
        "is_deprecated": True,
        "process": None,
        "source_ts_ms": 0,
        "ts_ms": 0,
    }
    p = producer(settings)
    produce(p, topics.acks, "never-pulled", ack(spec.link_id, ['{"recording_id":2}', '{"recording_id":3}']))
    produce(p, topics.acks, "no-link", ack("nowhere.forged", ['{"recording_id":2}']))
    produce(p, topics.acks, "bad-keys", ack(spec.link_id, ["'; DELETE FROM outbound; --"]))
    produce(p, topics.commands, "bytes", os.urandom(64))
    produce(p, topics.flags, "never-pulled", codec.encode(schemas.FIXED["flag"], flag))
    p.flush(30)

    def dead_letters() -> list[dict[str, Any]]:
        return [codec.decode(m.value()) for m in read_to_end(settings, topics.dead_letter) if m.value()]

    found = wait_for(lambda: len(dead_letters()) >= 3 and dead_letters(), 60, "the forged records dead-lettered")
    reasons = {d["key"]: d["reason"] for d in found}
    assert set(reasons) == {b"no-link", b"bad-keys", b"bytes"}, reasons
    assert "not registered" in reasons[b"no-link"] and "is not JSON" in reasons[b"bad-keys"]

    # A request after all of them is served: every record before it was handled, and nothing changed.
    assert (Recording().source & "recording_id = 2").pull().pulled == 1
    after = state_of_both_sites(site)
    assert after[2] == [*before[2][:1], (2, "NONE", "FALSE", "FALSE")]  # only entity 2's helper row is new
    assert after[0:2] == before[0:2]
    assert [r[0] for r in after[3]] == [1, 2]
    assert all(proc.poll() is None for proc in site.processes)

    # Restarted, the agent does not meet any of them again.
    site.stop()
    first = list(site.processes)
    site.processes.clear()
    site.start("capture", "agent")
    site.start("applier")
    assert (Recording().source & "recording_id = 3").pull().pulled == 1
    assert len(dead_letters()) == 3

    # The row of the schema not allowed reached no topic of the deployment, no dead letter and no log.
    names = [t for t in admin_client(settings).list_topics(timeout=30).topics if t.startswith(f"{topics.prefix}.")]
    assert topics.commands in names and not [t for t in names if secret_db in t]
    leaked = [t for t in names for m in read_to_end(settings, t) if marker.encode() in (m.value() or b"")]
    site.stop()
    logs = "".join(proc.stderr.read() for proc in [*first, *site.processes] if proc.stderr)
    assert leaked == []
    assert "applier follows" in logs and marker not in logs


def test_garbage_bytes_on_every_topic_read_across_sites_are_dead_lettered_once_and_a_pull_arrives(site: Site) -> None:
    _, Recording = linked_recording(site, n=3)
    assert (Recording().source & "recording_id = 1").pull().pulled == 1
    settings = Settings.from_env(site.pipeline_env())
    topics = Topics(site.topic_prefix)
    codec = schemas.Codec()
    # Read by the agent (commands, acks) and the applier (change and transaction topics). The façade reads the
    # replies, and a reply to no request of its own is not its business; the flags are for other services.
    read_by_a_role = [topics.commands, topics.acks, topics.transaction, topics.table(site.source_schema, "recording")]
    p = producer(settings)
    for topic in [*read_by_a_role, topics.replies, topics.flags]:
        produce(p, topic, f"garbage-{topic}", os.urandom(48))
    assert p.flush(30) == 0

    def dead_letters() -> list[dict[str, Any]]:
        return [codec.decode(m.value()) for m in read_to_end(settings, topics.dead_letter) if m.value()]

    expected = len(read_by_a_role)
    try:
        found = wait_for(lambda: len(dead_letters()) >= expected and dead_letters(), 90, "the garbage dead-lettered")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; dead letters of {sorted(d['topic'] for d in dead_letters())}") from None
    assert sorted(d["topic"] for d in found) == sorted(read_by_a_role)
    assert all(d["key"] == f"garbage-{d['topic']}".encode() and d["reason"] for d in found)
    assert (Recording().source & "recording_id = 2").pull().pulled == 1
    assert all(proc.poll() is None for proc in site.processes)

    site.stop()
    site.processes.clear()
    site.start("capture", "agent")
    site.start("applier")
    assert (Recording().source & "recording_id = 3").pull().pulled == 1
    assert len(dead_letters()) == expected  # every offset moved past its garbage: nothing is met twice
    assert len(Recording()) == 3 and len(Recording.Channel()) == 9
