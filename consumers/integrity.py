"""The integrity rules of djlink, whole and pure: datajoint-link's entity states and every transition between them.

No I/O here. The source agent turns these decisions into helper-table SQL in
one place (`consumers.agent.helper_table`); the applier asks them what a
processing unit does to each entity (`consumers.applier.planning`).

Per entity (one master row and its part rows), datajoint-link's helper table
holds a row with `process` (PULL/DELETE/NONE), `is_flagged` and
`is_deprecated`, the flags stored as the strings 'TRUE'/'FALSE' so that an
existing datajoint-link deployment can switch in place. The state is never
stored: it is derived from that row and from whether the entity's rows are
at the destination (`state_of`, datajoint-link's table in docs/states.md).

A request moves an entity in three steps, each on one server and each
idempotent, so any of them can be repeated after a crash:

1. the agent decides (`decide_pull`, `decide_delete`) and writes the helper
   row (`Action.helper_after`), then asks for a snapshot read of the entity;
2. the applier reads the helper row in the same consistent read as the
   entity's rows and decides what to do at the destination (`decide_process`);
3. the agent applies the applier's acknowledgement to the helper row, each
   change only from the state it expects (`ACK_RULES`, `acknowledge`), so a
   repeated or stale acknowledgement changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import Any, NamedTuple


class EntityKey(NamedTuple):
    """One entity: its link, and its primary key as canonical JSON (foundation.keys.encode)."""

    link_id: str
    key: str


class Process(StrEnum):
    """The helper row's `process` column."""

    PULL = "PULL"
    DELETE = "DELETE"
    NONE = "NONE"


def _sql_bool(value: bool) -> str:
    return "TRUE" if value else "FALSE"


@dataclass(frozen=True)
class HelperRow:
    """One entity's helper row: where its request stands and whether the source flagged it."""

    process: Process
    is_flagged: bool = False
    is_deprecated: bool = False

    COLUMNS = ("process", "is_flagged", "is_deprecated")

    @classmethod
    def from_sql(cls, row: Mapping[str, Any]) -> HelperRow:
        """The row as the helper table (or its change event) holds it: enum strings 'TRUE'/'FALSE'."""
        return cls(Process(str(row["process"])), row["is_flagged"] == "TRUE", row["is_deprecated"] == "TRUE")

    def to_sql(self) -> dict[str, str]:
        """The columns as the helper table stores them."""
        return {
            "process": self.process.value,
            "is_flagged": _sql_bool(self.is_flagged),
            "is_deprecated": _sql_bool(self.is_deprecated),
        }


NEW_HELPER_ROW = HelperRow(Process.PULL)  # what activating an entity inserts


class State(StrEnum):
    """datajoint-link's six states of an entity (derived, never stored)."""

    UNSHARED = "Unshared"
    ACTIVATED = "Activated"
    RECEIVED = "Received"
    SHARED = "Shared"
    TAINTED = "Tainted"
    DEPRECATED = "Deprecated"


class IllegalState(Exception):
    """A helper row and a destination that no sequence of transitions leaves together."""


def state_of(helper: HelperRow | None, at_destination: bool) -> State:
    """The state of an entity from its helper row (None: it has none) and whether its rows are at the destination."""
    if helper is None:
        if at_destination:
            raise IllegalState("at the destination without a helper row")
        return State.UNSHARED
    if helper.process is not Process.NONE:
        return State.RECEIVED if at_destination else State.ACTIVATED
    if helper.is_deprecated:
        if at_destination:
            raise IllegalState("deprecated but at the destination")
        return State.DEPRECATED
    if not at_destination:
        raise IllegalState("shared but not at the destination")
    return State.TAINTED if helper.is_flagged else State.SHARED


def expected_at_destination(helper: HelperRow | None) -> bool | None:
    """Whether an entity's rows belong at the destination, from its helper row alone (what `djlink verify`
    checks): True for Shared and Tainted (process NONE, not deprecated: `state_of` has no state for them
    elsewhere), False for Unshared (no helper row) and Deprecated, None while a pull or a delete is in
    flight (PULL or DELETE: Activated and Received are both legal)."""
    if helper is None:
        return False
    if helper.process is not Process.NONE:
        return None
    return not helper.is_deprecated


# -- step 1: the source agent's decision on a request ------------------------------------------------------------


