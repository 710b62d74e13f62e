"""A PostgreSQL query's rows as ``COPY (query) TO STDOUT`` CSV, parsed into Arrow by Arrow's C++ reader.

Fetching through the driver builds a Python object for every value and then an Arrow array
from them, which costs several times what the server spends producing the rows; COPY streams
the same rows as text that ``pyarrow.csv`` turns into typed columns without Python per value.
PostgreSQL's CSV keeps NULL (unquoted, empty) apart from the empty string (quoted), writes
timestamps with their UTC offset and bytea as ``\\x`` hex, so every type round-trips. A value
the reader cannot parse (a year before 1000, 'infinity') raises ``pa.ArrowInvalid`` and the
caller reads that page through the driver instead.
"""
from __future__ import annotations

import binascii
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import sqlalchemy as sa

from . import drivers

_CONVERT = dict(strings_can_be_null=True, quoted_strings_can_be_null=False, null_values=[""],
                true_values=["t"], false_values=["f"])


def usable(conn: sa.Connection) -> bool:
    return conn.dialect.name == "postgresql"


def read(conn: sa.Connection, query: sa.Select, schema: pa.Schema) -> pa.RecordBatch:
    """All rows of ``query`` as one batch of ``schema`` (in the query's column order)."""
    # The driver binds the parameters (COPY takes none of the server's): no literal of ours in the SQL.
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    text = io.BytesIO()
    drivers.copy_out(conn, f"COPY ({compiled}) TO STDOUT (FORMAT csv)", compiled.params, text)
    wire = pa.schema([pa.field(f.name, pa.string() if pa.types.is_binary(f.type) else f.type) for f in schema])
    table = pacsv.read_csv(
        pa.py_buffer(text.getbuffer()),
        read_options=pacsv.ReadOptions(column_names=schema.names, use_threads=False),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types=wire, **_CONVERT),
    ) if text.tell() else wire.empty_table()
    columns = [_unhex(table.column(f.name).combine_chunks()) if pa.types.is_binary(f.type)
               else table.column(f.name).combine_chunks() for f in schema]
    return pa.RecordBatch.from_arrays([c.cast(f.type) for c, f in zip(columns, schema)], schema=schema)


def _unhex(arr: pa.Array) -> pa.Array:
    """bytea's ``\\x0a1b`` text to bytes, the hex of the whole column decoded in one call."""
    if pa.types.is_null(arr.type) or len(arr) == 0:
        return pa.array([None] * len(arr), pa.binary())
    digits = pc.utf8_slice_codeunits(arr.fill_null("\\x"), 2)
    offsets = np.frombuffer(digits.buffers()[1], np.int32)[digits.offset:digits.offset + len(digits) + 1]
    data = digits.buffers()[2]
    raw = binascii.a2b_hex(memoryview(data)[offsets[0]:offsets[-1]]) if data is not None else b""
    new_offsets = ((offsets - offsets[0]) // 2).astype(np.int32)
    out = pa.Array.from_buffers(pa.binary(), len(arr), [None, pa.py_buffer(new_offsets), pa.py_buffer(raw)])
    return pc.if_else(arr.is_valid(), out, pa.scalar(None, pa.binary())) if arr.null_count else out
