"""Jobs cut into units of work that run apart: what the Airflow DAGs map one task over.

An export unit is one table's key range, an import unit one table's run of chunks. Units are
plain JSON, because they travel between tasks as XCom, and each one is safe to run again:
an export unit rewrites its own chunk files under names that depend only on the unit, and an
import unit goes through the ledger, which skips the chunks a killed attempt already committed.
The first step plans the units, the last one writes the manifest (export) or repairs sequences
and runs the diff (import); in between, the units of one step run in any order, in parallel.
"""
from __future__ import annotations

import datetime as dt
import json

import sqlalchemy as sa

from . import commands, tables, urls
from .errors import EtlError
from .cut import Cut
from .extract import TableReader, from_jsonable
from .report import Report
from .staging import PackageWriter, QuarantineWriter, Store, schema_from_json, schema_to_json

#: Rows per export unit, as planned; a unit writes them as chunks of ``chunk_rows``.
UNIT_ROWS = 500_000
#: Chunks per import unit.
UNIT_CHUNKS = 10

#: Import steps: every table a table refers to (by foreign key, or by a reference the loader
#: rewrites) sits in an earlier step, in every catalog version (tests/test_airflow_dags.py checks).
#: Tables not named here (``_airflow_moved__*``) refer to nothing and load in the first step.
LOAD_STEPS = (
    ("slot_pool", "variable", "connection", "dag", "log_template", "job", "dataset", "asset", "asset_alias",
     "dataset_alias", "sla_miss", "log"),
    ("trigger", "asset_active", "dag_run", "dataset_event", "asset_event", "dataset_alias_dataset", "asset_alias_asset"),
    ("dag_run_note", "task_instance", "dagrun_dataset_event", "dagrun_asset_event", "dataset_alias_dataset_event",
     "asset_alias_asset_event"),
    ("task_instance_note", "task_map", "task_instance_history", "task_reschedule", "task_fail", "xcom",
     "rendered_task_instance_fields"),
)

#: Loaded as one unit whatever their size: the mapper compares their rows with each other
#: (a repeated 1.10 conn_id is quarantined after its first row).
WHOLE = tables.CONFIG + ("dag",)


def step_of(table: str) -> int:
    return next((i for i, names in enumerate(LOAD_STEPS) if table in names), 0)


# -- export -------------------------------------------------------------------------------------

