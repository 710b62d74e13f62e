"""3.2: columns that the ORM always treated as required become NOT NULL; existing NULLs get neutral values."""
from __future__ import annotations

import pyarrow.compute as pc

from etl.transform import put

version = "3.2.2"
down_version = "3.0.6"
airflow_revisions = ("888b59e02a5b", "edc4f85a4619")


def _fill(**values):
    def step(batch, ctx):
        for column, value in values.items():
            if column in batch.schema.names:
                batch = put(batch, column, pc.fill_null(batch.column(column), value))
        return batch
    step.__doc__ = ", ".join(f"{c} NULL becomes {v!r}" for c, v in values.items())
    return step


TABLES = {
    "variable": _fill(val="", is_encrypted=False),
    "slot_pool": _fill(slots=0),
    "task_instance": _fill(try_number=0, max_tries=-1),
    "connection": _fill(is_encrypted=False, is_extra_encrypted=False),
    "dag": _fill(is_paused=False),
    "log": _fill(event=""),
}
