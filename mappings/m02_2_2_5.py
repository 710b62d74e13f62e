"""2.2: task instances and reschedules are keyed to their dag run by run_id instead of execution_date."""
from __future__ import annotations

import pyarrow as pa

from etl.transform import put, split

version = "2.2.5"
down_version = "2.0.2"
airflow_revisions = ("7b2661a43ba3",)


def _keyed_to_run(table: str):
    def step(batch, ctx):
        if "run_id" in batch.schema.names:
            return batch
        run_ids, _ = ctx.run_of(batch)
        batch = put(batch, "run_id", pa.array(run_ids, pa.string()))
        # Airflow moves these to _airflow_moved__2_2__dangling__<table>; we keep them in the quarantine.
        return split(batch, [r is not None for r in run_ids], ctx, table, "no dag_run with this dag_id and execution_date")
    step.__doc__ = "run_id from the dag run with the same (dag_id, execution_date); rows without one are quarantined."
    return step


TABLES = {"task_instance": _keyed_to_run("task_instance"), "task_reschedule": _keyed_to_run("task_reschedule")}
