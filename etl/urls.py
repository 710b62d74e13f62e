"""Database URLs as people write them, turned into the drivers we ship.

Users paste URLs from ``airflow.cfg`` (``postgres://``, ``mysql://``, ``postgresql+psycopg2://``)
or from Heroku-style environments; we always talk through our own drivers (psycopg 3, or psycopg2
under SQLAlchemy 1.4 inside Airflow 2: see ``drivers``; PyMySQL), so the driver part is replaced
rather than trusted.
"""
from __future__ import annotations

import os
import re

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from . import drivers
from .errors import EtlError, UsageError

_DRIVERS = {
    "postgres": drivers.POSTGRESQL,
    "postgresql": drivers.POSTGRESQL,
    "mysql": "mysql+pymysql",
    "mariadb": "mysql+pymysql",
    "sqlite": "sqlite",
}


def normalize(url: str | URL) -> URL:
    """Return ``url`` with its driver replaced by ours; raise ``UsageError`` if it is no database URL."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except Exception as exc:  # sqlalchemy raises ArgumentError with a long text
        raise UsageError(f"not a database URL: {_redact(str(url))}") from exc
    backend = parsed.drivername.split("+", 1)[0]
    if backend not in _DRIVERS:
        raise UsageError(f"unsupported database {backend!r} in {_redact(str(url))}: use postgresql://, mysql:// or sqlite:///")
    parsed = parsed.set(drivername=_DRIVERS[backend])
    if backend in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed


def is_database_url(text: str) -> bool:
    """Tell a database URL from a staging destination (``s3://`` or a folder)."""
    return "://" in text and text.split("://", 1)[0].split("+", 1)[0] in _DRIVERS


def redacted(url: str | URL) -> str:
    """The URL with its password hidden, for messages and reports."""
    return normalize(url).render_as_string(hide_password=True)


def label(url: str | URL) -> str:
    """A database as a folder name (backend, host, port, database; never a user or password): where
    its quarantine goes, one folder per target."""
    parsed = normalize(url)
    database = (parsed.database or "memory").rstrip("/").rsplit("/", 1)[-1]
    parts = [parsed.get_backend_name(), parsed.host, str(parsed.port) if parsed.port else None, database]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(p for p in parts if p))


def _redact(text: str) -> str:
    try:
        return make_url(text).render_as_string(hide_password=True)
    except Exception:
        return text.split("@", 1)[-1]


def open_engine(url: str | URL, *, create: bool = False) -> sa.Engine:
    """Connect once so that a wrong URL fails here, in one line, not deep inside a job.

    SQLite would silently create a missing file; a source or an existing target must exist,
    so only callers that create databases (``sample``, a fresh SQLite target) pass ``create``.
    """
    parsed = normalize(url)
    if parsed.get_backend_name() == "sqlite" and not create:
        path = parsed.database
        if path and path != ":memory:" and not os.path.exists(path):
            raise EtlError(f"SQLite database {path} does not exist")
    eng = sa.create_engine(parsed, pool_pre_ping=True, **_session(parsed), **drivers.engine_options())
    try:
        with eng.connect():
            pass
    except sa.exc.DBAPIError as exc:
        eng.dispose()
        raise EtlError(f"cannot connect to {parsed.render_as_string(hide_password=True)}: {first_line(exc.orig)}") from exc
    return eng


def _session(url: URL) -> dict:
    """Every timestamp we read or write is UTC; MySQL's TIMESTAMP converts through the session zone.
    Airflow itself pins its sessions to UTC the same way, so values round-trip unchanged.

    A read is prefetched in a thread of its own (``etl.pipeline``): SQLAlchemy 2 lets an SQLite
    connection cross threads by itself, 1.4 (what Airflow 2 pins) needs it said.
    """
    backend = url.get_backend_name()
    if backend == "postgresql":
        return {"connect_args": {"options": "-c timezone=UTC"}}
    if backend == "mysql":
        return {"connect_args": {"init_command": "SET time_zone = '+00:00'"}}
    return {"connect_args": {"check_same_thread": False}}


def first_line(exc: BaseException) -> str:
    """Drivers put hints and context on later lines; people need the first."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

