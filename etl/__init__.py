"""Move an Airflow metadata database's history between deployments and Airflow versions.

Importing ``etl`` must stay cheap and must never import Airflow: the package runs
inside Airflow workers (DAG files import it at parse time) as well as from the command
line. So the jobs of ``etl.commands`` (``etl.export(source, dest, ...)`` and the rest) are
looked up on first use; pyarrow and SQLAlchemy load only when a job is first touched.
"""
from __future__ import annotations

__version__ = "0.1.0"

_JOBS = ("export", "import_", "migrate", "diff", "inspect", "plan")
__all__ = ["__version__", *_JOBS]


def __getattr__(name: str):
    if name in _JOBS:
        from . import commands

        return getattr(commands, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_JOBS})
