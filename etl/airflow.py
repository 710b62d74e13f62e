"""Export and import DAGs: the engine run by Airflow itself, one mapped task per unit of work.

On Amazon MWAA the metadata database can be reached only from inside the environment, so
there the engine runs as DAGs: the export DAG in the old environment, the import DAG in the
new one, both on the environment's own database connection. Dynamic task mapping spreads the
units (``etl.units``) over the environment's workers, and Airflow's retries are safe because
every unit is idempotent. Only DAG files import this module; ``import etl`` never imports Airflow.

Needs Airflow 2.4 or later (``.expand``) and before 3.0: Airflow 3 workers have no database
connection, so a 3.x side runs the engine in its API server (``etl.plugin``).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json

import airflow

from .errors import EtlError


def _supported() -> None:
    major, minor = (int(p) for p in airflow.__version__.split(".")[:2])
    if (major, minor) < (2, 4):
        raise EtlError(f"etl.airflow needs Airflow 2.4 or later (dynamic task mapping); this is Airflow {airflow.__version__}. "
                       "Run airflow-metadata-etl export / migrate from a machine that reaches the metadata database")
    if major >= 3:
        raise EtlError(f"Airflow {airflow.__version__} workers cannot reach the metadata database: start the job through "
                       "the API server's /etl/jobs (etl.plugin), or run airflow-metadata-etl from a machine that reaches it")


def _dag_options(dag_id: str, options: dict) -> dict:
    """Run on demand, one run at a time; a unit that fails is retried, which every unit allows."""
    defaults = {"retries": 2, "retry_delay": dt.timedelta(seconds=30)}
    return {"dag_id": dag_id, "schedule": None, "start_date": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
            "catchup": False, "max_active_runs": 1, "tags": ["airflow-metadata-etl"], **options,
            "default_args": {**defaults, **options.get("default_args", {})}}


def _database_url() -> str:
    """The environment's own metadata database, however its configuration gives it (secrets backend too)."""
    from airflow import settings

    return settings.SQL_ALCHEMY_CONN


def _secret(ref: str | None) -> str | None:
    """A Fernet key named by ``variable:NAME`` or ``connection:CONN_ID`` (its password), read inside
    the task: never a template (rendered fields are stored) and never XCom."""
    if ref is None:
        return None
    kind, _, name = ref.partition(":")
    if kind == "variable":
        from airflow.models import Variable

        return Variable.get(name)
    from airflow.hooks.base import BaseHook

    return BaseHook.get_connection(name).password


def _check_secret_ref(ref: str | None, what: str) -> None:
    if ref is not None and (ref.partition(":")[0] not in ("variable", "connection") or not ref.partition(":")[2]):
        raise EtlError(f"{what} must be named as 'variable:NAME' or 'connection:CONN_ID' (the value given is not "
                       "repeated: it may be a key)")


# -- pausing ------------------------------------------------------------------------------------

class Pausing:
    """Pauses every other DAG for a run and restores each one afterwards, on failure too.

    Which DAGs were paused is written to the staging location before any is paused, so that a
    run killed before its restore task leaves a record the next run restores from as well.
    """

    def __init__(self, dag_id: str, endpoint: str | None):
        self.dag_id, self.endpoint = dag_id, endpoint

    def _record(self, location: str):
        from .staging import Store

        return Store(location, self.endpoint), f"_state/paused-by-{self.dag_id}.json"

    def paused(self, location: str) -> list[str]:
        store, rel = self._record(location)
        return json.loads(store.read(rel)) if store.exists(rel) else []

    def pause(self, location: str) -> list[str]:
        from airflow.models import DagModel
        from airflow.utils.session import create_session

        store, rel = self._record(location)
        with create_session() as session:
            ids = [d for (d,) in session.query(DagModel.dag_id).filter(DagModel.dag_id != self.dag_id,
                                                                       DagModel.is_paused.is_(False))]
            ids = sorted(set(ids) | set(self.paused(location)))
            store.write(rel, json.dumps(ids).encode())
            session.query(DagModel).filter(DagModel.dag_id.in_(ids)).update({DagModel.is_paused: True},
                                                                            synchronize_session=False)
        return ids

    def restore(self, location: str, context) -> None:
        """Unpause what was paused, then fail the run if anything in it failed: being the last task,
        this one would otherwise give the run its state alone."""
        from airflow.exceptions import AirflowException
        from airflow.models import DagModel
        from airflow.utils.session import create_session

        store, rel = self._record(location)
        ids = self.paused(location)
        with create_session() as session:
            session.query(DagModel).filter(DagModel.dag_id.in_(ids)).update({DagModel.is_paused: False},
                                                                            synchronize_session=False)
        store.write(rel, b"[]")
        ti, run = context["ti"], context["dag_run"]
        failed = sorted({t.task_id for t in run.get_task_instances() if t.state in ("failed", "upstream_failed")
                         and t.task_id != ti.task_id})
        if failed:
            raise AirflowException(f"restored the paused state of {len(ids)} DAGs; "
                                   f"these tasks did not succeed: {', '.join(failed)}")

    def around(self, location: str, first, last) -> None:
        """The pause task before ``first``, the restore task after ``last`` (``all_done``)."""
        from airflow.decorators import task

        @task(task_id="pause_other_dags")
        def pause_other_dags(location):
            return self.pause(location)

        @task(trigger_rule="all_done", retries=0)
        def restore_paused_dags(location, **context):
            self.restore(location, context)

        pause_other_dags(location) >> first
        last >> restore_paused_dags(location)


