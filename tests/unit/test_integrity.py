"""The integrity rules (consumers.integrity) without services: datajoint-link's states and every transition.

The end-state matrix walks each of datajoint-link's 12 start states through a
pull and a delete with the pure rules alone, as the agent and the applier
chain them (decision, helper row, processing, acknowledgement), and asserts
the end state and the refusal of each; tests/integration/test_states.py runs
the same matrix end to end over the real services.
"""

from __future__ import annotations

import pytest

from consumers.integrity import (
    ACK_RULES,
    ACKED_AS,
    NEW_HELPER_ROW,
    Acked,
    Action,
    EntityState,
    HelperRow,
    IllegalState,
    Outcome,
    Process,
    State,
    acknowledge,
    decide_delete,
    decide_process,
    decide_pull,
    needs_presence,
    state_of,
)

PULL, DELETE, NONE = Process.PULL, Process.DELETE, Process.NONE


def helper(process: Process, flagged: bool = False, deprecated: bool = False) -> HelperRow:
    return HelperRow(process, flagged, deprecated)


# datajoint-link's start states: (helper row or None, rows at the destination)
START: dict[str, tuple[HelperRow | None, bool]] = {
    "Unshared": (None, False),
    "Activated(no flag, PULL)": (helper(PULL), False),
    "Activated(no flag, DELETE)": (helper(DELETE), False),
    "Activated(flag, PULL)": (helper(PULL, flagged=True), False),
    "Activated(flag, DELETE)": (helper(DELETE, flagged=True), False),
    "Received(no flag, PULL)": (helper(PULL), True),
    "Received(no flag, DELETE)": (helper(DELETE), True),
    "Received(flag, PULL)": (helper(PULL, flagged=True), True),
    "Received(flag, DELETE)": (helper(DELETE, flagged=True), True),
    "Shared": (helper(NONE), True),
    "Tainted": (helper(NONE, flagged=True), True),
    "Deprecated": (helper(NONE, flagged=True, deprecated=True), False),
}
# start state -> (after a pull, after a delete): datajoint-link's service tests
END = {
    "Unshared": (State.SHARED, State.UNSHARED),
    "Activated(no flag, PULL)": (State.SHARED, State.UNSHARED),
    "Activated(no flag, DELETE)": (State.SHARED, State.UNSHARED),
    "Activated(flag, PULL)": (State.DEPRECATED, State.DEPRECATED),
    "Activated(flag, DELETE)": (State.DEPRECATED, State.DEPRECATED),
    "Received(no flag, PULL)": (State.SHARED, State.UNSHARED),
    "Received(no flag, DELETE)": (State.SHARED, State.UNSHARED),
    "Received(flag, PULL)": (State.TAINTED, State.DEPRECATED),
    "Received(flag, DELETE)": (State.DEPRECATED, State.DEPRECATED),
    "Shared": (State.SHARED, State.UNSHARED),
    "Tainted": (State.TAINTED, State.DEPRECATED),
    "Deprecated": (State.DEPRECATED, State.DEPRECATED),
}
# (start state, operation) -> the reason the request is refused with, where it is
REFUSED = {
    ("Activated(flag, DELETE)", "pull"): "flagged at the source (its delete is being finished)",
    ("Received(flag, DELETE)", "pull"): "flagged at the source (its delete is being finished)",
    ("Tainted", "pull"): "flagged at the source",
    ("Deprecated", "pull"): "deprecated at the source",
}
CASES = [(start, op) for start in START for op in ("pull", "delete")]


def run(op: str, helper_row: HelperRow | None, here: bool) -> tuple[HelperRow | None, bool, Action, str]:
    """One request through the pure rules, as the pipeline chains them; the end (helper, here) and the decision."""
    decision = (decide_pull if op == "pull" else decide_delete)(helper_row)
    helper_row = decision.action.helper_after(helper_row)  # the agent writes the helper row
    if decision.action.processed:  # the snapshot read; the applier decides on what it read
        outcome, _reason = decide_process(helper_row, here)
        if outcome.at_destination_after is not None:
            here = outcome.at_destination_after
        if outcome in ACKED_AS:  # the agent applies the acknowledgement
            helper_row = acknowledge(ACKED_AS[outcome], helper_row)
    return helper_row, here, decision.action, decision.reason


