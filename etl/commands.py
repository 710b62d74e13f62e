"""The Python API: one function per job, each returning a ``Report``.

The CLI is a thin layer over these functions, and the Airflow DAG factories call them too,
so every option a person has on the command line is a keyword argument here.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import time
from typing import Iterator

import pyarrow as pa
import sqlalchemy as sa

from . import batches, catalog, tables, urls
from .errors import UsageError
from .report import Report


def inspect(url: str, source_version: str | None = None, progress: bool = False) -> Report:
    """Tell what a metadata database is before anything touches it."""
    engine = urls.open_engine(url)
    from . import versions

    try:
        report = Report("inspect")
        report.info["url"] = urls.redacted(url)
        report.info["dialect"] = engine.dialect.name
        version, revision = versions.detect_version(engine, override=source_version)
        report.info["airflow_version"] = version
        report.info["alembic_revision"] = revision
        if not source_version:  # one head, several releases: the database cannot say which of them built it
            report.info["releases_at_this_head"] = ", ".join(catalog.releases_at(version))
        present = sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            for name in tables.select(present):
                table = sa.table(name, schema=None)
                report.table(name).add("rows", conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
        skipped = sorted(t for t in present if not tables.is_default(t))
        if skipped:
            report.notes.append("not history (skipped unless --tables names them): " + ", ".join(skipped))
        return report.finish()
    finally:
        engine.dispose()


def plan(source_version: str, target_version: str, progress: bool = False) -> Report:
    """Show what the mapper will do before it does it."""
    from . import transform

    report = Report("plan")
    plan = transform.plan(source_version, target_version)
    report.info.update(plan)
    report.notes.append("chain: " + (", ".join(plan["chain"]) or "none (same version: rows pass unchanged)"))
    for step in plan["steps"]:
        report.notes.append(f"{step['version']}: {step['summary']} (Airflow revisions {', '.join(step['airflow_revisions'])})")
        report.notes.extend(f"  {table}: {rule}" for table, rule in step["tables"].items())
        report.notes.extend(f"  {old} becomes {new}" for old, new in step["renames"].items())
    for table, change in plan["column_changes"].items():
        parts = [f"+{c}" for c in change["added"]] + [f"-{c}" for c in change["removed"]]
        report.notes.append(f"columns of {table}: {' '.join(parts)}")
    return report.finish()


def sample(airflow_version: str, target: str, dag_runs: int = 50, seed: int = 0, fernet_key: str | None = None,
           faults: bool = False, progress: bool = False) -> Report:
    """Fill a database with a seeded history, for demos, tests and benchmarks."""
    from . import sample as sampler

    engine = urls.open_engine(target, create=True)
    try:
        counts = sampler.sample(engine, airflow_version, dag_runs=dag_runs, seed=seed, fernet_key=fernet_key, faults=faults)
    finally:
        engine.dispose()
    report = Report("sample")
    report.info.update({"target": urls.redacted(target), "airflow_version": airflow_version, "seed": seed})
    for name, n in counts.items():
        report.table(name).add("rows", n)
    return report.finish()



# -- sources ------------------------------------------------------------------------------------

def _dag_ids(dag_ids) -> tuple[str, ...]:
    ids = tuple(dag_ids or ())
    if any(not d or not d.strip() for d in ids):
        raise UsageError("--dag-id needs a DAG id; an empty one would match nothing")
    return ids


def _since(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r} is not an ISO 8601 date") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _batch_sha(batch: pa.RecordBatch) -> str:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return hashlib.sha256(sink.getvalue()).hexdigest()


class DatabaseSource:
    """A source database read table by table through the extractor, every read in one snapshot
    and at one cut (``etl.cut``), however long the job takes and whatever writes meanwhile."""

    def __init__(self, url: str, version: str | None, names: tuple | None, exclude: tuple, since: str | None,
                 dag_ids, chunk_rows: int):
        from . import identity, versions
        from .cut import Snapshot
        from .extract import Filters

        self.engine = urls.open_engine(url)
        self.url = url
        self.version, self.revision = versions.detect_version(self.engine, override=version)
        with self.engine.connect() as conn:
            self.fingerprint = identity.fingerprint(conn)
        self.names = tables.select(sa.inspect(self.engine).get_table_names(), names, exclude)
        self.filters = Filters(_since(since), _dag_ids(dag_ids))
        self.chunk_rows = chunk_rows
        self.reads = Snapshot(self.engine)
        self._cut = None
        self.zero_dates: dict[tuple[str, str], int] = {}

    @property
    def cut(self):
        """The high-water marks, taken in the snapshot at the first read (or given, to resume an export)."""
        if self._cut is None:
            from .cut import take

            self._cut = take(self.reads, self.names)
        return self._cut

    @cut.setter
    def cut(self, value) -> None:
        self._cut = value

    def close(self) -> None:
        self.reads.close()
        self.engine.dispose()

    def tables(self) -> list[str]:
        return list(self.names)

    def reader(self, table: str):
        from .extract import TableReader

        return TableReader(self.engine, self.version, table, self.filters, self.chunk_rows, reads=self.reads, cut=self.cut)

    def read(self, reader, after: list | None = None) -> Iterator:
        """A reader's chunks, noting the MySQL zero dates it read as NULL."""
        yield from reader.chunks(after=after)
        for column, n in reader.zero_dates.items():
            self.zero_dates[(reader.name, column)] = self.zero_dates.get((reader.name, column), 0) + n

    def chunks(self, table: str):
        from .pipeline import Chunk

        for i, chunk in enumerate(self.read(self.reader(table))):
            yield Chunk(chunk.batch, _batch_sha(chunk.batch), f"{table}#{i}")

    def batches(self, table: str) -> Iterator[pa.RecordBatch]:
        if table in self.names or sa.inspect(self.engine).has_table(table):
            for chunk in self.read(self.reader(table)):
                yield chunk.batch

    def rows_by_id(self, table: str, ids: list[int], columns: tuple[str, ...]) -> dict[int, tuple]:
        """Some rows of ``table`` by id, for the target to recognise this history (``etl.identity``)."""
        if not sa.inspect(self.engine).has_table(table):
            return {}
        with self.reads.connect() as conn:
            t = sa.Table(table, sa.MetaData(), autoload_with=conn)  # typed: SQLite keeps instants as text
            return {r[0]: tuple(r[1:]) for r in conn.execute(sa.select(t.c.id, *(t.c[c] for c in columns)).where(t.c.id.in_(ids)))}

    def notes(self) -> list[str]:
        return [f"{table}.{column}: {n} MySQL zero dates (0000-00-00) read as NULL, as Airflow's own driver reads them"
                for (table, column), n in sorted(self.zero_dates.items())]


