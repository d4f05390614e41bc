"""Row images of binlog rows events, decoded by a reader compiled once per table map.

python-mysql-replication decodes every value through a chain of type tests and
one buffered packet read per column; that was more than half of the capture's
CPU time. Here the event's body is taken in one read and each column is decoded
by a function chosen once per table map, from the same column metadata. The
values are exactly the library's, with `cdc.decoders`' TIME(fsp) correction
(`tests/integration/test_row_decoder.py` compares both on every type), but where
the library differs from what the server itself gives (a SELECT, as snapshot
reads do): an empty binary value is b'' (the library: ''), YEAR 0000 is 0 (1900),
a SET is its members in definition order ('' when empty; the library: a Python
set, None), and latin1's five bytes undefined in cp1252 decode to their code
points (the library fails). Tables with a column type this module does not know
(BIT, GEOMETRY, MySQL's binary JSON, the pre-5.6 temporal formats), or a row
image that is not FULL, fall back to the library.
"""

from __future__ import annotations

import codecs
import datetime as dt
import struct
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from pymysqlreplication.constants import FIELD_TYPE
from pymysqlreplication.row_event import DeleteRowsEvent, RowsEvent, UpdateRowsEvent

from cdc.decoders import time2

# A column reader: (event body, offset) -> (value, offset after it).
Reader = Callable[[bytes, int], tuple[Any, int]]
Row = dict[str, Any]


def _fixed(fmt: str) -> Reader:
    s = struct.Struct(fmt)
    unpack, size = s.unpack_from, s.size

    def read(b: bytes, p: int) -> tuple[Any, int]:
        return unpack(b, p)[0], p + size

    return read


def _int24(signed: bool) -> Reader:
    def read(b: bytes, p: int) -> tuple[Any, int]:
        return int.from_bytes(b[p : p + 3], "little", signed=signed), p + 3

    return read


def _undefined_as_code_point(error: UnicodeError) -> tuple[str, int]:
    """MariaDB's latin1 is cp1252 with its five undefined bytes (0x81, 0x8D, 0x8F, 0x90, 0x9D) mapped to the
    code points of the same number, as the server converts them; Python's cp1252 refuses them."""
    assert isinstance(error, UnicodeDecodeError)
    return "".join(chr(c) for c in error.object[error.start : error.end]), error.end


codecs.register_error("djlink-latin1", _undefined_as_code_point)


def _text(length_size: int, encoding: str | None) -> Reader:
    """A length-prefixed string: decoded as the server converts it (the library does so too, but for latin1's
    five undefined bytes, where it fails), or bytes for a binary charset."""
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:  # the library keeps the bytes when Python has no such codec ("binary")
            encoding = None
    errors = "djlink-latin1" if encoding == "cp1252" else "strict"

    def read(b: bytes, p: int) -> tuple[Any, int]:
        end = p + length_size
        n = int.from_bytes(b[p:end], "little")
        value = b[end : end + n]
        return (value if encoding is None else value.decode(encoding, errors)), end + n

    return read


def _fraction(fsp: int) -> tuple[int, Callable[[bytes, int], int]]:
    """Bytes and reader of the fractional seconds after DATETIME2, TIME2 and TIMESTAMP2 (library's __read_fsp)."""
    n = (fsp + 1) // 2
    scale = 10 ** (6 - fsp)

    def micros(b: bytes, p: int) -> int:
        if n == 0:
            return 0
        value = int.from_bytes(b[p : p + n], "big", signed=True)
        if fsp % 2:
            value = int(value / 10)
        return value * scale

    return n, micros


def _datetime2(fsp: int) -> Reader:
    n, micros = _fraction(fsp)

    def read(b: bytes, p: int) -> tuple[Any, int]:
        data = int.from_bytes(b[p : p + 5], "big")
        year_month = (data >> 22) & 0x1FFFF
        try:
            value = dt.datetime(
                year_month // 13,
                year_month % 13,
                (data >> 17) & 31,
                (data >> 12) & 31,
                (data >> 6) & 63,
                data & 63,
            )
        except ValueError:  # a zero date: the library gives None
            return None, p + 5 + n
        us = micros(b, p + 5)
        return (value.replace(microsecond=us) if us > 0 else value), p + 5 + n

    return read


