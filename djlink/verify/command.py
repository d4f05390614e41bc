"""What `djlink verify [LINK]` runs: the links named (from the links topic), each verified in fresh snapshots.

Needs what both sites have: Kafka (for the links), the source server
(`DJLINK_SOURCE_*`: SELECT on the source schema and the helper schema, as the
link user has) and the destination server (`DJLINK_DEST_*`: SELECT on the
destination schema), and, to read objects' bytes, `DJLINK_DEST_STORES`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from djlink.verify.compare import LinkResult, Options, Verification
from djlink.verify.servers import DestinationSql, Snapshot, SourceSql, layout
from foundation.catalog import Catalog
from foundation.config import Settings
from foundation.kafka import admin_client
from foundation.links import LinkRegistry, LinkSpec
from foundation.stores import Stores
from foundation.topics import Topics


class UnknownLink(Exception):
    """`djlink verify` was asked for a link that the links topic does not hold."""


def links(settings: Settings, names: Sequence[str] = ()) -> list[LinkSpec]:
    """The links of the prefix (every one, or those `names` names: link ids `helper_db.helper_table`)."""
    topics = Topics(settings.topic_prefix)
    found: dict[str, LinkSpec] = {}
    if topics.links in admin_client(settings).list_topics(timeout=10).topics:  # not there before a link was made
        registry = LinkRegistry(settings, topics)
        try:
            registry.catch_up()
            found = dict(registry.links)
        finally:
            registry.close()
    unknown = [n for n in names if n not in found]
    if unknown:
        known = ", ".join(sorted(found)) or "none"
        raise UnknownLink(
            f"no link {', '.join(unknown)} on prefix {topics.prefix} (DJLINK_TOPIC_PREFIX); its links: {known}"
        )
    return [found[n] for n in (names or sorted(found))]


def verify_link(
    settings: Settings,
    link: LinkSpec,
    options: Options = Options(),  # noqa: B008 (frozen)
    object_contents: bool = True,
    progress: bool = False,
) -> LinkResult:
    """Verify one link in a snapshot of each server: the source's first, then the destination's."""
    source_catalog = Catalog(lambda: settings.source.connect())
    destination_catalog = Catalog(lambda: settings.destination.connect())
    try:
        places = layout(link, source_catalog, destination_catalog)
    finally:
        source_catalog.close()
        destination_catalog.close()
    stores = Stores(settings.destination_stores, "DJLINK_DEST_STORES") if object_contents else None
    source_snapshot = Snapshot(settings.source)
    try:
        destination_snapshot = Snapshot(settings.destination)
        try:
            source = SourceSql(source_snapshot, link, places)
            destination = DestinationSql(destination_snapshot, link, places, stores)
            with _bar(progress, link.link_id, source.counted()) as advance:
                result = Verification(places.shape, source, destination, options, advance).run()
        finally:
            destination_snapshot.close()
    finally:
        source_snapshot.close()
    result.schema.extend(places.schema)
    if stores is None and link.externals:
        result.notes.append("object contents not checked (--no-object-contents)")
    return result


class _bar:
    """A tqdm bar on stderr counting entities, or nothing; a context manager giving `advance(n)`."""

    def __init__(self, show: bool, what: str, total: int) -> None:
        self._bar = None
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=" entities", unit_scale=True, file=sys.stderr, leave=False)

    def __enter__(self) -> Callable[[int], None]:
        bar = self._bar
        return (lambda n: bar.update(n)) if bar is not None else (lambda n: None)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
