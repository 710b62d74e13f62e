"""The target database as the load stage sees it: its version, its tables, and the safety checks.

Everything here happens before the first row is written: a live scheduler, an unknown
version or a missing table is found while the target is still untouched.
"""
from __future__ import annotations

import datetime as dt
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from .. import batches, catalog, identity, ledger, tables, urls, versions
from ..errors import EtlError
from .base import SOFT_REFERENCES, Quarantine, Restorer, TableLoader, _norm, describe, dialect_for, restore
from .references import References

#: Airflow's own default for scheduler_health_check_threshold is 30 s; allow a missed beat.
SCHEDULER_ALIVE = dt.timedelta(seconds=60)

#: Task instance UUIDs that Airflow 3.0 and 3.1 keep as 36-character text off PostgreSQL
#: (``String(36)``); 3.2's revision f8c9d7e6b5a4 rewrites them to the 32-character hex that
#: every other UUID column (sqlalchemy_utils ``UUIDType(binary=False)``, then ``sa.Uuid``) holds there.
DASHED_BEFORE_3_2 = {
    ("task_instance", "id"), ("task_instance_history", "task_instance_id"), ("task_instance_note", "ti_id"),
    ("task_reschedule", "ti_id"), ("hitl_detail", "ti_id"), ("hitl_detail_history", "ti_history_id"),
}


