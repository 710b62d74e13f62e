"""Runs the mapping chain over Arrow batches: source-version rows in, target-version rows out.

For one table's batch, the ``Mapper`` walks every catalog version between source and target.
At a version with a step (``mappings/``) it applies that step's rule for the table; at every
version it then conforms the batch to that version's columns, as Alembic's ``add_column`` /
``drop_column`` would: a new column takes its server default (or the rule's value), a column
the version no longer has is dropped and reported. So releases whose migrations only touch the
schema need no step file.

Rows a rule cannot map go to the quarantine with a reason and are never dropped silently. The
quarantine always receives the *source* rows as they came in (each batch carries a hidden row
number through the steps for that), so the Parquet kept beside an export can be fixed and
re-imported.

Some rules need other tables: a 2.1 task instance finds its run_id in ``dag_run`` by
(dag_id, execution_date); a 2.2 xcom is moved aside when its task instance is missing; a 3.0
reschedule points at its task instance's new UUID. ``MapContext`` keeps those lookups as 64-bit
key hashes in sorted numpy arrays (about 16 bytes per task instance), filled from the source
rows as the caller feeds tables in load order (``tables.HISTORY``: dag_run, then task_instance,
then the rest), or read through ``read_source`` on first need when a table was not fed.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import batches, catalog, readable
from . import chain as chain_mod
from . import tables
from .errors import EtlError

#: The hidden column that carries each row's position in the source batch through the steps.
ROW = "__etl_source_row"

Sink = Callable[[str, pa.RecordBatch, str], None]
Columns = Mapping[str, Mapping[str, list]]  # version -> table -> catalog column dicts


class Quarantine:
    """Rows the mapper (or loader) could not map: counted per (table, reason) and handed to ``sink``.

    The caller decides where they go (``staging.QuarantineWriter`` writes Parquet beside the
    export); without a sink they stay in ``batches``, which suits tests and small jobs.
    """

    def __init__(self, sink: Sink | None = None):
        self.sink = sink
        self.counts: dict[tuple[str, str], int] = {}
        self.batches: list[tuple[str, pa.RecordBatch, str]] = []

    def __call__(self, table: str, rows: pa.RecordBatch, reason: str) -> None:
        if rows.num_rows == 0:
            return
        self.counts[(table, reason)] = self.counts.get((table, reason), 0) + rows.num_rows
        if self.sink is None:
            self.batches.append((table, rows, reason))
        else:
            self.sink(table, rows, reason)


# -- column helpers for the rules ------------------------------------------------------------------

def put(batch: pa.RecordBatch, name: str, values: pa.Array) -> pa.RecordBatch:
    """``batch`` with column ``name`` set to ``values`` (replaced in place, or appended)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return batches.put(batch, pa.field(name, values.type), values)


def column(batch: pa.RecordBatch, name: str, type_: pa.DataType) -> pa.Array:
    """The column, or all NULL when this source version does not have it yet."""
    i = batch.schema.get_field_index(name)
    return batch.column(i) if i >= 0 else pa.nulls(batch.num_rows, type_)


def where(mask: pa.Array, value, values: pa.Array) -> pa.Array:
    """``value`` where ``mask`` is true (NULL counts as false), else ``values``."""
    return pc.if_else(pc.fill_null(mask, False), pa.scalar(value, values.type), values)


# -- 64-bit key hashes and UUIDv7 --------------------------------------------------------------------

