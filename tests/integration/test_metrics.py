"""Metrics and health of every role, on the port DJLINK_METRICS_PORT gives each `djlink run` process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from djlink.process import start_roles
from tests.conftest import ROOT, Site, admin, wait_for
from tests.integration.test_pull import declare_source, linked_recording


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    status, text = get(port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_role_serves_its_metrics_and_its_health_on_its_port(site: Site) -> None:
    source_port, dest_port = free_port(), free_port()
    site.start("capture", "agent", DJLINK_METRICS_PORT=str(source_port))
    site.start("applier", DJLINK_METRICS_PORT=str(dest_port))
    for port in (source_port, dest_port):
        assert get(port, "/healthz") == (200, "alive\n")
        assert get(port, "/readyz") == (200, "ready\n")  # the process said READY: every role is consuming
        assert get(port, "/nothing")[0] == 404
    declare_source(site, n=3)
    site.connect_facade()
    from link import link

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        pass

    assert (Recording().source & "recording_id <= 2").pull().pulled == 2
    applier = wait_for(
        lambda: (m := samples(dest_port)).get(("djlink_applier_entities_total", (("outcome", "arrived"),))) == 2 and m,
        30,
        "the applier's metrics to count the 2 entities",
    )
    assert applier[("djlink_applier_units_total", (("outcome", "applied"),))] >= 1
    assert applier[("djlink_applier_batch_units_count", ())] >= 1
    assert applier[("djlink_applier_commit_seconds_count", ())] >= 1
    assert ("djlink_applier_lag_ms", ()) in applier and ("djlink_applier_pending_units", ()) in applier
    assert applier[("djlink_applier_dead_letters_total", ())] == 0
    source = samples(source_port)
    assert source[("djlink_agent_commands_total", (("kind", "PULL"),))] == 1
    assert source[("djlink_agent_activations_total", ())] == 2
    assert source[("djlink_agent_acks_total", ())] >= 1
    assert source[("djlink_capture_events_total", ())] >= 2 * 4  # each entity's master and part rows, at least
    assert not any(name.startswith("djlink_applier") for name, _ in source)  # each process reports its own roles


def test_with_json_logs_every_line_a_role_writes_is_one_json_object(site: Site, tmp_path: Path) -> None:
    log_path = tmp_path / "roles.log"
    with log_path.open("w") as log:
        proc = start_roles(["agent", "applier"], site.pipeline_env(DJLINK_LOG_FORMAT="json"), ROOT, log, 90)
        site.processes.append(proc)
        declare_source(site, n=1)
        site.connect_facade()
        from link import link

        @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
        class Recording:
            pass

        site.stop()
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert lines, "the roles logged something (their start, the link)"
    records = [json.loads(line) for line in lines]  # fails on any line that is not one JSON object
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert any("link" in r["message"] for r in records)


def status(site: Site, *args: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "djlink", "status", "--json", *args],
        env=site.pipeline_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, 3, 5), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_status_shows_how_far_the_applier_is_behind_and_max_lag_fails_when_exceeded(site: Site) -> None:
    _, Recording = linked_recording(site, n=2)
    assert (Recording().source & "recording_id = 1").pull().pulled == 1
    code, found = wait_for(lambda: (s := status(site))[1]["applier_lag"] == 0 and s, 30, "the applier at rest")
    assert code == 0 and found["links"] == 1 and found["capture_gtid"]
    assert {p["topic"] for p in found["applier"]} >= {f"{site.topic_prefix}.transaction"}

    applier = site.processes.pop()  # the applier (started last): stopped, the source goes on
    applier.terminate()
    applier.wait(30)
    src = admin(site.env, "SOURCE")
    with src.cursor() as cur:
        for i in range(5):
            cur.execute(f"UPDATE `{site.source_schema}`.recording SET subject=%s WHERE recording_id=1", (f"s{i}",))
            src.commit()
    src.close()
    code, found = wait_for(lambda: (s := status(site))[1]["applier_lag"] >= 10 and s, 30, "a lag of the 5 updates")
    assert code == 0  # no --max-lag: a lag alone is not a failure
    code, _ = status(site, "--max-lag", "0")
    assert code == 5
    text = subprocess.run(
        [sys.executable, "-m", "djlink", "status"], env=site.pipeline_env(), capture_output=True, text=True, timeout=60
    ).stdout
    assert f"applier {site.topic_prefix}-applier: " in text and "messages behind" in text
