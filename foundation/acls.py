"""The Kafka ACLs each site's principal needs for one deployment (topic prefix), and nothing more.

Two sites share one cluster and trust each other only so far (docs/security.md):

- the **source** principal runs the capture and the source agent. It writes the change topics, the transaction
  topic, the capture's checkpoints, links, schemas, signals, replies and dead letters; it reads everything of
  the deployment. It may not write what only a destination says: commands, acknowledgements and flags
  (explicit DENY entries, which win over the prefixed ALLOW).
- the **destination** principal runs the applier and the façade. It reads everything of the deployment and writes
  only commands, acknowledgements, flags and dead letters: no change event, transaction, link, schema or
  checkpoint of the source can be forged with its credentials.

Groups and transactional ids follow `foundation.topics.Topics`: the source's roles use `<prefix>-capture`,
`<prefix>-agent` and `<prefix>-agent-auto`; the destination's `<prefix>-applier` and `<prefix>-facade-<request>`;
both use the committing-nothing readers `<prefix>.<topic>-reader`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from foundation.topics import Topics

__all__ = ["Acl", "Site", "apply", "commands", "site_acls"]


class Site(enum.StrEnum):
    source = "source"
    destination = "destination"


@dataclass(frozen=True)
class Acl:
    """One ACL entry, in Kafka's terms (resource type, pattern, operation, ALLOW or DENY)."""

    principal: str  # e.g. User:djlink-source
    resource: str  # TOPIC, GROUP, TRANSACTIONAL_ID
    name: str
    pattern: str  # LITERAL or PREFIXED
    operation: str  # READ, WRITE, CREATE, DESCRIBE, DESCRIBE_CONFIGS, ALTER_CONFIGS
    allow: bool = True

    def command(self, bootstrap: str = "$BOOTSTRAP") -> str:
        """The same entry as a `kafka-acls.sh` command line, for a cluster managed by hand."""
        kind = "allow" if self.allow else "deny"
        target = {
            "TOPIC": f"--topic '{self.name}'",
            "GROUP": f"--group '{self.name}'",
            "TRANSACTIONAL_ID": f"--transactional-id '{self.name}'",
        }[self.resource]
        pattern = " --resource-pattern-type prefixed" if self.pattern == "PREFIXED" else ""
        operation = self.operation.title().replace("_", "")
        return (
            f"kafka-acls.sh --bootstrap-server {bootstrap} --add --{kind}-principal '{self.principal}' "
            f"--operation {operation} {target}{pattern}"
        )


def _topic(principal: str, name: str, pattern: str, *operations: str, allow: bool = True) -> list[Acl]:
    return [Acl(principal, "TOPIC", name, pattern, op, allow) for op in operations]


def site_acls(topics: Topics, site: Site, principal: str) -> list[Acl]:
    """Every ACL `principal` needs to run `site`'s roles of the deployment `topics` names."""
    everything = f"{topics.prefix}."  # every topic of the deployment, and its readers' groups
    acls = _topic(principal, everything, "PREFIXED", "READ", "DESCRIBE", "DESCRIBE_CONFIGS")
    acls += [
        Acl(principal, "GROUP", everything, "PREFIXED", "READ"),
    ]  # idempotent producers need no cluster-wide IDEMPOTENT_WRITE once they may write a topic (KIP-679)
    destination_writes = [topics.commands, topics.acks, topics.flags]
    if site is Site.source:
        acls += _topic(principal, everything, "PREFIXED", "WRITE", "CREATE", "ALTER_CONFIGS")
        for name in destination_writes:
            acls += _topic(principal, name, "LITERAL", "WRITE", allow=False)
        acls += [
            Acl(principal, "GROUP", name, "LITERAL", "READ")
            for name in (topics.capture_group, topics.agent_group, topics.auto_pull_group)
        ]
        acls += [
            Acl(principal, "TRANSACTIONAL_ID", name, "LITERAL", op)
            for name in (topics.capture_group, topics.agent_group)
            for op in ("WRITE", "DESCRIBE")
        ]
    else:
        for name in [*destination_writes, topics.dead_letter]:
            acls += _topic(principal, name, "LITERAL", "WRITE")
        # Either site may start first: the destination may create the control topics (with djlink's settings),
        # but no change topic.
        for name in topics.control():
            acls += _topic(principal, name, "LITERAL", "CREATE")
        acls += [
            Acl(principal, "GROUP", topics.applier_group, "LITERAL", "READ"),
            Acl(principal, "GROUP", f"{topics.prefix}-facade-", "PREFIXED", "READ"),
        ]
    return acls


def commands(acls: Iterable[Acl], bootstrap: str = "$BOOTSTRAP") -> list[str]:
    return [acl.command(bootstrap) for acl in acls]


def _binding(acl: Acl, kind: Any = None) -> Any:
    """The entry as confluent-kafka's AclBinding (or, as `kind`, AclBindingFilter: the same fields)."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    return (kind or AclBinding)(
        ResourceType[acl.resource],
        acl.name,
        ResourcePatternType[acl.pattern],
        acl.principal,
        "*",
        AclOperation[acl.operation],
        AclPermissionType.ALLOW if acl.allow else AclPermissionType.DENY,
    )


def apply(admin: Any, acls: Sequence[Acl], timeout_s: float = 30) -> None:
    """Create the entries (idempotent: Kafka keeps one of each) with an admin client allowed to alter ACLs."""
    for future in admin.create_acls([_binding(a) for a in acls], request_timeout=timeout_s).values():
        future.result(timeout=timeout_s)


def remove(admin: Any, acls: Sequence[Acl], timeout_s: float = 30) -> None:
    """Delete exactly these entries (a test's, or a deployment taken down)."""
    from confluent_kafka.admin import AclBindingFilter

    filters = [_binding(a, AclBindingFilter) for a in acls]
    for future in admin.delete_acls(filters, request_timeout=timeout_s).values():
        future.result(timeout=timeout_s)