_U = np.uint64
_GOLDEN = _U(0x9E3779B97F4A7C15)
_NULL = _U(0x5BD1E9955BD1E995)
_P = _U(0x100000001B3)  # odd, so every power is a unit mod 2**64
_powers = np.ones(1, dtype=np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit reaches every output bit."""
    x = x ^ (x >> _U(30))
    x = x * _U(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U(27))
    x = x * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def _power_table(n: int) -> np.ndarray:
    global _powers
    if len(_powers) < n:
        _powers = np.cumprod(np.concatenate(([_U(1)], np.full(n - 1, _P, dtype=np.uint64))), dtype=np.uint64)
    return _powers


def _hash_bytes(arr: pa.Array) -> np.ndarray:
    """Polynomial hash of each value's UTF-8 bytes, vectorised over Arrow's offsets and data buffers."""
    arr = arr.cast(pa.large_binary())
    n = len(arr)
    _, offs, data = arr.buffers()
    offsets = np.frombuffer(offs, dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    lo, hi = int(offsets[0]), int(offsets[-1])
    lengths = np.diff(offsets)
    body = np.frombuffer(data, dtype=np.uint8)[lo:hi] if data is not None and hi > lo else np.zeros(0, np.uint8)
    position = np.arange(hi - lo, dtype=np.int64) - np.repeat(offsets[:-1] - lo, lengths)
    terms = body.astype(np.uint64) * _power_table(int(lengths.max(initial=0)) + 1)[position]
    sums = np.concatenate(([_U(0)], np.cumsum(terms, dtype=np.uint64)))
    return _mix((sums[offsets[1:] - lo] - sums[offsets[:-1] - lo]) ^ _mix(lengths.astype(np.uint64) + _GOLDEN))


def _hash_column(arr: pa.Array) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        # ids repeat a lot (one dag_id for thousands of task instances): hash each distinct value once
        encoded = pc.dictionary_encode(arr)
        h = _hash_bytes(encoded.dictionary)[encoded.indices.fill_null(0).to_numpy(zero_copy_only=False)] \
            if len(encoded.dictionary) else np.zeros(len(arr), np.uint64)
    elif pa.types.is_null(t):
        h = np.zeros(len(arr), np.uint64)
    else:  # integers of any width, timestamps of any zone: the same value hashes the same
        h = _mix(pc.cast(arr, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).view(np.uint64) + _GOLDEN)
    if arr.null_count:
        h[np.asarray(arr.is_null().to_numpy(zero_copy_only=False))] = _NULL
    return h


def key_hash(*columns: pa.Array, seed: int = 0) -> np.ndarray:
    """One 64-bit hash per row of a composite key (uint64), vectorised; NULL is a value of its own."""
    h = np.full(len(columns[0]), _mix(np.array([seed], np.uint64) + _GOLDEN)[0], dtype=np.uint64)
    for col in columns:
        h = _mix(h * _GOLDEN ^ _hash_column(col))
    return h


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_PAIRS = np.ascontiguousarray(np.stack([_HEX[np.arange(256) >> 4], _HEX[np.arange(256) & 15]], axis=1)).view(np.uint16)[:, 0]


def epoch_millis(values: pa.Array, fallback: dt.datetime) -> np.ndarray:
    """Unix milliseconds rounded half away from zero, as PostgreSQL's ``(extract(epoch ...) * 1000)::bigint``."""
    us = pc.cast(pc.cast(values, pa.timestamp("us", tz="UTC")), pa.int64())
    us = us.fill_null(int(fallback.timestamp() * 1_000_000)).to_numpy(zero_copy_only=False)
    return np.where(us >= 0, (us + 500) // 1000, -((-us + 500) // 1000))


def uuid7(millis: np.ndarray, key: np.ndarray) -> pa.Array:
    """RFC 9562 UUIDv7 strings: 48 bits of Unix milliseconds, version 7, variant 10, and 74 "random"
    bits taken from the row's natural-key hash, so a re-run gives every row the same id."""
    n = len(millis)
    rand_a = _mix(key ^ _GOLDEN) >> _U(52)
    high = (millis.astype(np.uint64) & _U(0xFFFFFFFFFFFF)) << _U(16) | _U(0x7000) | rand_a
    low = key & _U(0x3FFFFFFFFFFFFFFF) | _U(0x8000000000000000)
    raw = np.empty((n, 16), np.uint8)
    raw[:, :8] = high.astype(">u8").view(np.uint8).reshape(n, 8)
    raw[:, 8:] = low.astype(">u8").view(np.uint8).reshape(n, 8)
    hexed = _HEX_PAIRS[raw].view(np.uint8).reshape(n, 32)
    text = np.full((n, 36), ord("-"), np.uint8)
    for dst, src in ((slice(0, 8), slice(0, 8)), (slice(9, 13), slice(8, 12)), (slice(14, 18), slice(12, 16)),
                     (slice(19, 23), slice(16, 20)), (slice(24, 36), slice(20, 32))):
        text[:, dst] = hexed[:, src]
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(text.tobytes())])


