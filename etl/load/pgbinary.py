"""Arrow batches in PostgreSQL's binary COPY format, built column-wise in C++ and numpy.

The binary format is what a ``COPY ... (FORMAT binary)`` pipe sends: no text for the server to
parse, bytea as it is rather than doubled into hex, timestamps as integers. A row is a field
count followed by (length, bytes) per field, length -1 for NULL. The bytes of known width (length
words, integers, timestamps) are packed per row into numpy blocks, fixed-width columns first so
that one block holds them all; ``binary_join_element_wise`` lays the blocks and the variable
values of a row side by side, so no Python runs per row. A field's encoding depends on the
target column's type, reflected from the target (an upgraded database says JSON where a fresh
one says JSONB), so a type without an encoding is refused before any row is sent.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
TRAILER = b"\xff\xff"
_EPOCH_2000_US = 946_684_800_000_000

@dataclasses.dataclass
class Field:
    """One column of a part, encoded: per row, ``head`` (the length word and any bytes of known
    width) cut to ``keep`` where it is given, then the row's ``values`` if the column has them."""

    head: np.ndarray
    keep: np.ndarray | None = None
    values: pa.Array | None = None


Encoder = Callable[[pa.Array], Field]


def encoders(table: sa.Table, names: list[str]) -> list[Encoder]:
    """One field encoder per column, chosen by the target column's PostgreSQL type."""
    out = []
    for name in names:
        encoder = _encoder(table.c[name].type)
        if encoder is None:
            raise TypeError(f"{table.name}.{name}: no binary COPY encoding for type {table.c[name].type}")
        out.append(encoder)
    return out


def copy_order(table: sa.Table, names: list[str]) -> list[str]:
    """The columns in the order to send them: those of fixed width first, so that one block per row
    holds all of them and the first length word of the rest."""
    return sorted(names, key=lambda n: _encoder(table.c[n].type) in _VARIABLE)


def stream(batch: pa.RecordBatch, codecs: list[Encoder], part_bytes: int) -> Iterator[bytes]:
    """The whole COPY payload in parts of about ``part_bytes``: signature first, trailer last.

    Heads in a row are packed into one block until a column with values comes, so a part is
    joined from as few arrays as there are such columns, plus one.
    """
    yield SIGNATURE
    count = np.frombuffer(len(codecs).to_bytes(2, "big"), np.uint8)
    rows_per_part = max(1, part_bytes * batch.num_rows // max(1, batch.nbytes))
    for start in range(0, batch.num_rows, rows_per_part):
        part = batch.slice(start, rows_per_part)
        n = part.num_rows
        pieces: list[pa.Array] = []
        pending = [Field(np.tile(count, (n, 1)))]
        for codec, col in zip(codecs, part.columns):
            field = codec(col)
            pending.append(field)
            if field.values is not None:
                pieces += [_block(pending), field.values]
                pending = []
        if pending:
            pieces.append(_block(pending))
        rows = pc.binary_join_element_wise(*pieces, pa.scalar(b"", pa.large_binary())) if len(pieces) > 1 else pieces[0]
        offsets = np.frombuffer(rows.buffers()[1], np.int64)[rows.offset:rows.offset + n + 1]
        yield memoryview(rows.buffers()[2])[offsets[0]:offsets[-1]].tobytes()
    yield TRAILER


def _jsonb(arr: pa.Array) -> Field:
    return _var(arr, b"\x01")  # jsonb's binary form: a version byte, then the text


def _bytes(arr: pa.Array) -> Field:
    return _var(arr, b"")


_VARIABLE = (_jsonb, _bytes)


def _encoder(sa_type) -> Encoder | None:
    name = type(sa_type).__name__.upper()
    if name == "JSONB":
        return _jsonb
    if name == "UUID":
        return _uuid
    if isinstance(sa_type, (sa.JSON, sa.String, sa.Enum, sa.LargeBinary)):
        return _bytes
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


def _valid(arr: pa.Array) -> np.ndarray | None:
    """Which rows hold a value; None when all do."""
    if arr.null_count == 0:
        return None
    return arr.is_valid().to_numpy(zero_copy_only=False)


def _length_words(sizes: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    if valid is not None:
        sizes = np.where(valid, sizes, -1)
    return sizes.astype(">i4").view(np.uint8).reshape(len(sizes), 4)


def _headed(valid: np.ndarray | None, body: np.ndarray, sizes: np.ndarray | None = None) -> Field:
    """The length word (``sizes``, else the width of ``body``) then ``body``'s bytes; a NULL row
    keeps the word (-1) alone."""
    n, width = body.shape
    head = np.concatenate([_length_words(np.full(n, width) if sizes is None else sizes, valid), body], axis=1)
    if valid is None:
        return Field(head)
    keep = np.ones(head.shape, bool)
    keep[:, 4:] = valid[:, None]
    return Field(head, keep)


def _fixed(arr: pa.Array, dtype: str) -> Field:
    values = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(dtype)
    return _headed(_valid(arr), values.view(np.uint8).reshape(len(arr), values.dtype.itemsize))


def _timestamp(arr: pa.Array) -> Field:
    """Microseconds since 2000-01-01; Arrow keeps zoned timestamps in UTC, as timestamptz wants."""
    us = arr.cast(pa.timestamp("us", arr.type.tz)).cast(pa.int64())
    return _fixed(pc.subtract(us, pa.scalar(_EPOCH_2000_US, pa.int64())), ">i8")


def _uuid(arr: pa.Array) -> Field:
    """16 bytes from the text form, the hex of the whole column parsed in one call."""
    hexed = pc.replace_substring(arr.cast(pa.string()).fill_null("0" * 32), pattern="-", replacement="")
    if pc.all(pc.equal(pc.utf8_length(hexed), 32)).as_py() is False:
        raise ValueError("a uuid column holds a value that is not 32 hex digits")
    offsets = np.frombuffer(hexed.buffers()[1], np.int32)[hexed.offset:hexed.offset + len(hexed) + 1]
    text = hexed.buffers()[2].to_pybytes()[offsets[0]:offsets[-1]] if len(hexed) else b""
    return _headed(_valid(arr), np.frombuffer(bytes.fromhex(text.decode("ascii")), np.uint8).reshape(len(arr), 16))


def _var(arr: pa.Array, prefix: bytes) -> Field:
    """The length word (and ``prefix``) in the head, the values themselves after it."""
    valid = _valid(arr)
    if not (pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
        arr = arr.cast(pa.large_string())
    values = arr.cast(pa.large_binary()).fill_null(b"")
    sizes = pc.binary_length(values).to_numpy(zero_copy_only=False) + len(prefix)
    field = _headed(valid, np.tile(np.frombuffer(prefix, np.uint8), (len(arr), 1)), sizes)
    field.values = values
    return field


def _block(fields: list[Field]) -> pa.Array:
    """The heads of consecutive fields side by side, each row cut to what it keeps, as one binary array."""
    dense = np.concatenate([f.head for f in fields], axis=1) if len(fields) > 1 else fields[0].head
    n, width = dense.shape
    if all(f.keep is None for f in fields):
        data, lengths = np.ascontiguousarray(dense).ravel(), np.full(n, width, np.int64)
    else:
        keep = np.concatenate([f.keep if f.keep is not None else np.ones(f.head.shape, bool) for f in fields], axis=1)
        data, lengths = dense[keep], keep.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
