"""2.3: dynamic task mapping (map_index -1) and xcom, rendered fields and task_fail keyed by run_id."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from etl.transform import drop, key_hash, put, split

version = "2.3.4"
down_version = "2.2.5"
airflow_revisions = ("e655c0453f75", "c306b5b5ae4a", "4eaab2fe6582", "48925b2719cb")


def _minus_one(batch):
    if "map_index" in batch.schema.names:
        return batch
    return put(batch, "map_index", pa.array([-1] * batch.num_rows, pa.int32()))


def task_instance(batch, ctx):
    """map_index -1; the task instance is remembered so its xcom and rendered fields can be checked."""
    batch = _minus_one(batch)
    ctx.task_instances.update(key_hash(*(batch.column(c) for c in ("dag_id", "task_id", "run_id", "map_index"))).tolist())
    ctx.seen_ti = True
    return batch


def task_reschedule(batch, ctx):
    """map_index -1."""
    return _minus_one(batch)


def _needs_task_instance(table: str):
    def step(batch, ctx):
        if "run_id" not in batch.schema.names:
            run_ids, run_pk = ctx.run_of(batch)
            batch = put(batch, "run_id", pa.array(run_ids, pa.string()))
            if table == "xcom":
                batch = put(batch, "dag_run_id", pa.array(run_pk, pa.int32()))
            batch = split(batch, [r is not None for r in run_ids], ctx, table, "no dag_run with this dag_id and execution_date")
        batch = _minus_one(batch)
        if ctx.seen_ti:
            keys = key_hash(*(batch.column(c) for c in ("dag_id", "task_id", "run_id", "map_index")))
            batch = split(batch, np.fromiter((k in ctx.task_instances for k in keys.tolist()), bool, len(keys)), ctx, table,
                          "no task instance for this row (Airflow moves it to _airflow_moved__2_3__dangling__)")
        return drop(batch, "execution_date") if table != "task_fail" else batch
    step.__doc__ = "run_id (and for xcom the dag run's id) from the dag run; rows whose task instance is missing are quarantined."
    return step


TABLES = {"task_instance": task_instance, "task_reschedule": task_reschedule, "xcom": _needs_task_instance("xcom"),
          "rendered_task_instance_fields": _needs_task_instance("rendered_task_instance_fields"),
          "task_fail": _needs_task_instance("task_fail")}
