"""Column edits of an Arrow record batch, and its rows, spelled with what every pyarrow since 6 has.

RecordBatch gained ``select``, ``set_column``, ``append_column``, ``drop_columns`` and
``rename_columns`` only in pyarrow 14, ``from_pylist`` and ``to_pylist`` in 7, and
``parquet.read_table`` its ``schema`` in 8; Airflow's constraints pin older releases (2.4.3's
pyarrow 6, 2.7.2's 11), and MWAA installs requirements.txt under them. Rebuilding the batch from
its arrays is as cheap (no data is copied) and works on every pyarrow the package allows.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_PYARROW = int(pa.__version__.split(".")[0])


def select(batch: pa.RecordBatch, names) -> pa.RecordBatch:
    names = list(names)
    return pa.RecordBatch.from_arrays([batch.column(n) for n in names],
                                      schema=pa.schema([batch.schema.field(n) for n in names]))


def put(batch: pa.RecordBatch, field: pa.Field | str, values: pa.Array) -> pa.RecordBatch:
    """``values`` as the column ``field`` names: replaced where the batch has it, appended otherwise."""
    field = field if isinstance(field, pa.Field) else pa.field(field, values.type)
    arrays, fields = list(batch.columns), list(batch.schema)
    i = batch.schema.get_field_index(field.name)
    if i < 0:
        arrays.append(values)
        fields.append(field)
    else:
        arrays[i], fields[i] = values, field
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


def rows(batch: pa.RecordBatch) -> list[dict]:
    if _PYARROW >= 7:  # the loaders' hot path: Arrow's own is the faster
        return batch.to_pylist()
    columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
    return [dict(zip(batch.schema.names, values)) for values in zip(*columns)]


def from_rows(rows: list[dict], schema: pa.Schema | None = None) -> pa.RecordBatch:
    """``schema`` None: the names of the first row, each column's type inferred from its values."""
    if schema is None:
        names = list(rows[0]) if rows else []
        return pa.RecordBatch.from_arrays([pa.array([r.get(n) for r in rows]) for n in names], names=names)
    return pa.RecordBatch.from_arrays([pa.array([r.get(f.name) for r in rows], f.type) for f in schema], schema=schema)


def drop(batch: pa.RecordBatch, names) -> pa.RecordBatch:
    gone = set(names)
    return select(batch, [n for n in batch.schema.names if n not in gone])


def rename(batch: pa.RecordBatch, names) -> pa.RecordBatch:
    fields = [f.with_name(n) for f, n in zip(batch.schema, names)]
    return pa.RecordBatch.from_arrays(list(batch.columns), schema=pa.schema(fields, metadata=batch.schema.metadata))


def read_parquet(data: bytes, schema: pa.Schema) -> pa.Table:
    """The file's columns as ``schema`` types them (a column of nulls is written as null, read as its type)."""
    if _PYARROW >= 8:
        return pq.read_table(io.BytesIO(data), schema=schema)
    t = pq.read_table(io.BytesIO(data))
    return pa.Table.from_arrays([t.column(f.name).cast(f.type) for f in schema], schema=schema)


def starts_with(values: pa.Array, prefix: bytes) -> pa.Array:
    """Binary values beginning with ``prefix`` (null for null): in one kernel from pyarrow 11 on, row by row before."""
    if _PYARROW >= 11:
        return pc.equal(pc.binary_slice(values, 0, len(prefix)), prefix)
    return pa.array([None if v is None else v.startswith(prefix) for v in values.to_pylist()], pa.bool_())
