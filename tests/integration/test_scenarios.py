"""datajoint-link's functional scenarios 1, 2, 3 and 5 (docs/states.md) through the façade and the event path.

(Scenario 4 is in test_stores.py; scenario 6 in test_facade.py.)
"""

from __future__ import annotations

import uuid
from typing import Any

import datajoint as dj

from link import link
from tests.conftest import Site, admin
from tests.integration.test_pull import rows


def running(site: Site) -> dj.Schema:
    site.start("capture", "agent")
    site.start("applier")
    return dj.Schema(site.source_schema, connection=site.source_dj())


def test_a_table_with_a_parent_and_a_current_timestamp_default_links_and_pulls(site: Site) -> None:
    """Scenarios 1 and 2: a foreign key to another source table; a CURRENT_TIMESTAMP default."""
    schema = running(site)

    @schema
    class Subject(dj.Manual):
        definition = """
        subject_id : int
        ---
        species : varchar(32)
        """

    @schema
    class Session(dj.Manual):
        definition = """
        -> Subject
        session : smallint
        ---
        started = CURRENT_TIMESTAMP : timestamp
        note = "" : varchar(64)
        """

    Subject.insert([(1, "mouse"), (2, "rat")])
    Session.insert([{"subject_id": 1, "session": 1, "note": "a"}, {"subject_id": 2, "session": 1, "note": "b"}])
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "session_outbound", site.dest_schema)
    class Session:  # type: ignore[no-redef]
        pass

    summary = (Session().source & {"subject_id": 1}).pull()
    assert summary.pulled == 1, summary
    assert (
        rows(site, "DEST", site.dest_schema, "session", "subject_id")
        == rows(site, "SOURCE", site.source_schema, "session", "subject_id")[:1]
    )
    # The copy stands alone (no foreign key to a parent the destination lacks); the default is MariaDB's.
    declared = dj.conn().query(f"SHOW CREATE TABLE `{site.dest_schema}`.`session`").fetchone()[1]
    assert "FOREIGN KEY" not in declared and "current_timestamp()" in declared.lower()


def test_a_computed_table_with_a_part_links_under_its_own_names_and_pulls(site: Site) -> None:
    """Scenarios 3 and 5: a Computed source with a part table; part names ignore the tier prefix."""
    schema = running(site)

    @schema
    class Stimulus(dj.Manual):
        definition = """
        stimulus_id : int
        """

    @schema
    class Response(dj.Computed):
        definition = """
        -> Stimulus
        ---
        mean : double
        """

        class Trial(dj.Part):
            definition = """
            -> master
            trial : int
            ---
            value : double
            """

        def make(self, key: dict[str, Any]) -> None:
            self.insert1({**key, "mean": key["stimulus_id"] / 2})
            self.Trial.insert({**key, "trial": t, "value": t * key["stimulus_id"]} for t in range(3))

    Stimulus.insert([(1,), (2,), (3,)])
    Response.populate()
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "ResponseOutbound", site.dest_schema)
    class Response:  # type: ignore[no-redef]
        pass

    assert Response.Trial.__name__ == "Trial"  # the part, under its own name on the destination class
    summary = (Response().source & "stimulus_id > 1").pull()
    assert summary.pulled == 2, summary
    assert Response().fetch("stimulus_id").tolist() == [2, 3]
    assert len(Response.Trial()) == 6
    assert (
        rows(site, "DEST", site.dest_schema, "response__trial", "stimulus_id, trial")
        == rows(site, "SOURCE", site.source_schema, "__response__trial", "stimulus_id, trial")[3:]
    )


