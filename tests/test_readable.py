"""Pickled values made readable for the target: pendulum 1 pickles rebuilt in stdlib types, xcom pickles
counted with the setting they need and, on request, written as JSON."""
from __future__ import annotations

import datetime as dt
import json
import pickle

import pyarrow as pa
from test_unpickle import REAL

from etl import readable
from etl.transform import Mapper, Quarantine

#: {'when': Airflow 1.10's execution_date}, as pendulum 1.4.4 pickles it (test_unpickle.REAL).
PENDULUM_1 = bytes.fromhex(next(h for h, v in REAL if v == {"when": dt.datetime(2020, 8, 6, 1, 2, 3, tzinfo=dt.timezone.utc)}))
AMSTERDAM = dt.timezone(dt.timedelta(hours=2))


def _batch(column: str, values: list) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"id": list(range(len(values))), column: pa.array(values, pa.binary())})


def test_a_pendulum_1_pickle_is_pickled_again_in_stdlib_types_for_airflow_2_and_later():
    fix = readable.Readable("2.10.5")
    conf = fix("dag_run", _batch("conf", [PENDULUM_1, pickle.dumps({"a": 1}), None])).column("conf").to_pylist()
    assert b"pendulum" not in conf[0] and pickle.loads(conf[0]) == {"when": dt.datetime(2020, 8, 6, 1, 2, 3, tzinfo=dt.timezone.utc)}
    assert conf[1] == pickle.dumps({"a": 1}) and conf[2] is None, "readable pickles are left byte for byte"
    assert list(fix.counts.values()) == [1] and "pendulum 1" in next(iter(fix.counts))[1]
    assert readable.Readable("1.10.15")("dag_run", _batch("conf", [PENDULUM_1])).column("conf")[0].as_py() == PENDULUM_1


def test_named_zones_become_their_offset_at_that_instant():
    import zoneinfo

    summer = dt.datetime(2020, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Amsterdam"))
    again = readable._fixed_offsets({"t": [summer]})["t"][0]
    assert again == summer and again.tzinfo == AMSTERDAM


def test_xcom_pickles_into_2_x_are_counted_with_the_setting_and_converted_on_request():
    values = [pickle.dumps(["naïve ☃", 3]), pickle.dumps({"when": dt.datetime(2020, 1, 1)}), b'{"a": 1}']
    kept = readable.Readable("2.7.2")
    assert kept("xcom", _batch("value", values)).column("value").to_pylist() == values
    assert [(w, n) for (_, w), n in kept.counts.items()] == [(next(iter(kept.counts))[1], 2)]
    assert "enable_xcom_pickling = True" in next(iter(kept.counts))[1]

    converted = readable.Readable("2.7.2", xcom_json=True)
    out = converted("xcom", _batch("value", values)).column("value").to_pylist()
    assert json.loads(out[0]) == ["naïve ☃", 3] and out[0] == json.dumps(["naïve ☃", 3]).encode()
    assert out[1] == values[1] and out[2] == values[2], "a datetime is not JSON data: it stays a pickle"
    assert sorted(converted.counts.values()) == [1, 1]


def test_into_3_x_the_json_ones_reach_xcom_and_the_rest_are_quarantined_as_before():
    values = [pickle.dumps({"n": [1, 2]}), pickle.dumps(dt.date(2020, 1, 1))]
    rows = {"dag_id": ["d", "d"], "task_id": ["t", "u"], "key": ["k", "k"], "value": pa.array(values, pa.binary()),
            "execution_date": pa.array([dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)] * 2, pa.timestamp("us", "UTC")),
            "timestamp": pa.array([dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)] * 2, pa.timestamp("us", "UTC"))}
    runs = pa.RecordBatch.from_pydict({"id": [1], "dag_id": ["d"], "run_id": ["manual__1"],
                                       "execution_date": rows["execution_date"][:1]})
    quarantine = Quarantine()
    mapper = Mapper("2.10.5", "3.0.6", quarantine, read_source=lambda table: iter([runs] if table == "dag_run" else []),
                    xcom_json=True)
    out = dict(mapper.map("xcom", pa.RecordBatch.from_pydict({**rows, "dag_run_id": [1, 1], "run_id": ["manual__1"] * 2,
                                                              "map_index": [-1, -1]})))
    assert [json.loads(v) if isinstance(v, str) else v for v in out["xcom"].column("value").to_pylist()] == [{"n": [1, 2]}]
    assert sum(n for (table, _), n in quarantine.counts.items() if table == "xcom") == 1
