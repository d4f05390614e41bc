"""Planning (consumers.applier.planning) without services: each unit's plan from what is known before it."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest

from consumers.applier.batches import BatchPlanner, prepare_all
from consumers.applier.destination import Destination
from consumers.applier.entity_states import EntityStates
from consumers.applier.gathering import Event, Offset, PendingUnit
from consumers.applier.objects import ObjectRef, Objects, Staged
from consumers.applier.planning import (
    Known,
    Plan,
    Prepared,
    Target,
    UnitPlanner,
    WriteKind,
    entities_touched,
    merged_writes,
    prepare,
)
from consumers.applier.routing import Routes
from consumers.applier.state_store import StateStore, TrackedKey
from consumers.integrity import EntityKey, EntityState, HelperRow, Process
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.links import LinkSpec
from foundation.stores import Stores
from foundation.topics import Topics

LINK = dataclasses.replace(
    LinkSpec.new("src", "rec", "hlp", "out", "dst"),
    part_tables=("rec__chan",),
    primary_key=("id",),
    externals=(("rec", "blob", "raw"),),
)
ROUTES = Routes.of({LINK.link_id: LINK}, Topics("p"))
MASTER, PART, HELPER, EXTERNAL = "src.rec", "src.rec__chan", "hlp.out", "src.~external_raw"


def entity(i: int) -> EntityKey:
    return EntityKey(LINK.link_id, keycodec.encode({"id": i}))


def helper(process: Process, flagged: bool = False) -> dict[str, str]:
    return HelperRow(process, flagged).to_sql()


class Unit:
    """A unit built event by event, as the applier gathers it."""

    def __init__(self, unit_id: str = "0-1-5", link: LinkSpec | None = None) -> None:
        self.unit_id, self.link = unit_id, link
        self.pending = PendingUnit(end={"request_id": "req" if link else None, "link_id": link and link.link_id})
        self._order = 0

    def change(
        self, collection: str, before: dict[str, Any] | None, after: dict[str, Any] | None, ts_ms: int = 1000
    ) -> Unit:
        self._order += 1
        envelope = {
            "before": before,
            "after": after,
            "source": {"ts_ms": ts_ms},
            "transaction": {"id": self.unit_id, "total_order": self._order},
        }
        at = Offset(f"p.{collection}", 0, self._order)
        self.pending.add(at, Event(collection, envelope, {}, b"key", b"value", 0))
        return self

    def prepared(self) -> Prepared:
        key_columns = {MASTER: ["id"], PART: ["id", "ch"], HELPER: ["id"], EXTERNAL: ["hash"]}
        return prepare(self.unit_id, self.pending, self.link, lambda e: key_columns[e.collection])


class Touched(dict[EntityKey, EntityState]):
    """The committed states a batch planner gives a unit: those of `entities_touched` only. Planning asking for
    any other entity's state fails the test (the applier would have planned it as Unshared)."""

    def __init__(self, prepared: Prepared, entities: dict[EntityKey, EntityState]) -> None:
        self.touched = set(entities_touched(prepared, ROUTES))
        super().__init__({k: s for k, s in entities.items() if k in self.touched})

    def get(self, key: EntityKey, default: Any = None) -> Any:
        assert key in self.touched, f"planning asked for the state of {key}, which entities_touched does not name"
        return super().get(key, default)


def known(prepared: Prepared, entities: dict[EntityKey, EntityState] | None = None, **batch: Any) -> Known:
    return Known(Touched(prepared, entities or {}), batch.get("batch") or {})


def plan_of(
    unit: Unit,
    entities: dict[EntityKey, EntityState] | None = None,
    batch: dict[EntityKey, EntityState] | None = None,
    present: set[str] | None = None,
    staged: Staged | None = None,
    excluded: dict[EntityKey, str] | None = None,
) -> Plan | None:
    prepared = unit.prepared()
    planner = UnitPlanner(prepared, ROUTES, known(prepared, entities, batch=batch), excluded)
    return planner.plan(present or set(), staged or Staged())


