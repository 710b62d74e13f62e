"""2.4: smart sensors are removed; task instances left in the sensing state become failed."""
from __future__ import annotations

import pyarrow.compute as pc

from etl.chain import reproduces
from etl.transform import put, where

version = "2.4.1"
down_version = "2.3.0"
airflow_revisions = ("f4ff391becb5",)


@reproduces("f4ff391becb5")
def task_instance(batch, ctx):
    """state sensing becomes failed."""
    state = batch.column("state")
    return put(batch, "state", where(pc.equal(state, "sensing"), "failed", state))


TABLES = {"task_instance": task_instance}
