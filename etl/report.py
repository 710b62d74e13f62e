"""The report every job returns: one object for the Python API, the ``--json`` output and the summary table.

Jobs fill it as they go, so a report exists even when a job stops half-way; the CLI prints
``to_dict()`` with ``--json`` and ``format_text()`` otherwise.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any


@dataclasses.dataclass
class TableReport:
    """Counts for one table; which counts a job fills depends on the job."""

    table: str
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, name: str, n: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


@dataclasses.dataclass
class Report:
    job: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    tables: dict[str, TableReport] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None

    def table(self, name: str) -> TableReport:
        if name not in self.tables:
            self.tables[name] = TableReport(name)
        return self.tables[name]

    def finish(self) -> Report:
        self.finished = time.time()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            **self.info,
            "seconds": round((self.finished or time.time()) - self.started, 3),
            "tables": {t.table: {**t.counts, **({"notes": t.notes} if t.notes else {})} for t in self.tables.values()},
            "notes": self.notes,
        }

    def format_text(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.info.items() if not isinstance(v, (dict, list))]
        columns = sorted({c for t in self.tables.values() for c in t.counts}, key=_column_order)
        if self.tables:
            rows = [["table", *columns]] + [
                [t.table, *(str(t.counts.get(c, "")) for c in columns)] for t in self.tables.values()
            ]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for n, r in enumerate(rows):
                lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
                if n == 0:
                    lines.append("  ".join("-" * w for w in widths))
            for t in self.tables.values():
                lines.extend(f"{t.table}: {note}" for note in t.notes)
        lines.extend(self.notes)
        return "\n".join(lines)


_ORDER = ["rows", "chunks", "bytes", "source", "quarantined", "not_in_target", "inserted", "existing", "updated",
          "in_target", "insert", "update", "only_in_target", "gone_from_source"]


def _column_order(name: str) -> tuple[int, str]:
    return (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)
