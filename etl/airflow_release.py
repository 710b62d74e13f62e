"""Real Airflow releases in cached virtualenvs: the source of truth for schemas and the mapper's oracle.

Airflow's constraint files are not reachable here, so each release's dependencies are capped
at a date shortly after the release (uv's ``--exclude-newer``); where a frozen package set
that is known to work is at hand (``../shared/airflow-freeze``), it is installed instead,
which is both faster and reproducible. Old releases need old Pythons, taken from pyenv.
This is developer and test tooling: the engine itself never imports Airflow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import EtlError


@dataclasses.dataclass(frozen=True)
class Release:
    version: str
    python: str  # pyenv version
    cap: str | None  # uv --exclude-newer date
    extra: tuple[str, ...] = ()
    #: resolve the release's base requirements ourselves: 1.10.12's metadata has a malformed
    #: requirement under its ``all`` extra that uv refuses to parse
    no_deps: bool = False

    @property
    def init_args(self) -> list[str]:
        """The command that builds an empty database: ``initdb`` until 2.0, ``db init`` until 2.7."""
        if self.version.startswith("1."):
            return ["initdb"]
        major, minor = (int(p) for p in self.version.split(".")[:2])
        return ["db", "init"] if (major, minor) < (2, 7) else ["db", "migrate"]

    @property
    def migrate_args(self) -> list[str]:
        if self.version.startswith("1."):
            return ["upgradedb"]
        major, minor = (int(p) for p in self.version.split(".")[:2])
        return ["db", "upgrade"] if (major, minor) < (2, 7) else ["db", "migrate"]


# One release per distinct alembic head from 1.10.12 on (schemas/releases.json): the newest release
# at that head, so every release is served by a snapshot built by a release at its head; and the
# releases of MWAA that tests run as they are (a migration target, the hosts of the DAGs). Rows were
# measured: each installs from PyPI with only its cap, and its init command builds exactly the
# catalog's schema. Caps (none for the newest) sit about two weeks after the release; 1.10.15 needs
# the SQLAlchemy 1.3 pin: its `~=1.3` admits 1.4.2, under which `initdb` dies.
_PG2 = ("psycopg2-binary",)
_PG3X = ("psycopg2-binary", "asyncpg")
RELEASES = {r.version: r for r in (
    # MWAA's first release; cryptography is not among its base requirements, and Fernet needs it.
    Release("1.10.12", "3.8.18", "2020-09-01", _PG2 + ("sqlalchemy==1.3.18", "WTForms<3", "marshmallow-sqlalchemy<0.24",
                                                     "cryptography"), no_deps=True),
    Release("1.10.15", "3.8.18", "2021-03-24", _PG2 + ("sqlalchemy==1.3.23",)),
    Release("2.0.0", "3.8.18", "2020-12-28", _PG2),
    Release("2.0.1", "3.8.18", "2021-02-22", _PG2),
    Release("2.0.2", "3.8.18", "2021-04-26", _PG2),
    Release("2.1.2", "3.8.18", "2021-07-24", _PG2),
    Release("2.1.3", "3.8.18", "2021-09-01", _PG2),
    Release("2.1.4", "3.8.18", "2021-09-20", _PG2),
    Release("2.2.2", "3.9.18", "2021-11-25", _PG2),  # MWAA's; 2.2.0 to 2.2.2 share its head
    Release("2.2.3", "3.9.18", "2021-12-28", _PG2),
    Release("2.2.5", "3.9.18", "2022-04-11", _PG2),
    Release("2.3.0", "3.9.18", "2022-05-11", _PG2),
    Release("2.3.1", "3.9.18", "2022-06-04", _PG2),
    Release("2.3.2", "3.9.18", "2022-06-15", _PG2),
    Release("2.3.4", "3.9.18", "2022-08-30", _PG2),
    Release("2.4.1", "3.10.13", "2022-10-11", _PG2),
    Release("2.4.2", "3.10.13", "2022-11-03", _PG2),
    Release("2.4.3", "3.10.13", "2022-11-20", _PG2),
    Release("2.5.1", "3.10.13", "2023-01-27", _PG2),  # MWAA's, a target of the 1.10.12 test
    Release("2.5.3", "3.10.13", "2023-04-05", _PG2),
    Release("2.6.1", "3.10.13", "2023-05-29", _PG2),
    Release("2.6.3", "3.10.13", "2023-07-15", _PG2),
    Release("2.7.2", "3.9.18", "2023-10-26", _PG2),
    Release("2.7.3", "3.11.7", "2023-11-13", _PG2),
    Release("2.8.0", "3.11.7", "2023-12-30", _PG2),
    # Flask-Session 0.6 (2024-01-27) breaks 2.8.1's `db migrate`; 2.8.2 caps it, 2.8.1's constraints hold 0.5.0.
    Release("2.8.1", "3.11.7", "2024-02-02", _PG2 + ("flask-session<0.6",)),
    Release("2.8.4", "3.11.7", "2024-04-15", _PG2),
    Release("2.9.1", "3.11.7", "2024-05-16", _PG2),
    Release("2.9.2", "3.11.7", "2024-06-24", _PG2),
    Release("2.9.3", "3.11.7", "2024-07-23", _PG2),
    Release("2.10.1", "3.11.7", "2024-09-19", _PG2),
    Release("2.10.2", "3.11.7", "2024-10-01", _PG2),  # serves MWAA's 2.10.1: 2.10.0 to 2.10.2 share its head
    Release("2.10.3", "3.11.7", "2024-11-18", _PG2),
    Release("2.10.5", "3.11.7", "2025-02-17", _PG2),
    Release("2.11.0", "3.11.7", "2025-06-03", _PG2),
    Release("2.11.2", "3.11.7", None, _PG2),
    Release("3.0.2", "3.11.7", "2025-06-20", _PG3X),
    Release("3.0.6", "3.11.7", "2025-09-05", _PG3X),
    Release("3.1.7", "3.11.7", "2026-02-17", _PG3X),
    Release("3.1.8", "3.11.7", "2026-03-18", _PG3X),
    Release("3.2.2", "3.11.7", None, _PG3X),
    Release("3.3.2", "3.11.7", None, _PG3X),
)}


def cache_dir() -> Path:
    return Path(os.environ.get("ETL_AIRFLOW_VENVS", Path.home() / ".cache" / "airflow-metadata-etl" / "airflow"))


def _freeze(version: str) -> Path | None:
    """A package set known to work (``af-<version>.txt``): the shared folder beside the checkout, or
    ``$ETL_AIRFLOW_FREEZE``. Optional: without it the release resolves under its date cap."""
    here = Path(__file__).resolve().parent.parent
    for base in (here.parent / "shared" / "airflow-freeze", Path(os.environ.get("ETL_AIRFLOW_FREEZE", "/nonexistent"))):
        f = base / f"af-{version}.txt"
        if f.exists():
            return f
    return None


def _uv() -> Path:
    found = shutil.which("uv")
    if found:
        return Path(found)
    tool = cache_dir() / "_uv"
    uv = tool / "bin" / "uv"
    if not uv.exists():
        tmp = Path(tempfile.mkdtemp(prefix="_uv-", dir=cache_dir()))
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        subprocess.run([str(tmp / "bin" / "pip"), "install", "-q", "uv"], check=True)
        try:
            tmp.rename(tool)  # atomic, so parallel first uses do not see a half-installed uv
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return uv


def ensure_venv(version: str) -> Path:
    """The venv of ``version``, installed on first use; reused while it imports that release.

    A lock per release: parallel test workers and the snapshot script share the cache, and a
    second installer would delete the venv under the first one's feet.
    """
    if version not in RELEASES:
        raise EtlError(f"no recipe to install Airflow {version}; known: {', '.join(RELEASES)}")
    with locked(version) as venv:
        if not ((venv / "bin" / "python").exists() and _installed(venv / "bin" / "python") == version):
            _install(RELEASES[version], venv)
    return venv


@contextlib.contextmanager
def locked(name: str) -> Iterator[Path]:
    """The cached venv ``name``, held under its lock while it is checked or built."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield cache_dir() / name


