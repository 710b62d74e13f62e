"""Column edits of an Arrow record batch, spelled with ``RecordBatch.from_arrays``.

RecordBatch gained ``select``, ``set_column``, ``append_column``, ``drop_columns`` and
``rename_columns`` only in pyarrow 14 and later; Airflow's constraints pin older releases (2.7.2's
pyarrow 11, which MWAA installs requirements.txt under). Rebuilding the batch from its arrays
is as cheap (no data is copied) and works on every pyarrow the package allows.
"""
from __future__ import annotations

import pyarrow as pa


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


def drop(batch: pa.RecordBatch, names) -> pa.RecordBatch:
    gone = set(names)
    return select(batch, [n for n in batch.schema.names if n not in gone])


def rename(batch: pa.RecordBatch, names) -> pa.RecordBatch:
    fields = [f.with_name(n) for f, n in zip(batch.schema, names)]
    return pa.RecordBatch.from_arrays(list(batch.columns), schema=pa.schema(fields, metadata=batch.schema.metadata))
