"""Real Airflow as the oracle: inspect recognises the databases it makes, and its own upgrade
accepts the histories we generate (the catalog itself is checked in test_catalog_real_airflow.py). Slow: installs releases
into cached venvs (see etl/airflow_release.py); CI runs these."""
from __future__ import annotations

import pytest

from etl import airflow_release, catalog, sample, urls
from helpers import report

pytestmark = pytest.mark.slow
NEWEST = catalog.versions()[-1]


@pytest.mark.parametrize("version", ["1.10.15", "2.10.5", NEWEST])
def test_inspect_names_databases_real_airflow_made(pg_url, version):
    airflow_release.init_db(version, pg_url)
    inspected = report("inspect", pg_url)
    assert inspected["airflow_version"] == version
    assert inspected["alembic_revision"] == catalog.load(version).alembic_revision
    assert inspected["dialect"] == "postgresql" and "task_instance" in inspected["tables"]


def test_real_airflow_upgrades_a_sampled_1_10_history(pg_url):
    engine = urls.open_engine(pg_url)
    counts = sample.sample(engine, "1.10.15", dag_runs=20, seed=11)
    engine.dispose()
    airflow_release.migrate_db("2.10.5", pg_url)
    inspected = report("inspect", pg_url)
    assert inspected["airflow_version"] == "2.10.5"
    assert inspected["tables"]["task_instance"]["rows"] == counts["task_instance"]
    assert inspected["tables"]["dag_run"]["rows"] == counts["dag_run"]