NO_COLUMNS: dict[str, list[str]] = {}
SHARED = EntityState(HelperRow(Process.NONE), at_destination=True)


def test_a_source_transaction_changes_only_the_rows_of_mirrored_entities() -> None:
    unit = Unit()
    unit.change(MASTER, {"id": 1, "v": 0}, {"id": 1, "v": 1})  # shared: mirrored
    unit.change(MASTER, {"id": 2, "v": 0}, {"id": 2, "v": 1})  # never pulled: stays at the source
    unit.change(PART, None, {"id": 1, "ch": 3, "x": 9})
    unit.change(PART, {"id": 1, "ch": 1, "x": 0}, None)
    plan = plan_of(unit, entities={entity(1): SHARED})
    assert plan is not None and plan.link_id is None and plan.ack is None
    assert [(w.kind, w.target, w.rows) for w in plan.writes] == [
        (WriteKind.UPSERT, Target("dst", "rec"), [{"id": 1, "v": 1}]),
        (WriteKind.UPSERT, Target("dst", "rec__chan"), [{"id": 1, "ch": 3, "x": 9}]),
        (WriteKind.DELETE, Target("dst", "rec__chan"), [{"id": 1, "ch": 1}]),
    ]


def test_a_source_transaction_of_no_shared_entity_plans_nothing() -> None:
    assert plan_of(Unit().change(MASTER, None, {"id": 2, "v": 1})) is None


def test_a_primary_key_change_of_a_mirrored_row_is_an_update_of_the_old_key() -> None:
    unit = Unit().change(PART, {"id": 1, "ch": 1, "x": 0}, {"id": 1, "ch": 2, "x": 0})
    plan = plan_of(unit, entities={entity(1): SHARED})
    assert plan is not None
    assert [(w.kind, w.rows) for w in plan.writes] == [
        (WriteKind.REKEY, [{"key": {"id": 1, "ch": 1}, "row": {"id": 1, "ch": 2, "x": 0}}])
    ]


def test_a_helper_change_in_the_same_transaction_decides_mirroring_and_owes_a_flag() -> None:
    unit = Unit()
    unit.change(HELPER, helper(Process.NONE) | {"id": 1}, helper(Process.NONE, flagged=True) | {"id": 1}, ts_ms=77)
    unit.change(MASTER, {"id": 1, "v": 0}, {"id": 1, "v": 2})
    plan = plan_of(unit, entities={entity(1): SHARED})
    assert plan is not None
    assert plan.flags == {entity(1): 77}
    assert plan.states[entity(1)] == EntityState(HelperRow(Process.NONE, is_flagged=True), at_destination=True)
    assert plan.writes[0].rows == [{"id": 1, "v": 2}]  # Tainted entities are mirrored too
    deleted = Unit().change(HELPER, helper(Process.NONE) | {"id": 1}, None).change(MASTER, {"id": 1}, {"id": 1, "v": 3})
    plan = plan_of(deleted, entities={entity(1): SHARED})
    assert plan is not None and not plan.writes  # its helper row went first: no longer shared


def pull(*ids: int, flagged: tuple[int, ...] = (), blobs: dict[int, bytes] | None = None) -> Unit:
    """A pull's snapshot chunk: each entity's helper row, master row (its in-store `blob`) and one part row."""
    unit = Unit("snapshot:1", LINK)
    for i in ids:
        unit.change(HELPER, None, helper(Process.PULL, flagged=i in flagged) | {"id": i})
        unit.change(MASTER, None, {"id": i, "v": i, "blob": (blobs or {}).get(i)})
        unit.change(PART, None, {"id": i, "ch": 0, "x": i})
    return unit


