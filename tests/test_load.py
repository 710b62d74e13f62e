"""The load stage on real servers: exactly-once, ids owned by the target, references followed.

Tables here are small stand-ins with Airflow's shapes (a surrogate-id table, a natural-key
table with a surrogate id, a natural-key table referring to both), so the behaviour is pinned
independently of any one Airflow version.
"""
from __future__ import annotations

import datetime as dt
import json
import uuid

import numpy as np
import pyarrow as pa
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.mysql import LONGBLOB

from etl import ledger, urls
from etl.load.base import TableLoader, describe, dialect_for
from etl.load.references import References

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 1, 1, 12, 30, 0, 123456, tzinfo=UTC)


def _schema(engine):
    m = sa.MetaData()
    job = sa.Table("job", m, sa.Column("id", sa.Integer, primary_key=True), sa.Column("state", sa.String(20)),
                   sa.Column("start_date", sa.DateTime(timezone=True)))
    dag_run = sa.Table("dag_run", m, sa.Column("id", sa.Integer, primary_key=True),
                       sa.Column("dag_id", sa.String(250), nullable=False), sa.Column("run_id", sa.String(250), nullable=False),
                       sa.Column("conf", sa.LargeBinary), sa.Column("creating_job_id", sa.Integer),
                       sa.UniqueConstraint("dag_id", "run_id"))
    ti = sa.Table("task_instance", m, *(sa.Column(c, sa.String(250), primary_key=True) for c in ("dag_id", "task_id", "run_id")),
                  sa.Column("state", sa.String(20)), sa.Column("job_id", sa.Integer))
    xcom = sa.Table("xcom", m, sa.Column("dag_run_id", sa.Integer, sa.ForeignKey("dag_run.id"), primary_key=True),
                    sa.Column("key", sa.String(512), primary_key=True),
                    sa.Column("value", sa.LargeBinary().with_variant(LONGBLOB, "mysql")))
    m.create_all(engine)
    ledger.ensure(engine)
    with engine.begin() as conn:  # the target's own history: a job and a run it already has
        conn.execute(job.insert(), [{"id": 1, "state": "own"}])
        conn.execute(dag_run.insert(), [{"id": 1, "dag_id": "d", "run_id": "r0"}])


JOBS = pa.record_batch({"id": pa.array([1, 2, 3], pa.int32()), "state": ["a", "", None],
                        "start_date": pa.array([NOW, None, NOW], pa.timestamp("us", tz="UTC"))})
RUNS = pa.record_batch({"id": pa.array([10, 11], pa.int32()), "dag_id": ["d", "d"], "run_id": ["r0", "r1"],
                        "conf": pa.array([b"\x00\x01", b""]), "creating_job_id": pa.array([2, 99], pa.int32())})
TIS = pa.record_batch({"dag_id": ["d", "d"], "task_id": ["t", "u"], "run_id": ["r0", "r1"],
                       "state": ["success", None], "job_id": pa.array([3, 5], pa.int32())})
XCOMS = pa.record_batch({"dag_run_id": pa.array([10, 11, 12], pa.int32()), "key": ["k", "k", "orphan"],
                         "value": pa.array([b"1", b"x" * 100_000, b"2"])})


def _load_all(engine, chunk_suffix="", dry_run=False):
    dialect, inspector = dialect_for(engine), sa.inspect(engine)
    maps = ledger.IdMaps(engine, "src", {"job", "dag_run"})
    # Airflow 2.10.5's foreign keys whose columns a stand-in has (task_instance -> dag_run) are checked too.
    references = References(engine, "2.10.5")
    quarantined, results = [], {}
    for name, batch in (("job", JOBS), ("dag_run", RUNS), ("task_instance", TIS), ("xcom", XCOMS)):
        table = sa.Table(name, sa.MetaData(), autoload_with=engine)
        loader = TableLoader(engine, dialect, describe(table, inspector, "2.10.5"), "src", False, maps, {},
                             lambda t, b, r: quarantined.append((t, b.num_rows, r)), references, dry_run=dry_run)
        results[name] = loader.load(batch, f"sha-{name}{chunk_suffix}", "chunk-0")
    return results, quarantined


def _rows(engine, name, order):
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {name} ORDER BY {order}"))]


@pytest.fixture
def engine(any_url):
    eng = urls.open_engine(any_url, create=True)
    _schema(eng)
    yield eng
    eng.dispose()


def test_first_load_renumbers_and_follows_references(engine):
    results, quarantined = _load_all(engine)
    assert results["job"].inserted == 3
    assert (results["dag_run"].inserted, results["dag_run"].existing) == (1, 1)
    jobs = _rows(engine, "job", "id")
    assert [j[0] for j in jobs] == [1, 2, 3, 4] and jobs[0][1] == "own"
    assert [j[1] for j in jobs[1:]] == ["a", "", None]  # empty string and NULL stay apart
    runs = _rows(engine, "dag_run", "id")
    assert [(r[0], r[2]) for r in runs] == [(1, "r0"), (2, "r1")]
    assert runs[0][3] is None  # the target's own run keeps its values under the skip policy
    assert bytes(runs[1][3]) == b"" and runs[1][4] is None  # creating job 99 was never loaded
    tis = dict(((r[1], r[4]) for r in _rows(engine, "task_instance", "task_id")))
    assert tis == {"t": 4, "u": None}  # source job 3 became target job 4
    xcom = _rows(engine, "xcom", "dag_run_id")
    assert [(x[0], x[1]) for x in xcom] == [(1, "k"), (2, "k")]
    assert len(bytes(xcom[1][2])) == 100_000
    assert quarantined == [("xcom", 1, "dag_run_id refers to a dag_run row that was not loaded")]


