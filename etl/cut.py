"""A live source read as one consistent cut.

The migration guide exports while the old environment still runs: its scheduler, its running
tasks and the export DAG's own run write while the tables are read, one after the other. Read
table by table at their own moments, the export would hold task instances whose dag run it does
not hold. Two things make the reads one cut:

- **One snapshot per process.** Every read of a source in one process (every table, the
  mapper's look-ups, the counts) sees the database as it stood when the job began: on
  PostgreSQL an exported snapshot (``pg_export_snapshot``) that each read's REPEATABLE READ
  transaction adopts, on MySQL one connection in a ``WITH CONSISTENT SNAPSHOT`` transaction, on
  SQLite one read transaction (which, in SQLite's default journal mode, holds a writer's commit
  back until the export ends: SQLite is a development backend, one process at a time).
- **High-water marks.** The snapshot dies with its process (and with a dropped connection),
  but an export resumes in a new process and the export DAG reads in many. So the job's first
  read also takes, in its snapshot, each history table's highest id (``Cut.marks``), kept in the
  export's state and manifest, and every read, in any process, stops at them: a table with an
  integer id reads ``id <= mark``, a table keyed by its dag run leaves out the runs after
  ``dag_run``'s mark. Rows written after the cut arrive with the next run, through the ledger.

A run that left the cut is never dropped instead: rows whose run is missing are kept (an
orphan is the loader's to quarantine), only rows of runs *after* the mark are left out.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Iterator

import sqlalchemy as sa

from . import retry, tables

log = logging.getLogger("etl.cut")


@dataclasses.dataclass
class Cut:
    """Highest id per history table at the cut; a table not named had no rows then (mark 0)."""

    marks: dict[str, int]

    def to_dict(self) -> dict:
        return {"marks": dict(sorted(self.marks.items()))}

    @classmethod
    def from_dict(cls, data: dict) -> Cut:
        return cls({k: int(v) for k, v in data["marks"].items()})

    def conditions(self, table: sa.Table) -> list:
        """What keeps ``table``'s reads at the cut: nothing for configuration, else its own id
        or its dag run's (see the module's docstring)."""
        if table.name in tables.CONFIG or table.name == "dag" or table.name not in tables.HISTORY:
            return []
        c = table.c
        if _integer_id(table):
            return [c.id <= self.marks.get(table.name, 0)]
        mark = self.marks.get("dag_run", 0)
        if "dag_run_id" in c:
            return [c.dag_run_id <= mark]
        if "dag_id" in c and "run_id" in c:
            return [sa.tuple_(c.dag_id, c.run_id).not_in(_later_runs(mark, "dag_id", "run_id"))]
        if "dag_id" in c and "execution_date" in c:  # 1.10 and 2.0/2.1 (dag_run has no execution_date in 3.x)
            return [sa.tuple_(c.dag_id, c.execution_date).not_in(_later_runs(mark, "dag_id", "execution_date"))]
        ti_col = next((n for n in ("ti_id", "task_instance_id") if n in c), None)
        if ti_col:
            ti = sa.table("task_instance", sa.column("id"), sa.column("dag_id"), sa.column("run_id"))
            runs = _later_runs(mark, "dag_id", "run_id")
            return [c[ti_col].not_in(sa.select(ti.c.id).where(sa.tuple_(ti.c.dag_id, ti.c.run_id).in_(runs)))]
        return []


def _integer_id(table: sa.Table) -> bool:
    pk = [col.name for col in table.primary_key.columns]
    return pk == ["id"] and isinstance(table.c.id.type, sa.Integer)


def _later_runs(mark: int, *columns: str):
    """``columns`` of the dag runs created after the cut: a handful, so ``NOT IN`` is one small
    hashed set that leaves the reader's key order (and PostgreSQL's index scan) as it is. Only
    the columns asked for are read (a 3.x dag_run has no execution_date), none of them NULL
    (one NULL in a ``NOT IN`` set would leave every row out)."""
    run = sa.table("dag_run", sa.column("id"), *(sa.column(name) for name in columns))
    return sa.select(*(run.c[name] for name in columns)).where(run.c.id > mark, *(run.c[name].is_not(None) for name in columns))


def take(reads: Reads, names: list[str]) -> Cut:
    """The marks of ``names`` (and of ``dag_run``, which the others follow), in one snapshot."""
    present = set(names) | {"dag_run"}
    marks = {}
    with reads.connect() as conn:
        existing = set(sa.inspect(conn).get_table_names())
        for name in sorted(present & existing):
            if name in tables.CONFIG or name not in tables.HISTORY:
                continue
            t = sa.Table(name, sa.MetaData(), autoload_with=conn)
            if _integer_id(t):
                marks[name] = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(t.c.id), 0))).scalar_one())
    return Cut(marks)


class Reads:
    """Where a source's reads run: each in a transaction of its own, on a connection of its own."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def close(self) -> None:
        pass


class Snapshot(Reads):
    """Every read in this process sees the source as of one moment (see the module's docstring).

    If the snapshot is lost (its connection dropped), a new one is taken and the reads go on
    under the marks, which keep them at the cut for rows added since.
    """

    def __init__(self, engine: sa.Engine):
        super().__init__(engine)
        self.kind = engine.dialect.name
        self._lock = threading.RLock()
        self._holder: sa.Connection | None = None
        self._id: str | None = None

    def _open(self) -> None:
        if self.kind == "postgresql":
            holder = self.engine.connect().execution_options(isolation_level="REPEATABLE READ")
            holder.begin()
            holder.exec_driver_sql("SET TRANSACTION READ ONLY")
            self._id = holder.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
        else:
            holder = self.engine.connect()
            holder.begin()
            holder.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY" if self.kind == "mysql" else "BEGIN")
        self._holder = holder

    def _lost(self) -> None:
        log.warning("the source's snapshot was lost with its connection; a new one is taken, and the reads stay at "
                    "the cut's high-water marks")
        with contextlib.suppress(Exception):
            self._holder.invalidate()
        self._holder = None

    @contextlib.contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        if self.kind == "postgresql":
            yield from self._postgresql()
        else:
            with self._lock:
                if self._holder is None or self._holder.invalidated:
                    retry.call(self._open, what="the source: taking a snapshot")
                try:
                    yield self._holder
                except sa.exc.DBAPIError as exc:
                    if exc.connection_invalidated or retry.transient(exc):
                        self._lost()
                    raise

    def _postgresql(self):
        with self._lock:
            if self._holder is None or self._holder.invalidated:
                retry.call(self._open, what="the source: taking a snapshot")
            snapshot = self._id
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            try:
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            except sa.exc.DBAPIError as exc:
                # The exporting transaction ended (its connection dropped): retried with a new one.
                with self._lock:
                    if self._id == snapshot:
                        self._lost()
                raise sa.exc.DBAPIError(str(exc.statement), None, exc.orig, connection_invalidated=True) from exc
            yield conn

    def close(self) -> None:
        with self._lock:
            if self._holder is not None:
                with contextlib.suppress(Exception):
                    self._holder.close()
                self._holder = None
