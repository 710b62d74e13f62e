"""Import, migrate and diff end to end, on real servers: exactly once, in sync, and refusing bad input."""
from __future__ import annotations

import datetime as dt
import json
import os

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from etl import catalog, sample, urls
from helpers import cli, count, report, rows

KEY_OLD, KEY_NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()
DIALECTS = ["pg_url", "mysql_url", "sqlite_url"]


def _fill(url, version="2.10.5", dag_runs=10, seed=5, faults=False):
    engine = urls.open_engine(url, create=True)
    sample.sample(engine, version, dag_runs=dag_runs, seed=seed, fernet_key=KEY_OLD, faults=faults)
    engine.dispose()
    return url


def _inserted(rep: dict) -> dict:
    return {t: v.get("inserted", 0) for t, v in rep["tables"].items() if v.get("inserted")}


@pytest.mark.parametrize("source_kind", DIALECTS)
@pytest.mark.parametrize("target_kind", DIALECTS)
def test_every_dialect_pair(request, source_kind, target_kind):
    src = _fill(request.getfixturevalue(source_kind))
    tgt = request.getfixturevalue(target_kind)
    if target_kind == source_kind:  # a second database of the same kind
        if target_kind == "sqlite_url":
            tgt = tgt.replace("airflow.db", "target.db")
        else:
            server = request.getfixturevalue("pg_server" if target_kind == "pg_url" else "mysql_server")
            tgt = server.create()
            request.addfinalizer(lambda: server.drop(tgt))
    first = report("migrate", "--source", src, "--target", tgt, "--target-version", "2.10.5")
    for table in ("dag_run", "task_instance", "xcom", "log", "job", "variable"):
        assert count(tgt, table) == count(src, table), table
    assert rows(tgt, "task_instance", ["dag_id", "task_id", "run_id", "map_index", "state", "try_number"]) == \
           rows(src, "task_instance", ["dag_id", "task_id", "run_id", "map_index", "state", "try_number"])
    assert sum(_inserted(first).values()) > 0
    again = report("migrate", "--source", src, "--target", tgt)
    assert _inserted(again) == {}


def test_diff_predicts_the_migrate_then_reports_in_sync(pg_url, sqlite_url):
    src = _fill(sqlite_url, dag_runs=12)
    engine = urls.open_engine(pg_url)
    catalog.create_empty(engine, "2.10.5")
    engine.dispose()
    predicted = cli("diff", "--source", src, "--target", pg_url, "--json")
    assert predicted.returncode == 3
    plan = {t: v.get("insert", 0) for t, v in json.loads(predicted.stdout)["tables"].items() if v.get("insert")}
    done = _inserted(report("migrate", "--source", src, "--target", pg_url))
    assert plan == done and done["task_instance"] > 0
    assert cli("diff", "--source", src, "--target", pg_url).returncode == 0
    # New history in the source: the diff shows exactly it, and a second migrate loads only it.
    sample.sample(urls.open_engine(src), "2.10.5", dag_runs=3, seed=99)
    added = json.loads(cli("diff", "--source", src, "--target", pg_url, "--json").stdout)["tables"]
    again = _inserted(report("migrate", "--source", src, "--target", pg_url))
    assert {t: v["insert"] for t, v in added.items() if v.get("insert")} == again
    assert again["dag_run"] == 3


def test_export_import_twice_writes_nothing_the_second_time(pg_url, sqlite_url, tmp_path):
    src = _fill(pg_url)
    dest = str(tmp_path / "x")
    cli("export", "--source", src, "--to", dest)
    tgt = sqlite_url
    first = report("import", "--from", dest, "--target", tgt, "--target-version", "2.10.5")
    second = report("import", "--from", dest, "--target", tgt)
    assert sum(_inserted(first).values()) > 0 and _inserted(second) == {}
    assert count(tgt, "log") == count(src, "log") and count(tgt, "job") == count(src, "job")


