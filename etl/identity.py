"""Which source a history came from, however its URL was written.

The target's ledger keys everything it loaded by source: which chunks, and for rows that have
only a surrogate id (job, log, trigger, task_fail, ...) which source id became which target id.
Recognising the source wrongly is what duplicates those rows: ``127.0.0.1`` and ``localhost``,
a DNS name, PgBouncer, a read replica, a restored dump and an engine upgrade all reach the same
history under another URL.

So a source is named by what its server says about itself (``fingerprint``): PostgreSQL's
system identifier (which a physical replica shares) and database, MySQL's ``server_uuid``
(MariaDB has none: its host name, data directory and server id), SQLite's real path. The
manifest carries it, so an export and a direct migrate of one database name the same source.

And before a job loads, the target checks the content (``recognise``): for each source its
ledger knows, a few source ids it loaded of job, log and trigger are looked up in the source at
hand and compared, on columns no release or upgrade rewrites, with the rows they became. Equal
rows mean the same history, whatever the fingerprint (a restored dump, a ledger written by an
older engine); different rows under the same fingerprint mean a database recreated in place,
which gets a name of its own.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
from typing import Callable

import numpy as np
import sqlalchemy as sa

from . import ledger

#: Columns that name a row's content and that no Airflow release or migration rewrites.
PROBES = {
    "job": ("job_type", "start_date", "hostname"),
    "log": ("dttm", "event", "dag_id"),
    "trigger": ("classpath", "created_date"),
}
#: Loaded ids compared per table and source: the first of the ledger's first, middle and last run.
SAMPLES = 3

SourceRows = Callable[[str, list[int], tuple[str, ...]], dict[int, tuple]]


def fingerprint(conn: sa.Connection) -> str:
    kind = conn.dialect.name
    if kind == "postgresql":
        server = conn.exec_driver_sql("SELECT system_identifier FROM pg_control_system()").scalar_one()
        database = conn.exec_driver_sql("SELECT current_database()").scalar_one()
    elif kind == "mysql":
        server = _mysql_server(conn)
        database = conn.exec_driver_sql("SELECT DATABASE()").scalar_one()
    else:
        server, database = "", os.path.realpath(conn.engine.url.database or "")
    return _digest(kind, server, database)


def _mysql_server(conn: sa.Connection) -> str:
    try:
        return conn.exec_driver_sql("SELECT @@server_uuid").scalar_one()
    except sa.exc.DBAPIError:  # MariaDB
        return "|".join(str(v) for v in conn.exec_driver_sql("SELECT @@hostname, @@datadir, @@server_id").one())


def _digest(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def recognise(conn: sa.Connection, fingerprint: str, source_rows: SourceRows) -> str:
    """The name the target's ledger knows this source by: a known source whose loaded rows the
    source at hand has, unchanged; else ``fingerprint``, or, when the source named so holds other
    rows than were loaded from it, a name derived from both."""
    if not ledger.present(conn):
        return fingerprint
    known = conn.execute(sa.select(ledger.ID_MAP.c.source).distinct()).scalars().all()
    for key in sorted(known, key=lambda k: k != fingerprint):
        same, compared = _compare(conn, key, source_rows)
        if same:
            return key
        if same is False and key == fingerprint:
            fingerprint = _digest(fingerprint, repr(compared))
    return fingerprint


def _compare(conn: sa.Connection, key: str, source_rows: SourceRows) -> tuple[bool | None, list]:
    """(True when every compared row is equal, False when one differs, None when none could be
    compared; the source rows compared)."""
    present = set(sa.inspect(conn).get_table_names())
    verdicts, compared = [], []
    for table, columns in PROBES.items():
        if table not in present:
            continue
        runs = conn.execute(sa.select(ledger.ID_MAP.c.source_id, ledger.ID_MAP.c.target_id)
                            .where(ledger.ID_MAP.c.source == key, ledger.ID_MAP.c.table_name == table)
                            .order_by(ledger.ID_MAP.c.source_id)).all()
        if not runs:
            continue
        picks = [runs[i] for i in sorted({0, len(runs) // 2, len(runs) - 1})][:SAMPLES]
        theirs = source_rows(table, [int(s) for s, _ in picks], columns)
        t = sa.Table(table, sa.MetaData(), autoload_with=conn)  # typed: SQLite keeps instants as text
        ours = {row[0]: tuple(row[1:]) for row in conn.execute(
            sa.select(t.c.id, *(t.c[c] for c in columns)).where(t.c.id.in_([int(d) for _, d in picks])))}
        for source_id, target_id in picks:
            if int(source_id) in theirs and int(target_id) in ours:
                a, b = _plain(theirs[int(source_id)]), _plain(ours[int(target_id)])
                verdicts.append(a == b)
                compared.append((table, int(source_id), a))
    if not verdicts:
        return None, compared
    return all(verdicts), compared


def _plain(values: tuple) -> tuple:
    out = []
    for v in values:
        if isinstance(v, dt.datetime):
            v = (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc).isoformat()
        elif isinstance(v, (np.generic,)):
            v = v.item()
        out.append(v)
    return tuple(out)
