"""Row changes and the units they travel in, before they become Kafka records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cdc.offsets import Checkpoint
from schemas.tables import TableShape


@dataclass(frozen=True)
class Position:
    """Where in the source's history a change was read."""

    file: str
    pos: int
    gtid: str | None
    ts_ms: int
    server_id: int


@dataclass(slots=True)  # not frozen: one per row on the hot path, and frozen __init__ is slower
class RowChange:
    db: str
    table: str
    op: str  # c, u, d, r
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    row: int = 0  # index within its binlog event
    binlog_shape: TableShape | None = None  # the shape the binlog event describes (streamed changes only)


@dataclass
class ChangeUnit:
    """One source transaction, or one snapshot chunk: what the applier applies atomically."""

    id: str
    position: Position
    snapshot: bool
    changes: list[RowChange] = field(default_factory=list)
    request_id: str | None = None
    link_id: str | None = None
    checkpoint: Checkpoint | None = None  # where to resume after this unit (streamed units only)


@dataclass(frozen=True)
class PositionMarker:
    """The binlog advanced over transactions of no captured table: worth a checkpoint now and then."""

    checkpoint: Checkpoint
