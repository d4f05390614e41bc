"""Planning: what one unit does at the destination, as a pure function of what is known before it.

No I/O here: the loop (`consumers.applier.loop`) reads what a plan depends
on first (presence at the destination of flagged entities being pulled, the
unit's external objects copied and verified) and hands it in. A unit is
either

- a processing unit (a pull's or a delete's snapshot read, `link` given):
  each entity as its helper row, read in the same consistent read, says
  (`consumers.integrity.decide_process`), acknowledged to the source agent;
- or a source transaction (mirrored): its changes to rows of shared
  entities, as they happened, including changes of the helper tables (entity
  states and flags) and of `~external` tables (tracked objects).

Conversion of the data (row images, key columns) happens before planning,
in `prepare`: its errors are the data's and the loop dead-letters the unit;
an error inside planning is a bug, and stops the applier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from consumers.applier.gathering import Event, PendingUnit
from consumers.applier.objects import ObjectRef, Staged
from consumers.applier.routing import Routes
from consumers.applier.state_store import TrackedKey
from consumers.integrity import (
    ACKED_AS,
    EntityKey,
    EntityState,
    HelperRow,
    Outcome,
    decide_process,
    needs_presence,
)
from foundation import keys as keycodec
from foundation.gtid import Gtid, parse_gtid
from foundation.keys import KeyReason
from foundation.links import LinkSpec, destination_name, external_table
from schemas.tables import EnvelopeReader


class Target(NamedTuple):
    """A destination table."""

    db: str
    table: str


class WriteKind(Enum):
    UPSERT = "upsert"  # INSERT ... ON DUPLICATE KEY UPDATE of whole rows
    DELETE = "delete"  # DELETE by primary key (rows hold only the key)
    REKEY = "rekey"  # UPDATE of a row whose primary key changed (rows are {"key": old key, "row": new row})


@dataclass
class Write:
    """Rows of one kind, table and shape, written by one statement (or one per chunk of keys)."""

    kind: WriteKind
    target: Target
    rows: list[dict[str, Any]]

    def takes(self, kind: WriteKind, target: Target, row: dict[str, Any]) -> bool:
        return self.kind is kind and self.target == target and self.rows[0].keys() == row.keys()


@dataclass(frozen=True)
class Change:
    """One event of a unit, converted: its row images as PyMySQL parameters and its table's key columns."""

    event: Event
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    key_columns: tuple[str, ...]  # of a source transaction's changes (a processing unit needs none)

    @property
    def image(self) -> dict[str, Any]:
        image = self.after or self.before
        assert image is not None  # an envelope has at least one image
        return image


@dataclass(frozen=True)
class Prepared:
    """A unit ready to be planned: its changes in source order."""

    unit_id: str
    unit: PendingUnit
    link: LinkSpec | None  # a pull's or delete's link; None for a source transaction or an initial snapshot
    changes: tuple[Change, ...]

    @property
    def gtid(self) -> Gtid | None:
        return parse_gtid(self.unit_id)


def prepare(
    unit_id: str, unit: PendingUnit, link: LinkSpec | None, key_columns: Callable[[Event], Sequence[str]]
) -> Prepared:
    """Convert a unit's events (raises ValueError, TypeError, KeyError, ArithmeticError, DecodeError on bad data).

    Key columns are looked up for source transactions only: a processing unit writes whole rows by upsert and
    deletes entities by the link's primary key.
    """
    events = sorted(unit.events.values(), key=lambda e: e.envelope["transaction"]["total_order"])
    changes = tuple(
        Change(
            e,
            EnvelopeReader.image(e.envelope, e.convert, "before"),
            EnvelopeReader.image(e.envelope, e.convert, "after"),
            tuple(key_columns(e)) if link is None else (),
        )
        for e in events
    )
    return Prepared(unit_id, unit, link, changes)


@dataclass
class Plan:
    """What one unit does at the destination: decided before its transaction, from the entity states."""

    unit_id: str
    unit: PendingUnit
    link_id: str | None  # a pull's link; None for a source transaction (mirrored) or an initial snapshot
    gtid: Gtid | None  # of a source transaction; other units are claimed by id
    writes: list[Write] = field(default_factory=list)
    states: dict[EntityKey, EntityState] = field(default_factory=dict)  # as the unit leaves them
    flags: dict[EntityKey, int] = field(default_factory=dict)  # flag changed -> source commit ms
    tracked: dict[TrackedKey, dict[str, Any] | None] = field(default_factory=dict)  # `~external` rows captured
    ack: dict[str, Any] | None = None  # the ack record (without `ts_ms`) of a processing unit
    entities: list[EntityKey] = field(default_factory=list)  # a processing unit's entities

    def write(self, kind: WriteKind, target: Target, row: dict[str, Any]) -> None:
        """Add a row; consecutive rows of one kind, table and shape share one statement."""
        if self.writes and self.writes[-1].takes(kind, target, row):
            self.writes[-1].rows.append(row)
        else:
            self.writes.append(Write(kind, target, [row]))

    def empty(self) -> bool:
        return not self.writes and not self.states and self.ack is None and not self.tracked


