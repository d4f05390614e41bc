"""External stores over real services: datajoint-link's scenario 4, the `stores` mapping, content hashes checked.

The source store and the destination store are directories (DataJoint's `file`
protocol) under the test's tmp_path; the applier reads one and writes the other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datajoint as dj
import pytest
from datajoint.hash import uuid_from_buffer

from foundation.stores import CHUNK, PART, ObjectError, Store, copy_object, holds, relative_path
from link import link
from tests.conftest import Site, wait_for
from tests.integration.test_pull import rows


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, dict[str, Any]]]:
    """Store 'raw' at the source, 'archive' at the destination, both in dj.config as a notebook has them."""
    specs: dict[str, dict[str, Any]] = {
        "raw": {"protocol": "file", "location": str(tmp_path / "source-store")},
        "archive": {"protocol": "file", "location": str(tmp_path / "destination-store"), "subfolding": [3]},
        "stage": {"protocol": "file", "location": str(tmp_path / "source-files"), "stage": str(tmp_path / "staged")},
    }
    for spec in specs.values():
        Path(spec["location"]).mkdir(parents=True)
    monkeypatch.setenv("DJ_SUPPORT_FILEPATH_MANAGEMENT", "TRUE")
    saved = dj.config.get("stores")
    dj.config["stores"] = json.loads(json.dumps(specs))
    yield specs
    dj.config["stores"] = saved or {}


def declare_scenario_4(site: Site, files: Path) -> tuple[Any, dict[tuple[str, int], bytes]]:
    """datajoint-link's scenario 4: a master and a part with `attach@` attributes, a second part with plain ones;
    plus a `blob@` attribute on the master. Rows 1..3."""
    schema = dj.Schema(site.source_schema, connection=site.source_dj())

    @schema
    class Recording(dj.Manual):
        definition = """
        recording_id : int
        ---
        movie : attach@raw
        settings : blob@raw
        """

        class Scan(dj.Part):
            definition = """
            -> master
            scan : tinyint
            ---
            image : attach@raw
            """

        class Note(dj.Part):
            definition = """
            -> master
            note_id : tinyint
            ---
            text : varchar(64)
            """

    files.mkdir()
    contents: dict[tuple[str, int], bytes] = {}
    for i in (1, 2, 3):
        movie = files / f"movie-{i}.avi"
        movie.write_bytes(os.urandom(5000 + i))
        image = files / f"image-{i}.png"
        image.write_bytes(os.urandom(300 + i))
        contents[("movie", i)], contents[("image", i)] = movie.read_bytes(), image.read_bytes()
        Recording.insert1({"recording_id": i, "movie": movie, "settings": {"gain": i, "name": f"rec {i}"}})
        Recording.Scan.insert1({"recording_id": i, "scan": 0, "image": image})
        Recording.Note.insert1({"recording_id": i, "note_id": 0, "text": f"note {i}"})
    return Recording, contents


def start(site: Site, stores: dict[str, dict[str, Any]]) -> None:
    site.start("capture", "agent")
    site.start(
        "applier",
        DJLINK_SOURCE_STORES=json.dumps({"raw": stores["raw"]}),
        DJLINK_DEST_STORES=json.dumps({"archive": stores["archive"]}),
    )


def linked(site: Site) -> Any:
    """The façade's Recording, its store 'raw' mapped to the destination's 'archive'."""

    @link(site.source_host, site.source_schema, site.helper_schema, "outbound", site.dest_schema, {"raw": "archive"})
    class Recording:
        pass

    return Recording


def test_scenario_4_pulls_attachments_and_blobs_of_master_and_parts_byte_identical(
    site: Site, stores: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    start(site, stores)
    _, contents = declare_scenario_4(site, tmp_path / "files")
    site.connect_facade()

    Recording = linked(site)

    summary = (Recording().source & [{"recording_id": 1}, {"recording_id": 2}]).pull()
    assert (summary.pulled, summary.failed, summary.refused) == (2, [], []), summary

    # Exactly rows 1 and 2 of the master and of both parts, the referencing uuids as at the source.
    for table in ("recording", "recording__scan", "recording__note"):
        source = rows(site, "SOURCE", site.source_schema, table, "recording_id")
        assert rows(site, "DEST", site.dest_schema, table, "recording_id") == source[:2], table
    # The destination declares the mapped store, and its objects read back byte-identical through DataJoint.
    assert "attach@archive" in Recording.describe() and "blob@archive" in Recording.describe()
    download = tmp_path / "download"
    download.mkdir()
    for i in (1, 2):
        movie, settings = (Recording & {"recording_id": i}).fetch1("movie", "settings", download_path=download)
        assert Path(movie).read_bytes() == contents[("movie", i)]
        assert settings == {"gain": i, "name": f"rec {i}"}
        image = (Recording.Scan & {"recording_id": i}).fetch1("image", download_path=download)
        assert Path(image).read_bytes() == contents[("image", i)]
    # Only the pulled entities' objects were copied (3 each: movie, settings, image), under the destination schema.
    copied = [p for p in Path(stores["archive"]["location"]).rglob("*") if p.is_file()]
    assert len(copied) == 6 and all(site.dest_schema in p.parts for p in copied)

    # Deleted at the destination, its objects cleaned up there by DataJoint, then pulled again by the same
    # applier: its objects are copied again, not assumed still there.
    deleted = (Recording & {"recording_id": 1}).delete()
    assert deleted.deleted == 1, deleted
    dj.Schema(site.dest_schema, connection=dj.conn()).external["archive"].delete(delete_external_files=True)
    assert len([p for p in Path(stores["archive"]["location"]).rglob("*") if p.is_file()]) == 3
    again = (Recording().source & {"recording_id": 1}).pull()
    assert (again.pulled, again.failed) == (1, []), again
    movie = (Recording & {"recording_id": 1}).fetch1("movie", download_path=download / "again")
    assert Path(movie).read_bytes() == contents[("movie", 1)]
    assert len([p for p in Path(stores["archive"]["location"]).rglob("*") if p.is_file()]) == 6


def test_an_object_not_matching_its_hash_fails_its_entity_alone_and_leaves_nothing(
    site: Site, stores: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    start(site, stores)
    _, contents = declare_scenario_4(site, tmp_path / "files")
    site.connect_facade()
    # Corrupt row 2's movie in the source store: same size, other bytes.
    [movie_2] = [p for p in Path(stores["raw"]["location"]).rglob("*.movie-2.avi")]
    movie_2.write_bytes(bytes(b ^ 0xFF for b in contents[("movie", 2)]))

    Recording = linked(site)

    summary = (Recording().source & [{"recording_id": 1}, {"recording_id": 2}]).pull()
    assert summary.pulled == 1, summary
    [failure] = summary.failed
    assert failure.startswith('{"recording_id":2}') and "content hash" in failure and "movie-2.avi" in failure
    assert "1 failed" in str(summary)
    # Nothing of entity 2 at the destination: no rows, no tracking rows, no object.
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording", "recording_id")] == [1]
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording__scan", "recording_id")] == [1]
    tracked = rows(site, "DEST", site.dest_schema, "~external_archive", "hash")
    assert len(tracked) == 3  # entity 1's movie, settings and image
    assert not [p for p in Path(stores["archive"]["location"]).rglob("*movie-2*")]
    # The helper row stays PULL: once the object is repaired, pulling again completes it.
    movie_2.write_bytes(contents[("movie", 2)])
    again = (Recording().source & {"recording_id": 2}).pull()
    assert (again.pulled, again.failed) == (1, []), again
    assert [r[0] for r in rows(site, "DEST", site.dest_schema, "recording", "recording_id")] == [1, 2]


@pytest.fixture
def s3_store(stores: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A real S3-compatible server on loopback (moto in server mode), with bucket 'lab', as store 'cloud'."""
    from minio import Minio
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    spec = {
        "protocol": "s3",
        "endpoint": f"{host}:{port}",
        "bucket": "lab",
        "access_key": "djlink",
        "secret_key": "djlink-secret",
        "location": "archive",
        "secure": False,
    }
    Minio(spec["endpoint"], spec["access_key"], spec["secret_key"], secure=False).make_bucket("lab")
    dj.config["stores"]["cloud"] = dict(spec)
    try:
        yield spec
    finally:
        server.stop()