@pytest.mark.parametrize(("start", "op"), CASES, ids=[f"{s} {o}" for s, o in CASES])
def test_each_start_state_ends_where_datajoint_link_says_after_a_pull_or_a_delete(start: str, op: str) -> None:
    helper_row, here = START[start]
    assert f"{state_of(helper_row, here)}" == start.split("(")[0]
    helper_row, here, action, reason = run(op, helper_row, here)
    assert state_of(helper_row, here) is END[start][0 if op == "pull" else 1]
    if (start, op) in REFUSED:
        assert action.refused and reason == REFUSED[(start, op)]
    else:
        assert not action.refused


@pytest.mark.parametrize(("start", "op"), CASES, ids=[f"{s} {o}" for s, o in CASES])
def test_a_repeated_request_or_acknowledgement_changes_nothing_more(start: str, op: str) -> None:
    """Every step is idempotent: the same request again, once finished, leaves the entity where it is."""
    helper_row, here = START[start]
    helper_row, here, _, _ = run(op, helper_row, here)
    end = state_of(helper_row, here)
    again, here_again, _, _ = run(op, helper_row, here)
    assert state_of(again, here_again) is end
    for acked in Acked:  # a stale acknowledgement of any kind
        if end is not State.UNSHARED:
            assert state_of(acknowledge(acked, again), here_again) is end


def test_the_six_states_are_derived_from_the_helper_row_and_the_destination() -> None:
    assert state_of(None, False) is State.UNSHARED
    assert state_of(helper(PULL), False) is State.ACTIVATED
    assert state_of(helper(DELETE, flagged=True), True) is State.RECEIVED
    assert state_of(helper(NONE), True) is State.SHARED
    assert state_of(helper(NONE, flagged=True), True) is State.TAINTED
    assert state_of(helper(NONE, flagged=True, deprecated=True), False) is State.DEPRECATED
    for illegal in ((None, True), (helper(NONE), False), (helper(NONE, True, True), True)):
        with pytest.raises(IllegalState):
            state_of(*illegal)


def test_helper_rows_convert_to_and_from_datajoint_links_strings() -> None:
    row = {"process": "DELETE", "is_flagged": "TRUE", "is_deprecated": "FALSE"}
    assert HelperRow.from_sql(row) == helper(DELETE, flagged=True)
    assert HelperRow.from_sql(row).to_sql() == row
    assert NEW_HELPER_ROW.to_sql() == {"process": "PULL", "is_flagged": "FALSE", "is_deprecated": "FALSE"}
    with pytest.raises(ValueError):
        HelperRow.from_sql({"process": "MAYBE", "is_flagged": "FALSE", "is_deprecated": "FALSE"})


@pytest.mark.parametrize(
    ("row", "pull", "delete"),
    [
        (None, Action.ACTIVATE, Action.DONE),  # Unshared
        (helper(PULL), Action.PROCESS, Action.MARK_DELETE),  # Activated/Received, pulling
        (helper(DELETE), Action.REPULL, Action.PROCESS),  # Activated/Received, deleting
        (helper(PULL, flagged=True), Action.PROCESS, Action.MARK_DELETE),
        (helper(DELETE, flagged=True), Action.REFUSE_AND_PROCESS, Action.PROCESS),
        (helper(NONE), Action.DONE, Action.MARK_DELETE),  # Shared
        (helper(NONE, flagged=True), Action.REFUSE, Action.MARK_DELETE),  # Tainted
        (helper(NONE, flagged=True, deprecated=True), Action.REFUSE, Action.DONE),  # Deprecated
    ],
)
def test_requests_first_finish_what_was_interrupted(row: HelperRow | None, pull: Action, delete: Action) -> None:
    assert decide_pull(row).action is pull
    assert decide_delete(row).action is delete


