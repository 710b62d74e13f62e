"""Export: every value of every row survives the trip into Parquet, from any dialect, to disk or S3."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from etl import sample, urls
from etl.staging import Package, Store

from helpers import cli, report


def _source(url: str, version: str = "2.10.5", dag_runs: int = 12) -> str:
    engine = urls.open_engine(url, create=True)
    sample.sample(engine, version, dag_runs=dag_runs, seed=1)
    engine.dispose()
    return url


def _normal(v):
    if isinstance(v, dt.datetime):
        return (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
    if isinstance(v, memoryview):
        return bytes(v)
    return v


def _db_rows(url, table, columns):
    engine = urls.open_engine(url)
    t = sa.Table(table, sa.MetaData(), autoload_with=engine)
    sel = [sa.cast(t.c[c], sa.Text) if c in ("rendered_fields", "next_kwargs", "extra") and engine.dialect.name == "postgresql"
           else t.c[c] for c in columns]
    with engine.connect() as conn:
        out = [tuple(_normal(v) for v in r) for r in conn.execute(sa.select(*sel))]
    engine.dispose()
    return sorted(out, key=repr)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_value_round_trips(any_url, tmp_path, where, request):
    src = _source(any_url)
    env = {}
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        dest, env = f"s3://{bucket}/run1", {"AWS_ENDPOINT_URL": endpoint}
    else:
        dest = str(tmp_path / "export")
    out = report("export", "--source", src, "--to", dest, "--chunk-rows", "100", env=env)
    assert out["tables"]["task_instance"]["chunks"] > 1
    os.environ.update(env)
    try:
        package = Package(Store(dest))
        package.verify()
        for table in ("task_instance", "xcom", "dag_run", "variable", "log"):
            parquet = sorted((tuple(_normal(v) for v in r.values()) for b, _, _ in package.chunks(table) for r in b.to_pylist()),
                             key=repr)
            columns = [f["name"] for f in package.manifest["tables"][table]["schema"]]
            database = _db_rows(src, table, columns)
            assert len(parquet) == len(database) > 0
            if table in ("xcom", "variable", "task_instance", "dag_run"):
                assert parquet == database, table
        xcoms = [r for b, _, _ in package.chunks("xcom") for r in b.to_pylist()]
        assert any(r["value"] and len(r["value"]) > 100_000 for r in xcoms)  # large values whole
        assert any(r["value"] == b'""' for r in xcoms)  # empty string stays distinct from NULL
        assert any("🚀" in (r["value"] or b"").decode("utf-8", "replace") or b"\\ud83d" in (r["value"] or b"") for r in xcoms)
    finally:
        for k in env:
            os.environ.pop(k, None)


def test_parquet_schema_is_the_same_from_every_dialect(pg_url, mysql_url, sqlite_url, tmp_path):
    schemas = []
    for i, url in enumerate((pg_url, mysql_url, sqlite_url)):
        _source(url, dag_runs=3)
        cli("export", "--source", url, "--to", str(tmp_path / str(i)))
        schemas.append({t: pq.read_schema(tmp_path / str(i) / t / f"{t}.000000.parquet")
                        for t in ("task_instance", "dag_run", "xcom", "variable")})
    assert schemas[0] == schemas[1] == schemas[2]


def test_killed_export_resumes_to_the_same_result(pg_url, tmp_path):
    src = _source(pg_url, dag_runs=60)
    dest = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "export", "--source", src, "--to", str(dest), "--chunk-rows", "50"])
    deadline = time.time() + 60
    while time.time() < deadline and not (dest / "task_instance").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (dest / "manifest.json").exists()
    cli("export", "--source", src, "--to", str(dest), "--chunk-rows", "50")
    clean = tmp_path / "clean"
    cli("export", "--source", src, "--to", str(clean), "--chunk-rows", "50")
    a, b = json.loads((dest / "manifest.json").read_text()), json.loads((clean / "manifest.json").read_text())
    assert {t: [c["sha256"] for c in s["chunks"]] for t, s in a["tables"].items()} == \
           {t: [c["sha256"] for c in s["chunks"]] for t, s in b["tables"].items()}


def test_bad_input_is_one_line_and_exit_1(pg_url, tmp_path, s3_endpoint):
    src = _source(pg_url, dag_runs=2)
    cases = [
        (["export", "--source", "postgresql://x@127.0.0.1:1/x", "--to", str(tmp_path / "a")], "cannot connect"),
        (["export", "--source", src, "--to", "s3://no-such-bucket/x", "--s3-endpoint-url", s3_endpoint], "no-such-bucket"),
        (["export", "--source", src, "--to", "/proc/forbidden"], "cannot write to /proc/forbidden"),
    ]
    other = tmp_path / "other"
    cli("export", "--source", src, "--to", str(other), "--tables", "variable")
    cases.append((["export", "--source", src, "--to", str(other)], "already holds a different export"))

    def unknown_version():
        engine = urls.open_engine(src)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'ffffffffffff'")
        engine.dispose()
    cases.append((["export", "--source", src, "--to", str(tmp_path / "b")], "unknown alembic revision", unknown_version))
    for args, text, *before in cases:
        for prepare in before:
            prepare()
        out = cli(*args, check=False)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and text in out.stderr, out.stderr
