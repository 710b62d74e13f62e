"""Import on real servers, past the happy path: killed and re-run, merged into a target with a
history of its own and read back by real Airflow, UUIDs in the target's own format, trigger
kwargs re-keyed, dataset aliases predicted by the dry run, and bad input refused up front.

Targets are compared as whole tables with the target's surrogate ids taken out: a reference
to a re-numbered row is replaced by that row's natural key (or, for rows that have none, its
whole content), so two targets that drew different ids from their sequences still compare equal,
and a reference that points at the wrong row does not.
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from etl import airflow_release, catalog, ledger, sample, tables, urls
from helpers import chunks_done, cli, count, indexes, report

KEY_OLD, KEY_NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()
NEWEST = catalog.versions()[-1]

#: Columns that hold another row's target-assigned id (or a 3.x task instance UUID).
REFS = {
    "dag_run": {"creating_job_id": "job", "log_template_id": "log_template"},
    "trigger": {"triggerer_id": "job"},
    "task_instance": {"job_id": "job", "queued_by_job_id": "job", "trigger_id": "trigger"},
    "task_instance_history": {"job_id": "job", "queued_by_job_id": "job", "trigger_id": "trigger"},
    "dag_run_note": {"dag_run_id": "dag_run"},
    "task_instance_note": {"ti_id": "task_instance"},
    "task_reschedule": {"ti_id": "task_instance"},
    "xcom": {"dag_run_id": "dag_run"},
    "dataset_event": {"dataset_id": "dataset"},
    "asset_event": {"asset_id": "asset"},
    "dagrun_dataset_event": {"dag_run_id": "dag_run", "event_id": "dataset_event"},
    "dagrun_asset_event": {"dag_run_id": "dag_run", "event_id": "asset_event"},
    "dataset_alias_dataset": {"alias_id": "dataset_alias", "dataset_id": "dataset"},
    "dataset_alias_dataset_event": {"alias_id": "dataset_alias", "event_id": "dataset_event"},
    "asset_alias_asset": {"alias_id": "asset_alias", "asset_id": "asset"},
    "asset_alias_asset_event": {"alias_id": "asset_alias", "event_id": "asset_event"},
}
#: Natural keys (the first whose columns the table has); tables without one are compared as multisets.
KEYS = {
    "slot_pool": [("pool",)], "variable": [("key",)], "connection": [("conn_id",)], "dag": [("dag_id",)],
    "dag_bundle": [("name",)], "log_template": [("filename", "elasticsearch_id")],
    "dataset": [("uri",)], "asset": [("name", "uri")], "asset_active": [("name", "uri")],
    "dataset_alias": [("name",)], "asset_alias": [("name",)],
    "dag_run": [("dag_id", "run_id")], "dag_run_note": [("dag_run_id",)],
    "task_instance": [("dag_id", "task_id", "run_id", "map_index")],
    "task_instance_note": [("ti_id",), ("dag_id", "task_id", "run_id", "map_index")],
    "task_map": [("dag_id", "task_id", "run_id", "map_index")],
    "task_instance_history": [("dag_id", "task_id", "run_id", "map_index", "try_number")],
    "rendered_task_instance_fields": [("dag_id", "task_id", "run_id", "map_index")],
    "xcom": [("dag_id", "run_id", "task_id", "map_index", "key")],
    "sla_miss": [("dag_id", "task_id", "execution_date")],
    "dagrun_dataset_event": [("dag_run_id", "event_id")], "dagrun_asset_event": [("dag_run_id", "event_id")],
    "dataset_alias_dataset": [("alias_id", "dataset_id")], "dataset_alias_dataset_event": [("alias_id", "event_id")],
    "asset_alias_asset": [("alias_id", "asset_id")], "asset_alias_asset_event": [("alias_id", "event_id")],
}
SURROGATE = {"task_instance_history": "task_instance_id"}  # 3.x; elsewhere a single-column "id" primary key


def _plain(value):
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str) and len(value) in (32, 36):
        try:
            return str(uuid.UUID(value))  # 32-hex and dashed spellings are the same id
        except ValueError:
            return value
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _key_columns(name: str, columns) -> tuple | None:
    return next((k for k in KEYS.get(name, []) if all(c in columns for c in k)), None)


def snapshot(url: str) -> dict[str, collections.Counter]:
    """Every history table as a multiset of rows, surrogate ids out, references resolved."""
    engine = urls.open_engine(url)
    meta = sa.MetaData()
    present = set(sa.inspect(engine).get_table_names())
    names = [t for t in (*tables.HISTORY, "dag_bundle") if t in present]
    with warnings.catch_warnings():  # SQLite's PRAGMA view of named foreign keys; the keys are there
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        meta.reflect(engine, only=names)
    resolved: dict[str, dict] = {}
    out = {}
    with engine.connect() as conn:
        for name in sorted(names, key=tables.load_rank):
            t = meta.tables[name]
            pk = [c.name for c in t.primary_key.columns]
            ident = SURROGATE[name] if SURROGATE.get(name, "") in t.c else ("id" if pk == ["id"] else None)
            key = _key_columns(name, t.c.keys())
            refs = REFS.get(name, {})
            rows, ids = [], {}
            for r in conn.execute(sa.select(t)).mappings():
                row = {c: _resolve(resolved, refs[c], v) if c in refs else _plain(v) for c, v in r.items() if c != ident}
                canon = tuple(sorted(row.items(), key=lambda kv: kv[0]))
                rows.append(canon)
                if ident:
                    ids[_plain(r[ident])] = tuple(row[c] for c in key) if key else canon
            resolved[name] = ids
            out[name] = collections.Counter(rows)
    engine.dispose()
    return out


def _resolve(resolved: dict, table: str, value):
    if value is None:
        return None
    return resolved.get(table, {}).get(_plain(value), ("dangling", table, _plain(value)))


def _keyed(name: str, rows: collections.Counter) -> dict:
    cols = [c for c, _ in next(iter(rows))] if rows else []
    key = _key_columns(name, cols)
    return {tuple(dict(r)[c] for c in key): r for r in rows} if key else {}


def _dangling(snap: dict) -> list:
    return [(t, r) for t, rows in snap.items() for r in rows if any(isinstance(v, tuple) and v[:1] == ("dangling",) for _, v in r)]


def _fill(url: str, version: str = "2.10.5", dag_runs: int = 12, seed: int = 5, fernet_key: str | None = KEY_OLD) -> str:
    engine = urls.open_engine(url, create=True)
    sample.sample(engine, version, dag_runs=dag_runs, seed=seed, fernet_key=fernet_key)
    engine.dispose()
    return url


def _empty(url: str, version: str = "2.10.5") -> str:
    engine = urls.open_engine(url, create=True)
    catalog.create_empty(engine, version)
    engine.dispose()
    return url


def _database(request, kind: str, tmp_path: Path, name: str) -> str:
    """A further empty database of ``kind``, dropped after the test."""
    if kind == "sqlite_url":
        return f"sqlite:///{tmp_path / (name + '.db')}"
    server = request.getfixturevalue("pg_server" if kind == "pg_url" else "mysql_server")
    url = server.create()
    request.addfinalizer(lambda: server.drop(url))
    return url


def _inserted(rep: dict) -> int:
    return sum(v.get("inserted", 0) + v.get("updated", 0) for v in rep["tables"].values())


# -- killed at random points ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["pg_url", "mysql_url", "sqlite_url"])
def test_import_killed_at_random_points_ends_as_one_clean_import(request, tmp_path, pg_url, kind):
    src = _fill(pg_url, dag_runs=40)
    dest = str(tmp_path / "export")
    cli("export", "--source", src, "--to", dest, "--chunk-rows", "25")
    clean = _empty(_database(request, kind, tmp_path, "clean"))
    killed = _empty(_database(request, kind, tmp_path, "killed"))
    args = [sys.executable, "-m", "etl.cli", "import", "--from", dest, "--target"]
    report("import", "--from", dest, "--target", clean)
    probe = urls.open_engine(clean)
    total = chunks_done(probe)
    probe.dispose()
    assert total > 100  # enough chunks for kills to land between and inside them

    seed = int(os.environ.get("ETL_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # Two kills while the process starts and verifies the export, ten at random points of the load
    # (a random share of the chunks committed, then a random delay into the next chunk).
    plan = [("time", rng.uniform(0.05, 1.0)) for _ in range(2)] + sorted(("chunks", rng.uniform(0.02, 0.9)) for _ in range(10))
    # SQLite: a reader that waits for the writer's lock would let the run finish unwatched; ask, never wait
    watch = sa.create_engine(urls.normalize(killed), connect_args={"timeout": 0} if kind == "sqlite_url" else {})
    kills = []
    for how, point in plan:
        log = tmp_path / "stderr.txt"
        with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the run being watched
            proc = subprocess.Popen(args + [killed], stdout=subprocess.DEVNULL, stderr=err)
        if how == "time":
            time.sleep(point)
        else:
            while proc.poll() is None and chunks_done(watch) < point * total:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.05))
        alive = proc.poll() is None
        if alive:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if alive:
            kills.append(chunks_done(watch))
        assert proc.returncode in (0, -signal.SIGKILL), log.read_text()
    watch.dispose()
    mid_load = [k for k in kills if 0 < k < total]
    assert len(kills) >= 10 and len(mid_load) >= 8, f"seed {seed}: kills at chunk counts {kills} of {total}"
    last = report("import", "--from", dest, "--target", killed)
    assert last["tables"], f"seed {seed}"
    again = report("import", "--from", dest, "--target", killed)
    assert _inserted(again) == 0

    want, got = snapshot(clean), snapshot(killed)
    assert got == want, f"seed {seed}: " + ", ".join(t for t in want if got.get(t) != want[t])
    # Indexes and foreign keys a killed run had set aside for its bulk load are all back, as after the clean import.
    assert indexes(killed) == indexes(clean) == indexes(_empty(_database(request, kind, tmp_path, "fresh"))), f"seed {seed}"
    assert count(killed, ledger.DEFERRED.name) == 0
    assert not _dangling(got)
    for name in ("log", "job", "task_fail", "dag_run", "task_instance", "xcom"):
        assert count(killed, name) == count(clean, name) == count(src, name) > 0, name
        assert max(got[name].values()) == max(want[name].values()) == 1, f"{name} has duplicate rows"


def test_a_run_stopped_with_keys_set_aside_leaves_the_next_run_its_references(request, tmp_path, pg_url):
    """A stopped run can leave task_instance without its foreign keys, and the loaders learn a table's
    references from those keys. Triggers numbered away from the source's make a trigger_id that was
    not re-numbered point at nothing."""
    from etl.load.target import Target

    src = _fill(pg_url, dag_runs=40)
    dest = str(tmp_path / "export")
    cli("export", "--source", src, "--to", dest)
    target = _empty(_database(request, "pg_url", tmp_path, "stopped"))
    engine = urls.open_engine(target)
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('trigger', 'id'), 400)")
    engine.dispose()
    stopped = Target(target, source_key="stopped", quarantine=lambda *a: None)
    stopped.prepare()
    stopped.loaders_ahead(["trigger", "task_instance"])  # then the process died
    stopped.dispose()
    assert count(target, ledger.DEFERRED.name) > 0

    report("import", "--from", dest, "--target", target)
    got = snapshot(target)
    assert sum(1 for row in got["task_instance"] for col, v in row if col == "trigger_id" and v is not None) > 0
    assert not _dangling(got)
    assert indexes(target) == indexes(_empty(_database(request, "pg_url", tmp_path, "fresh")))
    assert count(target, ledger.DEFERRED.name) == 0


# -- merging into a target with a history of its own, read by real Airflow ------------------------

#: Where the target's own ids start, so that no source id lands on the same number by chance.
OFFSETS = {"dag_run": 1000, "job": 5000, "log": 3000, "task_fail": 700, "trigger": 400, "dataset": 10, "asset": 10,
           "dataset_event": 200, "asset_event": 200, "task_instance_history": 600, "task_reschedule": 800,
           "slot_pool": 20, "variable": 20, "connection": 20, "log_template": 30}


def _own_history(url: str, version: str) -> list[str]:
    """The target's own history: the source's first eight runs as its own scheduler made them, two of
    them under run ids only the target has, every id moved away from the source's. Returns those two."""
    engine = urls.open_engine(url)
    with engine.begin() as conn:  # Airflow's own defaults give way to the sample's configuration
        conn.exec_driver_sql("DELETE FROM slot_pool")
        conn.exec_driver_sql("DELETE FROM log_template")
    sample.sample(engine, version, dag_runs=8, seed=5)
    inspector = sa.inspect(engine)
    present = set(inspector.get_table_names())
    columns = {t: {c["name"] for c in inspector.get_columns(t)} for t in present}
    with engine.begin() as conn:
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")  # the moves below break FKs for a moment
        runs = [r for r, in conn.exec_driver_sql("SELECT run_id FROM dag_run ORDER BY id")]
        own = [runs[5], runs[7]]  # an etl_daily run and a ml_training run
        for name in present:
            if {"dag_id", "run_id"} <= columns[name]:
                conn.execute(sa.text(f'UPDATE "{name}" SET run_id = \'own__\' || run_id WHERE run_id IN :r')
                             .bindparams(sa.bindparam("r", expanding=True)), {"r": own})
        date = "logical_date" if "logical_date" in columns["dag_run"] else "execution_date"
        # (dag_id, logical date) is unique too: two runs of one date would be one run under two names
        conn.exec_driver_sql(f"UPDATE dag_run SET {date} = {date} - interval '1 hour' WHERE run_id LIKE 'own\\_\\_%%'")
        for name, off in OFFSETS.items():
            if name not in present or "id" not in columns[name]:
                continue
            conn.exec_driver_sql(f'UPDATE "{name}" SET id = id + {off}')
            for child, refs in REFS.items():
                for col, parent in refs.items():
                    if parent == name and child in present and col in columns[child]:
                        conn.exec_driver_sql(f'UPDATE "{child}" SET "{col}" = "{col}" + {off}')
            conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('\"{name}\"', 'id'), (SELECT max(id) FROM \"{name}\"))")
    engine.dispose()
    return ["own__" + r for r in own]


