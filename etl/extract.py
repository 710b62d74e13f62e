"""One source table as Arrow record batches in key order, typed by the catalog.

Every chunk ends at a key, its resumable position: the next read is ``WHERE key > last ORDER
BY key``, which stays cheap however deep into a table it is, where OFFSET would rescan the
table for every chunk. PostgreSQL streams the rest of the table in one COPY from there;
MySQL and SQLite read a page (``LIMIT n``) per query. Types come from the catalog, so the same table read from PostgreSQL,
MySQL or SQLite gives the same Arrow schema: JSON and UUID arrive as text, booleans as
booleans, timestamps as UTC microseconds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from typing import Any, Iterator

import pyarrow as pa
import sqlalchemy as sa

from . import catalog, pgcopy, pgcsv, retry, tables, urls
from .cut import Cut, Reads
from .errors import EtlError


_SLICE = 2_000
#: Average bytes of bytea per row above which a table is read as binary COPY rather than CSV.
WIDE_BYTES = 1024
#: A chunk closes at this many bytes (of COPY data on PostgreSQL, of Arrow data elsewhere) even before ``chunk_rows``.
CHUNK_BYTES = 4 << 20


@dataclasses.dataclass
class Filters:
    since: dt.datetime | None = None
    dag_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"since": self.since.isoformat() if self.since else None, "dag_ids": list(self.dag_ids)}


@dataclasses.dataclass
class Chunk:
    batch: pa.RecordBatch
    last_key: list | None  # where the next chunk starts; None when the table has no key


class TableReader:
    """Reads one table of a source database; ``chunks(after=...)`` resumes after a key.

    ``reads`` gives the connections (one snapshot for a whole job: ``etl.cut``), ``cut`` the
    high-water marks every read stops at."""

    def __init__(self, engine: sa.Engine, version: str, name: str, filters: Filters, chunk_rows: int, *,
                 reads: Reads | None = None, cut: Cut | None = None):
        self.engine, self.version, self.name, self.filters, self.chunk_rows = engine, version, name, filters, chunk_rows
        self.reads, self.cut = reads or Reads(engine), cut
        self.table = retry.call(sa.Table, name, sa.MetaData(), autoload_with=engine, what=f"table {name}: reflecting")
        known = {c["name"]: c for c in catalog.load(version).columns(name)} if name in catalog.load(version).tables else {}
        wanted = tables.DAG_COLUMNS if name == "dag" else [c.name for c in self.table.c]
        self.columns = [c for c in wanted if c in self.table.c]
        self.types = {c: catalog.arrow_type(known[c]["type"] if c in known else _type_name(self.table.c[c], engine))
                      for c in self.columns}
        self.schema = pa.schema([pa.field(c, self.types[c]) for c in self.columns])
        self.key = [c.name for c in self.table.primary_key.columns] or None
        self._wide: bool | None = None
        #: column -> how many MySQL zero dates it held, read as NULL as Airflow's own driver reads them
        self.zero_dates: dict[str, int] = {}

    def _select_list(self) -> list:
        out = []
        for name in self.columns:
            col = self.table.c[name]
            if isinstance(col.type, sa.JSON) or col.type.__class__.__name__ in ("UUID", "Uuid", "JSONB", "JSON"):  # no sa.Uuid in 1.4
                out.append(sa.cast(col, sa.Text).label(name))  # the driver would parse them into objects
            else:
                out.append(sa.type_coerce(col, _plain(col.type)).label(name))
        return out

    def count(self) -> int:
        def count():
            with self.reads.connect() as conn:
                q = sa.select(sa.func.count()).select_from(self.table).where(*self._where(conn))
                return conn.execute(q).scalar_one()
        return retry.call(count, what=f"table {self.name}: counting rows")

    def chunks(self, after: list | None = None) -> Iterator[Chunk]:
        """Chunks from after the key ``after`` on; a read that the database drops or fails is
        retried on its own, starting again after the last key already yielded."""
        def where():
            with self.reads.connect() as conn:
                return self._where(conn)
        cond = retry.call(where, what=f"table {self.name}: reading the filter")
        if self.key is None:
            yield from self._unkeyed(cond)
            return
        if pgcopy.usable(self.engine):
            position = {"after": after}
            yield from retry.generator(lambda: self._streamed(cond, position),
                                       what=lambda: f"table {self.name}, rows after key {_jsonable_key(position['after'])}")
            return
        while True:
            page = retry.call(self._page, cond, after, self.chunk_rows,
                              what=f"table {self.name}, page after key {_jsonable_key(after)}")
            if page is None:
                return
            batch, after, full = page
            yield Chunk(batch, [_jsonable(v) for v in after])
            if batch.num_rows < self.chunk_rows and not full:
                return

    def _after(self, where: list, after: list | None) -> list:
        keycols = [self.table.c[k] for k in self.key]
        if after is None:
            return list(where)
        return [*where, sa.tuple_(*keycols) > sa.tuple_(*[sa.literal(v, type_=c.type) for v, c in zip(after, keycols)])
                if len(keycols) > 1 else keycols[0] > after[0]]

    def _page(self, where: list, after: list | None, limit: int):
        """One keyset page through the driver: (batch, its last key, closed early by size) or None past the end."""
        pos = [self.columns.index(k) for k in self.key]
        query = sa.select(*self._select_list()).where(*self._after(where, after)).order_by(*(self.table.c[k] for k in self.key))
        with self.reads.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(query.limit(limit))
            # Python row objects cost ten times their Arrow size: convert them in slices.
            parts, last, size, full = [], None, 0, False
            for part in result.partitions(_SLICE):
                parts.append(self._batch(part))
                last, size = part[-1], size + parts[-1].nbytes
                if size >= CHUNK_BYTES:  # wide rows (100 kB xcom values): a smaller chunk, same memory
                    full = True
                    break
            result.close()
        if last is None:
            return None
        batch = pa.Table.from_batches(parts).combine_chunks().to_batches()[0] if len(parts) > 1 else parts[0]
        return batch, [last[i] for i in pos], full

    def _streamed(self, where: list, position: dict) -> Iterator[Chunk]:
        """PostgreSQL: the rest of the table in one COPY (CSV, or binary where bytea is wide), in key
        order, cut into chunks of about CHUNK_BYTES (or ``chunk_rows``); ``position`` follows the
        last key yielded."""
        pos = [self.columns.index(k) for k in self.key]
        with self.reads.connect() as conn:
            binary = self._wide_bytes(conn)
            columns = ([pgcopy.wire(self.table.c[c], self.types[c]).label(c) for c in self.columns] if binary
                       else self._select_list())
            query = (sa.select(*columns).where(*self._after(where, position["after"]))
                     .order_by(*(self.table.c[k] for k in self.key)))
            # Without statistics (a database autovacuum never analyzed) the planner would sort
            # the whole table; the primary key's index already gives the order.
            conn.exec_driver_sql("SET LOCAL enable_sort = off")
            conn.exec_driver_sql("SET LOCAL enable_incremental_sort = off")
            # Offsets Arrow parses: a server zone would write 1900's +00:19:32 (Amsterdam's mean time).
            conn.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")
            # Closed before the transaction ends: the receiving thread holds the connection until then.
            with contextlib.closing(pgcopy.blocks(conn, query, binary, CHUNK_BYTES, self.chunk_rows)) as stream:
                for data, ends in stream:
                    try:
                        batch = pgcopy.decode(data, ends, self.schema) if binary else pgcsv.parse(data, len(ends), self.schema)
                    except pa.ArrowInvalid:  # a value Arrow cannot hold as it is ('infinity', a year BC): through the driver
                        batch = self._driver_rows(where, position["after"], len(ends))
                    position["after"] = [batch.column(i)[batch.num_rows - 1].as_py() for i in pos]
                    yield Chunk(batch, [_jsonable(v) for v in position["after"]])

    def _wide_bytes(self, conn: sa.Connection) -> bool:
        """Whether the table's first thousand rows average more than WIDE_BYTES of bytea (xcom
        values), which CSV would double into hex; once per reader."""
        if self._wide is None:
            sizes = [sa.func.coalesce(sa.func.octet_length(self.table.c[c]), 0)
                     for c in self.columns if pa.types.is_binary(self.types[c])]
            self._wide = False
            if sizes and pgcopy.SUPPORTED:
                first = sa.select(sum(sizes[1:], sizes[0]).label("size")).select_from(self.table).limit(1000).subquery()
                self._wide = (conn.execute(sa.select(sa.func.avg(first.c.size))).scalar() or 0) > WIDE_BYTES
        return self._wide

    def _driver_rows(self, where: list, after: list | None, n: int) -> pa.RecordBatch:
        """The next ``n`` rows after ``after``, read through the driver."""
        parts = []
        while n > 0:
            batch, after, _ = self._page(where, after, n)
            parts.append(batch)
            n -= batch.num_rows
        return pa.Table.from_batches(parts).combine_chunks().to_batches()[0] if len(parts) > 1 else parts[0]

    def _unkeyed(self, where: list) -> Iterator[Chunk]:
        """A table without a primary key (``_airflow_moved__*``) streams in one query: it has no
        position to resume from, so only the query and its first chunk are retried."""
        def first():
            stack = contextlib.ExitStack()
            try:
                conn = stack.enter_context(self.reads.connect())
                result = conn.execution_options(stream_results=True, yield_per=self.chunk_rows).execute(
                    sa.select(*self._select_list()).where(*where))
                return stack, result, result.fetchmany(self.chunk_rows)
            except BaseException:
                stack.close()
                raise
        stack, result, rows = retry.call(first, what=f"table {self.name}")
        with stack:
            try:
                while rows:
                    yield Chunk(self._batch(rows), None)
                    rows = result.fetchmany(self.chunk_rows)
            except sa.exc.DBAPIError as exc:
                if retry.transient(exc):
                    raise EtlError(f"table {self.name}: the database connection failed mid-table, and a table without "
                                   f"a primary key cannot resume ({urls.first_line(exc.orig)}); run the export again") from exc
                raise

    def _batch(self, rows) -> pa.RecordBatch:
        cols = list(zip(*rows)) if rows else [[] for _ in self.columns]
        arrays = []
        for name, values in zip(self.columns, cols):
            atype = self.types[name]
            values = list(values)
            if pa.types.is_timestamp(atype) or pa.types.is_date(atype):
                zeros = sum(1 for v in values if _zero_date(v))
                if zeros:
                    self.zero_dates[name] = self.zero_dates.get(name, 0) + zeros
                    values = [None if _zero_date(v) else v for v in values]
            try:
                arrays.append(_array(values, atype))
            except (ValueError, TypeError, pa.ArrowException) as exc:
                raise EtlError(self._unreadable(rows, name, exc)) from None
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _unreadable(self, rows, name: str, exc: Exception) -> str:
        """One line naming the row (by its key) and the value a column cannot hold."""
        i = self.columns.index(name)
        for row in rows:
            try:
                _array([row[i]], self.types[name])
            except (ValueError, TypeError, pa.ArrowException):
                key = {k: row[self.columns.index(k)] for k in self.key or ()}
                return (f"table {self.name}, row {key or row}: column {name} holds {row[i]!r}, which is not a "
                        f"{self.types[name]} ({str(exc).splitlines()[0]})")
        return f"table {self.name}: column {name}: {str(exc).splitlines()[0]}"

    # -- filters ------------------------------------------------------------------------------
    def _where(self, conn: sa.Connection) -> list:
        out = self.cut.conditions(self.table) if self.cut else []
        if self.name in tables.CONFIG or not (self.filters.since or self.filters.dag_ids):
            return out
        c = self.table.c
        if self.filters.dag_ids:
            if "dag_id" in c:
                out.append(c.dag_id.in_(self.filters.dag_ids))
            else:
                out.extend(self._via_parent(conn, dag_ids=True))
        if self.filters.since:
            own = tables.OWN_DATE.get(self.name)
            date_col = own if own is not None and own in c else next((d for d in ("logical_date", "execution_date") if d in c), None)
            if date_col:
                out.append(c[date_col] >= self.filters.since)
            else:
                out.extend(self._via_parent(conn, dag_ids=False))
        return out

    def _via_parent(self, conn: sa.Connection, dag_ids: bool) -> list:
        """Tables without the column follow their dag run (or task instance) into the filter."""
        c = self.table.c
        run = sa.Table("dag_run", sa.MetaData(), autoload_with=conn)
        run_cond = (run.c.dag_id.in_(self.filters.dag_ids) if dag_ids else
                    run.c[next(d for d in ("logical_date", "execution_date") if d in run.c)] >= self.filters.since)
        if "run_id" in c and "dag_id" in c:
            return [sa.tuple_(c.dag_id, c.run_id).in_(sa.select(run.c.dag_id, run.c.run_id).where(run_cond))]
        if "dag_run_id" in c:
            return [c.dag_run_id.in_(sa.select(run.c.id).where(run_cond))]
        ti_col = next((n for n in ("ti_id", "task_instance_id") if n in c), None)
        if ti_col:
            ti = sa.Table("task_instance", sa.MetaData(), autoload_with=conn)
            runs = sa.select(run.c.dag_id, run.c.run_id).where(run_cond)
            return [c[ti_col].in_(sa.select(ti.c.id).where(sa.tuple_(ti.c.dag_id, ti.c.run_id).in_(runs)))]
        return []


def _plain(t: sa.types.TypeEngine) -> sa.types.TypeEngine:
    """Result types without driver-side conversions we would undo (Enum checks, PickleType)."""
    if isinstance(t, sa.Enum):
        return sa.String()
    return t


def _type_name(col: sa.Column, engine: sa.Engine) -> str:
    try:
        return col.type.compile(dialect=engine.dialect)
    except Exception:
        return "TEXT"


def _array(values: list, atype: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, atype)  # the usual case, all in C: aware or naive (UTC) datetimes, str, bytes
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    if pa.types.is_binary(atype):
        values = [bytes(v) if isinstance(v, (memoryview, bytearray)) else v.encode() if isinstance(v, str) else v for v in values]
    elif pa.types.is_string(atype):
        values = [v if v is None or isinstance(v, str) else str(v) for v in values]
    elif pa.types.is_timestamp(atype):
        values = [_datetime(v) for v in values]
    try:
        return pa.array(values, atype)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(values).cast(atype)  # MySQL TINYINT booleans, SQLite integer-typed floats


def _zero_date(v: Any) -> bool:
    """MySQL's zero date (``0000-00-00``, stored under a relaxed sql_mode), which PyMySQL hands
    over as text and MySQLdb, Airflow's driver, as None."""
    return isinstance(v, str) and v.startswith("0000-00-00")


def _datetime(v: Any):
    if isinstance(v, str):  # SQLite columns the catalog types as timestamps but SQLite stores as text
        v = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    if isinstance(v, dt.datetime) and v.tzinfo is None:
        return v.replace(tzinfo=dt.timezone.utc)
    return v


def _jsonable_key(key: list | None):
    return None if key is None else [_jsonable(v) for v in key]


def _jsonable(v: Any):
    if isinstance(v, dt.datetime):
        return {"datetime": _datetime(v).isoformat()}
    return v


def from_jsonable(v: Any):
    if isinstance(v, dict) and "datetime" in v:
        return dt.datetime.fromisoformat(v["datetime"])
    return v
