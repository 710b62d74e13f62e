"""Load an export into this Airflow 3 environment: copy into the NEW environment's dags folder.

Airflow 3 workers have no database: the API server runs the import (the package's plugin,
installed with it from requirements.txt) and this DAG starts and watches it. Set the Variable
``airflow_history_dest`` to the export's location and ``airflow_history_source_fernet_secret``
to the old environment's Fernet key (read by the API server, never sent), and create the HTTP
connection ``airflow_api`` to the API server (host: its base URL; login and password of an Admin
user, or no login and a token as the password), then trigger the DAG. Its diff task fails unless
this database holds everything the export does. See the README, "Running inside Airflow (MWAA)".
"""
from etl.airflow import api_import_dag

dag = api_import_dag(
    "airflow_history_import",
    source="{{ var.value.airflow_history_dest }}",
    source_fernet_key="variable:airflow_history_source_fernet_secret",
    api_connection="airflow_api",
    pause_other_dags=True,  # no scheduler runs racing the loaded history; paused states are restored afterwards
)