def _dag_file(folder: Path) -> Path:
    folder.mkdir()
    (folder / "etl_daily.py").write_text(
        "import datetime\n"
        "try:\n"
        "    from airflow.sdk import DAG\n"
        "    from airflow.providers.standard.operators.empty import EmptyOperator\n"
        "except ImportError:\n"
        "    from airflow import DAG\n"
        "    from airflow.operators.empty import EmptyOperator\n"
        "with DAG('etl_daily', start_date=datetime.datetime(2024, 1, 1), schedule=None, catchup=False):\n"
        "    for i in range(20):\n"
        "        EmptyOperator(task_id=f'task_{i:02d}')\n")
    return folder


def _airflow_json(version: str, args: list[str], url: str, env: dict) -> list[dict]:
    out = airflow_release.run_airflow(version, args + ["-o", "json"], url, env=env)
    return json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("[")))


def _expected_merge(name: str, before: collections.Counter, clean: collections.Counter, cols) -> collections.Counter:
    """Skip policy: rows the target had stay as they were; the source's rows it lacked are added."""
    if _key_columns(name, cols) is None:
        return before + clean  # rows with only a surrogate id: each source row once, next to the target's own
    have = _keyed(name, before)
    return before + collections.Counter(r for k, r in _keyed(name, clean).items() if k not in have)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2.10.5", NEWEST])
