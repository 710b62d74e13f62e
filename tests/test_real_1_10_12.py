"""MWAA's first release as its users have it: real Airflow 1.10.12 makes the history with its own
commands (a backfill with failed tasks and a timed-out one, a run triggered with conf whose tasks are
run one by one, a retried task, xcom, Fernet-encrypted variables and a connection), and ``migrate``,
told no version, moves it into databases that real 2.5.1 and 3.0.6 built. Their own ORM then reads
what arrived, ``diff`` says in sync, and what did not arrive is named. Slow: three releases in venvs.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from etl import airflow_release
from etl.errors import EtlError
from helpers import cli

pytestmark = pytest.mark.slow

DAG = '''
import datetime as dt

from airflow import DAG
from airflow.exceptions import AirflowException
from airflow.operators.bash_operator import BashOperator
from airflow.operators.python_operator import PythonOperator


def produce(**context):
    context["ti"].xcom_push(key="note", value={"day": context["ds"], "n": [1, 2]})
    context["ti"].xcom_push(key="when", value=context["execution_date"])  # a pendulum 1 object, pickled
    return ["naïve ☃", 3]


def flaky(**context):
    if context["ti"].try_number == 1:
        raise AirflowException("the first try fails")
    return "second try"


with DAG("history", start_date=dt.datetime(2020, 8, 1), schedule_interval="@daily", catchup=False,
         default_args={"retry_delay": dt.timedelta(seconds=1)}) as dag:
    first = PythonOperator(task_id="produce", python_callable=produce, provide_context=True)
    retried = PythonOperator(task_id="flaky", python_callable=flaky, provide_context=True, retries=1)
    timed_out = BashOperator(task_id="slow", bash_command="sleep 30", execution_timeout=dt.timedelta(seconds=2))
    first >> [retried, timed_out]
'''

#: A task that triggers a run the way 1.10 code could (the experimental API's trigger_dag with a dict):
#: the run's conf, pickled, holds a pendulum 1 datetime.
CONTROLLER = '''
import datetime as dt

from airflow import DAG
from airflow.api.common.experimental.trigger_dag import trigger_dag
from airflow.operators.python_operator import PythonOperator


def trigger(**context):
    trigger_dag("history", run_id="trig__nightly", conf={"when": context["execution_date"], "why": "nightly"},
                execution_date=context["execution_date"])


with DAG("controller", start_date=dt.datetime(2020, 8, 1), schedule_interval=None) as dag:
    PythonOperator(task_id="trigger", python_callable=trigger, provide_context=True)
'''

CONF = {"target": "prod", "n": [1, 2]}
VARIABLES = {"api_token": "s3cr3t-ÄÖ-🚀", "plain_setting": "42"}
PASSWORD = "pa55-w0rd"

#: Run by each release's own Python against its own database: what its ORM makes of every row.
READ = '''
import json, sys
from airflow import settings
from airflow.models import Connection, DagRun, TaskInstance, Variable
try:
    from airflow.models.xcom import XComModel as XCom
except ImportError:
    from airflow.models import XCom
session = settings.Session()
major = int(__import__("airflow").__version__.split(".")[0])
def when(obj):
    return (getattr(obj, "logical_date", None) or obj.execution_date).isoformat()
def value(x):
    return XCom.deserialize_value(x) if major > 2 else x.value  # before 3.0 the ORM deserializes on load
print(json.dumps({
    "runs": sorted([r.run_id, when(r), r.state, r.conf or None] for r in session.query(DagRun)),
    "tis": sorted([t.task_id, when(t), t.state] for t in session.query(TaskInstance)),
    "xcom": sorted([x.task_id, x.key, when(x), value(x)] for x in session.query(XCom)),
    "variables": {k: Variable.get(k) for k in sys.argv[1].split(",")},
    "password": session.query(Connection).filter(Connection.conn_id == "warehouse").one().password,
}, default=lambda o: o.isoformat()))
'''


class Airflow:
    """One release's CLI and Python against one database, with a DAGs folder and a Fernet key."""

    def __init__(self, version: str, url: str, home: Path, key: str, **settings: str):
        self.version, self.url, self.home = version, url, home
        (home / "dags").mkdir(parents=True, exist_ok=True)
        conn = airflow_release.psycopg2_url(url)
        self.env = {"AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"), "AIRFLOW__CORE__FERNET_KEY": key,
                    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__SQL_ALCHEMY_CONN": conn,
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "AIRFLOW_HOME": str(home), **settings}

    def __call__(self, *args: str) -> str:
        return airflow_release.run_airflow(self.version, list(args), self.url, env=self.env)

    def read(self) -> dict:
        venv = airflow_release.ensure_venv(self.version)
        out = subprocess.run([str(venv / "bin" / "python"), "-c", READ, ",".join(VARIABLES)], capture_output=True,
                             text=True, env={"PATH": str(venv / "bin"), **self.env}, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def source(pg_server, tmp_path_factory):
    """A 1.10.12 database with its history, and what 1.10.12 itself reads from it."""
    key = Fernet.generate_key().decode()
    af = Airflow("1.10.12", pg_server.create("etl_af112"), tmp_path_factory.mktemp("af112"), key)
    (af.home / "dags" / "history.py").write_text(DAG)
    (af.home / "dags" / "controller.py").write_text(CONTROLLER)
    af("initdb")
    with pytest.raises(EtlError, match="backfill"):  # some task instances failed: that is the history wanted
        af("backfill", "-s", "2020-08-01", "-e", "2020-08-02", "history")
    af("trigger_dag", "-c", json.dumps(CONF), "-r", "manual_conf_1", "-e", "2020-08-05", "history")
    for task in ("produce", "flaky", "flaky", "slow"):  # flaky fails, is up for retry, then succeeds
        af("run", "history", task, "2020-08-05")
    af("trigger_dag", "-e", "2020-08-06", "controller")
    af("run", "controller", "trigger", "2020-08-06")
    for name, value in VARIABLES.items():
        af("variables", "-s", name, value)
    af("connections", "-a", "--conn_id", "warehouse", "--conn_uri", f"postgresql://etl:{PASSWORD}@db.example:5432/wh")
    return af, af.read()


def test_the_history_made_by_1_10_12_is_what_the_test_needs(source):
    _, seen = source
    # The backfill's retries race its executor: its flaky tasks may end failed or, retried, successful.
    assert {(t, s) for t, _, s in seen["tis"]} >= {("produce", "success"), ("flaky", "success"), ("slow", "failed")}
    assert {r[0]: r[3] for r in seen["runs"]}["manual_conf_1"] == CONF and len(seen["runs"]) == 5
    assert {r[0]: r[3] for r in seen["runs"]}["trig__nightly"] == {"when": "2020-08-06T00:00:00+00:00", "why": "nightly"}
    assert {x[1] for x in seen["xcom"]} == {"note", "when", "return_value"} and len(seen["xcom"]) >= 10
    assert seen["variables"] == VARIABLES and seen["password"] == PASSWORD


@pytest.mark.parametrize("target_version", ["2.5.1", "3.0.6"])
def test_1_10_12_history_migrates_with_no_version_typed_and_the_target_reads_it(source, pg_server, tmp_path,
                                                                                  target_version):
    """2.5.1 reads 1.10's pickled xcom values with the documented setting, pendulum 1 ones included (they are
    pickled again: no pendulum after 1.x reads them). 3.0.6 keeps no pickle: with --xcom-json those holding
    JSON data arrive as JSON, the datetimes are quarantined and counted, and a conf holding one is NULL,
    as Airflow's own upgrade leaves it."""
    af, seen = source
    key, old_key = Fernet.generate_key().decode(), af.env["AIRFLOW__CORE__FERNET_KEY"]
    settings = {"AIRFLOW__CORE__ENABLE_XCOM_PICKLING": "True"} if target_version < "3" else {}
    target = Airflow(target_version, pg_server.create("etl_af112_dst"), tmp_path / "home", key, **settings)
    airflow_release.init_db(target_version, target.url)
    options = [f"--source-fernet-key={old_key}", f"--target-fernet-key={key}"] + (["--xcom-json"] if target_version > "3" else [])
    moved = json.loads(cli("migrate", "--source", af.url, "--target", target.url, *options, "--json", cwd=tmp_path).stdout)
    assert moved["source_airflow_version"] == "1.10.12"
    assert any("pendulum 1 pickles" in note for note in moved["notes"]), moved["notes"]
    got = target.read()
    assert got["variables"] == VARIABLES and got["password"] == PASSWORD
    assert [r[:3] for r in got["runs"]] == [r[:3] for r in seen["runs"]]
    assert got["tis"] == seen["tis"]
    confs = {r[0]: r[3] for r in got["runs"]}
    assert confs["manual_conf_1"] == CONF
    triggered = "trig__nightly"
    datetimes = [x for x in seen["xcom"] if x[1] == "when"]
    if target_version < "3":
        assert got["xcom"] == seen["xcom"] and confs[triggered] == {"when": "2020-08-06T00:00:00+00:00", "why": "nightly"}
        assert any("enable_xcom_pickling = True" in note and f"xcom.value: {len(seen['xcom'])} " in note
                   for note in moved["notes"]), moved["notes"]
    else:
        assert got["xcom"] == [x for x in seen["xcom"] if x not in datetimes] and confs[triggered] is None
        assert moved["tables"]["xcom"]["quarantined"] == len(datetimes)
    assert cli("diff", "--source", af.url, "--target", target.url, *options, cwd=tmp_path).returncode == 0
