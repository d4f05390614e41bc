"""What `djlink verify` tells: per link, equal or not, each entity that is not as it should be, and what to do.

Keys are written as djlink writes them everywhere (canonical JSON,
`foundation.keys`), so that a line can be pasted into a restriction.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from djlink.verify.compare import EntityFinding, Key, LinkResult, Problem, RowDiff
from foundation import keys as keycodec

DIFFERENT = 4  # the exit code when a link's destination is not what its source shares

ADVICE = {
    Problem.MISSING: "missing: shared at the source but not at the destination",
    Problem.EXTRA: "extra: at the destination but not shared",
    Problem.DIFFERENT: "different: at both, not equal",
}

WHAT_TO_DO = {
    Problem.MISSING: "to repair a missing or different entity, delete it at the destination and pull it again: "
    "`(Table() & key).delete()`, then `(Table().source & key).pull()` (a pull alone says 'already shared'); "
    "first see `djlink status` (an applier behind shows recent changes as differences: run verify again when "
    "it has caught up) and `djlink dead-letters` (a refused source transaction leaves its entities behind)",
    Problem.EXTRA: "an extra entity was never shared, or was deprecated at the source: delete it at the "
    "destination (`(Table() & key).delete()`), or pull it if it should be shared",
}


def key_text(names: Sequence[str], key: Key) -> str:
    return keycodec.encode(dict(zip(names, key, strict=True)), list(names))


def _row_lines(diff: RowDiff, names_of: Sequence[str] | None = None) -> Iterator[str]:
    def row(k: Key) -> str:
        return ", ".join(map(_plain, k))

    for k in diff.missing:
        yield f"    {diff.table}: row ({row(k)}) missing at the destination"
    for k in diff.extra:
        yield f"    {diff.table}: row ({row(k)}) extra at the destination"
    for k, columns in diff.changed:
        yield f"    {diff.table}: row ({row(k)}) changed: {', '.join(columns) or 'columns'} differ"


def _json(value: Any) -> Any:
    """A key's value as JSON holds it (bytes in base64), as `foundation.keys` writes keys."""
    return keycodec.plain({"v": value})["v"]


def _plain(value: Any) -> str:
    return str(_json(value))


def entity_lines(result: LinkResult, finding: EntityFinding) -> Iterator[str]:
    key = key_text(result.entity_key, finding.key)
    detail = f" ({finding.detail})" if finding.detail else ""
    yield f"  {finding.problem.value:<9} {key}{detail}"
    for diff in finding.rows:
        yield from _row_lines(diff)


def lines(results: Sequence[LinkResult], prefix: str) -> Iterator[str]:
    """The human report."""
    if not results:
        yield f"no links on prefix {prefix}: nothing to verify"
        return
    problems: set[Problem] = set()
    for r in results:
        counts = {p: sum(1 for f in r.entities if f.problem is p) for p in Problem}
        verdict = "equal" if r.equal else "NOT equal"
        chunks = f"{r.chunks} chunk{'s' if r.chunks != 1 else ''}"
        yield (
            f"{r.link_id}: {verdict}: {r.compared} entities compared in {chunks}; "
            + ", ".join(f"{n} {p.value}" for p, n in counts.items())
            + f", {len(r.objects)} objects wrong, {r.in_flight} in flight"
        )
        for problem in r.schema:
            yield f"  schema    {problem}"
        for f in r.entities:
            problems.add(f.problem)
            yield from entity_lines(r, f)
        for o in r.objects:
            yield f"  object    store '{o.store}', {uuid.UUID(bytes=o.hash)}: {o.problem}"
        if r.in_flight:
            shown = ", ".join(key_text(r.entity_key, k) for k in r.in_flight_keys)
            more = f" and {r.in_flight - len(r.in_flight_keys)} more" if r.in_flight > len(r.in_flight_keys) else ""
            yield (
                f"  in flight (a pull or delete not finished, not compared; run verify again once it is): {shown}{more}"
            )
        for note in r.notes:
            yield f"  note      {note}"
    if problems or any(r.objects for r in results):
        yield from (f"{ADVICE[p]}" for p in Problem if p in problems)
        if problems & {Problem.MISSING, Problem.DIFFERENT} or any(r.objects for r in results):
            yield WHAT_TO_DO[Problem.MISSING]
        if Problem.EXTRA in problems:
            yield WHAT_TO_DO[Problem.EXTRA]
    if any(r.schema for r in results):
        yield "schema: a destination table whose columns are not the source's cannot hold its rows as they are"


def _diff_json(diff: RowDiff) -> dict[str, Any]:
    def rows(keys: Sequence[Key]) -> list[list[Any]]:
        return [[_json(v) for v in k] for k in keys]

    return {
        "table": diff.table,
        "missing": rows(diff.missing),
        "extra": rows(diff.extra),
        "changed": [{"row": rows([k])[0], "columns": list(c)} for k, c in diff.changed],
    }


def as_json(results: Sequence[LinkResult]) -> dict[str, Any]:
    """One object for scripts: `equal` overall, and per link everything the human report says."""
    return {
        "equal": all(r.equal for r in results),
        "links": [
            {
                "link_id": r.link_id,
                "equal": r.equal,
                "compared": r.compared,
                "chunks": r.chunks,
                "entities": [
                    {
                        "key": key_text(r.entity_key, f.key),
                        "problem": f.problem.value,
                        "detail": f.detail,
                        "rows": [_diff_json(d) for d in f.rows],
                    }
                    for f in r.entities
                ],
                "objects": [
                    {"store": o.store, "hash": str(uuid.UUID(bytes=o.hash)), "problem": o.problem} for o in r.objects
                ],
                "schema": r.schema,
                "in_flight": r.in_flight,
                "in_flight_keys": [key_text(r.entity_key, k) for k in r.in_flight_keys],
                "notes": r.notes,
            }
            for r in results
        ],
    }


def exit_code(results: Sequence[LinkResult]) -> int:
    return 0 if all(r.equal for r in results) else DIFFERENT