def _timestamp2(fsp: int) -> Reader:
    n, micros = _fraction(fsp)

    def read(b: bytes, p: int) -> tuple[Any, int]:
        value = dt.datetime.utcfromtimestamp(int.from_bytes(b[p : p + 4], "big", signed=True))
        us = micros(b, p + 4)
        return (value.replace(microsecond=us) if us > 0 else value), p + 4 + n

    return read


def _time2(fsp: int) -> Reader:
    n = (fsp + 1) // 2
    width = 3 + n

    def read(b: bytes, p: int) -> tuple[Any, int]:
        return time2(int.from_bytes(b[p : p + width], "big"), n), p + width

    return read


def _date(b: bytes, p: int) -> tuple[Any, int]:
    v = int.from_bytes(b[p : p + 3], "little")
    year, month, day = (v >> 9) & 0x7FFF, (v >> 5) & 15, v & 31
    if year == 0 or month == 0 or day == 0:  # zero dates: the library gives None
        return None, p + 3
    return dt.date(year, month, day), p + 3


def _year(b: bytes, p: int) -> tuple[Any, int]:
    return (b[p] + 1900 if b[p] else 0), p + 1  # YEAR 0000 is stored as 0 (the library gives 1900)


_COMPRESSED = (0, 1, 1, 2, 2, 3, 3, 4, 4, 4)  # bytes of a group of 0..9 decimal digits


def _decimal(precision: int, decimals: int) -> Reader:
    """MariaDB's packed DECIMAL, built into the library's exact string before Decimal() parses it."""
    integral = precision - decimals
    whole_int, whole_frac = integral // 9, decimals // 9
    left_int, left_frac = integral - whole_int * 9, decimals - whole_frac * 9
    head, tail = _COMPRESSED[left_int], _COMPRESSED[left_frac]
    size = head + 4 * (whole_int + whole_frac) + tail

    def read(b: bytes, p: int) -> tuple[Any, int]:
        raw = bytearray(b[p : p + size])
        negative = not raw[0] & 0x80
        mask = -1 if negative else 0
        raw[0] ^= 0x80
        parts = ["-"] if negative else []
        q = 0
        if head:
            parts.append(str(int.from_bytes(raw[:head], "big", signed=True) ^ mask))
            q = head
        for _ in range(whole_int):
            parts.append(f"{int.from_bytes(raw[q : q + 4], 'big', signed=True) ^ mask:09d}")
            q += 4
        parts.append(".")
        for _ in range(whole_frac):
            parts.append(f"{int.from_bytes(raw[q : q + 4], 'big', signed=True) ^ mask:09d}")
            q += 4
        if tail:
            parts.append(f"{int.from_bytes(raw[q : q + tail], 'big', signed=True) ^ mask:0{left_frac}d}")
        return Decimal("".join(parts)), p + size

    return read


def _enum(size: int, values: Sequence[Any] | None) -> Reader:
    def read(b: bytes, p: int) -> tuple[Any, int]:
        index = int.from_bytes(b[p : p + size], "little")
        return (values[index] if values else None), p + size

    return read


def _set(size: int, values: Sequence[str]) -> Reader:
    """A SET as MariaDB writes it in text: its members in definition order, comma-separated; '' when empty
    (the library gives a Python set, None when empty)."""

    def read(b: bytes, p: int) -> tuple[Any, int]:
        bits = int.from_bytes(b[p : p + size], "little")
        return ",".join(v for i, v in enumerate(values) if bits >> i & 1), p + size

    return read