def test_auto_increment_and_uuid_attributes_declare_as_at_the_source_and_pull(site: Site) -> None:
    """An auto_increment key and uuid attributes (one in the key of a part) keep their types at the destination."""
    schema = running(site)

    @schema
    class Animal(dj.Manual):
        definition = """
        animal_id : int auto_increment
        ---
        tag : uuid
        name : varchar(16)
        """

        class Sample(dj.Part):
            definition = """
            -> master
            sample : uuid
            ---
            grams : float
            """

    for name in ("ada", "bo", "cy"):
        Animal.insert1({"tag": uuid.uuid4(), "name": name})
        animal_id = (Animal & {"name": name}).fetch1("animal_id")
        Animal.Sample.insert({"animal_id": animal_id, "sample": uuid.uuid4(), "grams": g} for g in (1.5, 2.5))
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "animal_outbound", site.dest_schema)
    class Animal:  # type: ignore[no-redef]
        pass

    summary = (Animal().source & "name != 'bo'").pull()
    assert summary.pulled == 2, summary
    declared = dj.conn().query(f"SHOW CREATE TABLE `{site.dest_schema}`.`animal`").fetchone()[1]
    assert "`animal_id` int(11) NOT NULL AUTO_INCREMENT" in declared and "`tag` binary(16)" in declared
    assert Animal.heading.attributes["tag"].uuid and Animal.Sample.heading.attributes["sample"].uuid
    for table, order in (("animal", "animal_id"), ("animal__sample", "animal_id, sample")):
        source = rows(site, "SOURCE", site.source_schema, table, order)
        assert rows(site, "DEST", site.dest_schema, table, order) == [r for r in source if r[0] != 2], table
    # The destination's own inserts continue the key after the pulled ones.
    Animal.insert1({"tag": uuid.uuid4(), "name": "local"})
    assert (Animal & {"name": "local"}).fetch1("animal_id") == 4
    assert isinstance((Animal & {"animal_id": 1}).fetch1("tag"), uuid.UUID)


def test_keys_of_unsigned_bigint_and_uuid_pull_flag_and_delete_like_any_other(site: Site) -> None:
    """Their values come back from Avro and from SQL as other Python types (Decimal, bytes) than DataJoint
    gives the façade (int, UUID): a pull must still see its entities done, and `flagged` must restrict."""
    schema = running(site)

    @schema
    class Probe(dj.Manual):
        definition = """
        serial : bigint unsigned
        lot : uuid
        ---
        label : varchar(16)
        """

    lots = [uuid.uuid4() for _ in range(3)]
    Probe.insert({"serial": 5_000_000_000 + i, "lot": lot, "label": f"p{i}"} for i, lot in enumerate(lots))
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "probe_outbound", site.dest_schema)
    class Probe:  # type: ignore[no-redef]
        pass

    summary = Probe().source.pull(timeout=30)
    assert (summary.pulled, summary.in_flight) == (3, []), summary
    source = rows(site, "SOURCE", site.source_schema, "probe", "serial")
    assert rows(site, "DEST", site.dest_schema, "probe", "serial") == source

    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(
            f"UPDATE `{site.helper_schema}`.probe_outbound SET is_flagged='TRUE' WHERE serial=%s", (5_000_000_000 + 1,)
        )
    conn.close()
    assert Probe().source.flagged == [{"serial": 5_000_000_000 + 1, "lot": lots[1]}]
    deleted = (Probe() & Probe().source.flagged).delete(timeout=30)
    assert (deleted.deleted, deleted.in_flight) == (1, []), deleted
    assert [r[2] for r in rows(site, "DEST", site.dest_schema, "probe", "serial")] == ["p0", "p2"]


def test_a_string_key_in_a_latin1_schema_links_and_pulls(site: Site) -> None:
    """The helper table (in a utf8mb4 schema) references the key with the source column's character set."""
    conn = admin(site.env, "SOURCE")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{site.source_schema}` CHARACTER SET latin1")
    conn.close()
    schema = running(site)

    @schema
    class Mouse(dj.Manual):
        definition = """
        name : varchar(16)
        ---
        weight : float
        """

    Mouse.insert([{"name": "ada", "weight": 20.5}, {"name": "bö", "weight": 21.0}])
    site.connect_facade()

    @link(site.source_host, site.source_schema, site.helper_schema, "mouse_outbound", site.dest_schema)
    class Mouse:  # type: ignore[no-redef]
        pass

    assert Mouse().source.pull(timeout=30).pulled == 2
    assert sorted(Mouse().fetch("name")) == ["ada", "bö"]
