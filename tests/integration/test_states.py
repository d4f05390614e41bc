"""datajoint-link's end-state matrix over the real services: each of its 12 start states x {pull, delete}.

Every start state is set up as datajoint-link would have left it (helper row
in datajoint-link's format, rows at the destination or not), each on its own
entity of one shared site, then the operation runs through the façade and
the event path (agent, capture, applier) and the entity must end where the
seed's service tests say (docs/states.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from foundation import keys as keycodec
from link import link
from tests.conftest import Site, admin, open_site, wait_for
from tests.integration.test_pull import declare_source

# start state -> (helper row (process, is_flagged, is_deprecated) or None, rows at the destination)
START: dict[str, tuple[tuple[str, str, str] | None, bool]] = {
    "Unshared": (None, False),
    "Activated(no flag, PULL)": (("PULL", "FALSE", "FALSE"), False),
    "Activated(no flag, DELETE)": (("DELETE", "FALSE", "FALSE"), False),
    "Activated(flag, PULL)": (("PULL", "TRUE", "FALSE"), False),
    "Activated(flag, DELETE)": (("DELETE", "TRUE", "FALSE"), False),
    "Received(no flag, PULL)": (("PULL", "FALSE", "FALSE"), True),
    "Received(no flag, DELETE)": (("DELETE", "FALSE", "FALSE"), True),
    "Received(flag, PULL)": (("PULL", "TRUE", "FALSE"), True),
    "Received(flag, DELETE)": (("DELETE", "TRUE", "FALSE"), True),
    "Shared": (("NONE", "FALSE", "FALSE"), True),
    "Tainted": (("NONE", "TRUE", "FALSE"), True),
    "Deprecated": (("NONE", "TRUE", "TRUE"), False),
}
# start state -> (after a pull, after a delete): datajoint-link's table
END = {
    "Unshared": ("Shared", "Unshared"),
    "Activated(no flag, PULL)": ("Shared", "Unshared"),
    "Activated(no flag, DELETE)": ("Shared", "Unshared"),
    "Activated(flag, PULL)": ("Deprecated", "Deprecated"),
    "Activated(flag, DELETE)": ("Deprecated", "Deprecated"),
    "Received(no flag, PULL)": ("Shared", "Unshared"),
    "Received(no flag, DELETE)": ("Shared", "Unshared"),
    "Received(flag, PULL)": ("Tainted", "Deprecated"),
    "Received(flag, DELETE)": ("Deprecated", "Deprecated"),
    "Shared": ("Shared", "Unshared"),
    "Tainted": ("Tainted", "Deprecated"),
    "Deprecated": ("Deprecated", "Deprecated"),
}
CASES = [(start, op) for start in START for op in ("pull", "delete")]
ENTITY = {case: i for i, case in enumerate(CASES, start=1)}


class Matrix:
    def __init__(self, site: Site, table: Any) -> None:
        self.site, self.table = site, table
        self.state, self.spec = table._djlink

    def state_of(self, entity: int) -> str:
        """datajoint-link's state of an entity, derived from its helper row and the destination (never stored)."""
        src, dst = admin(self.site.env, "SOURCE"), admin(self.site.env, "DEST")
        try:
            with src.cursor() as cur:
                cur.execute(
                    f"SELECT process, is_flagged, is_deprecated FROM `{self.site.helper_schema}`.outbound "
                    "WHERE recording_id=%s",
                    (entity,),
                )
                helper = cur.fetchone()
            with dst.cursor() as cur:
                cur.execute(f"SELECT COUNT(*) FROM `{self.site.dest_schema}`.recording WHERE recording_id={entity:d}")
                here = cur.fetchone()[0] == 1
        finally:
            src.close()
            dst.close()
        if helper is None:
            return "Unshared" if not here else "illegal: at the destination without a helper row"
        process, flagged, deprecated = helper
        if process == "NONE" and deprecated == "TRUE":
            return "Deprecated" if not here else "illegal: deprecated but at the destination"
        if process == "NONE":
            return ("Tainted" if flagged == "TRUE" else "Shared") if here else "illegal: shared but absent"
        flag = "flag" if flagged == "TRUE" else "no flag"
        return f"{'Received' if here else 'Activated'}({flag}, {process})"


@pytest.fixture(scope="module")
def matrix(services_env: dict[str, str]) -> Iterator[Matrix]:
    """One site: every case on its own entity, each set up in its start state."""
    with open_site(services_env) as site:
        site.start("capture", "agent")
        site.start("applier")
        declare_source(site, n=len(CASES))
        site.connect_facade()

        @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema)
        class Recording:
            pass

        src, dst = admin(site.env, "SOURCE"), admin(site.env, "DEST")
        with src.cursor() as s_cur, dst.cursor() as d_cur:
            for case, entity in ENTITY.items():
                helper, here = START[case[0]]
                if helper is not None:
                    s_cur.execute(
                        f"INSERT INTO `{site.helper_schema}`.outbound VALUES (%s, %s, %s, %s)", (entity, *helper)
                    )
                if here:  # as datajoint-link's pull left them: master and parts copied
                    for table in ("recording", "recording__channel"):
                        where = f"recording_id={entity:d}"
                        s_cur.execute(f"SELECT * FROM `{site.source_schema}`.`{table}` WHERE {where}")
                        found = s_cur.fetchall()
                        marks = ", ".join(["%s"] * len(found[0]))
                        d_cur.executemany(f"INSERT INTO `{site.dest_schema}`.`{table}` VALUES ({marks})", found)
        src.commit()
        dst.commit()
        src.close()
        dst.close()
        m = Matrix(site, Recording)
        assert [m.state_of(ENTITY[c]) for c in CASES] == [c[0] for c in CASES]
        yield m


@pytest.mark.parametrize(("start", "op"), CASES, ids=[f"{s} {o}" for s, o in CASES])
def test_the_seeds_end_state_after_a_pull_or_a_delete(matrix: Matrix, start: str, op: str) -> None:
    entity = ENTITY[(start, op)]
    assert matrix.state_of(entity) == start
    key = {"recording_id": entity}
    if op == "pull":
        summary: Any = (matrix.table().source & key).pull(timeout=60)
        expected = END[start][0]
    else:
        summary = matrix.state.delete(matrix.spec, [key], False, 60)
        expected = END[start][1]
    assert not summary.in_flight, summary
    # Refused pulls of a flagged, interrupted delete return at once; the delete finishes behind them.
    wait_for(lambda: matrix.state_of(entity) == expected, 30, f"{start} to end {expected} after a {op}")
    if expected in ("Shared", "Tainted"):  # the destination holds the source's rows, each once
        rows = {}
        for side, schema in (("SOURCE", matrix.site.source_schema), ("DEST", matrix.site.dest_schema)):
            conn = admin(matrix.site.env, side)
            with conn.cursor() as cur:
                cur.execute(
                    f"SELECT * FROM `{schema}`.recording__channel WHERE recording_id=%s ORDER BY channel", (entity,)
                )
                parts = cur.fetchall()
                cur.execute(f"SELECT * FROM `{schema}`.recording WHERE recording_id=%s", (entity,))
                rows[side] = (cur.fetchall(), parts)
            conn.close()
        assert rows["DEST"] == rows["SOURCE"]
    refused = [r.split(": ", 1)[0] for r in summary.refused]
    assert refused in ([], [keycodec.encode(key)])
