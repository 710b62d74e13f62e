"""Runs the chain's steps over record batches and conforms the result to the target's columns.

Rows a step cannot map go to the quarantine with a reason; they are never dropped. Steps that
need another table (a task instance's run_id comes from its dag run) read it from the
``MapContext``, which the mapper fills from the source's own rows as they pass, in load order,
or reads from the source on first need.
"""
from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import catalog, chain
from .errors import EtlError

Quarantine = Callable[[str, pa.RecordBatch, str], None]


def key_hash(*columns: pa.Array) -> np.ndarray:
    """64-bit hashes of composite keys: a million task instances cost 8 MB, not hundreds of MB of tuples."""
    parts = [c.cast(pa.string()).fill_null("\x00null") if not pa.types.is_timestamp(c.type)
             else pc.cast(c, pa.int64()).cast(pa.string()).fill_null("\x00null") for c in columns]
    joined = pc.binary_join_element_wise(*parts, "\x1f")
    return np.array([int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little", signed=True)
                     for v in joined.to_pylist()], dtype=np.int64)


class MapContext:
    """Lookups across tables for the steps; each is built once from the source's rows."""

    def __init__(self, quarantine: Quarantine, read_source: Callable[[str], Iterator[pa.RecordBatch]] | None):
        self.quarantine = quarantine
        self._read_source = read_source
        self.runs: dict[tuple[str, int], tuple[str, int]] | None = None  # (dag_id, logical µs) -> (run_id, source id)
        self.task_instances: set[int] = set()
        self.ti_uuids: dict[int, str] = {}
        self.seen_ti = False

    def note_dag_runs(self, batch: pa.RecordBatch) -> None:
        if self.runs is None:
            self.runs = {}
        date = "execution_date" if "execution_date" in batch.schema.names else "logical_date"
        if date not in batch.schema.names or "run_id" not in batch.schema.names:
            return
        micros = pc.cast(batch.column(date), pa.int64()).to_pylist()
        for dag_id, when, run_id, rid in zip(batch.column("dag_id").to_pylist(), micros, batch.column("run_id").to_pylist(),
                                             batch.column("id").to_pylist()):
            self.runs[(dag_id, when)] = (run_id, rid)

    def dag_runs(self) -> dict:
        if self.runs is None:
            self.runs = {}
            if self._read_source:
                for batch in self._read_source("dag_run"):
                    self.note_dag_runs(batch)
        return self.runs

    def run_of(self, batch: pa.RecordBatch) -> tuple[list, list]:
        """(run_id, source dag_run id) per row, None where the row's dag run does not exist."""
        runs = self.dag_runs()
        micros = pc.cast(batch.column("execution_date"), pa.int64()).to_pylist()
        found = [runs.get(k) for k in zip(batch.column("dag_id").to_pylist(), micros)]
        return [f[0] if f else None for f in found], [f[1] if f else None for f in found]


def split(batch: pa.RecordBatch, ok: list[bool] | np.ndarray, ctx: MapContext, table: str, reason: str) -> pa.RecordBatch:
    """Keep the rows where ``ok``; the others go to the quarantine with ``reason``."""
    mask = pa.array(np.asarray(ok, dtype=bool))
    if not pc.all(mask).as_py():
        ctx.quarantine(table, batch.filter(pc.invert(mask)), reason)
        batch = batch.filter(mask)
    return batch


def put(batch: pa.RecordBatch, name: str, values: pa.Array) -> pa.RecordBatch:
    """Set or add a column."""
    if name in batch.schema.names:
        i = batch.schema.get_field_index(name)
        return batch.set_column(i, pa.field(name, values.type), values)
    return batch.append_column(pa.field(name, values.type), values)


def drop(batch: pa.RecordBatch, *names: str) -> pa.RecordBatch:
    keep = [n for n in batch.schema.names if n not in names]
    return batch.select(keep)


