"""Write schemas/airflow-<version>.json and schemas/revisions.json from real Airflow releases.

Each release installs into its cached venv, builds an empty PostgreSQL database with its own
init command, and the result is reflected; the alembic revisions come from the migration files
the releases ship (2.x still carries the whole pre-2.0 chain, 3.x squashed everything before
2.6.2, so the union of a late 2.x and the newest 3.x covers every revision).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
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


def main(argv: list[str]) -> int:
    versions = argv or list(airflow_release.RELEASES)
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
