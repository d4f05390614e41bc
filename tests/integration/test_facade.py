"""The façade's flags and deletes over the real services, as a scientist uses them in a notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import datajoint as dj
import pytest

from link import link
from tests.conftest import Site, admin
from tests.integration.test_pull import declare_source, linked_recording, rows


def linked(site: Site) -> Any:
    _, Recording = linked_recording(site, helper="Outbound")
    summary = Recording().source.pull()
    assert summary.pulled == 3, summary
    return Recording


def flag(site: Site, recording_id: int) -> None:
    """A source administrator flags an entity in the helper table (regular users have no privileges there)."""
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(
            f"UPDATE `{site.helper_schema}`.outbound SET is_flagged='TRUE' WHERE recording_id=%s", (recording_id,)
        )
    conn.close()


def test_deleting_the_flagged_rows_deprecates_them_at_the_source(site: Site) -> None:
    """datajoint-link's scenario 6: flag-driven deletion."""
    Recording = linked(site)
    assert Recording().source.flagged == []
    flag(site, 1)
    # Listed at once: read from the helper table at the call, no sleep needed.
    assert Recording().source.flagged == [{"recording_id": 1}]
    summary = (Recording() & Recording().source.flagged).delete()
    # delete() returned once the agent recorded the outcome: nothing left in flight.
    assert (summary.deleted, summary.skipped, summary.refused, summary.in_flight) == (1, 0, [], []), summary
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording", "recording_id")] == [2, 3]
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording__channel", "recording_id")] == [2] * 3 + [
        3
    ] * 3
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id") == [
        (1, "NONE", "TRUE", "TRUE"),
        (2, "NONE", "FALSE", "FALSE"),
        (3, "NONE", "FALSE", "FALSE"),
    ]
    # A deprecated entity cannot be pulled again; the summary says why.
    again = (Recording().source & {"recording_id": 1}).pull()
    assert again.pulled == 0 and again.refused == ['{"recording_id":1}: deprecated at the source']


def test_a_delete_asks_once_and_no_changes_nothing_anywhere(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    Recording = linked(site)
    questions: list[str] = []

    def answer(prompt: str, *args: Any, **kwargs: Any) -> str:
        questions.append(prompt)
        return "no"

    monkeypatch.setattr(dj.utils, "user_choice", answer)
    monkeypatch.setitem(dj.config, "safemode", True)
    before = rows(site, "DEST", site.dest_schema, "recording", "recording_id")
    summary = Recording().delete()
    assert len(questions) == 1 and "3 Recording entities" in questions[0]  # once per call, not per row
    assert summary.deleted == 0 and "nothing changed" in summary.message
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id") == [
        (i, "NONE", "FALSE", "FALSE") for i in (1, 2, 3)
    ]
    assert rows(site, "DEST", site.dest_schema, "recording", "recording_id") == before and len(before) == 3

    # Answering yes: every entity goes, and the helper rows with them (unflagged: Unshared).
    monkeypatch.setattr(dj.utils, "user_choice", lambda *a, **k: "yes")
    summary = (Recording() & "recording_id > 1").delete()
    assert summary.deleted == 2, summary
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording", "recording_id")] == [1]
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id") == [(1, "NONE", "FALSE", "FALSE")]


PULLER = """
import json, os, sys
import datajoint as dj
dj.config.update(json.loads(os.environ["TEST_DJ_CONFIG"]))
from link import link
Recording = link(*json.loads(os.environ["TEST_LINK_ARGS"]))(type("Recording", (), {}))
ids = json.loads(sys.argv[1])
s = (Recording().source & [{"recording_id": i} for i in ids]).pull(timeout=60)
print(json.dumps({"pulled": s.pulled, "skipped": s.skipped, "refused": s.refused, "in_flight": s.in_flight}))
"""


