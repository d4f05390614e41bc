"""The applier's loop: read, gather, plan, commit exactly once, acknowledge.

One applier per deployment (a lock in the destination server says so,
`destination.Destination.fence`). In every round it takes what Kafka has
(`reading`, into `gathering`), applies the units that are complete in the
order the capture produced them, many per destination transaction
(`batches`, `planning`, `writes`), then sends what it owes (acks, flags,
dead letters: `delivery`) and stores progress.

Exactly once: a batch's rows, the units' claims (`applied_units`), entity
states, source positions, tracked objects, acks and flag changes (the
outboxes) and the offsets that complete them are written in ONE destination
transaction (`_commit`). A COMMIT whose answer is lost is retried and finds
its units claimed; a unit read again is refused by its claim (snapshot) or
its source position (source transaction).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import schemas
from consumers.applier import metrics, writes
from consumers.applier.batches import BatchPlanner, prepare_all
from consumers.applier.delivery import DeadLetters, Outbox, flag_value
from consumers.applier.destination import Destination
from consumers.applier.entity_states import EntityStates
from consumers.applier.gathering import Gathering, Partition, PendingUnit, changed
from consumers.applier.objects import Objects
from consumers.applier.planning import Plan, Prepared
from consumers.applier.reading import KnownSchemas, Reader
from consumers.applier.state_store import PRUNE_EVERY_S, Finished, StateStore
from consumers.applier.writes import Unappliable
from consumers.integrity import EntityKey, EntityState
from foundation.config import Settings
from foundation.dberrors import describe
from foundation.gtid import parse_gtid
from foundation.heap import Trimmer
from foundation.kafka import consumer, now_ms, producer, schema_registry
from foundation.links import LinkRegistry, LinkSpec
from foundation.stores import Stores
from foundation.topics import Admin, SchemaTopic, Topics

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0  # store offsets that moved without applying anything at most this often
# Events whose END has not come although an END produced this much later has: their END is lost (strays).
ORPHAN_AFTER_MS = 30_000
WAITING_WARN_S = 5.0  # warn when the next unit in order has been incomplete this long
MAX_BATCH_EVENTS = 20_000  # events per destination transaction, at most (a unit is never split)
MAX_BATCH_BYTES = 16 * 1024 * 1024  # and bytes of their values (64: four 1 MiB-blob chunks at once)
# Gathered but not applicable yet (a unit waits for its last events, every later one waits for it): past
# DJLINK_APPLIER_HELD_MB, only the topics that unit still needs are read, so memory does not grow with what is
# ahead of it. An event counts its value's bytes twice (the message's, kept for the dead-letter topic, and the
# decoded row's strings and blobs) and EVENT_OVERHEAD for its decoded objects (small rows' weigh more).
EVENT_OVERHEAD = 2560


def held_bytes(events: int, value_bytes: int) -> int:
    """About how much memory `events` gathered events with `value_bytes` of message values take."""
    return 2 * value_bytes + EVENT_OVERHEAD * events


class Applier:
    """The destination site's role: `run` until told to stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.group = self.topics.applier_group
        self._schema_topic = SchemaTopic(settings, self.topics)
        self._schemas = KnownSchemas(self._schema_topic)
        self._codec = self._schemas.codec = schemas.Codec(self._schemas.resolve, registry=schema_registry(settings))
        self._store = StateStore(settings.applier_state_db, self.group)
        self._objects = Objects(
            Stores(settings.source_stores, "DJLINK_SOURCE_STORES"),
            Stores(settings.destination_stores, "DJLINK_DEST_STORES"),
        )
        self._destination = Destination(settings.destination, threading.Event())
        self._planner = BatchPlanner(self._destination, self._store, self._objects)
        self._gathering = Gathering()
        self._acks: Outbox[str] = Outbox("acks", self._acks_sent)
        self._flags: Outbox[EntityKey] = Outbox("flag changes", self._flags_sent)
        self._states = EntityStates()
        self._positions: dict[int, int] = {}  # replication domain -> seq no of the last source transaction applied
        self._waiting_for: tuple[str, float, bool] | None = None  # unit id, since, warned
        self._stored: dict[Partition, int] = {}
        self._last_progress = 0.0
        self._next_prune = 0.0
        self.units_applied = 0
        self.units_skipped = 0
        self.units_mirrored = 0
        self.units_dead_lettered = 0
        self._checked: set[LinkSpec] = set()
        self._trim = Trimmer()

    @property
    def objects_copied(self) -> int:
        return self._objects.copied

    def _acks_sent(self, unit_ids: list[str]) -> None:
        self._destination.transact(partial(self._store.acks_sent, unit_ids=unit_ids))

    def _flags_sent(self, entities: list[EntityKey]) -> None:
        self._destination.transact(partial(self._store.flags_sent, entities=entities))

    def _check_grants(self, links: dict[str, LinkSpec]) -> None:
        """Its privileges on each link's destination tables (and its own), before a unit would need them."""
        unchecked = [spec for spec in links.values() if spec not in self._checked]
        if unchecked:
            self._destination.check_grants(unchecked, ())
            self._checked.update(unchecked)

    # -- the loop ----------------------------------------------------------------

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        Admin(s).ensure_control(self.topics)
        registry = LinkRegistry(s, self.topics)
        registry.catch_up()
        self._destination = Destination(s.destination, stop)
        self._planner = BatchPlanner(self._destination, self._store, self._objects)
        self._destination.connect()
        self._destination.fence(f"djlink-applier:{self.group}", self.topics.prefix)
        self._destination.check_grants(registry.links.values(), self._store.tables)  # its own tables' too
        self._checked.update(registry.links.values())
        self._destination.transact(self._store.ensure)
        self._p = producer(s)
        self._schema_topic.publish_fixed(self._p)
        self._dead_letters = DeadLetters(self._p, self.topics.dead_letter, self._codec)
        unsent_acks = self._destination.transact(self._store.unsent_acks)
        for unit_id, link_id, ack in unsent_acks:
            self._acks.put(unit_id, self.topics.acks, link_id, ack)
        if unsent_acks:
            log.info("resending the acks of %d units committed before the last stop", len(unsent_acks))
        unsent_flags = self._destination.transact(self._store.load_flag_pending)
        self._positions = self._destination.transact(self._store.load_positions)
        for key, state in unsent_flags.items():
            self._owe_flag(key, state, 0)
        self._acks.send(self._p)
        self._flags.send(self._p)
        self._stored = self._destination.transact(self._store.load_offsets)
        self._reader = Reader(consumer(s, self.group), self.topics, self._codec, self._gathering, self._dead_letters)
        self._reader.follow(registry.links, self._stored)
        if on_ready:
            on_ready()
        clean = False
        try:
            while not stop.is_set():
                if registry.refresh(0) or self._reader.behind() or self._reader.take(registry):
                    self._check_grants(registry.links)
                    self._reader.follow(registry.links, self._stored)
                self._dead_letters.confirm()
                self._apply_complete(registry)
                self._trim()  # the batches just applied are freed now (their rows, statements and events)
                self._bound_reading()
                metrics.PENDING_UNITS.set(len(self._gathering.pending))
                if not self._gathering.pending:
                    metrics.behind(0)  # nothing waiting: not behind
                self._acks.send(self._p)
                self._flags.send(self._p)
                self._store_progress()
                self._prune()
            clean = True
        finally:
            # Only after a clean stop: leaving on an error, units taken out of the gathering may not have been
            # applied, and storing offsets past them would lose them. A restart re-reads from the last stored
            # offsets; what was applied is recognised (claims, source positions) and not applied twice.
            if clean:
                try:
                    self._dead_letters.confirm(10)
                    self._store_progress(force=True)
                except Exception as exc:
                    log.warning("could not store the final offsets: %s", describe(exc))
            self._reader.close()
            registry.close()
            self._p.flush(10)
            self._destination.close()

    # -- units -------------------------------------------------------------------

    def _reap_orphans(self) -> None:
        """Give up units whose END will not come: one produced well after their events has been read already.

        The capture commits a unit's events and its END in one Kafka
        transaction, so this happens only to strays (events copied onto a
        change topic) or units whose END was undecodable. A stray of a unit
        finished before is dropped; any other is dead-lettered.
        """
        for unit_id in self._gathering.orphans(ORPHAN_AFTER_MS):
            unit = self._gathering.finish(unit_id)
            reason = f"the END of unit {unit_id} is not on the transaction topic (a stray, or its END was lost)"
            self._give_up(unit_id, unit, None, reason, "gather")

    def _apply_complete(self, registry: LinkRegistry) -> None:
        """Apply complete units in the order they were produced, many per destination transaction.

        Order is strict: a unit whose END has come but whose events have not
        all been read yet holds back every later one (a mirrored change must
        never overtake an older one). Its events come within milliseconds;
        if they have not come once an END produced ORPHAN_AFTER_MS later has
        been read and their change topics have been read past the unit
        (`_read_past`), they never will (undecodable, dead-lettered on their
        own), and the unit is given up.
        """
        self._reap_orphans()
        tracked = self._reader.routes.tracked
        batch: list[tuple[str, PendingUnit]] = []
        rows = size = 0
        for unit_id in self._gathering.ended():
            unit = self._gathering.pending[unit_id]
            assert unit.end is not None
            if not unit.complete(tracked):
                if self._gathering.latest_end_ms - unit.end_ts_ms <= ORPHAN_AFTER_MS or not self._reader.read_past(
                    unit
                ):
                    self._note_waiting(unit_id, unit)
                    break
                self._apply_batch(batch, registry)
                batch, rows, size = [], 0, 0
                self._gathering.finish(unit_id)
                reason = f"events of unit {unit_id} are missing from their change topics (undecodable?)"
                self._give_up(unit_id, unit, unit.end["link_id"], reason, "gather")
                continue
            self._gathering.finish(unit_id)
            if unit.concerns(tracked):
                batch.append((unit_id, unit))
                rows, size = rows + len(unit.events), size + unit.size
            if len(batch) >= self.settings.applier_batch_units or rows >= MAX_BATCH_EVENTS or size >= MAX_BATCH_BYTES:
                self._apply_batch(batch, registry)
                batch, rows, size = [], 0, 0
        self._apply_batch(batch, registry)

    def _bound_reading(self) -> None:
        """While more is gathered than MAX_HELD_* allow, read only the topics the unit every later one waits for
        still needs (and the transaction topic, for ENDs); the rest stays in Kafka until that unit is applied."""
        held = held_bytes(*self._gathering.held())
        metrics.HELD_BYTES.set(held)
        if held <= self.settings.applier_held_mb * 1024 * 1024:
            self._reader.read_only(None)
            return
        routes, pending = self._reader.routes, self._gathering.pending
        topic_of = {collection: topic for topic, collection in routes.by_topic.items()}
        first = next((pending[u] for u in self._gathering.ended() if not pending[u].complete(routes.tracked)), None)
        needed = first.missing(routes.tracked) if first is not None else {}
        self._reader.read_only({self.topics.transaction, *(topic_of[c] for c in needed if c in topic_of)})

    def _note_waiting(self, unit_id: str, unit: PendingUnit) -> None:
        """Say so (once) when the unit every later one waits for has been incomplete for a while."""
        if self._waiting_for is None or self._waiting_for[0] != unit_id:
            self._waiting_for = (unit_id, time.monotonic(), False)
        elif not self._waiting_for[2] and time.monotonic() - self._waiting_for[1] > WAITING_WARN_S:
            missing = {
                c: f"{have}/{expected}" for c, (have, expected) in unit.missing(self._reader.routes.tracked).items()
            }
            log.warning("unit %s has waited %.0f s for events (have/expected: %s)", unit_id, WAITING_WARN_S, missing)
            self._waiting_for = (unit_id, self._waiting_for[1], True)

    # -- batches: plan, commit, settle -----------------------------------------------

    def _apply_batch(self, batch: list[tuple[str, PendingUnit]], registry: LinkRegistry) -> None:
        """Plan the units against the entity states, then commit them in one transaction.

        When the destination refuses the transaction, the units are committed
        one by one instead, so that only the refused one is dead-lettered;
        offsets are stored at the end then, claims and source positions keep
        a crash in between from applying a unit twice.
        """
        if not batch:
            return
        try:
            self._apply_units(batch, registry)
        finally:  # the events, and the rows and statements made of them
            self._trim.freed(held_bytes(sum(len(u.events) for _, u in batch), sum(u.size for _, u in batch)))

    def _apply_units(self, batch: list[tuple[str, PendingUnit]], registry: LinkRegistry) -> None:
        prepared = self._prepare_all(batch, registry)
        plans = self._plan_all(prepared)
        try:
            self._commit(plans, changed(self._gathering.safe_offsets(), self._stored))
            return
        except Unappliable as exc:
            if len(prepared) <= 1:
                if prepared:
                    self._settle(prepared[0], plans, exc, store_offsets=True)
                return
            log.info("a batch of %d units was refused (%s); applying them one by one", len(batch), exc)
        for one in prepared:
            plans = self._plan_all([one])
            try:
                self._commit(plans, {})
            except Unappliable as exc:
                self._settle(one, plans, exc, store_offsets=False)
        self._store_progress(force=True)

    def _prepare_all(self, batch: list[tuple[str, PendingUnit]], registry: LinkRegistry) -> list[Prepared]:
        """The units converted for planning (those that do not convert are given up); a source transaction
        applied before is skipped."""
        fresh = []
        for unit_id, unit in batch:
            if self._applied_before(unit_id):
                self.units_skipped += 1
                metrics.finished("skipped")
                log.info("source transaction %s was applied before; skipped", unit_id)
            else:
                fresh.append((unit_id, unit))
        prepared = prepare_all(fresh, partial(self._link_of, registry), self._schemas.key_columns)
        for refused in prepared.refused:
            self._give_up(refused.unit_id, refused.unit, refused.link_id, refused.reason, store_offsets=False)
        return prepared.units

    def _link_of(self, registry: LinkRegistry, link_id: str) -> LinkSpec | None:
        """The link of a processing unit; one not known yet may be on the links topic already."""
        link = self._reader.routes.links.get(link_id)
        if link is None and registry.catch_up():
            self._reader.follow(registry.links, self._stored)
            link = self._reader.routes.links.get(link_id)
        return link

    def _plan_all(self, prepared: list[Prepared], excluded: dict[EntityKey, str] | None = None) -> list[Plan]:
        """The plans of the units with something to do (see `batches.BatchPlanner`); units refused are given up."""
        plans, refused = self._planner.plan(prepared, self._reader.routes, self._states, excluded)
        for r in refused:
            self._give_up(r.unit_id, r.unit, r.link_id, r.reason, store_offsets=False)
        return plans

    def _applied_before(self, unit_id: str) -> bool:
        """Whether the unit is a source transaction at or before the last one applied of its domain (the order is
        strict: it was applied then)."""
        gtid = parse_gtid(unit_id)
        return gtid is not None and gtid.seq_no <= self._positions.get(gtid.domain, -1)

    def _settle(self, unit: Prepared, plans: list[Plan], refusal: Unappliable, store_offsets: bool) -> None:
        """A unit the destination refused. A pull's or delete's, when only some of its entities are refused, is
        applied without them (they are acknowledged as failed, with the reason, and stay as they were: pulling
        again retries them); any other is dead-lettered whole."""
        plan = plans[0] if plans else None
        if plan is not None and plan.link_id is not None and len(plan.entities) > 1:
            refused = self._refused_entities(unit, plan.entities)
            if refused and len(refused) < len(plan.entities):
                log.warning(
                    "unit %s: the destination refuses %d of its entities; applying the others",
                    unit.unit_id,
                    len(refused),
                )
                try:
                    offsets = changed(self._gathering.safe_offsets(), self._stored) if store_offsets else {}
                    self._commit(self._plan_all([unit], excluded=refused), offsets)
                    return
                except Unappliable as exc:
                    refusal = exc
        link_id = plan.link_id if plan else None
        self._give_up(unit.unit_id, unit.unit, link_id, str(refusal), store_offsets=store_offsets)

    def _refused_entities(self, unit: Prepared, entities: list[EntityKey]) -> dict[EntityKey, str]:
        """Which entities of a unit the destination refuses, each tried alone in a transaction rolled back."""
        refused: dict[EntityKey, str] = {}
        for entity in entities:
            alone = self._plan_all([unit], excluded={e: "" for e in entities if e != entity})
            reason = self._destination.transact(partial(_refusal, plans=alone), commit=False)
            if reason is not None:
                refused[entity] = f"the destination refused it: {reason}"
        return refused

    def _commit(self, plans: list[Plan], offsets: dict[Partition, int]) -> None:
        """Write the plans, their claims, entity states, source positions and `offsets` in ONE transaction."""
        if not plans and not offsets:
            return
        acks = {
            p.unit_id: self._codec.encode(schemas.FIXED["ack"], {**p.ack, "ts_ms": now_ms()}) for p in plans if p.ack
        }
        claims = [p.unit_id for p in plans if p.gtid is None]
        attempted: set[str] = set()  # units written by an earlier attempt of this call

        def work(cur: Any) -> tuple[dict[str, Finished], list[Plan]]:
            finished = self._store.finished_among(cur, claims) if claims else {}
            # Finished by an earlier attempt whose COMMIT happened but whose answer was lost: ours, and what
            # they did must still reach memory (entity states, flags, acks), though not be written again.
            ours = {u for u in finished if u in attempted}
            before = {u: f for u, f in finished.items() if u not in attempted}
            live = [p for p in plans if p.unit_id not in finished]
            attempted.update(p.unit_id for p in live)
            self._store.claim_many(cur, [(p.unit_id, p.link_id, acks.get(p.unit_id)) for p in live if p.gtid is None])
            writes.write(cur, live)
            states = {k: s for p in live for k, s in p.states.items()}
            self._store.save_entities(cur, states, [k for p in live for k in p.flags])
            self._store.save_positions(cur, {p.gtid.domain: p.unit_id for p in live if p.gtid is not None})
            self._store.save_tracked(cur, {k: row for p in live for k, row in p.tracked.items()})
            self._store.save_offsets(cur, offsets)
            return before, [p for p in plans if p.unit_id in ours or p.unit_id not in finished]  # in order

        started = time.monotonic()
        before, live = self._destination.transact(work)
        metrics.COMMIT_SECONDS.observe(time.monotonic() - started)
        metrics.BATCH_UNITS.observe(len(plans))
        self._stored.update(offsets)
        for plan in live:
            self._remember(plan, acks.get(plan.unit_id))
        for unit_id, finished in before.items():
            self.units_skipped += 1
            metrics.finished("skipped")
            log.info("unit %s was finished before (%s); skipped", unit_id, finished.outcome)
            link_id = next(p.link_id for p in plans if p.unit_id == unit_id)
            if finished.pending_ack is not None and link_id is not None:
                self._acks.put(unit_id, self.topics.acks, link_id, finished.pending_ack)

    def _remember(self, plan: Plan, ack: bytes | None) -> None:
        """What a committed plan did, in memory: entity states, source positions, and what is owed to Kafka."""
        for key, new in plan.states.items():
            self._states.remember(key, new)
        for key, source_ts in plan.flags.items():
            self._owe_flag(key, plan.states[key], source_ts)
        if plan.gtid is not None:
            domain = plan.gtid.domain
            self._positions[domain] = max(plan.gtid.seq_no, self._positions.get(domain, -1))
        if ack is not None and plan.link_id is not None:
            self._acks.put(plan.unit_id, self.topics.acks, plan.link_id, ack)
        if plan.link_id is not None:
            self.units_applied += 1
            metrics.finished("applied")
            if plan.ack is not None:
                metrics.acknowledged(plan.ack)
        else:
            self.units_mirrored += 1
            metrics.finished("mirrored")
        metrics.behind(plan.unit.end_ts_ms)

    def _owe_flag(self, key: EntityKey, state: EntityState, source_ts: int) -> None:
        """Owe the flags topic the entity's flags as they are now (`state`, committed): a record while flagged or
        deprecated, a tombstone once neither (compacted, keyed `<link id> <entity key>`)."""
        value = flag_value(self._codec, key, state, source_ts)
        self._flags.put(key, self.topics.flags, f"{key.link_id} {key.key}", value)

    def _give_up(
        self,
        unit_id: str,
        unit: PendingUnit,
        link_id: str | None,
        reason: str,
        stage: str = "apply",
        store_offsets: bool = True,
    ) -> None:
        """Dead-letter every event of a unit, then record it finished (with the offsets, unless told not to).

        A unit finished before (read again) is dropped instead: its events were applied or dead-lettered then.
        """
        outcome = self._destination.transact(partial(self._store.outcome, unit_id=unit_id))
        if outcome is None and unit.end is not None and self._applied_before(unit_id):
            # Complete, read again after a restart: applied then (the order is strict). A unit whose END never
            # came is not that: it is dead-lettered below.
            outcome = "applied: a later source transaction of its domain was"
        if outcome is not None:
            log.info("dropped %d events of unit %s, finished before (%s)", len(unit.events), unit_id, outcome)
            return
        for at, event in sorted(unit.events.items()):
            self._dead_letters.send(at, event.key, event.value, reason, stage, unit_id)
        self._dead_letters.confirm()
        offsets = changed(self._gathering.safe_offsets(), self._stored) if store_offsets else {}

        def work(cur: Any) -> None:
            self._store.claim(cur, unit_id, "dead-letter", link_id)
            self._store.save_offsets(cur, offsets)

        self._destination.transact(work)
        self._stored.update(offsets)
        self.units_dead_lettered += 1
        metrics.finished("dead_lettered")
        log.warning("unit %s of link %s: %d events dead-lettered: %s", unit_id, link_id, len(unit.events), reason)

    # -- offsets, housekeeping -------------------------------------------------

    def _store_progress(self, force: bool = False) -> None:
        """Store offsets that moved without a unit applied (at most once per PROGRESS_EVERY_S unless forced)."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_EVERY_S:
            return
        self._last_progress = now
        offsets = changed(self._gathering.safe_offsets(), self._stored)
        if offsets:
            self._dead_letters.confirm()
            self._destination.transact(partial(self._store.save_offsets, offsets=offsets))
            self._stored.update(offsets)
        self._reader.commit(self._stored)

    def _prune(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        forgotten = self._destination.transact(self._store.prune)
        if forgotten:
            log.info("forgot %d units finished more than 7 days ago", forgotten)


def _refusal(cur: Any, plans: list[Plan]) -> str | None:
    return writes.refusal(cur, plans)