class Mapper:
    def __init__(self, source_version: str, target_version: str, quarantine: Quarantine,
                 read_source: Callable[[str], Iterator[pa.RecordBatch]] | None = None):
        self.source_version, self.target_version = source_version, target_version
        self.steps = chain.discover().path(source_version, target_version)
        self.target = catalog.load(target_version)
        self.ctx = MapContext(quarantine, read_source)
        self.removed: dict[str, set[str]] = {}

    def target_name(self, table: str) -> str:
        for step in self.steps:
            table = step.renames.get(table, table)
        return table

    def map(self, table: str, batch: pa.RecordBatch) -> list[tuple[str, pa.RecordBatch]]:
        if table == "dag_run":
            self.ctx.note_dag_runs(batch)
        name = table
        for step in self.steps:
            name = step.renames.get(name, name)
            fn = step.tables.get(name)
            if fn is not None:
                batch = fn(batch, self.ctx)
                if batch.num_rows == 0:
                    return []
        if name not in self.target.tables:
            return [(name, batch)]  # reported by the pipeline as not in the target version
        return [(name, self.conform(name, batch))]

    def conform(self, table: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The target version's columns: new ones get the target's default, gone ones are reported."""
        gone = set(batch.schema.names) - {c["name"] for c in self.target.columns(table)}
        if gone:
            self.removed.setdefault(table, set()).update(gone)
        arrays, fields = [], []
        for col in self.target.columns(table):
            atype = catalog.arrow_type(col["type"])
            if col["name"] in batch.schema.names:
                values = batch.column(col["name"])
                if values.type != atype:
                    values = _cast(values, atype, table, col["name"])
            else:
                if col.get("autoincrement") and col["name"] == "id":
                    continue
                values = pa.array([default_value(col)] * batch.num_rows, atype)
            arrays.append(values)
            fields.append(pa.field(col["name"], atype))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _cast(values: pa.Array, atype: pa.DataType, table: str, column: str) -> pa.Array:
    try:
        if pa.types.is_string(atype) and pa.types.is_binary(values.type):
            return pc.cast(values, pa.string())
        return values.cast(atype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise EtlError(f"{table}.{column}: cannot convert {values.type} to {atype}: {str(exc).splitlines()[0]}") from None


_LITERAL = re.compile(r"^\(?'?(.*?)'?\)?(::[\w ]+)?$")


def default_value(col: dict):
    """The value a new column takes for existing rows, from its server default, as Alembic's add_column gives it."""
    text = col.get("default")
    atype = catalog.arrow_type(col["type"])
    if text is None:
        if col["nullable"]:
            return None
        # NOT NULL with no server default: Airflow's migration fills these; the neutral value of the type.
        if pa.types.is_boolean(atype):
            return False
        if pa.types.is_integer(atype) or pa.types.is_floating(atype):
            return 0
        return "" if pa.types.is_string(atype) else None
    lit = _LITERAL.match(text.strip()).group(1)
    if pa.types.is_boolean(atype):
        return lit.lower() in ("true", "1")
    if pa.types.is_integer(atype):
        return int(lit)
    if pa.types.is_floating(atype):
        return float(lit)
    if pa.types.is_timestamp(atype):
        return None
    return lit


def plan(source_version: str, target_version: str) -> dict:
    """The chain between two versions and, per table, what each step does (for ``plan``)."""
    steps = chain.discover().path(source_version, target_version)
    out = {"source_version": source_version, "target_version": target_version,
           "chain": [f"{s.down_version} -> {s.version}" for s in steps], "steps": []}
    for s in steps:
        out["steps"].append({"version": s.version, "summary": s.doc, "airflow_revisions": list(s.revisions),
                             "tables": {t: (fn.__doc__ or "").strip().splitlines()[0] for t, fn in s.tables.items()},
                             "renames": s.renames})
    src, dst = catalog.load(source_version), catalog.load(target_version)
    changes = {}
    for table in sorted(set(src.tables) & set(dst.tables)):
        a = {c["name"] for c in src.columns(table)}
        b = {c["name"] for c in dst.columns(table)}
        if a != b:
            changes[table] = {"added": sorted(b - a), "removed": sorted(a - b)}
    out["column_changes"] = changes
    return out
