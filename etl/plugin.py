"""The engine inside Airflow 3's API server, the one component there that holds the metadata database.

Airflow 3's workers, DAG processor and triggerer have no database session, and on Amazon MWAA
(Astronomer, Cloud Composer 3 alike) nobody else reaches the database. So an Airflow 3
environment imports, exports and diffs through this plugin: a FastAPI app that the API server
mounts at ``/etl``, found through the package's ``airflow.plugins`` entry point (installing the
package from requirements.txt is enough, no plugins.zip). A job runs the engine in that process,
on the process's own database URL, in a background thread.

The API server may run several worker processes (and MWAA several containers), so a job's
status lives in the metadata database (``_etl_job``), renewed while its thread runs: any worker
answers for it, one job runs at a time, and a job whose process died shows as ``interrupted``
and is resumed by starting it again (the ledger makes that safe).

Every route requires a user whom Airflow's own auth manager lets change the configuration, the
variables and the connections (on the simple auth manager: Op or Admin). Fernet keys are named
(``variable:NAME``, ``connection:CONN_ID``), never sent; the target's is the environment's own.
"""
import datetime as dt
import json
import logging
import threading
import uuid
from typing import Literal, Optional

import airflow
from airflow.plugins_manager import AirflowPlugin

#: A running job's row is renewed this often; one not renewed for RENEW_SECONDS * 3 died with its process.
RENEW_SECONDS = 5.0
#: Why a job is ``interrupted`` (not ``failed``, which is the engine's own verdict): starting it again resumes it.
INTERRUPTED = "the API server process running this job stopped; start the job again to resume it"


def _jobs_table(meta):
    import sqlalchemy as sa

    return sa.Table("_etl_job", meta, sa.Column("id", sa.String(32), primary_key=True),
                    sa.Column("job", sa.String(16), nullable=False), sa.Column("dest", sa.Text, nullable=False),
                    sa.Column("state", sa.String(16), nullable=False), sa.Column("started", sa.DateTime(timezone=True)),
                    sa.Column("renewed", sa.DateTime(timezone=True)), sa.Column("progress", sa.Text),
                    sa.Column("report", sa.Text), sa.Column("error", sa.Text))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class _Progress(logging.Handler):
    """The engine's progress lines (``etl.progress``), the latest per table, for a job's status."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.tables = {}

    def emit(self, record: logging.LogRecord) -> None:
        table, _, line = record.getMessage().partition(": ")
        self.tables[table] = line


class Jobs:
    """Jobs in the API server's own database; one runs at a time, in a thread of the process that started it."""

    def __init__(self, url: str):
        import sqlalchemy as sa

        from . import urls

        self.url, self.engine = url, urls.open_engine(url)
        self.table = _jobs_table(sa.MetaData())
        self.table.create(self.engine, checkfirst=True)
        self._starting = threading.Lock()

    def get(self, job_id: str) -> Optional[dict]:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.table).where(self.table.c.id == job_id)).mappings().first()
        return None if row is None else self._view(dict(row))

    def all(self) -> list[dict]:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.table).order_by(self.table.c.started.desc())).mappings().all()
        return [self._view(dict(r)) for r in rows]

    def _view(self, row: dict) -> dict:
        if row["state"] == "running" and _aware(row["renewed"]) < _now() - dt.timedelta(seconds=3 * RENEW_SECONDS):
            row["state"], row["error"] = "interrupted", INTERRUPTED
        for name in ("progress", "report"):
            row[name] = json.loads(row[name]) if row[name] else None
        return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}

    def start(self, request) -> Optional[dict]:
        """A new running job, or None while another one runs."""
        import sqlalchemy as sa

        with self._starting, self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":  # two workers starting at once: one waits for the other
                conn.execute(sa.text("LOCK TABLE _etl_job IN EXCLUSIVE MODE"))
            running = conn.execute(sa.select(self.table.c.id, self.table.c.renewed).where(self.table.c.state == "running")).all()
            if any(_aware(renewed) >= _now() - dt.timedelta(seconds=3 * RENEW_SECONDS) for _, renewed in running):
                return None
            for job_id, _ in running:  # died with their process
                conn.execute(self.table.update().where(self.table.c.id == job_id).values(
                    state="interrupted", error=INTERRUPTED))
            job_id = uuid.uuid4().hex
            conn.execute(self.table.insert().values(id=job_id, job=request.job, dest=request.dest, state="running",
                                                    started=_now(), renewed=_now()))
        threading.Thread(target=self._run, args=(job_id, request), name=f"etl-job-{job_id[:8]}", daemon=True).start()
        return self.get(job_id)

    def _run(self, job_id: str, request) -> None:
        from .errors import EtlError
        from .urls import first_line

        progress, logger = _Progress(), logging.getLogger("etl.progress")
        logger.addHandler(progress)
        logger.setLevel(logging.INFO)
        outcome: dict = {}
        worker = threading.Thread(target=lambda: outcome.update(_call(request, self.url)), daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(RENEW_SECONDS)
                self._update(job_id, renewed=_now(), progress=json.dumps(progress.tables))
        finally:
            logger.removeHandler(progress)
        exc = outcome.get("error")
        if exc is None:
            self._update(job_id, state="success", report=json.dumps(outcome["report"], default=str),
                         progress=json.dumps(progress.tables))
        else:
            line = str(exc) if isinstance(exc, EtlError) else f"{type(exc).__name__}: {first_line(exc)}"
            self._update(job_id, state="failed", error=line, progress=json.dumps(progress.tables))

    def _update(self, job_id: str, **values) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.table.update().where(self.table.c.id == job_id).values(**values))


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _call(request, url: str) -> dict:
    """The job itself; its report, or the error it ended with."""
    from . import commands
    from .airflow import _fernet_keys

    try:
        filters = {"tables": tuple(request.tables) if request.tables else None, "exclude_tables": tuple(request.exclude_tables)}
        if request.job == "export":
            report = commands.export(url, request.dest, chunk_rows=request.chunk_rows, progress=True,
                                     unpaused=tuple(request.unpaused), **filters)
        else:
            source_key, target_key = _fernet_keys(request.source_fernet_key, request.target_fernet_key)
            run = commands.import_ if request.job == "import" else commands.diff
            extra = {"force": True} if request.job == "import" else {}  # the environment's scheduler runs
            report = run(request.dest, url, on_conflict=request.on_conflict, source_fernet_key=source_key,
                         target_fernet_key=target_key, progress=True, xcom_json=request.xcom_json, **filters, **extra)
        return {"report": report.to_dict()}
    except BaseException as exc:  # noqa: BLE001 - the job's outcome, reported by its status
        return {"error": exc}


