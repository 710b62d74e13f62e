"""Load an export into this environment's metadata database: copy into the NEW environment's dags folder.

Set the Airflow Variable ``airflow_history_dest`` to the export's location (the export DAG's
destination) and ``airflow_history_source_fernet_secret`` to the old environment's Fernet key, so
that variables and connections are re-encrypted with this environment's key, then trigger the
DAG. Its last task fails unless the diff finds everything the export holds in this database.
"""
from etl.airflow import import_dag

dag = import_dag(
    "airflow_history_import",
    source="{{ var.value.airflow_history_dest }}",
    source_fernet_key="variable:airflow_history_source_fernet_secret",
    pause_other_dags=True,  # no scheduler runs racing the loaded history; paused states are restored afterwards
)