class KeyIndex:
    """Composite-key hashes -> payload columns, sorted for ``np.searchsorted``; the first key added wins.

    About 8 bytes a key plus the payload, so millions of task instances stay in tens of MB.
    """

    def __init__(self, **types: pa.DataType) -> None:
        self.types = types
        self._parts: list[tuple[np.ndarray, dict[str, pa.Array]]] = []
        self._keys: np.ndarray | None = None
        self._values: dict[str, pa.Array] = {}
        self.fed = False

    def add(self, keys: np.ndarray, **values: pa.Array) -> None:
        self.fed = True
        if len(keys):
            self._parts.append((keys, {n: values[n].cast(t) for n, t in self.types.items()}))
            self._keys = None

    def __len__(self) -> int:
        return len(self._sorted())

    def _sorted(self) -> np.ndarray:
        if self._keys is None:
            keys = np.concatenate([p[0] for p in self._parts]) if self._parts else np.zeros(0, np.uint64)
            self._keys, first = np.unique(keys, return_index=True)
            take = pa.array(first)
            self._values = {n: pa.concat_arrays([p[1][n] for p in self._parts]).take(take) if self._parts
                            else pa.array([], t) for n, t in self.types.items()}
            self._parts = [(self._keys, self._values)]
        return self._keys

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, Callable[[str], pa.Array]]:
        """(found per row, a getter for a payload column with NULL where not found)."""
        sorted_keys = self._sorted()
        pos = np.searchsorted(sorted_keys, keys)
        found = pos < len(sorted_keys)
        found[found] = sorted_keys[pos[found]] == keys[found]
        if not len(sorted_keys):
            return found, lambda name: pa.nulls(len(keys), self.types[name])
        take = pa.array(np.where(found, pos, 0), mask=~found)
        return found, lambda name: self._values[name].take(take)


# -- the context the rules see -------------------------------------------------------------------------

