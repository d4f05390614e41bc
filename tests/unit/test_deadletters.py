"""The dead-letter report (djlink.deadletters), from records as the applier writes them; no services."""

from __future__ import annotations

import base64
import json
from typing import Any

from djlink.deadletters import as_json, report, summarize


def record(topic: str, offset: int, stage: str, reason: str, unit_id: str | None, ts_ms: int) -> dict[str, Any]:
    return {
        "topic": topic,
        "partition": 0,
        "offset": offset,
        "key": b"k",
        "value": None if unit_id is None else b"\xc3\x01v",
        "reason": reason,
        "stage": stage,
        "unit_id": unit_id,
        "ts_ms": ts_ms,
    }


def test_one_line_per_unit_and_per_undecodable_message_oldest_first_repeats_counted_once() -> None:
    refused = "(1146) Table 'lab.recording__channel' doesn't exist"
    records = [
        record("p.lab.recording", 7, "apply", refused, "0-1-42", 1_800_000_000_500),
        record("p.lab.recording__channel", 3, "apply", refused, "0-1-42", 1_800_000_000_501),
        record("p.lab.recording__channel", 4, "apply", refused, "0-1-42", 1_800_000_000_502),
        record("p.lab.recording__channel", 4, "apply", refused, "0-1-42", 1_800_000_000_900),  # repeated by a crash
        record("p.lab.recording", 2, "decode", "not an Avro single-object encoded value", None, 1_800_000_000_000),
        record("p.lab.recording", 5, "decode", "unknown schema fingerprint", None, 1_800_000_000_100),
    ]
    lines = list(report(summarize(records), "p.dead-letter"))
    assert lines == [
        "3 dead-lettered unit(s) or message(s) on p.dead-letter:",
        "2027-01-15T08:00:00+00:00  decode  p.lab.recording[0]@2: not an Avro single-object encoded value",
        "2027-01-15T08:00:00+00:00  decode  p.lab.recording[0]@5: unknown schema fingerprint",
        "2027-01-15T08:00:00+00:00  apply   transaction 0-1-42 "
        f"(3 events: p.lab.recording 1, p.lab.recording__channel 2): {refused}",
        lines[4],
        lines[5],
    ]
    assert lines[4].startswith("decode: not a readable djlink event")
    assert lines[5].startswith("transaction: a source transaction; the changes it carried for shared entities")
    snapshot = record("p.lab.recording", 9, "gather", "no END", "snap-7f3a:2", 1_800_000_001_000)
    assert list(report(summarize([snapshot]), "p.dead-letter"))[1:] == [
        "2027-01-15T08:00:01+00:00  gather  snapshot snap-7f3a:2 (1 event: p.lab.recording 1): no END",
        "snapshot: the read of a pull or delete; its entities stayed as they were; once the cause in the reason "
        "is fixed, pull (or delete) them again",
    ]
    assert list(report([], "p.dead-letter")) == ["no dead letters on p.dead-letter"]


def test_json_lines_carry_the_original_bytes() -> None:
    r = record("p.lab.recording", 7, "apply", "why", "0-1-42", 1)
    line = json.loads(as_json(r))
    assert base64.b64decode(line["value"]) == b"\xc3\x01v" and base64.b64decode(line["key"]) == b"k"
    assert {k: v for k, v in line.items() if k not in ("key", "value")} == {
        k: v for k, v in r.items() if k not in ("key", "value")
    }
    assert json.loads(as_json(record("t", 1, "decode", "why", None, 1)))["value"] is None
