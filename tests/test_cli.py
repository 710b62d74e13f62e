"""The command line's contract: exit codes and one-line errors, through the installed console script."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from helpers import MWAA

from etl import catalog


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etl.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_job():
    out = run("--help")
    assert out.returncode == 0
    for job in ("inspect", "export", "import", "migrate", "diff", "sample", "plan"):
        assert job in out.stdout
        assert run(job, "--help").returncode == 0


def test_missing_sqlite_file_is_one_line_and_exit_1(tmp_path):
    out = run("inspect", f"sqlite:///{tmp_path / 'missing.db'}")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "does not exist" in out.stderr
    assert not (tmp_path / "missing.db").exists()


def test_unreachable_server_is_one_line_and_exit_1():
    out = run("inspect", "postgresql://x@127.0.0.1:1/x")
    assert out.returncode == 1
    assert out.stderr.startswith("error: cannot connect to postgresql+psycopg://x@127.0.0.1:1/x")
    assert out.stderr.count("\n") == 1


def test_unknown_option_exits_2():
    assert run("inspect", "--no-such-option", "sqlite://").returncode == 2


def test_unsupported_url_is_a_usage_error():
    out = run("inspect", "oracle://u@h/db")
    assert out.returncode == 2 and "unsupported database 'oracle'" in out.stderr


def test_a_version_not_in_the_catalog_is_a_usage_error_wherever_it_is_typed(sqlite_url):
    for args in (("plan", "--source-version", "2.10.5", "--target-version", "9.9.9"),
                 ("plan", "--source-version", "9.9.9", "--target-version", "3.0.6"),
                 ("sample", "--airflow-version", "9.9.9", "--target", sqlite_url),
                 ("inspect", "--source-version", "9.9.9", sqlite_url)):
        out = run(*args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "9.9.9 is not a release this engine knows" in out.stderr, \
            (args, out.returncode, out.stderr)


def test_a_reader_that_closes_the_pipe_early_gets_no_traceback():
    plan = subprocess.Popen([sys.executable, "-m", "etl.cli", "plan", "--source-version", "1.10.15", "--target-version",
                             "3.3.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    plan.stdout.close()  # as `| head -1` does once it has its line; here before the report is written
    stderr = plan.stderr.read().decode()
    assert plan.wait(timeout=120) == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


@pytest.mark.parametrize("release", MWAA)
def test_every_mwaa_release_is_a_version_for_plan_sample_and_target_version(release, tmp_path):
    """As a user types them: MWAA's releases, most of them patch releases without a snapshot of their own."""
    plan = run("plan", "--source-version", "1.10.12", "--target-version", release, "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["target_version"] == release
    source, target = f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'dst.db'}"
    made = run("sample", "--airflow-version", "1.10.12", "--dag-runs", "3", "--target", source)
    assert made.returncode == 0, made.stderr
    moved = run("migrate", "--source", source, "--target", target, "--target-version", release, "--json")
    assert moved.returncode == 0, moved.stderr
    report = json.loads(moved.stdout)
    assert report["source_airflow_version"] == "1.10.12" and report["target_airflow_version"] == release
    with sqlite3.connect(tmp_path / "dst.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == catalog.releases()[release]
        moved_runs = db.execute("SELECT count(*) FROM dag_run").fetchone()[0]
    with sqlite3.connect(tmp_path / "src.db") as db:
        assert moved_runs == db.execute("SELECT count(*) FROM dag_run").fetchone()[0] > 0
    made = run("sample", "--airflow-version", release, "--dag-runs", "2", "--target", f"sqlite:///{tmp_path / 'own.db'}")
    assert made.returncode == 0 and f"airflow_version: {release}" in made.stdout, made.stderr
    with sqlite3.connect(tmp_path / "own.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == catalog.releases()[release]


def test_a_stop_that_breaks_a_query_in_flight_still_reads_as_interrupted():
    """SIGTERM inside a COPY leaves psycopg's connection mid-COPY: the next query's error, wrapped by the
    pipeline, is what reaches the CLI; the KeyboardInterrupt is in its chain (seen in CI, 2026-12-03)."""
    from etl import cli as cli_module
    from etl.errors import EtlError

    try:
        try:
            try:
                raise KeyboardInterrupt("SIGTERM")
            except KeyboardInterrupt:
                raise RuntimeError("sending query failed: another command is already in progress")
        except RuntimeError as exc:
            raise EtlError("task_instance, chunk task_instance#1: sending query failed") from exc
    except EtlError as exc:
        assert cli_module._interrupted(exc)
    assert not cli_module._interrupted(EtlError("a refusal"))
