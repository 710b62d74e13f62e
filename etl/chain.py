"""The mapping steps as a chain, like Alembic's ``versions/``: each step names the one before it.

A step is a module in ``mappings/`` with ``version``, ``down_version`` and ``TABLES`` (one
function per table whose data that release's migrations change). Identity is inside the
file; the order comes from the ``down_version`` links alone. Versions whose migrations only
change the schema need no step: the transform conforms every batch to the target's columns.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from types import ModuleType
from typing import Callable

from . import catalog
from .errors import EtlError, UsageError

BASE = "1.10.15"


@dataclasses.dataclass(frozen=True)
class Step:
    version: str
    down_version: str
    tables: dict[str, Callable]
    renames: dict[str, str]
    revisions: tuple[str, ...]
    doc: str

    @classmethod
    def from_module(cls, module: ModuleType) -> Step:
        return cls(module.version, module.down_version, dict(module.TABLES), dict(getattr(module, "RENAMES", {})),
                   tuple(getattr(module, "airflow_revisions", ())), (module.__doc__ or "").strip().splitlines()[0])


class Chain:
    def __init__(self, steps: list[Step], base: str = BASE, known: list[str] | None = None):
        known = known if known is not None else catalog.versions()
        by_down: dict[str, Step] = {}
        for step in steps:
            if step.version not in known:
                raise EtlError(f"mapping step {step.version} has no schema in the catalog")
            if step.down_version in by_down:
                raise EtlError(f"mapping steps {by_down[step.down_version].version} and {step.version} both follow {step.down_version}")
            by_down[step.down_version] = step
        self.steps: list[Step] = []
        current, seen = base, {base}
        while current in by_down:
            step = by_down[current]
            if step.version in seen:
                raise EtlError(f"mapping steps form a cycle at {step.version}")
            seen.add(step.version)
            self.steps.append(step)
            current = step.version
        orphans = [s.version for s in steps if s not in self.steps]
        if orphans:
            raise EtlError(f"mapping steps {', '.join(orphans)} do not link back to {base}")
        self.base = base

    def path(self, source: str, target: str) -> list[Step]:
        src, dst = catalog.version_key(source), catalog.version_key(target)
        if dst < src:
            raise UsageError(f"the target (Airflow {target}) is older than the source (Airflow {source}); "
                             "moving history to an older Airflow is not supported")
        if src < catalog.version_key(self.base):
            raise UsageError(f"Airflow {source} is older than {self.base}, the oldest source this engine maps")
        return [s for s in self.steps if src < catalog.version_key(s.version) <= dst]


def discover() -> Chain:
    import etl.mappings as package

    modules = [importlib.import_module(f"etl.mappings.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    return Chain([Step.from_module(m) for m in modules if hasattr(m, "version")])
