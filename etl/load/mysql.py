"""MySQL and MariaDB: multi-row ``INSERT ... ON DUPLICATE KEY UPDATE``; ids reserved under a lock."""
from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert as mysql_insert

from . import rowwise
from .base import Dialect, Held


class MySQL(Dialect):
    name = "mysql"

    def insert(self, conn, table, batch):
        rowwise.execute(conn, rowwise.plain(table).insert(), batch)
        return batch.num_rows

    def upsert(self, conn, table, batch, key, update):
        new, existing = rowwise.split_existing(conn, table, key, batch)
        stmt = mysql_insert(rowwise.plain(table))
        rest = [c for c in batch.schema.names if c not in key]
        if update and rest:
            stmt = stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in rest})
            rowwise.execute(conn, stmt, batch)
            return batch.num_rows
        # A no-op assignment: the row stays as the target has it, even if it appeared meanwhile.
        stmt = stmt.on_duplicate_key_update({key[0]: stmt.table.c[key[0]]})
        rowwise.execute(conn, stmt, new)
        return new.num_rows

    def hold(self, engine, shared):
        conn = engine.connect()
        name = sa.func.concat("airflow-metadata-etl:", sa.func.database())
        # GET_LOCK has no shared mode: a forced writer only makes sure that no exclusive one runs.
        held = conn.execute(sa.select(sa.func.is_free_lock(name) if shared else sa.func.get_lock(name, 0))).scalar()
        conn.commit()
        if not held:
            conn.close()
            return None
        if shared:
            conn.close()
            return Held()
        return Held(conn)

    def reserve_ids(self, conn, table, n, exclusive):
        # FOR UPDATE on the index end blocks concurrent inserts until our chunk commits.
        top = conn.execute(sa.select(sa.func.coalesce(sa.func.max(table.c.id), 0)).with_for_update()).scalar_one()
        auto = conn.execute(sa.text("SELECT AUTO_INCREMENT FROM information_schema.TABLES "
                                    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t"), {"t": table.name}).scalar()
        start = max(int(top) + 1, int(auto or 1))
        return np.arange(start, start + n, dtype=np.int64)

    def repair_sequence(self, conn, table):
        top = conn.execute(sa.select(sa.func.max(table.c.id))).scalar()
        if top is not None:
            # InnoDB raises its counter on explicit ids already; this makes it explicit after a restart.
            conn.exec_driver_sql(f"ALTER TABLE {conn.dialect.identifier_preparer.format_table(table)} AUTO_INCREMENT = {int(top) + 1}")
