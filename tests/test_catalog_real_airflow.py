"""The catalog against real Airflow: each release's own init command builds exactly the catalog's
schema, we recognise what it built, and its own migrations accept what ``create_empty`` built
(they alter constraints by name, so a wrong name or stamp fails here). Slow: installs releases
into cached venvs (etl/airflow_release.py)."""
from __future__ import annotations

import pytest

from etl import airflow_release, catalog, urls, versions

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("version", ["1.10.12", "1.10.15", "2.10.5", "3.3.2"])
def test_real_airflow_init_builds_the_catalog_schema(pg_url, version):
    airflow_release.init_db(version, pg_url)
    engine = urls.open_engine(pg_url)
    got, want = catalog.reflect_schema(engine), catalog.load(version).tables
    assert sorted(got) == sorted(want)
    for table in want:
        assert got[table] == want[table], table
    assert versions.detect_version(engine) == (version, catalog.load(version).alembic_revision)
    engine.dispose()


@pytest.mark.parametrize(("built", "upgraded_by"), [("1.10.12", "2.0.2"), ("1.10.15", "2.0.2"), ("2.10.5", "3.3.2")])
def test_real_airflow_upgrades_a_database_built_from_the_catalog(pg_url, built, upgraded_by):
    engine = urls.open_engine(pg_url)
    catalog.create_empty(engine, built)
    airflow_release.migrate_db(upgraded_by, pg_url)
    assert versions.detect_version(engine) == (upgraded_by, catalog.load(upgraded_by).alembic_revision)
    engine.dispose()
