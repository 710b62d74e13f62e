"""Per-table progress on a terminal: rows, rows per second and, when the total is known, an ETA.

Written to stderr with carriage returns, so ``--json`` output on stdout stays clean and logs
that are not terminals get nothing but the final report.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.table: str | None = None
        self.rows = 0
        self.total: int | None = None
        self.started = time.perf_counter()

    def start(self, table: str, total: int | None = None) -> None:
        self.finish()
        self.table, self.rows, self.total, self.started = table, 0, total, time.perf_counter()

    def advance(self, table: str, n: int) -> None:
        if table != self.table:
            self.start(table)
        self.rows += n
        if not self.enabled:
            return
        rate = self.rows / max(time.perf_counter() - self.started, 1e-6)
        if self.total:
            done = min(self.rows / self.total, 1.0)
            bar = "#" * int(done * 30)
            eta = (self.total - self.rows) / rate if rate else 0
            line = f"{self.table:<32} [{bar:<30}] {self.rows:>10,}/{self.total:,} {rate:>10,.0f} rows/s ETA {eta:5.0f}s"
        else:
            line = f"{self.table:<32} {self.rows:>10,} rows {rate:>10,.0f} rows/s"
        sys.stderr.write("\r" + line)
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self.table is not None:
            sys.stderr.write("\n")
        self.table = None
