"""The staging package: chunk Parquet files plus ``manifest.json``, on a local folder or S3.

Like a dlt load package, the package is the hand-over between stages: export writes it,
import reads it, and neither knows about the other's database. Each chunk is one zstd
Parquet file written straight to its place (S3 through smart_open's multipart upload); its
sha256 and row count go into a small per-table state file once it is complete, so an
interrupted export resumes after the last complete chunk. The manifest is written last,
and S3 has no rename, so its presence is what says the export is complete.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__, batches, urls
from .errors import EtlError

log = logging.getLogger("etl.staging")
MANIFEST = "manifest.json"
#: 2: the cut, an export id stamped into every chunk's Parquet metadata, and the source's server identity.
MANIFEST_VERSION = 2
#: The key of the Parquet key-value metadata that says which export, table and file a chunk was written as.
CHUNK_META = b"airflow_metadata_etl"
#: A writer's lease on an S3 destination counts as held for this long after its last renewal.
LEASE_SECONDS = 60.0
_PART = 8 << 20
#: Seconds between writes of a table's resume state while it exports.
STATE_SECONDS = 5.0


class Store:
    """Bytes at relative paths under a local folder or an ``s3://bucket/prefix``."""

    def __init__(self, dest: str, endpoint_url: str | None = None):
        self.dest = dest.rstrip("/")
        self.s3 = dest.startswith("s3://")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url)
        return self._client

    def url(self, rel: str) -> str:
        return f"{self.dest}/{rel}"

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, prefix = self.dest[len("s3://"):].partition("/")
        return bucket, f"{prefix}/{rel}" if prefix else rel

    def check_writable(self) -> None:
        """Fail before the first chunk: a missing bucket or a read-only folder, in one line."""
        if self.s3:
            from botocore.exceptions import BotoCoreError, ClientError

            from .retry import call

            bucket, _ = self._bucket_key("")
            try:
                call(self.client.head_bucket, Bucket=bucket, what=f"cannot write to {self.dest}: bucket {bucket}")
            except (ClientError, BotoCoreError) as exc:
                raise EtlError(f"cannot write to {self.dest}: bucket {bucket} is not reachable ({_aws_reason(exc)})") from None
            return
        try:
            os.makedirs(self.dest, exist_ok=True)
            probe = os.path.join(self.dest, ".etl-write-probe")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise EtlError(f"cannot write to {self.dest}: {exc.strerror}") from None

    def write(self, rel: str, data: bytes) -> None:
        from .retry import storage

        storage(self._write, rel, data, what=f"writing {self.url(rel)}")

    def _write(self, rel: str, data: bytes) -> None:
        if self.s3:
            from smart_open import open as sopen

            # One PUT for a chunk of usual size; a multipart upload in parts of _PART for anything larger.
            params = {"client": self.client, "multipart_upload": len(data) > _PART, "min_part_size": _PART}
            with sopen(self.url(rel), "wb", transport_params=params) as f:
                f.write(data)
            return
        path = os.path.join(self.dest, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"  # two writers never share a temporary file
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def read(self, rel: str) -> bytes:
        from .retry import storage

        return storage(self._read, rel, what=f"reading {self.url(rel)}")

    def _read(self, rel: str) -> bytes:
        if self.s3:
            bucket, key = self._bucket_key(rel)
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        with open(os.path.join(self.dest, rel), "rb") as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        if not self.s3:
            return os.path.exists(os.path.join(self.dest, rel))
        from .retry import storage

        return storage(self._exists, rel, what=f"reading {self.url(rel)}")

    def _exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = self._bucket_key(rel)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise


def _aws_reason(exc: Exception) -> str:
    err = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    return err.get("Message") or err.get("Code") or str(exc).splitlines()[0]


def parquet_bytes(batch: pa.RecordBatch, meta: dict | None = None) -> bytes:
    """Plain-encoded, zstd: a chunk is a few MB, where a dictionary per column per file cost more than
    it saved (task_instance: written in 0.68 s per million rows against 1.05, read in 0.39 against
    0.52, and a fifth smaller). ``meta`` goes into the file's key-value metadata."""
    buf = io.BytesIO()
    table = pa.Table.from_batches([batch])
    if meta is not None:
        table = table.replace_schema_metadata({CHUNK_META: json.dumps(meta, sort_keys=True).encode()})
    pq.write_table(table, buf, compression="zstd", use_dictionary=False)
    return buf.getvalue()


class PackageWriter:
    """Writes one export; resumable chunk by chunk.

    The export's state (``_state/identity.json``) keeps what a resumed export must reuse: when
    it started, and the cut it reads up to. Its id, stamped into every chunk, lets an import tell
    a chunk of this export from one copied in from another.
    """

    def __init__(self, store: Store, identity: dict[str, Any]):
        self.store, self.identity = store, identity
        self.started = time.time()
        self.cut: dict | None = None
        self.tables: dict[str, dict[str, Any]] = {}
        self._saved: dict[str, float] = {}
        self._lease: _Lease | None = None

    @property
    def export_id(self) -> str:
        return hashlib.sha256(json.dumps([self.identity, self.started], sort_keys=True, default=str).encode()).hexdigest()[:16]

    def open(self, cut: dict | None = None, exclusive: bool = True) -> bool:
        """False when this very export is already complete; an error when another one is there.

        ``cut`` is kept for a new export; a resumed one reads its own back (``self.cut``).
        ``exclusive``: refuse while another export writes here (the DAG's units write side by side).
        """
        self.store.check_writable()
        if exclusive:
            self._lease = _Lease(self.store)
            self._lease.take()
        if self.store.exists(MANIFEST):
            existing = json.loads(self.store.read(MANIFEST))
            if existing.get("identity") == self.identity:
                self.release()
                return False
            self.release()
            raise EtlError(f"{self.store.dest} already holds a different export ({_describe(existing)}); "
                           "choose another destination")
        if self.resume():
            return True
        self.cut = cut
        self.store.write("_state/identity.json", json.dumps({"identity": self.identity, "started": self.started,
                                                              "cut": cut}).encode())
        return True

    def resume(self) -> bool:
        """Take this export's start and cut from its state, as a resumed run or a unit of the DAG does."""
        if not self.store.exists("_state/identity.json"):
            return False
        begun = json.loads(self.store.read("_state/identity.json"))
        if begun.get("identity") != self.identity:
            self.release()
            raise EtlError(f"{self.store.dest} holds an unfinished export of something else; choose another destination")
        self.started, self.cut = begun["started"], begun.get("cut")  # a resumed export began when its first run did
        return True

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def chunk_file(self, table: str, rel: str, batch: pa.RecordBatch) -> tuple[dict, bytes]:
        """A chunk's Parquet bytes, stamped with this export, and its manifest entry."""
        data = parquet_bytes(batch, {"export": self.export_id, "table": table, "file": rel})
        return {"file": rel, "rows": batch.num_rows, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, data

    def table_state(self, table: str) -> dict[str, Any]:
        """Where an interrupted export of ``table`` stands: the chunks already written that still
        read back with their sha256, and the key after the last of them."""
        rel = f"_state/{table}.json"
        if not self.store.exists(rel):
            return {"chunks": [], "last_key": None, "done": False}
        state = json.loads(self.store.read(rel))
        for i, chunk in enumerate(state["chunks"]):
            if not self._intact(chunk):
                log.warning("%s: chunk %s is missing or differs from its sha256; exporting again from there",
                            table, self.store.url(chunk["file"]))
                del state["chunks"][i:]
                state["last_key"] = state["chunks"][-1]["last_key"] if state["chunks"] else None
                state["done"] = False
                break
        return state

    def _intact(self, chunk: dict) -> bool:
        return self.store.exists(chunk["file"]) and hashlib.sha256(self.store.read(chunk["file"])).hexdigest() == chunk["sha256"]

    def write_chunk(self, table: str, state: dict, batch: pa.RecordBatch, last_key) -> dict:
        rel = f"{table}/{table}.{len(state['chunks']):06d}.parquet"
        entry, data = self.chunk_file(table, rel, batch)
        self.store.write(rel, data)
        state["chunks"].append({**entry, "last_key": last_key})
        state["last_key"] = last_key
        # The state is rewritten whole, so not after every chunk: a resumed export redoes at most
        # the chunks of the last few seconds, under the same names and with the same rows.
        now = time.monotonic()
        if table not in self._saved or now - self._saved[table] >= STATE_SECONDS:
            self.store.write(f"_state/{table}.json", json.dumps(state).encode())
            self._saved[table] = now
            if self._lease is not None:
                self._lease.renew()
        return state["chunks"][-1]

    def finish_table(self, table: str, state: dict, schema: pa.Schema) -> None:
        state["done"] = True
        state["schema"] = schema_to_json(schema)
        self.store.write(f"_state/{table}.json", json.dumps(state).encode())
        self.tables[table] = {"schema": state["schema"], "rows": sum(c["rows"] for c in state["chunks"]),
                              "chunks": [{k: v for k, v in c.items() if k != "last_key"} for c in state["chunks"]]}

    def commit(self, info: dict[str, Any]) -> dict:
        manifest = {"manifest_version": MANIFEST_VERSION, "engine_version": __version__, "identity": self.identity,
                    "export_id": self.export_id, "cut": self.cut, **info, "started": _iso(self.started),
                    "finished": _iso(time.time()), "tables": self.tables}
        self.store.write(MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
        self.release()
        return manifest


class _Lease:
    """One export writing to a destination at a time.

    A folder is locked with ``flock`` for as long as the writer runs. S3 has no lock: the writer
    keeps ``_state/writer.json`` renewed, and a lease renewed within LEASE_SECONDS by another
    writer refuses the second one.
    """

    def __init__(self, store: Store):
        self.store, self.owner = store, uuid.uuid4().hex
        self._file = None

    def take(self) -> None:
        if not self.store.s3:
            import fcntl

            os.makedirs(os.path.join(self.store.dest, "_state"), exist_ok=True)
            self._file = open(os.path.join(self.store.dest, "_state", ".writer.lock"), "a+")
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._file.close()
                self._file = None
                raise EtlError(f"another export is writing to {self.store.dest} now; wait for it to finish, "
                               "or choose another destination") from None
            return
        rel = "_state/writer.json"
        if self.store.exists(rel):
            held = json.loads(self.store.read(rel))
            if held.get("owner") != self.owner and time.time() - held.get("renewed", 0) < LEASE_SECONDS \
                    and not _dead_here(held):
                raise EtlError(f"another export is writing to {self.store.dest} now (on {held.get('host')}, "
                               f"process {held.get('pid')}); wait for it to finish (a writer that died frees it "
                               f"within {LEASE_SECONDS:.0f} s), or choose another destination")
        self.renew()

    def renew(self) -> None:
        if self.store.s3:
            self.store.write("_state/writer.json", json.dumps({"owner": self.owner, "host": socket.gethostname(),
                                                               "pid": os.getpid(), "renewed": time.time()}).encode())

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self.store.s3:
            self.store.write("_state/writer.json", json.dumps({"owner": self.owner, "renewed": 0}).encode())


def _dead_here(held: dict) -> bool:
    """A lease of a process on this host that no longer runs (killed, say): the resumed export takes it over."""
    if held.get("host") != socket.gethostname() or not held.get("pid"):
        return False
    try:
        os.kill(int(held["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


class Package:
    """A complete export, read for import."""

    def __init__(self, store: Store):
        self.store = store
        if not store.exists(MANIFEST):
            raise EtlError(f"{store.dest} has no {MANIFEST}: not an export, or an export that did not finish")
        try:
            self.manifest = json.loads(store.read(MANIFEST))
        except ValueError:
            raise EtlError(f"{store.url(MANIFEST)} is not valid JSON") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("manifest_version", 0) > MANIFEST_VERSION:
            raise EtlError(f"{store.url(MANIFEST)} was written by engine {self.manifest.get('engine_version')} "
                           f"(manifest version {self.manifest.get('manifest_version')}); this engine {__version__} reads up to {MANIFEST_VERSION}")
        self._stats: dict[str, list[tuple[int | None, int | None]]] = {}

    @property
    def version(self) -> str:
        return self.manifest["airflow_version"]

    def tables(self) -> list[str]:
        return list(self.manifest["tables"])

    def verify(self) -> None:
        """The whole manifest against the files, before anything is written anywhere: the tables
        the export read, each table's schema against the catalog, and every chunk's sha256, row
        count, schema and origin. Also keeps each chunk's id range, for ``rows_by_id``."""
        from . import catalog, tables as known

        m, where = self.manifest, self.store.url(MANIFEST)
        identity = m.get("identity") or {}
        if not identity.get("source_fingerprint") or not isinstance(m.get("tables"), dict):
            raise EtlError(f"{where} names no source (identity.source_fingerprint) or no tables: not an export's manifest")
        version = m.get("airflow_version")
        if not isinstance(version, str) or catalog.schema_version(version) not in catalog.versions():
            raise EtlError(f"{where}: Airflow {version!r} is not a version this engine knows")
        read, listed = set(identity.get("tables") or []), set(m["tables"])
        if read - listed:
            raise EtlError(f"{where} lists no {', '.join(sorted(read - listed))}, though the export read it: the "
                           "manifest was altered, or belongs to another export")
        if listed - read:
            raise EtlError(f"{where} lists {', '.join(sorted(listed - read))}, which the export did not read")
        schema = catalog.load(version)
        for table, spec in m["tables"].items():
            if table not in schema.tables and not fnmatch.fnmatch(table, known.MOVED_PATTERN):
                raise EtlError(f"{where}: table {table} is not an Airflow {version} table")
            declared = schema_from_json(spec["schema"])
            if table in schema.tables:
                expected = {c["name"]: catalog.arrow_type(c["type"]) for c in schema.columns(table)}
                for field in declared:
                    if field.name in expected and field.type != expected[field.name]:
                        raise EtlError(f"{where}: {table}.{field.name} is {field.type} in the manifest, but Airflow "
                                       f"{version} keeps it as {expected[field.name]}")
            if sum(c["rows"] for c in spec["chunks"]) != spec["rows"]:
                raise EtlError(f"{where}: table {table} claims {spec['rows']} rows, its chunks hold "
                               f"{sum(c['rows'] for c in spec['chunks'])}")
            self._stats[table] = [self._verified(table, chunk, declared) for chunk in spec["chunks"]]

    def _verified(self, table: str, chunk: dict, declared: pa.Schema) -> tuple[int | None, int | None]:
        """One chunk checked against its manifest entry; its id range, when it has one."""
        url = self.store.url(chunk["file"])
        footer = pq.ParquetFile(io.BytesIO(self._checked(chunk))).metadata
        if footer.num_rows != chunk["rows"]:
            raise EtlError(f"chunk {url} holds {footer.num_rows} rows, the manifest says {chunk['rows']}")
        actual = footer.schema.to_arrow_schema()
        if [(f.name, f.type) for f in actual] != [(f.name, f.type) for f in declared]:
            raise EtlError(f"chunk {url} has columns {_columns(actual)}, the manifest says {_columns(declared)}")
        if self.manifest.get("export_id"):
            stamp = json.loads((footer.metadata or {}).get(CHUNK_META, b"{}"))
            if stamp != {"export": self.manifest["export_id"], "table": table, "file": chunk["file"]}:
                raise EtlError(f"chunk {url} was not written by this export as {table} {chunk['file']} "
                               f"(it says {stamp or 'nothing'}): the manifest was altered")
        if "id" in actual.names and footer.num_row_groups:
            i = actual.names.index("id")
            stats = [footer.row_group(g).column(i).statistics for g in range(footer.num_row_groups)]
            if all(s is not None and s.has_min_max for s in stats):
                return min(s.min for s in stats), max(s.max for s in stats)
        return None, None

    def _checked(self, chunk: dict) -> bytes:
        try:
            data = self.store.read(chunk["file"])
        except (OSError, EtlError) as exc:
            raise EtlError(f"chunk {self.store.url(chunk['file'])} cannot be read: {exc}") from None
        if hashlib.sha256(data).hexdigest() != chunk["sha256"]:
            raise EtlError(f"chunk {self.store.url(chunk['file'])} is corrupt or truncated (sha256 differs from the manifest)")
        return data

    def chunks(self, table: str, first: int = 0, stop: int | None = None) -> Iterator[tuple[pa.RecordBatch, str, str]]:
        """The table's chunks ``[first, stop)`` (all by default): an import DAG loads a table in parts."""
        schema = schema_from_json(self.manifest["tables"][table]["schema"])
        for chunk in self.manifest["tables"][table]["chunks"][first:stop]:
            yield self._read(chunk, schema), chunk["sha256"], chunk["file"]

    def _read(self, chunk: dict, schema: pa.Schema) -> pa.RecordBatch:
        data = self._checked(chunk)
        try:
            t = batches.read_parquet(data, schema)
        except (pa.ArrowException, OSError) as exc:
            raise EtlError(f"chunk {self.store.url(chunk['file'])} is not readable Parquet: {str(exc).splitlines()[0]}") from None
        return t.combine_chunks().to_batches(max_chunksize=max(1, t.num_rows))[0] if t.num_rows else \
            batches.from_rows([], schema)

    def rows_by_id(self, table: str, ids: list[int], columns: tuple[str, ...]) -> dict[int, tuple]:
        """Rows of ``table`` by id, read from the chunks whose id range holds them (after ``verify``)."""
        if table not in self.manifest["tables"]:
            return {}
        spec = self.manifest["tables"][table]
        schema = schema_from_json(spec["schema"])
        if "id" not in schema.names or any(c not in schema.names for c in columns):
            return {}
        ranges = self._stats.get(table) or [(None, None)] * len(spec["chunks"])
        out = {}
        for chunk, (low, high) in zip(spec["chunks"], ranges):
            if low is not None and not any(low <= i <= high for i in ids):
                continue
            batch = self._read(chunk, schema)
            for row in batches.rows(batches.select(batch, ["id", *columns])):
                if row["id"] in ids:
                    out[row["id"]] = tuple(row[c] for c in columns)
        return out


class QuarantineWriter:
    """Rows that cannot be mapped, kept as Parquet with the reason, never dropped.

    Under ``quarantine/<target>/<run>/<table>/`` of the store (beside the export, or the migrate's
    own folder): two targets or two runs never mix their files, and the report names the folder.
    """

    def __init__(self, store: Store | None, target: str = "", run: str | None = None):
        self.store = store
        stamp = run or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.folder = f"quarantine/{urls.label(target)}/{stamp}" if target else f"quarantine/{stamp}"
        self.counts: dict[tuple[str, str], int] = {}
        self._n: dict[str, int] = {}

    @property
    def location(self) -> str | None:
        return self.store.url(self.folder) if self.store is not None and self.counts else None

    def _name(self, table: str, n: int) -> str:
        return f"{table}.{n:05d}.parquet"

    def __call__(self, table: str, batch: pa.RecordBatch, reason: str) -> None:
        if batch.num_rows == 0:
            return
        self.counts[(table, reason)] = self.counts.get((table, reason), 0) + batch.num_rows
        if self.store is None:
            return
        n = self._n[table] = self._n.get(table, 0) + 1
        safe = batches.put(batch, "reason", pa.array([reason] * batch.num_rows, pa.string()))
        self.store.write(f"{self.folder}/{table}/{self._name(table, n)}", parquet_bytes(safe))


def schema_to_json(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


_TYPES = {"string": pa.string(), "binary": pa.binary(), "bool": pa.bool_(), "int16": pa.int16(), "int32": pa.int32(),
          "int64": pa.int64(), "double": pa.float64(), "date32[day]": pa.date32(), "timestamp[us, tz=UTC]": pa.timestamp("us", "UTC"),
          "timestamp[us]": pa.timestamp("us")}


def schema_from_json(fields: list[dict]) -> pa.Schema:
    return pa.schema([pa.field(f["name"], _TYPES[f["type"]]) for f in fields])


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _describe(manifest: dict) -> str:
    identity = manifest.get("identity") or {}
    if not identity:
        return "unknown origin"
    return f"Airflow {identity.get('airflow_version')} from {manifest.get('source') or identity.get('source')}"


def _columns(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} {f.type}" for f in schema)
