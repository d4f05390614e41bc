"""The façade's flags and deletes over the real services, as a scientist uses them in a notebook."""

from __future__ import annotations

from typing import Any

import datajoint as dj
import pytest

from link import link
from tests.conftest import Site, admin
from tests.integration.test_pull import declare_source, rows


def linked(site: Site) -> Any:
    site.start("capture", "agent")
    site.start("applier")
    declare_source(site)
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "Outbound", site.dest_schema)
    class Recording:
        pass

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
    """The seed's scenario 6: flag-driven deletion."""
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
