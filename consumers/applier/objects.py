"""External objects: copied from the source store to the destination store and verified, before any planning.

An in-store attribute (`blob@store`, `attach@store`, `filepath@store`) holds
the content hash of an object tracked by the source schema's
`~external_<store>` table. Before the destination transaction that writes a
row referencing objects, each object is copied and checked against the hash
DataJoint recorded (`foundation.stores.copy_object`); an entity whose object
is missing or does not match fails alone, with the reason, and nothing of it
is written. An object copied once is not copied again while the destination
store still has it (looked up at most once per batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from consumers.applier.metrics import OBJECT_BYTES, OBJECTS
from consumers.applier.state_store import TrackedKey
from consumers.integrity import EntityKey
from foundation.links import external_table
from foundation.stores import ObjectError, Store, StoreError, Stores, copy_object, holds

log = logging.getLogger(__name__)
MAX_COPIED_REMEMBERED = 100_000  # objects known copied (skipped while the destination has them)


@dataclass(frozen=True)
class ObjectRef:
    """One object a row references: its tracking row's key, and where it must go."""

    tracked: TrackedKey
    column: str
    collection: str  # 'db.table' of the row
    destination_store: str
    destination_db: str


@dataclass
class Staged:
    """What staging found: the tracking row of every object copied and verified, and the entities that failed."""

    rows: dict[ObjectRef, dict[str, Any]] = field(default_factory=dict)
    failed: dict[EntityKey, str] = field(default_factory=dict)  # entity -> 'external object: <why>'


class Objects:
    """Copies objects between the source's and the destination's stores, remembering what it copied."""

    def __init__(self, source_stores: Stores, destination_stores: Stores) -> None:
        self._source = source_stores
        self._destination = destination_stores
        # (destination store, db, hash, contents hash) of objects this process copied and verified: copied again
        # only when the destination no longer has them (cleaned up there after a delete, say).
        self._copied: set[tuple[str, str, bytes, bytes]] = set()
        self._checked: set[tuple[str, str, bytes, bytes]] = set()  # of those, found still there in this batch
        self.copied = 0  # objects copied since start

    def new_batch(self) -> None:
        """Look objects copied before up again (once) in the batch about to be planned."""
        self._checked = set()

    def stage(
        self,
        refs: Mapping[EntityKey, Sequence[ObjectRef]],
        lookup: Callable[[TrackedKey], dict[str, Any] | None],
        whole: bool = False,
    ) -> Staged:
        """Copy and verify each entity's objects, in order; an entity stops at its first failure (and with
        `whole`, for a unit that is applied whole or not at all, everything does).

        `lookup` gives an object's tracking row as captured (None: none was).
        """
        staged = Staged()
        for entity, entity_refs in refs.items():
            for ref in entity_refs:
                try:
                    staged.rows[ref] = self._stage(ref, lookup)
                except (ObjectError, StoreError) as exc:
                    staged.failed[entity] = f"external object: {exc}"
                    log.warning("entity %s of %s not applied: %s", entity.key, entity.link_id, staged.failed[entity])
                    break
            if whole and staged.failed:
                break
        return staged

    def _stage(self, ref: ObjectRef, lookup: Callable[[TrackedKey], dict[str, Any] | None]) -> dict[str, Any]:
        tracked = lookup(ref.tracked)
        if tracked is None:
            store = ref.tracked.store
            raise ObjectError(f"no `{external_table(store)}` row captured for {ref.column} of {ref.collection}")
        target = self._destination[ref.destination_store]
        done = (
            ref.destination_store,
            ref.destination_db,
            ref.tracked.digest,
            bytes(tracked.get("contents_hash") or b""),
        )
        if done not in self._copied or (done not in self._checked and not self._still_there(target, tracked, ref)):
            if len(self._copied) >= MAX_COPIED_REMEMBERED:  # a filepath rewritten again and again
                self._copied.clear()
            source = self._source[ref.tracked.store]
            size = copy_object(tracked, source, ref.tracked.source_db, target, ref.destination_db)
            self._copied.add(done)
            self.copied += 1
            OBJECTS.inc()
            OBJECT_BYTES.inc(size)
        self._checked.add(done)
        return tracked

    @staticmethod
    def _still_there(target: Store, tracked: dict[str, Any], ref: ObjectRef) -> bool:
        """Whether the destination store still has an object copied before; when it cannot say, copy again."""
        try:
            return holds(target, tracked, ref.destination_db)
        except Exception as exc:
            log.info("could not look up an object in store '%s' (%s); copying it again", target.name, exc)
            return False
