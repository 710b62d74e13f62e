"""Export this environment's Airflow history to S3: copy into the OLD environment's dags folder.

Set the Airflow Variable ``airflow_history_dest`` to the destination (``s3://bucket/prefix``, a
prefix of its own per export) and trigger the DAG. The environment's execution role needs
s3:PutObject, s3:GetObject and s3:ListBucket there. See the README, "Running inside Airflow (MWAA)".
"""
from etl.airflow import export_dag

dag = export_dag(
    "airflow_history_export",
    dest="{{ var.value.airflow_history_dest }}",
    pause_other_dags=True,  # no new runs while the history is read; each DAG's paused state comes back afterwards
)
