"""Where a snapshot chunk goes in the stream of source transactions (pure; no I/O).

A snapshot chunk is read in one consistent snapshot at binlog coordinates P
(`binlog_snapshot_file`/`binlog_snapshot_position`): it holds every source
transaction committed up to P and none after. It is therefore published right
after the last streamed transaction that ends at or before P and before the
first one that ends after it. Published any earlier, the transactions before
P that follow it would move the consumer's view back in time (briefly, until
later ones come); a consumer that decides on helper rows would decide on
state older than the chunk's. This is the point the DBLog method reaches with
watermarks, found here from the snapshot's own coordinates.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cdc.events import ChangeUnit

_SUFFIX = re.compile(r"\.(\d+)$")


def coordinate(file: str, pos: int) -> tuple[int, int]:
    """Binlog coordinates as a comparable pair: (file number, position). ('', 0) sorts first."""
    found = _SUFFIX.search(file)
    return (int(found.group(1)) if found else -1, pos)


@dataclass
class Held:
    """A snapshot chunk waiting for the stream to reach its coordinates, with what commits with it."""

    unit: ChangeUnit
    at: tuple[int, int]
    consumed: Any = None  # the signal's offsets, on the signal's last chunk only
    progress: Any = None  # an initial snapshot's progress record after this chunk (see EventDispatcher.publish)


def ends_at(unit: ChangeUnit) -> tuple[int, int]:
    """Coordinates just after a streamed transaction."""
    assert unit.checkpoint is not None, "streamed units carry their checkpoint"
    return coordinate(unit.checkpoint.file, unit.checkpoint.pos)


def place(
    held: deque[Held], batch: Sequence[ChangeUnit], reached: tuple[int, int], drained: bool
) -> tuple[list[ChangeUnit], Any]:
    """Merge held chunks into a batch of streamed units, in source order; return the merge and released offsets.

    `reached` is where the binlog reader had handed every transaction over,
    read before the batch was taken; `drained` says the batch took everything
    the reader had handed over then. A chunk is released once a streamed
    unit after it is in the batch, or once the reader is past it and every
    unit before it is in the batch. Released chunks leave `held`.
    """
    out: list[ChangeUnit] = []
    consumed: Any = None
    i = 0
    while held:
        at = held[0].at
        while i < len(batch) and ends_at(batch[i]) <= at:
            out.append(batch[i])
            i += 1
        if i < len(batch) or (drained and reached >= at):
            chunk = held.popleft()
            out.append(chunk.unit)
            consumed = chunk.consumed if chunk.consumed is not None else consumed
        else:
            break
    out.extend(batch[i:])
    return out, consumed