class MapContext:
    """What a rule may use beyond its own batch: versions, the quarantine, and cross-table lookups.

    ``runs``: source dag runs by (dag_id, execution_date) -> run_id and the source dag_run.id.
    ``task_instances``: source task instances by (dag_id, task_id, run_id, map_index) -> the
    Unix milliseconds of coalesce(queued_dttm, start_date), from which 3.0 derives their UUID.
    Both are filled only when a step on the path ``needs`` them.
    """

    def __init__(self, source_version: str, target_version: str, quarantine: Sink, *, now: dt.datetime,
                 needs: frozenset[str] = frozenset(), read_source: Callable[[str], Iterable[pa.RecordBatch]] | None = None):
        self.source_version, self.target_version = source_version, target_version
        self.quarantine, self.now, self.needs = quarantine, now, needs
        self._read_source = read_source
        self.runs = KeyIndex(run_id=pa.string(), id=pa.int64())
        self.task_instances = KeyIndex(millis=pa.int64())
        self._seen: dict[str, set] = {}
        self._source: pa.RecordBatch | None = None
        self._input: pa.RecordBatch | None = None  # the batch the running rule was given
        #: (table Airflow moves them to, rows) of the batch being mapped
        self.moved: list[tuple[str, pa.RecordBatch]] = []

    def target_at_least(self, version: str) -> bool:
        return catalog.version_key(self.target_version) >= catalog.version_key(version)

    def seen(self, name: str) -> set:
        """A named set that lives for the whole job (e.g. conn_ids already loaded)."""
        return self._seen.setdefault(name, set())

    # -- quarantine ----------------------------------------------------------------------------
    def reject(self, table: str, batch: pa.RecordBatch, bad, reason: str, moved_to: str | None = None,
               before_upgrade: bool = False) -> pa.RecordBatch:
        """Quarantine the rows where ``bad`` (NULL counts as false) and return the others.

        ``moved_to``: the table Airflow's own upgrade moves these rows to; the target gets them there too.
        A migration moves them as it meets them (the rows this step was given); the checks Airflow runs
        ``before_upgrade`` move them as the database held them before any migration (the source's rows)."""
        bad = pc.fill_null(pa.array(bad, pa.bool_()) if not isinstance(bad, pa.Array) else bad, False)
        if not pc.any(bad).as_py():
            return batch
        self.set_aside(table, batch, bad, reason)
        if moved_to is not None:
            self._move(moved_to, batch.filter(bad), self._source if before_upgrade else self._input)
        return batch.filter(pc.invert(bad))

    def _move(self, table: str, rows: pa.RecordBatch, origin: pa.RecordBatch) -> None:
        """``rows`` as they are in ``origin`` (a batch carrying the source row numbers, or the source itself)."""
        positions = rows.column(ROW).to_numpy(zero_copy_only=False)
        if ROW in origin.schema.names:
            entered = origin.column(ROW).to_numpy(zero_copy_only=False)
            where = np.empty(int(entered.max()) + 1, np.int64)
            where[entered] = np.arange(len(entered))
            positions, origin = where[positions], batches.drop(origin, [ROW])
        self.moved.append((table, origin.take(pa.array(positions))))

    def set_aside(self, table: str, batch: pa.RecordBatch, mask, reason: str) -> None:
        """Send the *source* rows behind ``batch[mask]`` to the quarantine (the rows may still be mapped)."""
        rows = batch.filter(pc.fill_null(pa.array(mask, pa.bool_()) if not isinstance(mask, pa.Array) else mask, False))
        if rows.num_rows and self._source is not None and ROW in rows.schema.names:
            rows = self._source.take(rows.column(ROW))
        elif ROW in rows.schema.names:
            rows = batches.drop(rows, [ROW])
        self.quarantine(table, rows, reason)

    # -- lookups ---------------------------------------------------------------------------------
    def observe(self, table: str, batch: pa.RecordBatch) -> None:
        """Index a source batch the path's steps will need to look into from other tables."""
        if table == "dag_run" and "runs" in self.needs and "execution_date" in batch.schema.names:
            ok = pc.and_(pc.and_(pc.is_valid(batch.column("dag_id")), pc.is_valid(batch.column("run_id"))),
                         pc.is_valid(batch.column("execution_date")))
            b = batch.filter(ok)
            self.runs.add(key_hash(b.column("dag_id"), b.column("execution_date")),
                          run_id=b.column("run_id").cast(pa.string()), id=b.column("id").cast(pa.int64()))
        elif table == "task_instance" and "task_instances" in self.needs:
            if "run_id" in batch.schema.names:
                run_id = batch.column("run_id")
            else:
                found, run_id = self.run_of(batch.column("dag_id"), batch.column("execution_date"))[:2]
                batch, run_id = batch.filter(pa.array(found)), run_id.filter(pa.array(found))
            map_index = column(batch, "map_index", pa.int32()).fill_null(-1)
            millis = epoch_millis(pc.coalesce(batch.column("queued_dttm"), batch.column("start_date")), self.now)
            self.task_instances.add(key_hash(batch.column("dag_id"), batch.column("task_id"), run_id, map_index),
                                    millis=pa.array(millis))

    def _ensure(self, table: str, index: KeyIndex) -> None:
        """A lookup before its table was fed: read the source's table now, or stop with one line."""
        if index.fed:
            return
        if self._read_source is None:
            raise EtlError(f"mapping Airflow {self.source_version} to {self.target_version} needs {table} rows "
                           f"before the tables that refer to them: feed {table} first")
        for batch in self._read_source(table):
            self.observe(table, batch)
        index.fed = True

    def run_of(self, dag_id: pa.Array, execution_date: pa.Array) -> tuple[np.ndarray, pa.Array, pa.Array]:
        """(found, run_id, source dag_run.id) of the dag run with this (dag_id, execution_date)."""
        self._ensure("dag_run", self.runs)
        found, get = self.runs.find(key_hash(dag_id, execution_date))
        return found, get("run_id"), get("id")

    def task_instance(self, dag_id: pa.Array, task_id: pa.Array, run_id: pa.Array,
                      map_index: pa.Array) -> tuple[np.ndarray, pa.Array]:
        """(found, coalesce(queued_dttm, start_date) in Unix ms) of each row's task instance."""
        self._ensure("task_instance", self.task_instances)
        found, get = self.task_instances.find(key_hash(dag_id, task_id, run_id, map_index))
        return found, get("millis")