class PackageSource:
    """A finished export read back for import."""

    def __init__(self, dest: str, endpoint: str | None, names: tuple | None, exclude: tuple):
        from .staging import Package, Store

        self.store = Store(dest, endpoint)
        self.package = Package(self.store)
        self.version = self.package.version
        self.fingerprint = (self.package.manifest.get("identity") or {}).get("source_fingerprint")
        self.names = tables.select(self.package.tables(), names, exclude)

    def tables(self) -> list[str]:
        return list(self.names)

    def rows_by_id(self, table: str, ids: list[int], columns: tuple[str, ...]) -> dict[int, tuple]:
        return self.package.rows_by_id(table, ids, columns)

    def chunks(self, table: str):
        from .pipeline import Chunk

        for batch, sha, name in self.package.chunks(table):
            yield Chunk(batch, sha, name)

    def batches(self, table: str) -> Iterator[pa.RecordBatch]:
        if table in self.package.tables():
            for batch, _, _ in self.package.chunks(table):
                yield batch


def _open_source(source: str, version, names, exclude, since, dag_ids, chunk_rows, endpoint):
    if urls.is_database_url(source):
        return DatabaseSource(source, version, names, exclude, since, dag_ids, chunk_rows)
    if since or dag_ids:
        raise UsageError("--since and --dag-id filter an export; an import takes the export as it is")
    src = PackageSource(source, endpoint, names, exclude)
    src.package.verify()
    return src


