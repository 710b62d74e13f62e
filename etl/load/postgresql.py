"""PostgreSQL: binary COPY for every row that reaches the server, then ``INSERT ... ON CONFLICT`` from a temp table.

COPY is the only path that keeps up with PostgreSQL's own dump and restore; a temporary table
lets the conflict handling stay one set-based statement built by SQLAlchemy's dialect insert.
"""
from __future__ import annotations

import re
import uuid

import numpy as np
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .. import batches, drivers
from . import pgbinary
from .base import Dialect, Held


#: The advisory lock key of a target's writers (advisory locks are per database); any constant unlikely elsewhere.
LOCK_KEY = 0x5D2D1E6C3F0A7B41

#: COPY payload handed to the driver at a time: a chunk's is never whole in memory.
_PART_BYTES = 1 << 20


class PostgreSQL(Dialect):
    name = "postgresql"

    def insert(self, conn: sa.Connection, table: sa.Table, batch: pa.RecordBatch) -> int:
        self._copy(conn, _qualified(conn, table), table, batch)
        return batch.num_rows

    def upsert(self, conn, table, batch, key, update):
        stage = self._stage(conn, table, batch)
        cols = batch.schema.names
        stmt = pg_insert(table).from_select(cols, sa.select(*(stage.c[c] for c in cols)))
        rest = [c for c in cols if c not in key]
        if update and rest:
            stmt = stmt.on_conflict_do_update(index_elements=list(key), set_={c: stmt.excluded[c] for c in rest})
        else:
            stmt = stmt.on_conflict_do_nothing()
        return conn.execute(stmt.execution_options(preserve_rowcount=True)).rowcount

    def reserve_ids(self, conn, table, n, exclusive):
        seq = sa.func.pg_get_serial_sequence(_qualified(conn, table), "id")
        if exclusive:
            # One round trip instead of n nextval calls; safe only while nobody else draws ids.
            last = conn.execute(sa.select(sa.func.setval(seq, sa.func.nextval(seq) + (n - 1)))).scalar_one()
            return np.arange(last - n + 1, last + 1, dtype=np.int64)
        rows = conn.execute(sa.select(sa.func.nextval(seq)).select_from(sa.func.generate_series(1, n))).scalars().all()
        return np.array(rows, dtype=np.int64)

    def repair_sequence(self, conn, table):
        seq = conn.execute(sa.select(sa.func.pg_get_serial_sequence(_qualified(conn, table), "id"))).scalar()
        if not seq:
            return
        top = conn.execute(sa.select(sa.func.max(table.c.id))).scalar()
        last = conn.execute(sa.select(sa.func.pg_sequence_last_value(sa.cast(seq, sa.dialects.postgresql.REGCLASS)))).scalar()
        if top is not None and (last is None or top > last):
            conn.execute(sa.select(sa.func.setval(seq, top)))

    def hold(self, engine, shared):
        conn = engine.connect()
        take = sa.func.pg_try_advisory_lock_shared if shared else sa.func.pg_try_advisory_lock
        held = conn.execute(sa.select(take(LOCK_KEY))).scalar_one()
        conn.commit()  # a session lock: it outlives the transaction and ends with the connection
        if not held:
            conn.close()
            return None
        return Held(conn)

    def bulk_sessions(self, engine):
        # A chunk's commit need not wait for its WAL to reach the disk: a server crash loses the last
        # chunks together with their ledger rows, and the re-run loads them again. Under load that wait
        # was a tenth of a 1.10.15 migration.
        @sa.event.listens_for(engine, "connect")
        def _asynchronous(dbapi_connection, _record):
            with dbapi_connection.cursor() as cur:
                cur.execute("SET synchronous_commit = off")
            dbapi_connection.commit()

        engine.pool.dispose()  # the connection opened before the listener

    def durable(self, conn):
        # A synchronous commit with an xid waits for the WAL up to its own commit record, and so
        # for every earlier commit's.
        conn.exec_driver_sql("SET LOCAL synchronous_commit = on")
        conn.exec_driver_sql("SELECT txid_current()")

    def defer_checks(self, conn, table):
        name = _qualified(conn, table)
        indexes = conn.execute(sa.text(
            "SELECT CAST(CAST(i.indexrelid AS regclass) AS text), pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "WHERE i.indrelid = CAST(:t AS regclass) AND NOT i.indisunique AND NOT i.indisprimary "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) ORDER BY 1"), {"t": name}).all()
        keys = conn.execute(sa.text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = CAST(:t AS regclass) AND contype = 'f' ORDER BY conname"), {"t": name}).all()
        quote = conn.dialect.identifier_preparer.quote
        for index, _ in indexes:
            conn.exec_driver_sql(f"DROP INDEX {index}")  # regclass text: quoted and qualified as it needs
        for key, _ in keys:
            conn.exec_driver_sql(f"ALTER TABLE {name} DROP CONSTRAINT {quote(key)}")
        return [*(tuple(r) for r in indexes),
                *((key, f"ALTER TABLE {name} ADD CONSTRAINT {quote(key)} {body}") for key, body in keys)]

    def restore(self, conn, definition):
        # The session's sort memory for index builds; the server's default is 64 MB.
        conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
        conn.exec_driver_sql(definition)

    def remove_violators(self, conn, definition):
        m = _FOREIGN_KEY.match(definition)
        if not m:
            return None
        name, key, cols, referred, referred_cols = (m.group(i) for i in range(1, 6))
        meta = sa.MetaData()
        table = sa.Table(_unquote(name.split(".")[-1]), meta, autoload_with=conn)
        other = sa.Table(_unquote(referred.split(".")[-1]), meta, autoload_with=conn)
        mine, theirs = [table.c[_unquote(c)] for c in cols.split(", ")], [other.c[_unquote(c)] for c in referred_cols.split(", ")]
        dangling = sa.and_(*(c.is_not(None) for c in mine),
                           ~sa.exists().where(*(t == c for t, c in zip(theirs, mine))))
        rows = conn.execute(sa.delete(table).where(dangling).returning(*table.c)).mappings().all()
        batch = batches.from_rows([{k: (str(v) if isinstance(v, uuid.UUID) else v) for k, v in r.items()} for r in rows])
        return batch, (f"broke foreign key {_unquote(key)} ({', '.join(c.name for c in mine)} -> {other.name}) after the load, "
                       "and were moved aside so that the key could be restored")

    def _stage(self, conn: sa.Connection, table: sa.Table, batch: pa.RecordBatch) -> sa.TableClause:
        """A session-private copy of the batch; dropped with the transaction that owns the chunk."""
        prep = conn.dialect.identifier_preparer
        name = "_etl_stage_" + table.name[:40]
        cols = ", ".join(prep.quote(c) for c in batch.schema.names)
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {prep.quote(name)}")
        conn.exec_driver_sql(f"CREATE TEMP TABLE {prep.quote(name)} ON COMMIT DROP AS "
                             f"SELECT {cols} FROM {_qualified(conn, table)} WITH NO DATA")
        self._copy(conn, prep.quote(name), table, batch)
        return sa.table(name, *(sa.column(c) for c in batch.schema.names))

    def _copy(self, conn: sa.Connection, target: str, table: sa.Table, batch: pa.RecordBatch) -> None:
        """``table`` has the column types of ``target`` (itself, or the temp table made from it)."""
        prep = conn.dialect.identifier_preparer
        batch = batches.select(batch, pgbinary.copy_order(table, batch.schema.names))
        cols = ", ".join(prep.quote(c) for c in batch.schema.names)
        parts = pgbinary.stream(batch, pgbinary.encoders(table, batch.schema.names), _PART_BYTES)
        drivers.copy_in(conn, f"COPY {target} ({cols}) FROM STDIN (FORMAT binary)", parts)


#: ``defer_checks``'s foreign key definitions, as ``pg_get_constraintdef`` writes them.
_FOREIGN_KEY = re.compile(r'^ALTER TABLE (\S+) ADD CONSTRAINT (\S+) FOREIGN KEY \((.+?)\) REFERENCES (\S+?)\((.+?)\)')


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def _qualified(conn: sa.Connection, table: sa.Table) -> str:
    prep = conn.dialect.identifier_preparer
    return prep.format_table(table)
