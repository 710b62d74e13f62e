"""Export: every value of every row survives the trip into Parquet, from any dialect, to disk or S3."""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import pty
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

import etl
from etl import pgcopy, sample, urls
from etl.extract import Filters, TableReader
from etl.staging import Package, Store, schema_from_json

from helpers import cli, report

UTC = dt.timezone.utc
#: Values a sample does not hold on its own, written over sampled rows before the export.
BINARY = bytes(range(256)) * 400  # 102 kB, every byte value, not UTF-8
UNICODE = "naïve ☃ 🚀 中文 " * 8_000  # 100k characters, one to four bytes each in UTF-8
WHEN = dt.datetime(2024, 3, 1, 7, 4, 56, 123456, tzinfo=UTC)


def _source(url: str, version: str = "2.10.5", dag_runs: int = 12) -> str:
    engine = urls.open_engine(url, create=True)
    sample.sample(engine, version, dag_runs=dag_runs, seed=1)
    engine.dispose()
    return url


def _edge_values(url: str) -> None:
    """NULL next to the empty string and the empty byte string, in the same column; line breaks."""
    engine = urls.open_engine(url)
    meta = sa.MetaData()
    variable, xcom, log = (sa.Table(t, meta, autoload_with=engine) for t in ("variable", "xcom", "log"))
    with engine.begin() as conn:
        ids = sorted(conn.execute(sa.select(variable.c.id)).scalars())[:3]
        for i, (val, description) in zip(ids, ((None, ""), ("", None), (UNICODE, "ü"))):
            conn.execute(variable.update().where(variable.c.id == i).values(val=val, description=description))
        keys = sorted(tuple(r) for r in conn.execute(sa.select(xcom.c.dag_run_id, xcom.c.task_id, xcom.c.map_index, xcom.c.key)))[:3]
        for (run, task, mi, key), value in zip(keys, (None, b"", BINARY)):
            conn.execute(xcom.update().where(xcom.c.dag_run_id == run, xcom.c.task_id == task, xcom.c.map_index == mi,
                                             xcom.c.key == key).values(value=value))
        ids = sorted(conn.execute(sa.select(log.c.id)).scalars())[:4]
        # Line breaks inside values, which PostgreSQL's CSV quotes across lines.
        for i, extra in zip(ids, (None, "", 'line one\nline "two"\r\n', "carriage\rreturn")):
            conn.execute(log.update().where(log.c.id == i).values(extra=extra, dttm=WHEN))
        if engine.dialect.name == "postgresql":  # a value written with another offset is the same instant in UTC
            conn.exec_driver_sql(f"UPDATE log SET dttm = '2024-03-01 12:34:56.123456+05:30' WHERE id = {ids[1]}")
    engine.dispose()


def _normal(v, atype: pa.DataType):
    if v is None:
        return None
    if pa.types.is_timestamp(atype):
        if isinstance(v, str):
            v = dt.datetime.fromisoformat(v)
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).astimezone(UTC)
    if pa.types.is_binary(atype):
        return bytes(v)
    if pa.types.is_boolean(atype):
        return bool(v)
    return v


def _db_rows(url: str, table: str, schema: pa.Schema) -> list[tuple]:
    """The source's rows as our tests read them: through SQLAlchemy, JSON and UUID as text."""
    engine = urls.open_engine(url)
    t = sa.Table(table, sa.MetaData(), autoload_with=engine)
    sel = [sa.cast(t.c[f.name], sa.Text) if t.c[f.name].type.__class__.__name__ in ("JSON", "JSONB", "UUID") else t.c[f.name]
           for f in schema]
    with engine.connect() as conn:
        out = [tuple(_normal(v, f.type) for v, f in zip(r, schema)) for r in conn.execute(sa.select(*sel))]
    engine.dispose()
    return sorted(out, key=repr)


def _parquet_rows(package: Package, table: str) -> list[tuple]:
    return sorted((tuple(_normal(v, f.type) for v, f in zip(r, b.schema)) for b, _, _ in package.chunks(table)
                   for r in zip(*[c.to_pylist() for c in b.columns])), key=repr)