def test_merge_into_an_airflow_target_with_history_of_its_own(request, tmp_path, pg_url, version):
    src = _fill(_database(request, "pg_url", tmp_path, "source"), dag_runs=12)
    dest = str(tmp_path / "export")
    cli("export", "--source", src, "--to", dest, "--chunk-rows", "60")
    clean_url = _empty(_database(request, "pg_url", tmp_path, "clean"), version)
    report("import", "--from", dest, "--target", clean_url)
    clean = snapshot(clean_url)

    tgt = pg_url
    airflow_release.migrate_db(version, tgt)
    own_runs = _own_history(tgt, version)
    before = snapshot(tgt)
    merged = report("import", "--from", dest, "--target", tgt)
    after = snapshot(tgt)
    assert merged["target_airflow_version"] == version
    assert merged["tables"]["dag_run"]["existing"] == 6 and merged["tables"]["dag_run"]["inserted"] == 6
    assert not _dangling(after)
    assert {"job", "log", "dag_run", "task_instance", "xcom"} <= {t for t in after if len(after[t]) > len(before.get(t, ()))}
    for name in after:
        b, c, a = before.get(name, collections.Counter()), clean.get(name, collections.Counter()), after[name]
        cols = [col for col, _ in next(iter(a))] if a else []
        assert a == _expected_merge(name, b, c, cols), name
    assert _inserted(report("import", "--from", dest, "--target", tgt)) == 0

    engine = urls.open_engine(tgt)
    with engine.connect() as conn:
        ids = {r for r, in conn.exec_driver_sql("SELECT id FROM dag_run")}
        ours = {r: s for r, s in conn.exec_driver_sql("SELECT run_id, state FROM dag_run WHERE dag_id = 'etl_daily'")}
        new_run = conn.exec_driver_sql("SELECT run_id FROM dag_run WHERE dag_id = 'etl_daily' ORDER BY id DESC").scalar()
        tis = {run: collections.Counter(conn.execute(sa.text(
            "SELECT task_id, state FROM task_instance WHERE dag_id = 'etl_daily' AND run_id = :r"), {"r": run}).all())
            for run in (new_run, own_runs[0])}
    # one run both had, one only the target had, two only the source had (the last of them loaded last)
    assert own_runs[0] in ours and len(ours) == 4 and new_run not in {dict(r)["run_id"] for r in before["dag_run"]}

    env = {"AIRFLOW__CORE__DAGS_FOLDER": str(_dag_file(tmp_path / "dags"))}
    airflow_release.run_airflow(version, ["dags", "reserialize"], tgt, env=env)
    listed = _airflow_json(version, ["dags", "list-runs", *(["-d"] if version.startswith("2.") else []), "etl_daily"], tgt, env)
    assert {r["run_id"]: r["state"] for r in listed} == ours
    for run, want in tis.items():
        states = _airflow_json(version, ["tasks", "states-for-dag-run", "etl_daily", run], tgt, env)
        assert collections.Counter((s["task_id"], s["state"] or None) for s in states) == want, run
    airflow_release.run_airflow(version, ["dags", "trigger", "etl_daily", "--run-id", "manual__after_merge"], tgt, env=env)
    with engine.connect() as conn:
        fresh = conn.exec_driver_sql("SELECT id FROM dag_run WHERE run_id = 'manual__after_merge'").scalar_one()
        total = conn.exec_driver_sql("SELECT count(*) FROM dag_run").scalar_one()
    engine.dispose()
    assert fresh > max(ids) and fresh not in ids and total == len(ids) + 1


