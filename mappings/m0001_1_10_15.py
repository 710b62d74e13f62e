"""1.10.13: the RBAC UI's ab_* tables come under alembic (92c57b58940d, created where FAB had not yet made
them) and ab_view_menu.name widens to 250 (03afc6b6f902). No history table changes, and ab_* tables are
not moved (the target keeps its own users and roles); 1.10.14 and 1.10.15 add no migration."""
from __future__ import annotations

version = "1.10.15"
down_version = "1.10.12"
airflow_revisions = ("92c57b58940d", "03afc6b6f902")

TABLES: dict = {}
