"""What `djlink verify` decides, without a database in sight: chunks, drill-down, and what each difference is.

A link's entities are compared in chunks of their primary key, ordered as the
servers' indexes are: consecutive ranges `(after, upto]`, each holding
`chunk_size` of the entities the source counts (its helper rows, in key
order), the first open below and the last open above, so that together they
cover every key either server could hold. For each chunk both servers compute
a checksum (count and digest, `Sums`) of the master table, of each part table
and of the tracking rows of the objects the chunk's rows reference; only the
numbers travel. Equal checksums end the chunk. A chunk that differs is cut
into `fanout` smaller ranges (at the keys of whichever side holds more of its
entities, so that the pieces shrink even when the two sides share no key), and
each piece checked again, until a piece holds at most `per_entity` entities;
then each server gives one checksum per entity, the entities that differ are
named, and for those alone, one digest per row and then per column says which
row is missing, extra or changed, and in which columns.

What an entity should be at the destination follows from its helper row
alone (`consumers.integrity.expected_at_destination`): Shared and Tainted
entities must be there and equal, entities without a helper row and
Deprecated ones must not, and those whose pull or delete is in flight may be
either; the source counts them (so a chunk holding one may differ), and
drill-down names none of them: they are reported apart, as in flight.

The two sides are `Side`s: the SQL behind them is in `djlink.verify.servers`,
and the unit tests give the same questions to rows kept in dictionaries.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from consumers.integrity import HelperRow, expected_at_destination

Key = tuple[Any, ...]  # the values of a key's columns, in the key's order


@dataclass(frozen=True)
class KeyRange:
    """The keys after `after` (exclusive) up to `upto` (inclusive); None: open on that side."""

    after: Key | None = None
    upto: Key | None = None


@dataclass(frozen=True)
class Sums:
    """The checksum of a set of rows: how many, and the XOR of their 64-bit digests."""

    count: int
    digest: int


NO_ROWS = Sums(0, 0)


@dataclass(frozen=True)
class TableSpec:
    """A table of a link, as both sides compare it."""

    name: str  # the source table's name, as the report names it
    row_key: tuple[str, ...]  # its primary key (a part's includes the master's)
    columns: tuple[str, ...]  # the columns compared, in the source's order
    is_master: bool = False


@dataclass(frozen=True)
class StoreSpec:
    """An external store a link's rows reference: its tracking table at the source and at the destination."""

    source: str
    destination: str


@dataclass(frozen=True)
class LinkShape:
    link_id: str
    entity_key: tuple[str, ...]
    master: TableSpec
    parts: tuple[TableSpec, ...] = ()
    stores: tuple[StoreSpec, ...] = ()

    @property
    def tables(self) -> tuple[TableSpec, ...]:
        return (self.master, *self.parts)


class Side(Protocol):
    """What drill-down asks each server, about the rows of one link."""

    def sums(self, table: TableSpec, scope: KeyRange) -> Sums:
        """The checksum of the table's rows of the entities in `scope`."""
        ...

    def entity_sums(self, table: TableSpec, scope: KeyRange) -> dict[Key, Sums]:
        """Per entity in `scope` that has rows in the table, the checksum of those rows."""
        ...

    def row_digests(self, table: TableSpec, entities: Sequence[Key]) -> dict[Key, int]:
        """Per row of these entities in the table, by its row key, its digest."""
        ...

    def column_digests(self, table: TableSpec, rows: Sequence[Key]) -> dict[Key, tuple[int, ...]]:
        """Per row (by row key), the digest of each of `table.columns`."""
        ...

    def boundary(self, scope: KeyRange, step: int) -> Key | None:
        """The key of the `step`-th entity this side counts in `scope`, in key order; None when it has fewer."""
        ...

    def object_sums(self, store: StoreSpec, scope: KeyRange) -> Sums:
        """The checksum of the tracking rows of the objects that the rows of the entities in `scope` reference."""
        ...

    def object_digests(self, store: StoreSpec, scope: KeyRange) -> dict[bytes, int]:
        """Those tracking rows' digests, by the object's hash."""
        ...


class SourceSide(Side, Protocol):
    def helper_rows(self, scope: KeyRange) -> dict[Key, HelperRow]:
        """The helper rows in `scope`, by entity key."""
        ...

    def in_flight(self, limit: int) -> tuple[int, list[Key]]:
        """How many entities have a pull or delete in flight, and the first `limit` of their keys."""
        ...


class DestinationSide(Side, Protocol):
    def object_contents(self, store: StoreSpec, scope: KeyRange) -> list[ObjectFinding]:
        """The objects the rows in `scope` reference whose bytes in the destination store are missing or do not
        match their tracking row (none when the store cannot be read from here: see `notes`)."""
        ...

    def notes(self) -> list[str]:
        """What could not be checked, for the report."""
        ...


