"""3.0: logical_date and run_after, conf and xcom as JSON, UUIDv7 task instances, datasets become assets.

task_fail and sla_miss are not carried: 3.0 drops task_fail (5f57a45b8433), and SLAs are gone (a
3.x database has no sla_miss table). Task reschedules and notes point at their task instance's new
id; they keep (dag_id, task_id, run_id, map_index) too, so the loader can follow the task instance
when the target already had it under another id.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from etl import batches, catalog, tables
from etl.chain import reproduces
from etl.transform import ROW, column, epoch_millis, key_hash, put, uuid7, where

from . import _json3

version = "3.0.2"
down_version = "2.9.1"
airflow_revisions = ("1cdc775ca98f", "6a9e7a527a88", "e39a26ac59f6", "0e9519b56710", "d59cbbef95eb", "7645189f3479",
                     "29ce7909c52b", "cf87489a35df", "d469d27e2a64", "eed27faa34e3", "0d9e73a75ee4", "5a5d66100783",
                     "fb2d4922cd79", "05234396c6fc", "5f57a45b8433", "959e216a3abb")
NEEDS = ("task_instances",)

RENAMED = {  # 05234396c6fc
    "dataset": "asset", "dataset_alias": "asset_alias", "dataset_event": "asset_event",
    "dagrun_dataset_event": "dagrun_asset_event", "dataset_alias_dataset": "asset_alias_asset",
    "dataset_alias_dataset_event": "asset_alias_asset_event", "dataset_dag_run_queue": "asset_dag_run_queue",
    "dag_schedule_dataset_reference": "dag_schedule_asset_reference",
    "task_outlet_dataset_reference": "task_outlet_asset_reference",
    "dag_schedule_dataset_alias_reference": "dag_schedule_asset_alias_reference",
}
RENAMED_COLUMNS = {
    "dag_run": {"execution_date": "logical_date"},  # 1cdc775ca98f
    "log": {"execution_date": "logical_date"},  # 1cdc775ca98f
    **{t: {"dataset_id": "asset_id"} for t in ("dataset_event", "dataset_alias_dataset", "dataset_dag_run_queue",
                                               "dag_schedule_dataset_reference", "task_outlet_dataset_reference")},
}
DROPPED = {
    "task_fail": "Airflow 3.0 drops the table (5f57a45b8433)",
    "sla_miss": "Airflow 3 removed SLAs; a 3.x database has no sla_miss table",
}
_TI_REF = ("dag_id", "task_id", "run_id", "map_index")
KEEP = {"task_reschedule": _TI_REF, "task_instance_note": _TI_REF}

#: Seeds that keep the UUIDs of task instances and of their history rows apart.
_TI, _TIH = 0, 1


@reproduces("6a9e7a527a88", "e39a26ac59f6", "0e9519b56710")
def dag_run(batch, ctx):
    """run_after = coalesce(data_interval_end, logical_date); conf pickle -> JSON by the target release's
    rules; run_type dataset_triggered -> asset_triggered."""
    logical = batch.column("logical_date")
    batch = put(batch, "run_after", pc.coalesce(column(batch, "data_interval_end", logical.type), logical))
    run_type = batch.column("run_type")
    batch = put(batch, "run_type", where(pc.equal(run_type, "dataset_triggered"), "asset_triggered", run_type))
    target = catalog.version_key(ctx.target_version)
    texts, memo, reasons = [], {}, {}
    for i, raw in enumerate(batch.column("conf").to_pylist()):
        if raw is None:
            texts.append(None)
            continue
        if raw not in memo:
            memo[raw] = _json3.conf_json(raw, target)
        text, reason = memo[raw]
        texts.append(text)
        if reason:
            reasons.setdefault(reason, []).append(i)
    for reason, rows in reasons.items():
        ctx.set_aside("dag_run.conf", batch, _mask(batch.num_rows, rows), reason)
    return put(batch, "conf", pa.array(texts, pa.string()))


def _mask(n: int, rows: list[int]) -> pa.Array:
    mask = np.zeros(n, bool)
    mask[rows] = True
    return pa.array(mask)


def _coalesced_millis(batch, ctx) -> np.ndarray:
    return epoch_millis(pc.coalesce(batch.column("queued_dttm"), batch.column("start_date")), ctx.now)


@reproduces("d59cbbef95eb")
def task_instance(batch, ctx):
    """id = UUIDv7 of coalesce(queued_dttm, start_date, now), its other bits from the natural key."""
    return put(batch, "id", uuid7(_coalesced_millis(batch, ctx), key_hash(*(batch.column(c) for c in _TI_REF), seed=_TI)))


@reproduces("7645189f3479", "29ce7909c52b")
def task_instance_history(batch, ctx):
    """task_instance_id = a UUIDv7 of its own per try (the try's coalesce(queued_dttm, start_date, now))."""
    key = key_hash(*(batch.column(c) for c in (*_TI_REF, "try_number")), seed=_TIH)
    return put(batch, "task_instance_id", uuid7(_coalesced_millis(batch, ctx), key))


def _link(table: str, batch, ctx):
    found, millis = ctx.task_instance(*(batch.column(c) for c in _TI_REF))
    key = key_hash(*(batch.column(c) for c in _TI_REF), seed=_TI)
    batch = put(batch, "ti_id", uuid7(millis.fill_null(0).to_numpy(zero_copy_only=False), key))
    return ctx.reject(table, batch, np.logical_not(found),
                      "no task_instance for this row: Airflow 3.0 cannot set its ti_id and stops")


@reproduces("d469d27e2a64")
def task_reschedule(batch, ctx):
    """ti_id = the new id of the task instance with the same (dag_id, task_id, run_id, map_index)."""
    return _link("task_reschedule", batch, ctx)


@reproduces("cf87489a35df")
def task_instance_note(batch, ctx):
    """ti_id = the new id of the task instance with the same (dag_id, task_id, run_id, map_index)."""
    return _link("task_instance_note", batch, ctx)


@reproduces("eed27faa34e3")
def xcom(batch, ctx):
    """value bytes -> JSON by the target release's rules; pickled values, which Airflow moves to _xcom_archive,
    and values its cast would stop on are quarantined."""
    value = batch.column("value")
    batch = ctx.reject("xcom", batch, batches.starts_with(value, b"\x80"),
                       "pickled value: Airflow 3 moves it to _xcom_archive (eed27faa34e3)", moved_to=tables.XCOM_ARCHIVE)
    batch = ctx.reject("xcom", batch, pc.equal(pc.binary_length(batch.column("value")), 0),
                       "empty value: Airflow 3's migration eed27faa34e3 stops on it")
    target = catalog.version_key(ctx.target_version)
    texts, reasons, memo = [], {}, {None: (None, None)}  # return values repeat a lot: convert each once
    for i, raw in enumerate(batch.column("value").to_pylist()):
        if raw not in memo:
            memo[raw] = _json3.xcom_value(raw, target)
        text, reason = memo[raw]
        texts.append(text)
        if reason:
            reasons.setdefault(reason, []).append(i)
    bad = np.zeros(batch.num_rows, bool)
    for reason, rows in reasons.items():
        ctx.set_aside("xcom", batch, _mask(batch.num_rows, rows), reason)
        bad[rows] = True
    return put(batch, "value", pa.array(texts, pa.string())).filter(pa.array(~bad))


@reproduces("0d9e73a75ee4", "5a5d66100783")
def dataset(batch, ctx):
    """An asset named by its uri in group 'asset'; every dataset not orphaned is also an asset_active row."""
    asset = put(put(batch, "name", batch.column("uri")), "group", pa.repeat(pa.scalar("asset"), batch.num_rows))
    orphaned = column(batch, "is_orphaned", pa.bool_())
    active = batches.select(asset, ["name", "uri", ROW]).filter(pc.invert(pc.fill_null(orphaned, False)))
    return {"asset": asset, "asset_active": active}


@reproduces("fb2d4922cd79")
def dataset_alias(batch, ctx):
    """group 'asset'."""
    return put(batch, "group", pa.repeat(pa.scalar("asset"), batch.num_rows))


@reproduces("959e216a3abb")
def dag(batch, ctx):
    """is_stale = NOT is_active (NULL when the export carries only dag_id and is_paused)."""
    return put(batch, "is_stale", pc.invert(column(batch, "is_active", pa.bool_())))


TABLES = {"dag": dag, "dag_run": dag_run, "task_instance": task_instance, "task_instance_history": task_instance_history,
          "task_reschedule": task_reschedule, "task_instance_note": task_instance_note, "xcom": xcom,
          "dataset": dataset, "dataset_alias": dataset_alias}