def merged_writes(plans: Sequence[Plan]) -> list[Write]:
    """The writes of several plans in order, consecutive ones of one kind, table and shape merged."""
    merged: list[Write] = []
    for plan in plans:
        for write in plan.writes:
            if merged and merged[-1].takes(write.kind, write.target, write.rows[0]):
                merged[-1].rows.extend(write.rows)
            else:
                merged.append(Write(write.kind, write.target, list(write.rows)))
    return merged


@dataclass(frozen=True)
class Known:
    """Entity states before a unit: as committed, and as earlier units of the batch (not committed yet) left them."""

    entities: Mapping[EntityKey, EntityState]
    batch: Mapping[EntityKey, EntityState] = field(default_factory=dict)

    def state(self, key: EntityKey) -> EntityState:
        return self.batch.get(key) or self.entities.get(key) or EntityState()


def entities_touched(prepared: Prepared, routes: Routes) -> list[EntityKey]:
    """Every entity whose state planning the unit may ask for (`Known` must hold them all): the owners of its
    helper-table changes, and of a source transaction's data-table changes by either image (a primary-key change
    touches two), or of a processing unit's master rows read."""
    link = prepared.link
    master = f"{link.source_db}.{link.source_table}" if link is not None else None
    keys: list[EntityKey] = []
    for change in prepared.changes:
        collection = change.event.collection
        helper_of = routes.helper_of.get(collection)
        owner = helper_of or (link if collection == master else None if link else routes.data_of.get(collection))
        if owner is None:
            continue
        pk = list(owner.primary_key)
        keys.extend(EntityKey(owner.link_id, keycodec.encode(i, pk)) for i in (change.before, change.after) if i)
    return list(dict.fromkeys(keys))


