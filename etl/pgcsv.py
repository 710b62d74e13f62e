"""CSV from ``COPY (query) TO STDOUT (FORMAT csv)`` parsed into Arrow by Arrow's C++ reader.

PostgreSQL's CSV keeps NULL (unquoted, empty) apart from the empty string (quoted), writes
timestamps with their UTC offset and bytea as ``\\x`` hex, so every type round-trips; for
narrow rows of short strings, Arrow's parser is the cheapest decoder there is. A value it
cannot parse (a year BC, an offset with seconds) raises ``pa.ArrowInvalid`` and the caller
reads those rows through the driver instead.
"""
from __future__ import annotations

import binascii

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

_CONVERT = dict(strings_can_be_null=True, quoted_strings_can_be_null=False, null_values=[""],
                true_values=["t"], false_values=["f"])


def parse(text: bytearray, rows: int, schema: pa.Schema) -> pa.RecordBatch:
    """``rows`` CSV rows in ``schema``'s column order as one batch of ``schema``."""
    wire = pa.schema([pa.field(f.name, pa.string() if pa.types.is_binary(f.type) else f.type) for f in schema])
    # Arrow's reader is a third faster when no value can hold a line break; one newline per row proves it.
    multiline = text.count(b"\n") != rows or b"\r" in text
    table = pacsv.read_csv(
        pa.py_buffer(text),
        read_options=pacsv.ReadOptions(column_names=schema.names, use_threads=False, block_size=max(len(text), 1 << 20)),
        parse_options=pacsv.ParseOptions(newlines_in_values=multiline),
        convert_options=pacsv.ConvertOptions(column_types=wire, **_CONVERT),
    )
    columns = [_unhex(table.column(f.name).combine_chunks()) if pa.types.is_binary(f.type)
               else table.column(f.name).combine_chunks() for f in schema]
    return pa.RecordBatch.from_arrays([c.cast(f.type) for c, f in zip(columns, schema)], schema=schema)


def _unhex(arr: pa.Array) -> pa.Array:
    """bytea's ``\\x0a1b`` text to bytes, the hex of the whole column decoded in one call."""
    if pa.types.is_null(arr.type) or len(arr) == 0:
        return pa.array([None] * len(arr), pa.binary())
    digits = pc.utf8_slice_codeunits(arr.fill_null("\\x"), start=2)
    offsets = np.frombuffer(digits.buffers()[1], np.int32)[digits.offset:digits.offset + len(digits) + 1]
    data = digits.buffers()[2]
    raw = binascii.a2b_hex(memoryview(data)[offsets[0]:offsets[-1]]) if data is not None else b""
    new_offsets = ((offsets - offsets[0]) // 2).astype(np.int32)
    out = pa.Array.from_buffers(pa.binary(), len(arr), [None, pa.py_buffer(new_offsets), pa.py_buffer(raw)])
    return pc.if_else(arr.is_valid(), out, pa.scalar(None, pa.binary())) if arr.null_count else out
