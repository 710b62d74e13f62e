"""2.7: pools get include_deferred, false for every existing pool."""
from __future__ import annotations

import pyarrow as pa

from etl.chain import reproduces
from etl.transform import put

version = "2.7.3"
down_version = "2.4.1"
airflow_revisions = ("405de8318b3a",)


@reproduces("405de8318b3a")
def slot_pool(batch, ctx):
    """include_deferred false."""
    return put(batch, "include_deferred", pa.repeat(pa.scalar(False), batch.num_rows))


TABLES = {"slot_pool": slot_pool}
