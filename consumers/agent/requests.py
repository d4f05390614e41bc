"""Pull and delete requests, and the applier's acknowledgements: the helper-table half of datajoint-link's states.

A request moves each entity's helper row as datajoint-link would (the
decision is `consumers.integrity.decide_pull` / `decide_delete`, the SQL is
the gateway's, `consumers.agent.helper_table`), answers ACCEPTED, then has
the entities processed: a snapshot read of their rows AND helper rows in one
consistent read, on which the applier acts (`consumers.integrity.decide_process`)
before it acknowledges. An acknowledgement finishes what the applier did
(`ACK_RULES`) and answers PROGRESS.

The helper table is written and committed (in parts: `pull_or_delete`)
before anything is produced; the replies and signals commit with the Kafka
transaction of the message, so a crash in between makes the agent handle the message again, which finds the
helper rows moved and does nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pymysql

from consumers.agent import metrics
from consumers.agent.errors import Refused
from consumers.agent.helper_table import HelperTable
from consumers.agent.outgoing import Outgoing
from consumers.integrity import Acked, Action, Decision, HelperRow, decide_delete, decide_pull
from foundation import keys as keycodec
from foundation.dberrors import describe, is_transient
from foundation.keys import KeyReason
from foundation.links import LinkSpec

# What the requester is told to wait for: entities that will be processed and acknowledged.
AWAITED = (Action.ACTIVATE, Action.PROCESS, Action.REPULL, Action.MARK_DELETE)


def pull_or_delete(
    db: pymysql.connections.Connection[Any],
    out: Outgoing,
    link: LinkSpec,
    request_id: str,
    kind: str,
    key_texts: Sequence[str],
    columns: Mapping[str, str],
    per_transaction: int,
) -> None:
    """A pull (`kind` PULL) or a delete (DELETE): move each entity's helper row, reply, then have them processed.

    `columns` are the primary key's (name -> data type): a request naming anything but keys of the table, or
    more than MAX_REQUEST_KEYS of them, is Refused whole, before anything is read or written.

    The helper rows are moved in source transactions of at most `per_transaction` entities
    (DJLINK_AGENT_KEYS_PER_TRANSACTION), so that no unit the capture publishes, and the applier holds whole,
    grows with the request: 100,000 helper rows in one transaction were the applier's peak memory in a large
    pull (bench/README.md, memory.py). A failure in the first part refuses the request, nothing done; in a
    later part, it refuses that part's entities, each with the reason, and the other parts go on.
    """
    pk = list(link.primary_key)
    if len(key_texts) > keycodec.MAX_REQUEST_KEYS:
        raise Refused(
            f"the request names {len(key_texts):,} entities, more than the {keycodec.MAX_REQUEST_KEYS:,} one "
            "request may (the façade sends larger pulls and deletes in parts); nothing was done"
        )
    try:
        key_texts = list(dict.fromkeys(keycodec.encode(keycodec.parse(k, columns), pk) for k in key_texts))
    except keycodec.BadKey as exc:
        raise Refused(f"{exc}, for {link.source_db}.{link.source_table}; nothing was done") from None
    table = HelperTable(db, link)
    decide = decide_pull if kind == "PULL" else decide_delete
    moves: dict[Action, list[str]] = {action: [] for action in Action}
    refused: list[KeyReason] = []
    for start in range(0, len(key_texts), per_transaction):
        part = key_texts[start : start + per_transaction]
        try:
            part_moves, part_refused = _move(db, link, table, decide, part)
        except (Refused, pymysql.err.MySQLError) as exc:
            if start == 0 or (isinstance(exc, pymysql.err.MySQLError) and is_transient(exc)):
                raise  # nothing committed yet: refused whole; or the connection's fault: handled again whole
            db.rollback()
            why = str(exc) if isinstance(exc, Refused) else f"the source server refused it: {describe(exc)}"
            refused += [KeyReason(k, f"{why}; not done") for k in part]
            continue
        for action, keys in part_moves.items():
            moves[action] += keys
        refused += part_refused
    metrics.ACTIVATIONS.inc(len(moves[Action.ACTIVATE]))
    if refused:
        metrics.REFUSALS.labels("entity").inc(len(refused))
    waited = [k for action in AWAITED for k in moves[action]]
    done = moves[Action.DONE]
    refused_records = [r.to_avro() for r in refused]
    out.reply(request_id, "ACCEPTED", activated=len(waited), skipped=len(done), refused=refused_records, done=done)
    to_read = waited + moves[Action.REFUSE_AND_PROCESS]
    if to_read:
        out.signal(link, to_read, request_id)


def _move(
    db: pymysql.connections.Connection[Any],
    link: LinkSpec,
    table: HelperTable,
    decide: Callable[[HelperRow | None], Decision],
    key_texts: Sequence[str],
) -> tuple[dict[Action, list[str]], list[KeyReason]]:
    """Decide and move the helper rows of some of a request's entities, in one source transaction, committed:
    the entities by what was done to them, and those refused."""
    helpers = table.rows(key_texts)
    part: dict[Action, list[str]] = {action: [] for action in Action}
    turned_down: list[KeyReason] = []
    for k in key_texts:
        decision = decide(helpers.get(k))
        part[decision.action].append(k)
        if decision.action.refused:
            turned_down.append(KeyReason(k, decision.reason))
    if part[Action.ACTIVATE]:
        # Only rows still at the source: one deleted since it was chosen (by a restriction, or by an
        # auto-pull policy reading its insert) is refused alone, not the whole request with it.
        present = table.at_source(part[Action.ACTIVATE])
        for k in part[Action.ACTIVATE]:
            if k not in present:
                turned_down.append(
                    KeyReason(k, f"not in {link.source_db}.{link.source_table} (deleted since it was chosen?)")
                )
        part[Action.ACTIVATE] = [k for k in part[Action.ACTIVATE] if k in present]
    table.activate(part[Action.ACTIVATE])
    for action in (Action.REPULL, Action.MARK_DELETE):
        if part[action]:
            # Every entity moved by one action has the same process afterwards (PULL or DELETE).
            after = action.helper_after(helpers[part[action][0]])
            assert after is not None
            table.set_process(part[action], after.process)
    db.commit()
    return part, turned_down


def acknowledge(db: pymysql.connections.Connection[Any], out: Outgoing, link: LinkSpec, ack: dict[str, Any]) -> None:
    """Finish what the applier did, each step only from the state it expects (so a repeated ack is harmless).

    Pulled or kept: PULL -> NONE (Shared, or Tainted when flagged).
    Flagged before arriving: PULL -> NONE, deprecated (Deprecated).
    Deleted at the destination: DELETE -> helper row gone (Unshared), or,
    flagged, -> NONE, deprecated (Deprecated).
    One that names its request is answered PROGRESS, to that request's requester.
    """
    table = HelperTable(db, link)
    for acked in Acked:  # in the order of ACK_RULES: a rule's result never satisfies a later one's guard
        table.acknowledge(acked, ack.get(acked.value) or [])
    db.commit()
    if ack["request_id"]:
        deprecated = ack.get("deprecate") or []
        refused = [KeyReason(k, "flagged at the source; now deprecated").to_avro() for k in deprecated]
        refused += ack.get("skipped") or []
        done = [*ack["keys"], *(ack.get("deleted") or [])]
        failed = ack.get("failed") or []
        out.reply(ack["request_id"], "PROGRESS", done=done, refused=refused, failed=failed, rows=ack.get("rows", 0))
