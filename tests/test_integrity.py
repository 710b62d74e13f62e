"""A hostile user's tries (issue 15), on real PostgreSQL and MariaDB: a live source, the source
reached under another URL, a merge with the default options, altered manifests, zero dates, a
second writer, a database that is not Airflow's, SIGTERM, an orphan in a source without foreign
keys.

Each ends as the engine promises: one clear line and exit 1 with the target as it was, or a
target where ``diff`` exits 0, every table holds the source's rows less those quarantined, every
index and foreign key of the schema is in place, and no row that only a surrogate id names
(job, log, trigger, task_fail, task_reschedule) is there twice.
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import catalog, sample, tables, urls
from helpers import LiveWriter, chunks_done, cli, count, indexes, report, rows

VERSION = "2.10.5"
#: Tables whose rows only a surrogate id names, with the columns that hold target-assigned ids.
SURROGATE_ONLY = {"job": ("id",), "log": ("id",), "trigger": ("id", "triggerer_id"), "task_fail": ("id",),
                  "task_reschedule": ("id",)}


def _fill(url: str, dag_runs: int = 20, seed: int = 5) -> str:
    engine = urls.open_engine(url, create=True)
    sample.sample(engine, VERSION, dag_runs=dag_runs, seed=seed)
    engine.dispose()
    return url


def _empty(url: str) -> str:
    engine = urls.open_engine(url, create=True)
    catalog.create_empty(engine, VERSION)
    engine.dispose()
    return url


def _another(request, kind: str = "pg") -> str:
    """One more empty database on the PostgreSQL (``pg``) or MariaDB (``mysql``) server, dropped after the test."""
    server = request.getfixturevalue(f"{kind}_server")
    url = server.create()
    request.addfinalizer(lambda: server.drop(url))
    return url


def _history(url: str) -> dict[str, int]:
    engine = urls.open_engine(url)
    names = tables.select(sa.inspect(engine).get_table_names())
    engine.dispose()
    return {t: count(url, t) for t in names}


def _content(url: str, table: str) -> collections.Counter:
    """The rows of ``table`` without their surrogate ids, as a multiset."""
    engine = urls.open_engine(url)
    columns = [c["name"] for c in sa.inspect(engine).get_columns(table) if c["name"] not in SURROGATE_ONLY[table]]
    engine.dispose()
    return collections.Counter(repr(tuple(_plain(v) for v in r)) for r in rows(url, table, columns))


def _plain(value):
    """A value as every server gives it back: instants in UTC, booleans as integers."""
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


def _settled(source: str, target: str, cwd, quarantined: dict | None = None, fresh: str | None = None) -> None:
    """The issue's "afterwards", for a target that held nothing before: in sync, complete, intact."""
    quarantined = quarantined or {}
    out = cli("diff", "--source", source, "--target", target, "--json", check=False, cwd=cwd)
    assert out.returncode == 0, out.stderr + out.stdout[-3000:]
    if urls.is_database_url(source):
        theirs = _history(source)
    else:  # an export: its manifest holds what the source held
        manifest = json.loads((Path(source) / "manifest.json").read_text())
        theirs = {t: spec["rows"] for t, spec in manifest["tables"].items()}
    ours = {t: count(target, t) for t in theirs}
    assert {t: ours[t] + quarantined.get(t, 0) for t in theirs} == theirs
    assert indexes(target) == indexes(fresh), "an index or foreign key is missing"
    if urls.is_database_url(source):
        for table in SURROGATE_ONLY:
            if table in theirs:
                mine, source_rows = _content(target, table), _content(source, table)
                if quarantined.get(table):
                    assert not mine - source_rows, f"{table}: rows loaded twice"
                else:
                    assert mine == source_rows, f"{table}: rows loaded twice or not at all"


def _quarantined(rep: dict) -> dict[str, int]:
    return {t: v["quarantined"] for t, v in rep["tables"].items() if v.get("quarantined")}


def _inserted(rep: dict) -> int:
    return sum(v.get("inserted", 0) + v.get("updated", 0) for v in rep["tables"].values())


def _one_line(out: subprocess.CompletedProcess, *says: str) -> None:
    assert out.returncode == 1 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert all(s in out.stderr for s in says), out.stderr