# -- conforming to a catalog version ---------------------------------------------------------------------

_QUOTED = re.compile(r"^\(*'((?:[^']|'')*)'(?:::[\w ]+(?:\[\])?)?\)*$")
_BARE = re.compile(r"^\(*(-?\d+(?:\.\d+)?|true|false|null)\)*(?:::[\w ]+)?$", re.IGNORECASE)
_NOW = re.compile(r"^\(*(now\(\)|current_timestamp(\(\))?|clock_timestamp\(\)|localtimestamp)\)*(::[\w ]+)?$", re.IGNORECASE)


def default_value(col: dict, now: dt.datetime) -> pa.Scalar:
    """The value existing rows get when ``col`` is added: its server default, or NULL."""
    atype = catalog.arrow_type(col["type"])
    text = (col.get("default") or "").strip()
    if not text or col.get("autoincrement"):
        return pa.scalar(None, atype)
    if _NOW.match(text):
        return pa.scalar(now, pa.timestamp("us", tz="UTC")).cast(atype)
    m = _QUOTED.match(text) or _BARE.match(text)
    if not m:
        raise EtlError(f"column {col['name']}: server default {text!r} has no mapping rule; add one to the step")
    literal = m.group(1).replace("''", "'")
    if literal.lower() == "null":
        return pa.scalar(None, atype)
    if pa.types.is_boolean(atype):
        return pa.scalar(literal.lower() in ("true", "1", "t", "yes", "on"))
    return pa.scalar(literal).cast(atype)


def conform(batch: pa.RecordBatch, columns: list[dict], keep: Iterable[str], now: dt.datetime,
            where: str) -> tuple[pa.RecordBatch, list[str]]:
    """``batch`` with exactly ``columns`` (plus ``keep`` and the row number), and the dropped non-NULL columns."""
    names = set(batch.schema.names)
    arrays, fields = [], []
    for col in columns:
        atype = catalog.arrow_type(col["type"])
        if col["name"] in names:
            values = batch.column(col["name"])
            if values.type != atype:
                try:
                    values = values.cast(atype)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise EtlError(f"{where}.{col['name']}: cannot convert {values.type} to {atype}: "
                                   f"{str(exc).splitlines()[0]}") from None
        else:
            values = pa.repeat(default_value(col, now), batch.num_rows)
        arrays.append(values)
        fields.append(pa.field(col["name"], atype))
    wanted = {c["name"] for c in columns}
    extra = [n for n in batch.schema.names if n not in wanted and (n in keep or n == ROW)]
    for name in extra:
        arrays.append(batch.column(name))
        fields.append(batch.schema.field(name))
    dropped = [n for n in batch.schema.names if n not in wanted and n not in extra and batch.column(n).null_count < batch.num_rows]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields)), dropped