def test_two_processes_pulling_overlapping_rows_both_succeed_and_each_entity_arrives_once(site: Site) -> None:
    site.start("capture", "agent")
    site.start("applier")
    declare_source(site, n=30)
    site.connect_facade()
    env = {
        **os.environ,
        **site.pipeline_env(),
        "LINK_USER": site.link_user,
        "LINK_PASS": site.link_pass,
        "TEST_DJ_CONFIG": json.dumps(
            {k: dj.config[k] for k in ("database.host", "database.user", "database.password")}
            | {"database.use_tls": False}
        ),
        "TEST_LINK_ARGS": json.dumps(
            [site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema]
        ),
    }
    wanted = {"a": list(range(1, 21)), "b": list(range(10, 31))}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", PULLER, json.dumps(ids)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, ids in wanted.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results[name] = json.loads(out.strip().splitlines()[-1])
    for name, ids in wanted.items():
        r = results[name]
        assert (r["pulled"] + r["skipped"], r["refused"], r["in_flight"]) == (len(ids), [], []), (name, r)
    # Every entity once, with its parts, byte-identical; every helper row Shared.
    for table, order in (("recording", "recording_id"), ("recording__channel", "recording_id, channel")):
        assert rows(site, "DEST", site.dest_schema, table, order) == rows(
            site, "SOURCE", site.source_schema, table, order
        )
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id") == [
        (i, "NONE", "FALSE", "FALSE") for i in range(1, 31)
    ]


def test_the_facade_needs_only_select_on_the_source_and_helper_schemas(site: Site) -> None:
    site.start("capture", "agent")
    site.start("applier")
    declare_source(site)
    site.connect_facade()
    reader, password = f"{site.tag}_reader", "reader-pass"
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"CREATE USER '{reader}'@'%' IDENTIFIED BY '{password}'")
        cur.execute(f"GRANT SELECT ON `{site.source_schema}`.* TO '{reader}'@'%'")
        cur.execute(f"GRANT SELECT ON `{site.helper_schema}`.* TO '{reader}'@'%'")
    try:
        os.environ["LINK_USER"], os.environ["LINK_PASS"] = reader, password

        @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
        class Recording:
            pass

        assert len(Recording().source) == 3
        summary = (Recording().source & {"recording_id": 2}).pull()
        assert summary.pulled == 1, summary
        flag(site, 2)
        assert Recording().source.flagged == [{"recording_id": 2}]
        assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording", "recording_id")] == [2]
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{reader}'@'%'")
        conn.close()


def test_a_delete_takes_the_destination_rows_depending_on_the_entities_along(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As DataJoint's delete cascades: an analysis table at the destination references pulled rows."""
    Recording = linked(site)
    dest = dj.Schema(site.dest_schema)

    @dest
    class Analysis(dj.Manual):
        definition = """
        -> Recording
        method : varchar(16)
        ---
        score : double
        """

    @dest
    class ChannelCheck(dj.Manual):
        definition = """
        -> Recording.Channel
        ---
        ok : tinyint
        """

    Analysis.insert({"recording_id": i, "method": m, "score": i} for i in (1, 2) for m in ("a", "b"))
    ChannelCheck.insert({"recording_id": 1, "channel": c, "ok": 1} for c in range(3))
    flag(site, 1)
    questions: list[str] = []

    def answer(prompt: str, *args: Any, **kwargs: Any) -> str:
        questions.append(prompt)
        return "no" if len(questions) == 1 else "yes"

    monkeypatch.setattr(dj.utils, "user_choice", answer)
    monkeypatch.setitem(dj.config, "safemode", True)
    assert (Recording() & Recording().source.flagged).delete().deleted == 0
    assert "2 of" in questions[0] and "analysis" in questions[0] and "3 of" in questions[0]
    assert len(Analysis()) == 4 and len(ChannelCheck()) == 3  # no: nothing changed, here either

    summary = (Recording() & Recording().source.flagged).delete()
    assert summary.deleted == 1, summary
    assert Analysis().fetch("recording_id").tolist() == [2, 2] and len(ChannelCheck()) == 0
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording", "recording_id")] == [2, 3]
    assert rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id")[0] == (1, "NONE", "TRUE", "TRUE")
