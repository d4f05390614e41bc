"""Where a pull's time went: its topics' messages on one clock, from the Kafka timestamps they carry.

    python -m bench.pull --entities 5000 --keep      # prints the prefix it kept: bench-pull-<tag>
    python -m bench.timeline bench-pull-<tag>        # per topic: messages, first and last, from the PULL
    python -m bench.timeline bench-pull-<tag> --steps   # and each snapshot chunk's END, ack and reply in turn

Every message carries the time its producer made it (CreateTime). Read with
`read_committed`, every topic of a pipeline's prefix gives, relative to the
last command (the PULL): when the agent signalled the capture, when each
chunk's END was published, when the applier acknowledged it, when the agent
replied PROGRESS. Gaps between them show which stage the others waited for.
Figures, never assertions; reads only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.common import services_env
from foundation.config import Settings
from foundation.kafka import admin_client, consumer

STEPS = ("signals", "transaction", "acks", "replies")


def read_all(c: Consumer, topic: str, partitions: list[int]) -> list[Any]:
    """Every committed message of the topic's partitions, from the beginning."""
    out: list[Any] = []
    for partition in partitions:
        low, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        if high <= low:
            continue
        c.assign([TopicPartition(topic, partition, low)])
        while True:
            msgs = c.consume(10_000, 1.5)
            out.extend(m for m in msgs if m.error() is None)
            if not msgs or (msgs[-1].offset() or 0) >= high - 1:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="the pipeline's topic prefix (bench.pull --keep prints it)")
    parser.add_argument("--steps", action="store_true", help="also list each signal, END, ack and reply in turn")
    args = parser.parse_args(argv)
    settings = Settings.from_env(services_env())
    topics = admin_client(settings).list_topics(timeout=10).topics
    ours = sorted(t for t in topics if t.startswith(args.prefix + "."))
    if not ours:
        raise SystemExit(f"no topic starts with {args.prefix}. (kept with --keep?)")
    c = consumer(settings, f"{args.prefix}-timeline")
    messages = {t: read_all(c, t, sorted(topics[t].partitions)) for t in ours}
    c.close()
    commands = messages.get(f"{args.prefix}.commands") or []
    if not commands:
        raise SystemExit(f"{args.prefix}.commands is empty: no pull to time")
    t0 = commands[-1].timestamp()[1]
    print(f"{'topic':58s} {'messages':>9s} {'first':>8s} {'last':>8s}   (s from the last command)")
    for topic, msgs in sorted(messages.items(), key=lambda kv: min((m.timestamp()[1] for m in kv[1]), default=0)):
        if msgs:
            stamps = [m.timestamp()[1] for m in msgs]
            name = topic[len(args.prefix) + 1 :]
            print(f"{name:58s} {len(msgs):9d} {(min(stamps) - t0) / 1000:8.2f} {(max(stamps) - t0) / 1000:8.2f}")
    if args.steps:
        steps = [
            (m.timestamp()[1], step, len(m.value() or b""))
            for step in STEPS
            for m in messages.get(f"{args.prefix}.{step}", [])
        ]
        print("\n  s from PULL  topic        bytes")
        for ts, step, size in sorted(steps):
            print(f"  {(ts - t0) / 1000:11.3f}  {step:12s} {size:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
