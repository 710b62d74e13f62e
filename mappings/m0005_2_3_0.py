"""2.3: dynamic task mapping (map_index -1 everywhere) and xcom, rendered fields and task_fail keyed by run_id.

Before migrating, Airflow's ``check_bad_references`` moves xcom, rendered-field and task_fail rows
whose dag run or task instance is missing to ``_airflow_moved__2_3__dangling__<table>``; those rows
go to the quarantine here. (Airflow 2.3.x alone also moved *every* task_fail row sharing
(dag_id, task_id, execution_date) with another to ``_airflow_moved__2_3__duplicates__task_fail``;
2.4 dropped that check, and a streaming mapper cannot take back rows already loaded, so it is not
reproduced.)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from etl.chain import reproduces
from etl.transform import put

version = "2.3.0"
down_version = "2.2.2"
airflow_revisions = ("e655c0453f75", "c306b5b5ae4a", "4eaab2fe6582", "48925b2719cb")
NEEDS = ("runs", "task_instances")


def _minus_one(batch):
    return put(batch, "map_index", pa.repeat(pa.scalar(-1, pa.int32()), batch.num_rows))


@reproduces("e655c0453f75")
def task_instance(batch, ctx):
    """map_index -1."""
    return _minus_one(batch)


@reproduces("e655c0453f75")
def task_reschedule(batch, ctx):
    """map_index -1."""
    return _minus_one(batch)


def _keyed_to_run(table: str, batch, ctx):
    """run_id (for xcom also the source dag_run.id) by (dag_id, execution_date); quarantine what Airflow moves aside."""
    moved_to = f"_airflow_moved__2_3__dangling__{table}"
    moved = f"Airflow 2.3 moves it to {moved_to} (check_bad_references)"
    found, run_id, dag_run_id = ctx.run_of(batch.column("dag_id"), batch.column("execution_date"))
    batch = put(batch, "run_id", run_id)
    if table == "xcom":
        batch = put(batch, "dag_run_id", dag_run_id)
    batch = ctx.reject(table, batch, ~found, f"no dag_run with this dag_id and execution_date: {moved}",
                       moved_to=moved_to, before_upgrade=True)
    batch = _minus_one(batch)
    found, _ = ctx.task_instance(batch.column("dag_id"), batch.column("task_id"), batch.column("run_id"),
                                 batch.column("map_index"))
    return ctx.reject(table, batch, np.logical_not(found), f"no task_instance for this row: {moved}",
                      moved_to=moved_to, before_upgrade=True)


@reproduces("c306b5b5ae4a")
def xcom(batch, ctx):
    """Re-keyed to (dag_run_id, task_id, map_index -1, key): dag_run_id is the source dag run's id, which the
    loader turns into the target's; dag_id and run_id stay."""
    return _keyed_to_run("xcom", batch, ctx)


@reproduces("4eaab2fe6582")
def rendered_task_instance_fields(batch, ctx):
    """run_id from the dag run, map_index -1."""
    return _keyed_to_run("rendered_task_instance_fields", batch, ctx)


@reproduces("48925b2719cb")
def task_fail(batch, ctx):
    """run_id from the dag run, map_index -1."""
    return _keyed_to_run("task_fail", batch, ctx)


TABLES = {"task_instance": task_instance, "task_reschedule": task_reschedule, "xcom": xcom,
          "rendered_task_instance_fields": rendered_task_instance_fields, "task_fail": task_fail}