def _check_manifest(package: Package, store: Store, src: str, dialect: str) -> None:
    m = package.manifest
    engine = urls.open_engine(src)
    with engine.connect() as conn:
        revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
    engine.dispose()
    assert (m["engine_version"], m["source_dialect"], m["airflow_version"], m["alembic_revision"]) == \
        (etl.__version__, dialect, "2.10.5", revision)
    assert m["filters"] == {"since": None, "dag_ids": []}
    assert m["started"] <= m["finished"] and m["finished"].endswith("Z")
    for table, spec in m["tables"].items():
        assert spec["rows"] == sum(c["rows"] for c in spec["chunks"])
        for chunk in spec["chunks"]:
            data = store.read(chunk["file"])
            assert hashlib.sha256(data).hexdigest() == chunk["sha256"]
            parquet = pq.ParquetFile(io.BytesIO(data))
            assert parquet.metadata.num_rows == chunk["rows"]
            assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
            assert [{"name": f.name, "type": str(f.type)} for f in parquet.schema_arrow] == spec["schema"], table


@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_value_round_trips(any_url, tmp_path, where, request):
    src = _source(any_url)
    _edge_values(src)
    env = {}
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        dest, env = f"s3://{bucket}/run1", {"AWS_ENDPOINT_URL": endpoint}
    else:
        dest = str(tmp_path / "export")
    out = report("export", "--source", src, "--to", dest, "--chunk-rows", "100", env=env)
    assert out["tables"]["task_instance"]["chunks"] > 1
    store = Store(dest, env.get("AWS_ENDPOINT_URL"))
    package = Package(store)
    package.verify()
    _check_manifest(package, store, src, urls.normalize(src).get_backend_name())
    tables = package.tables()
    assert {"variable", "connection", "slot_pool", "dag_run", "task_instance", "xcom", "log", "job"} <= set(tables)
    for table in tables:
        parquet = _parquet_rows(package, table)
        assert parquet == _db_rows(src, table, _schema(package, table)), table
        assert len(parquet) == package.manifest["tables"][table]["rows"] == out["tables"][table]["rows"]
    xcoms = [r["value"] for b, _, _ in package.chunks("xcom") for r in b.to_pylist()]
    assert None in xcoms and b"" in xcoms and BINARY in xcoms  # NULL and empty stay apart; binary whole
    assert any(v and len(v) > 100_000 and v.startswith(b'"xxx') for v in xcoms)
    assert any(v and "🚀".encode() in v or b"\\ud83d" in (v or b"") for v in xcoms)
    variables = {r["id"]: r for b, _, _ in package.chunks("variable") for r in b.to_pylist()}
    assert {(r["val"], r["description"]) for r in variables.values()} >= {(None, ""), ("", None), (UNICODE, "ü")}
    logs = sorted((r for b, _, _ in package.chunks("log") for r in b.to_pylist()), key=lambda r: r["id"])
    assert (logs[0]["extra"], logs[1]["extra"]) == (None, "")
    assert logs[0]["dttm"] == logs[1]["dttm"] == WHEN  # microseconds, in UTC (on PostgreSQL one was written at +05:30)


def _schema(package: Package, table: str) -> pa.Schema:
    return schema_from_json(package.manifest["tables"][table]["schema"])


def test_parquet_schema_is_the_same_from_every_dialect(pg_url, mysql_url, sqlite_url, tmp_path):
    schemas = []
    for i, url in enumerate((pg_url, mysql_url, sqlite_url)):
        _source(url, dag_runs=3)
        cli("export", "--source", url, "--to", str(tmp_path / str(i)))
        schemas.append({t: pq.read_schema(tmp_path / str(i) / t / f"{t}.000000.parquet")
                        for t in ("task_instance", "dag_run", "xcom", "variable")})
    assert schemas[0] == schemas[1] == schemas[2]


