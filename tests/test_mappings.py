"""The mapper and every data rule, on small Arrow batches shaped by the real catalog.

Each rule is checked against what the Airflow migration it cites does to the same rows in place;
the revision ids are in the step modules. Generic behaviour (conforming, quarantine, renamed and
dropped tables, lookups) is checked on a chain and schemas built in memory.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import uuid

import numpy as np
import pyarrow as pa
import pytest

from etl import catalog, transform
from etl.chain import Chain, Step
from etl.errors import EtlError
from etl.transform import Mapper, Quarantine, key_hash, uuid7

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
T0 = dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc)
T1 = dt.datetime(2021, 1, 2, tzinfo=dt.timezone.utc)


def rows(version: str, table: str, *records: dict) -> pa.RecordBatch:
    schema = catalog.arrow_schema(version, table)
    return pa.RecordBatch.from_pylist([{f.name: r.get(f.name) for f in schema} for r in records], schema=schema)


def mapper(source: str, target: str, **kw) -> Mapper:
    return Mapper(source, target, Quarantine(), now=NOW, **kw)


def run(m: Mapper, table: str, *records: dict) -> dict[str, list[dict]]:
    return {name: b.to_pylist() for name, b in m.map(table, rows(m.source_version, table, *records))}


def quarantined(m: Mapper) -> list[tuple[str, str, list[dict]]]:
    return [(t, r, b.to_pylist()) for t, b, r in m.quarantine.batches]


# -- the mapper on an in-memory chain -------------------------------------------------------------------

def col(name, type_, nullable=True, default=None, **kw):
    return {"name": name, "type": type_, "nullable": nullable, "default": default, **kw}


V1 = {"t": [col("id", "INTEGER", False, autoincrement=True), col("a", "INTEGER"), col("b", "VARCHAR(10)")],
      "old": [col("id", "INTEGER", False), col("uri", "TEXT")], "gone": [col("x", "INTEGER")]}
V2 = {"t": [col("id", "INTEGER", False, autoincrement=True), col("a", "VARCHAR(20)"),
            col("c", "INTEGER", False, "'-1'::integer"), col("d", "BOOLEAN", False, "false"),
            col("e", "VARCHAR(250)", False, "'not_started'::character varying"), col("f", "TEXT")],
      "new": [col("id", "INTEGER", False), col("name", "TEXT", False)], "extra": [col("name", "TEXT", False)]}


def memory_mapper(**step) -> Mapper:
    steps = [Step("1.0.0", None), Step("2.0.0", "1.0.0", **step)]
    return Mapper("1.0.0", "2.0.0", Quarantine(), now=NOW, chain=Chain(steps, has_schema=lambda v: True),
                  columns={"1.0.0": V1, "2.0.0": V2})


def memory_rows(table: str, **columns) -> pa.RecordBatch:
    return pa.record_batch(columns)


def test_conform_gives_new_columns_their_server_default_and_reports_dropped_ones():
    m = memory_mapper()
    [(name, out)] = m.map("t", memory_rows("t", id=pa.array([1, 2], pa.int32()), a=pa.array([5, None], pa.int32()),
                                           b=pa.array(["x", None])))
    assert name == "t" and out.schema.names == ["id", "a", "c", "d", "e", "f"]
    assert out.to_pylist()[0] == {"id": 1, "a": "5", "c": -1, "d": False, "e": "not_started", "f": None}
    assert m.removed == {"t": {"b"}}


def test_quarantine_receives_the_source_rows_as_they_came_in():
    def t(batch, ctx):
        batch = transform.put(batch, "a", pa.array([0] * batch.num_rows, pa.int32()))  # a rule changed the row...
        return ctx.reject("t", batch, pa.array([False, True]), "because")             # ...then gave up on it

    m = memory_mapper(tables={"t": t})
    source = memory_rows("t", id=pa.array([1, 2], pa.int32()), a=pa.array([5, 6], pa.int32()), b=pa.array(["x", "y"]))
    [(_, out)] = m.map("t", source)
    assert out.column("id").to_pylist() == [1]
    [(table, batch, reason)] = m.quarantine.batches
    assert (table, reason) == ("t", "because") and batch.schema == source.schema
    assert batch.to_pylist() == [{"id": 2, "a": 6, "b": "y"}]


def test_renamed_split_and_dropped_tables():
    def old(batch, ctx):
        named = transform.put(batch, "name", batch.column("uri"))
        return {"new": named, "extra": named.select(["name", transform.ROW])}

    m = memory_mapper(tables={"old": old}, renamed={"old": "new"}, dropped={"gone": "the feature is gone"})
    out = {n: b.to_pylist() for n, b in m.map("old", memory_rows("old", id=pa.array([7], pa.int32()), uri=pa.array(["s3://a"])))}
    assert out == {"new": [{"id": 7, "name": "s3://a"}], "extra": [{"name": "s3://a"}]}
    gone = memory_rows("gone", x=pa.array([1, 2], pa.int32()))
    assert m.map("gone", gone) == [("gone", gone)]  # the caller counts it as not in the target
    assert m.summary()["tables_not_carried"] == [{"table": "gone", "rows": 2,
                                                  "reason": "not carried into Airflow 2.0.0 or later: the feature is gone"}]


def test_tables_airflow_does_not_know_pass_through():
    moved = memory_rows("_airflow_moved__2_2__dangling__task_instance", task_id=pa.array(["t"]))
    assert memory_mapper().map("_airflow_moved__2_2__dangling__task_instance", moved)[0][1] == moved


def test_same_version_maps_nothing():
    batch = rows("2.10.5", "task_instance", {"task_id": "t", "dag_id": "d", "run_id": "r", "map_index": -1})
    assert mapper("2.10.5", "2.10.5").map("task_instance", batch) == [("task_instance", batch)]


def test_key_hash_is_about_values_not_arrow_types():
    a = key_hash(pa.array(["d1", "d2", None, ""]), pa.array([1, 2, 3, 4], pa.int32()))
    b = key_hash(pa.array(["d1", "d2", None, ""], pa.large_string()).dictionary_encode(), pa.array([1, 2, 3, 4], pa.int64()))
    assert a.dtype == np.uint64 and (a == b).all() and len(set(a.tolist())) == 4
    when = pa.array([T0], pa.timestamp("us", tz="UTC"))
    assert key_hash(when) == key_hash(when.cast(pa.timestamp("us")))
    assert key_hash(pa.array(["a"]), seed=1) != key_hash(pa.array(["a"]))
    assert key_hash(pa.array(["ab", "c"])).tolist() != key_hash(pa.array(["a", "bc"])).tolist()


def test_uuid7_follows_rfc_9562_and_is_deterministic():
    millis = transform.epoch_millis(pa.array([T0, None, dt.datetime(2021, 1, 1, 0, 0, 0, 1500, dt.timezone.utc)],
                                             pa.timestamp("us", tz="UTC")), NOW)
    assert millis.tolist() == [1609459200000, int(NOW.timestamp() * 1000), 1609459200002]  # 1.5 ms rounds up, as PostgreSQL
    ids = uuid7(millis, key_hash(pa.array(["a", "b", "c"]))).to_pylist()
    assert ids == uuid7(millis, key_hash(pa.array(["a", "b", "c"]))).to_pylist()
    for text, ms in zip(ids, millis):
        u = uuid.UUID(text)
        assert str(u) == text and u.version == 7 and u.variant == uuid.RFC_4122 and u.int >> 80 == ms


def test_a_lookup_before_its_table_was_fed_is_one_line_or_reads_the_source():
    ti = rows("1.10.15", "task_instance", {"task_id": "t", "dag_id": "d", "execution_date": T0, "pool": "p"})
    with pytest.raises(EtlError, match="needs dag_run rows before the tables that refer to them: feed dag_run first"):
        mapper("1.10.15", "2.2.5").map("task_instance", ti)
    runs = rows("1.10.15", "dag_run", {"id": 3, "dag_id": "d", "execution_date": T0, "run_id": "manual__1"})
    m = Mapper("1.10.15", "2.2.5", Quarantine(), now=NOW, read_source=lambda table: iter([runs]))
    [(_, out)] = m.map("task_instance", ti)
    assert out.column("run_id").to_pylist() == ["manual__1"]


# -- 2.0 ---------------------------------------------------------------------------------------------------

def test_run_type_from_the_run_id_like_airflow_sql_like():
    cases = {"backfill_2021-01-01T00:00:00": "backfill",  # LIKE 'backfill__%': '_' matches any character
             "backfill__2021": "backfill", "backfill_": "manual", "backfillXY": "backfill", "Backfill__x": "manual",
             "scheduled__2021": "scheduled", "scheduled_2": "scheduled", "scheduled_": "manual", "manual__x": "manual", "my_run": "manual",
             None: "manual", "dataset_triggered__x": "manual"}
    m = mapper("1.10.15", "2.0.2")
    recs = [{"id": i, "dag_id": "d", "execution_date": T0 + dt.timedelta(days=i), "run_id": r} for i, r in enumerate(cases)]
    got = {r["run_id"]: r["run_type"] for r in run(m, "dag_run", *recs)["dag_run"]}
    assert got == cases


def test_run_type_knows_dataset_triggered_when_the_upgrading_release_does():
    m = mapper("1.10.15", "2.4.3")
    ids = ["dataset_triggered__1", "datasetXtriggered__1", "dataset_triggered_"]
    runs = [{"id": i, "dag_id": "d", "execution_date": T0 + dt.timedelta(days=i), "run_id": r} for i, r in enumerate(ids)]
    assert [r["run_type"] for r in run(m, "dag_run", *runs)["dag_run"]] == ["dataset_triggered", "dataset_triggered", "manual"]


def test_2_0_pool_slots_and_xcom():
    m = mapper("1.10.15", "2.0.2")
    tis = run(m, "task_instance", {"task_id": "t", "dag_id": "d", "execution_date": T0, "pool": "p", "pool_slots": None},
              {"task_id": "u", "dag_id": "d", "execution_date": T0, "pool": "p", "pool_slots": 3})["task_instance"]
    assert [t["pool_slots"] for t in tis] == [1, 3]
    xcoms = run(m, "xcom", {"id": 1, "key": "k", "value": b"1", "timestamp": T0, "execution_date": T0, "task_id": "t", "dag_id": "d"},
                {"id": 2, "key": None, "value": b"2", "timestamp": T0, "execution_date": T0, "task_id": "t", "dag_id": "d"})["xcom"]
    assert len(xcoms) == 1 and "id" not in xcoms[0] and m.removed["xcom"] == {"id"}
    [(table, reason, bad)] = quarantined(m)
    assert table == "xcom" and bad[0]["id"] == 2 and "bbf4a7ad0465" in reason


def test_2_0_connections_keep_the_first_of_a_conn_id_and_fix_imap_default():
    m = mapper("1.10.15", "2.0.2")
    first = run(m, "connection", {"id": 1, "conn_id": "imap_default", "conn_type": None},
                {"id": 2, "conn_id": "db", "conn_type": "postgres", "host": "a"},
                {"id": 3, "conn_id": "db", "conn_type": "postgres", "host": "b"},
                {"id": 4, "conn_id": "x", "conn_type": None}, {"id": 5, "conn_id": None, "conn_type": "http"})["connection"]
    second = run(m, "connection", {"id": 6, "conn_id": "db", "conn_type": "mysql"})
    assert [(c["id"], c["conn_type"]) for c in first] == [(1, "imap"), (2, "postgres")] and second == {}
    reasons = {r["id"]: reason for _, reason, batch in quarantined(m) for r in batch}
    assert set(reasons) == {3, 4, 5, 6}
    assert "check_conn_id_duplicates" in reasons[3] and "lowest id" in reasons[6]
    assert "check_conn_type_null" in reasons[4] and "NULL conn_id" in reasons[5]


# -- 2.2 and 2.3 ----------------------------------------------------------------------------------------------

RUNS_1_10 = [{"id": 10, "dag_id": "d", "execution_date": T0, "run_id": "scheduled__2021-01-01", "state": "success"},
             {"id": 11, "dag_id": "d", "execution_date": T1, "run_id": "manual__2021-01-02", "state": "success"},
             {"id": 12, "dag_id": "d", "execution_date": None, "run_id": "broken", "state": "success"}]


def test_2_2_task_instances_and_reschedules_get_run_id_and_orphans_are_quarantined():
    m = mapper("1.10.15", "2.2.5")
    runs = run(m, "dag_run", *RUNS_1_10)["dag_run"]
    assert [r["id"] for r in runs] == [10, 11]
    tis = run(m, "task_instance", {"task_id": "t", "dag_id": "d", "execution_date": T0, "pool": "p"},
              {"task_id": "t", "dag_id": "d", "execution_date": T1, "pool": "p"},
              {"task_id": "t", "dag_id": "d", "execution_date": T1 + dt.timedelta(days=5), "pool": "p"})["task_instance"]
    assert [t["run_id"] for t in tis] == ["scheduled__2021-01-01", "manual__2021-01-02"] and "execution_date" not in tis[0]
    trs = run(m, "task_reschedule",
              *[{"id": i, "task_id": task, "dag_id": "d", "execution_date": when, "try_number": 1, "start_date": T0,
                 "end_date": T0, "duration": 1, "reschedule_date": T1}
                for i, (task, when) in enumerate([("t", T0), ("other", T0), ("t", T0 - dt.timedelta(days=9))])])
    assert [r["id"] for r in trs["task_reschedule"]] == [0]
    moved = {(t, b[0].get("id", b[0].get("execution_date"))): reason for t, reason, b in quarantined(m)}
    assert "check_run_id_null" in moved[("dag_run", 12)]
    assert "_airflow_moved__2_2__dangling__task_instance" in moved[("task_instance", T1 + dt.timedelta(days=5))]
    assert "no task_instance" in moved[("task_reschedule", 1)] and "no dag_run" in moved[("task_reschedule", 2)]
    ti_rows = [b for t, _, b in quarantined(m) if t == "task_instance"][0]
    assert ti_rows[0]["execution_date"] == T1 + dt.timedelta(days=5)  # the source row, unchanged


def test_2_3_xcom_rendered_fields_and_task_fail_are_keyed_to_the_run():
    m = mapper("2.2.5", "2.3.4")
    run(m, "dag_run", {"id": 10, "dag_id": "d", "execution_date": T0, "run_id": "r0", "run_type": "manual"})
    tis = run(m, "task_instance", {"task_id": "t", "dag_id": "d", "run_id": "r0", "pool": "p", "pool_slots": 1})
    assert tis["task_instance"][0]["map_index"] == -1
    xcoms = run(m, "xcom", {"key": "k", "value": b"1", "timestamp": T0, "execution_date": T0, "task_id": "t", "dag_id": "d"},
                {"key": "k", "value": b"2", "timestamp": T0, "execution_date": T0, "task_id": "gone", "dag_id": "d"},
                {"key": "k", "value": b"3", "timestamp": T0, "execution_date": T1, "task_id": "t", "dag_id": "d"})["xcom"]
    assert [(x["dag_run_id"], x["dag_id"], x["run_id"], x["map_index"], x["value"]) for x in xcoms] == [(10, "d", "r0", -1, b"1")]
    rtif = run(m, "rendered_task_instance_fields", {"dag_id": "d", "task_id": "t", "execution_date": T0, "rendered_fields": "{}"})
    fail = run(m, "task_fail", {"id": 1, "task_id": "t", "dag_id": "d", "execution_date": T0},
               {"id": 2, "task_id": "u", "dag_id": "d", "execution_date": T0})
    assert rtif["rendered_task_instance_fields"][0]["run_id"] == "r0"
    assert [(f["id"], f["run_id"], f["map_index"]) for f in fail["task_fail"]] == [(1, "r0", -1)]
    reasons = sorted((t, r.split(":")[0]) for t, r, _ in quarantined(m))
    assert reasons == [("task_fail", "no task_instance for this row"), ("xcom", "no dag_run with this dag_id and execution_date"),
                       ("xcom", "no task_instance for this row")]
    assert all("_airflow_moved__2_3__dangling__" in r for _, r, _ in quarantined(m))


def test_2_4_sensing_fails_2_7_pools_2_8_clear_number():
    m = mapper("2.3.4", "2.8.4")
    tis = run(m, "task_instance", *[{"task_id": s or "none", "dag_id": "d", "run_id": "r", "map_index": -1, "pool": "p",
                                     "pool_slots": 1, "state": s} for s in ("sensing", "running", None)])
    assert [t["state"] for t in tis["task_instance"]] == ["failed", "running", None]
    assert run(m, "slot_pool", {"id": 1, "pool": "p", "slots": 3})["slot_pool"][0]["include_deferred"] is False
    runs = run(m, "dag_run", {"id": 1, "dag_id": "d", "execution_date": T0, "run_id": "r", "run_type": "manual"})
    assert runs["dag_run"][0]["clear_number"] == 0


# -- 3.0 ----------------------------------------------------------------------------------------------------

def test_3_0_dag_runs():
    m = mapper("2.10.5", "3.3.2")
    runs = run(m, "dag_run", {"id": 1, "dag_id": "d", "execution_date": T0, "run_id": "a", "run_type": "dataset_triggered",
                              "data_interval_end": T1, "conf": pickle.dumps({"x": [1, "y"]}, 5), "clear_number": 0},
               {"id": 2, "dag_id": "d", "execution_date": T1, "run_id": "b", "run_type": "manual", "clear_number": 0,
                "conf": b"\x80\x05}\x94."})["dag_run"]
    assert [(r["logical_date"], r["run_after"], r["run_type"], r["conf"]) for r in runs] == \
        [(T0, T1, "asset_triggered", '{"x": [1, "y"]}'), (T1, T1, "manual", None)]
    assert "execution_date" not in runs[0] and m.quarantine.batches == []  # the empty conf is Airflow's own NULL


def test_3_0_conf_pickle_that_would_run_code_is_never_loaded(tmp_path):
    target = tmp_path / "created-by-the-pickle"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {target}",)

    class Opener:
        def __reduce__(self):
            return open, (str(target), "w")

    m = mapper("2.10.5", "3.3.2")
    runs = run(m, "dag_run", *[{"id": i, "dag_id": "d", "execution_date": T0 + dt.timedelta(days=i), "run_id": str(i),
                                "run_type": "manual", "clear_number": 0, "conf": pickle.dumps({"p": evil()})}
                               for i, evil in enumerate([Evil, Opener])])["dag_run"]
    assert not target.exists()
    assert [r["conf"] for r in runs] == [None, None]  # the runs stay; their conf does not
    kept = [(t, reason, b[0]["id"], b[0]["conf"]) for t, reason, b in quarantined(m)]
    assert [(t, i) for t, _, i, _ in kept] == [("dag_run.conf", 0), ("dag_run.conf", 1)]
    assert "posix.system" in kept[0][1] and "io.open" in kept[1][1] and kept[0][3] == pickle.dumps({"p": Evil()})


@pytest.mark.parametrize("target,expected,reason", [
    ("3.0.6", None, "stops on it on PostgreSQL"),
    ("3.1.8", None, "stops on it on PostgreSQL"),
    ("3.3.2", '{"x": "NaN", "y": ["Infinity", "-Infinity"], "s": "ab"}', None),
])
def test_3_0_conf_nan_and_nul_follow_the_target_release(target, expected, reason):
    m = mapper("2.10.5", target)
    conf = pickle.dumps({"x": float("nan"), "y": [float("inf"), float("-inf")], "s": "a\x00b"})
    [r] = run(m, "dag_run", {"id": 1, "dag_id": "d", "execution_date": T0, "run_id": "a", "run_type": "manual",
                             "clear_number": 0, "conf": conf})["dag_run"]
    assert r["conf"] == expected
    assert len(quarantined(m)) == (0 if reason is None else 1)
    if reason:
        assert reason in quarantined(m)[0][1] and target in quarantined(m)[0][1]


def test_3_0_conf_that_json_cannot_hold_is_null_as_in_airflow():
    m = mapper("2.10.5", "3.3.2")
    confs = [pickle.dumps({"when": dt.datetime(2021, 1, 1)}), b"\x80\x05garbage", pickle.dumps(None)]
    got = run(m, "dag_run", *[{"id": i, "dag_id": "d", "execution_date": T0 + dt.timedelta(days=i), "run_id": str(i),
                               "run_type": "manual", "clear_number": 0, "conf": c} for i, c in enumerate(confs)])["dag_run"]
    assert [r["conf"] for r in got] == [None, None, "null"]
    assert sorted(r.split(":")[0] for _, r, _ in quarantined(m)) == ["conf holds values JSON cannot represent",
                                                                    "conf is not a readable pickle"]


XCOMS = {"plain": b'{"a": 1}', "nan": b'{"a": NaN, "b": [Infinity, -Infinity]}', "text_nan": b'{"msg": "NaN, sorry"}',
         "nul": b'{"a": "x\\u0000y", "b": "\\\\u0000"}', "empty": b"", "pickled": pickle.dumps({"a": 1}),
         "latin1": b'"caf\xe9"', "null": None}


@pytest.mark.parametrize("target,expected", [
    ("3.0.6", {"plain": '{"a": 1}', "text_nan": '{"msg": "NaN, sorry"}', "null": None}),
    ("3.1.8", {"plain": '{"a": 1}', "nan": '{"a": "NaN", "b": ["Infinity", "-Infinity"]}', "text_nan": '{"msg": "NaN, sorry"}',
               "null": None}),
    ("3.3.2", {"plain": '{"a": 1}', "nan": '{"a": null, "b": [null, null]}', "text_nan": '{"msg": "NaN, sorry"}',
               "nul": '{"a": "xy", "b": "\\\\u0000"}', "null": None}),
])
def test_3_0_xcom_values_follow_the_target_release(target, expected):
    m = mapper("2.10.5", target)
    run(m, "dag_run", {"id": 1, "dag_id": "d", "execution_date": T0, "run_id": "r", "run_type": "manual", "clear_number": 0})
    recs = [{"dag_run_id": 1, "task_id": "t", "map_index": -1, "key": k, "dag_id": "d", "run_id": "r", "value": v,
             "timestamp": T0} for k, v in XCOMS.items()]
    got = {x["key"]: x["value"] for x in run(m, "xcom", *recs)["xcom"]}
    assert got == expected
    for value in got.values():
        assert value is None or json.loads(value) is not None or value == "null"
    why = {x["key"]: reason for _, reason, b in quarantined(m) for x in b}
    assert set(why) == set(XCOMS) - set(expected)
    assert "_xcom_archive" in why["pickled"] and "empty value" in why["empty"] and "not UTF-8" in why["latin1"]
    assert all(target in r for k, r in why.items() if k not in ("pickled", "empty"))


def test_3_0_task_instances_get_uuid7_and_their_dependants_link_to_it():
    def ti(task, queued=None, start=None):
        return {"task_id": task, "dag_id": "d", "run_id": "r", "map_index": -1, "pool": "p", "pool_slots": 1,
                "try_number": 2, "queued_dttm": queued, "start_date": start}

    m = mapper("2.10.5", "3.3.2")
    tis = run(m, "task_instance", ti("a", T0, T1), ti("b", None, T1), ti("c"))["task_instance"]
    ids = [uuid.UUID(t["id"]) for t in tis]
    assert [u.version for u in ids] == [7, 7, 7]
    assert [u.int >> 80 for u in ids] == [int(T0.timestamp() * 1000), int(T1.timestamp() * 1000), int(NOW.timestamp() * 1000)]
    again = mapper("2.10.5", "3.3.2")
    assert [t["id"] for t in run(again, "task_instance", ti("a", T0, T1), ti("b", None, T1), ti("c"))["task_instance"]] == \
        [str(u) for u in ids]  # a re-run gives the same ids
    trs = run(m, "task_reschedule", *[{"id": i, "task_id": t, "dag_id": "d", "run_id": "r", "map_index": -1, "try_number": 1,
                                       "start_date": T0, "end_date": T0, "duration": 1, "reschedule_date": T1}
                                      for i, t in enumerate(["b", "zzz"])])["task_reschedule"]
    assert [(r["ti_id"], r["dag_id"], r["task_id"], r["run_id"], r["map_index"]) for r in trs] == [(str(ids[1]), "d", "b", "r", -1)]
    assert "try_number" not in trs[0]
    notes = run(m, "task_instance_note", {"task_id": "c", "dag_id": "d", "run_id": "r", "map_index": -1, "content": "hi",
                                          "created_at": T0, "updated_at": T0})["task_instance_note"]
    assert notes[0]["ti_id"] == str(ids[2]) and notes[0]["task_id"] == "c"
    history = run(m, "task_instance_history", {"task_id": "a", "dag_id": "d", "run_id": "r", "map_index": -1, "try_number": 1,
                                               "pool": "p", "pool_slots": 1, "queued_dttm": T0},
                  {"task_id": "a", "dag_id": "d", "run_id": "r", "map_index": -1, "try_number": 2, "pool": "p", "pool_slots": 1,
                   "queued_dttm": T0})["task_instance_history"]
    tih = [h["task_instance_id"] for h in history]
    assert len(set(tih) | {str(ids[0])}) == 3 and all(uuid.UUID(t).version == 7 for t in tih)
    assert [(t, r.split(":")[0]) for t, r, _ in quarantined(m)] == [("task_reschedule", "no task_instance for this row")]


def test_3_0_task_fail_and_sla_miss_are_not_carried_and_are_reported():
    m = mapper("2.10.5", "3.0.6")
    fail = rows("2.10.5", "task_fail", {"id": 1, "task_id": "t", "dag_id": "d", "run_id": "r", "map_index": -1})
    sla = rows("2.10.5", "sla_miss", {"task_id": "t", "dag_id": "d", "execution_date": T0})
    assert [n for n, _ in m.map("task_fail", fail) + m.map("sla_miss", sla)] == ["task_fail", "sla_miss"]
    reasons = {r["table"]: r["reason"] for r in m.summary()["tables_not_carried"]}
    assert "5f57a45b8433" in reasons["task_fail"] and "SLA" in reasons["sla_miss"]


def test_3_0_datasets_become_assets():
    m = mapper("2.10.5", "3.3.2")
    out = run(m, "dataset", {"id": 1, "uri": "s3://a", "extra": "{}", "created_at": T0, "updated_at": T0, "is_orphaned": False},
              {"id": 2, "uri": "s3://b", "extra": "{}", "created_at": T0, "updated_at": T0, "is_orphaned": True})
    assert [(a["id"], a["name"], a["uri"], a["group"]) for a in out["asset"]] == [(1, "s3://a", "s3://a", "asset"), (2, "s3://b", "s3://b", "asset")]
    assert out["asset_active"] == [{"name": "s3://a", "uri": "s3://a"}]
    events = run(m, "dataset_event", {"id": 5, "dataset_id": 1, "extra": "{}", "timestamp": T0, "source_map_index": -1})
    assert events["asset_event"][0]["asset_id"] == 1
    alias = run(m, "dataset_alias", {"id": 1, "name": "al"})
    assert alias["asset_alias"] == [{"id": 1, "name": "al", "group": "asset"}]
    log = run(m, "log", {"id": 1, "dttm": T0, "event": None, "execution_date": T1})["log"][0]
    assert (log["logical_date"], log["event"]) == (T1, "")


# -- 3.1, 3.2, 3.3 ---------------------------------------------------------------------------------------------

def test_3_2_nulls_get_the_migration_values():
    m = mapper("3.0.6", "3.2.2")
    assert run(m, "variable", {"id": 7, "key": None, "val": None, "is_encrypted": None})["variable"][0] == \
        {"id": 7, "key": "__airflow_var_fix_888b59e02a5b_7", "val": "", "description": None, "is_encrypted": False, "team_name": None}
    assert run(m, "slot_pool", {"id": 1, "pool": "p", "slots": None, "include_deferred": False})["slot_pool"][0]["slots"] == 0
    conn = run(m, "connection", {"id": 1, "conn_id": "c", "conn_type": "http"})["connection"][0]
    assert (conn["is_encrypted"], conn["is_extra_encrypted"]) == (False, False)
    ti = run(m, "task_instance", {"id": str(uuid.uuid4()), "task_id": "t", "dag_id": "d", "run_id": "r", "map_index": -1,
                                  "pool": "p", "pool_slots": 1, "try_number": None, "max_tries": None})["task_instance"][0]
    assert (ti["try_number"], ti["max_tries"]) == (0, -1)


def test_dag_rows_get_what_3_1_to_3_3_add():
    m = mapper("3.0.6", "3.3.2")
    out = run(m, "dag", {"dag_id": "d", "is_paused": None})
    empty = {"active": None, "version": None, "last_refreshed": None, "signed_url_template": None, "template_params": None}
    assert out["dag_bundle"] == [{"name": "example_dags", **empty}, {"name": "dags-folder", **empty}]  # as 7582ea3f3dd5
    dag = out["dag"][0]
    assert (dag["bundle_name"], dag["is_paused"], dag["is_stale"], dag["timetable_type"], dag["partition_mapper_info"]) == \
        ("dags-folder", False, False, "", "[]")


def test_dag_rows_carry_only_is_paused_and_fileloc_and_get_stub_values_even_within_one_version():
    """The export keeps dag_id, is_paused and fileloc (tables.DAG_COLUMNS); the DAG processor rewrites the rest on its next parse."""
    dag = pa.record_batch({"dag_id": pa.array(["d", "e"]), "is_paused": pa.array([True, False]),
                           "fileloc": pa.array(["/dags/d.py", None])})
    [(name, out)] = mapper("2.10.5", "2.10.5").map("dag", dag)
    row, unfiled = out.to_pylist()
    assert name == "dag" and (row["dag_id"], row["is_paused"], row["fileloc"], row["max_active_tasks"],
                              row["has_task_concurrency_limits"], row["max_consecutive_failed_dag_runs"]) == \
        ("d", True, "/dags/d.py", 16, True, 0)
    assert unfiled["fileloc"] == "", "Airflow 3's API server reads fileloc as text: a NULL fails its DAG list"


# -- plan -------------------------------------------------------------------------------------------------------

def test_plan_lists_the_chain_and_each_rule_with_its_revisions():
    p = transform.plan("1.10.15", "3.3.2")
    assert p["chain"][0] == "1.10.15 -> 2.0.0" and p["chain"][-1] == "3.2.2 -> 3.3.2"
    assert p["route"][0] == "2.0.0" and p["route"][-1] == "3.3.2"
    steps = {s["version"]: s for s in p["steps"]}
    assert "3c20cacc0044" in steps["2.0.0"]["tables"]["dag_run"] and steps["3.0.2"]["renames"]["dataset"] == "asset"
    assert steps["3.0.2"]["tables"]["task_fail"].startswith("not carried into Airflow 3.0.0 or later")
    assert p["column_changes"]["dag_run"]["values"]["run_type"] == "set by the rule (Airflow 2.0.0)"
    assert "execution_date" in p["column_changes"]["task_instance"]["removed"]
    assert transform.plan("2.10.5", "2.10.5")["chain"] == []