class _started(subprocess.Popen):
    """The CLI in the background, its output in files (a pipe nobody reads would stall it)."""

    def __init__(self, cwd: Path, *args: str):
        self.log = cwd / f"{args[0]}.{time.monotonic_ns()}.err"
        with open(self.log, "w") as err:
            super().__init__([sys.executable, "-m", "etl.cli", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)

    def err(self) -> str:
        return self.log.read_text()


def _migrating(cwd: Path, source: str, target: str) -> _started:
    """A migrate in the background, once it has loaded a task_instance chunk: mid-load, with tables
    set aside and much still to come."""
    proc = _started(cwd, "migrate", "--source", source, "--target", target, "--chunk-rows", "200")
    watch = urls.open_engine(target)
    deadline = time.monotonic() + 120
    while proc.poll() is None and chunks_done(watch, "task_instance") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    watch.dispose()
    assert proc.poll() is None, f"the migrate ended before a task_instance chunk was seen: {proc.err()}"
    return proc


def _state(url: str) -> dict:
    engine = urls.open_engine(url)
    names = sorted(sa.inspect(engine).get_table_names())
    engine.dispose()
    return {t: count(url, t) for t in names}


# -- 1. a live source ------------------------------------------------------------------------------

def _more_history(engine: sa.Engine, n: int) -> None:
    """The old environment still running: one more dag run, with its task instances, xcoms, logs and
    jobs, in one transaction."""
    sample.sample(engine, VERSION, dag_runs=1, seed=5)


@pytest.mark.parametrize("kind", ["pg", "mysql"])
def test_a_live_source_is_exported_and_migrated_as_one_cut(request, tmp_path, kind):
    src = _fill(_another(request, kind), dag_runs=60)
    fresh = _empty(_another(request))
    via_export, direct = _empty(_another(request)), _empty(_another(request))
    dest = tmp_path / "export"
    with LiveWriter(src, _more_history) as writer:
        before = writer.runs
        cli("export", "--source", src, "--to", str(dest), "--chunk-rows", "200", cwd=tmp_path)
        during_export = writer.runs - before
        imported = report("import", "--from", str(dest), "--target", via_export, cwd=tmp_path)
        before = writer.runs
        migrated = report("migrate", "--source", src, "--target", direct, "--chunk-rows", "200", cwd=tmp_path)
        during_migrate = writer.runs - before
    assert writer.error is None and during_export > 0 and during_migrate > 0, (during_export, during_migrate)
    manifest = json.loads((dest / "manifest.json").read_text())
    cut = manifest["cut"]["marks"]
    assert manifest["tables"]["dag_run"]["rows"] < count(src, "dag_run")
    # One cut: every exported task instance's run is exported, and nothing was set aside for it.
    assert _quarantined(imported) == {} and _quarantined(migrated) == {}
    assert count(via_export, "dag_run") == manifest["tables"]["dag_run"]["rows"] == cut["dag_run"]
    assert indexes(via_export) == indexes(direct) == indexes(fresh)
    # The writer stopped: the next run brings what came after the cut, the export's target too.
    for target in (via_export, direct):
        rep = report("migrate", "--source", src, "--target", target, cwd=tmp_path)
        assert rep["tables"]["dag_run"]["inserted"] > 0
        _settled(src, target, tmp_path, fresh=fresh)


# -- 2. one source, however its URL is written -------------------------------------------------------

def test_one_source_under_three_urls_and_as_a_restored_copy_loads_once(request, tmp_path, pg_server, pg_url):
    src = _fill(pg_url, dag_runs=20)
    target, fresh = _empty(_another(request)), _empty(_another(request))
    url = sa.engine.make_url(src)
    default = None if (url.port or 5432) == 5432 else url.port
    spellings = [url.set(host="127.0.0.1", port=default), url.set(host="127.0.0.1", port=url.port or 5432),
                 url.set(host="localhost")]
    copy = pg_server.create(template=src)  # a restored dump: another database, the same history
    request.addfinalizer(lambda: pg_server.drop(copy))
    reached = [u.render_as_string(hide_password=False) for u in spellings] + [copy]
    keys = set()
    for i, spelled in enumerate(reached):
        rep = report("migrate", "--source", spelled, "--target", target, "--on-conflict", "update", cwd=tmp_path)
        keys.add(rep["source_key"])
        assert i == 0 or rep["tables"]["job"].get("inserted", 0) == 0, spelled
    assert len(keys) == 1
    for spelled in reached:
        assert cli("diff", "--source", spelled, "--target", target, check=False, cwd=tmp_path).returncode == 0, spelled
    _settled(src, target, tmp_path, fresh=fresh)
    # A row only in the target that came from this source is a difference, not "in sync".
    engine = urls.open_engine(src)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM log WHERE id = (SELECT max(id) FROM log)")
    engine.dispose()
    out = cli("diff", "--source", src, "--target", target, "--json", check=False, cwd=tmp_path)
    assert out.returncode == 3 and json.loads(out.stdout)["tables"]["log"]["gone_from_source"] == 1


# -- 3. a merge with the default options ---------------------------------------------------------------

def test_a_second_source_merges_into_a_target_with_history_with_the_default_options(request, tmp_path, pg_url):
    src = _fill(pg_url, dag_runs=12, seed=5)
    target = _fill(_another(request), dag_runs=6, seed=7)  # the same pools and first six runs, its own jobs and logs
    fresh = _empty(_another(request))
    keys = ["dag_id", "run_id"]
    runs = set(rows(src, "dag_run", keys)) | set(rows(target, "dag_run", keys))
    pools = set(rows(src, "slot_pool", ["pool"])) | set(rows(target, "slot_pool", ["pool"]))
    own = {t: _content(target, t) for t in SURROGATE_ONLY}
    rep = report("migrate", "--source", src, "--target", target, cwd=tmp_path)
    assert rep["tables"]["slot_pool"].get("existing", 0) > 0 and rep["tables"]["dag_run"]["inserted"] == 6
    assert set(rows(target, "dag_run", keys)) == runs and set(rows(target, "slot_pool", ["pool"])) == pools
    for table in SURROGATE_ONLY:
        assert _content(target, table) == own[table] + _content(src, table), table
    assert _inserted(report("migrate", "--source", src, "--target", target, cwd=tmp_path)) == 0
    assert cli("diff", "--source", src, "--target", target, check=False, cwd=tmp_path).returncode == 0
    assert indexes(target) == indexes(fresh)


# -- 4. a manifest that does not match its files ------------------------------------------------------

def _raise_table_rows(m, dest):
    m["tables"]["task_instance"]["rows"] += 1


def _raise_chunk_rows(m, dest):
    m["tables"]["task_instance"]["rows"] += 1
    m["tables"]["task_instance"]["chunks"][0]["rows"] += 1


def _add_a_table(m, dest):
    m["tables"]["nosuch"] = m["tables"]["variable"]
    m["identity"]["tables"].append("nosuch")


def _change_a_type(m, dest):
    field = next(f for f in m["tables"]["task_instance"]["schema"] if f["name"] == "try_number")
    field["type"] = "string"


def _drop_dag_run(m, dest):
    del m["tables"]["dag_run"]


def _chunk_of(other):
    def swap(m, dest):
        theirs = json.loads((other / "manifest.json").read_text())["tables"]["task_instance"]["chunks"][0]
        shutil.copy(other / theirs["file"], dest / theirs["file"])
        m["tables"]["task_instance"]["chunks"][0].update({k: theirs[k] for k in ("sha256", "rows", "bytes")})
        m["tables"]["task_instance"]["rows"] = sum(c["rows"] for c in m["tables"]["task_instance"]["chunks"])
    return swap


def test_import_checks_the_whole_manifest_before_writing(request, tmp_path, pg_url):
    src = _fill(pg_url, dag_runs=20)
    dest, other = tmp_path / "export", tmp_path / "other"
    cli("export", "--source", src, "--to", str(dest), "--chunk-rows", "100", cwd=tmp_path)
    cli("export", "--source", src, "--to", str(other), "--chunk-rows", "100", cwd=tmp_path)
    target, fresh = _empty(_another(request)), _empty(_another(request))
    untouched = _state(target)
    alterations = [(_raise_table_rows, "table task_instance claims"), (_raise_chunk_rows, "the manifest says"),
                   (_add_a_table, "table nosuch is not an Airflow 2.10.5 table"),
                   (_change_a_type, "task_instance.try_number is string in the manifest"),
                   (_drop_dag_run, "lists no dag_run"), (_chunk_of(other), "was not written by this export")]
    for alter, says in alterations:
        altered = tmp_path / alter.__name__
        shutil.copytree(dest, altered)
        manifest = json.loads((altered / "manifest.json").read_text())
        alter(manifest, altered)
        (altered / "manifest.json").write_text(json.dumps(manifest))
        _one_line(cli("import", "--from", str(altered), "--target", target, check=False, cwd=tmp_path), says)
        assert _state(target) == untouched, alter.__name__
    rep = report("import", "--from", str(dest), "--target", target, cwd=tmp_path)
    assert _inserted(rep) > 0 and _quarantined(rep) == {}
    _settled(str(dest), target, tmp_path, fresh=fresh)
    _settled(src, target, tmp_path, fresh=fresh)


# -- 5. errors that are one line, before anything is written ------------------------------------------

def test_a_mysql_zero_date_is_read_as_null_with_a_note(request, tmp_path, mysql_url):
    src = _fill(mysql_url, dag_runs=8)
    engine = urls.open_engine(src)
    with engine.begin() as conn:
        conn.exec_driver_sql("SET SESSION sql_mode = ''")  # as an old, relaxed server let them in
        conn.exec_driver_sql("UPDATE dag_run SET end_date = '0000-00-00 00:00:00' WHERE end_date IS NOT NULL "
                             "ORDER BY id LIMIT 2")
        zeros = conn.exec_driver_sql("SELECT dag_id, run_id FROM dag_run WHERE end_date = '0000-00-00 00:00:00'").all()
    engine.dispose()
    assert len(zeros) == 2
    target, fresh = _empty(_another(request)), _empty(_another(request))
    rep = report("migrate", "--source", src, "--target", target, cwd=tmp_path)
    assert any(n.startswith("dag_run.end_date: 2 MySQL zero dates") for n in rep["notes"]), rep["notes"]
    loaded = {(d, r): end for d, r, end in rows(target, "dag_run", ["dag_id", "run_id", "end_date"])}
    assert [loaded[tuple(z)] for z in zeros] == [None, None] and sum(v is None for v in loaded.values()) > 2
    _settled(src, target, tmp_path, fresh=fresh)


@pytest.mark.parametrize("kind", ["pg", "mysql"])
def test_a_second_writer_on_one_target_is_refused_up_front(request, tmp_path, pg_url, kind):
    src = _fill(pg_url, dag_runs=300)
    target, fresh = _empty(_another(request, kind)), _empty(_another(request, kind))
    first = _migrating(tmp_path, src, target)
    second = cli("migrate", "--source", src, "--target", target, check=False, cwd=tmp_path)
    assert first.wait(600) == 0, first.err()
    _one_line(second, "another airflow-metadata-etl job is writing to")
    _settled(src, target, tmp_path, fresh=fresh)


def test_a_database_that_is_not_airflow_is_refused_and_left_alone(request, tmp_path, pg_url):
    src = _fill(pg_url, dag_runs=2)
    other = _another(request)
    engine = urls.open_engine(other)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id integer PRIMARY KEY, name text)")
        conn.exec_driver_sql("INSERT INTO customers VALUES (1, 'ada')")
    engine.dispose()
    out = cli("migrate", "--source", src, "--target", other, "--target-version", VERSION, check=False, cwd=tmp_path)
    _one_line(out, "is not an Airflow database")
    assert _state(other) == {"customers": 1}