def test_objects_stream_out_of_s3_and_one_not_matching_its_hash_never_appears(
    s3_store: dict[str, Any], tmp_path: Path
) -> None:
    cloud = Store("cloud", s3_store)
    copies = Store("copies", {**s3_store, "location": "copies"})
    local = Store("local", {"protocol": "file", "location": str(tmp_path / "local")})
    content = os.urandom(PART + 3 * CHUNK + 5)  # chunks of the response stream, and two parts of an upload
    row = {"hash": uuid_from_buffer(content).bytes, "size": len(content)}
    with pytest.raises(ObjectError, match="missing in store 'cloud'"):
        copy_object(row, cloud, "src", copies, "dst")

    cloud.put(relative_path(row, "src"), content)
    assert copy_object(row, cloud, "src", copies, "dst") == len(content)  # S3 to S3
    assert copies.get(relative_path(row, "dst")) == content
    assert copy_object(row, cloud, "src", local, "dst") == len(content)  # S3 to a file store
    assert local.get(relative_path(row, "dst")) == content
    assert holds(copies, row, "dst") and holds(local, row, "dst")  # the applier copies again when they do not
    assert not holds(copies, row, "elsewhere") and not holds(copies, {**row, "size": 1}, "dst")

    wrong = {**row, "hash": uuid_from_buffer(b"something else").bytes}
    cloud.put(relative_path(wrong, "src"), content)  # at the path of a hash its bytes do not have
    for destination in (copies, local):
        with pytest.raises(ObjectError, match="content hash"):  # found at the end: the part upload is abandoned
            copy_object(wrong, cloud, "src", destination, "dst")
        with pytest.raises(ObjectError, match="missing"):
            destination.get(relative_path(wrong, "dst"))
    longer = {**row, "size": len(content) - 1}  # found one byte past the tracked size, before the end
    with pytest.raises(ObjectError, match=f"more than the {len(content) - 1} bytes tracked"):
        copy_object(longer, cloud, "src", copies, "elsewhere")
    assert copies.size(relative_path(longer, "elsewhere")) is None


