"""bin/bench: our figures next to the physical limit, measured in one run on one machine.

Absolute times on a shared two-core machine drift from run to run, so every figure that
matters is a ratio against a baseline measured minutes apart in the same run:

- raw: ``COPY t TO STDOUT (FORMAT binary) | COPY t FROM STDIN (FORMAT binary)`` per table, into an
  empty target made from the same schema (PostgreSQL's own limit for moving these rows), and
  ``COPY t TO STDOUT (FORMAT binary)`` alone, the limit for an export;
- migrate: our direct migration into an empty target;
- export + import: through moto's S3 server over HTTP;
- upgrade: a 1.10.15 source of the same size, our migration to 2.10.5 against a template copy of
  it upgraded in place by real Airflow 2.10.5's ``airflow db migrate``;
- memory (``--rows`` above 1M): peak RSS of migrate, export and import at that size against the
  same jobs at 1M, which must stay within 20%.

Sources are ANALYZEd after sampling, as autovacuum would have done in a live deployment (the
project's servers run without it), so that Airflow's own upgrade is not timed on a planner
without statistics. Peak RSS is the child process's own maximum (its VmHWM), not the bench's.
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
    """(seconds, peak RSS in MB, stdout) of one child process.

    The peak is the child's VmHWM, sampled while it runs; it starts again at exec. wait4's
    ru_maxrss would also count the pages the child had before exec, a copy of this process,
    which grows with moto's in-memory bucket."""
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)
    streams: dict[str, str] = {}
    done, peak = threading.Event(), [0]

    def watch():
        while not done.is_set():
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak[0] = max([peak[0], *(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))])
            except OSError:
                return
            done.wait(0.2)

    threads = [threading.Thread(target=lambda n=n, f=f: streams.__setitem__(n, f.read())) for n, f in
               (("out", proc.stdout), ("err", proc.stderr))] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    _, status, _ = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if proc.returncode:
        err = streams.get("err", "").strip()
        raise SystemExit(f"bench: {' '.join(cmd[2:4])} failed: {err.splitlines()[-1] if err else proc.returncode}")
    return seconds, peak[0] // 1024, streams.get("out", "")


def row_counts(url: str) -> dict[str, int]:
    engine = urls.open_engine(url)
    with engine.connect() as conn:
        present = sa.inspect(conn).get_table_names()
        counts = {t: conn.execute(sa.select(sa.func.count()).select_from(sa.table(t))).scalar_one() for t in tables.select(present)}
    engine.dispose()
    return {t: n for t, n in counts.items() if n}


def raw_out(source: str, names: list[str]) -> dict[str, float]:
    """psql COPY out into /dev/null, table by table: what an export cannot beat."""
    src = urls.normalize(source)
    times = {}
    for name in names:
        start = time.perf_counter()
        with open(os.devnull, "wb") as sink:
            subprocess.run(["psql", "-qAt", "-h", src.host, "-U", src.username, "-d", src.database, "-c",
                            f'COPY "{name}" TO STDOUT (FORMAT binary)'], stdout=sink, check=True)
        times[name] = time.perf_counter() - start
    return times


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
        source, result["sample_seconds"] = sampled(server, "src", "2.10.5", args.rows)
        counts = row_counts(source)
        result["source_rows"] = counts

        out = raw_out(source, list(counts))
        result["raw_out"] = {"seconds": round(sum(out.values()), 2), "tables": {k: round(v, 2) for k, v in out.items()}}
        raw_target = empty(server, "raw", "2.10.5")
        raw = raw_pipe(source, raw_target, list(counts))
        result["raw"] = {"seconds": round(sum(raw.values()), 2), "tables": {k: round(v, 2) for k, v in raw.items()}}

        result["migrate"] = migrate(server, source)
        result["migrate"]["ratio_to_raw"] = round(result["migrate"]["seconds"] / result["raw"]["seconds"], 3)
        result["export_import"] = export_import(server, source)
        result["export_import"]["ratio_to_raw"] = round(result["export_import"]["seconds"] / result["raw"]["seconds"], 3)
        result["export_import"]["export_speed_vs_raw_out"] = round(result["raw_out"]["seconds"] / result["export_import"]["export_seconds"], 3)
        ti_out, ti_export = out.get("task_instance"), result["export_import"]["export_tables"].get("task_instance")
        if ti_out and ti_export:
            result["export_import"]["task_instance_export_speed_vs_raw_out"] = round(ti_out / ti_export, 3)

        if not args.skip_airflow:
            result["upgrade_1_10_15"] = upgrade_comparison(server, args.rows)
        if args.rows > 1_000_000:
            result["memory"] = memory_check(server, result)
    finally:
        server.drop_all()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 0


