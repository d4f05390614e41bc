"""What the source agent reports about itself, as Prometheus metrics (served on DJLINK_METRICS_PORT when set)."""

from __future__ import annotations

from prometheus_client import Counter

COMMANDS = Counter("djlink_agent_commands", "Commands handled, by kind (REGISTER, PULL, DELETE)", ["kind"])
ACTIVATIONS = Counter("djlink_agent_activations", "Entities activated: helper rows inserted for a pull")
ACKS = Counter("djlink_agent_acks", "Acknowledgements from the applier applied to helper rows")
REFUSALS = Counter("djlink_agent_refusals", "Refused, by what: whole requests, or entities of a request", ["what"])
AUTO_PULLS = Counter("djlink_agent_auto_pulls", "New source rows an auto-pull policy approved")
SOURCE_WAITS = Counter(
    "djlink_agent_source_waits", "Times a message was put back because the source server was unreachable"
)