def _app():
    from fastapi import Depends, FastAPI, HTTPException
    from pydantic import BaseModel

    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.core_api.security import GetUserDep

    class JobRequest(BaseModel):
        """What to run. ``dest``: the export's s3://bucket/prefix (or a folder the API server sees)."""

        job: Literal["import", "export", "diff"]
        dest: str
        tables: Optional[list[str]] = None
        exclude_tables: list[str] = []
        on_conflict: Literal["skip", "update"] = "skip"
        chunk_rows: int = 50_000
        unpaused: list[str] = []  # export: DAGs paused for its sake, exported as their owners left them
        source_fernet_key: Optional[str] = None  # named, never the key itself: bodies and URLs get logged
        target_fernet_key: Optional[str] = None
        xcom_json: bool = False  # import, diff: xcom pickles of JSON data arrive as JSON (etl.readable)

    def admin(user: GetUserDep) -> None:
        manager = get_auth_manager()
        if not (manager.is_authorized_configuration(method="PUT", user=user)
                and manager.is_authorized_variable(method="PUT", user=user)
                and manager.is_authorized_connection(method="PUT", user=user)):
            raise HTTPException(403, "moving the metadata database needs a user who may change the configuration, "
                                     "the variables and the connections")

    app = FastAPI(title="airflow-metadata-etl", dependencies=[Depends(admin)])
    state = {}

    def jobs() -> Jobs:
        if "jobs" not in state:
            from .airflow import _database_url

            state["jobs"] = Jobs(_database_url())
        return state["jobs"]

    @app.post("/jobs", status_code=202)
    def start(request: JobRequest) -> dict:
        from .airflow import _check_secret_ref
        from .errors import EtlError

        try:  # here, not in the model: a validation error would echo the value, which may be a key
            for name in ("source_fernet_key", "target_fernet_key"):
                _check_secret_ref(getattr(request, name), name)
        except EtlError as exc:
            raise HTTPException(422, str(exc)) from None
        job = jobs().start(request)
        if job is None:
            raise HTTPException(409, "another airflow-metadata-etl job is running in this environment; wait for it")
        return job

    @app.get("/jobs")
    def listed() -> list[dict]:
        return jobs().all()

    @app.get("/jobs/{job_id}")
    def one(job_id: str) -> dict:
        job = jobs().get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    return app


class EtlPlugin(AirflowPlugin):
    """Loaded by every Airflow process that loads plugins; only Airflow 3's API server mounts the app."""

    name = "airflow_metadata_etl"
    fastapi_apps = ([{"app": _app(), "url_prefix": "/etl", "name": "airflow-metadata-etl"}]
                    if int(airflow.__version__.split(".")[0]) >= 3 else [])
