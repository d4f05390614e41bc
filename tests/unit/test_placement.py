"""Where snapshot chunks go among streamed transactions (cdc.placement), without services."""

from __future__ import annotations

from collections import deque

from cdc.events import ChangeUnit, Position
from cdc.offsets import Checkpoint
from cdc.placement import Held, coordinate, place


def streamed(name: str, file: str, end: int) -> ChangeUnit:
    unit = ChangeUnit(name, Position(file, end - 10, name, 0, 1), False)
    unit.checkpoint = Checkpoint(name, file, end)
    return unit


def chunk(name: str, file: str, pos: int, consumed: object = None) -> Held:
    return Held(ChangeUnit(name, Position(file, pos, None, 0, 1), True), coordinate(file, pos), consumed)


def names(units: list[ChangeUnit]) -> list[str]:
    return [u.id for u in units]


def test_coordinates_compare_by_file_number_then_position() -> None:
    assert coordinate("bin.000009", 900) < coordinate("bin.000010", 4) < coordinate("bin.000010", 5)
    assert coordinate("", 0) < coordinate("bin.000001", 4)


def test_a_chunk_goes_after_the_transactions_it_contains_and_before_the_others() -> None:
    held = deque([chunk("s", "bin.000002", 500, consumed="offsets")])
    batch = [streamed("a", "bin.000002", 400), streamed("b", "bin.000002", 500), streamed("c", "bin.000002", 600)]
    out, consumed = place(held, batch, coordinate("bin.000002", 600), drained=True)
    assert names(out) == ["a", "b", "s", "c"]
    assert consumed == "offsets" and not held


def test_a_chunk_waits_while_transactions_before_it_may_still_come() -> None:
    held = deque([chunk("s", "bin.000002", 500)])
    batch = [streamed("a", "bin.000002", 400)]
    # The reader has not reached the chunk's coordinates: a transaction ending at 500 may come next.
    out, consumed = place(held, batch, coordinate("bin.000002", 400), drained=True)
    assert names(out) == ["a"] and len(held) == 1 and consumed is None
    # The batch was cut short by its limits: later units up to 500 may still wait in the queue.
    out, _ = place(held, [], coordinate("bin.000002", 700), drained=False)
    assert out == [] and len(held) == 1
    # Everything up to the reader's coordinates taken, and they are past the chunk: it goes.
    out, _ = place(held, [], coordinate("bin.000002", 500), drained=True)
    assert names(out) == ["s"] and not held


def test_chunks_of_one_signal_interleave_in_order_and_release_the_offsets_with_the_last() -> None:
    held = deque([chunk("s1", "bin.000003", 100), chunk("s2", "bin.000003", 300, consumed="offsets")])
    batch = [streamed("a", "bin.000003", 50), streamed("b", "bin.000003", 200), streamed("c", "bin.000004", 10)]
    out, consumed = place(held, batch, coordinate("bin.000003", 50), drained=False)
    assert names(out) == ["a", "s1", "b", "s2", "c"]
    assert consumed == "offsets"
