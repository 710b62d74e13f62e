"""map -> load for one source and one target: what import, migrate and diff share.

A source is anything that yields, per table, record batches of the source version with a
content hash and a chunk name: a staging package (import) or the extractor (migrate). The
pipeline maps each batch to the target version, re-keys secrets, and hands it to the
target's table loader, table by table in load order, so that every reference a row makes
has been loaded (and re-numbered) before the row itself.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import pyarrow as pa

from . import tables
from .errors import EtlError
from .load.target import Target
from .report import Report
from .secrets import Rekeyer


@dataclasses.dataclass
class Chunk:
    batch: pa.RecordBatch
    sha256: str
    name: str


class Source(Protocol):
    version: str
    fingerprint: str

    def tables(self) -> list[str]: ...

    def chunks(self, table: str) -> Iterator[Chunk]: ...


def run(source: Source, target: Target, mapper, rekeyer: Rekeyer, report: Report, progress=None, dry_run: bool = False) -> None:
    """Load every table of ``source`` into ``target``; each chunk commits on its own."""
    names = sorted(source.tables(), key=tables.load_rank)
    for name in ("variable", "connection"):
        if name in names and rekeyer.active:
            for chunk in source.chunks(name):
                rekeyer.check(name, chunk.batch)
    target.prepare()
    keys = _DRY if dry_run else _REAL
    matched: dict[str, int] = {}
    for name in names:
        loaders = {}
        report.table(name).add("source", 0)
        for chunk in source.chunks(name):
            report.table(name).add("source", chunk.batch.num_rows)
            for out_name, out in mapper.map(name, chunk.batch):
                out_report = report.table(out_name)
                if not target.has(out_name):
                    out_report.add("not_in_target", out.num_rows)
                    continue
                out = rekeyer.rekey(out_name, target.conform(out_name, out))
                loader = loaders.get(out_name) or loaders.setdefault(out_name, target.loader(out_name))
                try:
                    result = loader.load(out, chunk.sha256, chunk.name)
                except EtlError:
                    raise
                except Exception as exc:
                    raise EtlError(f"{out_name}, chunk {chunk.name}: {_first_line(exc)}") from exc
                out_report.add(keys["inserted"], result.inserted)
                out_report.add(keys["existing"], result.existing)
                out_report.add(keys["updated"], result.updated)
                if result.quarantined:
                    out_report.add("quarantined", result.quarantined)
                matched[out_name] = matched.get(out_name, 0) + result.existing + result.updated
                if progress:
                    progress.advance(out_name, out.num_rows)
        for out_name, loader in loaders.items():
            if dry_run:
                report.table(out_name).add("only_in_target", max(loader.count_at_start - matched.get(out_name, 0), 0))
    target.finish()


_REAL = {"inserted": "inserted", "existing": "existing", "updated": "updated"}
_DRY = {"inserted": "insert", "existing": "in_target", "updated": "update"}


def _first_line(exc: BaseException) -> str:
    """The driver's message plus where it points (PostgreSQL names the row: ``COPY t, line 17``)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    line = text.splitlines()[0] if text else type(orig).__name__
    diag = getattr(orig, "diag", None)
    extra = [d for d in (getattr(diag, "message_detail", None), getattr(diag, "context", None)) if d]
    return "; ".join([line, *(e.splitlines()[0] for e in extra)])
