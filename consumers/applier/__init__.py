"""The applier: writes pulled and mirrored entities into the destination server, one unit at a time, exactly once.

It consumes the change topics of every link and the transaction topic
(`read_committed`), gathers each unit's events until its END says it is
complete, plans what the unit does against the entity states, writes it in
ONE destination transaction together with the offsets that complete it, then
acknowledges processed entities to the source agent. Modules, in the order a
unit meets them (docs/architecture.md walks a pull and a mirrored update):

- `gathering`: units from their events and END; the offsets a restart resumes at (`safe_offsets`, `read_past`);
- `routing`: which link a topic's events belong to, and as what (data, helper, external table);
- `objects`: external objects copied and verified before planning; failures per entity;
- `planning`: pure: a unit, the link, entity states, presence and staged objects in, a plan out;
- `writes`: the plan's SQL at the destination;
- `state_store`: offsets, applied units, entity states, source positions, tracked objects and outboxes, in the
  destination database;
- `delivery`: dead letters confirmed before offsets pass them; the outbox of acks and flags;
- `loop`: the Applier: reading, ordering, batching, the exactly-once commit, giving up (dead letters).

Dead letters. A message that cannot be decoded goes to `<prefix>.dead-letter`
on its own (stage 'decode'); a unit whose rows do not convert, or that the
destination refuses, is rolled back, each of its events goes there with the
reason (stage 'apply'), the unit is recorded as finished ('dead-letter') with
its offsets, and the applier goes on; so do events whose END never comes
(stage 'gather'). Lost connections, deadlocks and lock timeouts are not the
unit's fault: the applier reconnects and retries. An error in the applier's
own logic is not the data's fault either: it stops the applier, loudly.
"""

from consumers.applier.loop import Applier

__all__ = ["Applier"]
