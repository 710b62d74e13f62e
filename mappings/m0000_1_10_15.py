"""1.10.15: the base of the chain (Airflow head revision 03afc6b6f902); older databases are first
upgraded to 1.10.15 by Airflow itself."""
from __future__ import annotations

version = "1.10.15"
down_version = None
airflow_revisions = ("03afc6b6f902",)

TABLES: dict = {}
