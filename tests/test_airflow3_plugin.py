"""The API-server plugin (etl.plugin) in a real Airflow 3 ``airflow api-server`` on PostgreSQL.

The package goes into that Airflow's venv from its wheel, as requirements.txt would bring it on
MWAA: no plugin or DAG file is copied, the ``airflow.plugins`` entry point is all Airflow finds.
Users come from Airflow's simple auth manager; the exports live on moto's S3 server. Slow: the
venv is cached beside the release venvs, the wheel reinstalled into it once per session.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from etl import airflow_release, urls
from etl.staging import Package, Store
from helpers import chunks_done, cli, constrained_venv, constraints_of, count, rows

REPO = Path(__file__).resolve().parent.parent
VERSION = "3.0.6"  # what Amazon MWAA runs on Airflow 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(out)], check=True,
                   capture_output=True)
    return next(out.glob("airflow_metadata_etl-*.whl"))


@pytest.fixture(scope="session")
def venvs(wheel):
    """Airflow ``version`` and this checkout's wheel: under the release's constraints where they are
    kept (3.0.6, on MWAA's Python 3.12), else as the release's freeze pins it, the wheel's own
    dependencies then at their newest."""
    ready: dict[str, Path] = {}

    def venv(version: str) -> Path:
        if version not in ready:
            with airflow_release.locked(f"{version}-plugin") as path:
                py = path / "bin" / "python"
                pins = constraints_of(version)
                if not (py.exists() and airflow_release._installed(py) == version) and \
                        not constrained_venv(path, version, str(wheel)):
                    airflow_release._install(airflow_release.RELEASES[version], path)
                subprocess.run([str(airflow_release._uv()), "pip", "install", "-q", "-p", str(py), *(["-c", str(pins)] if pins else []),
                                "--reinstall-package", "airflow-metadata-etl", str(wheel)], check=True)
            ready[version] = path
        return ready[version]
    return venv


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    """One Airflow 3 environment's API server, with an admin and a viewer of the simple auth manager."""

    def __init__(self, venv: Path, home: Path, db_url: str, extra: dict):
        self.venv, self.home, self.db_url = venv, home, db_url
        home.mkdir(parents=True, exist_ok=True)
        self.port = _port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_release.psycopg2_url(db_url),
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
            "AIRFLOW__API_AUTH__JWT_SECRET": Fernet.generate_key().decode(),
            "AIRFLOW__API__WORKERS": "2",  # a job's status must not depend on the worker that answers
            **extra,
        }
        self.proc = None

    def airflow(self, *args: str) -> str:
        out = subprocess.run([str(self.venv / "bin" / "airflow"), *args], env=self.env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"airflow {' '.join(args)}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
        return out.stdout

    def start(self) -> ApiServer:
        self.log = open(self.home / f"api-server-{time.monotonic_ns()}.log", "w")
        self.proc = subprocess.Popen([str(self.venv / "bin" / "airflow"), "api-server", "--port", str(self.port)],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-4000:]
            try:
                urllib.request.urlopen(f"{self.base}/api/v2/version", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        raise AssertionError("the API server did not answer within 2 minutes")

    def kill(self) -> None:
        with_group = self.proc.pid
        os.killpg(with_group, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str) -> str:
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        status, body = self.call("POST", "/auth/token", body={"username": user, "password": passwords[user]})
        assert status == 201, body
        return body["access_token"]

    def call(self, method: str, path: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        request = urllib.request.Request(self.base + path, method=method, headers=headers,
                                         data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture
def environments(venvs, pg_server, s3_endpoint, tmp_path):
    """New Airflow 3 environments, each database migrated by Airflow, the API server not started yet."""
    made: list[ApiServer] = []

    def make(version: str = VERSION) -> ApiServer:
        url = pg_server.create("etl_af3")
        server = ApiServer(venvs(version), tmp_path / f"home-{len(made)}", url, {"AWS_ENDPOINT_URL": s3_endpoint})
        made.append(server)
        server.airflow("db", "migrate")
        return server
    yield make
    for server in made:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
        pg_server.drop(server.db_url)


def _etl_tables(url: str) -> list[str]:
    engine = urls.open_engine(url)
    names = [t for t in sa.inspect(engine).get_table_names() if t.startswith("_etl_")]
    engine.dispose()
    return names


@pytest.mark.parametrize("version", [VERSION, "3.3.2"])
def test_only_an_admin_may_start_a_job_and_a_refused_request_writes_nothing(environments, version):
    api = environments(version).start()
    job = {"job": "import", "dest": "s3://nowhere/at-all"}
    assert api.call("POST", "/etl/jobs", body=job)[0] == 401
    assert api.call("GET", "/etl/jobs")[0] == 401
    viewer = api.token("viewer")
    assert api.call("POST", "/etl/jobs", viewer, job)[0] == 403
    assert api.call("GET", "/etl/jobs", viewer)[0] == 403
    key = Fernet.generate_key().decode()
    status, body = api.call("POST", "/etl/jobs", api.token("admin"), {**job, "source_fernet_key": key})
    assert status == 422 and key not in json.dumps(body), body  # a key itself is refused, and not echoed
    assert _etl_tables(api.db_url) == []


def _wait(api: ApiServer, token: str, job_id: str, until, seconds: float = 600) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, job = api.call("GET", f"/etl/jobs/{job_id}", token)
        assert status == 200, job
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there: {job}")


@pytest.mark.parametrize("version", [VERSION, "3.3.2"])
def test_an_import_through_the_plugin_killed_with_the_api_server_resumes_once(environments, pg_server, pg_url, s3_bucket,
                                                                              s3_endpoint, version, request):
    source_key = Fernet.generate_key().decode()
    cli("sample", "--airflow-version", "2.10.5", "--target", pg_url, "--dag-runs", "1000", "--faults",
        f"--fernet-key={source_key}")
    dest = f"s3://{s3_bucket}/history"
    cli("export", "--source", pg_url, "--to", dest, "--chunk-rows", "2000", "--s3-endpoint-url", s3_endpoint)
    api = environments(version)
    api.airflow("variables", "set", "--", "etl_source_fernet_key", source_key)  # named in the request, never sent
    api.start()
    token = api.token("admin")
    job = {"job": "import", "dest": dest, "source_fernet_key": "variable:etl_source_fernet_key", "xcom_json": True}
    status, started = api.call("POST", "/etl/jobs", token, job)
    assert status == 202, started
    assert api.call("POST", "/etl/jobs", token, job)[0] == 409  # one job at a time, whichever worker answers
    manifest = json.loads(Store(dest, s3_endpoint).read("manifest.json"))
    total = len(manifest["tables"]["task_instance"]["chunks"])
    watch = urls.open_engine(api.db_url)
    deadline = time.monotonic() + 300
    while chunks_done(watch, "task_instance") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    api.kill()
    loaded = chunks_done(watch, "task_instance")
    watch.dispose()
    assert 0 < loaded < total, f"the kill came too late or too early: {loaded} of {total} task_instance chunks"

    api.start()
    token = api.token("admin")
    deadline = time.monotonic() + 60
    while (answer := api.call("POST", "/etl/jobs", token, job))[0] == 409 and time.monotonic() < deadline:
        time.sleep(1)  # the killed job's row shows it running until it is overdue for renewal
    assert answer[0] == 202, answer
    done = _wait(api, token, answer[1]["id"], lambda j: j["state"] != "running")
    assert done["state"] == "success", done["error"]
    assert api.call("GET", f"/etl/jobs/{started['id']}", token)[1]["state"] == "interrupted"
    assert source_key not in json.dumps(api.call("GET", "/etl/jobs", token)[1])

    assert cli("diff", "--source", dest, "--target", api.db_url, "--s3-endpoint-url", s3_endpoint).returncode == 0
    for table in ("job", "dag_run", "task_instance"):  # once each, though a run died halfway
        assert count(api.db_url, table) == manifest["tables"][table]["rows"], table
    # The request's xcom_json reached the engine: the xcom pickles of plain data arrived, as the CLI's --xcom-json brings them.
    xcoms = {}
    for flag in ((), ("--xcom-json",)):
        alone = pg_server.create()
        request.addfinalizer(lambda url=alone: pg_server.drop(url))
        cli("import", "--from", dest, "--target", alone, "--target-version", version, "--s3-endpoint-url", s3_endpoint, *flag)
        xcoms[flag] = count(alone, "xcom")
    assert xcoms[()] < count(api.db_url, "xcom") == xcoms[("--xcom-json",)]
    # Airflow itself reads what was loaded: the re-encrypted variable, the runs and task instances by its ORM.
    assert api.airflow("variables", "get", "api_token").strip().splitlines()[-1] == "s3cr3t-ÄÖ-🚀"
    seen = subprocess.run([str(api.venv / "bin" / "python"), "-c",
                           "from airflow import settings; from airflow.models import DagRun, TaskInstance;"
                           "settings.configure_orm(); s = settings.Session();"
                           "print(s.query(DagRun).count(), s.query(TaskInstance).count())"],
                          env=api.env, capture_output=True, text=True, check=True).stdout.split()
    assert [int(n) for n in seen[-2:]] == [count(api.db_url, "dag_run"), count(api.db_url, "task_instance")]



def test_an_airflow_3_environment_exports_its_own_history_through_the_plugin(environments, pg_server, s3_bucket,
                                                                             s3_endpoint, request):
    api = environments("3.3.2")
    engine = urls.open_engine(api.db_url)
    with engine.begin() as conn:  # what `db migrate` put there; the sample brings its own
        for name in ("log", "connection", "slot_pool", "log_template", "dag_bundle"):
            conn.execute(sa.table(name).delete())
    engine.dispose()
    cli("sample", "--airflow-version", "3.3.2", "--target", api.db_url, "--dag-runs", "30", "--faults")
    api.start()
    token = api.token("admin")
    dest = f"s3://{s3_bucket}/own-history"
    status, started = api.call("POST", "/etl/jobs", token, {"job": "export", "dest": dest, "chunk_rows": 100})
    assert status == 202, started
    done = _wait(api, token, started["id"], lambda j: j["state"] != "running")
    assert done["state"] == "success", done["error"]
    assert done["report"]["tables"]["task_instance"]["rows"] == count(api.db_url, "task_instance")

    via_plugin, direct = pg_server.create(), pg_server.create()
    request.addfinalizer(lambda: (pg_server.drop(via_plugin), pg_server.drop(direct)))
    cli("import", "--from", dest, "--target", via_plugin, "--target-version", "3.3.2", "--s3-endpoint-url", s3_endpoint)
    cli("migrate", "--source", api.db_url, "--target", direct, "--target-version", "3.3.2")
    for table in done["report"]["tables"]:
        assert count(via_plugin, table) == count(direct, table), table
    for table, columns in {"dag_run": ["dag_id", "run_id", "state", "logical_date", "conf"],
                           "task_instance": ["dag_id", "task_id", "run_id", "map_index", "state", "try_number"],
                           "xcom": ["dag_id", "task_id", "run_id", "map_index", "key", "value"]}.items():
        assert rows(via_plugin, table, columns) == rows(direct, table, columns), table


OTHER_DAGS = {"other_hourly": False, "other_paused": True, "other_daily": False}
EXAMPLES = [REPO / "examples" / "dags" / f"airflow3_history_{job}.py" for job in ("import", "export")]


def _dags_folder(api: ApiServer) -> None:
    """The example DAG files as the user copies them, beside DAGs of the environment's own."""
    folder = api.home / "dags"
    folder.mkdir()
    for example in EXAMPLES:
        (folder / example.name).write_text(example.read_text())
    for dag_id in OTHER_DAGS:
        (folder / f"{dag_id}.py").write_text(
            "import datetime\nfrom airflow.sdk import DAG\nfrom airflow.providers.standard.operators.empty import EmptyOperator\n"
            f"with DAG({dag_id!r}, schedule='@daily', start_date=datetime.datetime(2026, 1, 1), catchup=False):\n"
            "    EmptyOperator(task_id='noop')\n")
    api.env["AIRFLOW__CORE__DAGS_FOLDER"] = str(folder)


def _paused(url: str) -> dict[str, bool]:
    engine = urls.open_engine(url)
    with engine.connect() as conn:
        out = dict(conn.execute(sa.text("SELECT dag_id, is_paused FROM dag WHERE dag_id LIKE 'other_%'")).all())
    engine.dispose()
    return out


def _dag_test(api: ApiServer, dag_id: str, logical_date: str, dest: str) -> str:
    """``airflow dags test``, the export's location given as the Variable the examples read; the run's state."""
    env = {**api.env, "AIRFLOW_VAR_AIRFLOW_HISTORY_DEST": dest}
    out = subprocess.run([str(api.venv / "bin" / "airflow"), "dags", "test", dag_id, logical_date], env=env,
                         capture_output=True, text=True, timeout=900)
    (api.home / f"dags-test-{logical_date[:10]}.log").write_text(out.stdout + out.stderr)
    engine = urls.open_engine(api.db_url)
    with engine.connect() as conn:
        state = conn.execute(sa.text("SELECT state FROM dag_run WHERE dag_id = :d AND logical_date = :t"),
                             {"d": dag_id, "t": logical_date}).scalar()
    engine.dispose()
    return state, out.stdout + out.stderr


_READ_BACK = """
import json
from airflow import settings
from airflow.models import Connection, DagRun, TaskInstance, Variable
from airflow.models.xcom import XComModel
settings.configure_orm()
s = settings.Session()
values = [XComModel.deserialize_value(x) for x in s.query(XComModel).filter(XComModel.key == "unicode")]
print(json.dumps({"runs": s.query(DagRun).count(), "tis": s.query(TaskInstance).count(), "xcom": values,
                  "variable": Variable.get("api_token"),
                  "password": Connection.get_connection_from_secrets("postgres_default").password}))
"""


@pytest.mark.parametrize("version", [VERSION, "3.3.2"])
def test_the_example_dags_import_and_export_restoring_every_paused_state_also_when_they_fail(
        environments, pg_url, s3_bucket, s3_endpoint, version):
    source_key = Fernet.generate_key().decode()
    cli("sample", "--airflow-version", "2.10.5", "--target", pg_url, "--dag-runs", "60", "--faults",
        f"--fernet-key={source_key}")
    dest = f"s3://{s3_bucket}/history"
    cli("export", "--source", pg_url, "--to", dest, "--chunk-rows", "200", "--s3-endpoint-url", s3_endpoint)
    api = environments(version)
    _dags_folder(api)
    api.airflow("dags", "reserialize")
    for dag_id, paused in OTHER_DAGS.items():
        api.airflow("dags", "pause" if paused else "unpause", dag_id)
    before = _paused(api.db_url)
    assert before == OTHER_DAGS
    api.airflow("variables", "set", "--", "airflow_history_source_fernet_secret", source_key)
    api.start()
    passwords = json.loads((api.home / "simple_auth_manager_passwords.json.generated").read_text())
    api.env["AIRFLOW_CONN_AIRFLOW_API"] = json.dumps({"conn_type": "http", "host": api.base, "login": "admin",
                                                      "password": passwords["admin"]})

    state, out = _dag_test(api, "airflow_history_import", "2026-01-01T00:00:00+00:00", f"s3://{s3_bucket}/nothing-here")
    assert state == "failed", out[-6000:]
    assert re.search(r"job \w+ failed: ", out) and "nothing-here has no manifest.json" in out, out[-6000:]  # in the task's log
    tries = rows(api.db_url, "task_instance", ["task_id", "try_number"])
    assert ("import_history", 1) in tries, f"a job the engine failed was retried: {tries}"
    assert _paused(api.db_url) == before
    assert count(api.db_url, "dag_run") == 1, "the failed import wrote history"  # the import DAG's own run

    state, out = _dag_test(api, "airflow_history_import", "2026-01-02T00:00:00+00:00", dest)
    assert state == "success", out[-6000:]
    assert re.search(r"task_instance: done, [\d,]+ rows", out), out[-6000:]  # the job's progress, in the task's log
    assert _paused(api.db_url) == before
    assert source_key not in out

    assert cli("diff", "--source", dest, "--target", api.db_url, "--s3-endpoint-url", s3_endpoint).returncode == 0
    seen = json.loads(subprocess.run([str(api.venv / "bin" / "python"), "-c", _READ_BACK], env=api.env,
                                     capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert seen["runs"] == count(api.db_url, "dag_run") and seen["tis"] == count(api.db_url, "task_instance")
    assert seen["xcom"] and set(seen["xcom"]) == {"naïve ☃ 🚀 中文"}
    assert (seen["variable"], seen["password"]) == ("s3cr3t-ÄÖ-🚀", "pw1")

    # The same environment as a source: the example export DAG has the API server export it.
    again = f"s3://{s3_bucket}/from-{version}"
    state, out = _dag_test(api, "airflow_history_export", "2026-01-03T00:00:00+00:00", again)
    assert state == "success", out[-6000:]
    assert _paused(api.db_url) == before
    package = Package(Store(again, s3_endpoint))
    exported = {r["dag_id"]: r["is_paused"] for b, _, _ in package.chunks("dag") for r in b.to_pylist()}
    assert {d: exported[d] for d in OTHER_DAGS} == OTHER_DAGS, "the export carries the paused states as they were"
    assert package.manifest["tables"]["task_instance"]["rows"] >= seen["tis"]
