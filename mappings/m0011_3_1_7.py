"""3.1: every DAG belongs to a bundle; existing DAGs go to 'dags-folder' (or 'example_dags')."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from etl.chain import reproduces
from etl.transform import ROW, column, put, where

version = "3.1.7"
down_version = "3.0.2"
airflow_revisions = ("7582ea3f3dd5",)


@reproduces("7582ea3f3dd5")
def dag(batch, ctx):
    """bundle_name 'example_dags' when fileloc LIKE '%/airflow/example_dags/%', else 'dags-folder'; dag_bundle rows
    'example_dags' and 'dags-folder', which the migration inserts whether or not a DAG names them, and any other
    bundle a DAG names."""
    examples = pc.match_like(column(batch, "fileloc", pa.string()), "%/airflow/example_dags/%")
    bundle = where(examples, "example_dags", pa.repeat(pa.scalar("dags-folder"), batch.num_rows))
    batch = put(batch, "bundle_name", pc.coalesce(column(batch, "bundle_name", pa.string()), bundle))
    names = pc.unique(pa.concat_arrays([pa.array(["example_dags", "dags-folder"]), batch.column("bundle_name")]))
    bundles = pa.RecordBatch.from_pydict({"name": names, ROW: pa.repeat(pa.scalar(-1, pa.int64()), len(names))})
    return {"dag_bundle": bundles, "dag": batch}


TABLES = {"dag": dag}
