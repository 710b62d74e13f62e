"""map -> load for one source and one target: what import, migrate and diff share.

A source is anything that yields, per table, record batches of the source version with a
content hash and a chunk name: a staging package (import) or the extractor (migrate). The
pipeline maps each batch to the target version, re-keys secrets, and hands it to the
target's table loader, table by table in load order, so that every reference a row makes
has been loaded (and re-numbered) before the row itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
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
    for name in rekeyer.tables:
        if name in names and rekeyer.active:
            for chunk in source.chunks(name):
                rekeyer.check(name, chunk.batch)
    target.prepare()
    keys = _DRY if dry_run else _REAL
    matched: dict[str, int] = {}
    loaders: dict = {}

    def mapped():
        """Read and map table after table, so the next table's first chunk is ready when one ends."""
        for name in names:
            yield name, None, ()
            for chunk in source.chunks(name):
                outputs = []
                for out_name, out in mapper.map(name, chunk.batch):
                    if target.has(out_name):
                        out = rekeyer.rekey(out_name, target.conform(out_name, out))
                    outputs.append((out_name, out))
                yield name, chunk, outputs

    seconds = report.info.setdefault("seconds_per_table", {})
    current, started = None, time.perf_counter()
    restorer = target.restorer()
    ahead: dict = {}
    finished: dict = {}  # the last table's loaders, closed once the next table's have set theirs aside
    try:
        ahead = target.loaders_ahead(list(dict.fromkeys(mapper.target_name(n) for n in names)))
        for name, chunk, outputs in prefetch(mapped()):
            if chunk is None:  # a new table starts; the last one's loaders close at its first chunk
                finished.update(loaders)
                loaders.clear()
                if current:
                    seconds[current] = round(time.perf_counter() - started, 3)
                current, started = name, time.perf_counter()
                report.table(name).add("source", 0)
                continue
            report.table(name).add("source", chunk.batch.num_rows)
            for out_name, out in outputs:
                if target.has(out_name) and out_name not in loaders and not tables.kept_aside(out_name):
                    loaders[out_name] = finished.pop(out_name, None) or ahead.pop(out_name, None) or target.loader(out_name)
            _close(finished, report, matched, dry_run, restorer)
            for out_name, out in outputs:
                out_report = report.table(out_name)
                if tables.kept_aside(out_name):  # as Airflow's own upgrade keeps them; keyless, so not diffed
                    if dry_run:
                        out_report.add("kept_aside", out.num_rows)
                    else:
                        added = target.keep_aside(out_name, out)
                        out_report.add("inserted", added)
                        out_report.add("existing", out.num_rows - added)
                    continue
                if not target.has(out_name):
                    out_report.add("not_in_target", out.num_rows)
                    continue
                loader = loaders[out_name]
                try:
                    result = loader.load(out, chunk.sha256, chunk.name)
                except EtlError:
                    raise
                except Exception as exc:
                    raise EtlError(f"{out_name}, chunk {chunk.name}: {_first_line(exc)}") from exc
                out_report.add(keys["inserted"], result.inserted)
                out_report.add(keys["existing"], result.existing)
                out_report.add(keys["updated"], result.updated)
                matched[out_name] = matched.get(out_name, 0) + result.existing + result.updated
                if progress:
                    progress.advance(out_name, out.num_rows)
        if current:
            seconds[current] = round(time.perf_counter() - started, 3)
        finished.update(loaders)
        finished.update(ahead)  # tables no row reached
        _close(finished, report, matched, dry_run, restorer)
        waited = time.perf_counter()
        restorer.wait()
        report.info["restore_wait_seconds"] = round(time.perf_counter() - waited, 3)
    except BaseException:  # an interrupt too: what was set aside goes back before the process ends
        with contextlib.suppress(Exception):  # its failure, if any, is the ledger's to retry
            restorer.wait()
        for loader in [*finished.values(), *loaders.values(), *ahead.values()]:  # what a load set aside goes back before the error is reported
            with contextlib.suppress(Exception):  # the ledger still has them for the next run
                loader.close()
        raise
    finally:
        restorer.stop()
    target.finish()


def _close(loaders: dict, report: Report, matched: dict, dry_run: bool, restorer) -> None:
    """A table's loaders are done: what they set aside is handed to the restorer, and a dry run
    counts the target's rows that no source row matched."""
    for out_name, loader in loaders.items():
        loader.close(restorer)
        if dry_run:
            report.table(out_name).add("only_in_target", max(loader.count_at_start - matched.get(out_name, 0), 0))
            if loader.from_source > loader.met_again:
                report.table(out_name).add("gone_from_source", loader.from_source - loader.met_again)
    loaders.clear()


def prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """Read and map the next chunks in a thread while this one loads.

    The target's COPY and index maintenance run in the server; reading and mapping run here.
    Overlapping the two is what brings a migration close to a raw dump-and-restore pipe.
    """
    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((done, None))
        except BaseException as exc:  # handed to the consumer, raised there
            box.put((done, exc))

    worker = threading.Thread(target=produce, name="etl-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = box.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


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
