"""Which rows a foreign key may point at in the target, so that a row that would break one is
quarantined before it is written.

Airflow's own upgrades move such rows aside (``_airflow_moved__*``); a source can hold them
(task instances without their dag run in a 2.x database without foreign keys, an export read
from a live database, a table left out of the import). Written, they would break the target: a
foreign key set aside for the load could not be restored, and with its checks in place the
chunk would fail.

Integer ids are checked by the id maps (``ledger.IdMaps``) as they are rewritten; this covers
every other foreign key of the target's schema (composite ones like task_instance -> dag_run,
UUID ones like 3.x task_reschedule -> task_instance). The keys a referenced table holds are
64-bit hashes in a sorted array (``transform.KeyIndex``): those its loader wrote in this run
(or would write, in a dry run), plus, when the table held rows before or is not loaded in this
run, those read from the target once its own load is over (load order puts it first).
"""
from __future__ import annotations

import dataclasses
import functools

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from .. import catalog
from ..transform import KeyIndex, key_hash


@dataclasses.dataclass(frozen=True)
class Check:
    columns: tuple[str, ...]
    table: str
    referred: tuple[str, ...]
    nullable: bool  # every column nullable: a dangling value becomes NULL instead of quarantining the row

    def reason(self) -> str:
        return (f"{', '.join(self.columns)} refers to a {self.table} row ({', '.join(self.referred)}) "
                "that the target does not have")


def checks(version: str, table: sa.Table) -> list[Check]:
    """The foreign keys of ``table`` in Airflow ``version``'s schema whose columns the table has."""
    schema = catalog.load(version)
    if table.name not in schema.tables:
        return []
    out = []
    for fk in schema.tables[table.name]["foreign_keys"]:
        cols = tuple(fk["columns"])
        if all(c in table.c for c in cols) and fk["referred_table"] != table.name:
            out.append(Check(cols, fk["referred_table"], tuple(fk["referred_columns"]),
                             all(table.c[c].nullable for c in cols)))
    return list(dict.fromkeys(out))  # a key declared twice is checked once


class References:
    """The target-side key sets behind the checks, shared by every loader of a run."""

    def __init__(self, engine: sa.Engine, version: str):
        self.engine = engine
        schema = catalog.load(version)
        #: referred table -> the column sets some foreign key points at
        self.referred: dict[str, set[tuple[str, ...]]] = {}
        for spec in schema.tables.values():
            for fk in spec["foreign_keys"]:
                self.referred.setdefault(fk["referred_table"], set()).add(tuple(fk["referred_columns"]))
        self._written: dict[tuple[str, tuple[str, ...]], KeyIndex] = {}
        self._fresh: set[str] = set()  # loaded in this run into an empty table: what was written is all there is
        self._sets: dict[tuple[str, tuple[str, ...]], KeyIndex] = {}

    def loading(self, table: str, empty: bool) -> None:
        """A loader for ``table`` starts; ``empty``: the table held no rows."""
        if empty:
            self._fresh.add(table)
        else:
            self._fresh.discard(table)

    def wrote(self, table: str, batch: pa.RecordBatch) -> None:
        """Rows of ``table`` that are now (or, in a dry run, would be) in the target."""
        for cols in self.referred.get(table, ()):
            if batch.num_rows and all(c in batch.schema.names for c in cols):
                keys = key_hash(*(batch.column(c) for c in cols))
                for index in {id(i): i for i in (self._written.setdefault((table, cols), KeyIndex()),
                                                 self._sets.get((table, cols))) if i is not None}.values():
                    index.add(keys)

    def missing(self, check: Check, batch: pa.RecordBatch) -> pa.Array:
        """True for each row whose (non-NULL) key ``check`` finds nowhere in the referred table."""
        keys = key_hash(*(batch.column(c) for c in check.columns))
        found, _ = self._set(check.table, check.referred).find(keys)
        valid = functools.reduce(pc.and_, [pc.is_valid(batch.column(c)) for c in check.columns])
        return pc.and_(valid, pa.array(~found))

    def _set(self, table: str, cols: tuple[str, ...]) -> KeyIndex:
        if table in self._fresh:
            return self._written.setdefault((table, cols), KeyIndex())
        if (table, cols) not in self._sets:
            index = KeyIndex()
            written = self._written.get((table, cols))
            if written is not None and len(written):
                index.add(written._sorted())
            self._read(table, cols, index)
            self._sets[(table, cols)] = index
        return self._sets[(table, cols)]

    def _read(self, table: str, cols: tuple[str, ...], index: KeyIndex) -> None:
        """The keys ``table`` holds in the target, typed as the loaders' batches type them: UUIDs as
        the text the server gives them (which ``Target.conform`` writes), the rest as they are."""
        if not sa.inspect(self.engine).has_table(table):
            return
        t = sa.Table(table, sa.MetaData(), autoload_with=self.engine)
        query = sa.select(*(sa.cast(t.c[c], sa.Text).label(c) if _uuid(t.c[c]) else t.c[c] for c in cols))
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(query)
            for part in result.partitions(100_000):
                index.add(key_hash(*(pa.array(list(v)) for v in zip(*part))))


def _uuid(col: sa.Column) -> bool:
    return col.type.__class__.__name__.upper() in ("UUID", "UUIDTYPE")
