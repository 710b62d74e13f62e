"""The target database as the load stage sees it: its version, its tables, and the safety checks.

Everything here happens before the first row is written: a live scheduler, an unknown
version or a missing table is found while the target is still untouched.
"""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import sqlalchemy as sa

from .. import ledger, tables, urls, versions
from ..errors import EtlError
from .base import Quarantine, TableLoader, describe, dialect_for

#: Airflow's own default for scheduler_health_check_threshold is 30 s; allow a missed beat.
SCHEDULER_ALIVE = dt.timedelta(seconds=60)


class Target:
    def __init__(self, url: str, *, source_key: str, version: str | None = None, create: bool = False,
                 update: bool = False, force: bool = False, dry_run: bool = False, quarantine: Quarantine):
        self.url = url
        self.engine = urls.open_engine(url, create=create)
        if create and not sa.inspect(self.engine).get_table_names():
            if not version:
                raise EtlError(f"target {urls.redacted(url)} is empty: give --target-version to create its schema")
            from .. import catalog

            catalog.create_empty(self.engine, version)
        self.version, self.revision = versions.detect_version(self.engine, override=version)
        self.forced = force
        if not force and not dry_run:
            self._refuse_live_scheduler()
        self.dry_run = dry_run
        self.dialect = dialect_for(self.engine)
        self.source_key, self.update, self.quarantine = source_key, update, quarantine
        self.inspector = sa.inspect(self.engine)
        self.names = set(self.inspector.get_table_names())
        self.meta = sa.MetaData()
        self.described = {}
        loadable_int = {n for n in self.names if tables.is_default(n) and self._surrogate(n) == "int"}
        self.id_maps = ledger.IdMaps(self.engine, source_key, loadable_int)
        self.uuid_maps: dict[str, dict[str, str]] = {}
        self.touched: set[str] = set()

    def _surrogate(self, name: str) -> str | None:
        return self.describe(name).surrogate

    def describe(self, name: str):
        if name not in self.described:
            table = sa.Table(name, self.meta, autoload_with=self.engine)
            self.described[name] = describe(table, self.inspector)
        return self.described[name]

    def has(self, name: str) -> bool:
        return name in self.names

    def loader(self, name: str) -> TableLoader:
        self.touched.add(name)
        return TableLoader(self.engine, self.dialect, self.describe(name), self.source_key, self.update,
                           self.id_maps, self.uuid_maps, self.quarantine, dry_run=self.dry_run, exclusive=not self.forced)

    def prepare(self) -> None:
        """The ledger tables, created only once every check has passed and writing begins."""
        if not self.dry_run:
            ledger.ensure(self.engine)

    def count(self, name: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(self.describe(name).table)).scalar_one()

    def conform(self, name: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Keep the columns the target table has; a required column the batch lacks is an error now."""
        table = self.describe(name).table
        keep = [c for c in batch.schema.names if c in table.c]
        for col in table.c:
            surrogate = col.primary_key and col.name == "id"
            if col.name not in keep and not col.nullable and col.server_default is None and not surrogate:
                raise EtlError(f"target column {name}.{col.name} is NOT NULL and the source gives no value for it")
        return batch.select(keep)

    def finish(self) -> None:
        """Move every id generator the load touched past max(id)."""
        if self.dry_run:
            return
        with self.engine.begin() as conn:
            for name in sorted(self.touched):
                if self._surrogate(name) == "int":
                    self.dialect.repair_sequence(conn, self.describe(name).table)

    def dispose(self) -> None:
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