#: What Airflow's DagModel gives a DAG before its file is parsed. Only ``tables.DAG_COLUMNS`` of a dag row
#: travel (the DAG processor rebuilds the rest on its next parse), so the target's other required
#: columns get these, or the neutral value of their type.
DAG_STUB = {"max_active_tasks": 16, "max_active_runs": 16, "max_consecutive_failed_dag_runs": 0,
            "has_task_concurrency_limits": True, "bundle_name": "dags-folder", "partition_mapper_info": "[]"}
_NEUTRAL = {pa.bool_(): False, pa.string(): "", pa.int16(): 0, pa.int32(): 0, pa.int64(): 0, pa.float64(): 0.0}
#: Nullable in the schema, but read as text by Airflow 3's API server: a NULL one fails its whole DAG list.
_READ_AS_TEXT = ("fileloc",)


def complete_dag(batch: pa.RecordBatch, columns: list[dict], version_tables: Mapping[str, list]) -> dict[str, pa.RecordBatch]:
    """Fill the required dag columns the export does not carry; name the bundles they refer to (3.1+)."""
    for col in columns:
        atype = catalog.arrow_type(col["type"])
        if col["name"] not in _READ_AS_TEXT and (col["nullable"] or col.get("default") or col["name"] in tables.DAG_COLUMNS):
            continue
        value = DAG_STUB.get(col["name"], _NEUTRAL.get(atype))
        current = column(batch, col["name"], atype)
        if value is not None and current.null_count:
            batch = put(batch, col["name"], current.fill_null(pa.scalar(value, atype)))
    out = {}
    if "dag_bundle" in version_tables and "bundle_name" in batch.schema.names:
        names = pc.unique(batch.column("bundle_name").drop_null())
        out["dag_bundle"] = pa.RecordBatch.from_pydict({"name": names, ROW: pa.repeat(pa.scalar(-1, pa.int64()), len(names))})
    out["dag"] = batch
    return out


def catalog_columns(versions: Iterable[str]) -> dict[str, dict[str, list]]:
    return {v: {t: spec["columns"] for t, spec in catalog.load(v).tables.items()} for v in versions}


# -- the mapper --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Route:
    version: str
    step: chain_mod.Step | None


