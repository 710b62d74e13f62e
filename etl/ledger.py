"""The engine's own bookkeeping in the target: which chunks and which source rows are loaded.

Rows that have only a surrogate id (log, job, task_fail, task_reschedule, trigger, events)
cannot be recognised by their content, so the target keeps, per source, the map from each
source id to the id the target gave it. That map is the row-level ledger: a source row whose
id is in it is already loaded, whatever chunking or filters the earlier run used. It is
written in the chunk's own transaction, like Alembic's version row, so a crash leaves either
the chunk and its ledger rows or neither. The map also rewrites references (xcom.dag_run_id,
task_instance.job_id, ...) to the target's ids.

The map is stored as runs (source ids s..s+n-1 became target ids t..t+n-1), not a row per row:
Airflow's ids come from sequences and the loader reserves target ids in blocks, so a chunk of
consecutive source ids is one run, and the ledger costs a row per chunk instead of doubling the
writes of the biggest tables (job, log, task_instance_history).

``_etl_deferred`` holds the definitions of the secondary indexes and foreign keys that a load
into an empty table set aside: PostgreSQL builds an index over loaded rows, and checks a
foreign key with one join, in a fraction of what maintaining and checking them row by row
costs. They are written in the transaction that drops them and removed in the one that
restores them, so a run killed in between leaves the next run what to restore first.

``_etl_chunk`` records each loaded chunk (source, table, sha256) so that a re-run skips whole
chunks without reading the target, and so that people can audit what came from where.
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import sqlalchemy as sa

META = sa.MetaData()

CHUNKS = sa.Table(
    "_etl_chunk",
    META,
    sa.Column("source", sa.String(32), primary_key=True),
    sa.Column("table_name", sa.String(100), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("chunk", sa.String(200), nullable=False),
    sa.Column("rows_in", sa.Integer, nullable=False),
    sa.Column("rows_written", sa.Integer, nullable=False),
    sa.Column("loaded_at", sa.DateTime, nullable=False),
)

ID_MAP = sa.Table(
    "_etl_id_run",
    META,
    sa.Column("source", sa.String(32), primary_key=True),
    sa.Column("table_name", sa.String(100), primary_key=True),
    sa.Column("source_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("target_id", sa.BigInteger, nullable=False),
    sa.Column("length", sa.BigInteger, nullable=False),
)


DEFERRED = sa.Table(
    "_etl_deferred",
    META,
    sa.Column("table_name", sa.String(100), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),  # restored in this order
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("definition", sa.Text, nullable=False),
)


def ensure(engine: sa.Engine) -> None:
    """Create the ledger tables; Airflow ignores tables it does not know."""
    META.create_all(engine, checkfirst=True)


def present(conn: sa.Connection) -> bool:
    """A dry run never creates the ledger, so a target we never loaded may not have it."""
    return sa.inspect(conn).has_table(CHUNKS.name)


def chunk_loaded(conn: sa.Connection, source: str, table: str, sha256: str) -> bool:
    q = sa.select(CHUNKS.c.rows_in).where(CHUNKS.c.source == source, CHUNKS.c.table_name == table, CHUNKS.c.sha256 == sha256)
    return conn.execute(q).first() is not None


def any_chunk(conn: sa.Connection, source: str, table: str) -> bool:
    q = sa.select(CHUNKS.c.sha256).where(CHUNKS.c.source == source, CHUNKS.c.table_name == table).limit(1)
    return conn.execute(q).first() is not None


def record_chunk(conn: sa.Connection, source: str, table: str, sha256: str, chunk: str, rows_in: int, written: int) -> None:
    conn.execute(CHUNKS.insert().values(source=source, table_name=table, sha256=sha256, chunk=chunk[:200],
                                        rows_in=rows_in, rows_written=written,
                                        loaded_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)))


def deferred(conn: sa.Connection) -> dict[str, list[str]]:
    """Definitions set aside and not yet restored, per table, in order."""
    q = sa.select(DEFERRED.c.table_name, DEFERRED.c.definition).order_by(DEFERRED.c.table_name, DEFERRED.c.position)
    out: dict[str, list[str]] = {}
    for name, definition in conn.execute(q):
        out.setdefault(name, []).append(definition)
    return out


def record_deferred(conn: sa.Connection, table: str, definitions: list[tuple[str, str]]) -> None:
    if definitions:
        conn.execute(DEFERRED.insert(), [{"table_name": table, "position": i, "name": n, "definition": d}
                                         for i, (n, d) in enumerate(definitions)])


def forget_deferred(conn: sa.Connection, table: str) -> None:
    conn.execute(DEFERRED.delete().where(DEFERRED.c.table_name == table))


def runs(source_ids: np.ndarray, target_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source starts, target starts, lengths) of the runs in which both ids count up by one."""
    order = np.argsort(source_ids, kind="stable")
    src, dst = source_ids[order].astype(np.int64), target_ids[order].astype(np.int64)
    if len(src) == 0:
        return src, dst, np.empty(0, np.int64)
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [len(src)]]))
    return src[starts], dst[starts], lengths


class IdMap:
    """source id -> target id for one table, held as sorted runs (24 bytes a run, a run per chunk or so)."""

    def __init__(self, src: np.ndarray | None = None, dst: np.ndarray | None = None, length: np.ndarray | None = None):
        self.src = np.empty(0, np.int64) if src is None else src
        self.dst = np.empty(0, np.int64) if dst is None else dst
        self.length = np.empty(0, np.int64) if length is None else length
        order = np.argsort(self.src, kind="stable")
        self.src, self.dst, self.length = self.src[order], self.dst[order], self.length[order]

    @classmethod
    def read(cls, conn: sa.Connection, source: str, table: str) -> IdMap:
        if not present(conn):
            return cls()
        rows = conn.execute(sa.select(ID_MAP.c.source_id, ID_MAP.c.target_id, ID_MAP.c.length)
                            .where(ID_MAP.c.source == source, ID_MAP.c.table_name == table)).all()
        if not rows:
            return cls()
        arr = np.array(rows, dtype=np.int64)
        return cls(arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy())

    def __len__(self) -> int:
        return int(self.length.sum())

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, target ids) for ``ids``; target ids are 0 where not found."""
        if len(self.src) == 0:
            return np.zeros(len(ids), bool), np.zeros(len(ids), np.int64)
        pos = np.searchsorted(self.src, ids, side="right") - 1
        pos_c = np.maximum(pos, 0)
        offset = ids - self.src[pos_c]
        found = (pos >= 0) & (offset < self.length[pos_c])
        return found, np.where(found, self.dst[pos_c] + offset, 0)

    def extend(self, source_ids: np.ndarray, target_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add pairs; returns them as runs, the form the ledger stores."""
        new = runs(source_ids, target_ids)
        self.__init__(*(np.concatenate([old, add]) for old, add in zip((self.src, self.dst, self.length), new)))
        return new


class IdMaps:
    """The id maps of every re-numbered table for one source, read from the target when first needed.

    Only tables we load can have one; a reference to anything else (dag_version, backfill) has
    no source id worth keeping.
    """

    def __init__(self, engine: sa.Engine, source: str, loadable: set[str]):
        self.engine, self.source, self.loadable = engine, source, loadable
        self.maps: dict[str, IdMap] = {}

    def knows(self, table: str) -> bool:
        return table in self.loadable

    def get(self, table: str) -> IdMap:
        if table not in self.maps:
            with self.engine.connect() as conn:
                self.maps[table] = IdMap.read(conn, self.source, table)
        return self.maps[table]
