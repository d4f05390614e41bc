"""MariaDB GTIDs (`domain-server-seq`) and GTID positions (one GTID per replication domain).

A source transaction's unit id is its GTID; a snapshot unit's id is
`snapshot:<uuid>`. Everything that tells the two apart, or orders source
transactions within a domain, parses them here.
"""

from __future__ import annotations

from typing import NamedTuple


class Gtid(NamedTuple):
    """One MariaDB GTID: replication domain, originating server id, sequence number."""

    domain: int
    server: int
    seq_no: int

    def __str__(self) -> str:
        return f"{self.domain}-{self.server}-{self.seq_no}"


def parse_gtid(text: str) -> Gtid | None:
    """The GTID `text` names (`0-1-100`); None when it is not one (a snapshot unit's id, say)."""
    parts = text.split("-")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return Gtid(int(parts[0]), int(parts[1]), int(parts[2]))


def parse_position(position: str) -> dict[int, str]:
    """'0-1-100,1-2-5' -> {0: '0-1-100', 1: '1-2-5'}: MariaDB keeps one GTID per replication domain."""
    result: dict[int, str] = {}
    for gtid in filter(None, (g.strip() for g in position.split(","))):
        result[int(gtid.split("-", 1)[0])] = gtid
    return result


def format_position(gtids: dict[int, str]) -> str:
    """The GTID position of one GTID per domain, domains in order (what `@slave_connect_state` takes)."""
    return ",".join(gtids[d] for d in sorted(gtids))
