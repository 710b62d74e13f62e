"""The history generator: constraints hold on every dialect, and the same seed gives the same rows."""
from __future__ import annotations

import pickle

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from etl import catalog, sample, urls

KEY = Fernet.generate_key().decode()


def _counts(engine):
    with engine.connect() as conn:
        return {t: conn.execute(sa.select(sa.func.count()).select_from(sa.table(t))).scalar_one()
                for t in sa.inspect(engine).get_table_names()}


@pytest.mark.parametrize("version", ["1.10.15", "2.10.5", "3.3.2"])
def test_sample_fills_every_dialect(any_url, version):
    engine = urls.open_engine(any_url, create=True)
    counts = sample.sample(engine, version, dag_runs=25, seed=3, fernet_key=KEY)
    assert counts["task_instance"] >= 25 * sample.TASKS_PER_RUN
    assert _counts(engine)["task_instance"] == counts["task_instance"]
    with engine.connect() as conn:
        states = set(conn.execute(sa.text("SELECT DISTINCT state FROM task_instance")).scalars())
        assert {"success", "failed", "up_for_retry", "running", None} <= states
        run_ids = conn.execute(sa.text("SELECT run_id FROM dag_run")).scalars().all()
        assert any(r.startswith("scheduled__") for r in run_ids) and any(r.startswith("manual__") for r in run_ids)
        assert any(r.startswith("backfill_") for r in run_ids)
        enc = conn.execute(sa.text("SELECT val FROM variable WHERE is_encrypted = :t"), {"t": True}).scalars().all()
        assert enc and all(Fernet(KEY.encode()).decrypt(v.encode()) for v in enc)
        if version == "1.10.15":
            value = conn.execute(sa.text("SELECT value FROM xcom WHERE " + "\"key\" = 'return_value'" if engine.dialect.name != "mysql"
                                         else "SELECT value FROM xcom WHERE `key` = 'return_value'")).scalars().first()
            assert isinstance(pickle.loads(value), int)
        else:
            orphans = conn.execute(sa.text("SELECT count(*) FROM task_instance ti WHERE NOT EXISTS "
                                           "(SELECT 1 FROM dag_run dr WHERE dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id)")).scalar()
            assert orphans == 0
            assert conn.execute(sa.text("SELECT count(*) FROM task_instance WHERE map_index >= 0")).scalar() > 0
    engine.dispose()


def test_same_seed_same_rows(tmp_path):
    rows = []
    for i in range(2):
        engine = urls.open_engine(f"sqlite:///{tmp_path / f'{i}.db'}", create=True)
        sample.sample(engine, "2.10.5", dag_runs=10, seed=7, fernet_key=KEY)
        with engine.connect() as conn:
            rows.append([conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1, 2")).all() for t in ("dag_run", "task_instance", "variable", "xcom")])
        engine.dispose()
    assert rows[0] == rows[1]


def test_faults_are_there_when_asked(sqlite_url):
    engine = urls.open_engine(sqlite_url, create=True)
    sample.sample(engine, "1.10.15", dag_runs=30, faults=True)
    with engine.connect() as conn:
        dup = conn.execute(sa.text("SELECT count(*) - count(DISTINCT conn_id) FROM connection")).scalar()
        orphans = conn.execute(sa.text("SELECT count(*) FROM task_instance ti WHERE NOT EXISTS (SELECT 1 FROM dag_run dr "
                                       "WHERE dr.dag_id = ti.dag_id AND dr.execution_date = ti.execution_date)")).scalar()
    assert dup == 1 and orphans > 0
    assert set(catalog.load("1.10.15").tables) <= set(sa.inspect(engine).get_table_names())