def test_since_and_dag_id_filters(any_url, tmp_path):
    src = _source(any_url, dag_runs=40)
    engine = urls.open_engine(src)
    with engine.connect() as conn:
        runs = [tuple(r) for r in conn.exec_driver_sql("SELECT dag_id, run_id, execution_date FROM dag_run")]
    engine.dispose()
    since = sorted(_normal(r[2], pa.timestamp("us", "UTC")) for r in runs)[len(runs) // 2]
    dags = ("etl_daily", "ml_training")
    dest = tmp_path / "filtered"
    out = report("export", "--source", src, "--to", str(dest), "--since", since.isoformat(), "--dag-id", dags[0],
                 "--dag-id", dags[1], "--chunk-rows", "100")
    package = Package(Store(str(dest)))
    assert package.manifest["filters"] == {"since": since.isoformat(), "dag_ids": list(dags)}

    def kept(table, test):
        """The source rows the filter should keep, chosen here in Python from the whole table."""
        schema = _schema(package, table)
        names = schema.names
        return [r for r in _db_rows(src, table, schema) if test(dict(zip(names, r)))]

    picked = {(d, r) for d, r, when in runs if d in dags and _normal(when, pa.timestamp("us", "UTC")) >= since}
    assert 0 < len(picked) < len(runs)
    expected = {
        "dag_run": kept("dag_run", lambda r: (r["dag_id"], r["run_id"]) in picked),
        "task_instance": kept("task_instance", lambda r: (r["dag_id"], r["run_id"]) in picked),
        "xcom": kept("xcom", lambda r: (r["dag_id"], r["run_id"]) in picked),
        "log": kept("log", lambda r: r["dag_id"] in dags and r["dttm"] is not None and r["dttm"] >= since),
        "job": kept("job", lambda r: r["dag_id"] in dags and r["start_date"] is not None and r["start_date"] >= since),
        "variable": kept("variable", lambda r: True),  # configuration is never filtered
    }
    for table, rows in expected.items():
        assert _parquet_rows(package, table) == rows, table
        assert out["tables"][table]["rows"] == len(rows)
    whole = {t: len(_db_rows(src, t, _schema(package, t))) for t in ("task_instance", "log", "job")}
    assert all(0 < len(expected[t]) < whole[t] for t in whole), whole


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_export_resumes_to_the_same_result(pg_url, tmp_path, where, request):
    src = _source(pg_url, dag_runs=60)
    env = {}
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        dest, clean, env = f"s3://{bucket}/killed", f"s3://{bucket}/clean", {"AWS_ENDPOINT_URL": endpoint}
    else:
        dest, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    store = Store(dest, env.get("AWS_ENDPOINT_URL"))

    def modified(rel):
        if store.s3:
            bucket, key = store._bucket_key(rel)
            return store.client.head_object(Bucket=bucket, Key=key)["LastModified"]
        return os.stat(os.path.join(dest, rel)).st_mtime_ns

    proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "export", "--source", src, "--to", dest, "--chunk-rows", "50"],
                            stderr=subprocess.DEVNULL, env={**os.environ, **env})
    deadline = time.time() + 60
    while time.time() < deadline and not store.exists("_state/task_instance.json"):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    time.sleep(1.1)  # the rerun starts in a later second than the kill
    assert not store.exists("manifest.json")
    state = json.loads(store.read("_state/dag_run.json"))
    assert state["done"] and len(state["chunks"]) > 1
    kept = {c["file"]: modified(c["file"]) for c in json.loads(store.read("_state/task_instance.json"))["chunks"]}
    # A chunk damaged after it was written is not trusted: the rerun writes it again and goes on from there.
    store.write(state["chunks"][1]["file"], b"damaged")
    rerun = cli("export", "--source", src, "--to", dest, "--chunk-rows", "50", env=env)
    assert "dag_run.000001.parquet is missing or differs from its sha256" in rerun.stderr
    assert kept and {f: modified(f) for f in kept} == kept  # what was complete is not written again
    cli("export", "--source", src, "--to", clean, "--chunk-rows", "50", env=env)
    a, b = (json.loads(Store(d, env.get("AWS_ENDPOINT_URL")).read("manifest.json")) for d in (dest, clean))
    # Each export stamps its own id into its chunks: the data, chunk by chunk, is what must agree.
    def chunks(dest, manifest):
        store = Store(dest, env.get("AWS_ENDPOINT_URL"))
        return {t: [pq.read_table(io.BytesIO(store.read(c["file"]))).replace_schema_metadata() for c in s["chunks"]]
                for t, s in manifest["tables"].items()}
    assert chunks(dest, a) == chunks(clean, b)
    assert a["tables"]["task_instance"]["rows"] > 50 * (len(kept) + 1)
    assert a["started"] <= killed_at < a["finished"]  # the export began with the run that was killed


