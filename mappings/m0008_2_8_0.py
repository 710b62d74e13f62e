"""2.8: dag runs count how often they were cleared; existing runs start at 0."""
from __future__ import annotations

import pyarrow as pa

from etl.chain import reproduces
from etl.transform import put

version = "2.8.0"
down_version = "2.7.3"
airflow_revisions = ("375a816bbbf4",)


@reproduces("375a816bbbf4")
def dag_run(batch, ctx):
    """clear_number 0 (the migration's server default, which a fresh 2.8 schema does not keep)."""
    return put(batch, "clear_number", pa.repeat(pa.scalar(0, pa.int32()), batch.num_rows))


TABLES = {"dag_run": dag_run}