def test_filepaths_and_an_s3_destination_and_a_mirrored_part_with_a_new_object(
    site: Site, stores: dict[str, dict[str, Any]], s3_store: dict[str, Any], tmp_path: Path
) -> None:
    """`filepath@` to another file store and `blob@`/`attach@` to S3; then a part row inserted at the source
    for the shared entity, whose object was tracked in an earlier source transaction, is mirrored with it."""
    staged = Path(stores["stage"]["stage"])
    dest_stage = {"protocol": "file", "location": str(tmp_path / "dest-files"), "stage": str(tmp_path / "dest-staged")}
    Path(dest_stage["location"]).mkdir()
    dj.config["stores"]["dest_stage"] = dict(dest_stage)
    site.start("capture", "agent")
    site.start(
        "applier",
        DJLINK_SOURCE_STORES=json.dumps({"raw": stores["raw"], "stage": stores["stage"]}),
        DJLINK_DEST_STORES=json.dumps({"cloud": s3_store, "dest_stage": dest_stage}),
    )
    schema = dj.Schema(site.source_schema, connection=site.source_dj())

    @schema
    class Session(dj.Manual):
        definition = """
        session_id : int
        ---
        raw_file : filepath@stage
        settings : blob@raw
        """

        class Frame(dj.Part):
            definition = """
            -> master
            frame : smallint
            ---
            image : attach@raw
            """

    data: dict[str, bytes] = {}
    for i in (1, 2):
        path = staged / "sessions" / f"raw-{i}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(2000 + i))
        data[f"raw-{i}"] = path.read_bytes()
        image = tmp_path / f"frame-{i}-0.png"
        image.write_bytes(os.urandom(100 + i))
        data[f"frame-{i}-0"] = image.read_bytes()
        Session.insert1({"session_id": i, "raw_file": path, "settings": [i, i * 2]})
        Session.Frame.insert1({"session_id": i, "frame": 0, "image": image})
    site.connect_facade()

    @link(
        site.source_host,
        site.source_schema,
        site.helper_schema,
        "outbound",
        site.dest_schema,
        stores={"raw": "cloud", "stage": "dest_stage"},
    )
    class Session:  # type: ignore[no-redef]
        pass

    summary = (Session().source & {"session_id": 1}).pull()
    assert (summary.pulled, summary.failed) == (1, []), summary
    raw_file, settings = (Session & {"session_id": 1}).fetch1("raw_file", "settings")
    assert Path(raw_file).read_bytes() == data["raw-1"] and Path(dest_stage["stage"]) in Path(raw_file).parents
    assert list(settings) == [1, 2]
    download = tmp_path / "download"
    download.mkdir()
    image = (Session.Frame & {"session_id": 1}).fetch1("image", download_path=download)
    assert Path(image).read_bytes() == data["frame-1-0"]

    # Mirrored: a new frame of the shared session 1; DataJoint tracked its object in a transaction of its own.
    new_image = tmp_path / "frame-1-1.png"
    new_image.write_bytes(os.urandom(77))
    SourceSession = dj.create_virtual_module("src", site.source_schema, connection=site.source_dj()).Session
    SourceSession.Frame.insert1({"session_id": 1, "frame": 1, "image": new_image})
    wait_for(lambda: len(Session.Frame & {"session_id": 1}) == 2, 30, "the mirrored frame")
    image = (Session.Frame & {"session_id": 1, "frame": 1}).fetch1("image", download_path=download)
    assert Path(image).read_bytes() == new_image.read_bytes()
    # Objects of session 2 (not pulled) never left the source.
    assert len(Session.Frame & {"session_id": 2}) == 0