def _install(rel: Release, venv: Path) -> None:
    python = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions" / rel.python / "bin" / "python3"
    if not python.exists():
        raise EtlError(f"Airflow {rel.version} needs Python {rel.python}: {python} is missing (pyenv install {rel.python})")
    shutil.rmtree(venv, ignore_errors=True)
    uv, py = _uv(), venv / "bin" / "python"
    subprocess.run([str(uv), "venv", "-q", "-p", str(python), str(venv)], check=True)
    freeze = _freeze(rel.version)
    cmd = [str(uv), "pip", "install", "-q", "-p", str(py)]
    if freeze:
        # mysqlclient compiles against libmariadb headers; the oracle runs on PostgreSQL only.
        reqs = venv / "requirements.txt"
        reqs.write_text("".join(line for line in freeze.read_text().splitlines(True) if not line.startswith("mysqlclient")))
        cmd += ["-r", str(reqs)] + [e for e in rel.extra if not e.startswith("sqlalchemy")]
    elif rel.no_deps:
        subprocess.run(cmd + ["--no-deps", f"apache-airflow=={rel.version}"], check=True)
        cmd += [*_base_requirements(py), *rel.extra]
    else:
        cmd += [f"apache-airflow=={rel.version}", *rel.extra]
    if rel.cap:
        # Also caps the build environments: old sdists (flask-openid) need the setuptools of their day.
        cmd += ["--exclude-newer", rel.cap]
    subprocess.run(cmd, check=True)
    if _installed(py) != rel.version:
        raise EtlError(f"Airflow {rel.version} did not install into {venv}")