def sampled(server: Server, role: str, version: str, rows: int) -> tuple[str, float]:
    """A new database filled by ``sample`` with about ``rows`` task instances, analyzed. The sample
    creates the schema itself, so that it loads without indexes and foreign keys and builds them
    at the end: checked row by row before any statistics exist, a foreign key's look-up is a scan."""
    source = server.create(role)
    t, _, _ = measured(CLI + ["sample", "--airflow-version", version, "--target", source, "--dag-runs", str(max(1, rows // 20))])
    engine = sa.create_engine(urls.normalize(source), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return source, round(t, 1)


def migrate(server: Server, source: str) -> dict:
    target = empty(server, "ours", "2.10.5")
    t, rss, out = measured(CLI + ["migrate", "--source", source, "--target", target, "--json"])
    report = json.loads(out)
    return {"seconds": round(t, 2), "peak_rss_mb": rss, "tables": report.get("seconds_per_table", {})}


def memory_check(server: Server, big: dict) -> dict:
    """The same jobs on a 1M-row source: peak RSS must not grow with the size of the history."""
    source, _ = sampled(server, "src1m", "2.10.5", 1_000_000)
    small = {"migrate": migrate(server, source)["peak_rss_mb"], **{
        k: v for k, v in export_import(server, source).items() if k.endswith("rss_mb")}}
    large = {"migrate": big["migrate"]["peak_rss_mb"], **{k: v for k, v in big["export_import"].items() if k.endswith("rss_mb")}}
    growth = {k: round(large[k] / small[k] - 1, 3) for k in small}
    return {"peak_rss_mb_1m": small, f"peak_rss_mb_{big['rows'] // 1_000_000}m": large, "growth": growth,
            "within_20_percent": all(g <= 0.20 for g in growth.values())}


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
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")
        if "bench" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket="bench")
        dest = f"s3://bench/{uuid.uuid4().hex[:8]}"  # moto keeps its buckets for the whole process
        t1, rss1, exported = measured(CLI + ["export", "--source", source, "--to", dest, "--json"], env)
        target = empty(server, "imp", "2.10.5")
        t2, rss2, out = measured(CLI + ["import", "--from", dest, "--target", target, "--json"], env)
    finally:
        moto.stop()
    return {"seconds": round(t1 + t2, 2), "export_seconds": round(t1, 2), "import_seconds": round(t2, 2),
            "export_peak_rss_mb": rss1, "import_peak_rss_mb": rss2, "import_tables": json.loads(out).get("seconds_per_table", {}),
            "export_tables": json.loads(exported).get("seconds_per_table", {})}


def upgrade_comparison(server: Server, rows: int) -> dict:
    from etl import airflow_release

    source, _ = sampled(server, "src110", "1.10.15", rows)
    target = empty(server, "ours110", "2.10.5")
    ours, rss, out = measured(CLI + ["migrate", "--source", source, "--target", target, "--json"])
    airflow_release.ensure_venv("2.10.5")
    copy_started = time.perf_counter()
    upgraded = server.create("theirs", template=urls.normalize(source).database)
    airflow_release.migrate_db("2.10.5", upgraded)
    theirs = time.perf_counter() - copy_started
    return {"ours_seconds": round(ours, 2), "ours_peak_rss_mb": rss, "airflow_db_migrate_seconds": round(theirs, 2),
            "ratio": round(ours / theirs, 3), "ours_tables": json.loads(out).get("seconds_per_table", {})}


def render(r: dict) -> str:
    raw, counts = r["raw"]["seconds"], r["source_rows"]
    lines = [f"bench {r['date']}: {r['rows']:,} task instances requested, {r['machine']['cores']} cores, "
             f"{r['machine']['memory_gib']} GiB; {sum(counts.values()):,} rows in {len(counts)} tables"]
    lines.append(f"{'job':<34}{'seconds':>10}{'ratio':>8}{'peak RSS MB':>13}  target")
    row = lambda name, sec, ratio, rss="", goal="": lines.append(f"{name:<34}{sec:>10.2f}{ratio:>8.2f}{rss:>13}  {goal}")
    row("raw COPY pipe", raw, 1.0)
    m, e = r["migrate"], r["export_import"]
    row("migrate", m["seconds"], m["ratio_to_raw"], m["peak_rss_mb"],
        _goal(m["ratio_to_raw"] <= 1.25, "<= 1.25") + ", " + _goal(m["peak_rss_mb"] < 300, "< 300 MB"))
    row("export + import (S3)", e["seconds"], e["ratio_to_raw"], max(e["export_peak_rss_mb"], e["import_peak_rss_mb"]),
        _goal(e["ratio_to_raw"] <= 1.5, "<= 1.5") + ", " +
        _goal(max(e["export_peak_rss_mb"], e["import_peak_rss_mb"]) < 300, "< 300 MB"))
    row("raw COPY out (to /dev/null)", r["raw_out"]["seconds"], 1.0)
    row("export alone (S3)", e["export_seconds"], e["export_seconds"] / r["raw_out"]["seconds"], e["export_peak_rss_mb"],
        f"speed {e['export_speed_vs_raw_out']:.2f} of raw, " + _goal(e["export_peak_rss_mb"] < 300, "< 300 MB"))
    if "task_instance_export_speed_vs_raw_out" in e:
        ti = e["task_instance_export_speed_vs_raw_out"]
        row("task_instance export (S3)", e["export_tables"]["task_instance"], 1 / ti, "",
            _goal(ti >= 1 / 3, f"speed {ti:.2f} of raw COPY TO >= 0.33"))
    if "upgrade_1_10_15" in r:
        u = r["upgrade_1_10_15"]
        row("1.10.15 -> 2.10.5 airflow db migrate", u["airflow_db_migrate_seconds"], 1.0)
        row("1.10.15 -> 2.10.5 ours", u["ours_seconds"], u["ratio"], u["ours_peak_rss_mb"], _goal(u["ratio"] < 1, "< 1"))
    old = r.get("upgrade_1_10_15", {}).get("ours_tables", {})
    lines.append(f"per table: seconds, ratio to the raw pipe of the table (migrate: also rows/s){'':>6}"
                 f"{'import':>15}{'from 1.10.15':>15}{'export vs raw out':>22}")
    lines.append(f"{'table':<30}{'rows':>10}{'raw':>7}{'migrate':>9}{'rows/s':>9}{'ratio':>6}{'s':>8}{'ratio':>7}{'s':>8}{'ratio':>7}"
                 f"{'out':>7}{'export':>8}{'speed':>7}")
    for name, n in counts.items():
        base = r["raw"]["tables"].get(name)
        ours, imp, up = m["tables"].get(name), e["import_tables"].get(name), old.get(name)
        if base is None or ours is None:
            continue
        cell = lambda v: f"{v:>8.2f}{v / max(base, 1e-9):>7.2f}" if v is not None else f"{'':>15}"
        raw_out, exp = r["raw_out"]["tables"].get(name), e.get("export_tables", {}).get(name)
        speed = f"{raw_out:>7.2f}{exp:>8.2f}{raw_out / max(exp, 1e-9):>7.2f}" if raw_out is not None and exp is not None else ""
        lines.append(f"{name:<30}{n:>10,}{base:>7.2f}{ours:>9.2f}{n / max(ours, 1e-9):>9,.0f}{ours / max(base, 1e-9):>6.2f}"
                     f"{cell(imp)}{cell(up)}{speed}")
    if "memory" in r:
        mem = r["memory"]
        lines.append("peak RSS MB at 1M vs this size: " + ", ".join(
            f"{k} {mem['peak_rss_mb_1m'][k]} -> {v} ({mem['growth'][k]:+.0%})" for k, v in list(mem.values())[1].items())
            + f"; {_goal(mem['within_20_percent'], 'within 20%')}")
    return "\n".join(lines)


def _goal(met: bool, what: str) -> str:
    return f"{'met' if met else 'MISSED'} ({what})"


def _mem_gib() -> int:
    with open("/proc/meminfo") as f:
        return round(int(f.readline().split()[1]) / 1024 / 1024)


if __name__ == "__main__":
    sys.exit(main())
