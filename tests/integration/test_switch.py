"""Switching an existing datajoint-link deployment to djlink: its helper and destination tables, as datajoint-link
declared them, and the states its entities are in, carry on."""

from __future__ import annotations

from typing import Any

import datajoint as dj

from link import link
from tests.conftest import Site, admin, wait_for
from tests.integration.test_facade import flag
from tests.integration.test_pull import declare_source, rows

# datajoint-link's helper table, exactly as datajoint-link 0.11 declares it (link/infrastructure/__init__.py).
SEED_HELPER = """
-> source_table
---
process: enum('PULL', 'DELETE', 'NONE')
is_flagged: enum('TRUE', 'FALSE')
is_deprecated: enum('TRUE', 'FALSE')
"""


def seed_deployment(site: Site, Source: Any) -> None:
    """The state a datajoint-link deployment left: entities 1 and 2 Shared, 3 Tainted (flagged, at the
    destination), 4 Activated by a pull that never finished, 5 and 6 Unshared."""
    helper = dj.Schema(site.helper_schema, connection=site.source_dj())
    Outbound = helper(type("Outbound", (dj.Manual,), {"definition": SEED_HELPER}), context={"source_table": Source})
    states = {1: ("NONE", "FALSE"), 2: ("NONE", "FALSE"), 3: ("NONE", "TRUE"), 4: ("PULL", "FALSE")}
    Outbound.insert(
        {"recording_id": i, "process": p, "is_flagged": f, "is_deprecated": "FALSE"} for i, (p, f) in states.items()
    )
    # Its destination table: the source's heading as the definition, the parts as they describe themselves
    # with their master's reference made `-> master`.
    first, rest = Source.Channel.describe(printout=False).split("\n", 1)
    assert first.startswith("-> ")
    part = "-> master\n" + rest
    dj.conn(reset=True)
    body = {"definition": str(Source.heading), "Channel": type("Channel", (dj.Part,), {"definition": part})}
    Local = dj.Schema(site.dest_schema)(type("Recording", (dj.Manual,), body))
    for i in (1, 2, 3):
        Local.insert1((Source & {"recording_id": i}).fetch1())
        Local.Channel.insert((Source.Channel & {"recording_id": i}).fetch(as_dict=True))


def helper_states(site: Site) -> dict[int, tuple[str, str, str]]:
    return {r[0]: r[1:] for r in rows(site, "SOURCE", site.helper_schema, "outbound", "recording_id")}


def test_a_datajoint_link_deployment_carries_on_from_its_tables_and_states(site: Site) -> None:
    Source = declare_source(site, 6)
    site.connect_facade()
    seed_deployment(site, Source)
    site.start("capture", "agent")
    site.start("applier")

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
    class Recording:
        pass

    # The pull datajoint-link left unfinished completes; the states of the others are as they were.
    wait_for(lambda: helper_states(site)[4] == ("NONE", "FALSE", "FALSE"), 30, "entity 4's interrupted pull")
    assert helper_states(site) == {
        1: ("NONE", "FALSE", "FALSE"),
        2: ("NONE", "FALSE", "FALSE"),
        3: ("NONE", "TRUE", "FALSE"),
        4: ("NONE", "FALSE", "FALSE"),
    }
    assert Recording().source.flagged == [{"recording_id": 3}]
    # Entities shared before the switch are mirrored from now on.
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"UPDATE `{site.source_schema}`.recording SET subject='renamed' WHERE recording_id=1")
    conn.close()
    wait_for(lambda: (Recording & {"recording_id": 1}).fetch1("subject") == "renamed", 30, "the mirrored update")

    pulled = (Recording().source & [{"recording_id": 1}, {"recording_id": 5}]).pull()
    assert (pulled.pulled, pulled.skipped) == (1, 1), pulled  # 1 was shared by datajoint-link
    flag(site, 2)
    deleted = (Recording() & Recording().source.flagged).delete()
    assert deleted.deleted == 2, deleted  # 2 and 3: flagged, so deprecated
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording", "recording_id")] == [1, 4, 5]
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording__channel", "recording_id")] == [1] * 3 + [
        4
    ] * 3 + [5] * 3
    assert {i: s[2] for i, s in helper_states(site).items()} == {
        1: "FALSE",
        2: "TRUE",
        3: "TRUE",
        4: "FALSE",
        5: "FALSE",
    }
    assert rows(site, "DEST", site.dest_schema, "recording", "recording_id") == [
        r for r in rows(site, "SOURCE", site.source_schema, "recording", "recording_id") if r[0] in (1, 4, 5)
    ]
