"""Shared by the tests: run the CLI as a user would, and read whole tables for comparison."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from etl import ledger, urls

#: The releases Amazon MWAA runs or ran, from its first (1.10.12) to 3.0.6: most are patch releases
#: that share a snapshot with another release.
MWAA = ("1.10.12", "2.0.2", "2.2.2", "2.4.3", "2.5.1", "2.6.3", "2.7.2", "2.8.1", "2.9.2", "2.10.1", "2.10.3",
        "2.11.0", "3.0.6")


#: The pins Airflow's constraints files set for this package and its dependencies, one file a release
#: (``constraints-<release>-python<X.Y>.pins.txt``): MWAA installs requirements.txt under them.
CONSTRAINTS = sorted((Path(__file__).parent / "constraints").glob("*.pins.txt"))


def constraints_of(release: str) -> Path | None:
    return next((p for p in CONSTRAINTS if p.name.startswith(f"constraints-{release}-python")), None)


def constraints_python(pins: Path) -> Path:
    """The pyenv interpreter of the Python the constraints file is for."""
    minor = pins.name.split("-python")[1].split(".pins")[0]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(pyenv.glob(f"{minor}.*/bin/python3"))
    assert found, f"{pins.name} is for Python {minor}: no pyenv install of it (pyenv install {minor})"
    return found[-1]


def constrained_venv(venv: Path, version: str, *packages: str) -> bool:
    """A new venv with Airflow ``version`` and ``packages`` installed as MWAA installs requirements.txt:
    under the release's constraints, on the Python they are for; every pinned package must stay at its
    pin. The release's date cap stands for the rest of the file; the pins may be newer than it, and what
    this package asks for and the file does not pin comes, as on MWAA, at its newest. False, and
    nothing made, where no constraints of the release are kept."""
    from etl import airflow_release

    pins = constraints_of(version)
    if pins is None:
        return False
    shutil.rmtree(venv, ignore_errors=True)
    uv, py, release = str(airflow_release._uv()), venv / "bin" / "python", airflow_release.RELEASES[version]
    subprocess.run([uv, "venv", "-q", "-p", str(constraints_python(pins)), str(venv)], check=True)
    uncapped = {*_pinned(pins), *_requirements()}
    subprocess.run([uv, "pip", "install", "-q", "-p", str(py), f"apache-airflow=={version}", *release.extra, *packages,
                    "-c", str(pins), "--exclude-newer", release.cap,
                    *(a for name in uncapped for a in ("--exclude-newer-package", f"{name}=2099-12-31"))], check=True)
    frozen = subprocess.run([uv, "pip", "freeze", "-p", str(py)], capture_output=True, text=True, check=True).stdout
    installed = {_norm(n): v for n, v in (line.split("==", 1) for line in frozen.splitlines() if "==" in line)}
    moved = {n: (v, installed[n]) for n, v in _pinned(pins).items() if n in installed and installed[n] != v}
    assert not moved, f"installing {packages} moved pins of Airflow {version}'s constraints (pin, installed): {moved}"
    return True


def _pinned(pins: Path) -> dict[str, str]:
    return {_norm(n): v for n, v in (line.split("==", 1) for line in pins.read_text().splitlines() if "==" in line)}


def _requirements() -> set[str]:
    """The names of the packages this package requires."""
    return {_norm(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in importlib.metadata.requires("airflow-metadata-etl")
            if "extra ==" not in r}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cli(*args: str, env: dict | None = None, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    """``cwd``: the working folder (a test's own: nothing the CLI writes may land in the checkout)."""
    import os

    out = subprocess.run([sys.executable, "-m", "etl.cli", *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **(env or {})}, cwd=cwd)
    if check and out.returncode not in (0, 3):
        raise AssertionError(f"{args[0]} exited {out.returncode}: {out.stderr}")
    return out


def report(*args: str, env: dict | None = None, cwd=None) -> dict:
    return json.loads(cli(*args, "--json", env=env, cwd=cwd).stdout)


def rows(url: str, table: str, columns: list[str] | None = None) -> list[tuple]:
    engine = urls.open_engine(url)
    t = sa.Table(table, sa.MetaData(), autoload_with=engine)
    cols = [t.c[c] for c in columns] if columns else list(t.c)
    with engine.connect() as conn:
        out = sorted((tuple(r) for r in conn.execute(sa.select(*cols))), key=repr)
    engine.dispose()
    return out


def count(url: str, table: str) -> int:
    engine = urls.open_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar_one()
    engine.dispose()
    return n


def indexes(url: str) -> dict:
    """Every table's indexes and foreign keys."""
    engine = urls.open_engine(url)
    inspector = sa.inspect(engine)
    out = {t: (sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(t)),
               sorted((f["name"], tuple(f["constrained_columns"]), f["referred_table"], str(f.get("options"))) for f in inspector.get_foreign_keys(t)))
           for t in inspector.get_table_names() if not t.startswith("_etl_")}
    engine.dispose()
    return out


def chunks_done(engine: sa.Engine, table: str | None = None) -> int:
    """Chunks (of ``table``) the target's ledger holds: how far a running load has got."""
    query = sa.select(sa.func.count()).select_from(ledger.CHUNKS)
    if table:
        query = query.where(ledger.CHUNKS.c.table_name == table)
    try:
        with engine.connect() as conn:
            return conn.execute(query).scalar_one()
    except sa.exc.DBAPIError:  # no ledger yet, or SQLite busy for a moment
        return -1


class LiveWriter(threading.Thread):
    """A source that is written while a job reads it: ``step(engine, n)`` for n = 0, 1, ... until
    the ``with`` block ends; it starts once two steps are in, and an error in it fails the test."""

    def __init__(self, url: str, step: Callable[[sa.Engine, int], None]):
        super().__init__(daemon=True)
        self.engine, self.step = urls.open_engine(url), step
        self.halt = threading.Event()
        self.runs = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.step(self.engine, self.runs)
                self.runs += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def __enter__(self) -> LiveWriter:
        self.start()
        deadline = time.monotonic() + 60
        while self.runs < 2 and self.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join(60)
        self.engine.dispose()
        if self.error is not None:
            raise self.error
