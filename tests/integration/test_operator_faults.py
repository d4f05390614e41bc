"""Faults operators meet every month, over the real services: each ends with `djlink verify` equal (docs/faults.md).

Each service is stopped (SIGTERM, as an upgrade or a host reboot does) and started again on its data: the
Kafka broker while the source keeps writing and a pull is asked, the source server between two write loads,
the destination server in the middle of a pull's apply. No role is restarted, the pull arrives whole, the
mirrored updates arrive, and the destination equals the source entity for entity.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from devtools import services
from tests.conftest import ROOT, Site, admin, record_fault, scalar, wait_for
from tests.integration.test_applier import Linked, ask, linked_recordings
from tests.integration.test_faults import MirrorLoad
from tests.integration.test_metrics import free_port, samples
from tests.integration.test_verify import equal_and_clean


def since(t: float) -> float:
    return time.monotonic() - t


def stop(name: str) -> None:
    """Stop one of the development services as an upgrade or a host reboot does (SIGTERM, then wait)."""
    sd = services.state_dir()
    pid = services._running(sd)[name]
    services._stop({name: (pid, services._markers(sd)[name])})


def start_again() -> None:
    """Start what is stopped, on its data, ports and settings as before."""
    state = json.loads((services.state_dir() / "state.json").read_text())
    services.up(quiet=True, secure=bool(state.get("kafka_secure")))


def shared_link(
    site: Site, state_db: str, n: int, pulled: int, capture_env: dict[str, str] | None = None, **agent_env: str
) -> tuple[Linked, dict[str, subprocess.Popen[str]]]:
    """Each role started in a process of its own, `n` recordings linked, the first `pulled` pulled; the link and
    the roles' processes by name."""
    roles = {
        "capture": site.start("capture", **(capture_env or {})),
        "agent": site.start("agent", **agent_env),
        "applier": site.start("applier", DJLINK_APPLIER_STATE_DB=state_db),
    }
    linked = linked_recordings(site, n)
    ask(linked.requests, "PULL", linked.spec, list(range(1, pulled + 1)))
    wait_for(lambda: len(linked.Recording()) == pulled, 90, "the first pull")
    return linked, roles


def test_a_broker_stopped_and_started_again_under_load_and_a_pull_loses_nothing(site: Site, state_db: str) -> None:
    n = 60
    Recording = shared_link(site, state_db, n, 30)[0].Recording
    load = MirrorLoad(site, n, limit=3000)
    load.start()
    pull: dict[str, Any] = {}
    try:
        wait_for(lambda: load.transactions >= 20, 30, "the load under way")
        stop(services.KAFKA)
        down_at, during = time.monotonic(), load.transactions
        # Asked while the broker is away: the façade waits for it within the pull's timeout.
        asking = threading.Thread(target=lambda: pull.update(summary=(Recording().source & "recording_id > 30")
                                                              .pull(timeout=90)))  # fmt: skip
        asking.start()
        wait_for(lambda: load.transactions >= during + 100, 60, "source writes while the broker is down")
        start_again()
        back = time.monotonic()
        print(f"\nbroker away {back - down_at:.1f} s, {load.transactions - during} source transactions")
        asking.join(120)
    finally:
        load.stop.set()
        load.join(30)
    assert load.error is None
    assert pull["summary"].pulled == n - 30, pull
    assert all(proc.poll() is None for proc in site.processes), "no role stops when the broker goes away"
    report = equal_and_clean(site)
    record_fault("Kafka broker stopped (SIGTERM) and started again, under writes and a pull", 1, since(back), report)
    assert len(Recording()) == n and len(Recording.Channel()) == 2 * n


def test_the_source_server_restarted_during_capture_loses_nothing(site: Site, state_db: str) -> None:
    n = 60
    Recording = shared_link(site, state_db, n, 30)[0].Recording
    before = MirrorLoad(site, n, limit=300, seed=1)
    before.run()  # in this thread: every write committed before the server goes
    assert before.error is None
    stop(services.SOURCE.name)
    down_at = time.monotonic()
    start_again()
    back = time.monotonic()
    print(f"\nsource server away {back - down_at:.1f} s")
    after = MirrorLoad(site, n, limit=300, seed=2)
    after.run()
    assert after.error is None
    summary = (Recording().source & "recording_id > 30").pull(timeout=90)
    assert summary.pulled == n - 30, summary
    assert all(proc.poll() is None for proc in site.processes), "no role stops when the source server restarts"
    report = equal_and_clean(site)
    record_fault("source server stopped (SIGTERM) and started again, between write loads", 1, since(back), report)


