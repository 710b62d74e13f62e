"""Export and import DAGs: the engine run by Airflow itself, one mapped task per unit of work.

On Amazon MWAA the metadata database can be reached only from inside the environment, so
there the engine runs as DAGs: the export DAG in the old environment, the import DAG in the
new one, both on the environment's own database connection. Dynamic task mapping spreads the
units (``etl.units``) over the environment's workers, and Airflow's retries are safe because
every unit is idempotent. Only DAG files import this module; ``import etl`` never imports Airflow.

``export_dag`` and ``import_dag`` need Airflow 2.4 or later (``.expand``) and before 3.0.
Airflow 3 workers have no database connection, so there the engine runs in the API server
(``etl.plugin``), and ``api_export_dag`` and ``api_import_dag`` start and watch its jobs over
HTTP (``etl.airflow_api``).
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
        raise EtlError(f"Airflow {airflow.__version__} workers cannot reach the metadata database: use api_export_dag or "
                       "api_import_dag, which run the job in the API server (etl.plugin)")


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


def _fernet_keys(source_ref: str | None, target_ref: str | None) -> tuple[str | None, str | None]:
    """The named keys, read here; with a source key and no target key, values are re-encrypted with
    this environment's own."""
    source_key, target_key = _secret(source_ref), _secret(target_ref)
    if source_key and not target_key:
        from airflow.configuration import conf

        target_key = conf.get("core", "fernet_key")
    return source_key, target_key


def _check_secret_ref(ref: str | None, what: str) -> None:
    if ref is not None and (ref.partition(":")[0] not in ("variable", "connection") or not ref.partition(":")[2]):
        raise EtlError(f"{what} must be named as 'variable:NAME' or 'connection:CONN_ID' (the value given is not "
                       "repeated: it may be a key)")


# -- pausing ------------------------------------------------------------------------------------

class _Sessions:
    """The dag table through the environment's own database session: Airflow 2.x."""

    def unpaused(self) -> list[str]:
        from airflow.models import DagModel
        from airflow.utils.session import create_session

        with create_session() as session:
            return [d for (d,) in session.query(DagModel.dag_id).filter(DagModel.is_paused.is_(False))]

    def set_paused(self, ids, paused: bool) -> None:
        from airflow.models import DagModel
        from airflow.utils.session import create_session

        with create_session() as session:
            session.query(DagModel).filter(DagModel.dag_id.in_(list(ids))).update({DagModel.is_paused: paused},
                                                                                  synchronize_session=False)


class Pausing:
    """Pauses every other DAG for a run and restores each one afterwards, on failure too.

    Which DAGs were paused is written to the staging location before any is paused, so that a
    run killed before its restore task leaves a record the next run restores from as well.
    ``dags`` switches them: the database session on 2.x, the REST API (``etl.airflow_api``) on 3.x.
    """

    def __init__(self, dag_id: str, endpoint: str | None, dags):
        self.dag_id, self.endpoint, self.dags = dag_id, endpoint, dags

    def _record(self, location: str):
        from .staging import Store

        return Store(location, self.endpoint), f"_state/paused-by-{self.dag_id}.json"

    def paused(self, location: str) -> list[str]:
        store, rel = self._record(location)
        return json.loads(store.read(rel)) if store.exists(rel) else []

    def pause(self, location: str) -> list[str]:
        """Every other unpaused DAG, and any a killed run left paused; undone if pausing fails halfway."""
        store, rel = self._record(location)
        ids = sorted((set(self.dags.unpaused()) | set(self.paused(location))) - {self.dag_id})
        store.write(rel, json.dumps(ids).encode())
        try:
            self.dags.set_paused(ids, True)
        except BaseException:
            self.restore(location)
            raise
        return ids

    def restore(self, location: str) -> list[str]:
        store, rel = self._record(location)
        ids = self.paused(location)
        self.dags.set_paused(ids, False)
        store.write(rel, b"[]")
        return ids

    def around(self, location: str, first, last) -> None:
        """The pause task before ``first``, the restore task after ``last`` (``all_done``); the
        restore task fails the run if anything in it failed: being the last task, it would
        otherwise give the run its state alone."""
        from airflow.decorators import task
        from airflow.exceptions import AirflowException

        @task(task_id="pause_other_dags")
        def pause_other_dags(location):
            return self.pause(location)

        @task(trigger_rule="all_done", retries=0)
        def restore_paused_dags(location, **context):
            ids = self.restore(location)
            ti, run = context["ti"], context["dag_run"]
            failed = sorted({t.task_id for t in run.get_task_instances() if t.state in ("failed", "upstream_failed")
                             and t.task_id != ti.task_id})
            if failed:
                raise AirflowException(f"restored the paused state of {len(ids)} DAGs; "
                                       f"these tasks did not succeed: {', '.join(failed)}")

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

    pausing = Pausing(dag_id, s3_endpoint_url, _Sessions()) if pause_other_dags else None

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
               pause_other_dags: bool = False, xcom_json: bool = False, **dag_options):
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
        source_key, target_key = _fernet_keys(source_fernet_key, target_fernet_key)
        return units.ImportJob(source, _database_url(), tables=tables, exclude_tables=tuple(exclude_tables),
                               unit_chunks=unit_chunks or units.UNIT_CHUNKS, on_conflict=on_conflict,
                               source_fernet_key=source_key, target_fernet_key=target_key,
                               s3_endpoint_url=s3_endpoint_url, xcom_json=xcom_json)

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
            Pausing(dag_id, s3_endpoint_url, _Sessions()).around(source, planned, last)
    return dag


