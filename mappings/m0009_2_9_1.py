"""2.9: DAGs get max_consecutive_failed_dag_runs; a fresh 2.9 schema requires it, the migration leaves NULL."""
from __future__ import annotations

import pyarrow as pa

from etl.chain import reproduces
from etl.transform import put

version = "2.9.1"
down_version = "2.8.0"
airflow_revisions = ("8e1c784a4fc7",)


@reproduces("8e1c784a4fc7")
def dag(batch, ctx):
    """max_consecutive_failed_dag_runs 0: the migration adds it NULL, and the ORM fills its default
    ([core] max_consecutive_failed_dag_runs_per_dag, 0) when Airflow saves the DAG."""
    return put(batch, "max_consecutive_failed_dag_runs", pa.repeat(pa.scalar(0, pa.int32()), batch.num_rows))


TABLES = {"dag": dag}
