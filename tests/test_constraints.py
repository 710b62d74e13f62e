"""The package where users install it: under the constraints file of the Airflow release hosting its DAGs.

From 2.7.2 on MWAA installs requirements.txt under that release's constraints, so a floor above a
pin there (pyarrow>=14 against 2.7.2's pyarrow 11) made the package uninstallable. The pins that
matter, of every release MWAA runs from 2.4.3 on, are kept in ``tests/constraints/`` (taken from
public copies of those files), each resolved on the Python its file is for. Slow: uv resolves
against PyPI, and the engine then runs export, import and diff in a venv holding exactly the
oldest pins (2.4.3's pyarrow 6), cached beside the Airflow venvs.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from etl import airflow_release
from helpers import CONSTRAINTS, cli, constraints_of, constraints_python

REPO = Path(__file__).resolve().parent.parent
OLDEST = constraints_of("2.4.3")
pytestmark = pytest.mark.slow


def _uv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(airflow_release._uv()), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("pins", CONSTRAINTS, ids=lambda p: p.name.split("-python")[0])
def test_the_package_resolves_under_airflow_constraints(pins, tmp_path):
    assert _uv("venv", "-q", "-p", str(constraints_python(pins)), str(tmp_path / "venv")).returncode == 0
    out = _uv("pip", "install", "--dry-run", "-p", str(tmp_path / "venv" / "bin" / "python"), "-c", str(pins), str(REPO))
    assert out.returncode == 0, f"{pins.name}: {out.stderr[-3000:]}"


def _pinned_venv() -> Path:
    """This checkout with the oldest pins: pyarrow 6, SQLAlchemy 1.4.27 (so psycopg2, as inside Airflow 2)."""
    with airflow_release.locked("pins-2.4.3") as venv:
        py = venv / "bin" / "python"
        if not py.exists():
            assert _uv("venv", "-q", "-p", str(constraints_python(OLDEST)), str(venv)).returncode == 0
        out = _uv("pip", "install", "-q", "-p", str(py), "-c", str(OLDEST), "-e", str(REPO), "psycopg2-binary")
        assert out.returncode == 0, out.stderr[-3000:]
    return venv


def test_the_engine_moves_history_on_the_oldest_pins(pg_server, pg_url, tmp_path, request):
    py = _pinned_venv() / "bin" / "python"
    versions = subprocess.run([str(py), "-c", "import pyarrow, sqlalchemy; print(pyarrow.__version__, sqlalchemy.__version__)"],
                              capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    pinned = dict(line.split("==") for line in OLDEST.read_text().splitlines() if "==" in line)
    assert versions == [pinned["pyarrow"], pinned["SQLAlchemy"]]
    cli("sample", "--airflow-version", "2.10.5", "--target", pg_url, "--dag-runs", "20", "--faults")
    target = pg_server.create()
    request.addfinalizer(lambda: pg_server.drop(target))

    def pinned_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(py), "-m", "etl.cli", *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)

    dest = str(tmp_path / "export")
    for args in (("export", "--source", pg_url, "--to", dest, "--chunk-rows", "100"),
                 ("import", "--from", dest, "--target", target, "--target-version", "3.0.6")):
        out = pinned_cli(*args)
        assert out.returncode == 0, f"{args[0]}: {out.stderr[-3000:]}"
    assert pinned_cli("diff", "--source", dest, "--target", target).returncode == 0
    again = cli("diff", "--source", pg_url, "--target", target)  # and by the engine on today's packages
    assert again.returncode == 0, again.stdout

    # An SQLite source (Airflow 2's standalone database) is read in a prefetch thread, which SQLAlchemy 1.4 refuses unless told.
    lite = f"sqlite:///{tmp_path / 'standalone.db'}"
    cli("sample", "--airflow-version", "2.10.5", "--target", lite, "--dag-runs", "5")
    for args in (("export", "--source", lite, "--to", str(tmp_path / "standalone")),
                 ("migrate", "--source", lite, "--target", f"sqlite:///{tmp_path / 'new.db'}", "--target-version", "3.0.6")):
        out = pinned_cli(*args)
        assert out.returncode == 0 and "Traceback" not in out.stderr, f"{args[0]}: {out.stderr[-3000:]}"
