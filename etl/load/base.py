"""Loading target-shaped Arrow batches into one target table, exactly once, ids owned by the target.

A chunk is one transaction: references are rewritten to the target's ids, rows the target
already has are recognised (by natural key, or through the id map for rows that have only a
surrogate id), new surrogate ids are reserved from the target, the rows are written, and the
id map and chunk ledger rows go in before the commit. A crash therefore leaves whole chunks,
and a re-run writes nothing twice.

Dialects differ only in how rows reach the server (COPY, multi-row INSERT, executemany) and
how ids are reserved; those live in ``postgresql.py``, ``mysql.py`` and ``sqlite.py``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import Callable, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from .. import batches, ledger, urls
from ..errors import EtlError
from .references import Check, References, checks

log = logging.getLogger("etl.load")

#: Natural keys that no constraint declares, or where a table has several unique keys.
NATURAL_KEYS = {
    "dag_run": ("dag_id", "run_id"),
    "log_template": ("filename", "elasticsearch_id"),
    "dataset": ("uri",),
    "asset": ("name", "uri"),
    "asset_alias": ("name",),
    "dataset_alias": ("name",),
}

#: References that carry no foreign key in Airflow's schema but point at rows we re-number.
SOFT_REFERENCES = {
    "task_instance": {"job_id": "job", "queued_by_job_id": "job"},
    "task_instance_history": {"job_id": "job", "queued_by_job_id": "job", "trigger_id": "trigger"},
    "dag_run": {"creating_job_id": "job", "scheduled_by_job_id": "job"},
    "trigger": {"triggerer_id": "job"},
    "xcom": {"dag_run_id": "dag_run"},  # keyed by the run's id since 2.3, with no foreign key to it
    "_xcom_archive": {"dag_run_id": "dag_run"},  # the xcom rows Airflow 3's upgrade took out, ids as in xcom
    "dataset_event": {"dataset_id": "dataset"},  # events outlive their dataset: no foreign key
    "asset_event": {"asset_id": "asset"},
}

Quarantine = Callable[[str, pa.RecordBatch, str], None]


@dataclasses.dataclass
class Ref:
    column: str
    table: str
    nullable: bool


@dataclasses.dataclass
class TargetTable:
    """What the loader needs to know of a reflected target table."""

    table: sa.Table
    natural_key: tuple[str, ...] | None
    surrogate: str | None  # "int" (target-assigned id), "uuid" (kept unless the target has the row) or None
    refs: list[Ref]
    checks: list[Check] = dataclasses.field(default_factory=list)
    #: NOT NULL columns the loader must be given a value for (no server default, not the target's own id)
    required: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.table.name


def describe(table: sa.Table, inspector: sa.Inspector, version: str) -> TargetTable:
    pk = tuple(c.name for c in table.primary_key.columns)
    uniques = [tuple(u["column_names"]) for u in inspector.get_unique_constraints(table.name)]
    uniques += [tuple(i["column_names"]) for i in inspector.get_indexes(table.name) if i.get("unique")]
    uniques = [u for u in uniques if u and None not in u]
    surrogate = None
    if pk == ("id",):
        surrogate = "int" if isinstance(table.c.id.type, sa.Integer) else "uuid"
    key = NATURAL_KEYS.get(table.name)
    if key is None:
        if surrogate is None and pk:
            key = pk
        elif uniques:
            key = next((u for u in uniques if "run_id" in u), uniques[0])
    refs = []
    for fk in table.foreign_keys:
        # A key declared twice (2.10.5's dataset_alias_dataset has ds_dsa_alias_id and
        # dataset_alias_dataset_alias_id_fkey) must not rewrite its column twice.
        if fk.column.name == "id" and fk.parent.name != "id" and all(r.column != fk.parent.name for r in refs):
            refs.append(Ref(fk.parent.name, fk.column.table.name, fk.parent.nullable))
    for col, target in SOFT_REFERENCES.get(table.name, {}).items():
        if col in table.c and all(r.column != col for r in refs):
            refs.append(Ref(col, target, table.c[col].nullable))
    required = tuple(c.name for c in table.c if not c.nullable and c.server_default is None
                     and not (c.primary_key and surrogate == "int"))
    return TargetTable(table, key, surrogate, refs, checks(version, table), required)


@dataclasses.dataclass
class ChunkResult:
    rows_in: int = 0
    inserted: int = 0
    updated: int = 0
    existing: int = 0
    skipped_chunk: bool = False


class Held:
    """A writer lock, released by closing what holds it (a session, a file)."""

    def __init__(self, holder=None):
        self.holder = holder

    def release(self) -> None:
        if self.holder is not None:
            self.holder.close()
            self.holder = None


class Dialect:
    """How rows reach one kind of server. Subclasses register themselves by dialect name."""

    name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Dialect]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        Dialect.registry[cls.name] = cls

    def insert(self, conn: sa.Connection, table: sa.Table, batch: pa.RecordBatch) -> int:
        """Plain insert; a unique violation raises ``IntegrityError``."""
        raise NotImplementedError

    def upsert(self, conn: sa.Connection, table: sa.Table, batch: pa.RecordBatch, key: tuple[str, ...], update: bool) -> int:
        """Insert, leaving (``update`` False) or overwriting rows whose key exists; returns rows written."""
        raise NotImplementedError

    def reserve_ids(self, conn: sa.Connection, table: sa.Table, n: int, exclusive: bool) -> np.ndarray:
        """``n`` new ids from the target's own generator. ``exclusive``: no other writer is running
        (the scheduler check passed), so a block can be taken in one step."""
        raise NotImplementedError

    def repair_sequence(self, conn: sa.Connection, table: sa.Table) -> None:
        """Move the id generator past max(id), so the next scheduler insert cannot collide."""

    def hold(self, engine: sa.Engine, shared: bool):
        """The target's writer lock, held until ``release()``; None when another job holds it.
        ``shared``: a forced writer (``--force``, the import DAG's units) that others may join."""
        raise NotImplementedError

    def bulk_sessions(self, engine: sa.Engine) -> None:
        """Let the engine's sessions commit without waiting for the disk; ``durable`` waits once."""

    def durable(self, conn: sa.Connection) -> None:
        """Return once everything the bulk sessions committed is on disk."""

    def defer_checks(self, conn: sa.Connection, table: sa.Table) -> list[tuple[str, str]]:
        """Drop what an empty ``table`` can do without during a bulk load (its secondary indexes
        and its own foreign keys); returns (name, definition) of each, in the order to restore them."""
        return []

    def restore(self, conn: sa.Connection, definition: str) -> None:
        raise NotImplementedError

    def remove_violators(self, conn: sa.Connection, definition: str) -> tuple[pa.RecordBatch, str] | None:
        """Delete the rows that keep the foreign key ``definition`` from being restored; returns them
        and why, or None when ``definition`` is no foreign key."""
        return None

    def lookup(self, conn: sa.Connection, table: sa.Table, key: tuple[str, ...], batch: pa.RecordBatch) -> dict:
        """Target ids of the rows whose natural key is in ``batch``: {key tuple: id}."""
        keys = list(zip(*(batch.column(k).to_pylist() for k in key)))
        found: dict = {}
        cols = [table.c[k] for k in key]
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            cond = sa.tuple_(*cols).in_(part) if len(cols) > 1 else cols[0].in_([p[0] for p in part])
            for row in conn.execute(sa.select(table.c.id, *cols).where(cond)):
                found[tuple(_norm(v) for v in row[1:])] = row[0]
        return found


def _norm(v):
    """Datetimes come back naive from some drivers, keys compare in UTC; PostgreSQL's uuid comes back
    as a UUID, batches carry the text."""
    import datetime as dt
    import uuid

    if isinstance(v, dt.datetime) and v.tzinfo is None:
        return v.replace(tzinfo=dt.timezone.utc)
    if isinstance(v, uuid.UUID):
        return str(v)
    return v


class TableLoader:
    """Loads the chunks of one table for one source into one target."""

    def __init__(self, engine: sa.Engine, dialect: Dialect, target: TargetTable, source: str, update: bool,
                 id_maps: ledger.IdMaps, uuid_maps: dict[str, dict[str, str]], quarantine: Quarantine,
                 references: References, dry_run: bool = False, exclusive: bool = False):
        self.exclusive, self.references = exclusive, references
        self.engine, self.dialect, self.t, self.source, self.update = engine, dialect, target, source, update
        self.id_maps, self.quarantine, self.dry_run = id_maps, quarantine, dry_run
        self.uuid_maps = uuid_maps
        if target.surrogate == "uuid":
            # Pairs where the target already had the row under another UUID; dependents follow them.
            self.uuid_map = uuid_maps.setdefault(target.name, {})
        self._fake_id = -2_000_000_000  # counts up from here: stand-ins form runs and fit an INTEGER column
        with engine.begin() as conn:
            if target.surrogate == "int" and not dry_run:
                # A target whose sequence lags behind max(id) would hand out ids that exist.
                dialect.repair_sequence(conn, target.table)
            self.count_at_start = conn.execute(sa.select(sa.func.count()).select_from(target.table)).scalar_one()
            ours = 0
            # Asked once: a dry run never creates the ledger, any other run made it before its first loader.
            self.ledgered = ledger.present(conn)
            # No chunk of this source's table loaded yet and no other writer: a chunk can only have been
            # loaded by this loader, which need not ask the ledger for each.
            self.loaded_here: set[str] | None = None
            if self.ledgered:
                ours = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(ledger.CHUNKS.c.rows_written), 0))
                                    .where(ledger.CHUNKS.c.table_name == target.name)).scalar_one()
                if exclusive and not ledger.any_chunk(conn, source, target.name):
                    self.loaded_here = set()
            # An empty table loads without its secondary indexes and foreign keys, restored once
            # in close(); what a stopped run left set aside, Target.prepare restored before this.
            self.deferred: list[str] = []
            if exclusive and not dry_run and self.ledgered and self.count_at_start == 0:
                dropped = dialect.defer_checks(conn, target.table)
                ledger.record_deferred(conn, target.name, dropped)
                self.deferred = [d for _, d in dropped]
        references.loading(target.name, empty=self.count_at_start == 0)
        # This source's rows of the table as the ledger knows them, and how many the dry run meets again:
        # the difference is what the target holds from this source and the source no longer has.
        self.from_source = len(id_maps.get(target.name)) if target.surrogate == "int" and self.ledgered else 0
        self.met_again = 0
        # Every row in the table came through our ledger: a plain bulk insert cannot conflict
        # except with a re-chunked earlier run or another source's rows, which the IntegrityError fallback handles.
        self.clean = self.count_at_start <= ours and not update

    def load(self, batch: pa.RecordBatch, sha256: str, chunk: str) -> ChunkResult:
        result = ChunkResult(rows_in=batch.num_rows)
        with self.engine.connect() if self.dry_run else self.engine.begin() as conn:
            if self.ledgered and (sha256 in self.loaded_here if self.loaded_here is not None
                                  else ledger.chunk_loaded(conn, self.source, self.t.name, sha256)):
                result.skipped_chunk = True
                result.existing = batch.num_rows
                if self.from_source:  # the dry run meets these rows again, though it loads nothing
                    ids = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
                    self.met_again += int(self.id_maps.get(self.t.name).lookup(ids)[0].sum())
                return result
            batch = self._required(self._check(self._resolve(batch)))
            if self.t.surrogate == "int":
                self._load_int(conn, batch, result)
            elif self.t.surrogate == "uuid":
                self._load_uuid(conn, batch, result)
            else:
                self._load_keyed(conn, batch, result)
            if not self.dry_run:
                ledger.record_chunk(conn, self.source, self.t.name, sha256, chunk, batch.num_rows, result.inserted)
        self.references.wrote(self.t.name, batch)
        if self.loaded_here is not None and not self.dry_run:
            self.loaded_here.add(sha256)
        return result

    def close(self, restorer: Restorer | None = None) -> None:
        """The table is loaded: restore the indexes and foreign keys its load set aside, now or,
        handed to ``restorer``, while the next table loads."""
        if self.deferred:
            if restorer is None:
                restore(self.engine, self.dialect, self.t.name, self.deferred, self.quarantine)
            else:
                restorer.submit(self.t.name, self.deferred)
            self.deferred = []

    # -- references -------------------------------------------------------------------------
    def _resolve(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        for ref in self.t.refs:
            if ref.column not in batch.schema.names:
                continue
            col = batch.column(ref.column)
            if self.id_maps.knows(ref.table):
                ids = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
                found, target = self.id_maps.get(ref.table).lookup(ids)
                present = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False))
                missing = present & ~found
                new = pa.array(target, pa.int64()).cast(batch.schema.field(ref.column).type)
                mask = pa.array(~found)
                batch = _set(batch, ref.column, pc.if_else(mask, pa.nulls(len(new), new.type), new))
                if missing.any():
                    batch = self._missing(batch, ref, missing)
            elif ref.table in self.uuid_maps:
                remap = self.uuid_maps[ref.table]
                if remap:
                    batch = _set(batch, ref.column, pa.array([remap.get(v, v) for v in col.to_pylist()], col.type))
            elif ref.nullable:
                # The referenced table is rebuilt by the target (dag_version, backfill, ...): no id to keep.
                batch = _set(batch, ref.column, pa.nulls(batch.num_rows, col.type))
        return batch

    def _check(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Rows that would break a foreign key the id maps do not cover: NULLed where every column
        of the key allows it, else quarantined (``etl.load.references``)."""
        for check in self.t.checks:
            if batch.num_rows == 0 or not all(c in batch.schema.names for c in check.columns):
                continue
            if check.columns[0] in {r.column for r in self.t.refs} and self.id_maps.knows(check.table):
                continue  # an id the id map already rewrote, or NULLed, or quarantined
            bad = self.references.missing(check, batch)
            if not pc.any(bad).as_py():
                continue
            if check.nullable:
                for c in check.columns:
                    batch = _set(batch, c, pc.if_else(bad, pa.nulls(batch.num_rows, batch.column(c).type), batch.column(c)))
                continue
            self.quarantine(self.t.name, batch.filter(bad), check.reason())
            batch = batch.filter(pc.invert(bad))
        return batch

    def _required(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Rows with NULL where the target requires a value (a MySQL zero date read as NULL, a source
        that never enforced the column) are quarantined, not left to fail the chunk."""
        for name in self.t.required:
            if name in batch.schema.names and batch.column(name).null_count:
                bad = pc.is_null(batch.column(name))
                self.quarantine(self.t.name, batch.filter(bad), f"{name} is NULL, which the target's {self.t.name} does not allow")
                batch = batch.filter(pc.invert(bad))
        return batch

    def _missing(self, batch: pa.RecordBatch, ref: Ref, missing: np.ndarray) -> pa.RecordBatch:
        """A reference to a row that was not loaded: NULL where Airflow allows it, else quarantine."""
        if ref.nullable:
            return batch
        bad = pa.array(missing)
        self.quarantine(self.t.name, batch.filter(bad), f"{ref.column} refers to a {ref.table} row that was not loaded")
        return batch.filter(pc.invert(bad))

    # -- the three kinds of table -------------------------------------------------------------
    def _load_keyed(self, conn: sa.Connection, batch: pa.RecordBatch, result: ChunkResult) -> None:
        if batch.num_rows == 0:
            return
        if self.dry_run:
            new = batch if not self.count_at_start or not self.t.natural_key else _without_existing(conn, self.t, batch)
            result.inserted += new.num_rows
            existing = batch.num_rows - new.num_rows
            if self.update:
                result.updated += existing
            else:
                result.existing += existing
            return
        if self.clean:
            try:
                with conn.begin_nested():
                    result.inserted += self.dialect.insert(conn, self.t.table, batch)
                return
            except sa.exc.IntegrityError:
                self.clean = False
        written = self.dialect.upsert(conn, self.t.table, batch, self.t.natural_key, self.update)
        if self.update:
            result.updated += written
        else:
            result.inserted += written
            result.existing += batch.num_rows - written

    def _load_int(self, conn: sa.Connection, batch: pa.RecordBatch, result: ChunkResult) -> None:
        idmap = self.id_maps.get(self.t.name)
        src = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
        done, _ = idmap.lookup(src)
        if done.any():
            self.met_again += int(done.sum())
            result.existing += int(done.sum())
            batch, src = batch.filter(pa.array(~done)), src[~done]
        if batch.num_rows == 0:
            return
        new_src, new_dst = [], []
        if self.t.natural_key and not self.clean:
            found = self.dialect.lookup(conn, self.t.table, self.t.natural_key, batch)
            if found:
                keys = list(zip(*(batch.column(k).to_pylist() for k in self.t.natural_key)))
                hit = np.array([tuple(_norm(v) for v in k) in found for k in keys])
                existing_ids = np.array([found.get(tuple(_norm(v) for v in k), 0) for k in keys], np.int64)
                new_src.append(src[hit])
                new_dst.append(existing_ids[hit])
                if self.update and hit.any() and self.dry_run:
                    result.updated += int(hit.sum())
                elif self.update and hit.any():
                    upd = _set(batch.filter(pa.array(hit)), "id", pa.array(existing_ids[hit]))
                    result.updated += self.dialect.upsert(conn, self.t.table, upd, ("id",), True)
                else:
                    result.existing += int(hit.sum())
                batch, src = batch.filter(pa.array(~hit)), src[~hit]
        if batch.num_rows:
            if self.dry_run:
                # Stand-in ids, so that dependants of would-be-inserted rows resolve in the dry run.
                ids = np.arange(self._fake_id, self._fake_id + batch.num_rows, dtype=np.int64)
                self._fake_id += batch.num_rows
            elif self.clean and self.t.natural_key:
                # Another source's rows (default_pool) or a re-chunked earlier run may hold the key.
                unnumbered = batch
                ids = self.dialect.reserve_ids(conn, self.t.table, batch.num_rows, self.exclusive)
                batch = _set(batch, "id", pa.array(ids).cast(batch.schema.field("id").type))
                try:
                    with conn.begin_nested():
                        self.dialect.insert(conn, self.t.table, batch)
                except sa.exc.IntegrityError:
                    self.clean = False
                    return self._load_int(conn, unnumbered, result)
            else:
                ids = self.dialect.reserve_ids(conn, self.t.table, batch.num_rows, self.exclusive)
                batch = _set(batch, "id", pa.array(ids).cast(batch.schema.field("id").type))
                self.dialect.insert(conn, self.t.table, batch)
            result.inserted += batch.num_rows
            new_src.append(src)
            new_dst.append(ids)
        if new_src and self.dry_run:
            idmap.extend(np.concatenate(new_src), np.concatenate(new_dst))
        elif new_src:
            s, d, n = idmap.extend(np.concatenate(new_src), np.concatenate(new_dst))
            self.dialect.insert(conn, ledger.ID_MAP, pa.RecordBatch.from_pydict({
                "source": pa.array([self.source] * len(s)), "table_name": pa.array([self.t.name] * len(s)),
                "source_id": pa.array(s, pa.int64()), "target_id": pa.array(d, pa.int64()),
                "length": pa.array(n, pa.int64())}))

    def _load_uuid(self, conn: sa.Connection, batch: pa.RecordBatch, result: ChunkResult) -> None:
        if batch.num_rows == 0:
            return
        if not self.clean and self.t.natural_key:
            found = self.dialect.lookup(conn, self.t.table, self.t.natural_key, batch)
            if found:
                keys = list(zip(*(batch.column(k).to_pylist() for k in self.t.natural_key)))
                ours = batch.column("id").to_pylist()
                hit = np.zeros(len(keys), bool)
                for i, k in enumerate(keys):
                    tid = found.get(tuple(_norm(v) for v in k))
                    if tid is not None:
                        hit[i] = True
                        if str(tid) != str(ours[i]):
                            self.uuid_map[str(ours[i])] = str(tid)
                result.existing += int(hit.sum())
                batch = batch.filter(pa.array(~hit))
        self._load_keyed(conn, batch, result)


class Restorer:
    """Restores what loads set aside on a thread and connection of its own, table after table in
    the order they were handed in.

    Building a loaded table's indexes and checking its foreign keys is work for the server alone;
    done here, it overlaps with the next table's COPY instead of stopping the load for it. The
    caller sets the next table's own indexes and keys aside *before* handing in the last table:
    dropping a foreign key locks the table it references, which an index build holds.
    """

    def __init__(self, engine: sa.Engine, dialect: Dialect, quarantine: Quarantine):
        self.engine, self.dialect, self.quarantine = engine, dialect, quarantine
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="etl-restore")
        self._handed: list[concurrent.futures.Future] = []

    def submit(self, table: str, definitions: list[str]) -> None:
        """Queue ``table``'s restore; a failed earlier one is raised here."""
        for done in [f for f in self._handed if f.done()]:
            done.result()
        self._handed.append(self._pool.submit(restore, self.engine, self.dialect, table, list(definitions), self.quarantine))

    def wait(self) -> None:
        """Every table handed in is restored; the first failure is raised here."""
        for future in self._handed:
            future.result()

    def stop(self) -> None:
        self._pool.shutdown(wait=True)