# -- UUIDs as the target's Airflow writes them -----------------------------------------------------

TI_UUIDS = [("task_instance", "id"), ("task_instance_history", "task_instance_id"), ("task_instance_note", "ti_id"),
            ("task_reschedule", "ti_id")]


def _airflow_python(version: str, url: str, code: str, *args: str, env: dict | None = None) -> str:
    """Run ``code`` with the release's own Python and models against ``url``; returns stdout."""
    venv = airflow_release.ensure_venv(version)
    conn = airflow_release.psycopg2_url(url)
    with tempfile.TemporaryDirectory(prefix="airflow-home-") as home:
        full = {**{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}, "AIRFLOW_HOME": home,
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn, **(env or {})}
        out = subprocess.run([str(venv / "bin" / "python"), "-c", code, *args], env=full, capture_output=True, text=True,
                             timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("kind", ["mysql_url", "sqlite_url"])
@pytest.mark.parametrize("version", ["3.1.8", NEWEST])
def test_task_instance_uuids_take_the_target_format(request, pg_url, kind, version):
    src = _fill(pg_url, dag_runs=10)
    tgt = request.getfixturevalue(kind)
    report("migrate", "--source", src, "--target", tgt, "--target-version", version)
    engine = urls.open_engine(tgt)
    with engine.connect() as conn:
        values = {(t, c): [v for v, in conn.execute(sa.text(f"SELECT {c} FROM {t}"))] for t, c in TI_UUIDS}
        tis = set(values[("task_instance", "id")])
    engine.dispose()
    hex_form = catalog.version_key(version) >= (3, 2)  # revision f8c9d7e6b5a4: CHAR(32) off PostgreSQL
    for (table, col), vals in values.items():
        assert vals, f"{table} is empty"
        assert all(len(v) == (32 if hex_form else 36) and str(uuid.UUID(v)).replace("-", "") == v.replace("-", "")
                   for v in vals), f"{table}.{col}: {vals[0]}"
    assert set(values[("task_instance_note", "ti_id")]) <= tis and set(values[("task_reschedule", "ti_id")]) <= tis
    assert _inserted(report("migrate", "--source", src, "--target", tgt)) == 0


@pytest.mark.slow
def test_airflow_finds_loaded_task_instances_by_id_on_sqlite(pg_url, tmp_path):
    src = _fill(pg_url, dag_runs=4)
    tgt = f"sqlite:///{tmp_path / 'airflow.db'}"
    airflow_release.migrate_db(NEWEST, tgt)
    report("migrate", "--source", src, "--target", tgt)
    engine = urls.open_engine(tgt)
    with engine.connect() as conn:
        pairs = conn.exec_driver_sql("SELECT id, task_id FROM task_instance ORDER BY id LIMIT 5").all()
        column = next(c for c in sa.inspect(conn).get_columns("task_instance") if c["name"] == "id")
    engine.dispose()
    assert str(column["type"]).upper() == "CHAR(32)"  # the schema real Airflow made
    code = ("import sys, uuid\n"
            "from airflow.models.taskinstance import TaskInstance\n"
            "from airflow.utils.session import create_session\n"
            "with create_session() as s:\n"
            "    for tid in sys.argv[1:]:\n"
            "        ti = s.get(TaskInstance, uuid.UUID(tid))\n"
            "        print(ti.task_id if ti else None)\n")
    found = _airflow_python(NEWEST, tgt, code, *(i for i, _ in pairs)).split()
    assert found == [t for _, t in pairs]


# -- Fernet re-keying of trigger kwargs (encrypted since Airflow 2.9) ------------------------------

#: A DateTimeTrigger's kwargs as Airflow 2.9+ serializes them before encrypting.
PLAIN_KWARGS = json.dumps({"__var": {"moment": {"__var": 1717200000.0, "__type": "datetime"}, "end_from_trigger": False},
                           "__type": "dict"})


def _triggers(url: str, key: str, other: str) -> list[str]:
    """The sampled triggers' kwargs encrypted with ``key`` as Airflow 2.9+ stores them, plus one
    encrypted with ``other`` (a second key of a MultiFernet) and one in plain JSON (Airflow reads
    kwargs starting with "{" as not encrypted). Returns every trigger's kwargs in clear."""
    engine = urls.open_engine(url)
    with engine.begin() as conn:
        sampled = [i for i, in conn.exec_driver_sql("SELECT id FROM trigger")]
        assert sampled
        conn.execute(sa.text("UPDATE trigger SET kwargs = :k WHERE id = :i"),
                     [{"k": _token(key, PLAIN_KWARGS), "i": i} for i in sampled])
        insert = sa.text("INSERT INTO trigger (classpath, kwargs, created_date) "
                         "VALUES ('airflow.triggers.temporal.DateTimeTrigger', :k, :d)")
        for kwargs in (_token(other, PLAIN_KWARGS), PLAIN_KWARGS):
            conn.execute(insert, {"k": kwargs, "d": dt.datetime(2024, 6, 1)})
    engine.dispose()
    return [PLAIN_KWARGS] * (len(sampled) + 2)


def _token(key: str, text: str) -> str:
    return Fernet(key.encode()).encrypt(text.encode()).decode()


def _loaded_kwargs(url: str) -> list[str]:
    engine = urls.open_engine(url)
    with engine.connect() as conn:
        out = [k for k, in conn.exec_driver_sql("SELECT kwargs FROM trigger")]
    engine.dispose()
    return out


def test_trigger_kwargs_are_rekeyed_and_a_wrong_key_stops_before_writing(pg_url, sqlite_url):
    src = _fill(pg_url, dag_runs=4)
    other = Fernet.generate_key().decode()
    clear = _triggers(src, KEY_OLD, other)
    tgt = _empty(sqlite_url)
    untouched = _state(tgt)
    # KEY_OLD decrypts every variable and connection, but not the trigger encrypted with the other key
    out = cli("migrate", "--source", src, "--target", tgt, f"--source-fernet-key={KEY_OLD}", f"--target-fernet-key={KEY_NEW}",
              check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "cannot decrypt trigger.kwargs of id=" in out.stderr
    assert _state(tgt) == untouched

    keys = (f"--source-fernet-key={KEY_OLD},{other}", f"--target-fernet-key={KEY_NEW}")
    rep = report("migrate", "--source", src, "--target", tgt, *keys)
    assert rep["tables"]["trigger"]["inserted"] == len(clear)
    loaded = _loaded_kwargs(tgt)
    new = Fernet(KEY_NEW.encode())
    assert sorted(k if k.startswith("{") else new.decrypt(k.encode()).decode() for k in loaded) == clear
    assert sum(k.startswith("{") for k in loaded) == 1  # the plain one stays plain; every token is the new key's
    assert _inserted(report("migrate", "--source", src, "--target", tgt, *keys)) == 0  # same tokens again


@pytest.mark.slow
def test_airflow_reads_rekeyed_trigger_kwargs_with_its_own_key(pg_url, tmp_path):
    src = _fill(pg_url, dag_runs=4)
    other = Fernet.generate_key().decode()
    _triggers(src, KEY_OLD, other)
    tgt = f"sqlite:///{tmp_path / 'airflow.db'}"
    airflow_release.migrate_db("2.10.5", tgt)
    report("migrate", "--source", src, "--target", tgt, f"--source-fernet-key={KEY_OLD},{other}",
           f"--target-fernet-key={KEY_NEW}")
    code = ("from airflow.models.trigger import Trigger\n"
            "from airflow.utils.session import create_session\n"
            "with create_session() as s:\n"
            "    for t in s.query(Trigger).order_by(Trigger.id):\n"
            "        print(sorted(t.kwargs))\n")
    read = _airflow_python("2.10.5", tgt, code, env={"AIRFLOW__CORE__FERNET_KEY": KEY_NEW}).splitlines()
    assert read and all("moment" in line for line in read) and len(read) == len(_loaded_kwargs(tgt))


def _state(url: str) -> tuple:
    """Every table and its rows: what "the target is unchanged" compares."""
    engine = urls.open_engine(url)
    names = sorted(sa.inspect(engine).get_table_names())
    with engine.connect() as conn:
        rows = {n: sorted(map(repr, conn.execute(sa.text(f'SELECT * FROM "{n}"')).all())) for n in names}
    engine.dispose()
    return names, rows


# -- dataset aliases: the dry run predicts what the load does --------------------------------------

def _aliases(url: str, own: bool) -> None:
    """Aliases and their links to datasets and events; ``own``: the target's, under ids the source also uses."""
    engine = urls.open_engine(url)
    now = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
    with engine.begin() as conn:
        if own:
            conn.execute(sa.text("INSERT INTO dataset (id, uri, extra, created_at, updated_at, is_orphaned) "
                                 "VALUES (1, 's3://other/own', '{}', :t, :t, false)"), {"t": now})
            conn.execute(sa.text("INSERT INTO dataset_event (id, dataset_id, extra, timestamp) VALUES (1, 1, '{}', :t)"), {"t": now})
            conn.exec_driver_sql("INSERT INTO dataset_alias (id, name) VALUES (1, 'own-alias'), (2, 'shared-alias')")
            conn.exec_driver_sql("INSERT INTO dataset_alias_dataset (alias_id, dataset_id) VALUES (1, 1)")
            conn.exec_driver_sql("INSERT INTO dataset_alias_dataset_event (alias_id, event_id) VALUES (1, 1)")
            for name in ("dataset", "dataset_event", "dataset_alias"):
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))")
        else:
            # ids after whatever the sample holds (max + 1: the sample writes explicit ids)
            for run_id, uri in conn.exec_driver_sql("SELECT r.run_id, d.uri FROM dag_run r, dataset d ORDER BY r.id, d.id LIMIT 3").all():
                conn.execute(sa.text("INSERT INTO dataset_event (id, dataset_id, extra, source_task_id, source_dag_id, source_run_id, "
                                     "source_map_index, timestamp) SELECT (SELECT coalesce(max(id), 0) + 1 FROM dataset_event), id, "
                                     "'{}', 'task_05', 'etl_daily', :r, -1, :t FROM dataset WHERE uri = :u"), {"r": run_id, "u": uri, "t": now})
            for name in ("shared-alias", "source-alias"):
                conn.execute(sa.text("INSERT INTO dataset_alias (id, name) SELECT coalesce(max(id), 0) + 1, :n FROM dataset_alias"), {"n": name})
            link = "SELECT a.id, d.id FROM dataset_alias a, dataset d WHERE a.name = :a AND d.uri = :u"
            for alias, uri in (("shared-alias", "s3://lake/raw"), ("source-alias", "s3://lake/raw"), ("source-alias", "s3://lake/clean")):
                conn.execute(sa.text(f"INSERT INTO dataset_alias_dataset (alias_id, dataset_id) {link}"), {"a": alias, "u": uri})
            conn.exec_driver_sql("INSERT INTO dataset_alias_dataset_event (alias_id, event_id) SELECT a.id, e.id "
                                 "FROM dataset_alias a, dataset_event e WHERE a.name = 'source-alias' AND e.source_task_id = 'task_05'")
    engine.dispose()


