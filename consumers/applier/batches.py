"""A batch of units, from gathered to planned: converted, then planned one after another with what plans depend on.

Each unit is planned against the entity states the earlier units of the
batch leave (not committed yet), over the committed states of every entity
the batch touches (`entity_states`, read once per batch); before each plan, what it depends on is
read here: the presence at the destination of flagged entities being pulled,
then the unit's external objects, copied and verified (`objects`). Planning
itself is pure (`planning.UnitPlanner`). Units that cannot be planned are
returned with the reason, for the loop to give up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import schemas
from consumers.applier import writes
from consumers.applier.destination import Destination
from consumers.applier.entity_states import EntityStates
from consumers.applier.gathering import Event, PendingUnit
from consumers.applier.objects import Objects
from consumers.applier.planning import Known, Plan, Prepared, UnitPlanner, entities_touched, prepare
from consumers.applier.routing import Routes
from consumers.applier.state_store import StateStore, TrackedKey
from consumers.integrity import EntityKey, EntityState
from foundation.dberrors import describe
from foundation.links import LinkSpec

log = logging.getLogger(__name__)
# What a unit's data can fail to convert with (a value its column type does not take, a key its schema lacks):
# the data's fault, so the unit is dead-lettered. Anything else raised while planning is a bug.
CONVERSION_ERRORS = (ValueError, TypeError, KeyError, ArithmeticError, schemas.DecodeError)


@dataclass(frozen=True)
class Refused:
    """A unit that cannot be applied, and why (the loop dead-letters it)."""

    unit_id: str
    unit: PendingUnit
    link_id: str | None
    reason: str


@dataclass
class PreparedBatch:
    """The units of a batch ready to plan, and those refused on the way."""

    units: list[Prepared] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


def prepare_all(
    batch: list[tuple[str, PendingUnit]],
    link_of: Callable[[str], LinkSpec | None],
    key_columns: Callable[[Event], list[str]],
) -> PreparedBatch:
    """The units converted for planning; a unit of an unknown link, or whose data does not convert, is refused."""
    out = PreparedBatch()
    for unit_id, unit in batch:
        end = unit.end
        assert end is not None
        link: LinkSpec | None = None
        if end["link_id"] is not None:
            link = link_of(end["link_id"])
            if link is None:
                out.refused.append(Refused(unit_id, unit, end["link_id"], f"unknown link {end['link_id']!r}"))
                continue
        try:
            out.units.append(prepare(unit_id, unit, link, key_columns))
        except CONVERSION_ERRORS as exc:
            reason = f"cannot convert the unit's rows: {describe(exc)}"
            out.refused.append(Refused(unit_id, unit, end["link_id"], reason))
    return out


class BatchPlanner:
    """Plans prepared units; reads what the plans depend on from the destination and the stores."""

    def __init__(self, destination: Destination, store: StateStore, objects: Objects) -> None:
        self._destination = destination
        self._store = store
        self._objects = objects

    def plan(
        self,
        units: list[Prepared],
        routes: Routes,
        states: EntityStates,
        excluded: Mapping[EntityKey, str] | None = None,
    ) -> tuple[list[Plan], list[Refused]]:
        """The plans of the units with something to do, in order, and the units refused (a source transaction
        whose object cannot be copied: it is applied whole or not at all). `excluded`: entities of a single
        processing unit to leave out, and why."""
        plans: list[Plan] = []
        refused: list[Refused] = []
        touched = [k for unit in units for k in entities_touched(unit, routes)]
        entities = states.of(touched, self._read_states)
        batch_states: dict[EntityKey, EntityState] = {}
        batch_tracked: dict[TrackedKey, dict[str, Any] | None] = {}
        self._objects.new_batch()
        for unit in units:
            planner = UnitPlanner(unit, routes, Known(entities, batch_states), excluded)
            present = self._present(unit.link, planner.presence_needed())

            def lookup(key: TrackedKey, unit_tracked: Any = planner.tracked) -> dict[str, Any] | None:
                found = unit_tracked.get(key) or batch_tracked.get(key)
                return (
                    found
                    if found is not None
                    else self._destination.transact(partial(self._store.load_tracked, key=key))
                )

            staged = self._objects.stage(planner.objects_needed(present), lookup, whole=unit.link is None)
            if unit.link is None and staged.failed:
                refused.append(Refused(unit.unit_id, unit.unit, None, next(iter(staged.failed.values()))))
                continue
            plan = planner.plan(present, staged)
            if plan is not None:
                plans.append(plan)
                batch_states.update(plan.states)
                batch_tracked.update(plan.tracked)
        return plans, refused

    def _read_states(self, keys: list[EntityKey]) -> Mapping[EntityKey, EntityState]:
        return self._destination.transact(partial(self._store.load_states, keys=keys))

    def _present(self, link: LinkSpec | None, entities: list[EntityKey]) -> set[str]:
        """Which of these entities of `link` have their master row at the destination now (key texts)."""
        if link is None or not entities:
            return set()
        return self._destination.transact(partial(writes.present, link=link, key_texts=[e.key for e in entities]))
