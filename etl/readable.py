"""Pickled values the target's Airflow could not read, made readable before the mapping chain.

Airflow 2 ships pendulum 2 (2.8 on, also 3), which has none of pendulum 1's modules: a 1.10 pickle
holding a datetime (a TriggerDagRunOperator payload in ``dag_run.conf``, an ``executor_config``, an
xcom value) fails in the target's ORM with ``No module named 'pendulum.pendulum'``, and a task
instance read through such a run fails with it. Airflow's own upgrade leaves these rows so. Here
they are loaded by the restricted unpickler and pickled again from the same values in stdlib types
only, every timezone as its fixed offset at that instant (``zoneinfo`` is not on every Python an
Airflow 2 runs on), which any pendulum and any Python read.

xcom values that are pickles are read by Airflow 2 only with ``enable_xcom_pickling``, and Airflow 3
archives them out of ``xcom``. ``xcom_json`` turns those that hold JSON data into the UTF-8 JSON
that Airflow writes when it does not pickle, which every later release reads; the rest stay pickles.
"""
from __future__ import annotations

import datetime as dt
import json
import pickle

import pyarrow as pa

from . import batches, catalog, unpickle

#: Columns Airflow before 3.0 stores as pickles (PickleType, or xcom with enable_xcom_pickling).
PICKLED = {"dag_run": "conf", "task_instance": "executor_config", "task_instance_history": "executor_config",
           "xcom": "value"}
#: Modules only pendulum 1 has; a pickle naming one is unreadable where pendulum 2 or 3 is installed.
_PENDULUM_1 = (b"pendulum.pendulum", b"pendulum.interval", b"pendulum.tz.timezone_info", b"pendulum.tz.transition")
PICKLING_SETTING = "[core] enable_xcom_pickling = True (AIRFLOW__CORE__ENABLE_XCOM_PICKLING=True)"


class Readable:
    """Per batch of a source table, the values rewritten; ``counts`` says how many, for the report."""

    def __init__(self, target_version: str, xcom_json: bool = False):
        self.active = catalog.version_key(target_version) >= (2,)
        self.pickles_kept = catalog.version_key(target_version) < (3,)
        self.xcom_json = xcom_json
        self.counts: dict[tuple[str, str], int] = {}

    def __call__(self, table: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        column = PICKLED.get(table)
        if not self.active or column not in batch.schema.names or not pa.types.is_binary(batch.schema.field(column).type):
            return batch
        values = batch.column(column).to_pylist()
        changed = False
        for i, raw in enumerate(values):
            if not raw or raw[:1] != b"\x80":
                continue
            new = self._rewrite(table, column, raw)
            if new is not raw:
                values[i], changed = new, True
        return batches.put(batch, column, pa.array(values, pa.binary())) if changed else batch

    def _rewrite(self, table: str, column: str, raw: bytes) -> bytes:
        where = f"{table}.{column}"
        if table == "xcom" and self.xcom_json:
            text = _json(raw)
            if text is not None:
                self._count(where, "pickles of JSON data written as JSON, which Airflow reads in its default configuration")
                return text
        if any(marker in raw for marker in _PENDULUM_1):
            try:
                value = _fixed_offsets(unpickle.loads(raw))
            except (unpickle.PickleRefused, unpickle.PickleUnreadable) as exc:
                self._count(where, f"pendulum 1 pickles left as they are, unreadable by Airflow 2 and later: {exc}")
                return raw
            self._count(where, "pendulum 1 pickles, unreadable by Airflow 2 and later, pickled again in stdlib types")
            raw = pickle.dumps(value, protocol=2)
        if table == "xcom" and self.pickles_kept:
            self._count(where, f"pickles: the target's Airflow reads them only with {PICKLING_SETTING}; "
                               "--xcom-json writes those holding JSON data as JSON")
        return raw

    def _count(self, where: str, what: str) -> None:
        self.counts[(where, what)] = self.counts.get((where, what), 0) + 1


def _json(raw: bytes) -> bytes | None:
    """The JSON Airflow writes for the unpickled value, if it is JSON data (no NaN, no datetime, string keys)."""
    try:
        value = unpickle.loads(raw)
        return json.dumps(value, allow_nan=False).encode("utf-8")
    except (unpickle.PickleRefused, unpickle.PickleUnreadable, TypeError, ValueError):
        return None


def _fixed_offsets(value):
    if isinstance(value, (dt.datetime, dt.time)) and value.tzinfo is not None:
        offset = value.utcoffset() if isinstance(value, dt.datetime) else value.tzinfo.utcoffset(None)
        if offset is None:
            return value.replace(tzinfo=None)
        return value.replace(tzinfo=dt.timezone.utc if not offset else dt.timezone(offset), fold=0)
    if isinstance(value, dict):
        return {_fixed_offsets(k): _fixed_offsets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_fixed_offsets(v) for v in value)
    return value
