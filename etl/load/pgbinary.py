"""Arrow batches in PostgreSQL's binary COPY format, built column-wise in C++ and numpy.

The binary format is what a ``COPY ... (FORMAT binary)`` pipe sends: no text for the server to
parse, bytea as it is rather than doubled into hex, timestamps as integers. A row is a field
count followed by (length, bytes) per field, length -1 for NULL. Each column becomes Arrow
binary arrays (the length words, then the values) and ``binary_join_element_wise`` lays the
columns of a row side by side, so no Python runs per row. A field's encoding depends on the
target column's type, reflected from the target (an upgraded database says JSON where a fresh
one says JSONB), so a type without an encoding is refused before any row is sent.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
TRAILER = b"\xff\xff"
_EPOCH_2000_US = 946_684_800_000_000

Encoder = Callable[[pa.Array], list]


def encoders(table: sa.Table, names: list[str]) -> list[Encoder]:
    """One field encoder per column, chosen by the target column's PostgreSQL type."""
    out = []
    for name in names:
        encoder = _encoder(table.c[name].type)
        if encoder is None:
            raise TypeError(f"{table.name}.{name}: no binary COPY encoding for type {table.c[name].type}")
        out.append(encoder)
    return out


def stream(batch: pa.RecordBatch, codecs: list[Encoder], part_bytes: int) -> Iterator[bytes]:
    """The whole COPY payload in parts of about ``part_bytes``: signature first, trailer last."""
    yield SIGNATURE
    count = np.frombuffer(len(codecs).to_bytes(2, "big"), np.uint8)
    rows_per_part = max(1, part_bytes * batch.num_rows // max(1, batch.nbytes))
    for start in range(0, batch.num_rows, rows_per_part):
        part = batch.slice(start, rows_per_part)
        n = part.num_rows
        fields = [_prefixes(np.tile(count, (n, 1)), np.full(n, 2))]
        for codec, col in zip(codecs, part.columns):
            fields.extend(codec(col))
        rows = pc.binary_join_element_wise(*fields, pa.scalar(b"", pa.large_binary()))
        offsets = np.frombuffer(rows.buffers()[1], np.int64)[rows.offset:rows.offset + n + 1]
        yield memoryview(rows.buffers()[2])[offsets[0]:offsets[-1]].tobytes()
    yield TRAILER


def _encoder(sa_type) -> Encoder | None:
    name = type(sa_type).__name__.upper()
    if name == "JSONB":
        return lambda a: _var(a, b"\x01")  # jsonb's binary form: a version byte, then the text
    if name == "UUID":
        return _uuid
    if isinstance(sa_type, (sa.JSON, sa.String, sa.Enum)):
        return lambda a: _var(a, b"")
    if isinstance(sa_type, sa.LargeBinary):
        return lambda a: _var(a, b"")
    if isinstance(sa_type, sa.Boolean):
        return lambda a: _fixed(a.cast(pa.uint8()), ">u1")
    if isinstance(sa_type, sa.DateTime):
        return _timestamp
    for kind, arrow, dtype in ((sa.SmallInteger, pa.int16(), ">i2"), (sa.BigInteger, pa.int64(), ">i8"),
                               (sa.Integer, pa.int32(), ">i4")):
        if isinstance(sa_type, kind):
            return lambda a, arrow=arrow, dtype=dtype: _fixed(a.cast(arrow), dtype)  # cast raises on overflow
    if name == "REAL":
        return lambda a: _fixed(a.cast(pa.float32()), ">f4")
    if isinstance(sa_type, sa.Float):
        return lambda a: _fixed(a.cast(pa.float64()), ">f8")
    return None


def _valid(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), bool)
    return arr.is_valid().to_numpy(zero_copy_only=False)


def _length_words(sizes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.where(valid, sizes, -1).astype(">i4").view(np.uint8).reshape(len(sizes), 4)


def _fixed(arr: pa.Array, dtype: str) -> list:
    valid = _valid(arr)
    values = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(dtype)
    width = values.dtype.itemsize
    dense = np.concatenate([_length_words(np.full(len(arr), width), valid),
                            values.view(np.uint8).reshape(len(arr), width)], axis=1)
    return [_prefixes(dense, np.where(valid, 4 + width, 4))]


def _timestamp(arr: pa.Array) -> list:
    """Microseconds since 2000-01-01; Arrow keeps zoned timestamps in UTC, as timestamptz wants."""
    us = arr.cast(pa.timestamp("us", arr.type.tz)).cast(pa.int64())
    return _fixed(pc.subtract(us, pa.scalar(_EPOCH_2000_US, pa.int64())), ">i8")


def _uuid(arr: pa.Array) -> list:
    """16 bytes from the text form, the hex of the whole column parsed in one call."""
    valid = _valid(arr)
    hexed = pc.replace_substring(arr.cast(pa.string()).fill_null("0" * 32), "-", "")
    if pc.all(pc.equal(pc.utf8_length(hexed), 32)).as_py() is False:
        raise ValueError("a uuid column holds a value that is not 32 hex digits")
    offsets = np.frombuffer(hexed.buffers()[1], np.int32)[hexed.offset:hexed.offset + len(hexed) + 1]
    text = hexed.buffers()[2].to_pybytes()[offsets[0]:offsets[-1]] if len(hexed) else b""
    values = np.frombuffer(bytes.fromhex(text.decode("ascii")), np.uint8).reshape(len(arr), 16)
    dense = np.concatenate([_length_words(np.full(len(arr), 16), valid), values], axis=1)
    return [_prefixes(dense, np.where(valid, 20, 4))]


def _var(arr: pa.Array, prefix: bytes) -> list:
    """Length words (and ``prefix``) as one array, the values themselves as the next."""
    valid = _valid(arr)
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        arr = arr.cast(pa.large_string())
    values = arr.cast(pa.large_binary()).fill_null(b"")
    sizes = pc.binary_length(values).to_numpy(zero_copy_only=False) + len(prefix)
    head = _length_words(sizes, valid)
    if prefix:
        head = np.concatenate([head, np.tile(np.frombuffer(prefix, np.uint8), (len(arr), 1))], axis=1)
    return [_prefixes(head, np.where(valid, head.shape[1], 4)), values]


def _prefixes(dense: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """Row i of ``dense`` cut to ``lengths[i]`` bytes, as a binary array."""
    keep = np.arange(dense.shape[1]) < lengths[:, None]
    data = np.ascontiguousarray(dense[keep])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return pa.Array.from_buffers(pa.large_binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