def restore(engine: sa.Engine, dialect: Dialect, table: str, definitions: list[str], quarantine: Quarantine) -> None:
    """All of ``table``'s definitions in one transaction, with the ledger rows that held them.

    Should the loaded rows break a foreign key after all (the loaders check every key first), the
    rows that break it are moved to the quarantine and the key is restored: a target is never left
    without its indexes and keys, and a re-run gets past the rows that stopped this one."""
    with engine.begin() as conn:
        for definition in definitions:
            try:
                with conn.begin_nested():
                    dialect.restore(conn, definition)
            except sa.exc.IntegrityError as exc:
                moved = dialect.remove_violators(conn, definition)
                if moved is None:
                    raise EtlError(f"{table}: cannot restore {definition!r} after the load: {urls.first_line(exc.orig)}") from exc
                rows, reason = moved
                quarantine(table, rows, reason)
                log.warning("%s: %d rows %s", table, rows.num_rows, reason)
                with conn.begin_nested():
                    dialect.restore(conn, definition)
        ledger.forget_deferred(conn, table)


def _without_existing(conn: sa.Connection, t: TargetTable, batch: pa.RecordBatch) -> pa.RecordBatch:
    from .rowwise import split_existing

    return split_existing(conn, t.table, t.natural_key, batch)[0]


def _set(batch: pa.RecordBatch, name: str, values: pa.Array) -> pa.RecordBatch:
    return batches.put(batch, batch.schema.field(name).with_type(values.type), values)


def dialect_for(engine: sa.Engine) -> Dialect:
    from . import mysql, postgresql, sqlite  # noqa: F401 - each registers itself

    try:
        return Dialect.registry[engine.dialect.name]()
    except KeyError:
        raise EtlError(f"cannot load into {engine.dialect.name}: PostgreSQL, MySQL/MariaDB and SQLite are supported") from None
