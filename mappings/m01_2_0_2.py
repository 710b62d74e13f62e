"""2.0: dag runs get a run_type; task instances' pool_slots become NOT NULL; xcom loses its id."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from etl.transform import drop, put, split

version = "2.0.2"
down_version = "1.10.15"
airflow_revisions = ("3c20cacc0044", "8646922c8a04", "bbf4a7ad0465", "8d48763f6d53")


def dag_run(batch, ctx):
    """run_type from the run_id prefix, matched with SQL LIKE as Airflow did ('_' is a wildcard), else manual."""
    if "run_type" in batch.schema.names:
        return batch
    ids = batch.column("run_id")
    run_type = pa.nulls(batch.num_rows, pa.string())
    # Airflow's migration loops over DagRunType in this order; a later match overwrites an earlier one.
    for value in ("backfill", "scheduled", "manual", "dataset_triggered"):
        hit = pc.fill_null(pc.match_like(ids, f"{value}__%"), False)
        run_type = pc.if_else(hit, pa.scalar(value), run_type)
    return put(batch, "run_type", pc.fill_null(run_type, "manual"))


def task_instance(batch, ctx):
    """pool_slots NULL becomes 1."""
    if "pool_slots" not in batch.schema.names:
        return put(batch, "pool_slots", pa.array([1] * batch.num_rows, pa.int32()))
    return put(batch, "pool_slots", pc.fill_null(batch.column("pool_slots"), 1))


def xcom(batch, ctx):
    """The surrogate id goes; (dag_id, task_id, key, execution_date) is the key now."""
    return drop(batch, "id")


def connection(batch, ctx):
    """conn_id becomes unique: the first row of a duplicated conn_id stays, the others are quarantined."""
    seen: set = set()
    ok = []
    for cid in batch.column("conn_id").to_pylist():
        ok.append(cid not in seen)
        seen.add(cid)
    return split(batch, ok, ctx, "connection", "duplicate conn_id: Airflow 2 requires conn_id to be unique")


TABLES = {"dag_run": dag_run, "task_instance": task_instance, "xcom": xcom, "connection": connection}
