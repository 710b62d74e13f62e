"""The oracle: our migration of a sampled history against real Airflow's own in-place upgrade of it.

Per pair: a PostgreSQL source of the older release, filled by ``sample`` with faults (task instances
and xcom without their dag run, a repeated 1.10 conn_id, NaN and foreign pickles in conf and xcom,
empty and huge xcom values); a TEMPLATE copy of it upgraded in place by the newer release's own
``airflow db migrate`` (``db upgrade`` before 2.7; a 3.x target through 2.10.5 first, as Airflow
requires); and our ``migrate`` from the untouched source into a fresh database of the newer release.
Every table we load must then hold the same rows as Airflow's, compared by column name (upgraded
schemas order columns differently and keep JSON where fresh ones have JSONB), with references to
surrogate ids followed to the rows they name. ``EXEMPT`` lists every column left out, with the reason;
DEVELOPERS.md ("The oracle") repeats it. Rows Airflow moves aside (``_airflow_moved__*``,
``_xcom_archive``) must be exactly the rows we quarantine with the reason naming that table, and the rows
our target keeps in a table of the same name.
"""
from __future__ import annotations

import collections
import datetime as dt
import json
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from etl import airflow_release, catalog, sample, tables, unpickle, urls
from etl.load.base import SOFT_REFERENCES
from helpers import report

pytestmark = pytest.mark.slow

NEWEST = catalog.versions()[-1]
PAIRS = [("1.10.12", "2.10.5"), ("1.10.12", "3.0.6"), ("1.10.15", "2.10.5"), ("2.2.5", "2.10.5"), ("2.10.5", "3.0.6"), ("2.10.5", NEWEST), ("1.10.15", NEWEST)]
DAG_RUNS, SEED = 30, 7
KEY = Fernet.generate_key().decode()

#: Columns compared otherwise or not at all, and why. Surrogate ids (every integer ``id`` primary key)
#: are never compared: each side numbers its own rows, and references to them are followed instead.
EXEMPT = {
    ("dag", "*"): "only dag_id, is_paused and fileloc travel (tables.DAG_COLUMNS); the DAG processor rewrites the rest "
                  "on its first parse, where Airflow's upgrade keeps the old parse's values",
    ("dag_bundle", "*"): "only the name: the DAG processor's bundle sync sets the rest from its configuration",
    ("task_instance", "id"): "from a 2.x source: Airflow 3.0 fills 74 of a UUIDv7's bits with gen_random_uuid() (d59cbbef95eb); "
                             "compared: version 7 and the 48-bit timestamp, coalesce(queued_dttm, start_date), "
                             "where that is not NULL (else Airflow's clock_timestamp() at upgrade time)",
    ("task_instance_history", "task_instance_id"): "from a 2.x source: Airflow 3.0 gives each row uuid7() of the "
                                                   "upgrade's moment (7645189f3479): compared: version 7, one id per row",
    ("trigger", "kwargs"): "Airflow 2.9 re-writes it Fernet-encrypted (1949afb29106) with a fresh IV and time; "
                           "compared decrypted (Trigger reads the plain JSON we keep as well)",
}
#: Exempt columns that are still compared, once both sides are put in the same form.
COMPARED_AS = {("trigger", "kwargs"): lambda text: _decrypted_kwargs(text)}
#: Tables Airflow's CLI writes itself while upgrading, from its own configuration and clock: rows whose
#: time column is at or after the moment the upgrade started are not the source's history.
WRITTEN_BY_UPGRADE = {"log": "dttm", "log_template": "created_at"}


def _version(v: str) -> tuple[int, ...]:
    return catalog.version_key(v)


def _engine(url: str) -> sa.Engine:
    return urls.open_engine(url)


# -- building the databases ------------------------------------------------------------------------------

class Upgrade:
    def __init__(self, url: str, started: dt.datetime, fixes: dict[str, set[tuple]]):
        self.url, self.started, self.fixes = url, started, fixes