class Action(Enum):
    """What the source agent does to one entity for a request (see decide_pull, decide_delete)."""

    ACTIVATE = "activate"  # insert the helper row (PULL) and have it processed
    PROCESS = "process"  # have it processed as its helper row says (a snapshot read the applier acts on)
    REPULL = "repull"  # an interrupted delete of an unflagged entity: back to PULL, then processed
    MARK_DELETE = "mark-delete"  # helper process DELETE, then processed
    DONE = "done"  # nothing to do: already where the request leads
    REFUSE = "refuse"  # nothing done; the reason goes back
    REFUSE_AND_PROCESS = "refuse-and-process"  # refused, but an interrupted delete is finished meanwhile

    @property
    def processed(self) -> bool:
        """Whether the entity is read (snapshot) and processed by the applier after this action."""
        return self in (Action.ACTIVATE, Action.PROCESS, Action.REPULL, Action.MARK_DELETE, Action.REFUSE_AND_PROCESS)

    @property
    def refused(self) -> bool:
        return self in (Action.REFUSE, Action.REFUSE_AND_PROCESS)

    def helper_after(self, helper: HelperRow | None) -> HelperRow | None:
        """The helper row once the agent has carried out this action on `helper`."""
        if self is Action.ACTIVATE:
            return NEW_HELPER_ROW
        if self is Action.REPULL:
            assert helper is not None
            return replace(helper, process=Process.PULL)
        if self is Action.MARK_DELETE:
            assert helper is not None
            return replace(helper, process=Process.DELETE)
        return helper


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""


def decide_pull(helper: HelperRow | None) -> Decision:
    """What a pull request does to one entity, given its helper row (None: no helper row).

    As datajoint-link: an interrupted process is finished first, then the
    pull. An interrupted delete of an unflagged entity would end Unshared and
    be pulled again, so it goes straight back to PULL (same end: Shared); of
    a flagged one, it ends Deprecated, which refuses the pull.
    """
    if helper is None:
        return Decision(Action.ACTIVATE)
    if helper.is_deprecated:
        return Decision(Action.REFUSE, "deprecated at the source")
    if helper.process is Process.PULL:
        return Decision(Action.PROCESS)
    if helper.process is Process.DELETE:
        if helper.is_flagged:
            return Decision(Action.REFUSE_AND_PROCESS, "flagged at the source (its delete is being finished)")
        return Decision(Action.REPULL)
    if helper.is_flagged:
        return Decision(Action.REFUSE, "flagged at the source")
    return Decision(Action.DONE, "already shared")


def decide_delete(helper: HelperRow | None) -> Decision:
    """What a delete request does to one entity, given its helper row (None: no helper row).

    A shared, tainted or activated entity is marked DELETE and processed:
    its destination rows go, then the helper row (or, flagged, it becomes
    Deprecated). An interrupted delete is processed again.
    """
    if helper is None:
        return Decision(Action.DONE, "not shared")
    if helper.is_deprecated:
        return Decision(Action.DONE, "deprecated")
    if helper.process is Process.DELETE:
        return Decision(Action.PROCESS)
    return Decision(Action.MARK_DELETE)


# -- step 2: the applier's decision when it processes an entity ---------------------------------------------------


class Outcome(Enum):
    """What the applier does with one entity of a processing unit (see decide_process)."""

    APPLY = "apply"  # write its rows; acknowledged as arrived
    KEEP = "keep"  # leave the rows as they are; acknowledged as arrived (Received and flagged -> Tainted)
    DEPRECATE = "deprecate"  # write nothing; acknowledged for deprecation (Activated and flagged -> Deprecated)
    REMOVE = "remove"  # delete its rows; acknowledged as deleted (then Unshared, or Deprecated when flagged)
    SKIP = "skip"  # not approved when read; acknowledged as skipped with the reason (nothing changes)

    @property
    def at_destination_after(self) -> bool | None:
        """Whether the entity's rows are at the destination afterwards; None: as before."""
        return {Outcome.APPLY: True, Outcome.KEEP: True, Outcome.REMOVE: False, Outcome.DEPRECATE: False}.get(self)


def decide_process(helper: HelperRow | None, present: bool) -> tuple[Outcome, str]:
    """The applier's step of datajoint-link's `process`, on the helper row read with the entity's rows.

    `present`: whether the entity's master row is at the destination. It
    matters only for a flagged entity being pulled (`needs_presence`): one
    already here stays (Tainted), one not here is never written (Deprecated).
    """
    if helper is None:
        return Outcome.SKIP, "no longer activated at the source"
    if helper.is_deprecated:
        return Outcome.SKIP, "deprecated at the source"
    if helper.process is Process.DELETE:
        return Outcome.REMOVE, ""
    if needs_presence(helper):
        return (Outcome.KEEP, "") if present else (Outcome.DEPRECATE, "flagged at the source")
    if helper.is_flagged:
        return Outcome.KEEP, ""
    return Outcome.APPLY, ""


def needs_presence(helper: HelperRow | None) -> bool:
    """Whether `decide_process` depends on the entity's presence at the destination: a flagged pull."""
    return helper is not None and helper.process is Process.PULL and helper.is_flagged and not helper.is_deprecated


# -- step 3: the source agent applies an acknowledgement ----------------------------------------------------------