def _alias_links(url: str) -> tuple[list, list]:
    engine = urls.open_engine(url)
    with engine.connect() as conn:
        datasets = sorted(conn.exec_driver_sql(
            "SELECT a.name, d.uri FROM dataset_alias_dataset l JOIN dataset_alias a ON a.id = l.alias_id "
            "JOIN dataset d ON d.id = l.dataset_id").all())
        events = sorted(conn.exec_driver_sql(
            "SELECT a.name, e.source_run_id, e.source_task_id, d.uri FROM dataset_alias_dataset_event l "
            "JOIN dataset_alias a ON a.id = l.alias_id JOIN dataset_event e ON e.id = l.event_id "
            "JOIN dataset d ON d.id = e.dataset_id").all())
    engine.dispose()
    return datasets, events


def test_dry_run_predicts_dataset_alias_links_on_postgresql(request, tmp_path, pg_url):
    src = _fill(pg_url, dag_runs=9)
    _aliases(src, own=False)
    dest = str(tmp_path / "export")
    cli("export", "--source", src, "--to", dest)
    tgt = _empty(_database(request, "pg_url", tmp_path, "target"))
    _aliases(tgt, own=True)
    own_links = _alias_links(tgt)

    predicted = json.loads(cli("diff", "--source", dest, "--target", tgt, "--json").stdout)["tables"]
    done = report("import", "--from", dest, "--target", tgt)["tables"]
    for name in ("dataset_alias", "dataset_alias_dataset", "dataset_alias_dataset_event"):
        assert "quarantined" not in predicted[name] and "quarantined" not in done[name], name
        assert predicted[name]["insert"] == done[name]["inserted"] > 0, name
    assert done["dataset_alias"]["existing"] == 1  # shared-alias was the target's already
    src_datasets, src_events = _alias_links(src)
    datasets, events = _alias_links(tgt)
    assert datasets == sorted(set(src_datasets) | set(own_links[0]))
    assert events == sorted(src_events + own_links[1])
    assert cli("diff", "--source", dest, "--target", tgt).returncode == 0