def test_a_connection_dropped_mid_table_resumes_after_the_last_key(pg_url, caplog):
    """PostgreSQL streams a table in one COPY: the connection is cut twice part-way through the
    stream (by a proxy, after so many bytes); each time the read starts again on a new connection
    after the last key already yielded, logged, and the chunks equal those of an unbroken read."""
    src = _source(pg_url, dag_runs=20)
    clean_engine = urls.open_engine(src)
    clean = list(TableReader(clean_engine, "2.10.5", "task_instance", Filters(), 60).chunks())
    clean_engine.dispose()
    proxy = _CuttingProxy(urls.normalize(src))
    engine = urls.open_engine(proxy.url)
    try:
        reader = TableReader(engine, "2.10.5", "task_instance", Filters(), 60)
        proxy.cuts = [40_000, 40_000]  # server bytes forwarded before each cut, counted from now
        with caplog.at_level(logging.WARNING, logger="etl.retry"):
            retried = list(reader.chunks())
    finally:
        engine.dispose()
        proxy.close()
    assert proxy.cut == 2 and len(clean) > 5
    messages = [r.getMessage() for r in caplog.records if r.name == "etl.retry"]
    assert len(messages) == 2 and all("table task_instance, rows after key [" in m and "retry 1/4" in m for m in messages), messages
    assert [c.last_key for c in retried] == [c.last_key for c in clean]
    assert pa.Table.from_batches([c.batch for c in retried]).equals(pa.Table.from_batches([c.batch for c in clean]))


@pytest.mark.parametrize("binary", [False, True])
def test_both_copy_decoders_read_every_table_as_the_driver_does(pg_url, monkeypatch, binary):
    """PostgreSQL's streaming read decodes CSV, or binary COPY for tables with wide bytea values;
    each is forced here for every table, and every chunk must equal the driver's rows."""
    if binary and not pgcopy.SUPPORTED:
        pytest.skip(f"binary COPY decoding needs pyarrow 19, this is {pa.__version__}")
    src = _source(pg_url, dag_runs=30)
    _edge_values(src)
    monkeypatch.setattr(TableReader, "_wide_bytes", lambda self, conn: binary)
    engine = urls.open_engine(src)
    try:
        names = [t for t in sa.inspect(engine).get_table_names() if count_rows(engine, t)]
        for name in names:
            reader = TableReader(engine, "2.10.5", name, Filters(), 37)
            if reader.key is None:
                continue
            chunks = list(reader.chunks())
            streamed = pa.Table.from_batches([c.batch for c in chunks])
            driver = pa.Table.from_batches([reader._driver_rows([], None, streamed.num_rows)])
            assert streamed.num_rows == count_rows(engine, name) and streamed.equals(driver), name
    finally:
        engine.dispose()


def count_rows(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(sa.table(name))).scalar_one()


def test_a_read_stopped_part_way_hands_back_its_connection(pg_url):
    """A consumer that stops after the first chunk (an S3 error, a kill of the next stage) ends
    the streaming COPY at once, and the connection goes back to the pool usable."""
    src = _source(pg_url, dag_runs=40)
    engine = urls.open_engine(src)
    try:
        for table, wide in (("task_instance", False), ("xcom", pgcopy.SUPPORTED)):  # CSV and binary COPY
            reader = TableReader(engine, "2.10.5", table, Filters(), 20)
            chunks = reader.chunks()
            first = next(chunks)
            assert reader._wide is wide and first.batch.num_rows == 20
            closing = threading.Thread(target=chunks.close, daemon=True)
            closing.start()
            closing.join(60)
            assert not closing.is_alive(), f"{table}: closing the read hangs"
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                            "AND state = 'active' AND query LIKE 'COPY%'")).scalar_one() == 0
                assert conn.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar_one() > 20
    finally:
        engine.dispose()


class _CuttingProxy:
    """A TCP proxy in front of PostgreSQL that closes the connection carrying the server's data
    once it has forwarded the next number of bytes in ``cuts``."""

    def __init__(self, upstream: sa.URL):
        import socket

        self.upstream = (upstream.host, upstream.port or 5432)
        self.cuts: list[int] = []
        self.cut, self.sent = 0, 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = upstream.set(host="127.0.0.1", port=self.listener.getsockname()[1]).render_as_string(hide_password=False)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src, dst, from_server: bool):
        try:
            while data := src.recv(8192):
                if from_server:
                    with self.lock:
                        if self.cuts and self.sent + len(data) >= self.cuts[0]:
                            self.cuts.pop(0)
                            self.sent, self.cut = 0, self.cut + 1
                            raise OSError("cut")
                        if self.cuts:
                            self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(2)
                except OSError:
                    pass
                sock.close()

    def close(self):
        self.listener.close()


