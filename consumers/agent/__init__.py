"""The source agent, on the source site: the only writer of datajoint-link's helper tables.

It consumes commands (link registrations and pull and delete requests) from
the destination site and acknowledgements from the applier, moves each
entity through datajoint-link's states in the helper table, publishes links,
asks the capture for snapshot reads of the entities to process, and answers
each request on the replies topic. One module per job:

- `loop`: `SourceAgent`, the run loop (a Kafka transaction per message) and the dispatch;
- `registration`: registering a link (what is refused, what is made, who is told);
- `requests`: pull and delete requests, and the applier's acknowledgements;
- `helper_table`: the helper-table gateway, the one place for helper-table SQL;
- `auto_pull`: new master rows pulled unasked when their link's policy approves them;
- `outgoing`: the replies, signals, links and dead letters the agent produces;
- `errors`: `Refused`, a request the source site does not allow.
"""

from consumers.agent.loop import SourceAgent

__all__ = ["SourceAgent"]