class UnitPlanner:
    """Plans one prepared unit. Pure: every input is given, nothing is read or written.

    The loop asks, in turn: which entities' presence at the destination the
    plan depends on (`presence_needed`), which objects must be staged given
    that presence (`objects_needed`), then the plan itself (`plan`).
    """

    def __init__(
        self,
        prepared: Prepared,
        routes: Routes,
        known: Known,
        excluded: Mapping[EntityKey, str] | None = None,
    ) -> None:
        self._p = prepared
        self._routes = routes
        self._known = known
        self._excluded = dict(excluded or {})  # entities left out of a processing unit, and why
        self._local: dict[EntityKey, EntityState] = {}  # as this unit's helper-table changes leave them
        self._flags: dict[EntityKey, int] = {}
        self._helpers: dict[EntityKey, HelperRow | None] = {}  # a processing unit's helper rows, as read
        self._tracked: dict[TrackedKey, dict[str, Any] | None] = {}
        for change in prepared.changes:
            self._take_state_change(change)
        # Computed once, on first need: the planner is asked in turn, and each answer builds on the last.
        self._entity_list: list[EntityKey] | None = None
        self._outcomes_of: tuple[frozenset[str], dict[EntityKey, tuple[Outcome, str]]] | None = None
        self._applied: tuple[frozenset[EntityKey], list[tuple[Change, EntityKey]]] | None = None
        self._refs_of: dict[int, list[ObjectRef]] = {}  # id of a change -> its row's objects

    def _state(self, key: EntityKey) -> EntityState:
        return self._local.get(key) or self._known.state(key)

    def _take_state_change(self, change: Change) -> None:
        """A change of a helper table (entity state, flags) or of an `~external` table (a tracked object)."""
        collection = change.event.collection
        helper_of = self._routes.helper_of.get(collection)
        if helper_of is not None:
            key = EntityKey(helper_of.link_id, keycodec.encode(change.image, list(helper_of.primary_key)))
            old = self._state(key)
            helper = HelperRow.from_sql(change.after) if change.after is not None else None
            new = old.with_helper(helper)
            self._local[key] = new
            if old.flag() != new.flag():
                self._flags[key] = int(change.event.envelope["source"]["ts_ms"])
            if self._p.link is not None:
                self._helpers[key] = helper
        store = self._routes.store_of.get(collection)
        if store is not None:
            digest = bytes(change.image["hash"])
            self._tracked[TrackedKey(collection.split(".", 1)[0], store, digest)] = change.after

    @property
    def tracked(self) -> Mapping[TrackedKey, dict[str, Any] | None]:
        """The `~external` rows this unit captured (None: deleted at the source)."""
        return self._tracked

    # -- what the plan depends on ---------------------------------------------------------------------------

    def presence_needed(self) -> list[EntityKey]:
        """Entities whose master row's presence at the destination decides their outcome: flagged pulls."""
        if self._p.link is None:
            return []
        return [k for k in self._entities(self._p.link) if needs_presence(self._helpers.get(k))]

    def objects_needed(self, present: set[str]) -> dict[EntityKey, list[ObjectRef]]:
        """Per entity, the objects of the rows the plan would write, in order (`present`: key texts found here)."""
        refs: dict[EntityKey, list[ObjectRef]] = {}
        if self._p.link is not None:
            link = self._p.link
            outcomes = self._outcomes(link, present)
            for change, key in self._applied_rows(link, outcomes):
                if key not in self._excluded and (found := self._refs(link, change)):
                    refs.setdefault(key, []).extend(found)
        else:
            for change, link, key in self._mirrored():
                if change.after is not None and (found := self._refs(link, change)):
                    refs.setdefault(key, []).extend(found)
        return {k: r for k, r in refs.items() if r}

    def _refs(self, link: LinkSpec, change: Change) -> list[ObjectRef]:
        """The objects the change's new row references (computed once per change)."""
        found = self._refs_of.get(id(change))
        if found is None:
            found = self._refs_of[id(change)] = self._find_refs(link, change.event.collection, change.after)
        return found

    def _find_refs(self, link: LinkSpec, collection: str, row: dict[str, Any] | None) -> list[ObjectRef]:
        assert row is not None
        in_store = self._routes.in_store.get(collection)
        if not in_store:
            return []
        db = collection.split(".", 1)[0]
        return [
            ObjectRef(
                TrackedKey(db, store, bytes(row[column])),
                column,
                collection,
                link.destination_store(store),
                link.destination_db,
            )
            for column, store in in_store
            if row.get(column) is not None
        ]

    # -- the plan ---------------------------------------------------------------------------------------

    def plan(self, present: set[str], staged: Staged) -> Plan | None:
        """The unit's plan (None: nothing to do). A mirrored unit whose objects failed must not be planned."""
        p = self._p
        plan = Plan(p.unit_id, p.unit, p.link.link_id if p.link else None, p.gtid)
        if p.link is not None:
            self._plan_processing(plan, p.link, present, staged)
        else:
            assert not staged.failed, "a source transaction whose objects failed is given up, not planned"
            self._plan_mirroring(plan, staged)
        plan.states = self._local
        plan.flags = self._flags
        plan.tracked = self._tracked
        return None if plan.empty() else plan

    def _mirrored(self) -> list[tuple[Change, LinkSpec, EntityKey]]:
        """The unit's changes of data rows of entities that are mirrored (shared, tainted or received)."""
        found = []
        for change in self._p.changes:
            link = self._routes.data_of.get(change.event.collection)
            if link is None:
                continue
            key = EntityKey(link.link_id, keycodec.encode(change.image, list(link.primary_key)))
            if self._state(key).mirrored():
                found.append((change, link, key))
        return found

    def _plan_mirroring(self, plan: Plan, staged: Staged) -> None:
        """A source transaction: its changes to rows of shared entities, as they happened."""
        for change, link, _key in self._mirrored():
            target = Target(link.destination_db, destination_name(change.event.collection.split(".", 1)[1]))
            row_key = change.key_columns
            before, after = change.before, change.after
            if after is None:
                assert before is not None
                plan.write(WriteKind.DELETE, target, {c: before[c] for c in row_key})
                continue
            self._write_objects(plan, link, self._refs(link, change), staged)
            if before is not None and any(before[c] != after[c] for c in row_key):
                # The primary key changed: an UPDATE, so that the parts' foreign keys cascade as at the source.
                plan.write(WriteKind.REKEY, target, {"key": {c: before[c] for c in row_key}, "row": after})
            else:
                plan.write(WriteKind.UPSERT, target, after)

    @staticmethod
    def _write_objects(plan: Plan, link: LinkSpec, refs: list[ObjectRef], staged: Staged) -> None:
        """The tracking rows of a row's objects, in the destination schema's table of the mapped store."""
        for ref in refs:
            table = external_table(ref.destination_store)
            plan.write(WriteKind.UPSERT, Target(link.destination_db, table), dict(staged.rows[ref]))

    def _entities(self, link: LinkSpec) -> list[EntityKey]:
        """A processing unit's entities: those whose helper row it read, and those whose master row it read."""
        if self._entity_list is not None:
            return self._entity_list
        master = f"{link.source_db}.{link.source_table}"
        pk = list(link.primary_key)
        read = [
            EntityKey(link.link_id, keycodec.encode(c.after, pk))
            for c in self._p.changes
            if c.event.collection == master and c.after
        ]
        self._entity_list = list(dict.fromkeys([*self._helpers, *read]))
        return self._entity_list

    def _outcomes(self, link: LinkSpec, present: set[str]) -> dict[EntityKey, tuple[Outcome, str]]:
        """Each entity's outcome; `present` as queried, corrected by what earlier units of the batch did."""
        asked = frozenset(present)
        if self._outcomes_of is not None and self._outcomes_of[0] == asked:
            return dict(self._outcomes_of[1])
        present = set(present)
        for key in self.presence_needed():  # applied or removed earlier in this batch: the query cannot see it
            earlier = self._known.batch.get(key)
            if earlier is not None:
                (present.add if earlier.at_destination else present.discard)(key.key)
        outcomes = {k: decide_process(self._helpers.get(k), k.key in present) for k in self._entities(link)}
        self._outcomes_of = (asked, outcomes)
        return dict(outcomes)

    def _writes_rows(self, key: EntityKey, outcome: Outcome) -> bool:
        """Whether the entity's rows as read are written: applied, or kept and here (Tainted), which is mirrored
        like a Shared one, so a read of it (`djlink resnapshot`) brings it up to date too."""
        if outcome is Outcome.APPLY:
            return True
        return outcome is Outcome.KEEP and (needs_presence(self._helpers.get(key)) or self._state(key).at_destination)

    def _applied_rows(
        self, link: LinkSpec, outcomes: Mapping[EntityKey, tuple[Outcome, str]]
    ) -> list[tuple[Change, EntityKey]]:
        """The data rows (master and parts) of the entities to write, in order."""
        applying = frozenset(k for k, (o, _) in outcomes.items() if self._writes_rows(k, o))
        if self._applied is not None and self._applied[0] == applying:
            return self._applied[1]
        pk = list(link.primary_key)
        rows = []
        for change in self._p.changes:
            if self._routes.data_of.get(change.event.collection) is None or change.after is None:
                continue
            key = EntityKey(link.link_id, keycodec.encode(change.after, pk))
            if key in applying:
                rows.append((change, key))
        self._applied = (applying, rows)
        return rows

    def _plan_processing(self, plan: Plan, link: LinkSpec, present: set[str], staged: Staged) -> None:
        """A processing unit (a pull's or a delete's snapshot read): each entity as its helper row says."""
        outcomes = self._outcomes(link, present)
        plan.entities = list(outcomes)
        failed = {**self._excluded, **staged.failed}
        rows = self._applied_rows(link, outcomes)
        # An entity already here is replaced whole: its part rows go first, so that one the source deleted
        # while the destination did not hear of it (a binlog purged before it was read) does not stay.
        here = [
            k
            for k in dict.fromkeys(k for _c, k in rows)
            if k not in failed and (outcomes[k][0] is Outcome.KEEP or self._state(k).at_destination)
        ]
        for _db, table in link.data_tables()[:0:-1]:
            for key in here:
                plan.write(
                    WriteKind.DELETE, Target(link.destination_db, destination_name(table)), keycodec.decode(key.key)
                )
        written = 0
        for change, key in rows:
            if key in failed:
                continue
            written += 1
            self._write_objects(plan, link, self._refs(link, change), staged)
            target = Target(link.destination_db, destination_name(change.event.collection.split(".", 1)[1]))
            assert change.after is not None
            plan.write(WriteKind.UPSERT, target, change.after)
        removed = [keycodec.decode(k.key) for k, (o, _) in outcomes.items() if o is Outcome.REMOVE]
        for _db, table in reversed(link.data_tables()):  # parts first: they reference the master
            for key_row in removed:
                plan.write(WriteKind.DELETE, Target(link.destination_db, destination_name(table)), key_row)
        ack: dict[str, Any] = {"keys": [], "deleted": [], "deprecate": [], "skipped": [], "failed": [], "rows": written}
        for key, reason in failed.items():
            if key in outcomes:
                ack["failed"].append(KeyReason(key.key, reason).to_avro())
                del outcomes[key]
        for key, (outcome, reason) in outcomes.items():
            if outcome.at_destination_after is not None:
                self._local[key] = self._state(key).after(outcome)
            if outcome is Outcome.SKIP:
                ack["skipped"].append(KeyReason(key.key, reason).to_avro())
            else:
                ack[ACKED_AS[outcome].value].append(key.key)
        end = plan.unit.end
        assert end is not None
        ack.update(link_id=link.link_id, unit_id=plan.unit_id, request_id=end["request_id"])
        plan.ack = ack
