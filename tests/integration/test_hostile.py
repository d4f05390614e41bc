"""Hostile records on the control topics every role reads: skipped (or dead-lettered), and no role stops.

The links topic is compacted and read from its beginning by every role at every start; the signals topic is
read by the capture; the schemas topic (compacted too) by every reader of change events that meets a schema
it does not know yet. A record there that is not what the topic carries once stopped the capture, the agent
and the applier for good (each restart read it again). Now the roles go on, and a pull afterwards works.
"""

from __future__ import annotations

import os

import schemas
from foundation.config import Settings
from foundation.kafka import produce, producer, read_to_end
from foundation.topics import Topics
from tests.conftest import Site, wait_for
from tests.integration.test_pull import linked_recording


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
