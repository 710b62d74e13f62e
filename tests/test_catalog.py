"""The schema catalog: what create_empty builds must be what real Airflow built, name for name."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from etl import catalog, urls, versions
from etl.errors import EtlError, UsageError

ALL = catalog.versions()


def test_catalog_covers_every_minor_release_from_1_10_to_3_3():
    minors = {tuple(catalog.version_key(v)[:2]) for v in ALL}
    assert {(1, 10), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (2, 5), (2, 6), (2, 7), (2, 8), (2, 9), (2, 10), (2, 11),
            (3, 0), (3, 1), (3, 2), (3, 3)} <= minors


@pytest.mark.parametrize("version", ALL)
def test_postgresql_database_from_catalog_reflects_equal(pg_url, version):
    engine = urls.open_engine(pg_url)
    catalog.create_empty(engine, version)
    got, want = catalog.reflect_schema(engine), catalog.load(version).tables
    assert sorted(got) == sorted(want)
    for table in want:
        assert got[table] == want[table], table
    assert versions.detect_version(engine) == (version if version != "2.11.2" else "2.10.5", catalog.load(version).alembic_revision)
    engine.dispose()


@pytest.mark.parametrize("version", ALL)
def test_mysql_and_sqlite_databases_from_catalog(mysql_url, sqlite_url, version):
    for url in (mysql_url, sqlite_url):
        engine = urls.open_engine(url, create=True)
        catalog.create_empty(engine, version)
        insp = sa.inspect(engine)
        assert set(insp.get_table_names()) == set(catalog.load(version).tables)
        for table in ("dag_run", "task_instance", "xcom"):
            assert [c["name"] for c in insp.get_columns(table)] == [c["name"] for c in catalog.load(version).columns(table)]
        assert versions.detect_version(engine)[1] == catalog.load(version).alembic_revision
        engine.dispose()


def test_unknown_revision_is_a_clear_error(sqlite_url):
    engine = urls.open_engine(sqlite_url, create=True)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('deadbeef0000')")
    with pytest.raises(EtlError, match="unknown alembic revision deadbeef0000.*--source-version"):
        versions.detect_version(engine)
    assert versions.detect_version(engine, override="2.10.5")[0] == "2.10.5"
    with pytest.raises(UsageError, match="not in the schema catalog"):
        versions.detect_version(engine, override="9.9.9")


def test_revision_between_catalog_versions_reads_as_the_older_schema():
    # 2.10.0's first migration, not a head of any catalog version
    rev = next(r for r, v in versions.revisions().items() if v == "2.9.2")
    assert versions.catalog_version_for(rev) in ("2.8.4", "2.9.3")
    assert catalog.version_key(versions.catalog_version_for(rev)) <= (2, 9, 3)


def test_arrow_types_do_not_depend_on_dialect():
    schema = catalog.arrow_schema("2.10.5", "task_instance")
    assert str(schema.field("start_date").type) == "timestamp[us, tz=UTC]"
    assert str(schema.field("executor_config").type) == "binary"
    assert str(schema.field("next_kwargs").type) == "string"
