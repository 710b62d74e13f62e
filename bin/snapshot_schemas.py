"""Write schemas/airflow-<version>.json, schemas/revisions.json and schemas/releases.json from real Airflow releases.

Each release installs into its cached venv, builds an empty PostgreSQL database with its own
init command, and the result is reflected; the alembic revisions come from the migration files
the releases ship (2.x still carries the whole pre-2.0 chain, 3.x squashed everything before
2.6.2, so the union of a late 2.x and the newest 3.x covers every revision).

``releases.json`` names every release from 1.10.12 on with its alembic head, read from the
release's own wheel on PyPI (no install, no database): which snapshot serves a release follows
from it, so a patch release that added no migration needs no snapshot of its own.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import sqlalchemy as sa

from etl import airflow_release, catalog, urls

ROOT = Path(__file__).resolve().parent.parent
SERVER = os.environ.get("ETL_SNAPSHOT_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def snapshot(version: str) -> dict:
    admin = sa.create_engine(urls.normalize(SERVER), isolation_level="AUTOCOMMIT")
    name = f"etl_snap_{version.replace('.', '_')}_{uuid.uuid4().hex[:6]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = urls.normalize(SERVER).set(database=name).render_as_string(hide_password=False)
    try:
        started = time.perf_counter()
        airflow_release.init_db(version, url)
        seconds = time.perf_counter() - started
        engine = urls.open_engine(url)
        with engine.connect() as conn:
            revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
            server = conn.exec_driver_sql("SHOW server_version").scalar_one()
        tables = catalog.reflect_schema(engine)
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
    command = " ".join(airflow_release.RELEASES[version].init_args)
    print(f"{version}: {len(tables)} tables, revision {revision}, airflow {command} took {seconds:.1f} s", file=sys.stderr)
    return {"format": catalog.FORMAT, "airflow_version": version, "alembic_revision": revision,
            "built_by": f"apache-airflow=={version} `airflow {command}` on an empty PostgreSQL {server.split()[0]} database",
            "tables": tables}


_REV = re.compile(r"^revision\s*(?::\s*str\s*)?=\s*['\"](\w+)['\"]", re.M)
_VER = re.compile(r"^airflow_version\s*=\s*['\"]([\w.]+)['\"]", re.M)


def revisions(versions: list[str]) -> dict[str, str]:
    """Every alembic revision the installed releases know, with the Airflow version that introduced it."""
    found: dict[str, str] = {}
    for version in versions:
        for path in sorted(airflow_release.migrations_dir(version).glob("*.py")):
            text = path.read_text()
            rev, ver = _REV.search(text), _VER.search(text)
            if rev and ver:
                found.setdefault(rev.group(1), ver.group(1))
    return dict(sorted(found.items(), key=lambda kv: (catalog.version_key(kv[1]), kv[0])))


_DOWN = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(.+)$", re.M)
OLDEST = "1.10.12"  # MWAA's first release, the oldest a user is expected to come from


def release_heads() -> dict[str, str]:
    """Every published release from OLDEST on with its alembic head, oldest first.

    The head is the one revision no other names as its down_revision, among the migration files
    of the release's wheel (3.x: ``apache-airflow-core``, where the migrations moved). Yanked
    releases (1.10.13) count: environments were built with them.
    """
    wheels = airflow_release.cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    listed = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "apache-airflow"],
                            capture_output=True, text=True, check=True).stdout
    published = re.search(r"Available versions: (.*)", listed).group(1).replace(" ", "").split(",")
    published = {v for v in published if re.fullmatch(r"\d+\.\d+\.\d+", v)} | {"1.10.13"}
    heads = {}
    for version in sorted((v for v in published if catalog.version_key(v) >= catalog.version_key(OLDEST)),
                          key=catalog.version_key):
        dist = "apache-airflow-core" if version.startswith("3.") else "apache-airflow"
        found = list(wheels.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{dist}=={version}",
                            "-d", str(wheels)], check=True)
            found = list(wheels.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
        heads[version] = _head(found[0])
    return heads


def _head(wheel: Path) -> str:
    downs: set[str] = set()
    revs: list[str] = []
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if "/migrations/versions/" in name and name.endswith(".py"):
                text = z.read(name).decode()
                rev, down = _REV.search(text), _DOWN.search(text)
                if rev:
                    revs.append(rev.group(1))
                    downs.update(re.findall(r"\w+", down.group(1)) if down else ())
    tips = sorted(set(revs) - downs - {"None"})
    if len(tips) != 1:
        raise SystemExit(f"{wheel.name}: {len(tips)} alembic heads ({', '.join(tips)}), expected one")
    return tips[0]


def main(argv: list[str]) -> int:
    versions = argv or catalog.versions()
    out = ROOT / "schemas"
    for version in versions:
        data = snapshot(version)
        (out / f"airflow-{version}.json").write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    # The migration files of the newest 2.x and 3.x releases cover every revision ever shipped.
    sources = [v for v in ("2.11.2", "2.10.5", "3.3.2") if (airflow_release.cache_dir() / v).exists()]
    known = json.loads((out / "revisions.json").read_text()) if (out / "revisions.json").exists() else {}
    known.update(revisions(sources))
    ordered = dict(sorted(known.items(), key=lambda kv: (catalog.version_key(kv[1]), kv[0])))
    (out / "revisions.json").write_text(json.dumps(ordered, indent=1) + "\n")
    (out / "releases.json").write_text(json.dumps(release_heads(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
