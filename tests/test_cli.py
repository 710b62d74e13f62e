"""The command line's contract: exit codes and one-line errors, through the installed console script."""
from __future__ import annotations

import subprocess
import sys


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
