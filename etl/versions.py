"""Which Airflow version a database is at, from its alembic revision.

``schemas/revisions.json`` maps every revision Airflow ever shipped (1.5 to now, the pre-2.0 chain
included) to the release that introduced it; ``bin/snapshot-schemas`` generates it from the
migration files of the installed releases.
"""
from __future__ import annotations

import functools
import json
from importlib import resources

import sqlalchemy as sa

from . import catalog
from .errors import EtlError

HINT = "give --source-version / --target-version to say which Airflow version it is"


@functools.lru_cache(maxsize=None)
def revisions() -> dict[str, str]:
    return json.loads(resources.files("etl.schemas").joinpath("revisions.json").read_text())


def read_revision(engine: sa.Engine) -> str | None:
    """The single row of ``alembic_version``; None when the table is absent, empty or ambiguous."""
    if not sa.inspect(engine).has_table("alembic_version"):
        return None
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def catalog_version_for(revision: str) -> str:
    """The catalog version whose schema a database at ``revision`` has.

    At a catalog version's head revision the answer is that version (the oldest of those sharing
    the head, e.g. 2.10.5 for 2.11.2: their schemas are identical). At any other known revision
    (a release between two catalog versions, or a migration stopped part-way) it is the newest
    catalog version whose head was introduced by a release strictly older than the revision's:
    every migration of that release is then already applied, whereas a head introduced by the
    revision's own release lies after the revision in the chain (a head is the last migration of
    its release), so its tables may not exist yet.
    """
    known = revisions()
    if revision in catalog.heads():
        return catalog.heads()[revision]
    at_head = [r for r, head in catalog.releases().items() if head == revision]
    if at_head:
        raise EtlError(f"alembic revision {revision} is the head of Airflow {' / '.join(at_head)}, which has no schema "
                       f"snapshot in this engine yet (releases served: {catalog.served_ranges()})")
    if revision not in known:
        raise EtlError(f"unknown alembic revision {revision}: {HINT}")
    introduced = catalog.version_key(known[revision])
    older = [v for v in catalog.versions()
             if catalog.version_key(known.get(catalog.load(v).alembic_revision, v)) < introduced]
    if not older:
        raise EtlError(f"alembic revision {revision} (Airflow {known[revision]}) is older than any catalog version: {HINT}")
    return older[-1]


def detect_version(engine: sa.Engine, override: str | None = None) -> tuple[str, str | None]:
    """(catalog version, alembic revision) of the database behind ``engine``; ``override`` wins."""
    revision = read_revision(engine)
    if override:
        catalog.require(override)
        present = sa.inspect(engine).get_table_names()
        if present and revision is None and not {"dag_run", "task_instance"} <= set(present):
            raise EtlError(f"{engine.url.render_as_string(hide_password=True)} is not an Airflow database (no "
                           f"alembic_version, no dag_run and task_instance; it has {', '.join(sorted(present)[:5])}"
                           f"{', ...' if len(present) > 5 else ''}): a version override names the version of an "
                           "Airflow database, and builds a schema only in an empty one")
        return override, revision
    if revision is None:
        raise EtlError(f"{engine.url.render_as_string(hide_password=True)} has no single alembic revision "
                       f"(not an Airflow database, or not initialised): {HINT}")
    return catalog_version_for(revision), revision
