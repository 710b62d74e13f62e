"""Per-table progress: rows, rows per second and, when the total is known, an ETA.

On a terminal it is a bar on stderr redrawn with carriage returns; anywhere else (a CI log,
an Airflow task log, a pipe) carriage returns make a mess, so the same figures go out as
plain log lines, at most one every ``LOG_EVERY`` seconds per table plus one when the table
is done. Either way stdout stays free for the ``--json`` report.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("etl.progress")
LOG_EVERY = 10.0


class Progress:
    """``enabled``: report at all; ``tty`` (default: whether stderr is a terminal) picks bar or log lines."""

    def __init__(self, enabled: bool, tty: bool | None = None):
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.table: str | None = None
        self.rows = 0
        self.total: int | None = None
        self.started = self.logged = time.perf_counter()

    def start(self, table: str, total: int | None = None) -> None:
        self.finish()
        self.table, self.rows, self.total = table, 0, total
        self.started = self.logged = time.perf_counter()

    def advance(self, table: str, n: int) -> None:
        if table != self.table:
            self.start(table)
        self.rows += n
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + self._bar())
            sys.stderr.flush()
        elif time.perf_counter() - self.logged >= LOG_EVERY:
            self.logged = time.perf_counter()
            log.info("%s", self._line())

    def finish(self) -> None:
        """The table is done: end its bar, or log its final line."""
        if self.enabled and self.table is not None:
            if self.tty:
                sys.stderr.write("\n")
            else:
                log.info("%s: done, %s", self.table, self._line(final=True))
        self.table = None

    def close(self) -> None:
        """The job stops, maybe on an error: end the bar's line, claim nothing about the table."""
        if self.enabled and self.tty and self.table is not None:
            sys.stderr.write("\n")
        self.table = None

    def _rate(self) -> float:
        return self.rows / max(time.perf_counter() - self.started, 1e-6)

    def _bar(self) -> str:
        rate = self._rate()
        if self.total:
            bar = "#" * int(min(self.rows / self.total, 1.0) * 30)
            eta = max(self.total - self.rows, 0) / rate if rate else 0
            return f"{self.table:<32} [{bar:<30}] {self.rows:>10,}/{self.total:,} {rate:>10,.0f} rows/s ETA {eta:5.0f}s"
        return f"{self.table:<32} {self.rows:>10,} rows {rate:>10,.0f} rows/s"

    def _line(self, final: bool = False) -> str:
        rate = self._rate()
        if final:
            return f"{self.rows:,} rows in {time.perf_counter() - self.started:.1f} s ({rate:,.0f} rows/s)"
        if self.total:
            eta = max(self.total - self.rows, 0) / rate if rate else 0
            return f"{self.table}: {self.rows:,}/{self.total:,} rows, {rate:,.0f} rows/s, ETA {eta:.0f} s"
        return f"{self.table}: {self.rows:,} rows, {rate:,.0f} rows/s"
