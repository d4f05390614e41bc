"""The consumers under faults: kill -9 the agent and the applier at random moments while pulls, deletes,
flags and a steady source write load go on; afterwards everything is where the integrity model says."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections import Counter
from typing import Any

import schemas
from foundation import keys as keycodec
from foundation.config import Settings
from foundation.kafka import read_to_end
from foundation.topics import Topics
from tests.conftest import Site, admin, record_fault, scalar, wait_for
from tests.integration.test_applier import ask, linked_recordings
from tests.integration.test_pull import rows
from tests.integration.test_verify import equal_and_clean


class MirrorLoad(threading.Thread):
    """Updates master and part rows of random entities, shared or not, in small transactions (bounded)."""

    def __init__(self, site: Site, n: int, limit: int = 4000, seed: int = 11) -> None:
        super().__init__(daemon=True)
        self.site, self.n, self.limit, self.seed = site, n, limit, seed
        self.stop = threading.Event()
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            rng = random.Random(self.seed)
            conn = admin(self.site.env, "SOURCE")
            s = self.site.source_schema
            with conn.cursor() as cur:
                while not self.stop.is_set() and self.transactions < self.limit:
                    i = rng.randint(1, self.n)
                    cur.execute(
                        f"UPDATE `{s}`.recording SET subject=%s WHERE recording_id=%s",
                        (f"w{self.seed}.{self.transactions}", i),
                    )
                    cur.execute(
                        f"UPDATE `{s}`.recording__channel SET gain=%s WHERE recording_id=%s AND channel=%s",
                        (self.transactions / 7, i, rng.randint(0, 1)),
                    )
                    conn.commit()
                    self.transactions += 1
            conn.close()
        except BaseException as exc:
            self.error = exc


def test_agent_and_applier_killed_at_random_moments_under_load_leave_every_entity_in_its_end_state(
    site: Site, state_db: str
) -> None:
    n, per_pull = 240, 20
    site.start("capture", DJLINK_SNAPSHOT_CHUNK_SIZE="2")  # many units: many moments to be killed in
    agent = site.start("agent")
    applier = site.start("applier", DJLINK_APPLIER_STATE_DB=state_db)
    linked = linked_recordings(site, n)
    spec, requests = linked.spec, linked.requests
    src, dest = admin(site.env, "SOURCE"), admin(site.env, "DEST")
    h = f"`{site.helper_schema}`.outbound"
    here = f"SELECT COUNT(*) FROM `{site.dest_schema}`.recording"
    settled = f"SELECT COUNT(*) FROM {h} WHERE process='NONE'"
    seed = int(os.environ.get("DJLINK_TEST_SEED") or random.randrange(1 << 30))  # to replay a failure
    rng = random.Random(seed)
    load = MirrorLoad(site, n)
    load.start()
    kills: Counter[str] = Counter()
    mid_flight: Counter[str] = Counter()
    deleted: set[int] = set()
    deprecated: set[int] = set()

    last_kill = time.monotonic()

    def kill(name: str, proc: Any, busy: bool) -> Any:
        nonlocal last_kill
        last_kill = time.monotonic()
        proc.kill()
        proc.wait(10)
        kills[name] += 1
        mid_flight[name] += busy
        return site.start(name, DJLINK_APPLIER_STATE_DB=state_db) if name == "applier" else site.start(name)

    try:
        for start in range(1, n + 1, per_pull):
            ids = list(range(start, start + per_pull))
            ask(requests, "PULL", spec, ids)
            pulled = start + per_pull - 1
            # The applier: at once (its units on their way), or once the destination has grown by a random
            # amount (it applies many units per transaction, so often the whole pull at once).
            total = pulled - len(deleted) - len(deprecated)
            have = scalar(dest, here)
            if rng.random() < 0.5:
                target = min(total, have + rng.randint(1, max(1, total - have - 1)))
                wait_for(lambda t=target: scalar(dest, here) >= t, 90, f"{target} entities here", interval=0.001)
            applier = kill("applier", applier, scalar(dest, here) < total)
            # The agent, once it has settled a random part of the pull's acknowledgements.
            total = pulled - len(deleted)
            have = scalar(src, settled)
            target = min(total, have + rng.randint(1, max(1, total - have - 1)))
            wait_for(lambda t=target: scalar(src, settled) >= t, 90, f"{target} settled", interval=0.001)
            agent = kill("agent", agent, scalar(src, settled) < total)
            if start > 1:  # from the previous pull: delete one entity, flag and delete another (-> Deprecated)
                gone, flagged = start - per_pull, start - per_pull + 1
                with src.cursor() as cur:
                    cur.execute(f"UPDATE {h} SET is_flagged='TRUE' WHERE recording_id=%s", (flagged,))
                src.commit()
                ask(requests, "DELETE", spec, [gone, flagged])
                deleted.add(gone)
                deprecated.add(flagged)
    finally:
        load.stop.set()
        load.join(30)
        print(f"\nseed {seed}: kills {dict(kills)}, mid-flight {dict(mid_flight)}", file=sys.stderr)
        print(f"source transactions under load: {load.transactions}", file=sys.stderr)
    assert load.error is None
    assert kills["agent"] >= 10 and kills["applier"] >= 10

    # Every entity reaches its end state: Shared, or Unshared (deleted), or Deprecated (flagged, deleted).
    shared = set(range(1, n + 1)) - deleted - deprecated

    def helper_rows() -> dict[int, tuple[str, str, str]]:
        with src.cursor() as cur:
            cur.execute(f"SELECT recording_id, process, is_flagged, is_deprecated FROM {h}")
            return {r[0]: tuple(r[1:]) for r in cur.fetchall()}

    expected_helpers = {i: ("NONE", "FALSE", "FALSE") for i in shared} | {
        i: ("NONE", "TRUE", "TRUE") for i in deprecated
    }
    wait_for(lambda: (src.commit(), helper_rows())[1] == expected_helpers, 120, "every helper row in its end state")

    # The destination holds exactly the shared entities, byte-identical to the source after the load
    # (mirrored through the kills), each once (primary keys), nothing dead-lettered.
    def same() -> bool:
        dest.commit()
        for table, order in (("recording", "recording_id"), ("recording__channel", "recording_id, channel")):
            source = [r for r in rows(site, "SOURCE", site.source_schema, table, order) if r[0] in shared]
            if rows(site, "DEST", site.dest_schema, table, order) != source:
                return False
        return True

    wait_for(same, 120, "the destination to equal the source's shared entities")
    report = equal_and_clean(site)
    record_fault("kill -9 of the agent or the applier, at random moments, under load", sum(kills.values()),
                 time.monotonic() - last_kill, report)  # fmt: skip
    topics = Topics(site.topic_prefix)
    settings = Settings.from_env(site.pipeline_env())
    assert read_to_end(settings, topics.dead_letter) == []

    # Nothing was asked twice: every entity in exactly one snapshot signal of a pull, and one of a delete.
    codec = schemas.Codec()
    asked: Counter[tuple[str, int]] = Counter()
    for msg in read_to_end(settings, topics.signals):
        signal = codec.decode(msg.value())
        kind = "pull" if len(signal["keys"]) == per_pull else "delete"
        asked.update((kind, keycodec.decode(k)["recording_id"]) for k in signal["keys"])
    assert {k: v for k, v in asked.items() if v != 1} == {}
    assert {i for kind, i in asked if kind == "delete"} == deleted | deprecated
    src.close()
    dest.close()
