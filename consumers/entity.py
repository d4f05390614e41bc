"""The per-entity integrity rules, as pure functions of the helper row (no I/O here).

States follow datajoint-link (see shared/reference/STATES.md): a helper row
holds `process` (PULL/DELETE/NONE), `is_flagged` and `is_deprecated` as
'TRUE'/'FALSE' strings, exactly as the seed stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Action(Enum):
    """What the source agent does to one entity for a request (see decide_pull, decide_delete)."""

    ACTIVATE = "activate"  # insert the helper row (PULL) and have it processed
    PROCESS = "process"  # have it processed as its helper row says (a snapshot read the applier acts on)
    REPULL = "repull"  # an interrupted delete of an unflagged entity: back to PULL, then processed
    MARK_DELETE = "mark-delete"  # helper process DELETE, then processed
    DONE = "done"  # nothing to do: already where the request leads
    REFUSE = "refuse"  # nothing done; the reason goes back
    REFUSE_AND_PROCESS = "refuse-and-process"  # refused, but an interrupted delete is finished meanwhile


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""


def _flagged(helper: dict[str, Any]) -> bool:
    return helper["is_flagged"] == "TRUE"


def decide_pull(helper: dict[str, Any] | None) -> Decision:
    """What a pull request does to one entity, given its helper row (None: no helper row).

    As the seed: an interrupted process is finished first, then the pull.
    An interrupted delete of an unflagged entity would end Unshared and be
    pulled again, so it goes straight back to PULL (same end: Shared); of a
    flagged one, it ends Deprecated, which refuses the pull.
    """
    if helper is None:
        return Decision(Action.ACTIVATE)
    if helper["is_deprecated"] == "TRUE":
        return Decision(Action.REFUSE, "deprecated at the source")
    if helper["process"] == "PULL":
        return Decision(Action.PROCESS)
    if helper["process"] == "DELETE":
        if _flagged(helper):
            return Decision(Action.REFUSE_AND_PROCESS, "flagged at the source (its delete is being finished)")
        return Decision(Action.REPULL)
    if _flagged(helper):
        return Decision(Action.REFUSE, "flagged at the source")
    return Decision(Action.DONE, "already shared")


def decide_delete(helper: dict[str, Any] | None) -> Decision:
    """What a delete request does to one entity, given its helper row (None: no helper row).

    A shared, tainted or activated entity is marked DELETE and processed:
    its destination rows go, then the helper row (or, flagged, it becomes
    Deprecated). An interrupted delete is processed again.
    """
    if helper is None:
        return Decision(Action.DONE, "not shared")
    if helper["is_deprecated"] == "TRUE":
        return Decision(Action.DONE, "deprecated")
    if helper["process"] == "DELETE":
        return Decision(Action.PROCESS)
    return Decision(Action.MARK_DELETE)


class Outcome(Enum):
    """What the applier does with one entity of a processing unit (see decide_process)."""

    APPLY = "apply"  # write its rows; ack as here
    KEEP = "keep"  # leave the rows as they are; ack as here (Received -> Tainted)
    DEPRECATE = "deprecate"  # write nothing; ack for deprecation (Activated and flagged -> Deprecated)
    REMOVE = "remove"  # delete its rows; ack as deleted (then Unshared, or Deprecated when flagged)
    SKIP = "skip"  # not approved when read; ack as skipped with the reason


def decide_process(helper: dict[str, Any] | None, present: bool) -> tuple[Outcome, str]:
    """The applier's step of the seed's `process`, on the helper row read with the entity's rows.

    `present`: whether the entity's master row is at the destination (only
    asked for flagged entities being pulled).
    """
    if helper is None:
        return Outcome.SKIP, "no longer activated at the source"
    if helper["is_deprecated"] == "TRUE":
        return Outcome.SKIP, "deprecated at the source"
    if helper["process"] == "DELETE":
        return Outcome.REMOVE, ""
    if helper["process"] == "PULL" and _flagged(helper):
        return (Outcome.KEEP, "") if present else (Outcome.DEPRECATE, "flagged at the source")
    if _flagged(helper):
        return Outcome.KEEP, ""
    return Outcome.APPLY, ""


NEW_HELPER_ROW = {"process": "PULL", "is_flagged": "FALSE", "is_deprecated": "FALSE"}


@dataclass(frozen=True)
class EntityState:
    """What the applier knows of one entity: its helper row as last captured, and whether it is here.

    `process` is None when the entity has no helper row (Unshared, or its
    helper row is not captured yet).
    """

    process: str | None = None
    is_flagged: bool = False
    is_deprecated: bool = False
    at_destination: bool = False

    def mirrored(self) -> bool:
        """Whether a source change of this entity is applied at the destination.

        Shared and Tainted entities (process NONE, not deprecated) follow
        their source rows; so do Received ones (process PULL, already here),
        whose changes after the snapshot read would otherwise be lost until
        the next pull. Unshared, Activated and Deprecated ones do not.
        """
        if self.process is None or self.is_deprecated:
            return False
        return self.process == "NONE" or (self.process == "PULL" and self.at_destination)

    def flag(self) -> tuple[bool, bool]:
        """(flagged, deprecated): what the flags topic says of the entity."""
        return (self.is_flagged, self.is_deprecated)

    def with_helper(self, row: dict[str, Any] | None) -> EntityState:
        """The state after the helper row became `row` (None: deleted)."""
        if row is None:
            return EntityState(at_destination=self.at_destination)
        return EntityState(
            process=str(row["process"]),
            is_flagged=row["is_flagged"] == "TRUE",
            is_deprecated=row["is_deprecated"] == "TRUE",
            at_destination=self.at_destination,
        )

    def forgettable(self) -> bool:
        """Nothing worth keeping: no helper row, nothing at the destination."""
        return self.process is None and not self.at_destination
