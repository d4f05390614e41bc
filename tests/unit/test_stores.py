"""Where DataJoint 0.14 keeps objects, and the content hashes it gives them (foundation.stores), without services."""

from __future__ import annotations

import filecmp
import hashlib
import tracemalloc
from pathlib import Path

import pytest
from datajoint.hash import uuid_from_buffer

from foundation.stores import CHUNK, ObjectError, Store, StoreError, Stores, copy_object, kind, mismatch, relative_path


def test_paths_are_datajoints() -> None:
    blob = b"\x01" * 10
    h = uuid_from_buffer(blob)
    assert relative_path({"hash": h.bytes}, "lab") == f"lab/{h.hex[:2]}/{h.hex[2:4]}/{h.hex}"
    assert relative_path({"hash": h.bytes}, "lab", (3,)) == f"lab/{h.hex[:3]}/{h.hex}"
    a = uuid_from_buffer(blob, init_string="x.png\0")
    row = {"hash": a.bytes, "attachment_name": "x.png"}
    assert kind(row) == "attach" and relative_path(row, "lab") == f"lab/{a.hex[:2]}/{a.hex[2:4]}/{a.hex}.x.png"
    path_row = {"hash": uuid_from_buffer(init_string="raw/a.dat").bytes, "filepath": "raw/a.dat"}
    assert kind(path_row) == "filepath" and relative_path(path_row, "lab") == "raw/a.dat"


def test_content_hashes_are_checked_as_datajoint_computed_them() -> None:
    content = b"some bytes"
    assert mismatch({"hash": uuid_from_buffer(content).bytes, "size": len(content)}, content) is None
    attach = {"hash": uuid_from_buffer(content, init_string="a.txt\0").bytes, "attachment_name": "a.txt"}
    assert mismatch(attach, content) is None
    assert "content hash" in (mismatch(attach, b"other byte") or "")
    assert "size" in (mismatch({"hash": uuid_from_buffer(content).bytes, "size": 3}, content) or "")
    path = {"hash": b"\0" * 16, "filepath": "f", "contents_hash": uuid_from_buffer(content).bytes, "size": None}
    assert mismatch(path, content) is None and mismatch(path, b"x") is not None
    assert mismatch({**path, "contents_hash": None}, b"anything") is None  # DataJoint skipped it: size only


def test_copy_writes_only_verified_objects(tmp_path: Path) -> None:
    source = Store("raw", {"protocol": "file", "location": str(tmp_path / "a")})
    target = Store("archive", {"protocol": "file", "location": str(tmp_path / "b")})
    content = b"payload"
    row = {"hash": uuid_from_buffer(content).bytes, "size": len(content)}
    with pytest.raises(ObjectError, match="missing"):
        copy_object(row, source, "src", target, "dst")
    source.put(relative_path(row, "src"), b"PAYLOAD")
    with pytest.raises(ObjectError, match="content hash"):
        copy_object(row, source, "src", target, "dst")
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]  # not even a temporary file
    source.put(relative_path(row, "src"), content)
    assert copy_object(row, source, "src", target, "dst") == len(content)
    assert target.get(relative_path(row, "dst")) == content


def test_a_large_object_streams_through_a_bounded_buffer_and_a_bad_one_leaves_no_file(tmp_path: Path) -> None:
    source = Store("raw", {"protocol": "file", "location": str(tmp_path / "a")})
    target = Store("archive", {"protocol": "file", "location": str(tmp_path / "b")})
    size = 64 * CHUNK + 123
    path = tmp_path / "a" / "raw" / "big.dat"
    path.parent.mkdir(parents=True)
    digest = hashlib.md5()
    with open(path, "wb") as f:
        for i in range(65):
            block = bytes([i]) * min(CHUNK, size - i * CHUNK)
            digest.update(block)
            f.write(block)
    row = {"hash": b"\0" * 16, "filepath": "raw/big.dat", "contents_hash": digest.digest(), "size": size}

    tracemalloc.start()
    try:
        assert copy_object(row, source, "src", target, "dst") == size
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * CHUNK, f"copying {size} bytes held {peak} bytes"
    assert filecmp.cmp(path, tmp_path / "b" / "raw" / "big.dat", shallow=False)

    # The last byte differs: found only at the end of the stream, and still nothing appears.
    with open(path, "r+b") as f:
        f.seek(size - 1)
        f.write(b"X")
    (tmp_path / "b" / "raw" / "big.dat").unlink()
    with pytest.raises(ObjectError, match="content hash"):
        copy_object(row, source, "src", target, "dst")
    assert not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]


def test_store_settings_errors_say_what_to_fix() -> None:
    with pytest.raises(StoreError, match="DJLINK_DEST_STORES"):
        Stores({}, "DJLINK_DEST_STORES")["archive"]
    with pytest.raises(StoreError, match="protocol"):
        Store("x", {"protocol": "ftp", "location": "/"})
    with pytest.raises(StoreError, match="bucket"):
        Store("x", {"protocol": "s3", "location": "l", "endpoint": "e", "access_key": "a", "secret_key": "s"})


def test_objects_are_foldered_as_datajoint_folders_them() -> None:
    import datajoint.external

    from foundation.stores import subfold

    for name, folds in [("aBCdefg", (2, 3)), ("0123456789abcdef", (2, 2)), ("x", ()), ("abcdef", (1, 1, 1))]:
        assert subfold(name, folds) == datajoint.external.subfold(name, folds)
