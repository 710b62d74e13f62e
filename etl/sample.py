"""A seeded, realistic Airflow history for any catalog version: the demo's source, the tests' fixtures, the bench's load.

Rows are generated per block of dag runs as columns, typed by the catalog and written through
the load stage's bulk paths (COPY on PostgreSQL), so a million task instances take minutes.
What a version stores and how (pickled or JSON conf, run_id or execution_date keys, UUID task
instances) is read from the catalog's column list and types rather than from version numbers
wherever the schema says it; the rest (which run id styles and states a release produced)
follows the version. "Now" is a fixed anchor, so the same arguments always give the same rows.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import pickle
import random
import uuid
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from . import catalog
from .load.base import dialect_for

ANCHOR = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
TASKS_PER_RUN = 20
BLOCK = 2_000  # dag runs generated and written together
DAGS = ("etl_daily", "reporting", "ml_training", "sensor_heavy", "fan_out")
STATES = ("success", "success", "success", "failed", "upstream_failed", "skipped", "up_for_retry", "up_for_reschedule",
          "running", "queued", "scheduled", "removed", None)


class History:
    """Generates the rows of one sample; one instance per ``sample`` call."""

    def __init__(self, version: str, seed: int, fernet_key: str | None, faults: bool):
        self.version, self.schema = version, catalog.load(version)
        self.v = catalog.version_key(version)
        self.rng = random.Random(seed)
        self.seed, self.faults = seed, faults
        self.fernet = _fernet(fernet_key)
        self.job_id = 0
        self.ids: dict[str, int] = {}

    def resume(self, engine: sa.Engine) -> int:
        """On a database that already has a sample, carry on after it (more history, as a live source grows)."""
        with engine.connect() as conn:
            runs = conn.execute(sa.text("SELECT count(*) FROM dag_run")).scalar_one()
            if not runs:
                return 0
            for table, spec in self.schema.tables.items():
                if any(c["name"] == "id" and c.get("autoincrement") for c in spec["columns"]):
                    ids = sa.table(table, sa.column("id"))
                    self.ids[table] = conn.execute(sa.select(sa.func.coalesce(sa.func.max(ids.c.id), 0))).scalar_one()
            self.job_id = self.ids.get("job", 0)
        return runs

    def has(self, table: str, column: str | None = None) -> bool:
        if table not in self.schema.tables:
            return False
        return column is None or any(c["name"] == column for c in self.schema.columns(table))

    def nullable(self, table: str, column: str) -> bool:
        return any(c["name"] == column and c["nullable"] for c in self.schema.columns(table))

    def ctype(self, table: str, column: str) -> str:
        return next(c["type"] for c in self.schema.columns(table) if c["name"] == column).upper()

    def next_id(self, table: str) -> int:
        self.ids[table] = self.ids.get(table, 0) + 1
        return self.ids[table]

    def uuid(self, *parts: Any) -> str:
        digest = hashlib.sha256(repr((self.seed,) + parts).encode()).digest()
        return str(uuid.UUID(bytes=digest[:16], version=4))

    # -- configuration ---------------------------------------------------------------------------
    def config(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {"slot_pool": [], "variable": [], "connection": []}
        for i, (pool, slots) in enumerate((("default_pool", 128), ("etl_pool", 8), ("ml_pool", 2))):
            out["slot_pool"].append({"id": i + 1, "pool": pool, "slots": slots, "description": "" if i else "Default pool",
                                     "include_deferred": False})
        for i, (key, val) in enumerate((("env", "prod"), ("api_token", "s3cr3t-ÄÖ-🚀"), ("empty", ""),
                                        ("json_cfg", json.dumps({"a": [1, 2], "b": None})))):
            encrypt = self.fernet is not None and i % 2 == 1
            out["variable"].append({"id": i + 1, "key": key, "val": self.encrypt(val) if encrypt else val,
                                    "is_encrypted": encrypt, "description": None if i else "deployment"})
        conns = [("postgres_default", "postgres", "db.internal", "pw1", '{"sslmode": "require"}'),
                 ("aws_default", "aws", None, None, '{"region_name": "eu-west-1"}'),
                 ("http_api", "http", "api.example.com", "tok", None)]
        if self.faults and self.v < (2,):
            conns.append(("postgres_default", "postgres", "old.internal", "pw0", None))  # 1.10 had no unique conn_id
            conns.append(("typeless", None, "x.internal", None, None))  # nor a required conn_type
        if self.faults:  # NULLs the ORM never wrote but old databases hold (Airflow 3.2's 888b59e02a5b fills them)
            if self.nullable("variable", "val"):
                out["variable"].append({"id": 5, "key": "unset", "val": None, "is_encrypted": None, "description": None})
            if self.nullable("slot_pool", "slots"):
                out["slot_pool"].append({"id": 4, "pool": "legacy_pool", "slots": None, "description": None,
                                         "include_deferred": False})
        for i, (cid, ctype, host, pw, extra) in enumerate(conns):
            enc = self.fernet is not None
            out["connection"].append({"id": i + 1, "conn_id": cid, "conn_type": ctype, "host": host, "schema": "", "login": "airflow",
                                      "password": self.encrypt(pw) if enc and pw else pw, "port": 5432 if ctype == "postgres" else None,
                                      "extra": self.encrypt(extra) if enc and extra else extra, "is_encrypted": bool(enc and pw),
                                      "is_extra_encrypted": bool(enc and extra), "description": None})
        unset = self.faults and self.nullable("dag", "is_paused")
        out["dag"] = [{"dag_id": d, "is_paused": None if unset and i == 4 else i == 2, "is_active": True, "is_stale": False, "fileloc": f"/dags/{d}.py",
                       "owners": "airflow", "bundle_name": "dags-folder", "timetable_type": "CronTriggerTimetable",
                       "max_active_tasks": 16, "max_active_runs": 16, "max_consecutive_failed_dag_runs": 0,
                       "has_task_concurrency_limits": False, "schedule_interval": '"@daily"', "timetable_summary": "@daily"}
                      for i, d in enumerate(DAGS)]
        if self.has("dag_bundle"):
            out["dag_bundle"] = [{"name": "dags-folder", "active": True}]
        if self.has("log_template"):
            out["log_template"] = [{"id": 1, "filename": "{{ ti.dag_id }}/{{ ti.task_id }}/{{ ts }}/{{ try_number }}.log",
                                    "elasticsearch_id": "{dag_id}-{task_id}-{execution_date}-{try_number}", "created_at": ANCHOR}]
        self.job_id += 1
        out["job"] = [{"id": self.job_id, "dag_id": None, "state": "running", "job_type": "SchedulerJob",
                       "start_date": ANCHOR - dt.timedelta(days=30), "latest_heartbeat": ANCHOR - dt.timedelta(days=1),
                       "executor_class": "LocalExecutor", "hostname": "scheduler-0", "unixname": "airflow"}]
        datasets = "asset" if self.has("asset") else "dataset" if self.has("dataset") else None
        if datasets:
            names = ("raw", "clean", "retired") if self.faults else ("raw", "clean")
            out[datasets] = [{"id": i + 1, "uri": f"s3://lake/{n}", "name": f"s3://lake/{n}", "group": "asset", "extra": "{}",
                              "created_at": ANCHOR, "updated_at": ANCHOR, "is_orphaned": n == "retired"} for i, n in enumerate(names)]
            alias = "asset_alias" if self.has("asset_alias") else "dataset_alias" if self.has("dataset_alias") else None
            if alias and self.faults:  # with the faults, to leave the plain sample as other tests know it
                out[alias] = [{"id": 1, "name": "lake-any", "group": "asset"}]
                out[alias + ("_asset" if alias == "asset_alias" else "_dataset")] = [{"alias_id": 1, "dataset_id": 1, "asset_id": 1}]
        return out

    def encrypt(self, value: str) -> str:
        iv = hashlib.sha256(f"{self.seed}:{value}".encode()).digest()[:16]
        return self.fernet._encrypt_from_parts(value.encode(), int(ANCHOR.timestamp()), iv).decode()

    # -- history ----------------------------------------------------------------------------------
    def runs(self, first: int, count: int) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        add = lambda t, row: out.setdefault(t, []).append(row)  # noqa: E731
        for n in range(first, first + count):
            dag_id = DAGS[n % len(DAGS)]
            logical = ANCHOR - dt.timedelta(days=n // len(DAGS) + 1, microseconds=n % 997)
            run = self._run(n, dag_id, logical)
            add("dag_run", run)
            if self.has("dag_run_note") and n % 9 == 0:
                add("dag_run_note", {"dag_run_id": run["id"], "content": f"note ✓ {n}", "created_at": logical, "updated_at": logical})
            for t in range(TASKS_PER_RUN):
                for ti in self._task_instances(n, t, run, logical):
                    add("task_instance", ti)
                    self._around(add, n, t, run, ti, logical)
            if n % 7 == 0 and self.has("sla_miss"):
                add("sla_miss", {"task_id": "task_00", "dag_id": dag_id, "execution_date": logical, "email_sent": False,
                                 "timestamp": logical, "description": None, "notification_sent": False})
            if self.faults and n % 11 == 0 and self.v < (2, 2):
                # A task instance and an xcom whose dag run was deleted: real 1.10 databases have them.
                orphan = logical - dt.timedelta(hours=1)
                add("task_instance", {"task_id": "orphan", "dag_id": dag_id, "execution_date": orphan, "state": "success",
                                      "try_number": 1, "max_tries": 0, "pool": "default_pool", "pool_slots": 1, "queue": "default"})
                add("xcom", self._xcom(n, "orphan", -1, run, orphan, "return_value", 1))
                keys = {"task_id": "orphan", "dag_id": dag_id, "execution_date": orphan}
                add("task_reschedule", {**keys, "id": self.next_id("task_reschedule"), "try_number": 1, "start_date": orphan,
                                        "end_date": orphan, "duration": 1, "reschedule_date": orphan})
                add("task_fail", {**keys, "id": self.next_id("task_fail"), "start_date": orphan, "end_date": orphan, "duration": 1})
                add("rendered_task_instance_fields", {**keys, "rendered_fields": "{}"})
                add("dag_run", {"id": self.next_id("dag_run"), "dag_id": dag_id, "execution_date": orphan - dt.timedelta(hours=1),
                                "run_id": None, "run_type": "manual", "state": "success", "external_trigger": False})
        return out

    def _run(self, n: int, dag_id: str, logical: dt.datetime) -> dict:
        kind = ("scheduled", "scheduled", "scheduled", "manual", "backfill")[n % 5]
        stamp = logical.isoformat()
        if kind == "backfill":
            run_id = f"backfill_{stamp}" if self.v < (2,) or n % 2 else f"backfill__{stamp}"
        else:
            run_id = f"{kind}__{stamp}"
        if self.v >= (2, 4) and n % 13 == 0:
            kind, run_id = ("asset_triggered" if self.v >= (3,) else "dataset_triggered"), f"dataset_triggered__{stamp}"
        state = ("success", "success", "failed", "running", "queued")[n % 5] if n % 3 else "success"
        conf: Any = {"n": n, "who": "ünïcode"} if kind == "manual" else None
        if self.faults and n % 17 == 0 and self.ctype("dag_run", "conf").startswith("BYTEA"):
            conf = {"ratio": float("nan")}  # pickled confs can carry NaN; JSON columns cannot
        if self.faults and n % 17 in (6, 11) and self.ctype("dag_run", "conf").startswith("BYTEA"):
            conf = {"when": logical} if n % 17 == 6 else {}  # a datetime JSON cannot hold; Airflow 3's "empty" pickle
        run = {"id": self.next_id("dag_run"), "dag_id": dag_id, "execution_date": logical, "logical_date": logical,
               "state": state, "run_id": run_id, "external_trigger": kind == "manual", "run_type": kind,
               "conf": self._conf(conf, n), "start_date": logical + dt.timedelta(minutes=1),
               "end_date": logical + dt.timedelta(minutes=30) if state in ("success", "failed") else None,
               "queued_at": logical, "data_interval_start": logical - dt.timedelta(days=1), "data_interval_end": logical,
               "run_after": logical, "last_scheduling_decision": logical, "clear_number": 0, "updated_at": logical,
               "created_at": logical, "log_template_id": 1 if self.has("log_template") else None, "dag_hash": "abc123",
               "creating_job_id": 1, "triggered_by": "TIMETABLE" if kind == "scheduled" else "CLI" if kind == "backfill" else "REST_API"}
        return run

    def _conf(self, conf: Any, n: int):
        if conf is None:
            return None
        if self.ctype("dag_run", "conf").startswith("BYTEA"):
            if self.faults and n % 19 == 0:
                return _foreign_pickle()
            return pickle.dumps(conf, protocol=5 if conf == {} else 2)
        return json.dumps(conf, allow_nan=True)

    def _task_instances(self, n: int, t: int, run: dict, logical: dt.datetime):
        task_id = f"task_{t:02d}"
        mapped = self.has("task_instance", "map_index") and t == TASKS_PER_RUN - 1
        indexes = range(3) if mapped else [-1]
        for mi in indexes:
            state = STATES[(n * 7 + t + mi) % len(STATES)]
            if self.v < (2, 4) and self.v >= (1, 10) and (n + t) % 97 == 0:
                state = "sensing"  # smart sensors, until 2.4 removed them
            if self.has("trigger") and (n + t) % 53 == 0:
                state = "deferred"
            tries = 1 + (n + t) % 3 if state else None if self.faults and self.nullable("task_instance", "try_number") else 0
            started = logical + dt.timedelta(minutes=2 + t, microseconds=mi + 1) if state not in (None, "scheduled", "queued", "removed") else None
            ti = {"task_id": task_id, "dag_id": run["dag_id"], "run_id": run["run_id"], "execution_date": logical,
                  "map_index": mi, "start_date": started, "end_date": started + dt.timedelta(seconds=37) if started else None,
                  "duration": 37.5 if started else None, "state": state, "try_number": tries, "max_tries": None if tries is None else 2,
                  "hostname": "worker-1" if started else "", "unixname": "airflow", "pool": ("default_pool", "etl_pool", "ml_pool")[t % 3],
                  "pool_slots": None if tries is None and self.v < (2,) else 1 if t % 4 else 2, "queue": "default" if t % 5 else "gpu", "priority_weight": TASKS_PER_RUN - t,
                  "operator": ("PythonOperator", "BashOperator", "S3KeySensor")[t % 3], "queued_dttm": logical + dt.timedelta(minutes=1),
                  "pid": 4000 + t if started else None, "executor_config": self._executor_config(t),
                  "custom_operator_name": None, "updated_at": logical, "task_display_name": task_id,
                  "rendered_map_index": str(mi) if mi >= 0 else None, "next_method": None, "next_kwargs": None}
            if self.has("task_instance", "id"):
                ti["id"] = self.uuid("ti", run["run_id"], run["dag_id"], task_id, mi)
            if started:
                self.job_id += 1
                ti["job_id"] = self.job_id
                ti["queued_by_job_id"] = 1
            if state == "deferred":
                ti["trigger_id"] = self.next_id("trigger")
                ti["trigger_timeout"] = logical + dt.timedelta(hours=1)
                ti["next_method"] = "execute_complete"
            yield ti

    def _executor_config(self, t: int):
        if t % 6:
            return None if self.v >= (2,) and t % 2 else pickle.dumps({}, protocol=2)
        value = {"KubernetesExecutor": {"request_memory": "512Mi", "image": "airflow:2"}}
        return pickle.dumps(value, protocol=2)

    def _around(self, add, n: int, t: int, run: dict, ti: dict, logical: dt.datetime) -> None:
        """Everything that hangs off one task instance."""
        mi, started, state = ti["map_index"], ti["start_date"], ti["state"]
        if started:
            add("job", {"id": ti["job_id"], "dag_id": run["dag_id"], "state": "success" if state == "success" else "failed",
                        "job_type": "LocalTaskJob", "start_date": started, "end_date": ti["end_date"], "latest_heartbeat": ti["end_date"],
                        "executor_class": "LocalExecutor", "hostname": "worker-1", "unixname": "airflow"})
        if state == "success" and (t % 2 == 0 or mi >= 0):
            add("xcom", self._xcom(n, ti["task_id"], mi, run, logical, "return_value", t))
        if t == 1 and n % 10 == 0:
            add("xcom", self._xcom(n, ti["task_id"], mi, run, logical, "big", "x" * 100_000))
            add("xcom", self._xcom(n, ti["task_id"], mi, run, logical, "unicode", "naïve ☃ 🚀 中文"))
            add("xcom", self._xcom(n, ti["task_id"], mi, run, logical, "empty", ""))
            if self.faults and self.v >= (2,) and self.ctype("xcom", "value").startswith("BYTEA"):
                add("xcom", self._xcom(n, ti["task_id"], mi, run, logical, "ratio", {"r": float("nan")}))  # json.dumps: NaN
                add("xcom", {**self._xcom(n, ti["task_id"], mi, run, logical, "blank", None), "value": b""})
        if t % 2 == 0 and started:
            add("log", {"id": self.next_id("log"), "dttm": ti["end_date"], "dag_id": run["dag_id"], "task_id": ti["task_id"],
                        "map_index": mi, "execution_date": logical, "logical_date": logical,
                        "run_id": run["run_id"], "owner": "airflow", "owner_display_name": None,
                        "extra": None if t % 4 else '{"host_name": "worker-1"}', "try_number": ti["try_number"],
                        "event": None if self.faults and t == 4 and self.nullable("log", "event") else state or ""})
        if state == "failed" and self.has("task_fail"):
            add("task_fail", {"id": self.next_id("task_fail"), "task_id": ti["task_id"], "dag_id": run["dag_id"], "execution_date": logical,
                              "run_id": run["run_id"], "map_index": mi, "start_date": started, "end_date": ti["end_date"], "duration": 37})
        if state == "up_for_reschedule" and self.has("task_reschedule"):
            add("task_reschedule", {"id": self.next_id("task_reschedule"), "task_id": ti["task_id"], "dag_id": run["dag_id"],
                                    "execution_date": logical, "run_id": run["run_id"], "map_index": mi, "try_number": ti["try_number"],
                                    "ti_id": ti.get("id"), "start_date": logical, "end_date": logical + dt.timedelta(seconds=5),
                                    "duration": 5, "reschedule_date": logical + dt.timedelta(minutes=5)})
        if started and t < 3 and self.has("rendered_task_instance_fields"):
            add("rendered_task_instance_fields", {"dag_id": run["dag_id"], "task_id": ti["task_id"], "execution_date": logical,
                                                  "run_id": run["run_id"], "map_index": mi,
                                                  "rendered_fields": json.dumps({"bash_command": f"echo {n}", "env": None}),
                                                  "k8s_pod_yaml": None})
        if self.has("task_instance_note") and t == 1 and n % 8 == 0:
            add("task_instance_note", {"ti_id": ti.get("id"), "task_id": ti["task_id"], "dag_id": run["dag_id"], "run_id": run["run_id"],
                                       "map_index": mi, "content": "checked", "created_at": logical, "updated_at": logical})
        if self.has("task_map") and mi == 0:
            for upstream in ("task_18",):
                add("task_map", {"dag_id": run["dag_id"], "task_id": upstream, "run_id": run["run_id"], "map_index": -1,
                                 "length": 3, "keys": None})
        if self.has("task_instance_history") and started and ti["try_number"] > 1:
            hist = {k: v for k, v in ti.items()}
            hist.update(try_number=ti["try_number"] - 1, state="failed", id=self.next_id("task_instance_history"))
            if self.has("task_instance_history", "task_instance_id"):
                hist["task_instance_id"] = self.uuid("tih", ti["id"], ti["try_number"] - 1)
            add("task_instance_history", hist)
        if ti.get("trigger_id"):
            add("trigger", {"id": ti["trigger_id"], "classpath": "airflow.triggers.temporal.DateTimeTrigger",
                            # BaseSerialization's form, which Airflow 2.9's 1949afb29106 deserializes
                            "kwargs": json.dumps({"__var": {"moment": {"__type": "datetime", "__var": logical.timestamp()}},
                                                  "__type": "dict"}),
                            "created_date": logical, "triggerer_id": None})
        events = "asset_event" if self.has("asset_event") else "dataset_event" if self.has("dataset_event") else None
        if events and state == "success" and t == 5 and n % 4 == 0:
            eid = self.next_id(events)
            add(events, {"id": eid, "dataset_id": 1 + n % 2, "asset_id": 1 + n % 2, "extra": "{}", "source_task_id": ti["task_id"],
                         "source_dag_id": run["dag_id"], "source_run_id": run["run_id"], "source_map_index": mi,
                         "timestamp": ti["end_date"]})
            link = "dagrun_asset_event" if events == "asset_event" else "dagrun_dataset_event"
            add(link, {"dag_run_id": run["id"], "event_id": eid})
            if self.faults:
                add("asset_alias_asset_event" if events == "asset_event" else "dataset_alias_dataset_event", {"alias_id": 1, "event_id": eid})

    def _xcom(self, n: int, task_id: str, mi: int, run: dict, logical: dt.datetime, key: str, value: Any) -> dict:
        vtype = self.ctype("xcom", "value")
        if vtype.startswith("BYTEA"):
            if self.v < (2,) or (key == "return_value" and n % 6 == 0):
                raw = pickle.dumps(value)  # 1.10 pickled by default; 2.x deployments with enable_xcom_pickling
            else:
                raw = json.dumps(value).encode()
            if self.faults and key == "return_value" and n % 23 == 0:
                raw = _foreign_pickle()
        else:
            raw = json.dumps(value)
        row = {"key": key, "value": raw, "timestamp": logical + dt.timedelta(minutes=3), "execution_date": logical,
               "task_id": task_id, "dag_id": run["dag_id"], "run_id": run["run_id"], "map_index": mi, "dag_run_id": run["id"]}
        if self.has("xcom", "id"):
            row["id"] = self.next_id("xcom")
        return row


def _fernet(key: str | None):
    if not key:
        return None
    from cryptography.fernet import Fernet

    return Fernet(key.encode())


def _foreign_pickle() -> bytes:
    """A pickle naming a class outside plain data (here one that no longer exists), as real conf
    and xcom columns carry; loading it would import and call that class."""
    return b"\x80\x02cairflow.models.legacy\nCustomPayload\nq\x00)\x81q\x01}q\x02X\x01\x00\x00\x00aK\x01sb."


def sample(engine: sa.Engine, airflow_version: str, dag_runs: int = 50, seed: int = 0, fernet_key: str | None = None,
           faults: bool = False) -> dict[str, int]:
    """Fill ``engine``'s database (creating the schema if it has none) and return rows per table.

    A database it creates is filled without its secondary indexes and foreign keys, restored
    once at the end, and the next block of runs is generated while the last one is written."""
    from .pipeline import prefetch

    fresh = not sa.inspect(engine).get_table_names()
    if fresh:
        catalog.create_empty(engine, airflow_version)
    history = History(airflow_version, seed, fernet_key, faults)
    meta = sa.MetaData()
    writer = _Writer(engine, history, meta)
    deferred = writer.defer_checks() if fresh else []
    start = history.resume(engine)
    if start == 0:
        writer.write(history.config())
    blocks = (history.runs(first, min(BLOCK, start + dag_runs - first)) for first in range(start, start + dag_runs, BLOCK))
    for rows in prefetch(blocks):
        writer.write(rows)
    if deferred:
        with engine.begin() as conn:
            for definition in deferred:
                writer.dialect.restore(conn, definition)
    return writer.counts


class _Writer:
    """Turns generated rows into typed batches for the columns the table has, and bulk-inserts them."""

    def __init__(self, engine: sa.Engine, history: History, meta: sa.MetaData):
        self.engine, self.h, self.meta = engine, history, meta
        self.dialect = dialect_for(engine)
        self.counts: dict[str, int] = {}
        self.tables: dict[str, sa.Table] = {}

    def write(self, rows: dict[str, list[dict]]) -> None:
        order = [t for t in ("dag_bundle", "slot_pool", "variable", "connection", "dag", "log_template", "job", "trigger",
                             "dataset", "asset", "dag_run", "dag_run_note", "task_instance", "task_instance_note", "task_map",
                             "task_instance_history", "task_reschedule", "task_fail", "xcom", "rendered_task_instance_fields",
                             "sla_miss", "log", "dataset_event", "asset_event", "dagrun_dataset_event", "dagrun_asset_event",
                             "dataset_alias", "asset_alias", "dataset_alias_dataset", "asset_alias_asset",
                             "dataset_alias_dataset_event", "asset_alias_asset_event")
                 if rows.get(t) and self.h.has(t)]
        with self.engine.begin() as conn:
            for name in order:
                batch = self._batch(name, rows[name])
                self.dialect.insert(conn, self._table(name), batch)
                if "id" in self._table(name).c and isinstance(self._table(name).c.id.type, sa.Integer):
                    self.dialect.repair_sequence(conn, self._table(name))  # as a live database's sequences stand
                self.counts[name] = self.counts.get(name, 0) + batch.num_rows

    def defer_checks(self) -> list[str]:
        with self.engine.begin() as conn:
            dropped = [d for name in sa.inspect(conn).get_table_names() for _, d in self.dialect.defer_checks(conn, self._table(name))]
        return sorted(dropped, key=lambda d: not d.startswith("CREATE"))  # indexes, then the keys

    def _table(self, name: str) -> sa.Table:
        if name not in self.tables:
            self.tables[name] = sa.Table(name, self.meta, autoload_with=self.engine)
        return self.tables[name]

    def _batch(self, name: str, rows: list[dict]) -> pa.RecordBatch:
        arrays, fields = [], []
        keys = set().union(*rows)
        for col in self.h.schema.columns(name):
            atype = catalog.arrow_type(col["type"])
            if col["name"] in keys:
                values = [r.get(col["name"]) for r in rows]
            elif col["nullable"] or col.get("default") or col.get("autoincrement"):
                continue
            else:
                values = [_filler(col, atype)] * len(rows)
            if pa.types.is_binary(atype):
                values = [v.encode() if isinstance(v, str) else v for v in values]
            arrays.append(pa.array(values, atype))
            fields.append(pa.field(col["name"], atype))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _filler(col: dict, atype: pa.DataType):
    """A value for a NOT NULL column this generator knows nothing about (new in some release)."""
    if pa.types.is_timestamp(atype):
        return ANCHOR
    if pa.types.is_boolean(atype):
        return False
    if pa.types.is_integer(atype) or pa.types.is_floating(atype):
        return 0
    if pa.types.is_binary(atype):
        return b""
    return "{}" if col["type"].upper().startswith("JSON") else ""