def test_a_pull_writes_its_entities_and_acknowledges_each() -> None:
    plan = plan_of(pull(1, 2))
    assert plan is not None and plan.link_id == LINK.link_id
    assert [(w.kind, w.target.table, len(w.rows)) for w in merged_writes([plan])] == [
        (WriteKind.UPSERT, "rec", 1),
        (WriteKind.UPSERT, "rec__chan", 1),
        (WriteKind.UPSERT, "rec", 1),
        (WriteKind.UPSERT, "rec__chan", 1),
    ]
    assert plan.ack is not None
    assert plan.ack["keys"] == [entity(1).key, entity(2).key] and plan.ack["rows"] == 4
    assert plan.ack["request_id"] == "req" and plan.ack["failed"] == plan.ack["skipped"] == []
    assert all(plan.states[entity(i)].at_destination for i in (1, 2))


def test_a_flagged_pull_keeps_an_entity_that_is_here_and_deprecates_one_that_is_not() -> None:
    unit = pull(1, 2, flagged=(1, 2))
    planner = UnitPlanner(unit.prepared(), ROUTES, known(unit.prepared()))
    assert planner.presence_needed() == [entity(1), entity(2)]
    plan = planner.plan({entity(1).key}, Staged())
    assert plan is not None
    # The one here is brought up to date, as mirroring keeps it (parts first replaced); nothing of the other.
    assert [(w.kind, w.target.table, w.rows) for w in plan.writes] == [
        (WriteKind.DELETE, "rec__chan", [{"id": 1}]),
        (WriteKind.UPSERT, "rec", [{"id": 1, "v": 1, "blob": None}]),
        (WriteKind.UPSERT, "rec__chan", [{"id": 1, "ch": 0, "x": 1}]),
    ]
    assert plan.ack is not None and plan.ack["keys"] == [entity(1).key] and plan.ack["deprecate"] == [entity(2).key]


def test_a_flagged_pull_sees_what_an_earlier_unit_of_the_batch_did_both_ways() -> None:
    unit = pull(1, 2, flagged=(1, 2))
    batch = {
        entity(1): EntityState(HelperRow(Process.PULL), at_destination=True),  # applied earlier in this batch
        entity(2): EntityState(HelperRow(Process.DELETE), at_destination=False),  # removed earlier in this batch
    }
    plan = plan_of(unit, batch=batch, present={entity(2).key})  # the query saw only what was committed
    assert plan is not None and plan.ack is not None
    assert plan.ack["keys"] == [entity(1).key] and plan.ack["deprecate"] == [entity(2).key]


def test_a_read_of_entities_already_here_replaces_their_parts_and_brings_tainted_ones_up_to_date() -> None:
    """What `djlink resnapshot` asks for: every shared entity read again (the binlog that had its changes is gone)."""
    unit = Unit("snapshot:3", LINK)
    for i, flagged in ((1, False), (2, True), (3, False)):
        unit.change(HELPER, None, helper(Process.NONE, flagged=flagged) | {"id": i})
        unit.change(MASTER, None, {"id": i, "v": 10 * i})
        unit.change(PART, None, {"id": i, "ch": 5, "x": i})
    # 2 was flagged while the binlog that said so was lost; 3 is not known here (a helper table adopted).
    plan = plan_of(unit, entities={entity(1): SHARED, entity(2): SHARED})
    assert plan is not None and plan.ack is not None
    assert [(w.kind, w.target.table, w.rows) for w in plan.writes] == [
        (WriteKind.DELETE, "rec__chan", [{"id": 1}, {"id": 2}]),  # the parts of those here, before any upsert
        (WriteKind.UPSERT, "rec", [{"id": 1, "v": 10}]),
        (WriteKind.UPSERT, "rec__chan", [{"id": 1, "ch": 5, "x": 1}]),
        (WriteKind.UPSERT, "rec", [{"id": 2, "v": 20}]),
        (WriteKind.UPSERT, "rec__chan", [{"id": 2, "ch": 5, "x": 2}]),
        (WriteKind.UPSERT, "rec", [{"id": 3, "v": 30}]),
        (WriteKind.UPSERT, "rec__chan", [{"id": 3, "ch": 5, "x": 3}]),
    ]
    assert plan.ack["keys"] == [entity(1).key, entity(2).key, entity(3).key]
    assert plan.flags == {entity(2): 1000}  # the flag reaches the destination with its helper row
    assert plan.states[entity(2)] == EntityState(HelperRow(Process.NONE, is_flagged=True), at_destination=True)