# -- jobs -----------------------------------------------------------------------------------------

def export(source: str, dest: str, tables: tuple | None = None, exclude_tables: tuple = (), since: str | None = None,
           dag_ids=None, chunk_rows: int = 50_000, s3_endpoint_url: str | None = None, source_version: str | None = None,
           progress: bool = False, unpaused: tuple = ()) -> Report:
    """Stream the source's history into Parquet chunks and a manifest at ``dest``; resumable.

    ``unpaused``: DAGs paused for the export's sake (an export DAG's pausing); their rows of the
    ``dag`` table are exported unpaused, as their owners left them."""
    from .progress import Progress
    from .staging import PackageWriter, Store

    from .cut import Cut

    src = DatabaseSource(source, source_version, tables, exclude_tables, since, dag_ids, chunk_rows)
    try:
        report = Report("export")
        report.info.update({"source": urls.redacted(source), "dest": dest, "airflow_version": src.version,
                            "alembic_revision": src.revision})
        writer = PackageWriter(Store(dest, s3_endpoint_url), export_identity(src, chunk_rows))
        if not writer.open(cut=src.cut.to_dict()):
            report.notes.append(f"{dest} already holds this complete export; nothing to do")
            return report.finish()
        try:
            src.cut = Cut.from_dict(writer.cut)  # a resumed export stops where its first run's cut stood
            report.info["cut"] = writer.cut
            bar = Progress(progress)
            try:
                _export_tables(src, writer, report, bar, tuple(unpaused))
                bar.finish()
            finally:
                bar.close()
            writer.commit({"source": urls.redacted(source), "source_dialect": src.engine.dialect.name,
                           "airflow_version": src.version, "alembic_revision": src.revision, "filters": src.filters.to_dict()})
        finally:
            writer.release()
        report.notes.extend(src.notes())
        return report.finish()
    finally:
        src.close()


def export_identity(src: DatabaseSource, chunk_rows: int, **more) -> dict:
    """What makes two runs the same export, so that one resumes the other: the source as its server
    names it (not its URL, which another run may spell otherwise), what was asked for, the chunking."""
    return {"source_fingerprint": src.fingerprint, "airflow_version": src.version, "alembic_revision": src.revision,
            "filters": src.filters.to_dict(), "tables": src.names, "chunk_rows": chunk_rows, **more}


def _export_tables(src: DatabaseSource, writer, report: Report, bar, unpaused: tuple) -> None:
    from .extract import from_jsonable
    from .pipeline import prefetch

    seconds = report.info.setdefault("seconds_per_table", {})
    for name in src.names:
        started = time.perf_counter()
        state = writer.table_state(name)
        reader = src.reader(name)
        if not state["done"]:
            if reader.key is None and state["chunks"]:
                state = {"chunks": [], "last_key": None, "done": False}  # no key to resume after: start the table again
            bar.start(name, reader.count() if bar.enabled else None)
            after = [from_jsonable(v) for v in state["last_key"]] if state["last_key"] else None
            # The next page is read (the server's work) while this one is encoded and written.
            for chunk in prefetch(src.read(reader, after=after)):
                batch = unpause(chunk.batch, unpaused) if name == "dag" and unpaused else chunk.batch
                writer.write_chunk(name, state, batch, chunk.last_key)
                bar.advance(name, chunk.batch.num_rows)
            writer.finish_table(name, state, reader.schema)
        else:
            writer.finish_table(name, state, reader.schema)
        t = report.table(name)
        t.add("rows", sum(c["rows"] for c in state["chunks"]))
        t.add("chunks", len(state["chunks"]))
        t.add("bytes", sum(c.get("bytes", 0) for c in state["chunks"]))
        seconds[name] = round(time.perf_counter() - started, 3)