def test_a_diff_against_the_source_database_meets_rows_keyed_by_uuid(request, pg_server, pg_url, tmp_path):
    """The diff that gates a cutover, run against the source database rather than the export: nothing is
    skipped by the ledger's chunks there, and PostgreSQL's uuid keys (3.x task_instance_note, history) must
    meet the mapped text ids, or every such row shows as missing."""
    cli("sample", "--airflow-version", "2.10.5", "--target", pg_url, "--dag-runs", "12", "--faults")
    dest = str(tmp_path / "export")
    cli("export", "--source", pg_url, "--to", dest, "--chunk-rows", "100")
    target = pg_server.create()
    request.addfinalizer(lambda: pg_server.drop(target))
    cli("import", "--from", dest, "--target", target, "--target-version", "3.0.6")
    out = cli("diff", "--source", pg_url, "--target", target, "--json")
    tables_ = json.loads(out.stdout)["tables"]
    assert out.returncode == 0, {t: c for t, c in tables_.items() if c.get("insert") or c.get("only_in_target")}
    for name in ("task_instance_note", "task_instance_history"):
        assert tables_[name]["in_target"] == tables_[name]["source"] > 0, (name, tables_[name])


# -- bad input: one line, exit 1, the target as it was ---------------------------------------------

def test_bad_input_is_one_line_exit_1_and_leaves_the_target_unchanged(pg_url, sqlite_url, tmp_path):
    src = _fill(pg_url, dag_runs=3)
    dest = tmp_path / "export"
    cli("export", "--source", src, "--to", str(dest))
    tgt = _empty(sqlite_url)
    old = _empty(f"sqlite:///{tmp_path / 'old.db'}", "2.0.2")
    untouched = {tgt: _state(tgt), old: _state(old)}
    chunk = dest / "task_instance" / "task_instance.000000.parquet"
    good, manifest = chunk.read_bytes(), (dest / "manifest.json").read_text()

    def fails(*args, target=tgt, says):
        out = cli("import", "--from", str(dest), "--target", target, *args, check=False)
        assert out.returncode == 1 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
        assert all(s in out.stderr for s in says), out.stderr
        assert _state(target) == untouched[target]

    wrong = Fernet.generate_key().decode()
    fails(f"--source-fernet-key={wrong}", f"--target-fernet-key={KEY_NEW}", says=["cannot decrypt variable.val of key="])
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    chunk.write_bytes(bytes(flipped))
    fails(says=["task_instance.000000.parquet", "corrupt or truncated"])
    chunk.write_bytes(good[: len(good) // 3])
    fails(says=["task_instance.000000.parquet", "corrupt or truncated"])
    chunk.write_bytes(good)
    newer = json.loads(manifest)
    newer.update(manifest_version=newer["manifest_version"] + 1, engine_version="99.0.0")
    (dest / "manifest.json").write_text(json.dumps(newer))
    fails(says=["manifest.json", "engine 99.0.0"])
    (dest / "manifest.json").write_text(manifest)
    fails(target=old, says=["Airflow 2.0.2, is older than the source, Airflow 2.10.5"])
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    untouched[empty] = ([], {})
    fails("--target-version", "2.0.2", target=empty, says=["older than the source"])
    assert _inserted(report("import", "--from", str(dest), "--target", tgt)) > 0  # the same export, repaired, loads
