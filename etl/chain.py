"""The mapping steps as a chain, laid out like Alembic's ``versions/``.

A step is a module in ``mappings/`` (installed as ``etl.mappings``). Its identity is inside
the file (``version``, ``down_version``, ``airflow_revisions``); the file name is for people,
and the order comes from the ``down_version`` links alone. Only releases whose migrations
change *data* have a step; releases that only change the schema are covered by the transform,
which conforms every batch to each catalog version's columns on the way.

``Chain`` is the graph, kept apart from the files so tests can build one in memory. It
accepts exactly one straight line from one base (``down_version = None``) and refuses
anything else with a named error: a fork, a cycle, a missing parent, a step older than its
parent, or a step whose version has no schema in the catalog to conform to.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from types import ModuleType
from typing import Callable, Iterable, Mapping

from . import catalog
from .errors import EtlError, UsageError


class ChainError(EtlError):
    """The mapping steps do not form one line from the base; names the steps at fault."""


def reproduces(*revisions: str) -> Callable[[Callable], Callable]:
    """Mark a table function with the Airflow revision ids whose data rules it reproduces."""

    def mark(fn: Callable) -> Callable:
        fn.airflow_revisions = revisions
        return fn

    return mark


@dataclasses.dataclass(frozen=True)
class Step:
    """One version's data rules. Tables it does not list pass through unchanged."""

    version: str
    down_version: str | None
    airflow_revisions: tuple[str, ...] = ()
    doc: str = ""
    tables: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    #: old table name -> new one (``dataset`` -> ``asset``); table functions are keyed by the old name
    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: old table name -> {old column: new column}, applied before the table's function
    renamed_columns: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    #: tables this version no longer has, with the reason the report gives
    dropped: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: new table name -> natural-reference columns kept after the schema drops them (the loader resolves them)
    keep: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    #: cross-table lookups the step reads from ``MapContext``: "runs", "task_instances"
    needs: frozenset[str] = frozenset()
    source: str = "(in memory)"

    @classmethod
    def from_module(cls, module: ModuleType) -> Step:
        where = getattr(module, "__file__", None) or module.__name__
        for attr in ("version", "down_version"):
            if not hasattr(module, attr):
                raise ChainError(f"mapping module {where} has no {attr}")
        return cls(
            version=module.version,
            down_version=module.down_version,
            airflow_revisions=tuple(getattr(module, "airflow_revisions", ())),
            doc=" ".join((module.__doc__ or "").strip().split("\n\n")[0].split()),
            tables=dict(getattr(module, "TABLES", {})),
            renamed=dict(getattr(module, "RENAMED", {})),
            renamed_columns={k: dict(v) for k, v in getattr(module, "RENAMED_COLUMNS", {}).items()},
            dropped=dict(getattr(module, "DROPPED", {})),
            keep={k: tuple(v) for k, v in getattr(module, "KEEP", {}).items()},
            needs=frozenset(getattr(module, "NEEDS", ())),
            source=where,
        )

    def rules(self) -> dict[str, dict]:
        """Per table: what this step does to it and which Airflow revisions that reproduces."""
        out: dict[str, dict] = {}
        for table, fn in self.tables.items():
            text = " ".join((fn.__doc__ or fn.__name__).strip().split("\n\n")[0].split())
            out[table] = {"rule": text, "airflow_revisions": list(getattr(fn, "airflow_revisions", ()))}
        for table, reason in self.dropped.items():
            out[table] = {"rule": f"not carried into Airflow {catalog.first_release(self.version)} or later: {reason}",
                          "airflow_revisions": []}
        return out


class Chain:
    """Steps in order from the base; ``path`` picks the ones between two versions."""

    def __init__(self, steps: Iterable[Step], has_schema: Callable[[str], bool] | None = None):
        steps = list(steps)
        has_schema = has_schema or (lambda v: v in catalog.versions())
        by_version: dict[str, Step] = {}
        for step in steps:
            if step.version in by_version:
                raise ChainError(f"mapping steps {by_version[step.version].source} and {step.source} "
                                 f"both claim version {step.version}")
            by_version[step.version] = step
        bases = [s for s in steps if s.down_version is None]
        if len(bases) != 1:
            found = ", ".join(s.version for s in bases) or "none"
            raise ChainError(f"the mapping chain needs exactly one base step (down_version None); found {found}")
        children: dict[str, Step] = {}
        for step in steps:
            if step.down_version is None:
                continue
            if step.down_version not in by_version:
                raise ChainError(f"mapping step {step.version} follows {step.down_version}, which no step provides")
            if step.down_version in children:
                raise ChainError(f"mapping steps {children[step.down_version].version} and {step.version} both follow "
                                 f"{step.down_version}: the chain forks")
            children[step.down_version] = step
        self.steps: list[Step] = [bases[0]]
        while self.steps[-1].version in children:
            self.steps.append(children[self.steps[-1].version])
        cut_off = sorted(set(by_version) - {s.version for s in self.steps}, key=catalog.version_key)
        if cut_off:
            raise ChainError(f"mapping steps {', '.join(cut_off)} form a cycle that never reaches the base")
        for step in self.steps[1:]:
            if catalog.version_key(step.version) <= catalog.version_key(step.down_version):
                raise ChainError(f"mapping step {step.version} follows the newer {step.down_version}")
        for step in self.steps:
            if not has_schema(step.version):
                raise ChainError(f"mapping step {step.version} has no schema: schemas/airflow-{step.version}.json is missing")

    @property
    def base(self) -> str:
        return self.steps[0].version

    @property
    def head(self) -> str:
        return self.steps[-1].version

    def path(self, source: str, target: str) -> list[Step]:
        """The steps that turn ``source`` data into ``target`` data, oldest first; none for the same version."""
        src, dst = catalog.schema_key(source), catalog.schema_key(target)
        if catalog.version_key(target) < catalog.version_key(source):
            raise EtlError(f"the target, Airflow {target}, is older than the source, Airflow {source}: "
                           "history only moves to the same or a newer Airflow")
        if src < catalog.version_key(self.base):
            raise UsageError(f"Airflow {source} is older than {self.base}, the oldest version this engine maps from")
        return [s for s in self.steps if src < catalog.version_key(s.version) <= dst]

    @classmethod
    def discover(cls, package: str = "etl.mappings", has_schema: Callable[[str], bool] | None = None) -> Chain:
        """Every step module of ``package`` (modules starting with ``_`` are helpers, not steps)."""
        pkg = importlib.import_module(package)
        modules = [importlib.import_module(f"{package}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)
                   if not m.name.startswith("_")]
        return cls((Step.from_module(m) for m in modules), has_schema)


@functools.lru_cache(maxsize=None)
def default() -> Chain:
    """The installed chain, read once per process."""
    return Chain.discover()