class Lab:
    """The databases of every pair, built once and shared: one source per release, one upgrade per path."""

    def __init__(self, server, tmp: Path):
        self.server, self.tmp = server, tmp
        self.sources: dict[str, str] = {}
        self.upgrades: dict[tuple[str, str], Upgrade] = {}

    def source(self, version: str) -> str:
        if version not in self.sources:
            url = self.server.create("etl_oracle_src")
            engine = _engine(url)
            sample.sample(engine, version, dag_runs=DAG_RUNS, seed=SEED, fernet_key=KEY, faults=True)
            engine.dispose()
            self.sources[version] = url
        return self.sources[version]

    def upgraded(self, source: str, target: str) -> Upgrade:
        """The source copied and upgraded by real Airflow, after the fixes its pre-upgrade checks demand."""
        if (source, target) not in self.upgrades:
            if _version(target) >= (3,) and _version(source) < (2, 10, 5):
                base = self.upgraded(source, "2.10.5")
                url, fixes, at, started = base.url, {k: set(v) for k, v in base.fixes.items()}, "2.10.5", base.started
            else:
                url, fixes, at, started = self.source(source), {}, source, dt.datetime.now(dt.timezone.utc)
            copy = self.server.create("etl_oracle_up", template=url)
            for table, ids in operator_fixes(copy, at, target).items():
                fixes.setdefault(table, set()).update(ids)
            airflow_release.run_airflow(target, airflow_release.RELEASES[target].migrate_args, copy,
                                        env={"AIRFLOW__CORE__FERNET_KEY": KEY})
            self.upgrades[(source, target)] = Upgrade(copy, started, fixes)
        return self.upgrades[(source, target)]


#: How the rows an operator fixes are named, on both sides, and the words our quarantine reason must hold.
FIXED = {"connection": (("id",), "refuses to upgrade"), "dag_run.conf": (("id",), "stops on it on PostgreSQL"),
         "xcom": (("dag_id", "task_id", "key", "timestamp"), "stops on it")}  # columns every version's xcom has


def operator_fixes(url: str, version: str, target: str) -> dict[str, set[tuple]]:
    """What Airflow refuses to upgrade, fixed the one way that keeps everything else: those rows go.

    - 1.10 to 2.x: ``check_conn_id_duplicates`` and ``check_conn_type_null`` stop on a repeated conn_id
      (the later rows go) and on a NULL conn_type.
    - 2.x to 3.0-3.2 on PostgreSQL: a conf that unpickles to NaN, Infinity or NUL makes e39a26ac59f6's UPDATE
      fail and abort the upgrade; it is set to NULL.
    - 2.x to 3.x: eed27faa34e3 stops on an empty xcom value (``get_byte``), and 3.0, which casts without
      cleaning first, on a value PostgreSQL's jsonb refuses; those xcom rows go.
    PostgreSQL's own jsonb cast decides what it refuses. Each set must be exactly what we quarantine."""
    fixes: dict[str, set[tuple]] = {}
    engine = _engine(url)

    with engine.begin() as conn:
        if _version(version) < (2,):
            ids = conn.execute(sa.text("SELECT c.id FROM connection c WHERE c.conn_type IS NULL OR EXISTS (SELECT 1 "
                                       "FROM connection o WHERE o.conn_id = c.conn_id AND o.id < c.id)")).scalars().all()
            conn.execute(sa.text("DELETE FROM connection WHERE id = ANY(:ids)"), {"ids": list(ids)})
            fixes["connection"] = {(i,) for i in ids}
        if _version(version) < (3,) <= _version(target):
            bad_conf = set()
            for run_id, conf in conn.execute(sa.text("SELECT id, conf FROM dag_run WHERE conf IS NOT NULL")):
                try:
                    text = json.dumps(unpickle.loads(bytes(conf)))
                except (unpickle.PickleRefused, unpickle.PickleUnreadable, TypeError, ValueError):
                    continue  # Airflow's except clause leaves these NULL and carries on
                if _version(target) < (3, 3) and _cast_fails(conn, text.encode()):
                    bad_conf.add(run_id)
            conn.execute(sa.text("UPDATE dag_run SET conf = NULL WHERE id = ANY(:ids)"), {"ids": list(bad_conf)})
            fixes["dag_run.conf"] = {(i,) for i in bad_conf}
            bad_xcom = set()
            keys = FIXED["xcom"][0]
            for row in conn.execute(sa.text(f"SELECT {', '.join(keys)}, value FROM xcom WHERE value IS NOT NULL")):
                value = bytes(row.value)
                if not value or (_version(target) < (3, 1) and value[:1] != b"\x80" and _cast_fails(conn, value)):
                    bad_xcom.add(tuple(_plain(v) for v in row[:-1]))
            for key in bad_xcom:
                conn.execute(sa.text(f"DELETE FROM xcom WHERE {' AND '.join(f'{k} = :{k}' for k in keys)}"), dict(zip(keys, key)))
            fixes["xcom"] = bad_xcom
    engine.dispose()
    return fixes


