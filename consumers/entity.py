"""The per-entity integrity rules, as pure functions of the helper row (no I/O here).

States follow datajoint-link (see shared/reference/STATES.md): a helper row
holds `process` (PULL/DELETE/NONE), `is_flagged` and `is_deprecated` as
'TRUE'/'FALSE' strings, exactly as the seed stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class PullDecision(Enum):
    ACTIVATE = "activate"  # Unshared: insert helper row with process PULL
    RESUME = "resume"  # Activated/Received by an earlier pull: read and apply again (idempotent)
    SKIP = "skip"  # Shared: nothing to do
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    action: PullDecision
    reason: str = ""


def decide_pull(helper: dict[str, Any] | None) -> Decision:
    """What a pull request does to one entity, given its helper row (None: no helper row)."""
    if helper is None:
        return Decision(PullDecision.ACTIVATE)
    if helper["is_deprecated"] == "TRUE":
        return Decision(PullDecision.REFUSE, "deprecated at the source")
    if helper["process"] == "PULL":
        return Decision(PullDecision.RESUME)
    if helper["process"] == "DELETE":
        return Decision(PullDecision.REFUSE, "a delete of this entity is in progress")
    if helper["is_flagged"] == "TRUE":
        return Decision(PullDecision.REFUSE, "flagged at the source")
    return Decision(PullDecision.SKIP, "already shared")


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
