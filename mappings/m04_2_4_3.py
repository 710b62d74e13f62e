"""2.4: smart sensors are gone; task instances left in the sensing state become failed."""
from __future__ import annotations

import pyarrow.compute as pc

from etl.transform import put

version = "2.4.3"
down_version = "2.3.4"
airflow_revisions = ("f4ff391becb5",)


def task_instance(batch, ctx):
    """state sensing becomes failed."""
    state = batch.column("state")
    return put(batch, "state", pc.if_else(pc.fill_null(pc.equal(state, "sensing"), False), "failed", state))


TABLES = {"task_instance": task_instance}