# -- the DAGs of Airflow 3, whose workers reach the API server only ---------------------------

def _supported_3() -> None:
    if int(airflow.__version__.split(".")[0]) < 3:
        raise EtlError(f"api_export_dag and api_import_dag drive the API server of Airflow 3; this is Airflow "
                       f"{airflow.__version__}, whose workers reach the database: use export_dag or import_dag")


def _api_job_dag(dag_id: str, location: str, jobs: list, api_connection: str, pause_other_dags: bool,
                 dag_options: dict):
    """``jobs``: (task_id, request) pairs, one task each, run in turn; ``request(location, unpaused)``
    is the plugin's job request. Pausing is a setup task and restoring its teardown: the restore
    runs however the jobs end, and the run's state is the jobs' own."""
    from airflow.sdk import DAG, chain, task
    try:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException
    except ImportError:  # before 3.1, which moved them to the SDK
        from airflow.exceptions import AirflowException, AirflowFailException

    from .airflow_api import ApiServer

    def job_task(task_id: str, request):
        @task(task_id=task_id)
        def run_job(location):
            api = ApiServer.from_connection(api_connection)
            unpaused = Pausing(dag_id, None, None).paused(location) if pause_other_dags else []
            job = api.wait(api.start_job(request(location, unpaused)))
            if job["state"] == "interrupted":  # a retry starts it again, which resumes it
                raise AirflowException(f"job {job['id']} was interrupted: {job['error']}")
            if job["state"] != "success":  # the engine's verdict on the input: a retry would only repeat it
                raise AirflowFailException(f"job {job['id']} failed: {job['error']}")
            report = job["report"]
            if report["job"] == "diff" and not report["in_sync"]:
                pending = {t: c for t, c in report["tables"].items() if c.get("insert") or c.get("update")}
                raise AirflowFailException(f"the target does not hold everything the export does: {pending}")
            return {k: report[k] for k in ("job", "seconds", "tables", "notes")}
        return run_job(location)

    @task(task_id="pause_other_dags")
    def pause(location):
        return Pausing(dag_id, None, ApiServer.from_connection(api_connection)).pause(location)

    @task(task_id="restore_paused_dags")
    def restore(location):
        return Pausing(dag_id, None, ApiServer.from_connection(api_connection)).restore(location)

    with DAG(**_dag_options(dag_id, dag_options)) as dag:
        steps = [job_task(task_id, request) for task_id, request in jobs]
        chain(*steps)
        if pause_other_dags:
            paused = pause(location)
            paused >> steps[0]
            steps[-1] >> restore(location).as_teardown(setups=paused)
    return dag


def api_export_dag(dag_id: str, dest: str, *, tables: tuple | None = None, exclude_tables: tuple = (),
                   chunk_rows: int = 50_000, api_connection: str = "airflow_api", pause_other_dags: bool = False,
                   **dag_options):
    """An Airflow 3 DAG that has the API server (``etl.plugin``) export this environment to ``dest``.

    ``api_connection``: an HTTP connection to the API server (``etl.airflow_api``).
    ``pause_other_dags`` as in ``export_dag``.
    """
    _supported_3()
    filters = {"tables": list(tables) if tables else None, "exclude_tables": list(exclude_tables)}

    def export(location, unpaused):
        return {"job": "export", "dest": location, "chunk_rows": chunk_rows, "unpaused": unpaused, **filters}
    return _api_job_dag(dag_id, dest, [("export_history", export)], api_connection, pause_other_dags, dag_options)


def api_import_dag(dag_id: str, source: str, *, tables: tuple | None = None, exclude_tables: tuple = (),
                   on_conflict: str = "skip", source_fernet_key: str | None = None, target_fernet_key: str | None = None,
                   api_connection: str = "airflow_api", pause_other_dags: bool = False, xcom_json: bool = False,
                   **dag_options):
    """An Airflow 3 DAG that has the API server (``etl.plugin``) load the export at ``source``, then
    diff it, failing unless this environment holds everything the export does.

    Fernet keys are named as in ``import_dag``; they are read in the API server, never sent.
    ``api_connection``: an HTTP connection to the API server (``etl.airflow_api``).
    """
    _supported_3()
    _check_secret_ref(source_fernet_key, "source_fernet_key")
    _check_secret_ref(target_fernet_key, "target_fernet_key")
    common = {"tables": list(tables) if tables else None, "exclude_tables": list(exclude_tables),
              "on_conflict": on_conflict, "source_fernet_key": source_fernet_key, "target_fernet_key": target_fernet_key,
              "xcom_json": xcom_json}

    def job(name):
        return lambda location, unpaused: {"job": name, "dest": location, **common}
    return _api_job_dag(dag_id, source, [("import_history", job("import")), ("diff_history", job("diff"))],
                        api_connection, pause_other_dags, dag_options)