class Problem(StrEnum):
    MISSING = "missing"  # shared, not at the destination
    EXTRA = "extra"  # at the destination, not shared (never, or deprecated)
    DIFFERENT = "different"  # at both, not equal


@dataclass(frozen=True)
class RowDiff:
    """How one table's rows of one entity differ: rows missing at the destination, extra there, changed."""

    table: str
    missing: tuple[Key, ...] = ()
    extra: tuple[Key, ...] = ()
    changed: tuple[tuple[Key, tuple[str, ...]], ...] = ()  # row key, the columns that differ

    def __bool__(self) -> bool:
        return bool(self.missing or self.extra or self.changed)


@dataclass(frozen=True)
class EntityFinding:
    key: Key
    problem: Problem
    detail: str = ""  # why an extra one should not be there
    rows: tuple[RowDiff, ...] = ()


@dataclass(frozen=True)
class ObjectFinding:
    store: str  # the destination store
    hash: bytes  # the object's hash (its uuid in the rows)
    problem: str


@dataclass(frozen=True)
class Options:
    chunk_size: int = 1000  # entities per chunk
    per_entity: int = 100  # at most this many entities in a range that is compared entity by entity
    fanout: int = 10  # pieces a differing range is cut into
    max_depth: int = 6  # cuts before a range is compared entity by entity however large it is
    in_flight_listed: int = 20  # keys of in-flight entities kept for the report


@dataclass
class LinkResult:
    """What verifying one link found."""

    link_id: str
    entity_key: tuple[str, ...]
    compared: int = 0  # entities the source counts (shared, tainted and in flight)
    chunks: int = 0
    in_flight: int = 0
    in_flight_keys: list[Key] = field(default_factory=list)
    entities: list[EntityFinding] = field(default_factory=list)
    objects: list[ObjectFinding] = field(default_factory=list)
    schema: list[str] = field(default_factory=list)  # tables whose columns differ between the sides
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.entities or self.objects or self.schema)


def pieces(scope: KeyRange, bounds: Sequence[Key]) -> list[KeyRange]:
    """`scope` cut at `bounds` (in order, inside it): `(after, b1], (b1, b2], ..., (bn, upto]`."""
    edges: list[Key | None] = [scope.after, *bounds, scope.upto]
    return [KeyRange(lo, hi) for lo, hi in itertools.pairwise(edges)]


def diff_rows(table: str, source: Mapping[Key, int], destination: Mapping[Key, int]) -> RowDiff:
    """Rows of one table (row key -> digest) at the source and at the destination: what differs, columns left
    for `with_columns` to name."""
    return RowDiff(
        table,
        missing=tuple(sorted(k for k in source if k not in destination)),
        extra=tuple(sorted(k for k in destination if k not in source)),
        changed=tuple(sorted((k, ()) for k in source if k in destination and source[k] != destination[k])),
    )


def differing_columns(names: Sequence[str], source: Sequence[int], destination: Sequence[int]) -> tuple[str, ...]:
    return tuple(n for n, s, d in zip(names, source, destination, strict=True) if s != d)


def classify(
    helpers: Mapping[Key, HelperRow], master: str, sums: Mapping[str, tuple[Mapping[Key, Sums], Mapping[Key, Sums]]]
) -> list[tuple[EntityFinding, list[str]]]:
    """The entities of a range that are not as their helper rows say, each with the tables whose rows of it
    differ; entities in flight are left out.

    `sums`: per table (the `master` always, the parts whose range differed), per entity, the checksum of its
    rows there at the source (of the entities the source counts) and at the destination (of every entity).
    """
    found: list[tuple[EntityFinding, list[str]]] = []
    keys = sorted({k for s, d in sums.values() for k in (*s, *d)})
    for key in keys:
        helper = helpers.get(key)
        expected = expected_at_destination(helper)
        if expected is None:
            continue  # in flight: reported apart
        present = key in sums[master][1]
        if not expected:
            if present:
                why = "not shared (no helper row)" if helper is None else "deprecated at the source"
                found.append((EntityFinding(key, Problem.EXTRA, why), []))
        elif not present:
            found.append((EntityFinding(key, Problem.MISSING), []))
        else:
            tables = [name for name, (s, d) in sums.items() if s.get(key, NO_ROWS) != d.get(key, NO_ROWS)]
            if tables:
                found.append((EntityFinding(key, Problem.DIFFERENT), tables))
    return found


def split_side(source_count: int, destination_count: int) -> str:
    """Which side's keys cut a range: the one holding more of its entities."""
    return "source" if source_count >= destination_count else "destination"