def test_sigterm_stops_like_ctrl_c_and_the_next_run_completes(request, tmp_path, pg_url):
    src = _fill(pg_url, dag_runs=300)
    target, fresh = _empty(_another(request)), _empty(_another(request))
    proc = _migrating(tmp_path, src, target)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(300) == 1, proc.err()
    err = proc.err()
    assert err.splitlines()[-1] == "error: interrupted; run the same command again to resume", err
    assert indexes(target) == indexes(fresh), "SIGTERM left indexes or keys dropped"
    assert _inserted(report("migrate", "--source", src, "--target", target, cwd=tmp_path)) > 0
    _settled(src, target, tmp_path, fresh=fresh)


# -- 1, again: an orphan in a source without foreign keys ---------------------------------------------

def test_an_orphan_of_a_2x_source_without_foreign_keys_is_quarantined(request, tmp_path, pg_url):
    src = _fill(pg_url, dag_runs=6)
    engine = urls.open_engine(src)
    inspector = sa.inspect(engine)
    with engine.begin() as conn:
        for table in ("task_instance", "task_reschedule", "xcom", "task_fail", "rendered_task_instance_fields"):
            for fk in inspector.get_foreign_keys(table):
                conn.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{fk["name"]}"')
        ti = sa.Table("task_instance", sa.MetaData(), autoload_with=conn)
        row = dict(conn.execute(sa.select(ti).limit(1)).mappings().one())
        conn.execute(ti.insert().values({**row, "run_id": "ghost__run"}))  # its dag run was deleted long ago
        tr = sa.Table("task_reschedule", sa.MetaData(), autoload_with=conn)
        conn.execute(tr.insert().values(task_id=row["task_id"], dag_id=row["dag_id"], run_id="ghost__run", map_index=-1,
                                        try_number=1, start_date=row["start_date"], end_date=row["end_date"],
                                        duration=1, reschedule_date=row["start_date"]))
    engine.dispose()
    target, fresh = _empty(_another(request)), _empty(_another(request))
    rep = report("migrate", "--source", src, "--target", target, cwd=tmp_path)
    assert _quarantined(rep) == {"task_instance": 1, "task_reschedule": 1}
    assert any("refers to a dag_run row" in n for n in rep["notes"]), rep["notes"]
    # The report names where the rows went: the user's state folder, one folder per target and run; not the current one.
    assert rep["quarantine"].startswith(os.environ["XDG_STATE_HOME"]) and urls.label(target) in rep["quarantine"]
    assert list(Path(rep["quarantine"], "task_instance").glob("*.parquet")) and not (tmp_path / "etl-quarantine").exists()
    again = report("migrate", "--source", src, "--target", target, cwd=tmp_path)
    assert _inserted(again) == 0
    _settled(src, target, tmp_path, _quarantined(rep), fresh=fresh)


