"""Move an Airflow metadata database's history between deployments and Airflow versions.

Importing ``etl`` must stay cheap and must never import Airflow: the package runs
inside Airflow workers as well as from the command line.
"""
__version__ = "0.1.0"
