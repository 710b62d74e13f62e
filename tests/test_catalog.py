"""The schema catalog: what create_empty builds must be what real Airflow built, name for name."""
from __future__ import annotations

import json
from importlib import resources

import pytest
import sqlalchemy as sa

from helpers import MWAA

from etl import catalog, urls, versions
from etl.errors import EtlError, UsageError

ALL = catalog.versions()


def expected_version(version: str) -> str:
    """Releases sharing a head revision have one schema; detection names the oldest of them."""
    head = catalog.load(version).alembic_revision
    return next(v for v in ALL if catalog.load(v).alembic_revision == head)


def test_catalog_covers_every_minor_release_from_1_10_to_3_3():
    minors = {tuple(catalog.version_key(v)[:2]) for v in ALL}
    assert {(1, 10), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (2, 5), (2, 6), (2, 7), (2, 8), (2, 9), (2, 10), (2, 11),
            (3, 0), (3, 1), (3, 2), (3, 3)} <= minors
    assert ALL == sorted(ALL, key=catalog.version_key)


@pytest.mark.parametrize("version", ALL)
def test_catalog_files_are_complete(version):
    data = json.loads(resources.files("etl.schemas").joinpath(f"airflow-{version}.json").read_text())
    assert data["format"] == catalog.FORMAT and data["airflow_version"] == version and data["built_by"]
    assert data["alembic_revision"] in versions.revisions()
    assert "alembic_version" in data["tables"] and list(data["tables"]) == sorted(data["tables"])


@pytest.mark.parametrize("version", ALL)
def test_postgresql_database_from_catalog_reflects_equal(pg_url, version):
    engine = urls.open_engine(pg_url)
    catalog.create_empty(engine, version)
    got, want = catalog.reflect_schema(engine), catalog.load(version).tables
    assert sorted(got) == sorted(want)
    for table in want:
        assert got[table] == want[table], table
    assert versions.detect_version(engine) == (expected_version(version), catalog.load(version).alembic_revision)
    engine.dispose()


def _columns(engine: sa.Engine) -> dict[str, list[tuple[str, bool]]]:
    insp = sa.inspect(engine)
    return {t: [(c["name"], bool(c["nullable"])) for c in insp.get_columns(t)] for t in insp.get_table_names()}


@pytest.mark.parametrize("version", ALL)
def test_mysql_and_sqlite_databases_from_catalog(mysql_url, sqlite_url, version):
    want = {t: [(c["name"], c["nullable"]) for c in spec["columns"]] for t, spec in catalog.load(version).tables.items()}
    for url in (mysql_url, sqlite_url):
        engine = urls.open_engine(url, create=True)
        catalog.create_empty(engine, version)
        assert _columns(engine) == want, url
        assert versions.detect_version(engine) == (expected_version(version), catalog.load(version).alembic_revision)
        engine.dispose()


def test_mariadb_keeps_nullable_timestamps_null_and_keys_in_airflows_collation(mysql_url):
    """MariaDB gives the first TIMESTAMP column DEFAULT CURRENT_TIMESTAMP ON UPDATE unless told
    otherwise, which would rewrite history on every update."""
    engine = urls.open_engine(mysql_url)
    catalog.create_empty(engine, "2.10.5")
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT column_name, is_nullable, column_default, extra, collation_name FROM information_schema.columns "
            "WHERE table_schema = DATABASE() AND table_name = 'dag_run'")).all()
    engine.dispose()
    by_name = {r[0]: r for r in rows}
    assert by_name["start_date"][1:4] == ("YES", "NULL", "")
    assert by_name["dag_id"][4] == "utf8mb3_bin"


def test_unknown_revision_is_a_clear_error(sqlite_url):
    engine = urls.open_engine(sqlite_url, create=True)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('deadbeef0000')")
    with pytest.raises(EtlError, match="unknown alembic revision deadbeef0000.*--source-version"):
        versions.detect_version(engine)
    assert versions.detect_version(engine, override="2.10.5")[0] == "2.10.5"
    with pytest.raises(UsageError, match="not a release this engine knows; releases served: 1.10.12 to"):
        versions.detect_version(engine, override="9.9.9")


def test_empty_or_absent_alembic_version_is_a_clear_error(sqlite_url):
    engine = urls.open_engine(sqlite_url, create=True)
    with pytest.raises(EtlError, match="no single alembic revision.*--source-version / --target-version"):
        versions.detect_version(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32))")
    with pytest.raises(EtlError, match="no single alembic revision"):
        versions.detect_version(engine)


@pytest.mark.parametrize(("revision", "release", "expected"), [
    ("bff083ad727d", "2.9.2", "2.9.1"),  # before 2.9.3's head (686269002441, also a 2.9.2 migration)
    ("134de42d3cb0", "3.2.0", "3.1.8"),  # part-way through 3.2's migrations
    ("449b4072c2da", "2.0.2", "2.0.1"),
])
def test_revision_between_catalog_versions_reads_as_the_older_schema(revision, release, expected):
    assert versions.revisions()[revision] == release
    assert versions.catalog_version_for(revision) == expected


def test_revision_older_than_the_catalog_is_a_clear_error():
    old = next(r for r, v in versions.revisions().items() if v == "1.10.10")
    with pytest.raises(EtlError, match="older than any catalog version.*--source-version"):
        versions.catalog_version_for(old)


def test_every_revision_maps_to_a_release():
    assert len(versions.revisions()) > 240
    assert {catalog.load(v).alembic_revision for v in ALL} <= set(versions.revisions())


def test_arrow_types_do_not_depend_on_dialect():
    schema = catalog.arrow_schema("2.10.5", "task_instance")
    assert str(schema.field("start_date").type) == "timestamp[us, tz=UTC]"
    assert str(schema.field("executor_config").type) == "binary"
    assert str(schema.field("next_kwargs").type) == "string"
    assert str(schema.field("try_number").type) == "int32"
    assert not schema.field("task_id").nullable


def test_every_snapshot_is_at_the_head_its_release_ships():
    for v in catalog.versions():
        assert catalog.releases()[v] == catalog.load(v).alembic_revision, v


def test_every_release_is_served_by_a_snapshot_of_its_own_head():
    releases = catalog.releases()
    assert list(releases) == sorted(releases, key=catalog.version_key)
    assert set(MWAA) <= set(releases) and next(iter(releases)) == "1.10.12"
    for release, head in releases.items():
        assert catalog.load(release).alembic_revision == head, release
        assert release in catalog.releases_at(catalog.schema_version(release))


def test_a_database_at_a_patch_release_head_reads_as_the_snapshot_of_that_head(sqlite_url):
    """2.10.0 to 2.10.2 share a head that 2.10.3 moved on from: a 2.10.1 database is not a 2.10.5 one."""
    engine = urls.open_engine(sqlite_url, create=True)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32))")
        conn.exec_driver_sql(f"INSERT INTO alembic_version VALUES ('{catalog.releases()['2.10.1']}')")
    version, _ = versions.detect_version(engine)
    assert version == catalog.schema_version("2.10.1") != catalog.schema_version("2.10.3")
    assert versions.detect_version(engine, override="2.10.1")[0] == "2.10.1"


def test_the_readme_lists_every_release_with_its_head_and_snapshot():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text.split("<!-- releases:", 1)[1].split("\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    groups: dict[str, list[str]] = {}
    for release in catalog.releases():
        groups.setdefault(catalog.schema_version(release), []).append(release)
    want = [f"| {rs[0] if len(rs) == 1 else f'{rs[0]} to {rs[-1]}'} | `{catalog.releases()[rs[0]]}` | {v} |"
            for v, rs in groups.items()]
    assert table == want