class Target:
    def __init__(self, url: str, *, source_key: str, version: str | None = None, create: bool = False,
                 update: bool = False, force: bool = False, dry_run: bool = False, quarantine: Quarantine):
        self.url = url
        self.engine = urls.open_engine(url, create=create)
        # An empty target gets its schema in prepare(), once the source's keys and version passed.
        self.empty = create and not sa.inspect(self.engine).get_table_names()
        if self.empty and not version:
            raise EtlError(f"target {urls.redacted(url)} is empty: give --target-version to create its schema")
        if self.empty and dry_run:
            raise EtlError(f"target {urls.redacted(url)} is empty: a dry run has nothing to compare with")
        self.version, self.revision = versions.detect_version(self.engine, override=version)
        self.forced = force
        if not force and not dry_run:
            self._refuse_live_scheduler()
        self.dry_run = dry_run
        self.dialect = dialect_for(self.engine)
        self.lock = None
        if not dry_run:
            self.dialect.bulk_sessions(self.engine)
        self.source_key, self.update, self.quarantine = source_key, update, quarantine
        self.uuid_maps: dict[str, dict[str, str]] = {}
        self.touched: set[str] = set()
        self._aside: dict[str, set[tuple]] = {}  # kept-aside rows by content, per table (``keep_aside``)
        self._reflect()
        if not dry_run:
            # One job writes at a time; the units of one import DAG share the target (``force``).
            self.lock = self.dialect.hold(self.engine, shared=force)
            if self.lock is None:
                raise EtlError(f"another airflow-metadata-etl job is writing to {urls.redacted(url)}: wait until it "
                               "ends (two loads into one target race for the same rows and indexes)")

    def _reflect(self) -> None:
        self.inspector = sa.inspect(self.engine)
        self.names = set(self.inspector.get_table_names())
        self.meta = sa.MetaData()
        self.described = {}
        self._reflecting = threading.Lock()
        self._loadable_int = {n for n in self.names if tables.is_default(n) and self._surrogate(n) == "int"}
        self.id_maps = ledger.IdMaps(self.engine, self.source_key, self._loadable_int)
        self.references = References(self.engine, self.version)

    def recognise(self, fingerprint: str, source_rows: identity.SourceRows) -> str:
        """Name the source as the target's ledger knows it (``etl.identity``); before any loader."""
        with self.engine.connect() as conn:
            self.use_source(identity.recognise(conn, fingerprint, source_rows))
        return self.source_key

    def use_source(self, key: str) -> None:
        self.source_key = key
        self.id_maps = ledger.IdMaps(self.engine, key, self._loadable_int)

    def _surrogate(self, name: str) -> str | None:
        return self.describe(name).surrogate

    def describe(self, name: str):
        # The pipeline's reading thread conforms batches while the loading thread opens loaders.
        with self._reflecting:
            if name not in self.described:
                self.described[name] = describe(sa.Table(name, self.meta, autoload_with=self.engine), self.inspector,
                                                self.version)
            return self.described[name]

    def has(self, name: str) -> bool:
        return name in self.names

    def keep_aside(self, name: str, batch: pa.RecordBatch) -> int:
        """Rows Airflow's own upgrade sets aside (``tables.kept_aside``), kept in the table of that name,
        made as Airflow makes it: their columns, no key, no constraint. With no key to upsert by, a row
        the table holds already (a re-run, or a chunk cut otherwise once the source grew) is known by
        its whole content and not added again. Returns the rows added."""
        if name not in self.names:
            table = sa.Table(name, sa.MetaData(), *(sa.Column(f.name, _aside_type(f.type)) for f in batch.schema))
            try:
                with self.engine.begin() as conn:
                    table.create(conn, checkfirst=True)
            except sa.exc.DBAPIError:  # the DAG's parallel units: another one made it first
                if not sa.inspect(self.engine).has_table(name):
                    raise
            self.names.add(name)
        for column, referred in SOFT_REFERENCES.get(name, {}).items():  # ids as the target numbers them
            if column in batch.schema.names and self.id_maps.knows(referred):
                values = batch.column(column)
                found, ids = self.id_maps.get(referred).lookup(values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64))
                batch = batches.put(batch, column, pa.array(ids, mask=~found).cast(values.type))
        table = sa.Table(name, sa.MetaData(), autoload_with=self.engine)
        columns = [c.name for c in table.c if c.name in batch.schema.names]
        with self.engine.begin() as conn:
            if name not in self._aside:
                self._aside[name] = {_content(r) for r in conn.execute(sa.select(*(table.c[c] for c in columns)))}
            have = self._aside[name]
            new = []
            for row in zip(*(batch.column(c).to_pylist() for c in columns)):
                content = _content(row)
                new.append(content not in have)
                have.add(content)
            added = batches.select(batch, columns).filter(pa.array(new, pa.bool_()))
            if added.num_rows:
                self.dialect.insert(conn, table, added)
        return added.num_rows

    def loader(self, name: str) -> TableLoader:
        self.touched.add(name)
        return TableLoader(self.engine, self.dialect, self.describe(name), self.source_key, self.update,
                           self.id_maps, self.uuid_maps, self.quarantine, self.references, dry_run=self.dry_run,
                           exclusive=not self.forced)

    def loaders_ahead(self, names: list[str]) -> dict[str, TableLoader]:
        """Loaders for the tables among ``names``, made before any row is written when the run may
        set checks aside, so that every table's are set aside before the first table's are rebuilt
        in the background: dropping a foreign key waits for an index build on the table it references."""
        if self.forced or self.dry_run:
            return {}
        return {name: self.loader(name) for name in names if self.has(name)}

    def restorer(self) -> Restorer:
        return Restorer(self.engine, self.dialect, self.quarantine)

    def prepare(self) -> None:
        """The schema of an empty target and the ledger tables, created only once every check has
        passed and writing begins. What a stopped run set aside is restored first: the loaders
        learn a table's references from its foreign keys, and the table is no longer empty."""
        if self.empty:
            catalog.create_empty(self.engine, self.version)
            self.empty = False
            self._reflect()
        if not self.dry_run:
            ledger.ensure(self.engine)
            if self._restore_set_aside():
                self._reflect()

    def _restore_set_aside(self) -> bool:
        with self.engine.connect() as conn:
            left = ledger.deferred(conn)
        for name, definitions in left.items():
            restore(self.engine, self.dialect, name, definitions, self.quarantine)
        return bool(left)

    def conform(self, name: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Keep the columns the target table has; a required column the batch lacks is an error now."""
        table = self.describe(name).table
        keep = [c for c in batch.schema.names if c in table.c]
        for col in table.c:
            surrogate = col.primary_key and col.name == "id"
            if col.name not in keep and not col.nullable and col.server_default is None and not surrogate:
                raise EtlError(f"target column {name}.{col.name} is NOT NULL and the source gives no value for it")
        batch = batches.select(batch, keep)
        for col in self._uuid_columns(name):
            if col in keep:
                batch = batches.put(batch, batch.schema.field(col), self._uuid_format(name, col, batch.column(col)))
        return batch

    def _uuid_columns(self, name: str) -> list[str]:
        schema = catalog.load(self.version)
        if name not in schema.tables:
            return []
        return [c["name"] for c in schema.columns(name) if c["type"].upper() == "UUID"]

    def _uuid_format(self, table: str, column: str, values: pa.Array) -> pa.Array:
        """UUIDs as the target's Airflow writes them: PostgreSQL's uuid text, elsewhere 32 hex
        digits, except the task instance ids that only 3.2 turned from dashed to hex."""
        text = values.cast(pa.string())
        hexed = pc.utf8_lower(pc.replace_substring(text, pattern="-", replacement=""))
        dashed = self.dialect.name == "postgresql" or (
            catalog.version_key(self.version) < (3, 2) and (table, column) in DASHED_BEFORE_3_2)
        if dashed:
            parts = [pc.utf8_slice_codeunits(hexed, start=a, stop=b) for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))]
            new = pc.binary_join_element_wise(*parts, "-")
        else:
            new = hexed
        # Anything that is not a UUID stays as it is, for the server to refuse with its own message.
        return pc.if_else(pc.equal(pc.utf8_length(hexed), 32), new, text).cast(values.type)

    def finish(self) -> None:
        """Move every id generator the load touched past max(id), and wait until what the run
        committed is on disk."""
        if self.dry_run:
            return
        with self.engine.begin() as conn:
            for name in sorted(self.touched):
                if self._surrogate(name) == "int":
                    self.dialect.repair_sequence(conn, self.describe(name).table)
            self.dialect.durable(conn)

    def dispose(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.engine.dispose()

    def _refuse_live_scheduler(self) -> None:
        if "job" not in sa.inspect(self.engine).get_table_names():
            return
        job = sa.table("job", sa.column("job_type"), sa.column("state"), sa.column("latest_heartbeat", sa.DateTime),
                       sa.column("hostname"))
        cutoff = (dt.datetime.now(dt.timezone.utc) - SCHEDULER_ALIVE).replace(tzinfo=None)
        with self.engine.connect() as conn:
            alive = conn.execute(sa.select(job.c.hostname).where(
                job.c.job_type == "SchedulerJob", job.c.state == "running", job.c.latest_heartbeat > cutoff)).first()
        if alive:
            raise EtlError(f"the target's scheduler on {alive[0]} is alive (heartbeat within {SCHEDULER_ALIVE.seconds} s): "
                           "stop it, or pass --force")


def _content(row) -> tuple:
    """A row as the same values whichever driver read it (naive UTC datetimes, memoryview bytes)."""
    return tuple(bytes(v) if isinstance(v, memoryview) else _norm(v) for v in row)


def _aside_type(atype: pa.DataType) -> sa.types.TypeEngine:
    from sqlalchemy.dialects import mysql

    if pa.types.is_timestamp(atype):
        return sa.DateTime(timezone=atype.tz is not None).with_variant(mysql.DATETIME(fsp=6), "mysql")
    if pa.types.is_binary(atype):
        return sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql")
    if pa.types.is_string(atype):
        return sa.Text().with_variant(mysql.LONGTEXT(), "mysql")
    simple = {pa.bool_(): sa.Boolean(), pa.int16(): sa.SmallInteger(), pa.int32(): sa.Integer(), pa.int64(): sa.BigInteger(),
              pa.float64(): sa.Float(), pa.date32(): sa.Date()}
    if atype not in simple:
        raise EtlError(f"no column type for Arrow {atype} in a set-aside table")
    return simple[atype]
