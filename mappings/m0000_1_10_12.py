"""1.10.12: the base of the chain (MWAA's first release, alembic head da3f683c3a5a); older databases are
first upgraded to 1.10.12 by Airflow itself."""
from __future__ import annotations

version = "1.10.12"
down_version = None
airflow_revisions = ("da3f683c3a5a",)

TABLES: dict = {}
