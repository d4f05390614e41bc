"""Links: which source table is shared to which destination, through which helper table.

The source agent is the only writer of the compacted `<prefix>.links` topic;
the capture and the applier follow it with a `LinkRegistry`, so a link
declared at run time reaches the running services without a restart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

import schemas
from foundation.config import Settings
from foundation.kafka import Malformed, consumer, now_ms, watermarks
from foundation.topics import Topics

# What a record that is not a link can fail with: bytes that are no Avro of ours, or another event's record.
MALFORMED = (schemas.DecodeError, KeyError, TypeError, ValueError)

EXTERNAL_PREFIX = "~external_"  # DataJoint 0.14's tracking table of store <store> is `~external_<store>`


def external_table(store: str) -> str:
    """The tracking table of an external store, in the schema whose rows reference it."""
    return f"{EXTERNAL_PREFIX}{store}"


def destination_name(source_table: str) -> str:
    """The destination table of a source table: DataJoint's tier prefix dropped (the copy is Manual)."""
    master, sep, part = source_table.lstrip("#_").partition("__")
    return f"{master}{sep}{part}"


@dataclass(frozen=True)
class LinkSpec:
    link_id: str
    source_db: str
    source_table: str
    helper_db: str
    helper_table: str
    destination_db: str
    part_tables: tuple[str, ...] = ()
    primary_key: tuple[str, ...] = ()
    auto_pull: str | None = None  # JSON {attribute: value} of new rows to pull unasked; 'false' or None: off
    # (table, column, store) of each in-store attribute (blob@, attach@, filepath@) of the master and its parts
    externals: tuple[tuple[str, str, str], ...] = ()
    stores: tuple[tuple[str, str], ...] = ()  # (source store, destination store); a store not named keeps its name

    @classmethod
    def new(cls, source_db: str, source_table: str, helper_db: str, helper_table: str, destination_db: str) -> LinkSpec:
        return cls(f"{helper_db}.{helper_table}", source_db, source_table, helper_db, helper_table, destination_db)

    def to_avro(self) -> dict[str, Any]:
        return {
            "link_id": self.link_id,
            "source_db": self.source_db,
            "source_table": self.source_table,
            "part_tables": list(self.part_tables),
            "primary_key": list(self.primary_key),
            "helper_db": self.helper_db,
            "helper_table": self.helper_table,
            "destination_db": self.destination_db,
            "auto_pull": self.auto_pull,
            "externals": [{"table": t, "column": c, "store": st} for t, c, st in self.externals],
            "stores": dict(self.stores),
        }

    @classmethod
    def from_avro(cls, r: dict[str, Any]) -> LinkSpec:
        return cls(
            r["link_id"],
            r["source_db"],
            r["source_table"],
            r["helper_db"],
            r["helper_table"],
            r["destination_db"],
            tuple(r["part_tables"]),
            tuple(r["primary_key"]),
            r.get("auto_pull"),
            tuple((e["table"], e["column"], e["store"]) for e in r.get("externals") or ()),
            tuple(sorted((r.get("stores") or {}).items())),
        )

    def auto_pull_match(self) -> dict[str, Any] | None:
        """The attribute values new master rows must have to be pulled unasked; None when the policy is off."""
        if self.auto_pull is None:
            return None
        policy = json.loads(self.auto_pull)
        return policy if isinstance(policy, dict) else None

    def data_tables(self) -> list[tuple[str, str]]:
        """(db, table) of the master and its parts, master first."""
        return [(self.source_db, self.source_table), *((self.source_db, p) for p in self.part_tables)]

    @property
    def helper_collection(self) -> str:
        """'db.table' of the helper table."""
        return f"{self.helper_db}.{self.helper_table}"

    def external_stores(self) -> list[str]:
        """The source stores the master and its parts reference."""
        return sorted({store for _, _, store in self.externals})

    def external_tables(self) -> list[tuple[str, str]]:
        """(db, table) of the `~external_<store>` tables the master and its parts reference."""
        return [(self.source_db, external_table(store)) for store in self.external_stores()]

    def destination_store(self, store: str) -> str:
        """The destination store of a source store: as the link's `stores` mapping says, else the same name."""
        return dict(self.stores).get(store, store)

    def captured_tables(self) -> list[tuple[str, str]]:
        """Everything the capture publishes for this link: data tables, their external tables, the helper table."""
        return [*self.data_tables(), *self.external_tables(), (self.helper_db, self.helper_table)]


def snapshot_signal(link: LinkSpec, keys: list[str], request_id: str, signal_id: str | None = None) -> dict[str, Any]:
    """A snapshot signal record (schemas.FIXED["signal"]): the capture reads these entities of `link` (none: just
    learn the link). Sent by the source agent for a request, and by `djlink resnapshot`; `signal_id` defaults to the
    request id (one signal per request)."""
    return {
        "signal_id": signal_id or request_id,
        "kind": "SNAPSHOT_KEYS",
        "request_id": request_id,
        "link": link.to_avro(),
        "keys": keys,
        "ts_ms": now_ms(),
    }


@dataclass
class LinkRegistry:
    """The current links, as the compacted links topic says."""

    settings: Settings
    topics: Topics
    links: dict[str, LinkSpec] = field(default_factory=dict)
    _consumer: Consumer | None = None
    _malformed: Malformed = field(init=False)

    def __post_init__(self) -> None:
        self._malformed = Malformed(self.topics.links)

    def _ensure(self) -> Consumer:
        if self._consumer is None:
            self._consumer = consumer(self.settings, self.topics.reader_group(self.topics.links))
            self._consumer.assign([TopicPartition(self.topics.links, 0, OFFSET_BEGINNING)])
        return self._consumer

    def refresh(self, timeout: float = 0.0) -> bool:
        """Read what is there now; True when a link was added or changed."""
        c = self._ensure()
        changed = False
        codec = schemas.Codec()
        for msg in c.consume(500, timeout):
            if msg.error() is not None or msg.value() is None:
                continue
            try:
                spec = LinkSpec.from_avro(codec.decode(msg.value()))
            except MALFORMED as exc:  # anyone who can write the topic could otherwise stop every role for good
                self._malformed.skip(msg, exc)
                continue
            if self.links.get(spec.link_id) != spec:
                self.links[spec.link_id] = spec
                changed = True
        return changed

    def catch_up(self, timeout_s: float = 10.0) -> bool:
        """Read up to the topic's current end (when an event names a table not yet known)."""
        c = self._ensure()
        tp = TopicPartition(self.topics.links, 0)
        low, high = watermarks(c, tp, timeout_s)
        changed = False
        if high <= low:
            return self.refresh(0)
        deadline = time.monotonic() + timeout_s
        # Check before waiting: already at the end (the common case) costs no poll timeout.
        while c.position([tp])[0].offset < high and time.monotonic() < deadline:
            changed |= self.refresh(0.2)
        return changed

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
