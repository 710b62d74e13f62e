"""bin/bench: our figures next to the physical limit, measured in one run on one machine.

Absolute times on a shared two-core machine drift from run to run, so every figure that
matters is a ratio against a baseline measured minutes apart in the same run:

- raw: ``COPY t TO STDOUT (FORMAT binary) | COPY t FROM STDIN (FORMAT binary)`` per table, into an
  empty target made from the same schema (PostgreSQL's own limit for moving these rows);
- migrate: our direct migration into an empty target;
- export + import: through moto's S3 server over HTTP;
- upgrade: a 1.10.15 source of the same size, our migration to 2.10.5 against a template copy of
  it upgraded in place by real Airflow 2.10.5's ``airflow db migrate``.

Peak RSS is the child process's own maximum (``wait4``), not the bench's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

import sqlalchemy as sa

from etl import catalog, tables, urls

SERVER = os.environ.get("ETL_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CLI = [sys.executable, "-m", "etl.cli"]


class Server:
    def __init__(self, url: str):
        self.url = urls.normalize(url)
        self.admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        self.made: list[str] = []

    def create(self, role: str, template: str | None = None) -> str:
        name = f"etl_bench_{role}_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        self.made.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            for name in self.made:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(seconds, peak RSS in MB, stdout) of one child process, reaped with wait4 for its own rusage."""
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)
    streams: dict[str, str] = {}
    readers = [threading.Thread(target=lambda n=n, f=f: streams.__setitem__(n, f.read())) for n, f in
               (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    seconds = time.perf_counter() - start
    if proc.returncode:
        err = streams.get("err", "").strip()
        raise SystemExit(f"bench: {' '.join(cmd[2:4])} failed: {err.splitlines()[-1] if err else proc.returncode}")
    return seconds, usage.ru_maxrss // 1024, streams.get("out", "")


def row_counts(url: str) -> dict[str, int]:
    engine = urls.open_engine(url)
    with engine.connect() as conn:
        present = sa.inspect(conn).get_table_names()
        counts = {t: conn.execute(sa.select(sa.func.count()).select_from(sa.table(t))).scalar_one() for t in tables.select(present)}
    engine.dispose()
    return {t: n for t, n in counts.items() if n}


def raw_pipe(source: str, target: str, names: list[str]) -> dict[str, float]:
    """psql COPY out piped into psql COPY in, table by table, as a DBA would do it by hand."""
    src, dst = urls.normalize(source), urls.normalize(target)
    times = {}
    for name in names:
        cols = _columns(target, name)
        out = f'COPY (SELECT {cols} FROM "{name}") TO STDOUT (FORMAT binary)'
        into = f'COPY "{name}" ({cols}) FROM STDIN (FORMAT binary)'
        start = time.perf_counter()
        p1 = subprocess.Popen(["psql", "-qAt", "-h", src.host, "-U", src.username, "-d", src.database, "-c", out], stdout=subprocess.PIPE)
        p2 = subprocess.run(["psql", "-q", "-h", dst.host, "-U", dst.username, "-d", dst.database, "-c", into], stdin=p1.stdout,
                            capture_output=True, text=True)
        p1.wait()
        if p1.returncode or p2.returncode:
            raise SystemExit(f"bench: raw COPY of {name} failed: {p2.stderr.strip()}")
        times[name] = time.perf_counter() - start
    return times


def _columns(url: str, name: str) -> str:
    engine = urls.open_engine(url)
    cols = [c["name"] for c in sa.inspect(engine).get_columns(name)]
    engine.dispose()
    return ", ".join(f'"{c}"' for c in cols)


def empty(server: Server, role: str, version: str) -> str:
    url = server.create(role)
    engine = urls.open_engine(url)
    catalog.create_empty(engine, version)
    engine.dispose()
    return url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="task instances in the source (default 1M)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--skip-airflow", action="store_true", help="leave out the comparison with real Airflow's upgrade")
    args = ap.parse_args()
    server = Server(SERVER)
    result: dict = {"rows": args.rows, "machine": {"cores": os.cpu_count(), "memory_gib": _mem_gib()},
                    "date": time.strftime("%Y-%m-%d")}
    try:
        dag_runs = max(1, args.rows // 20)
        source = empty(server, "src", "2.10.5")
        t, _, _ = measured(CLI + ["sample", "--airflow-version", "2.10.5", "--target", source, "--dag-runs", str(dag_runs)])
        result["sample_seconds"] = round(t, 1)
        counts = row_counts(source)
        result["source_rows"] = counts

        raw_target = empty(server, "raw", "2.10.5")
        raw = raw_pipe(source, raw_target, list(counts))
        result["raw"] = {"seconds": round(sum(raw.values()), 2), "tables": {k: round(v, 2) for k, v in raw.items()}}

        target = empty(server, "ours", "2.10.5")
        t, rss, out = measured(CLI + ["migrate", "--source", source, "--target", target, "--json"])
        result["migrate"] = {"seconds": round(t, 2), "ratio_to_raw": round(t / result["raw"]["seconds"], 3),
                             "peak_rss_mb": rss, "report": json.loads(out)["tables"]}

        result["export_import"] = export_import(server, source)
        result["export_import"]["ratio_to_raw"] = round(result["export_import"]["seconds"] / result["raw"]["seconds"], 3)

        if not args.skip_airflow:
            result["upgrade_1_10_15"] = upgrade_comparison(server, dag_runs)
    finally:
        server.drop_all()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 0


def export_import(server: Server, source: str) -> dict:
    from moto.server import ThreadedMotoServer
    import boto3

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="bench")
        t1, rss1, _ = measured(CLI + ["export", "--source", source, "--to", "s3://bench/run"], env)
        target = empty(server, "imp", "2.10.5")
        t2, rss2, _ = measured(CLI + ["import", "--from", "s3://bench/run", "--target", target], env)
    finally:
        moto.stop()
    return {"seconds": round(t1 + t2, 2), "export_seconds": round(t1, 2), "import_seconds": round(t2, 2),
            "peak_rss_mb": max(rss1, rss2)}


def upgrade_comparison(server: Server, dag_runs: int) -> dict:
    from etl import airflow_release

    source = empty(server, "src110", "1.10.15")
    measured(CLI + ["sample", "--airflow-version", "1.10.15", "--target", source, "--dag-runs", str(dag_runs)])
    target = empty(server, "ours110", "2.10.5")
    ours, rss, _ = measured(CLI + ["migrate", "--source", source, "--target", target])
    airflow_release.ensure_venv("2.10.5")
    copy_started = time.perf_counter()
    upgraded = server.create("theirs", template=urls.normalize(source).database)
    airflow_release.migrate_db("2.10.5", upgraded)
    theirs = time.perf_counter() - copy_started
    return {"ours_seconds": round(ours, 2), "ours_peak_rss_mb": rss, "airflow_db_migrate_seconds": round(theirs, 2),
            "ratio": round(ours / theirs, 3)}


def render(r: dict) -> str:
    lines = [f"bench {r['date']}: {r['rows']:,} task instances, {r['machine']['cores']} cores, {r['machine']['memory_gib']} GiB"]
    raw = r["raw"]["seconds"]
    lines.append(f"{'job':<28}{'seconds':>10}{'ratio':>8}{'peak RSS MB':>13}")
    lines.append(f"{'raw COPY pipe':<28}{raw:>10.2f}{1.0:>8.2f}{'':>13}")
    m = r["migrate"]
    lines.append(f"{'migrate':<28}{m['seconds']:>10.2f}{m['ratio_to_raw']:>8.2f}{m['peak_rss_mb']:>13}")
    e = r["export_import"]
    lines.append(f"{'export + import (S3)':<28}{e['seconds']:>10.2f}{e['ratio_to_raw']:>8.2f}{e['peak_rss_mb']:>13}")
    if "upgrade_1_10_15" in r:
        u = r["upgrade_1_10_15"]
        lines.append(f"{'1.10.15 -> 2.10.5 ours':<28}{u['ours_seconds']:>10.2f}{u['ratio']:>8.2f}{u['ours_peak_rss_mb']:>13}")
        lines.append(f"{'1.10.15 -> 2.10.5 airflow':<28}{u['airflow_db_migrate_seconds']:>10.2f}{1.0:>8.2f}{'':>13}")
    lines.append("per table, raw seconds: " + ", ".join(f"{k} {v}" for k, v in r["raw"]["tables"].items()))
    return "\n".join(lines)


def _mem_gib() -> int:
    with open("/proc/meminfo") as f:
        return round(int(f.readline().split()[1]) / 1024 / 1024)


if __name__ == "__main__":
    sys.exit(main())
