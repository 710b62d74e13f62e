"""3.2: columns the ORM always required become NOT NULL; existing NULLs get the migration's values."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from etl.chain import reproduces
from etl.transform import put

version = "3.2.2"
down_version = "3.1.7"
airflow_revisions = ("888b59e02a5b", "edc4f85a4619", "e79fc784f145")


def _fill(batch, **values):
    for name, value in values.items():
        if name in batch.schema.names:
            batch = put(batch, name, pc.fill_null(batch.column(name), pa.scalar(value, batch.schema.field(name).type)))
    return batch


@reproduces("888b59e02a5b")
def variable(batch, ctx):
    """val NULL becomes '', is_encrypted NULL false, key NULL '__airflow_var_fix_888b59e02a5b_' || id (the source id)."""
    fix = pc.binary_join_element_wise("__airflow_var_fix_888b59e02a5b_", pc.cast(batch.column("id"), pa.string()), "")
    batch = put(batch, "key", pc.coalesce(batch.column("key"), fix))
    return _fill(batch, val="", is_encrypted=False)


@reproduces("888b59e02a5b")
def connection(batch, ctx):
    """is_encrypted and is_extra_encrypted NULL become false."""
    return _fill(batch, is_encrypted=False, is_extra_encrypted=False)


@reproduces("888b59e02a5b")
def slot_pool(batch, ctx):
    """slots NULL becomes 0."""
    return _fill(batch, slots=0)


@reproduces("888b59e02a5b")
def task_instance(batch, ctx):
    """try_number NULL becomes 0, max_tries NULL -1."""
    return _fill(batch, try_number=0, max_tries=-1)


@reproduces("888b59e02a5b", "edc4f85a4619", "e79fc784f145")
def dag(batch, ctx):
    """is_paused and is_stale NULL become false, timetable_type ''."""
    return _fill(put(batch, "timetable_type", pa.repeat(pa.scalar(""), batch.num_rows)), is_paused=False, is_stale=False)


@reproduces("edc4f85a4619")
def log(batch, ctx):
    """event NULL becomes ''."""
    return _fill(batch, event="")


TABLES = {"variable": variable, "connection": connection, "slot_pool": slot_pool, "task_instance": task_instance,
          "dag": dag, "log": log}