def test_merge_into_a_target_with_history_of_its_own(pg_url, mysql_url):
    src = _fill(pg_url, dag_runs=10, seed=5)
    tgt = _fill(mysql_url, dag_runs=6, seed=5)  # the same first six runs as the source
    engine = urls.open_engine(tgt)
    with engine.begin() as conn:  # a run only the target has: the source's later runs get other ids here
        conn.exec_driver_sql("INSERT INTO dag_run (dag_id, run_id, run_type, execution_date, clear_number) "
                             "VALUES ('target_only', 'manual__x', 'manual', '2020-01-01', 0)")
    engine.dispose()
    before_runs = count(tgt, "dag_run") - 1
    rep = report("migrate", "--source", src, "--target", tgt)
    assert rep["tables"]["dag_run"]["existing"] == before_runs and rep["tables"]["dag_run"]["inserted"] == 10 - before_runs
    # every xcom row points at the dag run with its own (dag_id, run_id)
    engine = urls.open_engine(tgt)
    with engine.connect() as conn:
        bad = conn.execute(sa.text("SELECT count(*) FROM xcom x JOIN dag_run d ON d.id = x.dag_run_id "
                                   "WHERE d.dag_id <> x.dag_id OR d.run_id <> x.run_id")).scalar()
        orphans = conn.execute(sa.text("SELECT count(*) FROM xcom x LEFT JOIN dag_run d ON d.id = x.dag_run_id WHERE d.id IS NULL")).scalar()
    engine.dispose()
    assert bad == 0 and orphans == 0
    assert count(tgt, "dag_run") == 11


def test_fernet_rekeying_and_wrong_key(pg_url, sqlite_url):
    src = _fill(pg_url, dag_runs=2)
    wrong = Fernet.generate_key().decode()
    out = cli("migrate", "--source", src, "--target", sqlite_url, "--target-version", "2.10.5",
              f"--source-fernet-key={wrong}", f"--target-fernet-key={KEY_NEW}", check=False)
    assert out.returncode == 1 and "cannot decrypt variable.val" in out.stderr and out.stderr.count("\n") == 1
    assert sa.inspect(urls.open_engine(sqlite_url)).get_table_names() == []  # nothing written, not even the schema
    cli("migrate", "--source", src, "--target", sqlite_url, "--target-version", "2.10.5",
        f"--source-fernet-key={KEY_OLD}", f"--target-fernet-key={KEY_NEW}")
    old = dict(rows(src, "variable", ["key", "val"]))
    new = dict(rows(sqlite_url, "variable", ["key", "val"]))
    for key, token in new.items():
        if token != old[key]:
            assert Fernet(KEY_NEW.encode()).decrypt(token.encode()) == Fernet(KEY_OLD.encode()).decrypt(old[key].encode())