@pytest.mark.parametrize(
    ("row", "present", "outcome"),
    [
        (None, False, Outcome.SKIP),
        (helper(PULL), False, Outcome.APPLY),
        (helper(PULL), True, Outcome.APPLY),
        (helper(PULL, flagged=True), True, Outcome.KEEP),  # Received, flagged -> Tainted
        (helper(PULL, flagged=True), False, Outcome.DEPRECATE),  # Activated, flagged -> Deprecated
        (helper(DELETE), True, Outcome.REMOVE),
        (helper(DELETE, flagged=True), False, Outcome.REMOVE),
        (helper(NONE), True, Outcome.APPLY),
        (helper(NONE, flagged=True), True, Outcome.KEEP),
        (helper(NONE, flagged=True, deprecated=True), False, Outcome.SKIP),
    ],
)
def test_processing_acts_on_the_helper_row_read_with_the_rows(
    row: HelperRow | None, present: bool, outcome: Outcome
) -> None:
    assert decide_process(row, present)[0] is outcome


def test_presence_matters_only_for_a_flagged_pull() -> None:
    rows = [None, *(helper(p, f, d) for p in Process for f in (False, True) for d in (False, True))]
    for row in rows:
        differs = decide_process(row, True) != decide_process(row, False)
        assert differs == needs_presence(row), row


def test_acknowledgements_change_a_helper_row_only_from_the_state_they_expect() -> None:
    assert acknowledge(Acked.ARRIVED, helper(PULL)) == helper(NONE)
    assert acknowledge(Acked.ARRIVED, helper(PULL, flagged=True)) == helper(NONE, flagged=True)
    assert acknowledge(Acked.ARRIVED, helper(DELETE)) == helper(DELETE)  # stale: a delete came since
    assert acknowledge(Acked.DEPRECATE, helper(PULL, flagged=True)) == helper(NONE, True, True)
    assert acknowledge(Acked.DEPRECATE, helper(PULL)) == helper(PULL)  # unflagged since: pulled again later
    assert acknowledge(Acked.DELETED, helper(DELETE)) is None
    assert acknowledge(Acked.DELETED, helper(DELETE, flagged=True)) == helper(NONE, True, True)
    assert acknowledge(Acked.DELETED, helper(PULL)) == helper(PULL)
    assert acknowledge(Acked.ARRIVED, None) is None
    # The gateway runs every rule of an acknowledgement in order: no rule's result satisfies a later one's guard.
    for rules in ACK_RULES.values():
        for i, rule in enumerate(rules):
            for flagged in (False, True):
                start = helper(rule.guard.process, flagged if rule.guard.is_flagged is None else rule.guard.is_flagged)
                after = rule.apply(start)
                assert after is None or not any(later.guard.holds(after) for later in rules[i + 1 :])


def test_shared_tainted_and_received_entities_are_mirrored() -> None:
    assert EntityState(helper(NONE)).mirrored()  # Shared
    assert EntityState(helper(NONE, flagged=True)).mirrored()  # Tainted
    assert EntityState(helper(PULL), at_destination=True).mirrored()  # Received
    assert not EntityState(helper(PULL)).mirrored()  # Activated: the snapshot brings it
    assert not EntityState(helper(DELETE), at_destination=True).mirrored()
    assert not EntityState(helper(NONE, flagged=True, deprecated=True)).mirrored()  # Deprecated
    assert not EntityState().mirrored()  # Unshared


def test_a_helper_row_change_keeps_presence_and_an_outcome_sets_it() -> None:
    here = EntityState(helper(PULL), at_destination=True)
    flagged = here.with_helper(helper(NONE, flagged=True))
    assert flagged == EntityState(helper(NONE, True, False), True) and flagged.flag() == (True, False)
    assert here.with_helper(None).at_destination and not here.with_helper(None).forgettable()
    assert EntityState().forgettable()
    assert EntityState(helper(PULL)).after(Outcome.APPLY).at_destination
    assert not here.after(Outcome.REMOVE).at_destination
    assert here.after(Outcome.SKIP) == here
