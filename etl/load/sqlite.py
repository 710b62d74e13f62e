"""SQLite: ``INSERT ... ON CONFLICT`` through executemany inside the chunk's transaction."""
from __future__ import annotations

import fcntl
import os

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import rowwise
from .base import Dialect, Held


class SQLite(Dialect):
    name = "sqlite"

    def insert(self, conn, table, batch):
        rowwise.execute(conn, rowwise.plain(table).insert(), batch)
        return batch.num_rows

    def upsert(self, conn, table, batch, key, update):
        stmt = sqlite_insert(rowwise.plain(table))
        rest = [c for c in batch.schema.names if c not in key]
        if update and rest:
            stmt = stmt.on_conflict_do_update(index_elements=list(key), set_={c: stmt.excluded[c] for c in rest})
            rowwise.execute(conn, stmt, batch)
            return batch.num_rows
        new, _ = rowwise.split_existing(conn, table, key, batch)
        rowwise.execute(conn, stmt.on_conflict_do_nothing(), new)
        return new.num_rows

    def hold(self, engine, shared):
        path = engine.url.database
        if not path or path == ":memory:":
            return Held()
        lock = open(os.path.abspath(path) + ".etl-lock", "a+")
        try:
            fcntl.flock(lock, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return None
        return Held(lock)  # a lock file beside the database: SQLite has no advisory locks

    def reserve_ids(self, conn, table, n, exclusive):
        top = conn.execute(sa.select(sa.func.coalesce(sa.func.max(table.c.id), 0))).scalar_one()
        seq = 0
        if sa.inspect(conn).has_table("sqlite_sequence"):
            seq = conn.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = :t"), {"t": table.name}).scalar() or 0
        start = max(int(top), int(seq)) + 1
        return np.arange(start, start + n, dtype=np.int64)

