"""The PostgreSQL driver under whichever SQLAlchemy is installed, and COPY through it.

Inside Airflow 2.4-2.10, and so on Amazon MWAA, SQLAlchemy is pinned below 2.0 and the
environment ships psycopg2; SQLAlchemy 1.4 has no psycopg 3 dialect. Everywhere else we run
SQLAlchemy 2 on psycopg 3. The rest of the engine is written in SQLAlchemy's 2.0 style, which
1.4 runs when engines are made with ``future=True``; COPY is the one place where we step past
SQLAlchemy to the driver, so both drivers' COPY live here and nowhere else.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import sqlalchemy as sa

SQLALCHEMY_2 = int(sa.__version__.split(".")[0]) >= 2

#: The SQLAlchemy driver name for PostgreSQL URLs.
POSTGRESQL = "postgresql+psycopg" if SQLALCHEMY_2 else "postgresql+psycopg2"


def engine_options() -> dict:
    """Keyword arguments for ``create_engine``: 2.0-style connections under 1.4 too (commit as you go)."""
    return {} if SQLALCHEMY_2 else {"future": True}


def copy_in(conn: sa.Connection, statement: str, parts: Iterable[bytes]) -> None:
    """Run ``COPY ... FROM STDIN`` in ``conn``'s transaction, feeding it ``parts`` one at a time.

    A server error is raised as SQLAlchemy would raise it (``IntegrityError`` for a unique
    violation), so callers can fall back the same way whichever driver runs.
    """
    raw = conn.connection.dbapi_connection
    with _as_sqlalchemy_error(statement):
        if SQLALCHEMY_2:
            with raw.cursor() as cur, cur.copy(statement) as copy:
                for part in parts:
                    copy.write(part)
        else:
            with raw.cursor() as cur:
                cur.copy_expert(statement, _Reader(parts), size=1 << 20)


def copy_out(conn: sa.Connection, statement: str, params: dict, sink) -> None:
    """Run ``COPY (query) TO STDOUT`` in ``conn``'s transaction, the driver binding ``params`` into
    the query client-side, writing what the server sends to ``sink`` (a binary file object);
    errors are raised as SQLAlchemy would raise them."""
    raw = conn.connection.dbapi_connection
    with _as_sqlalchemy_error(statement):
        if SQLALCHEMY_2:
            with raw.cursor() as cur, cur.copy(statement, params) as copy:
                for block in copy:
                    sink.write(block)
        else:
            with raw.cursor() as cur:
                cur.copy_expert(cur.mogrify(statement, params).decode(), sink, size=1 << 20)


@contextlib.contextmanager
def _as_sqlalchemy_error(statement: str):
    """COPY runs past SQLAlchemy, so its driver errors are wrapped the way SQLAlchemy would wrap them."""
    if SQLALCHEMY_2:
        from psycopg import Error
    else:
        from psycopg2 import Error
    try:
        yield
    except Error as exc:
        raise sa.exc.DBAPIError.instance(statement, None, exc, Error) from exc


class _Reader:
    """The file psycopg2's ``copy_expert`` reads from, filled part by part so no chunk is whole in memory."""

    def __init__(self, parts: Iterable[bytes]):
        self.parts = iter(parts)
        self.part, self.pos = b"", 0

    def read(self, size: int) -> bytes:
        while self.pos >= len(self.part):
            part = next(self.parts, None)
            if part is None:
                return b""
            self.part, self.pos = part, 0
        out = self.part[self.pos:self.pos + size]
        self.pos += len(out)
        return out
