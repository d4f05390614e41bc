"""The ACLs per site principal (foundation.acls): what each site may write, read, join and use as a transaction."""

from __future__ import annotations

from foundation.acls import Acl, Site, site_acls
from foundation.topics import Topics

TOPICS = Topics("lab")


def may(acls: list[Acl], operation: str, resource: str, name: str) -> bool:
    """Kafka's rule: some ALLOW matches (literal name, or prefix) and no DENY does."""

    def matches(a: Acl) -> bool:
        named = a.name == name if a.pattern == "LITERAL" else name.startswith(a.name)
        return a.resource == resource and a.operation == operation and named

    return any(a.allow and matches(a) for a in acls) and not any(not a.allow and matches(a) for a in acls)


SOURCE = site_acls(TOPICS, Site.source, "User:src")
DEST = site_acls(TOPICS, Site.destination, "User:dst")
SOURCE_WRITES = [TOPICS.table("lab_source", "recording"), TOPICS.transaction, TOPICS.links, TOPICS.schemas,
                 TOPICS.capture_offsets, TOPICS.signals, TOPICS.replies, TOPICS.dead_letter]  # fmt: skip
DEST_WRITES = [TOPICS.commands, TOPICS.acks, TOPICS.flags, TOPICS.dead_letter]


def test_each_site_writes_only_its_own_topics() -> None:
    for topic in SOURCE_WRITES:
        assert may(SOURCE, "WRITE", "TOPIC", topic), topic
    for topic in DEST_WRITES:
        assert may(DEST, "WRITE", "TOPIC", topic), topic
    for topic in set(SOURCE_WRITES) - set(DEST_WRITES):
        assert not may(DEST, "WRITE", "TOPIC", topic), topic
    for topic in set(DEST_WRITES) - set(SOURCE_WRITES):
        assert not may(SOURCE, "WRITE", "TOPIC", topic), topic


def test_both_read_the_whole_deployment_and_nothing_of_another() -> None:
    for acls in (SOURCE, DEST):
        for topic in [*SOURCE_WRITES, *DEST_WRITES]:
            assert may(acls, "READ", "TOPIC", topic) and may(acls, "DESCRIBE", "TOPIC", topic)
        assert not may(acls, "READ", "TOPIC", "other.links")
        assert not may(acls, "READ", "TOPIC", "lab2.links")  # a prefix is the deployment's, dot included


def test_groups_and_transactions_belong_to_the_roles_of_each_site() -> None:
    assert may(SOURCE, "WRITE", "TRANSACTIONAL_ID", TOPICS.capture_group)
    assert may(SOURCE, "WRITE", "TRANSACTIONAL_ID", TOPICS.agent_group)
    assert not any(a.resource == "TRANSACTIONAL_ID" for a in DEST)
    assert may(DEST, "READ", "GROUP", TOPICS.applier_group)
    assert may(DEST, "READ", "GROUP", TOPICS.facade_group("r1"))
    assert not may(DEST, "READ", "GROUP", TOPICS.capture_group)  # cannot move the capture's offsets
    assert not may(SOURCE, "READ", "GROUP", TOPICS.applier_group)
    for acls in (SOURCE, DEST):
        assert may(acls, "READ", "GROUP", TOPICS.reader_group(TOPICS.links))


def test_the_destination_creates_control_topics_only() -> None:
    assert all(may(DEST, "CREATE", "TOPIC", t) for t in TOPICS.control())
    assert not may(DEST, "CREATE", "TOPIC", TOPICS.table("lab_source", "recording"))
    assert may(SOURCE, "CREATE", "TOPIC", TOPICS.table("lab_source", "recording"))


def test_every_entry_is_also_a_kafka_acls_command() -> None:
    line = SOURCE[0].command("broker:9093")
    assert line.startswith("kafka-acls.sh --bootstrap-server broker:9093 --add --allow-principal 'User:src'")
    assert "--resource-pattern-type prefixed" in line and "--topic 'lab.'" in line
    deny = next(a for a in SOURCE if not a.allow)
    assert "--deny-principal" in deny.command()
