"""The export and import DAGs (etl.airflow), run by real Airflow 2.x with ``airflow dags test``.

Airflow 2.x pins SQLAlchemy 1.4 and ships psycopg2, so the package is installed next to
Airflow in a venv of its own (cached beside the release venvs, built under a lock like
``airflow_release.ensure_venv``); the DAGs then run exactly as on MWAA: on the environment's own
database connection, writing to S3 (moto's server over HTTP). The fast test checks the import
steps against every catalog version; the rest is slow.
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import airflow_release, catalog, tables, units, urls
from etl.load.base import SOFT_REFERENCES
from helpers import CONSTRAINTS, LiveWriter, cli, constrained_venv

#: Every 2.x release whose constraints are kept: the DAGs run in each, installed under them as MWAA does.
HOSTS = sorted((p.name.split("-")[1] for p in CONSTRAINTS if p.name.startswith("constraints-2.")), key=catalog.version_key)
VERSION = "2.11.0"  # MWAA's newest 2.x: the import is killed halfway here, and the fast tests take its schema
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "dags"


def test_load_steps_put_every_referenced_table_first():
    """A unit loads only after every table it refers to: checked on every release's schema."""
    for version in catalog.versions():
        schema = catalog.load(version)
        for name, spec in schema.tables.items():
            if not tables.is_default(name):
                continue
            if not name.startswith("_airflow_moved__"):
                assert any(name in step for step in units.LOAD_STEPS), f"{name} ({version}) is in no load step"
            refs = {f["referred_table"] for f in spec["foreign_keys"]} | set(SOFT_REFERENCES.get(name, {}).values())
            for ref in refs - {name}:
                if tables.is_default(ref):
                    assert units.step_of(ref) < units.step_of(name), \
                        f"{version}: {name} refers to {ref}, loaded in the same or a later step"


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_units_run_apart_give_the_export_and_import_of_one_job(request, dialect, tmp_path):
    """What the DAGs' tasks do, without Airflow: plan, every unit (one twice, as a retry would), finish."""
    source = request.getfixturevalue({"postgresql": "pg_url", "mysql": "mysql_url", "sqlite": "sqlite_url"}[dialect])
    cli("sample", "--airflow-version", VERSION, "--target", source, "--dag-runs", "12", "--seed", "2")
    dest = str(tmp_path / "export")
    exporter = units.ExportJob(source, dest, chunk_rows=20, unit_rows=60)
    planned = exporter.plan()
    assert max(u["unit"] for u in planned if u["table"] == "task_instance") >= 2
    for unit in reversed(planned):  # any order
        exporter.run(unit)
    exporter.run(planned[-1])
    exporter.finish(planned)
    exporter.close()
    assert cli("diff", "--source", source, "--target", _fresh_target(tmp_path)).returncode == 3

    target = _fresh_target(tmp_path)
    importer = units.ImportJob(dest, target, unit_chunks=2)
    steps = importer.plan()
    assert sum(u["table"] == "task_instance" for u in steps[units.step_of("task_instance")]) >= 2
    for step in steps:
        for unit in step:
            importer.run(unit)
    importer.run(steps[units.step_of("job")][0])
    assert importer.finish().info["in_sync"]
    assert cli("diff", "--source", source, "--target", target).returncode == 0
    for table in ("job", "log", "task_instance"):
        rows = [r for b, _, _ in _package(dest, None).chunks(table) for r in b.to_pylist()]
        assert _content(rows, CONTENT[table]) == _content(_rows(target, table), CONTENT[table]), table


def _fresh_target(tmp_path) -> str:
    from etl import catalog as cat

    url = f"sqlite:///{tmp_path / f'target-{time.monotonic_ns()}.db'}"
    engine = urls.open_engine(url, create=True)
    cat.create_empty(engine, VERSION)
    engine.dispose()
    return url


# -- the environment --------------------------------------------------------------------------

def etl_venv(version: str) -> Path:
    """Airflow ``version`` and this checkout (editable) in one venv: under the release's constraints
    where they are kept (``helpers.constrained_venv``), else the release's frozen package set or its
    date cap, and then the package uncapped."""
    with airflow_release.locked(f"{version}-etl") as venv:
        py = venv / "bin" / "python"
        if py.exists() and _serves_this_checkout(py, version):
            return venv
        if not constrained_venv(venv, version, "-e", str(REPO)):
            shutil.rmtree(venv, ignore_errors=True)
            release = airflow_release.RELEASES[version]
            python = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions" / release.python / "bin" / "python3"
            uv = str(airflow_release._uv())
            subprocess.run([uv, "venv", "-q", "-p", str(python), str(venv)], check=True)
            install = [uv, "pip", "install", "-q", "-p", str(py)]
            freeze = airflow_release._freeze(version)
            if freeze:
                reqs = venv / "requirements.txt"
                reqs.write_text("".join(line for line in freeze.read_text().splitlines(True) if not line.startswith("mysqlclient")))
                airflow = ["-r", str(reqs)]
            else:
                airflow = [f"apache-airflow=={version}", *release.extra, *(["--exclude-newer", release.cap] if release.cap else [])]
            subprocess.run([*install, *airflow], check=True)
            subprocess.run([*install, "-e", str(REPO)], check=True)
        assert _serves_this_checkout(py, version), f"{venv} does not import Airflow {version} and this checkout"
    return venv