def unpause(batch: pa.RecordBatch, dag_ids) -> pa.RecordBatch:
    import pyarrow.compute as pc

    i = batch.schema.get_field_index("is_paused")
    ours = pc.is_in(batch.column("dag_id"), value_set=pa.array(list(dag_ids), pa.string()))
    return batches.put(batch, batch.schema.field(i), pc.if_else(ours, False, batch.column(i)))


def import_(dest: str, target: str, tables: tuple | None = None, exclude_tables: tuple = (), since: str | None = None,
            dag_ids=None, chunk_rows: int = 50_000, s3_endpoint_url: str | None = None, target_version: str | None = None,
            on_conflict: str = "skip", source_fernet_key: str | None = None, target_fernet_key: str | None = None,
            force: bool = False, progress: bool = False, xcom_json: bool = False) -> Report:
    """Load an export into ``target``: verified first, then mapped and upserted chunk by chunk."""
    src = _open_source(dest, None, tables, exclude_tables, since, dag_ids, chunk_rows, s3_endpoint_url)
    from .staging import QuarantineWriter

    report = Report("import")
    report.info.update({"from": dest, "target": urls.redacted(target), "source_airflow_version": src.version})
    _load(src, target, target_version, on_conflict, source_fernet_key, target_fernet_key, force, progress,
          QuarantineWriter(src.store, target), report, dry_run=False, xcom_json=xcom_json)
    return report.finish()


def _state_dir():
    """Where a migrate without ``--via`` keeps its quarantine: the user's state folder, not the current one."""
    import os
    from pathlib import Path

    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "airflow-metadata-etl"


def migrate(source: str, target: str, via: str | None = None, tables: tuple | None = None, exclude_tables: tuple = (),
            since: str | None = None, dag_ids=None, chunk_rows: int = 50_000, s3_endpoint_url: str | None = None,
            source_version: str | None = None, target_version: str | None = None, on_conflict: str = "skip",
            source_fernet_key: str | None = None, target_fernet_key: str | None = None, force: bool = False,
            progress: bool = False, xcom_json: bool = False) -> Report:
    """Source to target with no staging files; ``via`` also keeps the staged Parquet copy."""
    from .staging import QuarantineWriter, Store

    report = Report("migrate")
    report.info.update({"source": urls.redacted(source), "target": urls.redacted(target)})
    quarantine = QuarantineWriter(Store(via or str(_state_dir()), s3_endpoint_url), target)
    if via:
        export(source, via, tables=tables, exclude_tables=exclude_tables, since=since, dag_ids=dag_ids,
               chunk_rows=chunk_rows, s3_endpoint_url=s3_endpoint_url, source_version=source_version)
        report.info["via"] = via
        staged = PackageSource(via, s3_endpoint_url, tables, exclude_tables)
        report.info["source_airflow_version"] = staged.version
        _load(staged, target, target_version, on_conflict, source_fernet_key, target_fernet_key, force, progress,
              quarantine, report, dry_run=False, xcom_json=xcom_json)
        return report.finish()
    src = DatabaseSource(source, source_version, tables, exclude_tables, since, dag_ids, chunk_rows)
    try:
        report.info["source_airflow_version"] = src.version
        _load(src, target, target_version, on_conflict, source_fernet_key, target_fernet_key, force, progress,
              quarantine, report, dry_run=False, xcom_json=xcom_json)
    finally:
        src.close()
    return report.finish()


def diff(source: str, target: str, tables: tuple | None = None, exclude_tables: tuple = (), since: str | None = None,
         dag_ids=None, chunk_rows: int = 50_000, s3_endpoint_url: str | None = None, source_version: str | None = None,
         target_version: str | None = None, on_conflict: str = "skip", source_fernet_key: str | None = None,
         target_fernet_key: str | None = None, progress: bool = False, xcom_json: bool = False) -> Report:
    """What a migrate would do, table by table, writing nothing; exit code 3 when not in sync.

    Out of sync: rows to insert or update, and, unless the diff is filtered by date or DAG, rows
    the target holds from this source (by its ledger) that the source no longer has."""
    from .staging import QuarantineWriter

    src = _open_source(source, source_version, tables, exclude_tables, since, dag_ids, chunk_rows, s3_endpoint_url)
    try:
        report = Report("diff")
        report.info.update({"source": urls.redacted(source) if urls.is_database_url(source) else source,
                            "target": urls.redacted(target), "source_airflow_version": src.version})
        _load(src, target, target_version, on_conflict, source_fernet_key, target_fernet_key, True, progress,
              QuarantineWriter(None), report, dry_run=True, xcom_json=xcom_json)
    finally:
        if isinstance(src, DatabaseSource):
            src.close()
    counted = ("insert", "update") if since or dag_ids else ("insert", "update", "gone_from_source")
    pending = sum(t.counts.get(c, 0) for t in report.tables.values() for c in counted)
    report.info["in_sync"] = pending == 0
    report.info["exit_code"] = 0 if pending == 0 else 3
    return report.finish()


