"""The README's notebook example runs as written, against a site whose source has the table it names."""

from __future__ import annotations

import re
from pathlib import Path

import datajoint as dj
import pytest

from tests.conftest import ROOT, Site, admin
from tests.integration.test_pull import rows


def notebook_example() -> str:
    """The README's first python block that uses the façade."""
    blocks = re.findall(r"```python\n(.*?)```", (Path(ROOT) / "README.md").read_text(), re.S)
    return next(b for b in blocks if "from link import link" in b)


def test_the_readme_notebook_example_runs(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.start("capture", "agent")
    site.start("applier")
    schema = dj.Schema(site.source_schema, connection=site.source_dj())

    @schema
    class Table(dj.Manual):
        definition = """
        item : int
        ---
        foo : int
        """

    Table.insert([(1, 1), (2, 1), (3, 2)])
    site.connect_facade()
    code = notebook_example()
    # The example's placeholders, as a reader would fill them in.
    for placeholder, value in (
        ('"db.lab.org"', repr(site.source_host)),
        ('"source_schema"', repr(site.source_schema)),
        ('"helper_schema"', repr(site.helper_schema)),
        ('"destination_schema"', repr(site.dest_schema)),
    ):
        assert placeholder in code, placeholder
        code = code.replace(placeholder, value)
    # Something to find flagged: a source administrator flags item 2 once it is shared.
    code = code.replace("Table().source.flagged", "flag_item(site, 2)\nTable().source.flagged", 1)
    exec(compile(code, "README.md", "exec"), {"site": site, "flag_item": flag_item})  # the README's own example
    assert "2 pulled, 0 already shared, 0 refused" in capsys.readouterr().out
    # Item 2 was flagged and deleted (deprecated at the source); item 1 stays; item 3 was never pulled.
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "table", "item")] == [1]
    assert rows(site, "SOURCE", site.helper_schema, "helper_table", "item") == [
        (1, "NONE", "FALSE", "FALSE"),
        (2, "NONE", "TRUE", "TRUE"),
    ]


def flag_item(site: Site, item: int) -> None:
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"UPDATE `{site.helper_schema}`.helper_table SET is_flagged='TRUE' WHERE item=%s", (item,))
    conn.close()
