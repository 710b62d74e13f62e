"""The Python API: one function per job, each returning a ``Report``.

The CLI is a thin layer over these functions, and the Airflow DAG factories call them too,
so every option a person has on the command line is a keyword argument here.
"""
from __future__ import annotations

import sqlalchemy as sa

from . import tables, urls
from .errors import EtlError
from .report import Report


def inspect(url: str, source_version: str | None = None, progress: bool = False) -> Report:
    """Tell what a metadata database is before anything touches it."""
    engine = urls.open_engine(url)
    from . import versions

    try:
        report = Report("inspect")
        report.info["url"] = urls.redacted(url)
        report.info["dialect"] = engine.dialect.name
        version, revision = versions.detect_version(engine, override=source_version)
        report.info["airflow_version"] = version
        report.info["alembic_revision"] = revision
        present = sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            for name in tables.select(present):
                table = sa.table(name, schema=None)
                report.table(name).add("rows", conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
        skipped = sorted(t for t in present if not tables.is_default(t))
        if skipped:
            report.notes.append("not history (skipped unless --tables names them): " + ", ".join(skipped))
        return report.finish()
    finally:
        engine.dispose()


def plan(source_version: str, target_version: str, progress: bool = False) -> Report:
    """Show what the mapper will do before it does it."""
    from . import transform

    report = Report("plan")
    report.info.update(transform.plan(source_version, target_version))
    return report.finish()


def sample(airflow_version: str, target: str, dag_runs: int = 50, seed: int = 0, fernet_key: str | None = None,
           faults: bool = False, progress: bool = False) -> Report:
    """Fill a database with a seeded history, for demos, tests and benchmarks."""
    from . import sample as sampler

    engine = urls.open_engine(target, create=True)
    try:
        counts = sampler.sample(engine, airflow_version, dag_runs=dag_runs, seed=seed, fernet_key=fernet_key, faults=faults)
    finally:
        engine.dispose()
    report = Report("sample")
    report.info.update({"target": urls.redacted(target), "airflow_version": airflow_version, "seed": seed})
    for name, n in counts.items():
        report.table(name).add("rows", n)
    return report.finish()


def export(source: str, dest: str, **options) -> Report:
    raise EtlError("export is not built yet")


def import_(dest: str, target: str, **options) -> Report:
    raise EtlError("import is not built yet")


def migrate(source: str, target: str, **options) -> Report:
    raise EtlError("migrate is not built yet")


def diff(source: str, target: str, **options) -> Report:
    raise EtlError("diff is not built yet")