def load_source(src, target: str, quarantine, report: Report, on_conflict: str = "skip", source_fernet_key: str | None = None,
                target_fernet_key: str | None = None, force: bool = False, source_key: str | None = None,
                xcom_json: bool = False) -> Report:
    """Map and load any source (a ``PackageSource``, a part of one, a ``DatabaseSource``) into ``target``.

    What ``import_`` does after verifying, for callers that cut a job into units of work that run
    apart (``etl.units``, behind the Airflow DAGs); ``quarantine`` receives the unmappable rows;
    ``source_key``: the source as the target already recognised it (once, when the job was planned).
    """
    _load(src, target, None, on_conflict, source_fernet_key, target_fernet_key, force, False, quarantine, report,
          dry_run=False, recognised=source_key, xcom_json=xcom_json)
    return report.finish()


def _load(src, target_url: str, target_version, on_conflict, source_key, target_key, force, progress, quarantine,
          report: Report, dry_run: bool, recognised: str | None = None, xcom_json: bool = False) -> None:
    from . import pipeline
    from .load.target import Target
    from .progress import Progress
    from .secrets import Rekeyer
    from .transform import Mapper

    rekeyer = Rekeyer(source_key, target_key)
    target = Target(target_url, source_key=src.fingerprint, version=target_version, create=bool(target_version),
                    update=on_conflict == "update", force=force, dry_run=dry_run, quarantine=quarantine)
    try:
        report.info["target_airflow_version"] = target.version
        if recognised:
            target.use_source(recognised)
        else:
            target.recognise(src.fingerprint, src.rows_by_id)
        report.info["source_key"] = target.source_key
        mapper = Mapper(src.version, target.version, quarantine, read_source=src.batches, xcom_json=xcom_json)
        bar = Progress(progress)
        try:
            pipeline.run(src, target, mapper, rekeyer, report, bar, dry_run=dry_run)
            bar.finish()
        finally:
            bar.close()
        if isinstance(src, DatabaseSource):
            report.notes.extend(src.notes())
        for (table, reason), n in sorted(quarantine.counts.items()):
            report.table(table).add("quarantined", n)
            report.notes.append(f"quarantined {n} {table} rows: {reason}")
        if quarantine.location:
            report.info["quarantine"] = quarantine.location
        summary = mapper.summary()
        for table, cols in summary["removed_columns"].items():
            report.notes.append(f"{table}: columns not in Airflow {target.version}, not loaded: {', '.join(cols)}")
        for change in summary["rewritten"]:
            report.notes.append(f"{change['column']}: {change['rows']} {change['what']}")
        for gone in summary["tables_not_carried"]:
            report.notes.append(f"{gone['table']}: {gone['rows']} rows not loaded: {gone['reason']} (they stay in the source"
                                f"{' and the export' if isinstance(src, PackageSource) else ''})")
        for name, t in report.tables.items():
            if t.counts.get("gone_from_source"):
                report.notes.append(f"{name}: the target holds {t.counts['gone_from_source']} rows an earlier run loaded "
                                    "from this source that the source no longer has")
        if not rekeyer.active and not dry_run:
            report.notes.append("no Fernet keys given: encrypted values were copied as they are; the target must use the source's Fernet key")
    finally:
        target.dispose()
