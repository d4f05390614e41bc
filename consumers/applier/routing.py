"""Routing: one index of the links the applier follows, from Kafka topics to what their events mean.

Built afresh, as a value, whenever the links change. Every question "which
link does this table belong to, and as what" is answered here: a data table
(master or part) of a link, a link's helper table, or the `~external_<store>`
table of a source schema's store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from foundation.links import LinkSpec, external_table
from foundation.topics import Topics


@dataclass(frozen=True)
class Routes:
    links: Mapping[str, LinkSpec] = field(default_factory=dict)  # link id -> link
    by_topic: Mapping[str, str] = field(default_factory=dict)  # change topic -> 'db.table'
    data_of: Mapping[str, LinkSpec] = field(default_factory=dict)  # 'db.table' of a data table -> its link
    helper_of: Mapping[str, LinkSpec] = field(default_factory=dict)  # 'db.table' of a helper table -> its link
    store_of: Mapping[str, str] = field(default_factory=dict)  # 'db.~external_<store>' -> store
    in_store: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # 'db.table' -> (column, store)
    captured: frozenset[str] = frozenset()  # 'db.table' of every table the capture publishes for these links
    tracked: frozenset[str] = frozenset()  # 'db.table' of the tables whose events are read: data, helper, external

    @classmethod
    def of(cls, links: Mapping[str, LinkSpec], topics: Topics) -> Routes:
        by_topic: dict[str, str] = {}
        data_of: dict[str, LinkSpec] = {}
        helper_of: dict[str, LinkSpec] = {}
        store_of: dict[str, str] = {}
        in_store: dict[str, list[tuple[str, str]]] = {}
        for link in links.values():
            for db, table in link.data_tables():
                by_topic[topics.table(db, table)] = f"{db}.{table}"
                data_of[f"{db}.{table}"] = link
            by_topic[topics.table(link.helper_db, link.helper_table)] = link.helper_collection
            helper_of[link.helper_collection] = link
            for store in link.external_stores():
                collection = f"{link.source_db}.{external_table(store)}"
                by_topic[topics.table(link.source_db, external_table(store))] = collection
                store_of[collection] = store
            for table, column, store in link.externals:
                in_store.setdefault(f"{link.source_db}.{table}", []).append((column, store))
        return cls(
            links=dict(links),
            by_topic=by_topic,
            data_of=data_of,
            helper_of=helper_of,
            store_of=store_of,
            in_store={k: tuple(v) for k, v in in_store.items()},
            captured=frozenset(f"{db}.{table}" for link in links.values() for db, table in link.captured_tables()),
            tracked=frozenset(data_of) | frozenset(helper_of) | frozenset(store_of),
        )

    def topics(self, transaction_topic: str) -> list[str]:
        """Every topic to follow: the transaction topic, then the change topics."""
        return [transaction_topic, *sorted(self.by_topic)]

    def topics_of(self, collections: set[str]) -> set[str]:
        """The change topics of these collections."""
        return {topic for topic, collection in self.by_topic.items() if collection in collections}