def test_dropped_connections_are_retried_from_the_last_key_on_mysql(mysql_url, caplog):
    """MySQL reads a page per query: the server ends the extractor's connection just as it starts
    a page, twice; each page is read again on a new connection after the last key already read."""
    src = _source(mysql_url, dag_runs=20)
    engine, admin = urls.open_engine(src), urls.open_engine(src)
    clean = list(TableReader(engine, "2.10.5", "task_instance", Filters(), 60).chunks())
    armed, killed = [False], []

    def kill_on_checkout(dbapi_connection, record, proxy):
        if not armed[0]:
            return
        armed[0] = False
        with admin.connect() as other:
            other.exec_driver_sql(f"KILL CONNECTION {dbapi_connection.thread_id()}")
        killed.append(True)

    sa.event.listen(engine, "checkout", kill_on_checkout)
    try:
        retried = []
        with caplog.at_level(logging.WARNING, logger="etl.retry"):
            for chunk in TableReader(engine, "2.10.5", "task_instance", Filters(), 60).chunks():
                retried.append(chunk)
                armed[0] = len(retried) in (2, 4)
    finally:
        engine.dispose()
        admin.dispose()
    assert len(killed) == 2 and len(clean) > 5
    messages = [r.getMessage() for r in caplog.records if r.name == "etl.retry"]
    assert len(messages) == 2 and all("table task_instance, page after key [" in m and "retry 1/4" in m for m in messages), messages
    assert [c.last_key for c in retried] == [c.last_key for c in clean]
    assert pa.Table.from_batches([c.batch for c in retried]).equals(pa.Table.from_batches([c.batch for c in clean]))


class _FaultyS3:
    """An HTTP proxy in front of moto's server that answers chosen requests with an S3 error itself."""

    def __init__(self, endpoint: str):
        import http.client
        import http.server
        from urllib.parse import urlsplit

        upstream = urlsplit(endpoint)
        self.faults: list[tuple[str, str, int, str]] = []  # (method, path part, status, S3 error code), used up in order
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = next((f for f in proxy.faults if self.command == f[0] and f[1] in self.path), None)
                if fault:
                    proxy.faults.remove(fault)
                    data = f"<Error><Code>{fault[3]}</Code><Message>{fault[3]} from the test</Message></Error>".encode()
                    status, headers = fault[2], [("Content-Type", "application/xml")]
                else:
                    conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
                    conn.request(self.command, self.path, body=body,
                                 headers={k: v for k, v in self.headers.items() if k.lower() != "expect"})
                    resp = conn.getresponse()
                    status, data = resp.status, resp.read()
                    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("content-length", "transfer-encoding", "connection")]
                    conn.close()
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def faulty_s3(s3_endpoint):
    proxy = _FaultyS3(s3_endpoint)
    yield proxy
    proxy.server.shutdown()
    proxy.server.server_close()


