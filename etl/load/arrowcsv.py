"""Arrow batches as the CSV that PostgreSQL's COPY reads, produced in C++ rather than row by row.

COPY's CSV form keeps NULL (unquoted empty) apart from the empty string (quoted ""), so
every non-null value is quoted. bytea has no CSV form but its hex text (``\\x0a1b``), which
pyarrow cannot produce; ``binary_to_pg_hex`` builds it with numpy over the whole buffer.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

_OPTIONS = pacsv.WriteOptions(include_header=False, quoting_style="all_valid", batch_size=8192)


def to_csv(batch: pa.RecordBatch) -> bytes:
    cols = [_plain(c) for c in batch.columns]
    out = io.BytesIO()
    pacsv.write_csv(pa.RecordBatch.from_arrays(cols, names=batch.schema.names), out, _OPTIONS)
    return out.getvalue()


def _plain(col: pa.Array) -> pa.Array:
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        return binary_to_pg_hex(col)
    if pa.types.is_timestamp(col.type) and col.type.tz is not None:
        # The same UTC instant without the zone: the writer formats zoned timestamps far slower,
        # and the session's time zone is UTC, so PostgreSQL reads it back as the same instant.
        return col.cast(pa.timestamp(col.type.unit))
    return col


def binary_to_pg_hex(arr: pa.Array) -> pa.Array:
    arr = arr.cast(pa.large_binary())
    n = len(arr)
    validity, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]:offsets[-1]] if data_buf is not None else np.empty(0, np.uint8)
    hexed = np.frombuffer(data.tobytes().hex().encode("ascii"), dtype=np.uint8)
    rel = (offsets - offsets[0]) * 2
    prefix_at = np.repeat(rel[:-1], 2)
    out = np.insert(hexed, prefix_at, np.tile(np.array([ord("\\"), ord("x")], np.uint8), n))
    new_offsets = rel + 2 * np.arange(n + 1, dtype=np.int64)
    validity = None if arr.null_count == 0 else pa.py_buffer(_bitmap(arr))
    return pa.Array.from_buffers(pa.large_string(), n, [validity, pa.py_buffer(new_offsets), pa.py_buffer(out)],
                                 null_count=arr.null_count)


def _bitmap(arr: pa.Array) -> bytes:
    return np.packbits(arr.is_valid().to_numpy(zero_copy_only=False), bitorder="little").tobytes()
