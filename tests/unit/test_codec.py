"""Pure logic: schemas, codec, keys, names, entity decisions. No services."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import fastavro
import pytest

import schemas
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.links import LinkSpec, destination_name
from foundation.topics import Topics
from schemas.tables import (
    Column,
    EnvelopeReader,
    EnvelopeWriter,
    TableShape,
    envelope_schema,
    key_schema,
    row_from_avro,
    row_to_avro,
    select_expression,
    sql_converters,
    to_avro,
)

SHAPE = TableShape(
    "lab",
    "#session",
    (
        Column("id", "int", "int(10) unsigned", False),
        Column("big", "bigint", "bigint(20) unsigned", True),
        Column("price", "decimal", "decimal(65,30)", True, 65, 30),
        Column("name", "varchar", "varchar(32)", True),
        Column("blob", "longblob", "longblob", True),
        Column("day", "date", "date", True),
        Column("at", "datetime", "datetime(6)", True),
        Column("ts", "timestamp", "timestamp", True),
        Column("dur", "time", "time", True),
    ),
    ("id",),
)

ROW = {
    "id": 4294967295,
    "big": 18446744073709551615,
    "price": Decimal("12345678901234567890123456789012345.123456789012345678901234567890"),
    "name": "émoji 🐭",
    "blob": b"mYm\x00\x01\xff",
    "day": dt.date(2024, 2, 29),
    "at": dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
    "ts": dt.datetime(2024, 1, 1, 12, 0, 0),
    "dur": dt.timedelta(hours=-838, minutes=-59),
}


def envelope(row: dict[str, object]) -> dict[str, object]:
    source = {
        "version": "t",
        "connector": "mariadb",
        "name": "p",
        "ts_ms": 1,
        "snapshot": "false",
        "db": "lab",
        "table": "#session",
        "server_id": 1,
        "gtid": "0-1-5",
        "file": "bin.000001",
        "pos": 4,
        "row": 0,
    }
    return {"before": None, "after": row, "source": source, "op": "c", "ts_ms": 2, "transaction": None}


def test_a_row_round_trips_through_its_generated_schema() -> None:
    schema = envelope_schema(SHAPE, "p")
    writer, reader = schemas.Codec(), schemas.Codec(lambda fp: None)
    data = writer.encode(schema, envelope(row_to_avro(SHAPE, ROW)))
    reader.add(schema)
    decoded = reader.decode(data)
    assert decoded["source"]["gtid"] == "0-1-5"
    back = row_from_avro(SHAPE, decoded["after"])
    assert back == ROW


@pytest.mark.parametrize(
    ("op", "before", "after", "row", "orders"),
    [
        ("c", None, ROW, 0, (1, 1)),
        ("u", {**ROW, "name": None, "blob": None}, ROW, 63, (64, 3)),  # nullable columns as null and not
        ("d", ROW, None, 64, (2**40, 2**31)),  # varints of two and more bytes
        ("r", {"id": 0}, {"id": 4294967295, "big": 0}, 0, (1, 1)),
    ],
)
def test_an_envelope_written_from_parts_is_byte_for_byte_the_whole_records_encoding(
    op: str, before: dict[str, object] | None, after: dict[str, object] | None, row: int, orders: tuple[int, int]
) -> None:
    schema = envelope_schema(SHAPE, "p")
    codec = schemas.Codec()
    whole = envelope(row_to_avro(SHAPE, after or {}))
    source = {**whole["source"], "gtid": None if op == "r" else "0-1-5", "table": "séance", "row": row}  # type: ignore[dict-item]
    images = {side: None if r is None else row_to_avro(SHAPE, r) for side, r in (("before", before), ("after", after))}
    unit_id = "snapshot:9e9f98db-21bf-48fe-8c93-85149c813ac9" if op == "r" else "0-1-5"
    expected = codec.encode(
        schema,
        {
            **whole,
            **images,
            "source": source,
            "op": op,
            "ts_ms": -1 if op == "d" else 1796660720244,
            "transaction": {"id": unit_id, "total_order": orders[0], "data_collection_order": orders[1]},
        },
    )
    writer = EnvelopeWriter(schema)
    got = writer.value(
        codec.header(schema),
        writer.image(images["before"]),
        writer.image(images["after"]),
        EnvelopeWriter.source(source),
        row,
        op,
        -1 if op == "d" else 1796660720244,
        EnvelopeWriter.transaction(unit_id),
        *orders,
    )
    assert got == expected
    codec.add(schema)
    assert codec.decode(got)["source"]["row"] == row
    # And read back from parts: the same dicts as the whole record's decoding, also for an event whose source
    # block's head (all but `row`) is the one decoded last (kept) and for one whose head differs.
    reader = EnvelopeReader(codec)
    other = codec.encode(schema, {**whole, **images, "source": {**source, "pos": 2**33, "row": 1}, "transaction": None})
    for value in (got, got, other, got):
        assert reader.decode(value) == codec.decode_with_schema(value)


def test_an_envelope_read_from_parts_fails_as_the_whole_record_would() -> None:
    """Corrupt bytes are a DecodeError naming the schema; an envelope of another layout (a field more) is
    decoded whole, not misread."""
    schema = envelope_schema(SHAPE, "p")
    codec = schemas.Codec()
    codec.add(schema)
    value = codec.encode(schema, envelope(row_to_avro(SHAPE, ROW)))
    reader = EnvelopeReader(codec)
    # Cut short in the row, in the tail; a union branch that does not exist (2) where `before`'s null is.
    for corrupt in (value[:40], value[:-3], value[:10] + b"\x04" + value[11:]):
        with pytest.raises(schemas.DecodeError, match="corrupt Avro body"):
            reader.decode(corrupt)
    definition = json.loads(json.dumps(schema.definition))
    definition["fields"].insert(3, {"name": "extra", "type": "long"})
    wider = schemas.make_schema(schema.subject, definition)
    codec.add(wider)
    data = codec.encode(wider, {**envelope(row_to_avro(SHAPE, ROW)), "extra": 7})
    assert reader.decode(data) == (wider, codec.decode_with_schema(data)[1])
    assert reader.decode(data)[1]["extra"] == 7


def test_sql_converters_read_everything_from_the_schema_alone() -> None:
    schema = envelope_schema(SHAPE, "p")
    value_record = schema.definition["fields"][0]["type"][1]
    convert = sql_converters(value_record)
    codec = schemas.Codec()
    codec.add(schema)
    decoded = codec.decode(codec.encode(schema, envelope(row_to_avro(SHAPE, ROW))))
    assert EnvelopeReader.image(decoded, convert, "after") == ROW
    assert convert and set(convert) < set(decoded["after"]), "only fields that need a conversion have one"


def test_binlog_values_become_what_a_snapshot_read_gives() -> None:
    uuid_column = Column("u", "binary", "binary(16)", True)
    # The binlog drops BINARY(n)'s trailing zero bytes (and gives '' for all zeros); PyMySQL reads n bytes.
    assert to_avro(uuid_column, b"\x01\x02") == b"\x01\x02" + bytes(14)
    assert to_avro(uuid_column, "") == bytes(16)
    assert to_avro(uuid_column, b"\xff" * 16) == b"\xff" * 16
    assert to_avro(Column("v", "varbinary", "varbinary(8)", True), b"\x01\x00") == b"\x01\x00"
    assert to_avro(Column("b", "bit", "bit(10)", True), "1000000001") == b"\x02\x01"  # PyMySQL: big-endian bytes


def test_snapshot_reads_select_float_widened_to_double() -> None:
    # MariaDB prints FLOAT with 6 significant digits; a DOUBLE prints exactly.
    assert select_expression(Column("f", "float", "float", True)) == "CAST(`f` AS DOUBLE) AS `f`"
    assert select_expression(Column("d`x", "double", "double", True)) == "`d``x`"


def test_unknown_schema_is_asked_for_then_refused() -> None:
    schema = key_schema(SHAPE, "p")
    data = schemas.Codec().encode(schema, {"id": 1})
    asked: list[bytes] = []

    def resolve(fp: bytes) -> str | None:
        asked.append(fp)
        return None

    with pytest.raises(schemas.DecodeError, match="unknown schema"):
        schemas.Codec(resolve).decode(data)
    assert asked == [schema.fingerprint]
    with pytest.raises(schemas.DecodeError, match="single-object"):
        schemas.Codec().decode(b"garbage")


def test_schema_fingerprint_follows_the_table_shape() -> None:
    wider = TableShape(SHAPE.db, SHAPE.table, (*SHAPE.columns, Column("x", "int", "int(11)", True)), SHAPE.primary_key)
    assert envelope_schema(SHAPE, "p").fingerprint != envelope_schema(wider, "p").fingerprint
    assert envelope_schema(SHAPE, "p").fingerprint == envelope_schema(SHAPE, "p").fingerprint


def test_keys_are_canonical_across_value_types() -> None:
    import uuid

    u = uuid.UUID(int=7)
    assert keycodec.encode({"u": u, "d": dt.date(2024, 1, 2)}) == keycodec.encode({"d": "2024-01-02", "u": u.bytes})
    assert keycodec.decode(keycodec.encode({"u": u})) == {"u": u.bytes}
    assert keycodec.encode({"a": 1, "b": 2}, ["a"]) == '{"a":1}'


def test_topic_names_escape_what_kafka_forbids_one_to_one() -> None:
    t = Topics("djlink")
    assert t.table("lab", "#lookup") == "djlink.lab.-23lookup"
    assert t.table("lab", "~external_store") == "djlink.lab.-7eexternal_store"
    assert t.table("lab", "__computed__part") == "djlink.lab.__computed__part"


def test_destination_names_drop_the_tier_prefix() -> None:
    assert destination_name("__computed") == "computed"
    assert destination_name("__computed__part") == "computed__part"
    assert destination_name("#lookup") == "lookup"
    assert destination_name("manual__part") == "manual__part"


def test_link_spec_round_trips() -> None:
    spec = LinkSpec.new("src", "__rec", "helper", "outbound", "dst")
    assert spec.link_id == "helper.outbound"
    assert LinkSpec.from_avro(spec.to_avro()) == spec
    assert spec.captured_tables() == [("src", "__rec"), ("helper", "outbound")]


def test_allow_list_is_the_source_sites_patterns() -> None:
    settings = Settings.from_env({"DJLINK_ALLOWED_SCHEMAS": "lab_*, shared"})
    assert settings.schema_allowed("lab_ephys") and settings.schema_allowed("shared")
    assert not settings.schema_allowed("private") and not Settings.from_env({}).schema_allowed("lab")


def test_schemas_for_a_registry_define_each_named_type_once_and_drop_fastavro_keys() -> None:
    from schemas.registry import _plain
    from schemas.tables import Column, TableShape, envelope_schema

    shape = TableShape("db", "tab", (Column("id", "int", "int(11)", False, 10, 0),), ("id",))
    plain = _plain(envelope_schema(shape, "p").definition)
    text = json.dumps(plain)
    assert "__fastavro" not in text and text.count('"name": "p.db.tab.Value"') == 1
    fields = {f["name"]: f["type"] for f in plain["fields"]}
    assert fields["after"] == ["null", "p.db.tab.Value"]  # referenced by name after its definition in `before`
    fastavro.parse_schema(plain)  # and still a valid schema


def test_a_confluent_framed_value_without_a_registry_is_a_clear_decode_error() -> None:
    with pytest.raises(schemas.DecodeError, match="no registry configured"):
        schemas.Codec().decode(b"\x00\x00\x00\x00\x07\x02")


def test_every_djlink_kafka_variable_becomes_a_client_property_of_every_kafka_client() -> None:
    from foundation.config import Settings
    from foundation.kafka import client_config

    env = {
        "DJLINK_KAFKA_BOOTSTRAP": "k1:9093,k2:9093",
        "DJLINK_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "DJLINK_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "DJLINK_KAFKA_SASL_PASSWORD": "s3cret",
        "DJLINK_KAFKA_SSL_CA_LOCATION": "/etc/ca.pem",
        "DJLINK_KAFKA_SOME__ODD_NAME": "x",  # `__` stands for an underscore in the property's name
        "DJLINK_SCHEMA_REGISTRY_URL": "https://registry:8081",
        "DJLINK_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": "u:p",
        "DJLINK_SOURCE_PASSWORD": "db-s3cret",
    }
    settings = Settings.from_env(env)
    config = client_config(settings)
    assert config["bootstrap.servers"] == "k1:9093,k2:9093"
    assert {k: v for k, v in config.items() if k not in ("bootstrap.servers", "logger")} == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ca.pem",
        "some_odd.name": "x",
    }
    assert settings.schema_registry_properties == {"basic.auth.user.info": "u:p"}
    assert "s3cret" not in repr(settings) and "u:p" not in repr(settings)  # secrets stay out of any log line
    assert "db-s3cret" not in repr(settings)


def test_a_kafka_property_librdkafka_does_not_take_is_one_line_naming_the_setting() -> None:
    import pytest

    from foundation.config import ConfigError, Settings
    from foundation.kafka import producer

    with pytest.raises(ConfigError, match=r"DJLINK_KAFKA_\*.*no\.such\.property"):
        producer(Settings.from_env({"DJLINK_KAFKA_NO_SUCH_PROPERTY": "1"}))


def test_librdkafkas_own_log_lines_go_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from foundation.kafka import CLIENT_LOG

    with caplog.at_level(logging.DEBUG, logger="djlink.kafka"):
        CLIENT_LOG.log(logging.WARNING, "%s [%s] %s", "GETPID", "rdkafka#producer-1", "Failed to acquire PID")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "GETPID [rdkafka#producer-1] Failed to acquire PID")
    ]


def test_topics_take_the_clusters_replication_unless_told_and_odd_values_are_refused() -> None:
    from foundation.config import ConfigError, Settings

    assert Settings.from_env({}).topic_replication_factor == -1
    assert Settings.from_env({}).topic_min_insync_replicas is None
    told = Settings.from_env({"DJLINK_TOPIC_REPLICATION_FACTOR": "3", "DJLINK_TOPIC_MIN_INSYNC_REPLICAS": "2"})
    assert (told.topic_replication_factor, told.topic_min_insync_replicas) == (3, 2)
    for bad in ("0", "-2", "three"):
        with pytest.raises(ConfigError, match="DJLINK_TOPIC_REPLICATION_FACTOR"):
            Settings.from_env({"DJLINK_TOPIC_REPLICATION_FACTOR": bad})