def test_second_run_writes_nothing_even_when_chunked_differently(engine):
    _load_all(engine)
    before = {t: _rows(engine, t, "1") for t in ("job", "dag_run", "task_instance", "xcom")}
    results, _ = _load_all(engine, chunk_suffix="-rechunked")
    assert sum(r.inserted for r in results.values()) == 0
    assert {t: _rows(engine, t, "1") for t in before} == before


def test_dry_run_predicts_the_load_and_writes_nothing(engine):
    predicted, _ = _load_all(engine, dry_run=True)
    assert _rows(engine, "job", "id") == [(1, "own", None)]
    actual, _ = _load_all(engine)
    assert {t: (r.inserted, r.existing) for t, r in predicted.items()} == {t: (r.inserted, r.existing) for t, r in actual.items()}
    after, _ = _load_all(engine, chunk_suffix="-again", dry_run=True)
    assert sum(r.inserted for r in after.values()) == 0


def test_id_map_runs_know_exactly_the_loaded_ids():
    idmap = ledger.IdMap()
    s, d, n = idmap.extend(np.array([5, 3, 4, 9, 10, 12]), np.array([102, 100, 101, 103, 104, 200]))
    assert (s.tolist(), d.tolist(), n.tolist()) == ([3, 9, 12], [100, 103, 200], [3, 2, 1])
    idmap.extend(np.array([11]), np.array([105]))
    found, target = idmap.lookup(np.array([2, 3, 5, 6, 8, 9, 10, 11, 12, 13]))
    assert found.tolist() == [False, True, True, False, False, True, True, True, True, False]
    assert target[found].tolist() == [100, 102, 103, 104, 105, 200]
    assert len(idmap) == 7


def test_binary_copy_keeps_every_postgresql_type(pg_url):
    """Each type Airflow's tables use, through the binary COPY encoder and back, NULLs and edges included."""
    from sqlalchemy.dialects import postgresql as pg

    engine = urls.open_engine(pg_url)
    meta = sa.MetaData()
    table = sa.Table("typed", meta, sa.Column("i", sa.Integer), sa.Column("b", sa.BigInteger), sa.Column("s", sa.SmallInteger),
                     sa.Column("f", pg.DOUBLE_PRECISION), sa.Column("ok", sa.Boolean), sa.Column("ts", sa.DateTime(timezone=True)),
                     sa.Column("naive", sa.DateTime), sa.Column("txt", sa.Text), sa.Column("v", sa.String(20)),
                     sa.Column("j", sa.JSON), sa.Column("jb", pg.JSONB), sa.Column("u", pg.UUID), sa.Column("by", pg.BYTEA))
    meta.create_all(engine)
    ids = [str(uuid.uuid4()), "00000000-0000-0000-0000-000000000001"]
    values = {
        "i": ([1, None, -5], pa.int32()), "b": ([2**40, None, -1], pa.int64()), "s": ([3, -3, None], pa.int16()),
        "f": ([1.5, None, float("inf")], pa.float64()), "ok": ([True, False, None], pa.bool_()),
        "ts": ([NOW, None, dt.datetime(1999, 12, 31, 23, 59, 59, 1, tzinfo=UTC)], pa.timestamp("us", "UTC")),
        "naive": ([dt.datetime(2024, 1, 1), None, dt.datetime(1970, 1, 1, 0, 0, 0, 5)], pa.timestamp("us")),
        "txt": (["héllo ☃", "", None], pa.string()), "v": ([None, "x", "y" * 20], pa.string()),
        "j": (['{"a": 1}', None, "[1]"], pa.string()), "jb": (['{"a": [1, 2]}', None, '"s"'], pa.string()),
        "u": ([ids[0], None, ids[1]], pa.string()), "by": ([b"\x00\x01\xff", b"", None], pa.binary()),
    }
    batch = pa.record_batch({k: pa.array(v, t) for k, (v, t) in values.items()})
    with engine.begin() as conn:
        assert dialect_for(engine).insert(conn, table, batch) == 3
    with engine.connect() as conn:
        got = [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.i.nulls_last()))]
    engine.dispose()
    expected = sorted((dict(zip(values, row)) for row in zip(*(v for v, _ in values.values()))),
                      key=lambda r: (r["i"] is None, r["i"] or 0))
    for row in expected:
        row["j"], row["jb"] = (None if v is None else json.loads(v) for v in (row["j"], row["jb"]))
        row["u"] = None if row["u"] is None else uuid.UUID(row["u"])
    assert got == expected
