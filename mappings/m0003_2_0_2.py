"""2.0.2: task instances' pool_slots becomes required (8646922c8a04)."""
from __future__ import annotations

import pyarrow.compute as pc

from etl.chain import reproduces
from etl.transform import put

version = "2.0.2"
down_version = "2.0.0"
airflow_revisions = ("8646922c8a04",)


@reproduces("8646922c8a04")
def task_instance(batch, ctx):
    """pool_slots NULL becomes 1."""
    return put(batch, "pool_slots", pc.fill_null(batch.column("pool_slots"), 1))


TABLES = {"task_instance": task_instance}