class ExportJob:
    """One export cut into key ranges; every task of the export DAG builds the same job from its arguments."""

    def __init__(self, source: str, dest: str, tables: tuple | None = None, exclude_tables: tuple = (),
                 since: str | None = None, dag_ids=None, chunk_rows: int = 50_000, unit_rows: int = UNIT_ROWS,
                 s3_endpoint_url: str | None = None):
        self.src = src = commands.DatabaseSource(source, None, tables, exclude_tables, since, dag_ids, chunk_rows)
        self.unit_rows = unit_rows
        self.store = Store(dest, s3_endpoint_url)
        # The identity of ``export``'s, plus the unit size: a CLI export and a DAG export never resume each other.
        self.source = urls.redacted(source)
        self.identity = commands.export_identity(src, chunk_rows, unit_rows=unit_rows)
        self.writer = PackageWriter(self.store, self.identity)

    def close(self) -> None:
        self.src.close()

    def _resume(self) -> None:
        """A unit's task runs in a process of its own: the export's start and cut come from its state."""
        if not self.writer.resume():
            raise EtlError(f"{self.store.dest} has no export in progress: run the export's plan task first")
        self.src.cut = Cut.from_dict(self.writer.cut)

    def plan(self) -> list[dict]:
        """The units, table by table in load order; none when ``dest`` already holds this export."""
        if not self.writer.open(cut=self.src.cut.to_dict(), exclusive=False):
            return []
        self.src.cut = Cut.from_dict(self.writer.cut)
        units = []
        for name in self.src.names:
            reader = self.src.reader(name)
            bounds = self._boundaries(reader) if reader.key else []
            edges = [None, *bounds, None]
            units += [{"table": name, "unit": i, "after": edges[i], "until": edges[i + 1]} for i in range(len(edges) - 1)]
        return units

    def _boundaries(self, reader: TableReader) -> list[list]:
        """The key of every ``unit_rows``-th row: one index scan, no OFFSET. Filters are left to the
        units, so with ``--since`` units are uneven, never wrong."""
        keys = [reader.table.c[k] for k in reader.key]
        ranked = sa.select(*keys, sa.func.row_number().over(order_by=keys).label("_etl_rn")).subquery()
        query = (sa.select(*(ranked.c[k] for k in reader.key)).where(ranked.c._etl_rn % self.unit_rows == 0)
                 .order_by(ranked.c._etl_rn))
        with self.src.engine.connect() as conn:
            return [[_jsonable(v) for v in row] for row in conn.execute(query)]

    def run(self, unit: dict, unpaused: list[str] | None = None) -> dict:
        """Write one unit's chunks, then its state file; a complete unit is not written twice.

        ``unpaused``: DAGs the export DAG paused for its run; their rows of the ``dag`` table are
        exported unpaused, as their owners left them.
        """
        name, state_rel = unit["table"], f"_state/units/{unit['table']}.{unit['unit']:05d}.json"
        if self.store.exists(state_rel):
            state = json.loads(self.store.read(state_rel))
            if state["unit"] == unit:
                return _summary(state)
        self._resume()
        reader = _RangeReader(self.src.engine, self.src.version, name, self.src.filters, self.src.chunk_rows,
                              reads=self.src.reads, cut=self.src.cut,
                              until=[from_jsonable(v) for v in unit["until"]] if unit["until"] else None)
        chunks = []
        after = [from_jsonable(v) for v in unit["after"]] if unit["after"] else None
        for n, chunk in enumerate(self.src.read(reader, after=after)):
            batch = commands.unpause(chunk.batch, unpaused) if name == "dag" and unpaused else chunk.batch
            entry, data = self.writer.chunk_file(name, f"{name}/{name}.u{unit['unit']:05d}.{n:06d}.parquet", batch)
            self.store.write(entry["file"], data)
            chunks.append(entry)
        state = {"unit": unit, "chunks": chunks, "schema": schema_to_json(reader.schema)}
        self.store.write(state_rel, json.dumps(state).encode())
        return _summary(state)

    def finish(self, units: list[dict]) -> Report:
        """The manifest, from the state files of every planned unit; written last, as by ``export``."""
        self._resume()
        report = Report("export")
        report.info.update({"source": self.source, "dest": self.store.dest,
                            "airflow_version": self.src.version, "units": len(units)})
        for name in self.src.names:
            states = []
            for unit in (u for u in units if u["table"] == name):
                rel = f"_state/units/{name}.{unit['unit']:05d}.json"
                state = json.loads(self.store.read(rel)) if self.store.exists(rel) else None
                if state is None or state["unit"] != unit:
                    raise EtlError(f"{name}: unit {unit['unit']} of the export has not finished; run its task again")
                states.append(state)
            chunks = [c for s in states for c in s["chunks"]]
            self.writer.finish_table(name, {"chunks": chunks, "last_key": None}, schema_from_json(states[0]["schema"]))
            t = report.table(name)
            t.add("rows", sum(c["rows"] for c in chunks))
            t.add("chunks", len(chunks))
            t.add("bytes", sum(c["bytes"] for c in chunks))
        self.writer.commit({"source": self.source, "source_dialect": self.src.engine.dialect.name, "airflow_version": self.src.version,
                            "alembic_revision": self.src.revision, "filters": self.src.filters.to_dict()})
        return report.finish()