def _serves_this_checkout(py: Path, version: str) -> bool:
    probe = ("import airflow, etl, sqlalchemy; "
             "print(airflow.__version__, sqlalchemy.__version__.split('.')[0], etl.__file__)")
    # Not from the checkout's directory, where ``import etl`` would find the sources whatever the venv holds.
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=py.parent)
    parts = out.stdout.split()
    return out.returncode == 0 and parts[:2] == [version, "1"] and parts[2].startswith(str(REPO))


class Environment:
    """One Airflow environment: a metadata database, an AIRFLOW_HOME with the DAG files, a Fernet key."""

    def __init__(self, venv: Path, home: Path, db_url: str, fernet_key: str, extra: dict):
        self.venv, self.home, self.db_url = venv, home, db_url
        (home / "dags").mkdir(parents=True)
        conn = airflow_release.psycopg2_url(db_url)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn, "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__FERNET_KEY": fernet_key, "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}", **extra,
        }

    def add_example(self, name: str, **overrides: str) -> str:
        """The example DAG file, with extra factory arguments (small units, short retry delays)."""
        text = (EXAMPLES / name).read_text()
        args = "".join(f"    {k}={v},\n" for k, v in overrides.items())
        text, n = re.subn(r"(\n_?dag = \w+_dag\(\n(?:.*\n)*?)(\))", lambda m: m.group(1) + args + m.group(2), text, count=1)
        assert n == 1, "the example's factory call moved"
        (self.home / "dags" / name).write_text(text)
        return re.search(r'\w+_dag\(\n\s+"(\w+)"', text).group(1)

    def airflow(self, *args: str) -> subprocess.Popen:
        """Output goes to a file: a pipe nobody reads while the test watches the database would fill and block Airflow."""
        self.log = self.home / f"airflow-{time.monotonic_ns()}.log"
        with open(self.log, "w") as out:
            return subprocess.Popen([str(self.venv / "bin" / "airflow"), *args], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def run(self, *args: str) -> str:
        proc = self.airflow(*args)
        proc.wait(timeout=900)
        assert proc.returncode == 0, f"airflow {' '.join(args)} exited {proc.returncode}:\n{self.output()[-4000:]}"
        return self.output()

    def dag_test(self, dag_id: str) -> str:
        out = self.run("dags", "test", dag_id, LOGICAL_DATE)
        state = self.scalar(f"SELECT state FROM dag_run WHERE dag_id = '{dag_id}'")
        assert state == "success", f"{dag_id} ended {state}:\n{out[-6000:]}"
        return out

    def scalar(self, sql: str):
        with sa.create_engine(urls.normalize(self.db_url)).connect() as conn:
            return conn.exec_driver_sql(sql).scalar()

    def paused(self) -> dict[str, bool]:
        engine = urls.open_engine(self.db_url)
        with engine.connect() as conn:
            out = dict(conn.exec_driver_sql("SELECT dag_id, is_paused FROM dag WHERE dag_id NOT LIKE 'airflow_history_%%'").all())
        engine.dispose()
        return out


LOGICAL_DATE = "2026-01-01T00:00:00+00:00"


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _add_dags(url: str, paused: dict[str, bool]) -> None:
    """DAG rows the new environment's scheduler would have made from its own DAG files."""
    engine = urls.open_engine(url)
    dag = sa.Table("dag", sa.MetaData(), autoload_with=engine)
    values = {"is_active": True, "max_active_tasks": 16, "max_consecutive_failed_dag_runs": 0,
              "has_task_concurrency_limits": False}
    with engine.begin() as conn:
        conn.execute(dag.insert(), [{"dag_id": d, "is_paused": p, **{k: v for k, v in values.items() if k in dag.c}}
                                    for d, p in paused.items()])
    engine.dispose()


def _clear(url: str, *names: str) -> None:
    engine = urls.open_engine(url)
    with engine.begin() as conn:
        for name in names:
            conn.execute(sa.table(name).delete())
    engine.dispose()


def _package(dest: str, endpoint: str):
    from etl.staging import Package, Store

    return Package(Store(dest, endpoint))


def _content(rows: list[dict], columns: list[str]) -> collections.Counter:
    return collections.Counter(tuple(_plain(r.get(c)) for c in columns) for r in rows)  # log.run_id is 2.5+


def _plain(v):
    if isinstance(v, dt.datetime):
        return (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).timestamp()
    return v


#: Columns that name a row whatever ids the target gave it (surrogate ids and references to them left out).
CONTENT = {
    "job": ["dag_id", "state", "job_type", "start_date", "end_date", "latest_heartbeat", "hostname"],
    "log": ["dttm", "dag_id", "task_id", "event", "owner", "extra", "run_id", "map_index"],
    "task_fail": ["dag_id", "task_id", "run_id", "map_index", "start_date", "end_date"],
    "task_instance": ["dag_id", "task_id", "run_id", "map_index", "state", "try_number", "start_date"],
    "xcom": ["dag_id", "task_id", "run_id", "map_index", "key"],
}


@pytest.mark.slow
@pytest.mark.parametrize("version", HOSTS)
def test_export_dag_then_import_dag_move_the_history(pg_server, s3_bucket, s3_endpoint, tmp_path, version):
    venv = etl_venv(version)
    old_url = pg_server.create("etl_af_old")
    airflow_release.init_db(version, old_url)
    new_url = pg_server.create("etl_af_new", template=old_url)
    old_key, new_key = _fernet_key(), _fernet_key()
    _clear(old_url, "slot_pool", "log_template", "connection")  # the sample brings its own (db init adds defaults)
    cli("sample", "--airflow-version", version, "--target", old_url, "--dag-runs", "30", "--seed", "5", f"--fernet-key={old_key}")
    dest = f"s3://{s3_bucket}/history"
    common = {"AWS_ENDPOINT_URL": s3_endpoint, "AIRFLOW_VAR_AIRFLOW_HISTORY_DEST": dest}

    # -- the old environment runs the export DAG
    old = Environment(venv, tmp_path / "old", old_url, old_key, common)
    export_id = old.add_example("airflow_history_export.py", chunk_rows="50", unit_rows="200")
    paused_before = old.paused()
    assert set(paused_before.values()) == {True, False}
    with LiveWriter(old_url, _live_run) as writer:  # the old environment's scheduler and workers go on meanwhile
        old.dag_test(export_id)
        written = writer.runs
    assert old.paused() == paused_before
    paused_by_export = json.loads(old.scalar(f"SELECT convert_from(value, 'UTF8') FROM xcom WHERE dag_id = '{export_id}' "
                                             "AND task_id = 'pause_other_dags'"))
    assert sorted(paused_by_export) == sorted(d for d, p in paused_before.items() if not p)

    package = _package(dest, s3_endpoint)
    files = [c["file"] for c in package.manifest["tables"]["task_instance"]["chunks"]]
    assert len({f.split(".")[1] for f in files}) >= 3, f"task_instance was not spread over units: {files}"
    # One cut, though the units read at different times on different workers: every task instance's run
    # is in the export, and the runs written after the cut are not (they come with the next export).
    runs = {(r["dag_id"], r["run_id"]) for b, _, _ in package.chunks("dag_run") for r in b.to_pylist()}
    ti_runs = {(r["dag_id"], r["run_id"]) for b, _, _ in package.chunks("task_instance") for r in b.to_pylist()}
    assert ti_runs <= runs, f"task instances exported without their dag run: {sorted(ti_runs - runs)[:3]}"
    live = {r for r in runs if r[0] == "live_writer"}
    assert 0 < len(live) < written, f"{len(live)} of the writer's {written} runs exported: the cut did not fall while it wrote"
    exported_dags = {r["dag_id"]: r["is_paused"] for b, _, _ in package.chunks("dag") for r in b.to_pylist()}
    assert {d: exported_dags[d] for d in paused_before} == paused_before, "the export carries the paused states as they were"

    # -- the new environment runs the import DAG; on the newest release killed once while a unit is half
    # loaded, then run again (2.4's `dags test` is a backfill, which waits forever on the task the kill left running)
    own_dags = {"ml_training": False, "new_env_only": True, "new_env_active": False}
    _add_dags(new_url, own_dags)
    new = Environment(venv, tmp_path / "new", new_url, new_key,
                      {**common, "AIRFLOW_VAR_AIRFLOW_HISTORY_SOURCE_FERNET_SECRET": old_key})
    import_id = new.add_example("airflow_history_import.py", unit_chunks="2", xcom_json="True")
    total = len(files)
    if version == VERSION:
        proc = new.airflow("dags", "test", import_id, LOGICAL_DATE)
        _wait_for_chunks(new, "task_instance", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        loaded = new.scalar("SELECT count(*) FROM _etl_chunk WHERE table_name = 'task_instance'")
        assert 0 < loaded < total, f"the kill came too late or too early: {loaded} of {total} task_instance chunks loaded"
    new.dag_test(import_id)
    mapped = new.scalar(f"SELECT count(*) FROM task_instance WHERE dag_id = '{import_id}' AND task_id LIKE 'load_step_%%' "
                        "AND map_index >= 0 AND state = 'success'")
    assert mapped >= total // 2, f"only {mapped} mapped load units ran"

    assert cli("diff", "--source", dest, "--target", new_url, "--s3-endpoint-url", s3_endpoint).returncode == 0
    imported = {d: p for d, p in paused_before.items() if d not in own_dags}
    assert new.paused() == {**imported, **own_dags}
    for table, columns in CONTENT.items():
        exported = _content([r for b, _, _ in package.chunks(table) for r in b.to_pylist()], columns)
        in_target = _content(_rows(new_url, table), columns)
        assert exported, table
        extra = {k: in_target[k] - n for k, n in exported.items() if in_target[k] != n}
        assert not extra, f"{table}: rows loaded more (or fewer) times than exported: {list(extra.items())[:3]}"
    # xcom_json: the pickles of plain data arrive as JSON, which Airflow 2 reads without enable_xcom_pickling.
    def pickled(rows):
        return sum((r["value"] or b"")[:1] == b"\x80" for r in rows)

    assert pickled(_rows(new_url, "xcom")) < pickled(r for b, _, _ in package.chunks("xcom") for r in b.to_pylist())
    # Re-encrypted with the new environment's key: its own Airflow reads the secret back.
    assert new.run("variables", "get", "api_token").strip().splitlines()[-1] == "s3cr3t-ÄÖ-🚀"


def _live_run(engine: sa.Engine, n: int) -> None:
    """What a live environment writes: a dag run and its 20 task instances, in one transaction, with
    ids from the server's sequences (as Airflow's own writes take them)."""
    meta = sa.MetaData()
    run, ti = (sa.Table(t, meta, autoload_with=engine) for t in ("dag_run", "task_instance"))
    run_id = f"manual__live_{n}"
    when = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=n)
    with engine.begin() as conn:
        # Finished: running task instances would fill default_pool, and 2.4's `dags test` (a backfill) waits for slots.
        # clear_number: NOT NULL from 2.8.0, its server default only from 2.9.2 on (Airflow's ORM sets it)
        conn.execute(run.insert().values(dag_id="live_writer", run_id=run_id, execution_date=when, run_type="manual",
                                         state="success", external_trigger=True,
                                         **({"clear_number": 0} if "clear_number" in run.c else {})))
        conn.execute(ti.insert(), [{"dag_id": "live_writer", "task_id": f"task_{i:02d}", "run_id": run_id, "state": "success",
                                    "try_number": 1, "max_tries": 0, "pool": "default_pool", "pool_slots": 1, "queue": "default",
                                    "priority_weight": 1, "start_date": when, "end_date": when} for i in range(20)])
    time.sleep(0.5)


def _wait_for_chunks(env: Environment, table: str, proc: subprocess.Popen) -> int:
    engine = urls.open_engine(env.db_url)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            assert proc.poll() is None, f"the import DAG ended before it was killed:\n{env.output()[-4000:]}"
            with engine.connect() as conn:
                if sa.inspect(conn).has_table("_etl_chunk"):
                    n = conn.exec_driver_sql(f"SELECT count(*) FROM _etl_chunk WHERE table_name = '{table}'").scalar()
                    if n:
                        return n
            time.sleep(0.01)
    finally:
        engine.dispose()
    raise AssertionError(f"no {table} chunk was loaded within 10 minutes")


def _rows(url: str, table: str) -> list[dict]:
    engine = urls.open_engine(url)
    with engine.connect() as conn:
        out = [dict(r._mapping) for r in conn.execute(sa.select(sa.Table(table, sa.MetaData(), autoload_with=conn)))]
    engine.dispose()
    return out


@pytest.mark.slow
def test_airflow_before_2_4_is_refused_in_one_line(tmp_path):
    """Airflow 2.2.5's own venv (no engine dependencies needed: the check comes first)."""
    venv = airflow_release.ensure_venv("2.2.5")
    probe = ("from etl.airflow import export_dag\n"
             "try:\n    export_dag('x', 's3://bucket/prefix')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "AIRFLOW_HOME": str(tmp_path)})
    expected = "EtlError etl.airflow needs Airflow 2.4 or later (dynamic task mapping); this is Airflow 2.2.5"
    assert out.stdout.startswith(expected), out.stdout + out.stderr


@pytest.mark.slow
def test_importing_etl_leaves_airflow_out(tmp_path):
    """Workers import ``etl`` for every DAG file that uses it; Airflow must come only with ``etl.airflow``."""
    venv = etl_venv(VERSION)
    probe = "import sys, etl, etl.commands, etl.units; print('airflow' in sys.modules)"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
