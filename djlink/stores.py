"""External stores: where DataJoint 0.14 keeps in-store attributes, and copying one object between two stores.

An in-store attribute (`blob@store`, `attach@store`, `filepath@store`) is a
binary(16) uuid in the row, with a foreign key to the schema's
`~external_<store>` table; that tracking row (hash, size, attachment_name,
filepath, contents_hash) says which object it is. The object lives at

    blob       {location}/{database}/{subfolding of the hash}/{hash hex}
    attach     the same, with the suffix `.{attachment_name}`
    filepath   {location}/{filepath}

and its content hash is the MD5 DataJoint computed when it stored it: of the
bytes (blob), of the attachment name, a NUL and the bytes (attach), of the
bytes in `contents_hash` (filepath, whose `hash` is that of its path). The
applier copies an object and checks that hash BEFORE the row referencing it
commits (`copy_object`).

Store specs are DataJoint's (`dj.config['stores'][name]`): protocol `file`
(location) or `s3` (endpoint, bucket, access_key, secret_key, location,
secure); S3 goes through DataJoint's own minio-based client.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from datajoint.external import subfold

DEFAULT_SUBFOLDING = (2, 2)  # DataJoint 0.14's default


class StoreError(Exception):
    """A store is not configured or not reachable; the message says which and how to fix it."""


class ObjectError(Exception):
    """An object is missing or does not match its tracking row; the message says which and why."""


def kind(row: Mapping[str, Any]) -> str:
    """'attach', 'filepath' or 'blob': what a `~external` tracking row describes (as DataJoint tells them apart)."""
    if row.get("attachment_name"):
        return "attach"
    if row.get("filepath"):
        return "filepath"
    return "blob"


def relative_path(row: Mapping[str, Any], database: str, subfolding: Any = DEFAULT_SUBFOLDING) -> str:
    """Where the object of a tracking row lives, relative to the store's location, in schema `database`."""
    if kind(row) == "filepath":
        return str(PurePosixPath(row["filepath"]))
    hexed = uuid.UUID(bytes=bytes(row["hash"])).hex
    path = PurePosixPath(database, "/".join(subfold(hexed, tuple(subfolding or ()))), hexed)
    return str(path.with_suffix("." + row["attachment_name"]) if kind(row) == "attach" else path)


def mismatch(row: Mapping[str, Any], content: bytes) -> str | None:
    """Why `content` is not the object of the tracking row `row`; None when it is."""
    if row.get("size") is not None and int(row["size"]) != len(content):
        return f"size {len(content)} bytes, tracked as {row['size']}"
    what = kind(row)
    if what == "filepath":
        expected = row.get("contents_hash")
        if expected is None:  # DataJoint skips the checksum of files over its size limit: the size must do
            return None
    else:
        expected = row["hash"]
    digest = hashlib.md5(row["attachment_name"].encode() + b"\0") if what == "attach" else hashlib.md5()
    digest.update(content)
    if digest.digest() != bytes(expected):
        return f"content hash {uuid.UUID(bytes=digest.digest())}, tracked as {uuid.UUID(bytes=bytes(expected))}"
    return None


class Store:
    """One configured store: read and write objects by their path relative to its location."""

    def __init__(self, name: str, spec: Mapping[str, Any]) -> None:
        self.name = name
        self.spec = dict(spec)
        self.protocol = str(spec.get("protocol", "")).lower()
        if self.protocol not in ("file", "s3"):
            raise StoreError(f"store '{name}': protocol {spec.get('protocol')!r} is not 'file' or 's3'")
        missing = [
            k
            for k in ("location",)
            + (("endpoint", "bucket", "access_key", "secret_key") if self.protocol == "s3" else ())
            if k not in spec
        ]
        if missing:
            raise StoreError(f"store '{name}' lacks {', '.join(missing)} in its spec")
        self.subfolding = spec.get("subfolding", DEFAULT_SUBFOLDING)
        self._s3: Any = None

    def _folder(self) -> Any:
        if self._s3 is None:
            from datajoint import s3  # minio is imported only when a store needs it

            try:
                self._s3 = s3.Folder(**self.spec)
            except Exception as exc:
                raise StoreError(f"store '{self.name}': cannot reach bucket {self.spec['bucket']!r}: {exc}") from None
        return self._s3

    def _full(self, relative: str) -> str:
        if self.protocol == "file":
            return str(Path(self.spec["location"], relative))
        return str(PurePosixPath(str(self.spec["location"]).lstrip("/"), relative))

    def get(self, relative: str) -> bytes:
        path = self._full(relative)
        if self.protocol == "file":
            try:
                return Path(path).read_bytes()
            except FileNotFoundError:
                raise ObjectError(f"missing in store '{self.name}': {path}") from None
        from datajoint.errors import MissingExternalFile

        try:
            data: bytes = self._folder().get(path)
        except MissingExternalFile:
            raise ObjectError(f"missing in store '{self.name}': {path}") from None
        return data

    def put(self, relative: str, content: bytes) -> None:
        """Write an object whole: a reader never sees part of it (a temporary file renamed, or one S3 PUT)."""
        path = self._full(relative)
        if self.protocol == "s3":
            self._folder().put(path, content)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class Stores:
    """The stores a process knows, by name, from a {name: spec} mapping (DJLINK_SOURCE_STORES / DJLINK_DEST_STORES)."""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]], setting: str) -> None:
        self._specs = specs
        self._setting = setting
        self._stores: dict[str, Store] = {}

    def __getitem__(self, name: str) -> Store:
        if name not in self._stores:
            if name not in self._specs:
                raise StoreError(
                    f"store '{name}' is not configured: add it to {self._setting} (as in dj.config['stores'])"
                )
            self._stores[name] = Store(name, self._specs[name])
        return self._stores[name]


def copy_object(row: Mapping[str, Any], source: Store, source_db: str, destination: Store, destination_db: str) -> int:
    """Copy the object of tracking row `row` between stores, verified by its content hash before it is written.

    Returns the bytes copied. Raises ObjectError (missing or not matching: nothing written) or StoreError.
    """
    content = source.get(relative_path(row, source_db, source.subfolding))
    reason = mismatch(row, content)
    if reason is not None:
        raise ObjectError(
            f"{kind(row)} {relative_path(row, source_db, source.subfolding)} in store '{source.name}': {reason}"
        )
    destination.put(relative_path(row, destination_db, destination.subfolding), content)
    return len(content)
