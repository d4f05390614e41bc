"""`djlink verify` over the real services: equal after a pull, and exactly the differences planted, no more."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from foundation.config import Settings
from foundation.kafka import read_to_end
from foundation.topics import Topics
from tests.conftest import ROOT, Site, admin, wait_for
from tests.integration.test_pull import linked_recording
from tests.integration.test_stores import declare_scenario_4, linked, start, stores  # noqa: F401 (a fixture)


def verify(site: Site, *args: str, **env: str) -> tuple[int, Any, str]:
    """`djlink verify --json` as a user runs it, with the link user at the source: (exit code, report, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "djlink", "verify", "--json", *args],
        env=site.pipeline_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(done.stdout) if done.stdout.startswith("{") else done.stdout
    return done.returncode, report, done.stderr


def equal_and_clean(site: Site) -> dict[str, Any]:
    """`djlink verify` equal (within a bound, the last changes still on their way) and no dead letter; its report."""

    def equal() -> Any:
        code, report, _ = verify(site)
        return code == 0 and report

    report = wait_for(equal, 120, "djlink verify equal", interval=1)
    assert report, report
    assert read_to_end(Settings.from_env(site.pipeline_env()), Topics(site.topic_prefix).dead_letter) == []
    return dict(report)


def execute(site: Site, side: str, *statements: str) -> None:
    conn = admin(site.env, side)
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
    conn.close()


def findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    [link] = report["links"]
    return link["entities"]


def test_verify_finds_equal_after_a_pull_then_exactly_a_wrong_byte_and_a_missing_part_row(site: Site) -> None:
    _, Recording = linked_recording(site, n=4)
    assert (Recording().source & "recording_id <= 3").pull().pulled == 3  # 4 stays unshared at the source
    link_id = f"{site.helper_schema}.outbound"

    code, report, err = verify(site)
    assert (code, report["equal"]) == (0, True), (report, err)
    [link] = report["links"]
    assert (link["link_id"], link["compared"], link["entities"], link["in_flight"]) == (link_id, 3, [], 0)

    dest = f"`{site.dest_schema}`"
    execute(
        site,
        "DEST",
        # one bit of one byte of entity 2's blob, and one part row of entity 1
        f"UPDATE {dest}.`recording` SET `trace` = INSERT(`trace`, 21, 1, CHAR(ASCII(SUBSTRING(`trace`, 21, 1)) ^ 1)) "
        "WHERE recording_id = 2",
        f"DELETE FROM {dest}.`recording__channel` WHERE recording_id = 1 AND channel = 2",
    )
    code, report, err = verify(site, link_id)
    assert (code, report["equal"]) == (4, False), (report, err)
    assert findings(report) == [
        {
            "key": '{"recording_id":1}',
            "problem": "different",
            "detail": "",
            "rows": [{"table": "recording__channel", "missing": [[1, 2]], "extra": [], "changed": []}],
        },
        {
            "key": '{"recording_id":2}',
            "problem": "different",
            "detail": "",
            "rows": [
                {"table": "recording", "missing": [], "extra": [], "changed": [{"row": [2], "columns": ["trace"]}]}
            ],
        },
    ]

    # The human report says the same, and what to do.
    done = subprocess.run(
        [sys.executable, "-m", "djlink", "verify", "--no-progress"],
        env=site.pipeline_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 4
    assert "recording__channel: row (1, 2) missing at the destination" in done.stdout
    assert "recording: row (2) changed: trace differ" in done.stdout
    assert "delete it at the destination and pull it again" in done.stdout


def test_verify_reports_an_extra_entity_null_against_empty_and_leaves_entities_in_flight_aside(site: Site) -> None:
    _, Recording = linked_recording(site, n=5)
    assert (Recording().source & "recording_id <= 3").pull().pulled == 3
    src, dest, helper = f"`{site.source_schema}`", f"`{site.dest_schema}`", f"`{site.helper_schema}`.`outbound`"
    execute(
        site,
        "DEST",
        # entity 9, never shared, written at the destination by someone
        f"INSERT INTO {dest}.`recording` SELECT 9, subject, trace FROM {dest}.`recording` WHERE recording_id = 3",
        f"INSERT INTO {dest}.`recording__channel` SELECT 9, channel, gain, label FROM {dest}.`recording__channel` "
        "WHERE recording_id = 3",
        # a NULL at the source, an empty string here
        f"UPDATE {dest}.`recording__channel` SET label = '' WHERE recording_id = 3 AND channel = 0",
    )
    # entity 5 activated at the source (its pull in flight): neither missing nor an error
    execute(site, "SOURCE", f"INSERT INTO {helper} VALUES (5, 'PULL', 'FALSE', 'FALSE')")
    assert rows_of(site, "SOURCE", f"SELECT COUNT(*) FROM {src}.`recording`") == 5

    code, report, err = verify(site)
    assert code == 4, (report, err)
    assert findings(report) == [
        {
            "key": '{"recording_id":3}',
            "problem": "different",
            "detail": "",
            "rows": [
                {
                    "table": "recording__channel",
                    "missing": [],
                    "extra": [],
                    "changed": [{"row": [3, 0], "columns": ["label"]}],
                }
            ],
        },
        {"key": '{"recording_id":9}', "problem": "extra", "detail": "not shared (no helper row)", "rows": []},
    ]
    [link] = report["links"]
    assert (link["in_flight"], link["in_flight_keys"]) == (1, ['{"recording_id":5}'])


def rows_of(site: Site, side: str, statement: str) -> Any:
    conn = admin(site.env, side)
    with conn.cursor() as cur:
        cur.execute(statement)
        found = cur.fetchone()[0]
    conn.close()
    return found


def test_verify_compares_tracking_rows_and_the_objects_bytes_at_the_destination_store(
    site: Site,
    stores: dict[str, dict[str, Any]],  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    start(site, stores)
    declare_scenario_4(site, tmp_path / "files")
    site.connect_facade()
    Recording = linked(site)
    assert Recording().source.pull().pulled == 3
    store_env = {"DJLINK_DEST_STORES": json.dumps({"archive": stores["archive"]})}

    code, report, err = verify(site, **store_env)
    assert (code, report["equal"]) == (0, True), (report, err)
    assert report["links"][0]["notes"] == []

    # One object's bytes changed in the destination store, another's tracking row changed: both named.
    [image] = [p for p in Path(stores["archive"]["location"]).rglob("*.image-2.png")]
    image.write_bytes(b"x" + image.read_bytes()[1:])
    dest = f"`{site.dest_schema}`"
    execute(
        site, "DEST", f"UPDATE {dest}.`~external_archive` SET size = size + 1 WHERE attachment_name = 'movie-3.avi'"
    )
    code, report, err = verify(site, **store_env)
    assert code == 4, (report, err)
    [link] = report["links"]
    assert link["entities"] == []
    problems = sorted(o["problem"].split(":")[0] for o in link["objects"])
    assert problems == ["in the store", "in the store", "tracking row differs"], link["objects"]


def test_verify_says_in_one_line_what_is_wrong_with_its_request(site: Site) -> None:
    code, _report, err = verify(site, "no_such.link")
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: no link no_such.link on prefix {site.topic_prefix} (DJLINK_TOPIC_PREFIX); its links: none"
    ]
    _, _Recording = linked_recording(site, n=1)
    code, _report, err = verify(site, DJLINK_DEST_PORT="1")
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: cannot reach the database"), err