class Acked(Enum):
    """How an acknowledgement lists an entity (the ack record's field)."""

    ARRIVED = "keys"  # applied or kept at the destination (Outcome.APPLY, Outcome.KEEP)
    DEPRECATE = "deprecate"  # flagged before it arrived (Outcome.DEPRECATE)
    DELETED = "deleted"  # removed at the destination (Outcome.REMOVE)


# How the applier acknowledges each outcome (SKIP: as skipped, with its reason; it changes nothing).
ACKED_AS = {
    Outcome.APPLY: Acked.ARRIVED,
    Outcome.KEEP: Acked.ARRIVED,
    Outcome.DEPRECATE: Acked.DEPRECATE,
    Outcome.REMOVE: Acked.DELETED,
}


@dataclass(frozen=True)
class Guard:
    """The helper row an acknowledgement expects: its process, and its flag when not None."""

    process: Process
    is_flagged: bool | None = None

    def holds(self, helper: HelperRow) -> bool:
        return helper.process is self.process and (self.is_flagged is None or helper.is_flagged == self.is_flagged)


@dataclass(frozen=True)
class AckRule:
    """A helper row the guard accepts gets process `set_process` (and is deprecated when told); with
    `set_process` None it is deleted (Unshared)."""

    guard: Guard
    set_process: Process | None = None
    set_deprecated: bool = False

    def apply(self, helper: HelperRow) -> HelperRow | None:
        if self.set_process is None:
            return None
        return replace(helper, process=self.set_process, is_deprecated=helper.is_deprecated or self.set_deprecated)


# Per acknowledgement, the rules in order; the first whose guard holds applies, none: nothing changes (a repeated
# or stale acknowledgement). The agent's helper-table gateway turns each rule into one guarded statement, run in
# this order; a rule's result never satisfies a later rule's guard, so "first match" and "all in order" agree.
ACK_RULES: dict[Acked, tuple[AckRule, ...]] = {
    # Pulled or kept: PULL -> NONE (Shared, or Tainted when flagged).
    Acked.ARRIVED: (AckRule(Guard(Process.PULL), set_process=Process.NONE),),
    # Flagged before arriving: PULL -> NONE, deprecated (Deprecated).
    Acked.DEPRECATE: (AckRule(Guard(Process.PULL, True), set_process=Process.NONE, set_deprecated=True),),
    # Deleted at the destination: flagged -> NONE, deprecated (Deprecated); else the helper row goes (Unshared).
    Acked.DELETED: (
        AckRule(Guard(Process.DELETE, True), set_process=Process.NONE, set_deprecated=True),
        AckRule(Guard(Process.DELETE)),
    ),
}


def acknowledge(acked: Acked, helper: HelperRow | None) -> HelperRow | None:
    """The helper row after the agent applied an acknowledgement of the entity (`helper` None: it has none)."""
    if helper is None:
        return None
    for rule in ACK_RULES[acked]:
        if rule.guard.holds(helper):
            return rule.apply(helper)
    return helper


# -- what the applier remembers of each entity ------------------------------------------------------------------


@dataclass(frozen=True)
class EntityState:
    """What the applier knows of one entity: its helper row as last captured, and whether it is here.

    `helper` is None when the entity has no helper row (Unshared, or its
    helper row is not captured yet).
    """

    helper: HelperRow | None = None
    at_destination: bool = False

    @property
    def process(self) -> Process | None:
        return self.helper.process if self.helper is not None else None

    @property
    def is_flagged(self) -> bool:
        return self.helper is not None and self.helper.is_flagged

    @property
    def is_deprecated(self) -> bool:
        return self.helper is not None and self.helper.is_deprecated

    def mirrored(self) -> bool:
        """Whether a source change of this entity is applied at the destination.

        Shared and Tainted entities (process NONE, not deprecated) follow
        their source rows; so do Received ones (process PULL, already here),
        whose changes after the snapshot read would otherwise be lost until
        the next pull. Unshared, Activated and Deprecated ones do not.
        """
        if self.helper is None or self.helper.is_deprecated:
            return False
        return self.helper.process is Process.NONE or (self.helper.process is Process.PULL and self.at_destination)

    def flag(self) -> tuple[bool, bool]:
        """(flagged, deprecated): what the flags topic says of the entity."""
        return (self.is_flagged, self.is_deprecated)

    def with_helper(self, helper: HelperRow | None) -> EntityState:
        """The state after the helper row became `helper` (None: deleted)."""
        return EntityState(helper, self.at_destination)

    def after(self, outcome: Outcome) -> EntityState:
        """The state once the applier carried out `outcome` (the helper row changes with the ack, later)."""
        here = outcome.at_destination_after
        return self if here is None else replace(self, at_destination=here)

    def forgettable(self) -> bool:
        """Nothing worth keeping: no helper row, nothing at the destination."""
        return self.helper is None and not self.at_destination