class Verification:
    """Verifying one link: its chunks, in key order, each drilled into when it differs."""

    def __init__(
        self,
        link: LinkShape,
        source: SourceSide,
        destination: DestinationSide,
        options: Options = Options(),
        advance: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.link = link
        self.source = source
        self.destination = destination
        self.options = options
        self.advance = advance
        self.result = LinkResult(link.link_id, link.entity_key)

    def run(self) -> LinkResult:
        result = self.result
        result.in_flight, result.in_flight_keys = self.source.in_flight(self.options.in_flight_listed)
        after: Key | None = None
        while True:
            upto = self.source.boundary(KeyRange(after, None), self.options.chunk_size)
            scope = KeyRange(after, upto)
            result.chunks += 1
            counted = self._check(scope, depth=0)
            result.compared += counted
            self.advance(counted)
            for store in self.link.stores:
                result.objects.extend(self.destination.object_contents(store, scope))
            if upto is None:
                break
            after = upto
        result.notes.extend(self.destination.notes())
        result.entities.sort(key=lambda f: f.key)
        return result

    def _check(self, scope: KeyRange, depth: int) -> int:
        """Compare `scope`, drilling into it when it differs; the number of entities the source counts there."""
        tables = {t.name: (self.source.sums(t, scope), self.destination.sums(t, scope)) for t in self.link.tables}
        stores = [
            s for s in self.link.stores if self.source.object_sums(s, scope) != self.destination.object_sums(s, scope)
        ]
        source_count, destination_count = (s.count for s in tables[self.link.master.name])
        differing = [t for t in self.link.tables if tables[t.name][0] != tables[t.name][1]]
        if not differing and not stores:
            return source_count
        largest = max(source_count, destination_count)
        if largest > self.options.per_entity and depth < self.options.max_depth:
            side = self.source if split_side(source_count, destination_count) == "source" else self.destination
            step = math.ceil(largest / self.options.fanout)
            bounds: list[Key] = []
            while len(bounds) < self.options.fanout:  # bounded: at most `fanout` cuts
                bound = side.boundary(KeyRange(bounds[-1] if bounds else scope.after, scope.upto), step)
                if bound is None or bound == scope.upto:
                    break
                bounds.append(bound)
            for piece in pieces(scope, bounds):
                self._check(piece, depth + 1)
            return source_count
        self._entities(scope, [t for t in differing if not t.is_master], stores)
        return source_count

    def _entities(self, scope: KeyRange, parts: list[TableSpec], stores: list[StoreSpec]) -> None:
        """Compare a small range entity by entity, then row by row for the entities that differ."""
        master = self.link.master
        helpers = self.source.helper_rows(scope)
        sums = {
            t.name: (self.source.entity_sums(t, scope), self.destination.entity_sums(t, scope))
            for t in [master, *parts]
        }
        by_name = {t.name: t for t in self.link.tables}
        for finding, names in classify(helpers, master.name, sums):
            rows = tuple(d for d in (self._rows(by_name[n], finding.key) for n in names) if d)
            self.result.entities.append(EntityFinding(finding.key, finding.problem, finding.detail, rows))
        for store in stores:
            self._objects(store, scope)

    def _rows(self, table: TableSpec, entity: Key) -> RowDiff:
        """Which of the entity's rows in `table` differ, and in which columns."""
        diff = diff_rows(
            table.name, self.source.row_digests(table, [entity]), self.destination.row_digests(table, [entity])
        )
        if not diff.changed:
            return diff
        keys = [k for k, _ in diff.changed]
        source, destination = self.source.column_digests(table, keys), self.destination.column_digests(table, keys)
        changed = tuple((k, differing_columns(table.columns, source[k], destination[k])) for k in keys)
        return RowDiff(diff.table, diff.missing, diff.extra, changed)

    def _objects(self, store: StoreSpec, scope: KeyRange) -> None:
        """Tracking rows of a small range's objects that are missing at the destination or differ there.

        One referenced only at the destination is not reported: only a row already reported (extra, or
        different in that column) can reference it."""
        source, destination = self.source.object_digests(store, scope), self.destination.object_digests(store, scope)
        for h in sorted(source):
            if h not in destination:
                self.result.objects.append(ObjectFinding(store.destination, h, "tracking row missing"))
            elif destination[h] != source[h]:
                self.result.objects.append(ObjectFinding(store.destination, h, "tracking row differs"))


def common_columns(
    table: str, source: Sequence[str], destination: Sequence[str] | None
) -> tuple[tuple[str, ...], str | None]:
    """The columns both sides compare (the source's, in its order, that the destination has too) and what is
    wrong with the destination table's columns (None: it has the source's; their order does not matter, as
    both sides write a row's columns in the source's order). `destination` None: the table is not made yet,
    and every shared entity of it is missing."""
    if destination is None:
        return tuple(source), None
    kept = tuple(c for c in source if c in destination)
    lacking = [c for c in source if c not in destination]
    more = [c for c in destination if c not in source]
    said = [
        f"lacks {', '.join(lacking)}" if lacking else "",
        f"has {', '.join(more)}, which the source has not" if more else "",
    ]
    problem = " and ".join(s for s in said if s)
    return kept, f"{table}: the destination table {problem}" if problem else None