def test_bad_packages_and_versions_leave_the_target_unchanged(pg_url, sqlite_url, tmp_path):
    src = _fill(pg_url, dag_runs=2)
    dest = tmp_path / "x"
    cli("export", "--source", src, "--to", str(dest))
    engine = urls.open_engine(sqlite_url, create=True)
    catalog.create_empty(engine, "2.10.5")
    engine.dispose()
    chunk = dest / "task_instance" / "task_instance.000000.parquet"
    good = chunk.read_bytes()
    chunk.write_bytes(good[: len(good) // 2])
    out = cli("import", "--from", str(dest), "--target", sqlite_url, check=False)
    assert out.returncode == 1 and "corrupt or truncated" in out.stderr and "task_instance.000000.parquet" in out.stderr
    chunk.write_bytes(good)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["manifest_version"] = 99
    (dest / "manifest.json").write_text(json.dumps(manifest))
    out = cli("import", "--from", str(dest), "--target", sqlite_url, check=False)
    assert out.returncode == 1 and "manifest version 99" in out.stderr
    old = tmp_path / "old.db"
    engine = urls.open_engine(f"sqlite:///{old}", create=True)
    catalog.create_empty(engine, "2.0.2")
    engine.dispose()
    out = cli("migrate", "--source", src, "--target", f"sqlite:///{old}", check=False)
    assert out.returncode == 1 and "older than the source" in out.stderr
    assert count(sqlite_url, "dag_run") == 0 and count(f"sqlite:///{old}", "dag_run") == 0


def test_live_scheduler_blocks_writing_unless_forced(pg_url, sqlite_url):
    src = _fill(pg_url, dag_runs=1)
    engine = urls.open_engine(sqlite_url, create=True)
    catalog.create_empty(engine, "2.10.5")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO job (job_type, state, hostname, latest_heartbeat) "
                             "VALUES ('SchedulerJob', 'running', 'sched-1', strftime('%Y-%m-%d %H:%M:%f', 'now'))")
    engine.dispose()
    out = cli("migrate", "--source", src, "--target", sqlite_url, check=False)
    assert out.returncode == 1 and "scheduler on sched-1 is alive" in out.stderr
    cli("migrate", "--source", src, "--target", sqlite_url, "--force")
    assert count(sqlite_url, "dag_run") == 1


def test_1_10_to_newest_3x_quarantines_instead_of_dropping(pg_url, tmp_path):
    src = _fill(pg_url, version="1.10.15", dag_runs=15, faults=True)
    tgt = f"sqlite:///{tmp_path / 't.db'}"
    via = str(tmp_path / "via")
    rep = report("migrate", "--source", src, "--target", tgt, "--target-version", catalog.versions()[-1], "--via", via)
    t = rep["tables"]
    for table in ("task_instance", "xcom", "connection"):
        assert t[table]["source"] == t[table].get("inserted", 0) + t[table].get("quarantined", 0), table
    assert t["task_instance"]["quarantined"] > 0  # orphans without a dag run
    assert rep["quarantine"].startswith(os.path.join(via, "quarantine", ""))  # beside the staged copy, named by the report
    quarantined = os.listdir(rep["quarantine"])
    assert {"task_instance", "xcom", "connection"} <= set(quarantined)
    assert cli("diff", "--source", src, "--target", tgt).returncode == 0


@pytest.mark.parametrize("target_kind", DIALECTS)
def test_what_airflow_keeps_aside_the_target_keeps_too_and_only_once(request, pg_url, target_kind):
    """Airflow's own upgrade keeps dangling rows in _airflow_moved__* tables (as the database held them before
    it upgraded) and 3.0 keeps pickled xcom values in _xcom_archive: a 3.x target gets the same tables with the
    rows the quarantine names them for, and a second run adds none (tests/test_oracle.py compares them with
    Airflow's own)."""
    src = _fill(pg_url, version="1.10.15", dag_runs=15, faults=True)
    tgt = request.getfixturevalue(target_kind)
    if target_kind == "pg_url":
        server = request.getfixturevalue("pg_server")
        tgt = server.create()
        request.addfinalizer(lambda: server.drop(tgt))
    first = report("migrate", "--source", src, "--target", tgt, "--target-version", "3.0.6")
    kept = {t: v["inserted"] for t, v in first["tables"].items() if t.startswith("_airflow_moved__") or t == "_xcom_archive"}
    named = {}
    for note in first["notes"]:
        for table in kept:
            if note.startswith("quarantined ") and f"moves it to {table} " in note:
                named[table] = named.get(table, 0) + int(note.split()[1])
    assert kept == named and kept["_xcom_archive"] > 0 and kept["_airflow_moved__2_2__dangling__task_instance"] > 0
    assert {t: count(tgt, t) for t in kept} == kept
    def utc(found):  # MySQL and SQLite give naive UTC
        return {r[:2] + (r[2].replace(tzinfo=dt.timezone.utc) if r[2].tzinfo is None else r[2],) for r in found}

    key = ["dag_id", "task_id", "execution_date"]
    assert utc(rows(tgt, "_airflow_moved__2_2__dangling__task_instance", key)) <= utc(rows(src, "task_instance", key)), \
        "the source's own rows, as they were"
    archived_runs = {r[0] for r in rows(tgt, "_xcom_archive", ["dag_run_id"])}
    assert archived_runs <= {r[0] for r in rows(tgt, "dag_run", ["id"])}, "dag_run_id names the target's runs"
    # The source grows: its task instances' chunk is cut anew, dangling rows and all; none arrives twice.
    engine = urls.open_engine(src)
    with engine.begin() as conn:
        ti = sa.Table("task_instance", sa.MetaData(), autoload_with=conn)
        run = conn.execute(sa.text("SELECT dag_id, execution_date FROM dag_run WHERE dag_id IS NOT NULL "
                                   "AND execution_date IS NOT NULL LIMIT 1")).one()
        row = dict(conn.execute(sa.select(ti).where(ti.c.dag_id == run.dag_id, ti.c.execution_date == run.execution_date)
                                .limit(1)).mappings().one())
        conn.execute(ti.insert().values({**row, "task_id": "added_later"}))
    engine.dispose()
    again = report("migrate", "--source", src, "--target", tgt, "--target-version", "3.0.6")
    assert again["tables"]["task_instance"]["inserted"] == 1
    assert all(again["tables"][t].get("inserted", 0) == 0 for t in kept)
    assert {t: count(tgt, t) for t in kept} == kept
    assert cli("diff", "--source", src, "--target", tgt).returncode == 0