def test_s3_errors_are_retried_and_a_lasting_one_is_one_line(pg_url, s3_endpoint, s3_bucket, faulty_s3):
    src = _source(pg_url, dag_runs=4)
    s3 = faulty_s3
    env = {"AWS_ENDPOINT_URL": s3.url, "AWS_MAX_ATTEMPTS": "1"}  # botocore's own retries off: ours are on show
    chunk = "task_instance/task_instance.000000.parquet"
    s3.faults = [("PUT", chunk, 503, "SlowDown"), ("PUT", chunk, 500, "InternalError"),
                 ("HEAD", "_state/dag_run.json", 503, "SlowDown"), ("HEAD", f"/{s3_bucket}", 503, "SlowDown")]
    out = cli("export", "--source", src, "--to", f"s3://{s3_bucket}/flaky", env=env)
    retries = [line for line in out.stderr.splitlines() if "etl.retry" in line]
    assert len(retries) == 4 and not s3.faults, retries
    assert f"cannot write to s3://{s3_bucket}/flaky: bucket {s3_bucket}: retry 1/4" in retries[0]  # head_bucket
    assert f"reading s3://{s3_bucket}/flaky/_state/dag_run.json: retry 1/4" in retries[1]
    assert all(f"writing s3://{s3_bucket}/flaky/{chunk}: retry" in line for line in retries[2:])
    assert "SlowDown" in retries[2] and "InternalError" in retries[3]
    Package(Store(f"s3://{s3_bucket}/flaky", s3_endpoint)).verify()

    s3.faults = [("PUT", "dag_run/dag_run.000000.parquet", 503, "SlowDown")] * 5  # more than we try
    out = cli("export", "--source", src, "--to", f"s3://{s3_bucket}/down", env=env, check=False)
    assert out.returncode == 1 and out.stderr.splitlines()[-1].startswith(
        f"error: writing s3://{s3_bucket}/down/dag_run/dag_run.000000.parquet: gave up after 5 tries"), out.stderr
    assert not Store(f"s3://{s3_bucket}/down", s3_endpoint).exists("manifest.json")

    s3.faults = [("PUT", "/denied/", 403, "AccessDenied")]  # a bucket we may read but not write to
    out = cli("export", "--source", src, "--to", f"s3://{s3_bucket}/denied", env=env, check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"error: writing s3://{s3_bucket}/denied/_state/writer.json: AccessDenied from the test")


def test_tables_an_upgrade_moved_aside_are_exported_without_a_key(pg_url, tmp_path):
    src = _source(pg_url, dag_runs=8)
    engine = urls.open_engine(src)
    with engine.begin() as conn:  # as Airflow's own upgrades make them: CREATE TABLE AS, no primary key
        conn.exec_driver_sql('CREATE TABLE "_airflow_moved__2_2__dangling__dag_run" AS SELECT * FROM dag_run WHERE mod(id, 2) = 0')
    engine.dispose()
    out = report("export", "--source", src, "--to", str(tmp_path / "moved"), "--chunk-rows", "3")
    package = Package(Store(str(tmp_path / "moved")))
    moved = "_airflow_moved__2_2__dangling__dag_run"
    assert out["tables"][moved]["chunks"] > 1
    assert _schema(package, moved) == _schema(package, "dag_run")
    assert _parquet_rows(package, moved) == _db_rows(src, moved, _schema(package, moved))
    assert 0 < package.manifest["tables"][moved]["rows"] < package.manifest["tables"]["dag_run"]["rows"]


def test_progress_is_log_lines_off_a_terminal_and_a_bar_on_one(sqlite_url, tmp_path):
    src = _source(sqlite_url, dag_runs=6)
    out = cli("export", "--source", src, "--to", str(tmp_path / "logged"), "--chunk-rows", "50", "--json")
    counts = {t: s["rows"] for t, s in json.loads(out.stdout)["tables"].items()}
    done = {line.split("etl.progress: ", 1)[1].split(":", 1)[0]: line for line in out.stderr.splitlines() if "etl.progress" in line}
    assert set(done) == set(counts) and "\r" not in out.stderr
    for table, n in counts.items():
        assert f"{table}: done, {n:,} rows in " in done[table] and "rows/s" in done[table]

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "etl.cli", "export", "--source", src, "--to", str(tmp_path / "bar"),
                             "--chunk-rows", "50", "--json"], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = bytearray()

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            seen.extend(data)
    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = proc.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    assert proc.returncode == 0 and json.loads(stdout)["job"] == "export"
    bar = seen.decode()
    ti = counts["task_instance"]
    assert f"\rtask_instance" in bar and f"{ti:,}/{ti:,}" in bar and "rows/s ETA" in bar
    assert "etl.progress" not in bar


