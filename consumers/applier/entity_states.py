"""The entity states a batch is planned against: read from the state store when needed, a bounded number kept.

Every entity the applier has met has a row in its state store (`entities`:
the helper row as last captured, whether the entity is here); an entity
without a row is Unshared and not here. Holding them all in memory grew with
the table, without bound. Instead, before a batch is planned, the states of
exactly the entities its units touch (`planning.entities_touched`) are taken
from those kept from recent batches, the others read in one query per 1,000
keys. At most `limit` states are kept, the least recently used dropped first;
the applier is the only writer of its state store (fenced), so a kept state
is the committed one: it is replaced after each commit (`remember`), never
before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from consumers.integrity import EntityKey, EntityState

# About 200 bytes each: a few MB kept, enough that a steady stream of changes to shared entities rarely
# needs a query, and much more than a batch touches (at most MAX_BATCH_EVENTS entities).
KEPT_STATES = 20_000


class EntityStates:
    """Committed entity states, read through a bounded cache of the most recently used."""

    def __init__(self, limit: int = KEPT_STATES) -> None:
        self._limit = limit
        self._kept: OrderedDict[EntityKey, EntityState] = OrderedDict()
        self.reads = 0  # queries of the state store, for tests and metrics

    def __len__(self) -> int:
        return len(self._kept)

    def of(
        self, keys: Iterable[EntityKey], read: Callable[[list[EntityKey]], Mapping[EntityKey, EntityState]]
    ) -> dict[EntityKey, EntityState]:
        """The state of each of `keys`: kept, or read (`read(missing)` gives those the store has)."""
        wanted = list(dict.fromkeys(keys))
        missing = [k for k in wanted if k not in self._kept]
        found = read(missing) if missing else {}
        if missing:
            self.reads += 1
        states = {k: self._kept[k] if k in self._kept else found.get(k, EntityState()) for k in wanted}
        for key, state in states.items():
            self.remember(key, state)
        return states

    def remember(self, key: EntityKey, state: EntityState) -> None:
        """The state committed for `key`, kept as the most recently used."""
        self._kept[key] = state
        self._kept.move_to_end(key)
        while len(self._kept) > self._limit:
            self._kept.popitem(last=False)