def test_a_delete_removes_parts_before_masters_and_acknowledges_deleted() -> None:
    unit = Unit("snapshot:2", LINK)
    for i in (1, 2):
        unit.change(HELPER, None, helper(Process.DELETE) | {"id": i})
    plan = plan_of(unit, entities={entity(1): SHARED, entity(2): SHARED})
    assert plan is not None and plan.ack is not None
    assert [(w.kind, w.target.table, w.rows) for w in plan.writes] == [
        (WriteKind.DELETE, "rec__chan", [{"id": 1}, {"id": 2}]),
        (WriteKind.DELETE, "rec", [{"id": 1}, {"id": 2}]),
    ]
    assert plan.ack["deleted"] == [entity(1).key, entity(2).key]
    assert not plan.states[entity(1)].at_destination


def test_entities_whose_objects_fail_or_that_are_excluded_are_acknowledged_as_failed_and_not_written() -> None:
    unit = pull(1, 2, 3)
    digest = b"\x01" * 16
    unit.pending.events[
        next(
            iter(
                k
                for k, e in unit.pending.events.items()
                if e.envelope["after"].get("id") == 2 and e.collection == MASTER
            )
        )
    ].envelope["after"]["blob"] = digest
    planner = UnitPlanner(
        unit.prepared(), ROUTES, known(unit.prepared()), excluded={entity(3): "the destination refused it: x"}
    )
    refs = planner.objects_needed(set())
    ref = ObjectRef(TrackedKey("src", "raw", digest), "blob", MASTER, "raw", "dst")
    assert refs == {entity(2): [ref]}  # the excluded entity's objects are not even copied
    plan = planner.plan(set(), Staged(failed={entity(2): "external object: missing"}))
    assert plan is not None and plan.ack is not None
    assert plan.ack["keys"] == [entity(1).key]
    assert plan.ack["failed"] == [
        {"key": entity(3).key, "reason": "the destination refused it: x"},
        {"key": entity(2).key, "reason": "external object: missing"},
    ]
    assert {w.rows[0]["id"] for w in plan.writes} == {1}
    assert not plan.states[entity(2)].at_destination and not plan.states[entity(3)].at_destination  # Activated


def test_a_staged_objects_tracking_row_is_written_before_the_row_that_references_it() -> None:
    digest = b"\x02" * 16
    unit = pull(1, blobs={1: digest})
    planner = UnitPlanner(unit.prepared(), ROUTES, known(unit.prepared()))
    (ref,) = planner.objects_needed(set())[entity(1)]
    tracked = {"hash": digest, "size": 3}
    plan = planner.plan(set(), Staged(rows={ref: tracked}))
    assert plan is not None
    assert [(w.target.table, w.rows[0]) for w in plan.writes[:2]] == [
        ("~external_raw", tracked),
        ("rec", {"id": 1, "v": 1, "blob": digest}),
    ]