def _cast_fails(conn: sa.Connection, value: bytes) -> bool:
    """Whether ``CAST(convert_from(value, 'UTF8') AS JSONB)``, Airflow 3.0's conversion, fails on PostgreSQL."""
    try:
        with conn.begin_nested():
            conn.execute(sa.text("SELECT CAST(convert_from(:v, 'UTF8') AS jsonb)"), {"v": value})
        return False
    except sa.exc.DBAPIError:
        return True


def fingerprint(url: str) -> dict[str, str]:
    """An md5 of every table's rows, to show the source is only read."""
    engine = _engine(url)
    with engine.connect() as conn:
        out = {t: conn.execute(sa.text(f'SELECT md5(coalesce(string_agg(r::text, \'|\' ORDER BY r::text), \'\')) '
                                       f'FROM "{t}" r')).scalar_one() for t in sa.inspect(engine).get_table_names()}
    engine.dispose()
    return out


def read_quarantine(stage: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted((stage / "quarantine").glob("**/*.parquet")):  # quarantine/<target>/<run>/<table>/
        out.setdefault(f.parent.name, []).extend(pq.read_table(f).to_pylist())
    return out


@pytest.fixture(scope="module")
def lab(pg_server, tmp_path_factory):
    return Lab(pg_server, tmp_path_factory.mktemp("oracle"))


# -- reading a database for comparison ---------------------------------------------------------------------

def _plain(value):
    """One representation per value whichever driver type or column type holds it: JSON or JSONB, and
    TIMESTAMP WITHOUT TIME ZONE (UTC by Airflow's convention) where an upgraded schema kept an old column's type."""
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class Snapshot:
    """Every row of the compared tables, with references to surrogate ids replaced by what they refer to."""

    def __init__(self, url: str, names: list[str]):
        engine = _engine(url)
        meta = sa.MetaData()
        present = set(sa.inspect(engine).get_table_names())
        meta.reflect(engine, only=[n for n in names if n in present] + [t for t in ("job", "dag_run", "trigger",
                                                                                     "log_template", "task_instance")
                                                                         if t in present and t not in names])
        self.tables = meta.tables
        self.rows: dict[str, list[dict]] = {}
        with engine.connect() as conn:
            for name, table in self.tables.items():
                forms = {c: f for (t, c), f in COMPARED_AS.items() if t == name}
                self.rows[name] = [{k: forms[k](_plain(v)) if k in forms else _plain(v) for k, v in r._mapping.items()}
                                   for r in conn.execute(sa.select(table))]
        engine.dispose()
        self._by_id: dict[str, dict] = {}

    def refs(self, name: str) -> dict[str, str]:
        table = self.tables[name]
        out = {fk.parent.name: fk.column.table.name for fk in table.foreign_keys
               if fk.column.name == "id" and fk.parent.name != "id"}
        out.update({c: t for c, t in SOFT_REFERENCES.get(name, {}).items() if c in table.c and t in self.tables})
        return out

    def surrogate(self, name: str) -> bool:
        """An integer id the database assigned (a UUID id is data: kept, or made by a rule)."""
        pk = list(self.tables[name].primary_key.columns)
        return [c.name for c in pk] == ["id"] and isinstance(pk[0].type, sa.Integer)

    def resolved(self, name: str, row: dict, drop: set[str]) -> dict:
        out = {}
        refs = self.refs(name)
        for col, value in row.items():
            if col in drop or (col == "id" and self.surrogate(name)):
                continue
            if col in refs and value is not None:
                value = ("->", refs[col], self.referred(refs[col], value))
            out[col] = value
        return out

    def referred(self, name: str, id_) -> tuple:
        if name not in self._by_id:
            self._by_id[name] = {r["id"]: r for r in self.rows[name]}
        row = self._by_id[name].get(id_)
        if row is None:
            return ("dangling", id_)
        return tuple(sorted(self.resolved(name, row, {"id"}).items(), key=lambda kv: kv[0]))  # the row, not its id


def _counter(rows: list[dict]) -> collections.Counter:
    return collections.Counter(tuple(sorted(r.items(), key=lambda kv: kv[0])) for r in rows)


def _uuid_ms(text: str) -> int:
    return uuid.UUID(text).int >> 80


def _decrypted_kwargs(text: str) -> str:
    plain = text if text.startswith("{") else Fernet(KEY.encode()).decrypt(text.encode()).decode()
    return json.dumps(json.loads(plain), sort_keys=True)


# -- the test ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_our_migration_gives_the_rows_airflows_own_upgrade_gives(lab, pg_server, source, target):
    upgraded = lab.upgraded(source, target)
    ours = pg_server.create("etl_oracle_ours")
    stage = lab.tmp / f"{source}-{target}"
    before = fingerprint(lab.source(source))
    migrated = report("migrate", "--source", lab.source(source), "--target", ours, "--target-version", target,
                      "--via", str(stage))
    assert fingerprint(lab.source(source)) == before, "the source changed"
    quarantine = read_quarantine(stage)

    fresh = catalog.load(target).tables
    # dag_bundle is no history, but 3.1's migration and our dag rule both write its rows
    names = [t for t in sorted(fresh, key=tables.load_rank) if tables.is_default(t) or t == "dag_bundle"]
    theirs_db, ours_db = Snapshot(upgraded.url, names), Snapshot(ours, names)
    differences, compared = [], {}
    for name in names:
        if name not in theirs_db.tables:
            differences.append(f"{name}: Airflow's upgrade has no such table")
            continue
        theirs_rows, ours_rows = theirs_db.rows[name], ours_db.rows[name]
        if name in WRITTEN_BY_UPGRADE:
            when = WRITTEN_BY_UPGRADE[name]
            theirs_rows = [r for r in theirs_rows if r[when] is None or r[when] < upgraded.started]
        theirs_cols = {c.name for c in theirs_db.tables[name].c}
        ours_cols = {c.name for c in ours_db.tables[name].c}
        if theirs_cols != ours_cols:
            differences.append(f"{name}: columns only in Airflow's {sorted(theirs_cols - ours_cols)}, "
                               f"only in ours {sorted(ours_cols - theirs_cols)}")
        uuids_made = _version(source) < (3,)  # else the source's own UUIDs, which must be kept
        drop = {c for (t, c) in EXEMPT if t == name and (t, c) not in COMPARED_AS
                and (uuids_made or t not in ("task_instance", "task_instance_history"))} | (theirs_cols ^ ours_cols)
        if name in ("dag", "dag_bundle"):
            drop = (theirs_cols | ours_cols) - set(tables.DAG_COLUMNS if name == "dag" else ("name",))
        checks = _exempt_checks(name, theirs_rows, ours_rows) if uuids_made else []
        differences.extend(checks)
        a = [theirs_db.resolved(name, r, drop) for r in theirs_rows]
        b = [ours_db.resolved(name, r, drop) for r in ours_rows]
        compared[name] = (len(a), len(b))
        ca, cb = _counter(a), _counter(b)
        if ca != cb:
            only_a, only_b = list((ca - cb).elements()), list((cb - ca).elements())
            differences.append(f"{name}: {len(a)} rows in Airflow's, {len(b)} in ours; "
                               f"{len(only_a)} only in Airflow's, e.g. {_show(only_a[:2], only_b)}; "
                               f"{len(only_b)} only in ours, e.g. {_show(only_b[:2], only_a)}")
    differences.extend(_moved_aside(upgraded, quarantine, ours))
    differences.extend(_fixes_are_our_quarantine(upgraded.fixes, quarantine))
    not_carried = {t: v.get("not_in_target", 0) for t, v in migrated["tables"].items() if v.get("not_in_target")}
    differences.extend(_left_behind(upgraded.url, not_carried, fresh))
    assert not differences, "\n".join(differences)
    assert all(compared[t][0] > 0 for t in ("dag_run", "task_instance", "job", "log", "variable")), compared


def _show(rows: list[tuple], others: list[tuple]) -> str:
    """The rows, each cut down to the columns where it differs from its nearest counterpart."""
    out = []
    for row in rows:
        d = dict(row)
        near = max(others, key=lambda o: sum(dict(o).get(k) == v for k, v in d.items()), default=())
        other = dict(near)
        out.append({k: _brief(v) for k, v in d.items() if other.get(k) != v or k in ("dag_id", "task_id", "run_id")})
    return repr(out)[:1500]


def _brief(value):
    """A followed reference, shown by the referred row's natural columns only."""
    if isinstance(value, tuple) and value[:1] == ("->",) and value[2][:1] != ("dangling",):
        named = {k: v for k, v in value[2] if k in ("dag_id", "task_id", "run_id", "map_index", "job_type", "start_date")}
        return f"{value[1]}{named}"
    return value


def _exempt_checks(name: str, theirs: list[dict], ours: list[dict]) -> list[str]:
    """What can still be compared of the exempt UUID columns."""
    problems = []
    if name == "task_instance" and theirs and "id" in theirs[0]:
        def stamps(rows):
            out = {}
            for r in rows:
                when = r.get("queued_dttm") or r.get("start_date")
                out[(r["dag_id"], r["task_id"], r["run_id"], r["map_index"])] = (
                    uuid.UUID(r["id"]).version, _uuid_ms(r["id"]) if when else None,
                    round(when.timestamp() * 1000) if when else None)
            return out

        for side, rows in (("Airflow's", theirs), ("ours", ours)):
            bad = [(k, v) for k, v in stamps(rows).items() if v[0] != 7 or v[1] != v[2]]
            if bad:
                problems.append(f"task_instance.id ({side}): not UUIDv7 of coalesce(queued_dttm, start_date): {bad[:3]}")
    if name == "task_instance_history" and theirs and "task_instance_id" in theirs[0]:
        for side, rows in (("Airflow's", theirs), ("ours", ours)):
            ids = [r["task_instance_id"] for r in rows]
            if len(set(ids)) != len(ids) or any(uuid.UUID(i).version != 7 for i in ids):
                problems.append(f"task_instance_history.task_instance_id ({side}): not one UUIDv7 per row")
    return problems


def _moved_aside(upgraded: Upgrade, quarantine: dict[str, list[dict]], ours_url: str) -> list[str]:
    """Each table Airflow moved rows to holds the rows our quarantine names that table for, and our target
    has the same table with the same rows (ids aside: each database numbers its own runs)."""
    engine = _engine(upgraded.url)
    present = sa.inspect(engine).get_table_names()
    problems = []
    moved = sorted(t for t in present if tables.kept_aside(t))
    ours_engine = _engine(ours_url)
    ours_present = set(sa.inspect(ours_engine).get_table_names())
    with engine.connect() as conn, ours_engine.connect() as ours_conn:
        for name in moved:
            rows = [{k: _plain(v) for k, v in r._mapping.items()} for r in conn.execute(sa.text(f'SELECT * FROM "{name}"'))]
            kept = [{k: _plain(v) for k, v in r._mapping.items()}
                    for r in ours_conn.execute(sa.text(f'SELECT * FROM "{name}"'))] if name in ours_present else []
            if rows and kept and set(rows[0]) != set(kept[0]):
                problems.append(f"{name}: Airflow's columns {sorted(rows[0])}, ours {sorted(kept[0])}")
            same = (set(rows[0]) if rows else set()) - {"id", "dag_run_id"}
            a = collections.Counter(tuple(r.get(c) for c in sorted(same)) for r in rows)
            b = collections.Counter(tuple(r.get(c) for c in sorted(same)) for r in kept)
            if a != b:
                problems.append(f"{name}: Airflow keeps {len(rows)} rows, our target {len(kept)}: only Airflow's "
                                f"{list((a - b).elements())[:2]}, only ours {list((b - a).elements())[:2]}")
            table = name.rsplit("__", 1)[-1] if name.startswith("_airflow_moved__") else "xcom"
            ours = [r for r in quarantine.get(table, []) if name in r["reason"]]
            common = (set(rows[0]) if rows else set()) & (set(ours[0]) if ours else set()) - {"id", "reason"}
            keys = sorted(c for c in common if c in ("dag_id", "task_id", "run_id", "execution_date", "key", "map_index"))
            a = collections.Counter(tuple(_plain(r[c]) for c in keys) for r in rows)
            b = collections.Counter(tuple(_plain(r[c]) for c in keys) for r in ours)
            if (rows or ours) and (not keys or a != b):
                problems.append(f"{name}: Airflow moved {len(rows)} rows, we quarantined {len(ours)} naming it "
                                f"(compared on {keys}): only Airflow's {list((a - b).elements())[:3]}, "
                                f"only ours {list((b - a).elements())[:3]}")
    engine.dispose()
    ours_engine.dispose()
    named = {r["reason"] for rows in quarantine.values() for r in rows if "_airflow_moved__" in r["reason"]
             or "_xcom_archive" in r["reason"]}
    for reason in named:
        if not any(m in reason for m in moved):
            problems.append(f"we quarantined rows saying {reason!r}, but Airflow's upgrade has no such table")
    return problems


def _fixes_are_our_quarantine(fixes: dict[str, set[tuple]], quarantine: dict[str, list[dict]]) -> list[str]:
    """The rows an operator had to fix for Airflow are the rows we set aside, with the reason why."""
    problems = []
    for table, (keys, words) in FIXED.items():
        ours = {tuple(_plain(r[k]) for k in keys) for r in quarantine.get(table, []) if words in r["reason"]}
        if ours != fixes.get(table, set()):
            problems.append(f"{table}: rows fixed for Airflow {sorted(fixes.get(table, ()))}, "
                            f"quarantined by us saying {words!r} {sorted(ours)}")
    return problems


def _left_behind(url: str, not_carried: dict[str, int], fresh: dict) -> list[str]:
    """Tables Airflow's upgrade keeps with rows but a fresh target schema lacks: we report the same rows."""
    engine = _engine(url)
    problems = []
    with engine.connect() as conn:
        for name in sa.inspect(engine).get_table_names():
            if name in fresh or not tables.is_default(name) or name.startswith("_airflow_moved__"):
                continue
            n = conn.execute(sa.text(f'SELECT count(*) FROM "{name}"')).scalar_one()
            if n != not_carried.get(name, 0):
                problems.append(f"{name}: Airflow keeps {n} rows in a table the fresh schema lacks; we report "
                                f"{not_carried.get(name, 0)} not carried")
    engine.dispose()
    return problems
