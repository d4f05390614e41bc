"""On a three-broker Kafka cluster: replicated topics, and a broker lost mid-pull and mid-mirroring loses nothing.

The cluster is the development services of a state dir of its own
(`.djlink-cluster/`, `services up --brokers 3`: two MariaDB servers and three
KRaft nodes, each a broker and a controller voter), started for these tests
and stopped after them. A broker is killed with SIGKILL, as a host that loses
power: first the leader of the change topic's partition while a pull is
applied and the source keeps writing, then the broker that coordinates the
capture's Kafka transactions. No role is restarted; everything arrives once;
the killed broker is started again on its data and rejoins every partition's
in-sync replicas.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource

from devtools import services
from foundation.config import Settings
from foundation.kafka import admin_client
from foundation.topics import Admin, Topics
from tests.conftest import ROOT, Site, open_site, record_fault, wait_for
from tests.integration.test_faults import MirrorLoad
from tests.integration.test_operator_faults import shared_link
from tests.integration.test_verify import equal_and_clean

CLUSTER_DIR = ROOT / ".djlink-cluster"
TRANSACTION_STATE_PARTITIONS = 8  # transaction.state.log.num.partitions of devtools.services


def services_cli(*args: str) -> str:
    """`python -m devtools.services ...` on the cluster's state dir."""
    env = dict(os.environ, DJLINK_STATE_DIR=str(CLUSTER_DIR))
    argv = [sys.executable, "-m", "devtools.services", *args]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def cluster_env() -> Iterator[dict[str, str]]:
    exports = services_cli("up", "--brokers", "3", "-q")
    env = dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines() if "=" in line)
    yield {k: v.strip("'") for k, v in env.items()}
    services_cli("down")


@pytest.fixture
def cluster_site(cluster_env: dict[str, str]) -> Iterator[Site]:
    with open_site(cluster_env) as s:
        yield s


def broker_pids() -> dict[int, int]:
    """The cluster's running brokers: node id -> pid."""
    running = services._running(CLUSTER_DIR)
    return {i: running[n] for i, n in enumerate(services.kafka_nodes(3), 1) if n in running}


def partition(settings: Settings, topic: str, number: int = 0) -> Any:
    """A partition's metadata, once every broker's metadata knows it (a topic just made reaches them later)."""
    admin = admin_client(settings)

    def known() -> Any:
        found = admin.list_topics(topic, timeout=10).topics.get(topic)
        return found.partitions.get(number) if found is not None and found.error is None else None

    return wait_for(known, 30, f"{topic} partition {number} in the cluster's metadata", interval=0.2)


def topic_setting(admin: Any, topic: str, name: str) -> str:
    """A topic's setting, once the broker asked knows the topic (the one a new topic's metadata reached last may
    answer UNKNOWN_TOPIC_OR_PART for a moment)."""

    def described() -> str | None:
        try:
            config = admin.describe_configs([ConfigResource("topic", topic)])
            return str(next(iter(config.values())).result()[name].value)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return None
            raise

    return wait_for(described, 30, f"{topic}'s {name} from the cluster", interval=0.2)


def transaction_coordinator(settings: Settings, transactional_id: str) -> int:
    """The broker that coordinates a transactional id: the leader of its partition of __transaction_state
    (Kafka: Utils.abs(String.hashCode) % partitions, with Java's 32-bit arithmetic; ids here are ASCII)."""
    h = 0
    for ch in transactional_id:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    signed = h - (1 << 32) if h >= 1 << 31 else h
    number = 0 if signed == -(1 << 31) else abs(signed)
    return int(partition(settings, "__transaction_state", number % TRANSACTION_STATE_PARTITIONS).leader)


