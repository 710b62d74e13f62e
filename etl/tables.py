"""Which tables carry history, in which order they load, and how filters reach them.

Airflow rebuilds a good part of its database from DAG files (serialized DAGs, code, import
errors, the dag table itself), so copying those would only fight the new scheduler. What
only the database knows is the history: runs, task instances, xcom, logs, jobs, and the
configuration people typed in (variables, pools, connections). That is what we move by
default; ``--tables`` can still ask for anything else.
"""
from __future__ import annotations

import fnmatch

#: History and configuration, in load order: a table comes after every table it refers to,
#: by foreign key or by a soft reference the loader remaps (task_instance.job_id -> job.id).
HISTORY = (
    "slot_pool",
    "variable",
    "connection",
    "dag",
    "log_template",  # old runs find their log files through the template they ran with
    "job",
    "trigger",
    "dataset",
    "asset",
    "asset_alias",
    "dataset_alias",
    "asset_active",
    "dag_run",
    "dag_run_note",
    "task_instance",
    "task_instance_note",
    "task_map",
    "task_instance_history",
    "task_reschedule",
    "task_fail",
    "xcom",
    "rendered_task_instance_fields",
    "sla_miss",
    "log",
    "dataset_event",
    "asset_event",
    "dagrun_dataset_event",
    "dagrun_asset_event",
    "dataset_alias_dataset",
    "dataset_alias_dataset_event",
    "asset_alias_asset",
    "asset_alias_asset_event",
)

#: Moved-aside rows Airflow's own upgrades left behind (``_airflow_moved__2_2__task_instance``...).
MOVED_PATTERN = "_airflow_moved__*"
#: Where Airflow 3's upgrade keeps the pickled xcom values it takes out of ``xcom`` (eed27faa34e3).
XCOM_ARCHIVE = "_xcom_archive"

#: Rebuilt by the scheduler or DAG processor, or sessions and users that belong to one deployment.
SKIPPED_REASONS = {
    "serialized_dag": "rebuilt from DAG files by the DAG processor",
    "dag_code": "rebuilt from DAG files",
    "dag_version": "rebuilt from DAG files (3.x)",
    "dag_pickle": "rebuilt from DAG files",
    "dag_tag": "rebuilt from DAG files",
    "dag_owner_attributes": "rebuilt from DAG files",
    "dag_schedule_dataset_reference": "rebuilt from DAG files",
    "task_outlet_dataset_reference": "rebuilt from DAG files",
    "dag_schedule_asset_reference": "rebuilt from DAG files",
    "task_outlet_asset_reference": "rebuilt from DAG files",
    "task_inlet_asset_reference": "rebuilt from DAG files",
    "dag_schedule_asset_alias_reference": "rebuilt from DAG files",
    "dag_schedule_dataset_alias_reference": "rebuilt from DAG files",
    "dag_schedule_asset_name_reference": "rebuilt from DAG files",
    "dag_schedule_asset_uri_reference": "rebuilt from DAG files",
    "dag_warning": "recomputed by the DAG processor",
    "import_error": "recomputed by the DAG processor",
    "parse_import_error": "recomputed by the DAG processor",
    "callback_request": "transient queue",
    "dataset_dag_run_queue": "transient queue",
    "asset_dag_run_queue": "transient queue",
    "session": "web sessions belong to one deployment",
    "alembic_version": "the target keeps its own",
    "kube_resource_version": "executor state of one deployment",
    "kube_worker_uuid": "executor state of one deployment",
}
SKIPPED_PATTERNS = ("ab_*", "known_event*", "chart", "users", "dag_bundle*", XCOM_ARCHIVE)

#: Of the dag table only ``is_paused`` is user intent; the rest comes back from DAG files. ``fileloc``
#: travels too: a DAG whose file is gone is never parsed again, and Airflow 3's API server fails
#: its whole DAG list on a NULL one, as 2.x, which retires DAGs by their file, never retires it.
DAG_COLUMNS = ("dag_id", "is_paused", "fileloc")

#: Configuration, not history: ``--since`` and ``--dag-id`` never thin these out.
CONFIG = ("slot_pool", "variable", "connection")

#: Tables whose own time column is the natural one for ``--since``; others follow their dag run.
OWN_DATE = {
    "log": "dttm",
    "job": "start_date",
    "trigger": "created_date",
    "dataset_event": "timestamp",
    "asset_event": "timestamp",
}


def is_default(name: str) -> bool:
    """Whether ``name`` is exported without being asked for by ``--tables``."""
    return name in HISTORY or fnmatch.fnmatch(name, MOVED_PATTERN)


def kept_aside(name: str) -> bool:
    """Tables Airflow's own upgrade keeps the rows it takes out of history in: a target gets them too."""
    return name == XCOM_ARCHIVE or fnmatch.fnmatch(name, MOVED_PATTERN)


def skip_reason(name: str) -> str:
    if name in SKIPPED_REASONS:
        return SKIPPED_REASONS[name]
    if any(fnmatch.fnmatch(name, p) for p in SKIPPED_PATTERNS):
        return "belongs to one deployment (users, roles, executor state)"
    return "not history"


def select(present: list[str], tables: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """The tables a job works on, in load order, from those present in the database."""
    from .errors import UsageError

    if tables:
        unknown = [t for t in tables if t not in present]
        if unknown:
            raise UsageError(f"no table {', '.join(unknown)} in the source (it has: {', '.join(sorted(present))})")
        chosen = set(tables)
    else:
        chosen = {t for t in present if is_default(t)}
    unknown = [t for t in exclude if t not in present and not _known(t)]
    if unknown:
        raise UsageError(f"--exclude-tables names {', '.join(unknown)}, which no Airflow release has")
    chosen -= set(exclude)
    return sorted(chosen, key=load_rank)


def _known(name: str) -> bool:
    """A table some Airflow release has: excluding it is a no-op where this one does not."""
    from . import catalog

    return fnmatch.fnmatch(name, MOVED_PATTERN) or any(name in catalog.load(v).tables for v in catalog.versions())


def load_rank(name: str) -> tuple[int, str]:
    if name in HISTORY:
        return (HISTORY.index(name), name)
    return (len(HISTORY), name)