def test_consecutive_writes_of_one_kind_table_and_shape_share_a_statement_across_plans() -> None:
    a, b = plan_of(pull(1)), plan_of(pull(2))
    assert a is not None and b is not None
    one = plan_of(Unit().change(MASTER, {"id": 1}, {"id": 1, "v": 5}), entities={entity(1): SHARED})
    assert one is not None
    merged = merged_writes([a, b, one])
    assert [(w.kind, w.target.table, len(w.rows)) for w in merged] == [
        (WriteKind.UPSERT, "rec", 1),
        (WriteKind.UPSERT, "rec__chan", 1),
        (WriteKind.UPSERT, "rec", 1),
        (WriteKind.UPSERT, "rec__chan", 1),
        (WriteKind.UPSERT, "rec", 1),
    ]
    updates = [
        plan_of(Unit().change(MASTER, {"id": i}, {"id": i, "v": 0}), entities={entity(i): SHARED}) for i in (1, 2)
    ]
    same_shape = merged_writes([p for p in updates if p is not None])
    assert [(w.kind, len(w.rows)) for w in same_shape] == [(WriteKind.UPSERT, 2)]


def test_rows_that_do_not_convert_are_the_datas_fault_and_a_bug_in_planning_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A conversion error refuses the unit (the loop dead-letters it); any other error, in preparing or in
    planning, propagates out of the batch: it stops the applier instead of dead-lettering user data."""
    batch = [(unit.unit_id, unit.pending) for unit in (Unit("0-1-7").change(MASTER, None, {"id": 1}),)]
    refused = prepare_all(batch, lambda link_id: None, lambda e: NO_COLUMNS[e.collection]).refused  # a key it lacks
    assert [r.unit_id for r in refused] == ["0-1-7"] and "cannot convert" in refused[0].reason

    def bug(e: Event) -> list[str]:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        prepare_all(batch, lambda link_id: None, bug)
    prepared = prepare_all(batch, lambda link_id: None, lambda e: ["id"]).units
    monkeypatch.setattr(UnitPlanner, "plan", lambda *a: NO_COLUMNS["a bug in planning"])
    settings = Settings.from_env({})
    destination = Destination(settings.destination, threading.Event())
    planner = BatchPlanner(destination, StateStore("s", "g"), Objects(Stores({}, "S"), Stores({}, "D")))
    states = EntityStates()
    states.remember(entity(1), SHARED)  # kept: planning reads nothing from the (unconnected) destination
    with pytest.raises(KeyError, match="a bug in planning"):
        planner.plan(prepared, ROUTES, states)


def test_entities_touched_names_each_entity_once_by_both_images_and_nothing_of_other_tables() -> None:
    unit = Unit()
    unit.change(PART, {"id": 1, "ch": 1, "x": 0}, {"id": 2, "ch": 1, "x": 0})  # moved to another master
    unit.change(MASTER, None, {"id": 1, "v": 0})
    unit.change(HELPER, None, helper(Process.PULL) | {"id": 3})
    unit.change(EXTERNAL, None, {"hash": b"\x01" * 16, "size": 3})  # a tracked object: no entity
    assert entities_touched(unit.prepared(), ROUTES) == [entity(1), entity(2), entity(3)]


def test_entity_states_read_only_what_is_not_kept_and_keep_a_bounded_number() -> None:
    reads: list[list[EntityKey]] = []

    def read(keys: list[EntityKey]) -> dict[EntityKey, EntityState]:
        reads.append(keys)
        return {k: SHARED for k in keys if k == entity(2)}

    states = EntityStates(limit=3)
    assert states.of([entity(1), entity(2), entity(1)], read) == {entity(1): EntityState(), entity(2): SHARED}
    assert states.of([entity(2), entity(1)], read) == {entity(2): SHARED, entity(1): EntityState()}
    assert reads == [[entity(1), entity(2)]] and states.reads == 1  # the second batch read nothing
    states.remember(entity(1), SHARED)  # committed
    states.of([entity(3), entity(4)], read)  # 2, the least recently used, is dropped
    assert len(states) == 3 and reads[-1] == [entity(3), entity(4)]
    assert states.of([entity(1)], read) == {entity(1): SHARED}  # as committed, not as first read
    states.of([entity(2)], read)
    assert reads[-1] == [entity(2)]  # read again