def test_a_pull_asked_while_the_source_server_is_down_waits_for_it_and_arrives(site: Site, state_db: str) -> None:
    n, port = 60, free_port()
    linked, _roles = shared_link(site, state_db, n, 30, DJLINK_METRICS_PORT=str(port))
    waits = ("djlink_agent_source_waits_total", ())
    stop(services.SOURCE.name)
    down_at = time.monotonic()
    asked: dict[str, Any] = {}
    asking = threading.Thread(target=lambda: asked.update(reply=ask(linked.requests, "PULL", linked.spec,
                                                                    list(range(31, n + 1)), timeout=120)))  # fmt: skip
    asking.start()
    # The agent meets the outage with the command in hand, and waits (it would have stopped before).
    wait_for(lambda: samples(port).get(waits, 0) >= 2, 60, "the agent waiting for the source server")
    start_again()
    back = time.monotonic()
    print(f"\nsource server away {back - down_at:.1f} s; the agent waited {samples(port)[waits]:.0f} times")
    asking.join(150)
    assert asked["reply"]["activated"] == n - 30, asked
    wait_for(lambda: len(linked.Recording()) == n, 90, "the pull asked while the source was down")
    assert all(proc.poll() is None for proc in site.processes), "no role stops while the source server is away"
    report = equal_and_clean(site)
    record_fault("source server stopped (SIGTERM) with a pull on its way to the agent", 1, since(back), report)


def test_the_source_server_restarted_in_the_middle_of_a_pulls_read_loses_nothing(site: Site, state_db: str) -> None:
    n, port = 1500, free_port()
    linked, _roles = shared_link(site, state_db, n, 30, {"DJLINK_SNAPSHOT_CHUNK_SIZE": "1",
                                                         "DJLINK_METRICS_PORT": str(port)})  # fmt: skip
    units = ("djlink_capture_units_total", ())
    base = samples(port)[units]
    pull: dict[str, Any] = {}
    asking = threading.Thread(target=lambda: pull.update(summary=(linked.Recording().source & "recording_id > 30")
                                                          .pull(timeout=240)))  # fmt: skip
    asking.start()
    wait_for(lambda: samples(port)[units] >= base + 50, 90, "the capture reading the pull's entities")
    stop(services.SOURCE.name)
    read_before = samples(port)[units] - base
    start_again()
    back = time.monotonic()
    print(f"\nsource server stopped after {read_before:.0f} of {n - 30} chunks of the pull's read")
    assert read_before < n - 30, "the server went away in the middle of the read"
    asking.join(300)
    assert pull["summary"].pulled == n - 30, pull
    assert all(proc.poll() is None for proc in site.processes), "no role stops when the source server restarts"
    report = equal_and_clean(site)
    record_fault("source server stopped (SIGTERM) in the middle of a pull's snapshot read", 1, since(back), report)


def test_the_destination_server_restarted_during_apply_loses_nothing(site: Site, state_db: str) -> None:
    n = 400
    Recording = shared_link(site, state_db, n, 10)[0].Recording
    dest = admin(site.env, "DEST")
    pull: dict[str, Any] = {}
    asking = threading.Thread(target=lambda: pull.update(summary=(Recording().source & "recording_id > 10")
                                                          .pull(timeout=180)))  # fmt: skip
    asking.start()
    here = f"SELECT COUNT(*) FROM `{site.dest_schema}`.recording"
    wait_for(lambda: scalar(dest, here) >= 40, 60, "the pull under way at the destination")
    dest.close()
    stop(services.DEST.name)
    start_again()
    back = time.monotonic()
    asking.join(240)
    assert pull["summary"].pulled == n - 10, pull
    assert all(proc.poll() is None for proc in site.processes), "no role stops when the destination restarts"
    report = equal_and_clean(site)
    record_fault("destination server stopped (SIGTERM) and started again, mid-apply", 1, since(back), report)


