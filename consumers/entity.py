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
