"""2.2: task instances and reschedules are keyed to their dag run by run_id instead of execution_date.

Before migrating, Airflow's ``check_run_id_null`` and ``check_bad_references`` (airflow/utils/db.py)
move dag runs missing a key column, and task rows without their dag run or task instance, to
``_airflow_moved__2_2__...`` tables; those rows go to the quarantine here.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from etl.chain import reproduces
from etl.transform import put

version = "2.2.2"
down_version = "2.0.2"
airflow_revisions = ("7b2661a43ba3", "30867afad44a")
NEEDS = ("runs", "task_instances")
RENAMED_COLUMNS = {"dag": {"concurrency": "max_active_tasks"}}  # 30867afad44a

_MOVED_TO = "_airflow_moved__2_2__dangling__{}"
_MOVED = f"Airflow 2.2 moves it to {_MOVED_TO} (check_bad_references, 7b2661a43ba3)"
#: A reschedule's foreign key to its task instance cascades: Airflow keeps no copy of it (seen in the oracle test).
_CASCADED = ("Airflow 2.2 moves its task instance to _airflow_moved__2_2__dangling__task_instance and the foreign key's "
             "ON DELETE CASCADE deletes this row, keeping no copy (check_bad_references, 7b2661a43ba3)")


@reproduces("7b2661a43ba3")
def dag_run(batch, ctx):
    """Runs with a NULL dag_id, run_id or execution_date are quarantined (check_run_id_null)."""
    bad = pc.or_(pc.or_(pc.is_null(batch.column("dag_id")), pc.is_null(batch.column("run_id"))),
                 pc.is_null(batch.column("execution_date")))
    return ctx.reject("dag_run", batch, bad, "NULL dag_id, run_id or execution_date: Airflow 2.2 moves it to "
                                             "_airflow_moved__2_2__dangling__dag_run (check_run_id_null, 7b2661a43ba3)",
                      moved_to="_airflow_moved__2_2__dangling__dag_run", before_upgrade=True)


def _with_run_id(table: str, batch, ctx, moved: str, moved_to: str | None):
    found, run_id, _ = ctx.run_of(batch.column("dag_id"), batch.column("execution_date"))
    batch = put(batch, "run_id", run_id)
    return ctx.reject(table, batch, ~found, "no dag_run with this dag_id and execution_date: " + moved, moved_to=moved_to,
                      before_upgrade=True)


@reproduces("7b2661a43ba3")
def task_instance(batch, ctx):
    """run_id from the dag run with the same (dag_id, execution_date); rows without one are quarantined."""
    return _with_run_id("task_instance", batch, ctx, _MOVED.format("task_instance"), _MOVED_TO.format("task_instance"))


@reproduces("7b2661a43ba3")
def task_reschedule(batch, ctx):
    """run_id from the dag run; rows without their dag run or task instance are quarantined (Airflow deletes
    the first kind through the foreign key when it moves their task instance away)."""
    batch = _with_run_id("task_reschedule", batch, ctx, _CASCADED, None)
    found, _ = ctx.task_instance(batch.column("dag_id"), batch.column("task_id"), batch.column("run_id"),
                                 pa.repeat(pa.scalar(-1, pa.int32()), batch.num_rows))
    return ctx.reject("task_reschedule", batch, np.logical_not(found),
                      "no task_instance for this row: " + _MOVED.format("task_reschedule"),
                      moved_to=_MOVED_TO.format("task_reschedule"), before_upgrade=True)


TABLES = {"dag_run": dag_run, "task_instance": task_instance, "task_reschedule": task_reschedule}
