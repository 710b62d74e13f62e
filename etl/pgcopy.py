"""A PostgreSQL query's rows through ``COPY (query) TO STDOUT``, streamed in blocks of whole rows.

Fetching through the driver builds a Python object for every value and then an Arrow array
from them, which costs several times what the server spends producing the rows. One COPY
streams the rest of a table, and a thread receives it while the caller decodes and writes:
the server produces rows the whole time instead of waiting for each page's client work, and
the planner is asked for the table's index scan once. The driver hands over one message per
row, so the receiving thread also knows where each row ends.

Two decoders: CSV (``pgcsv``), parsed by Arrow's C++ reader, is the cheapest for rows of short
strings; binary (``decode`` here) ships bytea as its bytes, where text would double it into
hex, so it serves tables whose rows carry large byte values (xcom). Each column of a binary
COPY is cast in the query to the one PostgreSQL type whose binary form its Arrow type is
decoded from, and every column is a few vectorised gathers over the whole block.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from . import drivers

#: PostgreSQL's binary COPY signature, flags and header extension length, before the first row.
_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TRAILER = b"\xff\xff"
#: Microseconds and days from the Unix epoch to PostgreSQL's, 2000-01-01.
_EPOCH_US = 946_684_800_000_000
_EPOCH_DAYS = 10_957
_INFINITY = (np.iinfo(np.int64).max, np.iinfo(np.int64).min)

#: Arrow view arrays over foreign buffers (``from_buffers`` with data buffers) arrived in pyarrow 19;
#: with an older one (Airflow 2.10's constraints pin 16) every table is read as CSV.
SUPPORTED = tuple(int(p) for p in pa.__version__.split(".")[:2]) >= (19, 0)

_FIXED = {pa.int16(): ">i2", pa.int32(): ">i4", pa.int64(): ">i8", pa.float64(): ">f8", pa.date32(): ">i4"}


def usable(bind: sa.Engine) -> bool:
    return bind.dialect.name == "postgresql"


def wire(column: sa.ColumnElement, atype: pa.DataType) -> sa.ColumnElement:
    """``column`` cast to the PostgreSQL type ``decode`` reads for ``atype`` (a no-op when it is that type)."""
    if pa.types.is_timestamp(atype):
        target = pg.TIMESTAMP(timezone=atype.tz is not None)
    else:
        target = {pa.int16(): sa.SmallInteger(), pa.int32(): sa.Integer(), pa.int64(): sa.BigInteger(),
                  pa.float64(): pg.DOUBLE_PRECISION(), pa.bool_(): sa.Boolean(), pa.date32(): sa.Date(),
                  pa.binary(): pg.BYTEA()}.get(atype, sa.Text())
    return sa.cast(column, target)


def blocks(conn: sa.Connection, query: sa.Select, binary: bool, block_bytes: int,
           max_rows: int) -> Iterator[tuple[bytearray, np.ndarray]]:
    """The query's rows in blocks of whole rows: (bytes, where each row ends), a block closing at
    ``block_bytes`` or ``max_rows``; binary COPY's header and trailer are left out. ``conn``
    belongs to the receiving thread until the generator ends."""
    # The driver binds the parameters (COPY takes none of the server's): no literal of ours in the SQL.
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    box: queue.Queue = queue.Queue(maxsize=1)
    sink = _Blocks(box, block_bytes, max_rows, binary)

    def receive():
        try:
            drivers.copy_out(conn, f"COPY ({compiled}) TO STDOUT (FORMAT {'binary' if binary else 'csv'})",
                             compiled.params, sink)
            sink.flush()
            sink.put(None)
        except _Stopped:
            pass
        except BaseException as exc:  # raised in the caller's thread, after the blocks before it
            try:
                sink.put(exc)
            except _Stopped:
                pass

    worker = threading.Thread(target=receive, name="etl-copy-out", daemon=True)
    worker.start()
    try:
        while True:
            item = box.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        sink.stopped.set()
        worker.join()


class _Stopped(Exception):
    pass


class _Blocks:
    """The file the driver writes COPY data to, a message (one row) per ``write``."""

    def __init__(self, box: queue.Queue, block_bytes: int, max_rows: int, binary: bool):
        self.box, self.block_bytes, self.max_rows, self.binary = box, block_bytes, max_rows, binary
        self.stopped = threading.Event()
        self.buf, self.ends, self.started = bytearray(), [], not binary

    def write(self, row) -> None:
        if not self.started:  # binary: the header comes with the first row (or the trailer, for no rows)
            self.started = True
            if bytes(row[:len(_HEADER)]) != _HEADER:
                raise pa.ArrowInvalid("not a binary COPY stream")
            row = row[len(_HEADER):]
            if not len(row):
                return
        if self.binary and len(row) == 2 and bytes(row) == _TRAILER:
            return
        self.buf += row
        self.ends.append(len(self.buf))
        if len(self.buf) >= self.block_bytes or len(self.ends) >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if self.ends:
            self.put((self.buf, np.array(self.ends, np.int64)))
            self.buf, self.ends = bytearray(), []

    def put(self, item) -> None:
        while True:
            if self.stopped.is_set():
                raise _Stopped
            try:
                self.box.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


def decode(buf: bytearray, ends: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    """Binary rows ending at ``ends`` in ``buf``, columns in ``schema``'s order, as one batch of ``schema``.

    A value Arrow cannot hold the same way ('infinity' timestamps) raises ``pa.ArrowInvalid``."""
    n = len(ends)
    buf.extend(bytes(16))  # spare bytes: no gather of a short value runs off the end
    data = np.frombuffer(buf, np.uint8)
    pos = np.concatenate([[0], ends[:-1]]) + 2  # past each row's field count
    if n and (_ints(data, pos - 2, ">i2") != len(schema)).any():
        raise pa.ArrowInvalid(f"binary COPY rows do not have {len(schema)} fields")
    columns = []
    for field in schema:
        lengths = _ints(data, pos, ">i4").astype(np.int64)
        valid = lengths >= 0
        sizes = np.where(valid, lengths, 0)
        start = pos + 4
        columns.append(_column(data, start, sizes, valid, field.type))
        pos = start + sizes
    if not np.array_equal(pos, ends):
        raise pa.ArrowInvalid("binary COPY rows do not match the schema's columns")
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _ints(data: np.ndarray, pos: np.ndarray, dtype: str) -> np.ndarray:
    """The big-endian numbers starting at byte offsets ``pos``: one gather from a view with a
    one-byte stride, in which element i is the number that starts at byte i."""
    width = np.dtype(dtype).itemsize
    at = np.ndarray(shape=(len(data) - width + 1,), dtype=dtype, buffer=data, strides=(1,))
    return at[pos]


def _column(data: np.ndarray, start: np.ndarray, sizes: np.ndarray, valid: np.ndarray, atype: pa.DataType) -> pa.Array:
    mask = None if valid.all() else ~valid
    if pa.types.is_string(atype) or pa.types.is_binary(atype):
        return _texts(data, start, sizes, mask, atype)
    if pa.types.is_boolean(atype):
        _check(sizes, valid, 1)
        return pa.array(data[start] != 0, pa.bool_(), mask=mask)
    if pa.types.is_timestamp(atype):
        _check(sizes, valid, 8)
        raw = _ints(data, start, ">i8")
        if np.isin(raw[valid], _INFINITY).any():
            raise pa.ArrowInvalid("an infinite timestamp")
        return pa.array(np.where(valid, raw, 0) + _EPOCH_US, pa.int64(), mask=mask).view(atype)
    if atype in _FIXED:
        dtype = _FIXED[atype]
        _check(sizes, valid, np.dtype(dtype).itemsize)
        values = _ints(data, start, dtype)
        if pa.types.is_date(atype):
            return pa.array(values.astype(np.int32) + _EPOCH_DAYS, pa.int32(), mask=mask).view(atype)
        return pa.array(values.astype(np.dtype(dtype).newbyteorder("=")), atype, mask=mask)
    raise pa.ArrowInvalid(f"no binary COPY decoding for {atype}")


def _texts(data: np.ndarray, start: np.ndarray, sizes: np.ndarray, mask, atype: pa.DataType) -> pa.Array:
    """Variable-length values without touching them one by one: an Arrow view array (length, the
    first bytes, where the rest is) over the block, which Arrow's cast then packs into ``atype``,
    checking UTF-8 for strings."""
    n = len(sizes)
    if n and sizes.max() >= 1 << 31:
        raise pa.ArrowInvalid("a value of 2 GiB or more")
    views = np.empty((n, 4), np.int32)  # Arrow's 16-byte view: length, then 12 bytes inline or prefix, buffer, offset
    # The 12 bytes from each value's start; past a short value's length they are never read.
    views.view(np.uint8).reshape(n, 16)[:, 4:] = (
        np.ndarray(shape=(len(data) - 11,), dtype="V12", buffer=data, strides=(1,))[start].view(np.uint8).reshape(n, 12))
    views[:, 0] = sizes
    long = sizes > 12
    views[long, 2] = 0
    views[long, 3] = start[long]
    validity = None if mask is None else pa.py_buffer(np.packbits(~mask, bitorder="little"))
    view_type = pa.string_view() if pa.types.is_string(atype) else pa.binary_view()
    arr = pa.Array.from_buffers(view_type, n, [validity, pa.py_buffer(views), pa.py_buffer(data)],
                                null_count=0 if mask is None else int(mask.sum()))
    return arr.cast(atype)


def _check(sizes: np.ndarray, valid: np.ndarray, width: int) -> None:
    if (sizes[valid] != width).any():
        raise pa.ArrowInvalid(f"binary COPY values are not {width} bytes wide")
