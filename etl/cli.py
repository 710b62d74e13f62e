"""``airflow-metadata-etl``: a thin argparse layer over ``etl.commands``.

Exit codes are part of the interface that cutover scripts rely on: 0 success, 1 the job
failed, 2 usage error, 3 ``diff`` found differences.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback

from . import __version__
from .errors import EtlError, UsageError


def _common(debug_only: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print a machine-readable report on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    if debug_only:
        return p
    f = p.add_argument_group("filters")
    f.add_argument("--tables", type=_csv, metavar="T,T", help="only these tables (may name tables skipped by default)")
    f.add_argument("--exclude-tables", type=_csv, metavar="T,T", default=(), help="leave these tables out")
    f.add_argument("--since", metavar="DATE", help="only history on or after DATE (ISO 8601, UTC unless an offset is given)")
    f.add_argument("--dag-id", action="append", dest="dag_ids", metavar="DAG_ID", help="only this DAG's history (repeatable)")
    f.add_argument("--chunk-rows", type=_positive, default=50_000, metavar="N", help="rows per chunk (default 50000)")
    f.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), metavar="URL",
                   help="S3-compatible endpoint (default $AWS_ENDPOINT_URL)")
    return p


_XCOM_JSON = ("xcom values that are pickles of JSON data arrive as JSON, which Airflow 2 reads without "
              "enable_xcom_pickling and Airflow 3 keeps (it archives pickles)")


def _load_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loading")
    g.add_argument("--target-version", help="override the target's detected Airflow version")
    g.add_argument("--on-conflict", choices=("skip", "update"), default="skip",
                   help="rows the target already has: keep the target's values (skip) or take the source's (update)")
    g.add_argument("--source-fernet-key", metavar="K[,K]", help="Fernet key(s) the source encrypted with")
    g.add_argument("--target-fernet-key", metavar="K[,K]", help="Fernet key(s) to re-encrypt with (first one encrypts)")
    g.add_argument("--force", action="store_true", help="write even while the target's scheduler is alive")
    g.add_argument("--xcom-json", action="store_true", help=_XCOM_JSON)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="airflow-metadata-etl",
        description="Move the history in an Airflow metadata database to another deployment or Airflow version.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common, bare = _common(), _common(debug_only=True)

    p = sub.add_parser("inspect", parents=[bare], help="dialect, Airflow version and row counts of a database")
    p.add_argument("url", metavar="URL")
    p.add_argument("--source-version", help="override the detected Airflow version")

    p = sub.add_parser("export", parents=[common], help="stream history into Parquet on S3 or a local folder")
    p.add_argument("--source", required=True, metavar="URL")
    p.add_argument("--to", required=True, dest="dest", metavar="DEST", help="s3://bucket/prefix or a local folder")
    p.add_argument("--source-version", help="override the source's detected Airflow version")

    p = sub.add_parser("import", parents=[common], help="load an export into a target database")
    p.add_argument("--from", required=True, dest="dest", metavar="DEST")
    p.add_argument("--target", required=True, metavar="URL")
    _load_options(p)

    p = sub.add_parser("migrate", parents=[common], help="move history directly from one database to another")
    p.add_argument("--source", required=True, metavar="URL")
    p.add_argument("--target", required=True, metavar="URL")
    p.add_argument("--via", metavar="DEST", help="also keep the staged Parquet copy here")
    p.add_argument("--source-version", help="override the source's detected Airflow version")
    _load_options(p)

    p = sub.add_parser("diff", parents=[common], help="dry run: what a migrate would write; exit 3 when not in sync")
    p.add_argument("--source", required=True, metavar="URL|DEST")
    p.add_argument("--target", required=True, metavar="URL")
    p.add_argument("--source-version", help="override the source's detected Airflow version")
    p.add_argument("--target-version", help="override the target's detected Airflow version")
    p.add_argument("--on-conflict", choices=("skip", "update"), default="skip")
    p.add_argument("--source-fernet-key", metavar="K[,K]")
    p.add_argument("--target-fernet-key", metavar="K[,K]")
    p.add_argument("--xcom-json", action="store_true", help=_XCOM_JSON)

    p = sub.add_parser("sample", parents=[bare], help="fill a database with a realistic, seeded Airflow history")
    p.add_argument("--airflow-version", required=True, metavar="V")
    p.add_argument("--target", required=True, metavar="URL")
    p.add_argument("--dag-runs", type=_positive, default=50, metavar="N", help="dag runs (about 20 task instances each)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--fernet-key", metavar="K", help="encrypt variables and connections with this key")
    p.add_argument("--faults", action="store_true", help="add the faults real databases carry (orphans, bad pickles, NaN)")

    p = sub.add_parser("plan", parents=[bare], help="the mapping chain and per-table rules between two versions")
    p.add_argument("--source-version", required=True, metavar="A")
    p.add_argument("--target-version", required=True, metavar="B")
    return parser


def _lean_memory() -> None:
    """Keep the peak resident size flat however many chunks a run streams through.

    Arrow's jemalloc keeps freed chunks for reuse, and glibc gives every thread that allocates
    (reader, loader, Arrow's CSV workers) an arena of its own and raises its mmap threshold
    after each large free, so a chunk-sized buffer freed in one arena is not reused by the
    next. One allocator, two arenas and large buffers always mapped and unmapped took a
    220k task-instance migration from 466 MB to 232 MB peak (with 4 MiB chunks; DEVELOPERS.md).
    """
    import ctypes

    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-8, 2)  # M_ARENA_MAX
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, so no longer raised after each free


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own progress lines and retries at INFO, libraries only when they warn; all on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("etl").setLevel(logging.DEBUG if args.debug else logging.INFO)
    if not args.debug:
        import warnings

        import sqlalchemy as sa

        # Reflection chatter about SQLite's PRAGMA view of named foreign keys; the keys are there.
        warnings.filterwarnings("ignore", category=sa.exc.SAWarning)
    from . import commands  # after parsing, so that --help stays fast
    _lean_memory()

    # A service manager, a container runtime or Airflow stopping a task sends SIGTERM: stop as on Ctrl-C,
    # putting back what a load set aside, then one line and exit 1.
    signal.signal(signal.SIGTERM, _interrupt)
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "json", "debug")}
    kwargs["progress"] = True  # a bar when stderr is a terminal, log lines otherwise (etl.progress)
    func = getattr(commands, "import_" if args.command == "import" else args.command)
    try:
        report = func(**kwargs)
    except UsageError as exc:
        return _fail(exc, args.debug, code=2)
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - anything unexpected still gets one line
        if _interrupted(exc):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            print("error: interrupted; run the same command again to resume", file=sys.stderr)
            return 1
        return _fail(exc, args.debug, code=1, unexpected=not isinstance(exc, EtlError))
    try:
        if args.json:
            json.dump(report.to_dict(), sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
        else:
            print(report.format_text())
        sys.stdout.flush()
    except BrokenPipeError:  # `| head` read what it wanted; the job itself is done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush fails no more
    return report.info.get("exit_code", 0)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interrupted(exc: BaseException | None) -> bool:
    """Stopped by Ctrl-C or SIGTERM, also where the stop broke a query in flight and the error that
    followed (the driver's connection still mid-COPY) is the one that surfaced."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _fail(exc: BaseException, debug: bool, code: int, unexpected: bool = False) -> int:
    if debug:
        traceback.print_exc()
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    prefix = f"error ({type(exc).__name__}): " if unexpected else "error: "
    print(prefix + text, file=sys.stderr)
    return code


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive whole number")
    return value


if __name__ == "__main__":
    sys.exit(main())