class Mapper:
    """Maps batches of one source version to a target version, table by table, in load order.

    ``map(table, batch)`` returns ``[(target table, batch), ...]``: usually one pair, none when
    every row was quarantined or the table does not exist in the target, two when a step splits
    a table (3.0: ``dataset`` gives ``asset`` and ``asset_active``). ``removed`` and ``dropped``
    say what did not reach the target, for the report.
    """

    def __init__(self, source_version: str, target_version: str, quarantine: Sink | None = None,
                 read_source: Callable[[str], Iterable[pa.RecordBatch]] | None = None, *, now: dt.datetime | None = None,
                 chain: chain_mod.Chain | None = None, columns: Columns | None = None, xcom_json: bool = False):
        self.source_version, self.target_version = source_version, target_version
        if columns is None:  # versions someone typed: checked before the chain's order says anything of them
            for v in (source_version, target_version):
                catalog.require(v)
        self.chain = chain or chain_mod.default()
        self.steps = self.chain.path(source_version, target_version)
        src, dst = catalog.schema_key(source_version), catalog.schema_key(target_version)
        if columns is None:
            columns = catalog_columns(v for v in catalog.versions() if src <= catalog.version_key(v) <= dst)
        # The walk is over snapshots: a patch release is served by the snapshot of its head.
        self.source_schema, self.target_schema = catalog.schema_version(source_version), catalog.schema_version(target_version)
        self.columns = columns
        by_version = {s.version: s for s in self.steps}
        self.route = [_Route(v, by_version.get(v)) for v in sorted(columns, key=catalog.version_key)
                      if src < catalog.version_key(v) <= dst]
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        needs = frozenset().union(*(s.needs for s in self.steps)) if self.steps else frozenset()
        self.ctx = MapContext(source_version, target_version, self.quarantine,
                              now=now or dt.datetime.now(dt.timezone.utc), needs=needs, read_source=read_source)
        self.removed: dict[str, set[str]] = {}
        self.dropped: dict[tuple[str, str], int] = {}
        self.readable = readable.Readable(target_version, xcom_json=xcom_json)

    def map(self, table: str, batch: pa.RecordBatch) -> list[tuple[str, pa.RecordBatch]]:
        batch = self.readable(table, batch)
        if not self.route and table != "dag":
            return [(table, batch)]
        self.ctx.observe(table, batch)
        self.ctx._source, self.ctx.moved = batch, []
        try:
            current = {table: batches.put(batch, ROW, pa.array(np.arange(batch.num_rows, dtype=np.int64)))}
            keep: dict[str, set[str]] = {}
            gone: list[tuple[str, pa.RecordBatch]] = []
            previous = self.source_schema
            for hop in self.route:
                current = dict(self._hop(hop, previous, current, keep, gone))
                previous = hop.version
            if "dag" in current and "dag" in self.columns[self.target_schema]:
                current = self._complete_dag(current)
            return [*((name, batches.drop(b, [ROW])) for name, b in [*current.items(), *gone] if b.num_rows),
                    *((name, b) for name, b in self.ctx.moved if b.num_rows)]
        finally:
            self.ctx._source = None

    def target_name(self, table: str) -> str:
        """The table a source table's rows arrive in (Airflow renamed some); a rule may also
        send rows to further tables."""
        for hop in self.route:
            if hop.step is not None:
                table = hop.step.renamed.get(table, table)
        return table

    def _hop(self, hop: _Route, previous: str, current: dict[str, pa.RecordBatch], keep: dict[str, set[str]],
             gone: list[tuple[str, pa.RecordBatch]]) -> Iterator[tuple[str, pa.RecordBatch]]:
        """One catalog version: the step's rule if it has one, then that version's columns.

        Tables the version no longer has leave the walk as they are, into ``gone``: the caller
        sees them (the pipeline counts them as not in the target) and ``dropped`` says why.
        """
        step = hop.step
        for name, batch in current.items():
            outputs = {name: batch}
            if step is not None:
                if name in step.dropped:
                    self._drop(name, batch.num_rows, f"not carried into Airflow {catalog.first_release(hop.version)} or later: {step.dropped[name]}")
                    gone.append((name, batch))
                    continue
                renames = {o: n for o, n in step.renamed_columns.get(name, {}).items() if o in batch.schema.names}
                if renames:
                    batch = batches.rename(batch, [renames.get(c, c) for c in batch.schema.names])
                fn = step.tables.get(name)
                self.ctx._input = batch
                result = fn(batch, self.ctx) if fn is not None else batch
                outputs = result if isinstance(result, dict) else {step.renamed.get(name, name): result}
                for out_name in outputs:
                    keep.setdefault(out_name, set()).update(step.keep.get(out_name, ()))
            for out_name, out in outputs.items():
                cols = self.columns[hop.version].get(out_name)
                if cols is None:
                    if out_name in self.columns.get(previous, {}):
                        self._drop(out_name, out.num_rows, f"Airflow {hop.version} has no {out_name} table")
                        gone.append((out_name, out))
                        continue
                    yield out_name, out  # not an Airflow table at all (_airflow_moved__*): as it is
                    continue
                out, gone = conform(out, cols, keep.get(out_name, ()), self.ctx.now, out_name)
                if gone:
                    self.removed.setdefault(out_name, set()).update(gone)
                yield out_name, out

    def _complete_dag(self, current: dict[str, pa.RecordBatch]) -> dict[str, pa.RecordBatch]:
        """dag rows carry only ``tables.DAG_COLUMNS``: fill the rest for the target, bundles first."""
        target = self.columns[self.target_schema]
        dag, _ = conform(current.pop("dag"), target["dag"], (), self.ctx.now, "dag")
        completed = complete_dag(dag, target["dag"], target)
        return {**{n: b for n, b in completed.items() if n not in current and n != "dag"}, **current, "dag": completed["dag"]}

    def _drop(self, table: str, rows: int, reason: str) -> None:
        self.dropped[(table, reason)] = self.dropped.get((table, reason), 0) + rows

    def summary(self) -> dict:
        """What did not reach the target as it was, for the job's report."""
        return {"removed_columns": {t: sorted(c) for t, c in sorted(self.removed.items())},
                "tables_not_carried": [{"table": t, "rows": n, "reason": r} for (t, r), n in sorted(self.dropped.items())],
                "rewritten": [{"column": c, "rows": n, "what": w} for (c, w), n in sorted(self.readable.counts.items())]}


