"""Registry mode: with a Confluent-compatible schema registry configured, change events are in the Confluent
wire format, their schemas registered under `<topic>-key` / `<topic>-value`, so a stock Confluent
deserializer reads them; the pipeline works end to end on them."""

from __future__ import annotations

import os

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from devtools import services
from foundation.config import Settings
from foundation.kafka import read_to_end
from foundation.topics import Topics
from link import link
from tests.conftest import Site
from tests.integration.test_pull import declare_source, rows


@pytest.fixture(scope="session")
def registry_url() -> str:
    """The local Apicurio Registry's Confluent-compatible API (built from Maven Central on first use)."""
    if os.environ.get("DJLINK_TEST_EXTERNAL") == "1":
        return os.environ["DJLINK_SCHEMA_REGISTRY_URL"]
    return services.registry_up(quiet=True)


def test_change_events_in_the_confluent_wire_format_decode_with_a_stock_deserializer_and_apply(
    site: Site, registry_url: str
) -> None:
    registry = {"DJLINK_SCHEMA_REGISTRY_URL": registry_url}
    site.start("capture", "agent", **registry)
    site.start("applier", **registry)
    Source = declare_source(site)
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        pass

    summary = (Recording().source & [{"recording_id": 1}, {"recording_id": 2}]).pull()
    assert summary.pulled == 2, summary
    assert (
        rows(site, "DEST", site.dest_schema, "recording", "recording_id")
        == rows(site, "SOURCE", site.source_schema, "recording", "recording_id")[:2]
    )
    Source.insert1({"recording_id": 9, "subject": "live", "trace": b"\x01\x02"})

    topic = Topics(site.topic_prefix).table(site.source_schema, "recording")
    client = SchemaRegistryClient({"url": registry_url})
    values, keys = AvroDeserializer(client), AvroDeserializer(client)
    read = read_to_end(Settings.from_env(site.env), topic)
    messages = [(m.key() or b"", m.value() or b"") for m in read if m.value() is not None]  # not tombstones
    assert messages and all(v[:1] == b"\x00" and k[:1] == b"\x00" for k, v in messages)  # magic byte 0
    decoded = [values(v, SerializationContext(topic, MessageField.VALUE)) for _, v in messages]
    assert {(e["op"], e["after"]["recording_id"]) for e in decoded} == {("r", 1), ("r", 2), ("c", 9)}
    assert keys(messages[-1][0], SerializationContext(topic, MessageField.KEY)) == {"recording_id": 9}
    # Registered under Confluent's topic-name strategy, with the id the messages carry.
    latest = client.get_latest_version(f"{topic}-value")
    assert int.from_bytes(messages[-1][1][1:5], "big") == latest.schema_id
    assert f"{topic}-key" in client.get_subjects()