def test_the_applier_offline_while_the_source_writes_catches_up_and_loses_nothing(site: Site, state_db: str) -> None:
    n, backlog = 60, int(os.environ.get("DJLINK_TEST_BACKLOG") or 6000)  # source transactions while it is away
    linked, roles = shared_link(site, state_db, n, 30)
    applier = roles["applier"]
    applier.terminate()
    applier.wait(30)
    load = MirrorLoad(site, n, limit=backlog, seed=3)
    written_at = time.monotonic()
    load.run()  # in this thread: the whole backlog is committed at the source before the applier is back
    assert load.error is None
    writing = time.monotonic() - written_at
    ask(linked.requests, "PULL", linked.spec, list(range(31, n + 1)))  # asked while it is away, too
    src, dest = admin(site.env, "SOURCE"), admin(site.env, "DEST")
    rows = "SELECT recording_id, subject FROM `{}`.recording ORDER BY recording_id"
    expected = src.cursor()
    expected.execute(rows.format(site.source_schema))
    want = expected.fetchall()
    src.close()
    assert len(want) == n

    def caught_up() -> bool:
        with dest.cursor() as cur:
            cur.execute(rows.format(site.dest_schema))
            have = cur.fetchall()
        dest.commit()  # a fresh read each time
        return bool(have == want)

    started = time.monotonic()
    site.start("applier", DJLINK_APPLIER_STATE_DB=state_db)
    wait_for(caught_up, 600, "the applier caught up with its backlog", interval=0.1)
    took = time.monotonic() - started
    print(
        f"\napplier away while the source wrote {backlog} transactions ({2 * backlog} row changes) in "
        f"{writing:.1f} s and a pull of {n - 30} was asked; caught up {took:.1f} s after it was started "
        f"(process start included): {backlog / took:.0f} source transactions/s"
    )
    dest.close()
    report = equal_and_clean(site)
    record_fault(f"applier stopped while the source wrote {backlog} transactions", 1, since(started), report)


def djlink(site: Site, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A `djlink` command as the source site's operator runs it."""
    argv = [sys.executable, "-m", "djlink", *args]
    return subprocess.run(argv, env=site.pipeline_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_binlog_purged_past_the_checkpoint_stops_the_capture_in_one_line_and_a_resnapshot_recovers(
    site: Site, state_db: str
) -> None:
    n = 40
    linked, roles = shared_link(site, state_db, n, 30)
    capture = roles["capture"]
    capture.terminate()
    capture.wait(30)
    src = admin(site.env, "SOURCE")
    s, h = site.source_schema, f"`{site.helper_schema}`.outbound"
    with src.cursor() as cur:  # what the capture will never read: the binlog that holds it goes
        cur.execute(f"UPDATE `{s}`.recording SET subject='while away' WHERE recording_id <= 10")
        cur.execute(f"DELETE FROM `{s}`.recording__channel WHERE recording_id BETWEEN 11 AND 15 AND channel=1")
        cur.executemany(f"INSERT INTO `{s}`.recording__channel VALUES (%s, 7, 0.5)", [(i,) for i in range(16, 21)])
        cur.execute(f"UPDATE {h} SET is_flagged='TRUE' WHERE recording_id=21")
        src.commit()
        cur.execute("FLUSH BINARY LOGS")
        cur.execute("SHOW MASTER STATUS")
        current = cur.fetchone()[0]

        def purged() -> bool:
            # The server keeps a file until its binlog checkpoint is written (and while a dump thread reads it).
            cur.execute(f"PURGE BINARY LOGS TO '{current}'")
            cur.execute("SHOW BINARY LOGS")
            return bool(cur.fetchall()[0][0] == current)

        wait_for(purged, 60, f"the source's binlog purged up to {current}", interval=0.2)
    src.close()

    # The capture says what happened and how to recover, in one line, and stops.
    env = site.pipeline_env()
    failed = subprocess.run(
        [sys.executable, "-m", "djlink", "run", "--role", "capture"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert len(errors) == 1 and "purged" in errors[0] and "djlink resnapshot" in errors[0], failed.stderr
    print(f"\n{errors[0]}")

    done = djlink(site, "resnapshot")
    assert done.returncode == 0, done.stderr
    assert "read again 30 entities of 1 link(s)" in done.stdout, done.stdout
    started = time.monotonic()
    site.start("capture")
    report = equal_and_clean(site)
    print(f"\nresnapshot of 30 entities: verify equal {since(started):.1f} s after the capture started")
    record_fault("binlog purged past the capture's checkpoint, then djlink resnapshot", 1, since(started), report)
    Recording = linked.Recording
    assert len(Recording() & "subject='while away'") == 10
    assert len(Recording.Channel() & "recording_id BETWEEN 11 AND 15") == 5
    assert len(Recording.Channel() & "channel=7") == 5
    wait_for(lambda: len(Recording().source.flagged) == 1, 60, "the flag set while the binlog was lost")
