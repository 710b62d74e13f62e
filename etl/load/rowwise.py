"""Shared by the dialects without a COPY: rows go as parameter sets of one multi-row statement.

Neither MySQL's rowcount (SQLAlchemy asks for FOUND_ROWS, so an unchanged duplicate still
counts) nor a do-nothing upsert tells which rows were new, so the keys the target already
has are looked up first; that keeps the report exact.
"""
from __future__ import annotations

import pyarrow as pa
import sqlalchemy as sa

from .. import batches

BATCH = 2000


def existing_keys(conn: sa.Connection, table: sa.Table, key: tuple[str, ...], batch: pa.RecordBatch) -> set:
    from .base import _norm

    cols = [table.c[k] for k in key]
    keys = list(zip(*(batch.column(k).to_pylist() for k in key)))
    found = set()
    for i in range(0, len(keys), 500):
        part = keys[i:i + 500]
        cond = sa.tuple_(*cols).in_(part) if len(cols) > 1 else cols[0].in_([p[0] for p in part])
        found.update(tuple(_norm(v) for v in r) for r in conn.execute(sa.select(*cols).where(cond)))
    return found


def split_existing(conn, table, key, batch) -> tuple[pa.RecordBatch, int]:
    """The rows whose key the target lacks, and how many it has."""
    from .base import _norm

    have = existing_keys(conn, table, key, batch)
    if not have:
        return batch, 0
    keys = zip(*(batch.column(k).to_pylist() for k in key))
    mask = pa.array([tuple(_norm(v) for v in k) not in have for k in keys])
    new = batch.filter(mask)
    return new, batch.num_rows - new.num_rows


def plain(table: sa.Table) -> sa.TableClause:
    """The table with JSON columns typed as text: batches carry JSON as text already, and
    SQLAlchemy's JSON type would encode that text a second time."""
    cols = [sa.column(c.name, sa.Text() if isinstance(c.type, sa.JSON) else c.type) for c in table.c]
    return sa.table(table.name, *cols)


def execute(conn: sa.Connection, stmt, batch: pa.RecordBatch) -> None:
    data = batches.rows(batch)
    for i in range(0, len(data), BATCH):
        conn.execute(stmt, data[i:i + BATCH])