# -- plan ---------------------------------------------------------------------------------------------------

def plan(source_version: str, target_version: str, chain: chain_mod.Chain | None = None,
         columns: Columns | None = None) -> dict:
    """The chain between two versions and, per table, each rule with the Airflow revisions it
    reproduces and each column change on the way (for the ``plan`` command, text and JSON)."""
    mapper = Mapper(source_version, target_version, Quarantine(), chain=chain, columns=columns)
    steps = []
    for s in mapper.steps:
        rules = s.rules()
        steps.append({"version": s.version, "down_version": s.down_version, "summary": s.doc,
                      "airflow_revisions": list(s.airflow_revisions),
                      "tables": {t: r["rule"] + (f" ({', '.join(r['airflow_revisions'])})" if r["airflow_revisions"] else "")
                                 for t, r in rules.items()},
                      "renames": dict(s.renamed)})
    return {"source_version": source_version, "target_version": target_version,
            "chain": [f"{s.down_version} -> {s.version}" for s in mapper.steps],
            "route": [h.version for h in mapper.route], "steps": steps,
            "column_changes": _column_changes(mapper)}


def _column_changes(mapper: Mapper) -> dict[str, dict]:
    """Per source table followed to its target name: columns added (with what existing rows get) and removed."""
    out: dict[str, dict] = {}
    source = mapper.columns.get(mapper.source_schema, {})
    for table in sorted(source):
        name, cols, added, removed = table, {c["name"]: c for c in source[table]}, {}, set()
        for hop in mapper.route:
            step = hop.step
            if step is not None:
                if name in step.dropped:
                    name = None
                    break
                for old, new in step.renamed_columns.get(name, {}).items():
                    if old in cols:
                        cols[new] = cols.pop(old)
                ruled = name in step.tables
                name = step.renamed.get(name, name)
            else:
                ruled = False
            now = mapper.columns[hop.version].get(name)
            if now is None:
                name = None
                break
            for c in now:
                if c["name"] not in cols:
                    value = "set by the rule" if ruled else _describe_default(c, mapper.ctx.now)
                    added[c["name"]] = f"{value} (Airflow {hop.version})"
            removed |= set(cols) - {c["name"] for c in now}
            cols = {c["name"]: c for c in now}
        if name is None:
            continue
        removed -= set(added)
        added = {k: v for k, v in added.items() if k in cols}
        if added or removed:
            out[table if name == table else f"{table} -> {name}"] = {"added": sorted(added), "removed": sorted(removed),
                                                                     "values": dict(sorted(added.items()))}
    return out


def _describe_default(col: dict, now: dt.datetime) -> str:
    if col.get("autoincrement"):
        return "assigned by the target"
    value = default_value(col, now).as_py()
    if value is not None:
        return f"default {value!r}"
    return "NULL" if col["nullable"] else "NOT NULL without a default: needs a rule"
