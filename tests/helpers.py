"""Shared by the tests: run the CLI as a user would, and read whole tables for comparison."""
from __future__ import annotations

import json
import subprocess
import sys

import sqlalchemy as sa

from etl import urls


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    import os

    out = subprocess.run([sys.executable, "-m", "etl.cli", *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **(env or {})})
    if check and out.returncode not in (0, 3):
        raise AssertionError(f"{args[0]} exited {out.returncode}: {out.stderr}")
    return out


def report(*args: str, env: dict | None = None) -> dict:
    return json.loads(cli(*args, "--json", env=env).stdout)


def rows(url: str, table: str, columns: list[str] | None = None) -> list[tuple]:
    engine = urls.open_engine(url)
    t = sa.Table(table, sa.MetaData(), autoload_with=engine)
    cols = [t.c[c] for c in columns] if columns else list(t.c)
    with engine.connect() as conn:
        out = sorted((tuple(r) for r in conn.execute(sa.select(*cols))), key=repr)
    engine.dispose()
    return out


def count(url: str, table: str) -> int:
    engine = urls.open_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar_one()
    engine.dispose()
    return n