class _RangeReader(TableReader):
    """A table's rows up to and including ``until`` (all when None): an export unit's upper bound."""

    def __init__(self, *args, until: list | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.until = until

    def _where(self, conn: sa.Connection) -> list:
        out = super()._where(conn)
        if self.until is not None:
            keys = [self.table.c[k] for k in self.key]
            out.append(sa.tuple_(*keys) <= sa.tuple_(*(sa.literal(v, type_=c.type) for v, c in zip(self.until, keys)))
                       if len(keys) > 1 else keys[0] <= self.until[0])
        return out


def _summary(state: dict) -> dict:
    return {"table": state["unit"]["table"], "unit": state["unit"]["unit"], "chunks": len(state["chunks"]),
            "rows": sum(c["rows"] for c in state["chunks"])}


def _jsonable(v):
    """A key value as the extractor's resume positions carry it (``from_jsonable`` reads it back)."""
    if isinstance(v, dt.datetime):
        return {"datetime": (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).isoformat()}
    return v


# -- import -------------------------------------------------------------------------------------

class PackageSlice(commands.PackageSource):
    """Chunks ``[first, stop)`` of one table of an export; every other table stays readable whole,
    for the mapper's look-ups of tables it was not fed."""

    def __init__(self, dest: str, endpoint: str | None, table: str, first: int, stop: int):
        super().__init__(dest, endpoint, (table,), ())
        self.first, self.stop = first, stop

    def chunks(self, table: str):
        from .pipeline import Chunk

        for batch, sha, name in self.package.chunks(table, self.first, self.stop):
            yield Chunk(batch, sha, name)


class UnitQuarantine(QuarantineWriter):
    """Files named after the unit, so that a retried unit replaces its own; one folder per target."""

    def __init__(self, store: Store, target: str, unit: str):
        super().__init__(store, target, run="units")
        self.unit = unit

    def _name(self, table: str, n: int) -> str:
        return f"{table}.{self.unit}.{n:05d}.parquet"


class ImportJob:
    """One import cut into runs of chunks, loaded in ``LOAD_STEPS`` order."""

    def __init__(self, dest: str, target: str, tables: tuple | None = None, exclude_tables: tuple = (),
                 unit_chunks: int = UNIT_CHUNKS, on_conflict: str = "skip", source_fernet_key: str | None = None,
                 target_fernet_key: str | None = None, s3_endpoint_url: str | None = None, xcom_json: bool = False):
        self.dest, self.target, self.endpoint = dest, target, s3_endpoint_url
        self.names, self.exclude, self.unit_chunks = tables, exclude_tables, unit_chunks
        self.on_conflict, self.keys, self.xcom_json = on_conflict, (source_fernet_key, target_fernet_key), xcom_json

    def plan(self) -> list[list[dict]]:
        """Verify the export and the target before anything is written; then the units of each step.

        Every chunk's sha256, that the keys decrypt every secret, that the target's version can
        take the source's; then the ledger tables, created once here rather than by racing units.
        """
        from .load.target import Target
        from .secrets import Rekeyer
        from .transform import Mapper

        src = commands.PackageSource(self.dest, self.endpoint, self.names, self.exclude)
        src.package.verify()
        rekeyer = Rekeyer(*self.keys)
        if rekeyer.active:
            for name in (n for n in src.tables() if n in rekeyer.tables):
                for chunk in src.chunks(name):
                    rekeyer.check(name, chunk.batch)
        target = Target(self.target, source_key=src.fingerprint, force=True, quarantine=QuarantineWriter(None))
        try:
            Mapper(src.version, target.version, QuarantineWriter(None))
            target.prepare()
            source = target.recognise(src.fingerprint, src.rows_by_id)  # once, for every unit
        finally:
            target.dispose()
        steps: list[list[dict]] = [[] for _ in LOAD_STEPS]
        for name in src.tables():
            n = len(src.package.manifest["tables"][name]["chunks"])
            size = max(n, 1) if name in WHOLE else self.unit_chunks
            for i, first in enumerate(range(0, n, size)):
                steps[step_of(name)].append({"table": name, "first": first, "stop": min(first + size, n),
                                             "name": f"{name}.{i:05d}", "source": source})
        return steps

    def run(self, unit: dict) -> dict:
        """Load one unit; returns its counts per table."""
        src = PackageSlice(self.dest, self.endpoint, unit["table"], unit["first"], unit["stop"])
        report = commands.load_source(src, self.target, UnitQuarantine(src.store, self.target, unit["name"]), Report("import"),
                                      on_conflict=self.on_conflict, source_fernet_key=self.keys[0],
                                      target_fernet_key=self.keys[1], force=True, source_key=unit.get("source"),
                                      xcom_json=self.xcom_json)
        return {name: t.counts for name, t in report.tables.items()}

    def finish(self) -> Report:
        """Every loaded table's id generator past max(id), then the diff of the export against the target."""
        from .load.target import Target

        src = commands.PackageSource(self.dest, self.endpoint, self.names, self.exclude)
        target = Target(self.target, source_key=src.fingerprint, force=True, quarantine=QuarantineWriter(None))
        try:
            target.touched = {n for n in src.tables() if target.has(n)}
            target.finish()
        finally:
            target.dispose()
        return commands.diff(self.dest, self.target, tables=self.names, exclude_tables=self.exclude,
                             s3_endpoint_url=self.endpoint, on_conflict=self.on_conflict,
                             source_fernet_key=self.keys[0], target_fernet_key=self.keys[1], xcom_json=self.xcom_json)