def test_an_applier_that_fails_on_a_broken_destination_store_loses_nothing_once_restarted(
    site: Site, stores: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """An unexpected failure (here the destination store's folder is a file) stops the applier; it must not
    store offsets past the unit it was applying, so that after a restart the unit is applied."""
    site.start("capture", "agent")
    applier_env = {
        "DJLINK_SOURCE_STORES": json.dumps({"raw": stores["raw"]}),
        "DJLINK_DEST_STORES": json.dumps({"archive": stores["archive"]}),
    }
    applier = site.start("applier", **applier_env)
    Source, _ = declare_scenario_4(site, tmp_path / "files")
    site.connect_facade()
    Recording = linked(site)
    assert (Recording().source & {"recording_id": 1}).pull().pulled == 1

    # The destination schema's folder in the store becomes a file: copying a new object fails with OSError.
    folder = Path(stores["archive"]["location"]) / site.dest_schema
    folder.rename(tmp_path / "saved")
    folder.write_text("not a folder")
    image = tmp_path / "files" / "image-1-1.png"
    image.write_bytes(os.urandom(99))
    Source.Scan.insert1({"recording_id": 1, "scan": 1, "image": image})  # mirrored: entity 1 is shared
    assert applier.wait(60) != 0

    folder.unlink()
    (tmp_path / "saved").rename(folder)
    site.start("applier", **applier_env)
    wait_for(lambda: len(Recording.Scan & {"recording_id": 1}) == 2, 60, "the mirrored scan after the restart")
    fetched = (Recording.Scan & {"recording_id": 1, "scan": 1}).fetch1("image", download_path=tmp_path / "dl")
    assert Path(fetched).read_bytes() == image.read_bytes()
