"""Which Airflow version a database is at, from its alembic revision.

``schemas/revisions.json`` maps every revision Airflow ever shipped (1.5 to now) to the release
that introduced it. A database at a catalog version's head revision is that version (the
oldest one, where several releases share a head: their schemas are the same). A database at
any other known revision, e.g. a patch release between two catalog versions, is read as the
newest catalog version whose head was introduced no later than that revision: its schema
is the closest one that does not assume tables the database cannot have.
"""
from __future__ import annotations

import functools
import json
from importlib import resources

import sqlalchemy as sa

from . import catalog
from .errors import EtlError, UsageError

HINT = "give --source-version / --target-version to say which Airflow version it is"


@functools.lru_cache(maxsize=None)
def revisions() -> dict[str, str]:
    return json.loads(resources.files("etl.schemas").joinpath("revisions.json").read_text())


def read_revision(engine: sa.Engine) -> str | None:
    if not sa.inspect(engine).has_table("alembic_version"):
        return None
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def catalog_version_for(revision: str) -> str:
    heads = {}
    for v in catalog.versions():
        heads.setdefault(catalog.load(v).alembic_revision, v)
    if revision in heads:
        return heads[revision]
    introduced = revisions().get(revision)
    if introduced is None:
        raise EtlError(f"unknown alembic revision {revision}: {HINT}")
    candidates = [v for v in catalog.versions()
                  if catalog.version_key(revisions().get(catalog.load(v).alembic_revision, v)) <= catalog.version_key(introduced)]
    if not candidates:
        raise EtlError(f"alembic revision {revision} (Airflow {introduced}) is older than any catalog version: {HINT}")
    return candidates[-1]


def detect_version(engine: sa.Engine, override: str | None = None) -> tuple[str, str | None]:
    """(catalog version, alembic revision) of the database behind ``engine``."""
    revision = read_revision(engine)
    if override:
        if override not in catalog.versions():
            raise UsageError(f"Airflow {override} is not in the schema catalog (known: {', '.join(catalog.versions())})")
        return override, revision
    if revision is None:
        raise EtlError(f"{engine.url.render_as_string(hide_password=True)} has no single alembic revision "
                       f"(not an Airflow database, or not initialised): {HINT}")
    return catalog_version_for(revision), revision