def _base_requirements(py: Path) -> list[str]:
    """The installed release's requirements outside any extra."""
    out = subprocess.run([str(py), "-c", "from importlib.metadata import requires; print('\\n'.join(requires('apache-airflow')))"],
                         capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.strip() and "extra ==" not in line]


def _installed(py: Path) -> str | None:
    out = subprocess.run([str(py), "-c", "from importlib.metadata import version; print(version('apache-airflow'))"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


def psycopg2_url(url: str) -> str:
    """Airflow's own driver: our URLs name psycopg 3, every Airflow release speaks psycopg2."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    backend = parsed.get_backend_name()
    driver = {"postgresql": "postgresql+psycopg2", "mysql": "mysql+mysqldb", "sqlite": "sqlite"}[backend]
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def run_airflow(version: str, args: list[str], db_url: str, env: dict | None = None, timeout: int = 1800) -> str:
    """Run the release's CLI against ``db_url`` with a throw-away AIRFLOW_HOME; returns stdout."""
    venv = ensure_venv(version)
    conn = psycopg2_url(db_url)
    with tempfile.TemporaryDirectory(prefix="airflow-home-") as home:
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
            "AIRFLOW_HOME": home,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__SQL_ALCHEMY_CONN": conn,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn,
            "AIRFLOW__CORE__DAGS_FOLDER": str(Path(home) / "dags"),
            "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        out = subprocess.run([str(venv / "bin" / "airflow"), *args], env=full_env, capture_output=True, text=True,
                             timeout=timeout)
    if out.returncode:
        tail = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise EtlError(f"airflow {version} {' '.join(args)} failed: {tail[0]}")
    return out.stdout


def init_db(version: str, db_url: str) -> None:
    run_airflow(version, RELEASES[version].init_args, db_url)


def migrate_db(version: str, db_url: str) -> None:
    run_airflow(version, RELEASES[version].migrate_args, db_url)


def migrations_dir(version: str) -> Path:
    """Where the release keeps its Alembic revisions (airflow-core's package in 3.x)."""
    venv = ensure_venv(version)
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import airflow, os; print(os.path.join(os.path.dirname(airflow.__file__), 'migrations', 'versions'))"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())