def test_the_jobs_are_the_package_api_without_loading_it_up_front(sqlite_url, tmp_path):
    code = ("import json, sys, etl; heavy = {'airflow', 'sqlalchemy', 'pyarrow', 'boto3'} & set(sys.modules); "
            "assert not heavy, heavy; print(json.dumps(etl.__all__)); "
            "from etl import commands; assert all(getattr(etl, j) is getattr(commands, j) for j in etl.__all__[1:])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert {"export", "import_", "migrate", "diff", "inspect", "plan"} <= set(json.loads(out.stdout))
    engine = urls.open_engine(sqlite_url, create=True)
    key = Fernet.generate_key().decode()
    sample.sample(engine, "2.10.5", dag_runs=2, seed=1, fernet_key=key)
    engine.dispose()
    result = etl.export(sqlite_url, str(tmp_path / "api"), tables=("variable", "connection", "dag_run"))
    assert result.to_dict()["tables"]["dag_run"]["rows"] == len(_db_rows(sqlite_url, "dag_run", pa.schema([("id", pa.int32())])))
    # Secrets leave as they are stored: the ciphertext, never the value.
    package = Package(Store(str(tmp_path / "api")))
    for table, column in (("variable", "val"), ("connection", "password")):
        assert _parquet_rows(package, table) == _db_rows(sqlite_url, table, _schema(package, table))
        values = [r[column] for b, _, _ in package.chunks(table) for r in b.to_pylist() if r["is_encrypted"]]
        assert values and all(v.startswith("gAAAAA") for v in values), (table, values)
    token = next(r["val"] for b, _, _ in package.chunks("variable") for r in b.to_pylist() if r["key"] == "api_token")
    assert Fernet(key).decrypt(token.encode()).decode() == "s3cr3t-ÄÖ-🚀"
    with pytest.raises(AttributeError):
        etl.no_such_job


def test_bad_input_is_one_line_and_exit_1(pg_url, tmp_path, s3_endpoint):
    src = _source(pg_url, dag_runs=2)
    cases = [
        (["export", "--source", "postgresql://x@127.0.0.1:1/x", "--to", str(tmp_path / "a")], "cannot connect"),
        (["export", "--source", src, "--to", "s3://no-such-bucket/x", "--s3-endpoint-url", s3_endpoint], "no-such-bucket"),
        # sysfs refuses new entries to everyone, root included: a folder we may not write to.
        (["export", "--source", src, "--to", "/sys/forbidden"], "cannot write to /sys/forbidden: "),
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


def test_a_server_in_another_time_zone_exports_the_same_instants(pg_server, tmp_path):
    """PostgreSQL writes timestamps in the session's zone, 1900's Amsterdam offset with seconds
    (+00:19:32) included; every value still arrives as the same UTC instant."""
    url = pg_server.create()
    try:
        name = urls.normalize(url).database
        with pg_server.engine.connect() as conn:
            conn.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET timezone TO 'Europe/Amsterdam'")
        _source(url, dag_runs=3)
        engine = urls.open_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE task_instance SET start_date = '1900-01-01 00:00:00+00' "
                                 "WHERE task_id = (SELECT min(task_id) FROM task_instance)")
        engine.dispose()
        etl.export(url, str(tmp_path / "tz"), tables=("task_instance",))
        package = Package(Store(str(tmp_path / "tz"), None))
        schema = schema_from_json(package.manifest["tables"]["task_instance"]["schema"])
        assert _parquet_rows(package, "task_instance") == _db_rows(url, "task_instance", schema)
        starts = {r["start_date"] for b, _, _ in package.chunks("task_instance") for r in b.to_pylist()}
        assert dt.datetime(1900, 1, 1, tzinfo=UTC) in {s.astimezone(UTC) for s in starts if s}
    finally:
        pg_server.drop(url)


def test_filter_values_reach_the_server_as_they_are(pg_url, tmp_path):
    """Filter and key values are bound by the driver into the COPY: a dag_id with % and ' selects exactly its rows."""
    src = _source(pg_url, dag_runs=3)
    odd = "100%_o'clock"
    engine = urls.open_engine(src)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE log SET dag_id = :d WHERE id IN (SELECT id FROM log ORDER BY id LIMIT 3)"), {"d": odd})
        conn.execute(sa.text("UPDATE log SET dag_id = :d WHERE id IN (SELECT id FROM log ORDER BY id DESC LIMIT 2)"),
                     {"d": "100xxo'clock"})  # what LIKE-style or %-escaped matching would also take
    engine.dispose()
    etl.export(src, str(tmp_path / "odd"), tables=("log",), dag_ids=[odd], chunk_rows=2)
    package = Package(Store(str(tmp_path / "odd"), None))
    assert sorted(r["dag_id"] for b, _, _ in package.chunks("log") for r in b.to_pylist()) == [odd] * 3