def kill_and_bring_back(settings: Settings, node_id: int, while_down: Any) -> float:
    """SIGKILL a broker, run `while_down()`, start it again; seconds until every partition has 3 in-sync again."""
    os.kill(broker_pids()[node_id], signal.SIGKILL)
    wait_for(lambda: node_id not in broker_pids(), 30, f"broker {node_id} gone")
    while_down()
    services_cli("up", "-q")
    back = time.monotonic()

    def rejoined() -> bool:
        topics = admin_client(settings).list_topics(timeout=10).topics
        return all(len(p.isrs) == 3 for t in topics.values() for p in t.partitions.values())

    wait_for(rejoined, 120, f"broker {node_id} back in every in-sync replica set", interval=0.5)
    return time.monotonic() - back


def test_topics_are_replicated_three_times_with_two_in_sync(cluster_site: Site) -> None:
    site = cluster_site
    status = services_cli("status")
    assert [line.split(":")[0] for line in status.splitlines() if line.startswith("Kafka")] == [
        f"Kafka broker {i}" for i in (1, 2, 3)
    ], status
    assert len(site.env["DJLINK_KAFKA_BOOTSTRAP"].split(",")) == 3
    settings = Settings.from_env(site.pipeline_env())
    topics = Topics(site.topic_prefix)
    Admin(settings).ensure_control(topics)  # as every role does at its start, with no replication factor set
    admin = admin_client(settings)
    for name in (topics.transaction, topics.capture_offsets, topics.links, topics.signals):
        assert len(partition(settings, name).replicas) == 3, name
        value = topic_setting(admin, name, "min.insync.replicas")
        assert value == "2", (name, value)


def test_a_broker_killed_mid_pull_and_mid_mirroring_then_the_capture_coordinator_loses_nothing(
    cluster_site: Site,
) -> None:
    site = cluster_site
    state_db = f"{site.tag}_applier"
    settings = Settings.from_env(site.pipeline_env())
    n = 60
    linked, _roles = shared_link(site, state_db, n, 30)
    Recording = linked.Recording
    change_topic = Topics(site.topic_prefix).table(site.source_schema, "recording")
    load = MirrorLoad(site, n, limit=50_000, seed=5)  # stopped once the faults are over
    load.start()
    pull: dict[str, Any] = {}
    try:
        wait_for(lambda: load.transactions >= 20, 30, "the load under way")
        leader = int(partition(settings, change_topic).leader)
        asking = threading.Thread(target=lambda: pull.update(summary=(Recording().source & "recording_id > 30")
                                                              .pull(timeout=120)))  # fmt: skip

        def during_pull() -> None:
            asking.start()
            before = load.transactions
            wait_for(lambda: load.transactions >= before + 100, 60, "source writes with a broker down")

        rejoin_s = kill_and_bring_back(settings, leader, during_pull)
        asking.join(150)
        assert pull["summary"].pulled == n - 30, pull
        print(f"\nchange topic's leader (broker {leader}) killed: pull whole, rejoined {rejoin_s:.1f} s after start")

        coordinator = transaction_coordinator(settings, Topics(site.topic_prefix).capture_group)
        before = load.transactions
        rejoin_s = kill_and_bring_back(
            settings,
            coordinator,
            lambda: wait_for(lambda: load.transactions >= before + 100, 60, "writes with the coordinator down"),
        )
        print(f"capture's transaction coordinator (broker {coordinator}) killed: rejoined {rejoin_s:.1f} s")
        back = time.monotonic() - rejoin_s
    finally:
        load.stop.set()
        load.join(30)
    assert load.error is None
    assert all(proc.poll() is None for proc in site.processes), "no role stops when a broker is lost"
    report = equal_and_clean(site)  # once the writes stop: while they go on, the source is always a step ahead
    print(f"{load.transactions} source transactions under load")
    record_fault("Kafka broker killed (SIGKILL), one of three: the change topic's leader mid-pull, then the "
                 "capture's transaction coordinator, under writes", 2, time.monotonic() - back, report)  # fmt: skip
    assert len(Recording()) == n and len(Recording.Channel()) == 2 * n