def _reader(column: Any) -> Reader | None:
    """The reader of one column from its table-map metadata, None for a type left to the library."""
    t, unsigned = column.type, column.unsigned
    if t == FIELD_TYPE.TINY:
        return _fixed("<B" if unsigned else "<b")
    if t == FIELD_TYPE.SHORT:
        return _fixed("<H" if unsigned else "<h")
    if t == FIELD_TYPE.INT24:
        return _int24(not unsigned)
    if t == FIELD_TYPE.LONG:
        return _fixed("<I" if unsigned else "<i")
    if t == FIELD_TYPE.LONGLONG:
        return _fixed("<Q" if unsigned else "<q")
    if t == FIELD_TYPE.FLOAT:
        return _fixed("<f")
    if t == FIELD_TYPE.DOUBLE:
        return _fixed("<d")
    if t in (FIELD_TYPE.VARCHAR, FIELD_TYPE.STRING, FIELD_TYPE.BLOB):
        size = column.length_size if t == FIELD_TYPE.BLOB else (2 if column.max_length > 255 else 1)
        name = column.character_set_name
        return _text(size, "utf-8" if name is None else RowsEvent.charset_to_encoding(name))
    if t == FIELD_TYPE.NEWDECIMAL:
        return _decimal(column.precision, column.decimals)
    if t == FIELD_TYPE.DATETIME2:
        return _datetime2(column.fsp)
    if t == FIELD_TYPE.TIMESTAMP2:
        return _timestamp2(column.fsp)
    if t == FIELD_TYPE.TIME2:
        return _time2(column.fsp)
    if t == FIELD_TYPE.DATE:
        return _date
    if t == FIELD_TYPE.YEAR:
        return _year
    if t == FIELD_TYPE.ENUM:
        return _enum(column.size, column.enum_values)
    if t == FIELD_TYPE.SET and column.set_values:
        return _set(column.size, column.set_values)
    return None


class RowReader:
    """Decodes the row images of one table map's rows events."""

    def __init__(self, names: list[str], readers: list[Reader]) -> None:
        self._plan = list(zip(names, readers, strict=True))
        self._null_bytes = (len(names) + 7) // 8
        self._all_present = (1 << len(names)) - 1

    @classmethod
    def compile(cls, columns: Sequence[Any]) -> RowReader | None:
        """A reader for a table map's columns, None when one of them is left to the library."""
        names, readers = [], []
        for column in columns:
            reader = _reader(column)
            if reader is None or not column.name:
                return None
            names.append(column.name)
            readers.append(reader)
        return cls(names, readers)

    def _image(self, body: bytes, p: int) -> tuple[Row, int]:
        end = p + self._null_bytes
        nulls = int.from_bytes(body[p:end], "little")
        p = end
        row: Row = {}
        bit = 1
        for name, read in self._plan:
            if nulls & bit:
                row[name] = None
            else:
                row[name], p = read(body, p)
            bit <<= 1
        return row, p

    def rows(self, event: Any) -> list[tuple[Row | None, Row | None]] | None:
        """(before, after) per row of a rows event, read from its unread body; None for a partial row image.

        Must be called before anything reads `event.rows` (both consume the body).
        """
        update = isinstance(event, UpdateRowsEvent)
        present = [event.columns_present_bitmap] + ([event.columns_present_bitmap2] if update else [])
        if any(int.from_bytes(b, "little") & self._all_present != self._all_present for b in present):
            return None
        packet = event.packet
        body = packet.read(event.event_size - packet.read_bytes)
        result: list[tuple[Row | None, Row | None]] = []
        p, end, image = 0, len(body), self._image
        if update:
            while p < end:
                before, p = image(body, p)
                after, p = image(body, p)
                result.append((before, after))
        elif isinstance(event, DeleteRowsEvent):
            while p < end:
                before, p = image(body, p)
                result.append((before, None))
        else:
            while p < end:
                after, p = image(body, p)
                result.append((None, after))
        return result


def decode_rows(event: Any, reader: RowReader | None) -> list[tuple[Row | None, Row | None]]:
    """(before, after) per row: by the table's compiled reader, or by the library where it has none or the
    row image is partial."""
    images = reader.rows(event) if reader is not None else None
    return images if images is not None else library_rows(event)


def library_rows(event: Any) -> list[tuple[Row | None, Row | None]]:
    """(before, after) per row as python-mysql-replication decodes them: the fallback."""
    if isinstance(event, UpdateRowsEvent):
        return [(row["before_values"], row["after_values"]) for row in event.rows]
    if isinstance(event, DeleteRowsEvent):
        return [(row["values"], None) for row in event.rows]
    return [(None, row["values"]) for row in event.rows]
