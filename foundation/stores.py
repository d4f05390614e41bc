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
commits (`copy_object`), streaming it: objects of any size pass through a
1 MiB buffer.

Store specs are DataJoint's (`dj.config['stores'][name]`): protocol `file`
(location) or `s3` (endpoint, bucket, access_key, secret_key, location,
secure); S3 goes through DataJoint's own minio-based client.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

DEFAULT_SUBFOLDING = (2, 2)  # DataJoint 0.14's default


def subfold(name: str, folds: tuple[int, ...]) -> tuple[str, ...]:
    """DataJoint 0.14's folders of an object: `subfold('aBCdefg', (2, 3))` is ('ab', 'cde').

    Written out here rather than imported: importing DataJoint logs to the terminal of every role that copies
    objects ("No config file was found"), and the layout is part of DataJoint's store format, which does not
    change within 0.14.
    """
    return (name[: folds[0]].lower(), *subfold(name[folds[0] :], folds[1:])) if folds else ()


CHUNK = 1 << 20  # bytes of an object held in memory at a time while it is copied
PART = 16 << 20  # bytes of an S3 upload part (minio holds one in memory); S3 wants at least 5 MiB


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


class Check:
    """The size and content hash of an object, computed as its bytes pass, against its tracking row."""

    def __init__(self, row: Mapping[str, Any]) -> None:
        self.row = row
        self.size = 0
        what = kind(row)
        # DataJoint skips the checksum of files over its size limit (contents_hash NULL): the size must do.
        self._expected = row.get("contents_hash") if what == "filepath" else row["hash"]
        self._digest = hashlib.md5(row["attachment_name"].encode() + b"\0") if what == "attach" else hashlib.md5()

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._expected is not None:
            self._digest.update(chunk)

    def mismatch(self) -> str | None:
        """Why the bytes seen are not the object of the tracking row; None when they are."""
        if self.row.get("size") is not None and int(self.row["size"]) != self.size:
            return f"size {self.size} bytes, tracked as {self.row['size']}"
        if self._expected is not None and self._digest.digest() != bytes(self._expected):
            return (
                f"content hash {uuid.UUID(bytes=self._digest.digest())}, "
                f"tracked as {uuid.UUID(bytes=bytes(self._expected))}"
            )
        return None


def mismatch(row: Mapping[str, Any], content: bytes) -> str | None:
    """Why `content` is not the object of the tracking row `row`; None when it is."""
    check = Check(row)
    check.update(content)
    return check.mismatch()


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

    def chunks(self, relative: str) -> Iterator[bytes]:
        """The object's bytes, CHUNK at a time: an object of any size passes through a bounded buffer."""
        path = self._full(relative)
        if self.protocol == "file":
            try:
                f = open(path, "rb")  # closed below, also when the caller stops early
            except FileNotFoundError:
                raise ObjectError(f"missing in store '{self.name}': {path}") from None
            with f:
                while chunk := f.read(CHUNK):
                    yield chunk
            return
        from minio.error import S3Error

        folder = self._folder()
        try:
            response = folder.client.get_object(folder.bucket, path)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                raise ObjectError(f"missing in store '{self.name}': {path}") from None
            raise StoreError(f"store '{self.name}': cannot read {path}: {exc}") from None
        try:
            yield from response.stream(CHUNK)
        finally:
            response.close()
            response.release_conn()

    def get(self, relative: str) -> bytes:
        return b"".join(self.chunks(relative))

    def size(self, relative: str) -> int | None:
        """The size of an object in bytes; None when the store does not have it."""
        path = self._full(relative)
        if self.protocol == "file":
            try:
                return os.stat(path).st_size
            except FileNotFoundError:
                return None
        from minio.error import S3Error

        try:
            stat = self._folder().stat(path)
        except S3Error as exc:
            raise StoreError(f"store '{self.name}': cannot look up {path}: {exc}") from None
        return None if stat is None else int(stat.size)

    def put_stream(self, relative: str, chunks: Iterable[bytes]) -> None:
        """Write an object from its bytes as they come. It appears whole, and only if `chunks` ends without
        an exception: a temporary file renamed (file), or an S3 upload in parts of PART bytes that is
        completed only after the last chunk (and abandoned when the chunks raise)."""
        path = self._full(relative)
        if self.protocol == "s3":
            folder = self._folder()
            folder.client.put_object(folder.bucket, path, _Reader(iter(chunks)), length=-1, part_size=PART)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put(self, relative: str, content: bytes) -> None:
        """Write an object whole: a reader never sees part of it."""
        self.put_stream(relative, [content])


class _Reader:
    """A file-like `read(n)` over an iterator of byte strings, as minio's streamed upload wants one."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        taken = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(self._buffer[:taken])
        del self._buffer[:taken]
        return data


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


def holds(store: Store, row: Mapping[str, Any], database: str) -> bool:
    """Whether `store` has the object of tracking row `row` in schema `database`, at its tracked size."""
    size = store.size(relative_path(row, database, store.subfolding))
    return size is not None and (row.get("size") is None or int(row["size"]) == size)


def verified(check: Check, chunks: Iterable[bytes], where: str) -> Iterator[bytes]:
    """The chunks, counted and checked against `check`'s tracking row as they pass: ObjectError at the first
    byte beyond the tracked size, or at the end when the size or the content hash differs."""
    size = check.row.get("size")
    limit = None if size is None else int(size)
    for chunk in chunks:
        check.update(chunk)
        if limit is not None and check.size > limit:
            raise ObjectError(f"{where}: more than the {limit} bytes tracked")
        yield chunk
    reason = check.mismatch()
    if reason is not None:
        raise ObjectError(f"{where}: {reason}")


def copy_object(row: Mapping[str, Any], source: Store, source_db: str, destination: Store, destination_db: str) -> int:
    """Copy the object of tracking row `row` between stores, verified by its content hash before it appears.

    The bytes stream through: memory stays bounded (CHUNK, or one S3 part) whatever the object's size.
    Returns the bytes copied. Raises ObjectError (missing or not matching: nothing written) or StoreError.
    """
    source_path = relative_path(row, source_db, source.subfolding)
    check = Check(row)
    where = f"{kind(row)} {source_path} in store '{source.name}'"
    destination.put_stream(
        relative_path(row, destination_db, destination.subfolding), verified(check, source.chunks(source_path), where)
    )
    return check.size
