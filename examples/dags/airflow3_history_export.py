"""Export this Airflow 3 environment's history to S3: copy into the OLD environment's dags folder.

The API server runs the export (the package's plugin); this DAG starts and watches it. Set the
Variable ``airflow_history_dest`` to the destination (``s3://bucket/prefix``, a prefix of its own
per export), create the HTTP connection ``airflow_api`` as for the import DAG, and trigger it.
See the README, "Running inside Airflow (MWAA)".
"""
from etl.airflow import api_export_dag

dag = api_export_dag(
    "airflow_history_export",
    dest="{{ var.value.airflow_history_dest }}",
    api_connection="airflow_api",
    pause_other_dags=True,  # no new runs while the history is read; each DAG's paused state comes back afterwards
)