# -- the DAGs -----------------------------------------------------------------------------------

def export_dag(dag_id: str, dest: str, *, tables: tuple | None = None, exclude_tables: tuple = (),
               since: str | None = None, dag_ids=None, chunk_rows: int = 50_000, unit_rows: int | None = None,
               s3_endpoint_url: str | None = None, pause_other_dags: bool = False, **dag_options):
    """A DAG that exports this environment's metadata database to ``dest`` (``s3://bucket/prefix``).

    ``dest`` may be a template (``{{ var.value.NAME }}``). Tasks: plan the key ranges, one mapped
    task per range writing its chunks, then the manifest. ``pause_other_dags`` pauses every other
    DAG for the run and restores each one afterwards, on failure too; the export carries the
    paused states as they were before.
    """
    _supported()
    from airflow.decorators import task
    from airflow.models.dag import DAG

    from . import units

    job_args = {"tables": tables, "exclude_tables": tuple(exclude_tables), "since": since,
                "dag_ids": tuple(dag_ids or ()), "chunk_rows": chunk_rows, "unit_rows": unit_rows or units.UNIT_ROWS,
                "s3_endpoint_url": s3_endpoint_url}

    def job(dest):
        return units.ExportJob(_database_url(), dest, **job_args)

    pausing = Pausing(dag_id, s3_endpoint_url) if pause_other_dags else None

    with DAG(**_dag_options(dag_id, dag_options)) as dag:
        @task
        def plan(dest):
            with contextlib.closing(job(dest)) as exporter:
                return exporter.plan()

        @task
        def export_unit(unit, dest):
            with contextlib.closing(job(dest)) as exporter:
                return exporter.run(unit, pausing.paused(dest) if pausing else None)

        @task
        def write_manifest(dest, planned):
            with contextlib.closing(job(dest)) as exporter:
                return exporter.finish(planned).to_dict()

        planned = plan(dest)
        manifest = write_manifest(dest, planned)
        export_unit.partial(dest=dest).expand(unit=planned) >> manifest
        if pausing:
            pausing.around(dest, planned, manifest)
    return dag


def import_dag(dag_id: str, source: str, *, tables: tuple | None = None, exclude_tables: tuple = (),
               unit_chunks: int | None = None, on_conflict: str = "skip", source_fernet_key: str | None = None,
               target_fernet_key: str | None = None, s3_endpoint_url: str | None = None,
               pause_other_dags: bool = False, **dag_options):
    """A DAG that loads an export from ``source`` into this environment's metadata database.

    Tasks: verify the export and plan; one mapped task per run of chunks, step by step so that a
    table loads only after every table it refers to; then sequence repair and the diff, which
    fails the task unless the target holds everything the export does. Fernet keys are given as
    ``variable:NAME`` or ``connection:CONN_ID``; with a source key and no target key, values are
    re-encrypted with this environment's own key.
    """
    _supported()
    _check_secret_ref(source_fernet_key, "source_fernet_key")
    _check_secret_ref(target_fernet_key, "target_fernet_key")
    from airflow.decorators import task
    from airflow.models.dag import DAG

    from . import units

    def job(source):
        source_key = _secret(source_fernet_key)
        target_key = _secret(target_fernet_key)
        if source_key and not target_key:
            from airflow.configuration import conf

            target_key = conf.get("core", "fernet_key")
        return units.ImportJob(source, _database_url(), tables=tables, exclude_tables=tuple(exclude_tables),
                               unit_chunks=unit_chunks or units.UNIT_CHUNKS, on_conflict=on_conflict,
                               source_fernet_key=source_key, target_fernet_key=target_key,
                               s3_endpoint_url=s3_endpoint_url)

    with DAG(**_dag_options(dag_id, dag_options)) as dag:
        @task
        def verify_and_plan(source):
            return job(source).plan()

        def units_of_step(steps, step):
            return steps[step]

        def load_unit(unit, source):
            return job(source).run(unit)

        @task(trigger_rule="none_failed")
        def repair_sequences_and_diff(source):
            from airflow.exceptions import AirflowException

            report = job(source).finish()
            if not report.info["in_sync"]:
                pending = {t: c for t, c in report.to_dict()["tables"].items() if c.get("insert") or c.get("update")}
                raise AirflowException(f"the target does not hold everything the export does: {pending}")
            return report.to_dict()

        planned = verify_and_plan(source)
        previous = planned
        for i in range(len(units.LOAD_STEPS)):
            # Airflow maps only over a task's whole return value: one small task hands each step its units.
            step_units = task(units_of_step, task_id=f"units_of_step_{i}")(planned, i)
            load = task(load_unit, task_id=f"load_step_{i}", trigger_rule="none_failed")
            step = load.partial(source=source).expand(unit=step_units)
            previous >> step
            previous = step
        last = repair_sequences_and_diff(source)
        previous >> last
        if pause_other_dags:
            Pausing(dag_id, s3_endpoint_url).around(source, planned, last)
    return dag
