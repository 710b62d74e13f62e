"""2.0: dag runs get a run_type, xcom keys become required, conn_id becomes unique.

The xcom ``id`` column itself goes with the schema (bbf4a7ad0465); the transform drops it.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from etl.chain import reproduces
from etl.transform import column, put, where

version = "2.0.0"
down_version = "1.10.15"
airflow_revisions = ("3c20cacc0044", "bbf4a7ad0465", "8f966b9c467a", "8d48763f6d53", "98271e7606e2")


@reproduces("3c20cacc0044")
def dag_run(batch, ctx):
    """run_type from run_id LIKE '<type>__%' for each DagRunType ('_' is a wildcard: 'backfill_2020...'
    is a backfill), everything else manual."""
    # The migration imports the running release's DagRunType: 2.4 added dataset_triggered.
    types = ("backfill", "scheduled", "manual") + (("dataset_triggered",) if ctx.target_at_least("2.4.0") else ())
    run_type = pa.nulls(batch.num_rows, pa.string())
    for value in types:  # Airflow's order; each UPDATE overwrites, so the last match wins
        run_type = where(pc.match_like(batch.column("run_id"), f"{value}__%"), value, run_type)
    return put(batch, "run_type", pc.fill_null(run_type, "manual"))


@reproduces("bbf4a7ad0465")
def xcom(batch, ctx):
    """(dag_id, task_id, key, execution_date) becomes the primary key in place of id: NULL keys are quarantined."""
    return ctx.reject("xcom", batch, pc.is_null(batch.column("key")),
                      "NULL key: Airflow 2.0 makes (dag_id, task_id, key, execution_date) the primary key (bbf4a7ad0465) "
                      "and stops on it")


@reproduces("8f966b9c467a", "8d48763f6d53")
def connection(batch, ctx):
    """imap_default's NULL conn_type becomes 'imap'; NULL conn_type or conn_id, and every repeat of a conn_id
    after its first (lowest id), are quarantined: Airflow refuses to upgrade until they are fixed."""
    conn_type = batch.column("conn_type")
    batch = put(batch, "conn_type", where(pc.and_(pc.equal(batch.column("conn_id"), "imap_default"),
                                                  pc.is_null(conn_type)), "imap", conn_type))
    batch = ctx.reject("connection", batch, pc.is_null(batch.column("conn_id")),
                       "NULL conn_id: Airflow 2.0 makes conn_id NOT NULL (8d48763f6d53) and stops on it")
    batch = ctx.reject("connection", batch, pc.is_null(batch.column("conn_type")),
                       "NULL conn_type: Airflow 2.0 refuses to upgrade (check_conn_type_null, 8f966b9c467a)")
    seen = ctx.seen("connection.conn_id")
    repeat = []
    for conn_id in batch.column("conn_id").to_pylist():
        repeat.append(conn_id in seen)
        seen.add(conn_id)
    return ctx.reject("connection", batch, repeat,
                      "conn_id repeats an earlier row's: Airflow 2.0 refuses to upgrade (check_conn_id_duplicates, "
                      "8d48763f6d53); the first row (lowest id) was kept")


@reproduces("98271e7606e2")
def dag(batch, ctx):
    """concurrency 16 (the migration's fallback for the deployment's setting) and has_task_concurrency_limits
    true, where concurrency is NULL."""
    unset = pc.is_null(column(batch, "concurrency", pa.int32()))
    batch = put(batch, "has_task_concurrency_limits",
                where(unset, True, column(batch, "has_task_concurrency_limits", pa.bool_())))
    return put(batch, "concurrency", pc.fill_null(column(batch, "concurrency", pa.int32()), 16))


TABLES = {"dag_run": dag_run, "xcom": xcom, "connection": connection, "dag": dag}
