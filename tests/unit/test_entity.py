"""The per-entity rules (consumers.entity), without services: the seed's states, decided from helper rows."""

from __future__ import annotations

import pytest

from consumers.entity import Action, EntityState, Outcome, decide_delete, decide_process, decide_pull


def helper(process: str, flagged: bool = False, deprecated: bool = False) -> dict[str, str]:
    tf = {True: "TRUE", False: "FALSE"}
    return {"process": process, "is_flagged": tf[flagged], "is_deprecated": tf[deprecated]}


@pytest.mark.parametrize(
    ("row", "pull", "delete"),
    [
        (None, Action.ACTIVATE, Action.DONE),  # Unshared
        (helper("PULL"), Action.PROCESS, Action.MARK_DELETE),  # Activated/Received, pulling
        (helper("DELETE"), Action.REPULL, Action.PROCESS),  # Activated/Received, deleting
        (helper("PULL", flagged=True), Action.PROCESS, Action.MARK_DELETE),
        (helper("DELETE", flagged=True), Action.REFUSE_AND_PROCESS, Action.PROCESS),
        (helper("NONE"), Action.DONE, Action.MARK_DELETE),  # Shared
        (helper("NONE", flagged=True), Action.REFUSE, Action.MARK_DELETE),  # Tainted
        (helper("NONE", flagged=True, deprecated=True), Action.REFUSE, Action.DONE),  # Deprecated
    ],
)
def test_what_the_agent_does_for_a_pull_and_a_delete(row: dict[str, str] | None, pull: Action, delete: Action) -> None:
    assert decide_pull(row).action is pull
    assert decide_delete(row).action is delete


@pytest.mark.parametrize(
    ("row", "present", "outcome"),
    [
        (None, False, Outcome.SKIP),
        (helper("PULL"), False, Outcome.APPLY),
        (helper("PULL"), True, Outcome.APPLY),
        (helper("PULL", flagged=True), True, Outcome.KEEP),  # Received, flagged -> Tainted
        (helper("PULL", flagged=True), False, Outcome.DEPRECATE),  # Activated, flagged -> Deprecated
        (helper("DELETE"), True, Outcome.REMOVE),
        (helper("DELETE", flagged=True), False, Outcome.REMOVE),
        (helper("NONE"), True, Outcome.APPLY),
        (helper("NONE", flagged=True), True, Outcome.KEEP),
        (helper("NONE", flagged=True, deprecated=True), False, Outcome.SKIP),
    ],
)
def test_what_the_applier_does_with_a_processed_entity(
    row: dict[str, str] | None, present: bool, outcome: Outcome
) -> None:
    assert decide_process(row, present)[0] is outcome


def test_which_entities_are_mirrored() -> None:
    assert EntityState("NONE").mirrored()  # Shared
    assert EntityState("NONE", is_flagged=True).mirrored()  # Tainted
    assert EntityState("PULL", at_destination=True).mirrored()  # Received
    assert not EntityState("PULL").mirrored()  # Activated: the snapshot brings it
    assert not EntityState("DELETE", at_destination=True).mirrored()
    assert not EntityState("NONE", is_flagged=True, is_deprecated=True).mirrored()  # Deprecated
    assert not EntityState().mirrored()  # Unshared


def test_a_helper_row_change_keeps_what_the_destination_holds() -> None:
    here = EntityState("PULL", at_destination=True)
    flagged = here.with_helper({"process": "NONE", "is_flagged": "TRUE", "is_deprecated": "FALSE"})
    assert flagged == EntityState("NONE", True, False, True) and flagged.flag() == (True, False)
    gone = flagged.with_helper(None)
    assert gone.process is None and gone.at_destination and not gone.forgettable()
    assert EntityState().forgettable()