def test_filters_that_match_nothing_and_a_second_export_into_one_folder_are_refused(tmp_path, pg_url):
    src = _fill(pg_url, dag_runs=10)
    for args in (["--exclude-tables", "nosuch"], ["--dag-id", ""]):
        out = cli("export", "--source", src, "--to", str(tmp_path / "never"), *args, check=False, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    assert not (tmp_path / "never").exists()
    dest = tmp_path / "export"
    first = _started(tmp_path, "export", "--source", src, "--to", str(dest), "--chunk-rows", "5")
    deadline = time.monotonic() + 60
    while first.poll() is None and not (dest / "_state" / "dag_run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # still writing, for as long as the second one takes
    try:
        assert first.poll() is None, first.err()
        second = cli("export", "--source", src, "--to", str(dest), "--chunk-rows", "5", check=False, cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    _one_line(second, "another export is writing to", str(dest))
    assert first.wait(600) == 0, first.err()
    assert cli("export", "--source", src, "--to", str(dest), "--chunk-rows", "5", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("version", ["1.10.15", "2.0.2", "2.2.5", "3.0.6", "3.3.2"])
def test_the_cut_reads_every_schema_whole_when_nothing_writes(tmp_path, pg_url, version):
    """Each schema keys its history by other columns (execution_date, run_id, dag_run_id, ti_id): the cut's
    conditions must leave out only what came later, on all of them (and a run without run_id is no reason)."""
    engine = urls.open_engine(pg_url, create=True)
    sample.sample(engine, version, dag_runs=12, seed=3, faults=True)
    engine.dispose()
    dest = tmp_path / "export"
    cli("export", "--source", pg_url, "--to", str(dest), "--chunk-rows", "40", cwd=tmp_path)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {t: spec["rows"] for t, spec in manifest["tables"].items()} == _history(pg_url)
