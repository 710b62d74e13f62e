"""3.0: logical_date, run_after, JSON conf and xcom, UUID task instances, datasets become assets."""
from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from etl import unpickle
from etl.transform import key_hash, put, split

version = "3.0.6"
down_version = "2.4.3"
airflow_revisions = ("3a8972ecb8f9", "05234396c6fc", "d59cbbef95eb", "5f57a45b8433", "eed27faa34e3", "e39a26ac59f6",
                     "6a9e7a527a88", "7645189f3479", "cf87489a35df", "d469d27e2a64", "0e9519b56710", "29ce7909c52b")

RENAMES = {"dataset": "asset", "dataset_event": "asset_event", "dagrun_dataset_event": "dagrun_asset_event",
           "dataset_alias": "asset_alias", "dataset_alias_dataset": "asset_alias_asset",
           "dataset_alias_dataset_event": "asset_alias_asset_event"}

# Airflow skips exactly this value (an empty dict pickled with protocol 5) and leaves conf NULL.
_EMPTY_CONF = b"\x80\x05}\x94."


def uuid7(millis: int, seed: bytes) -> str:
    """RFC 9562 UUIDv7: 48 bits of Unix milliseconds, then bits derived from the natural key,
    so that the same row always gets the same id and a re-run is idempotent."""
    rand = int.from_bytes(hashlib.blake2b(seed, digest_size=10).digest(), "big")
    value = (millis & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def _millis(*columns: pa.Array) -> list:
    """coalesce(...) of timestamps as Unix milliseconds; rows with none get the migration's now()."""
    out = pc.coalesce(*columns)
    ms = pc.cast(pc.cast(out, pa.timestamp("us", tz="UTC")), pa.int64()).to_pylist()
    return [m // 1000 if m is not None else None for m in ms]


def _json_safe(obj):
    """The 3.3 rule for pickled conf: non-finite floats become strings, NUL characters go."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, str):
        return obj.replace(chr(0), "")
    if isinstance(obj, Mapping):
        return {_json_safe(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (bytes, bytearray)):
        return [_json_safe(v) for v in obj]
    return obj


def dag_run(batch, ctx):
    """logical_date from execution_date; run_after = coalesce(data_interval_end, logical_date); conf pickle to JSON;
    run_type dataset_triggered becomes asset_triggered."""
    if "execution_date" in batch.schema.names:
        batch = put(batch, "logical_date", batch.column("execution_date"))
    interval_end = batch.column("data_interval_end") if "data_interval_end" in batch.schema.names else pa.nulls(batch.num_rows, batch.column("logical_date").type)
    batch = put(batch, "run_after", pc.coalesce(interval_end, batch.column("logical_date")))
    rt = batch.column("run_type")
    batch = put(batch, "run_type", pc.if_else(pc.fill_null(pc.equal(rt, "dataset_triggered"), False), "asset_triggered", rt))
    if "conf" in batch.schema.names and pa.types.is_binary(batch.column("conf").type):
        confs, unsafe = [], []
        for raw in batch.column("conf").to_pylist():
            if raw is None or raw == _EMPTY_CONF:
                confs.append(None)
                unsafe.append(False)
                continue
            try:
                confs.append(json.dumps(_json_safe(unpickle.loads(raw))))
                unsafe.append(False)
            except (unpickle.UnsafePickle, TypeError, ValueError):
                confs.append(None)  # Airflow leaves conf NULL for rows it cannot convert
                unsafe.append(True)
        if any(unsafe):
            # The run itself still loads; its original row (with the pickle) is kept in the quarantine.
            ctx.quarantine("dag_run.conf", batch.filter(pa.array(unsafe)), "conf is not a plain-data pickle; loaded with conf NULL")
        batch = put(batch, "conf", pa.array(confs, pa.string()))
    return batch


def task_instance(batch, ctx):
    """A UUIDv7 id from coalesce(queued_dttm, start_date); the id is remembered for reschedules, notes and history."""
    if "id" in batch.schema.names:
        return batch
    keys = key_hash(*(batch.column(c) for c in ("dag_id", "task_id", "run_id", "map_index")))
    millis = _millis(batch.column("queued_dttm"), batch.column("start_date"))
    ids = []
    for k, ms in zip(keys.tolist(), millis):
        u = uuid7(ms if ms is not None else 0, k.to_bytes(8, "little", signed=True))
        ctx.ti_uuids[k] = u
        ids.append(u)
    return put(batch, "id", pa.array(ids, pa.string()))


def _ti_id(table: str, column: str):
    def step(batch, ctx):
        if column in batch.schema.names:
            return batch
        keys = key_hash(*(batch.column(c) for c in ("dag_id", "task_id", "run_id", "map_index")))
        ids = [ctx.ti_uuids.get(k) for k in keys.tolist()]
        batch = put(batch, column, pa.array(ids, pa.string()))
        return split(batch, [i is not None for i in ids], ctx, table, "no task instance for this row")
    step.__doc__ = f"{column} from the task instance's new UUID."
    return step


def task_instance_history(batch, ctx):
    """Each try gets its own UUIDv7 (task_instance_id), from coalesce(queued_dttm, start_date)."""
    if "task_instance_id" in batch.schema.names:
        return batch
    keys = key_hash(*(batch.column(c) for c in ("dag_id", "task_id", "run_id", "map_index", "try_number")))
    millis = _millis(batch.column("queued_dttm"), batch.column("start_date"))
    ids = [uuid7(ms if ms is not None else 0, b"tih" + k.to_bytes(8, "little", signed=True)) for k, ms in zip(keys.tolist(), millis)]
    return put(batch, "task_instance_id", pa.array(ids, pa.string()))


_NON_FINITE = re.compile(r"([:,\[]\s*|^)(NaN|-?Infinity)(?=\s*[,}\]]|$)")


def xcom(batch, ctx):
    """value from bytes to JSON: pickled values are archived by Airflow (quarantined here); NaN and Infinity become null."""
    values = batch.column("value")
    if not pa.types.is_binary(values.type):
        return batch
    raw = values.to_pylist()
    pickled = [unpickle.is_pickle(v) for v in raw]
    batch = split(batch, [not p for p in pickled], ctx, "xcom", "pickled value: Airflow 3 archives it in _xcom_archive")
    out = []
    for v in batch.column("value").to_pylist():
        if v is None:
            out.append(None)
            continue
        text = v.decode("utf-8", errors="replace").replace("\\u0000", "")
        out.append(_NON_FINITE.sub(r"\1null", text) if ("NaN" in text or "Infinity" in text) else text)
    return put(batch, "value", pa.array(out, pa.string()))


def log(batch, ctx):
    """execution_date becomes logical_date."""
    if "execution_date" in batch.schema.names:
        batch = put(batch, "logical_date", batch.column("execution_date"))
    return batch


def asset(batch, ctx):
    """A dataset becomes an asset named by its uri, in group 'asset'."""
    batch = put(batch, "name", batch.column("uri"))
    return put(batch, "group", pa.array(["asset"] * batch.num_rows, pa.string()))


def asset_event(batch, ctx):
    """dataset_id becomes asset_id."""
    if "dataset_id" in batch.schema.names:
        batch = put(batch, "asset_id", batch.column("dataset_id"))
    return batch


def asset_alias_asset(batch, ctx):
    """dataset_id becomes asset_id."""
    return asset_event(batch, ctx)


TABLES = {"dag_run": dag_run, "task_instance": task_instance, "task_instance_history": task_instance_history,
          "task_reschedule": _ti_id("task_reschedule", "ti_id"), "task_instance_note": _ti_id("task_instance_note", "ti_id"),
          "xcom": xcom, "log": log, "asset": asset, "asset_event": asset_event, "asset_alias_asset": asset_alias_asset}
