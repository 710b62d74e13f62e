"""The schema catalog: what each Airflow release's metadata database looks like, as real Airflow built it.

``schemas/airflow-<version>.json`` is written by ``bin/snapshot-schemas``, which runs the release's
own ``initdb`` / ``db init`` / ``db migrate`` on an empty PostgreSQL database and reflects it with
``reflect_schema``. Everything else reads it: the extractor's Arrow types, the mapper's column
lists, and ``create_empty``, which builds the same schema (same table, constraint, index and
sequence names, alembic revision stamped) on PostgreSQL, MySQL or SQLite, so that real Airflow's
own migrations, which refer to constraints by name, accept it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from importlib import resources
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from .errors import EtlError, UsageError

FORMAT = 1


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


@dataclasses.dataclass
class Schema:
    airflow_version: str
    alembic_revision: str
    tables: dict[str, dict[str, Any]]

    def columns(self, table: str) -> list[dict[str, Any]]:
        return self.tables[table]["columns"]


@functools.lru_cache(maxsize=None)
def versions() -> list[str]:
    """Versions with a schema snapshot of their own, oldest first: the steps the mapper walks."""
    names = [p.name for p in resources.files("etl.schemas").iterdir() if p.name.startswith("airflow-") and p.name.endswith(".json")]
    return sorted((n[len("airflow-"):-len(".json")] for n in names), key=version_key)


@functools.lru_cache(maxsize=None)
def releases() -> dict[str, str]:
    """Every Airflow release from 1.10.12 on with its alembic head, oldest first (``schemas/releases.json``,
    read from the releases' wheels by ``bin/snapshot-schemas``)."""
    return json.loads(resources.files("etl.schemas").joinpath("releases.json").read_text())


@functools.lru_cache(maxsize=None)
def heads() -> dict[str, str]:
    """alembic head -> the oldest catalog version built at it (2.10.5 rather than 2.11.2: identical schemas)."""
    out: dict[str, str] = {}
    for v in versions():
        out.setdefault(load(v).alembic_revision, v)
    return out


def schema_version(version: str) -> str:
    """The catalog version whose snapshot serves ``version``: its own, or that of the release with the same
    alembic head (2.7.2 is served by 2.7.3: no 2.7.x patch changed the schema). Versions the catalog
    does not know pass through, for chains built in memory."""
    if version in versions():
        return version
    return heads().get(releases().get(version, ""), version)


def schema_key(version: str) -> tuple[int, ...]:
    """Where a version's data sits in the chain: that of the snapshot serving it, so that 2.7.2 data is
    not given 2.7.3's step a second time."""
    return version_key(schema_version(version))


def require(version: str) -> str:
    """A version typed by someone (or named by a manifest): refused as a usage error, exit 2, naming what is known."""
    if version in versions() or schema_version(version) in versions():
        return version
    if version in releases():
        raise UsageError(f"Airflow {version} (alembic head {releases()[version]}) has no schema snapshot in this engine "
                         f"yet; releases served: {served_ranges()}")
    raise UsageError(f"Airflow {version} is not a release this engine knows; releases served: {served_ranges()}")


def served_ranges() -> str:
    """The served releases as ranges of consecutive ones ('1.10.12 to 2.2.2, 2.2.4 to 2.3.0, ...')."""
    ranges: list[list[str]] = []
    previous_served = False
    for release in releases():
        served = schema_version(release) in versions()
        if served and previous_served:
            ranges[-1][1] = release
        elif served:
            ranges.append([release, release])
        previous_served = served
    return ", ".join(a if a == b else f"{a} to {b}" for a, b in ranges)


def first_release(version: str) -> str:
    """The oldest release at ``version``'s head (3.0.0 for 3.0.2): where what a step does first shows."""
    head = releases().get(version)
    return next((r for r, h in releases().items() if h == head), version)


def releases_at(version: str) -> list[str]:
    """The releases a database built by ``version`` cannot be told apart from: those sharing its head."""
    head = load(version).alembic_revision
    return [r for r, h in releases().items() if h == head]


@functools.lru_cache(maxsize=None)
def load(version: str) -> Schema:
    require(version)
    version = schema_version(version)
    data = json.loads(resources.files("etl.schemas").joinpath(f"airflow-{version}.json").read_text())
    if data.get("format") != FORMAT:
        raise EtlError(f"schemas/airflow-{version}.json has format {data.get('format')}, this engine reads {FORMAT}")
    return Schema(data["airflow_version"], data["alembic_revision"], data["tables"])


# -- reflection -------------------------------------------------------------------------------

_NEXTVAL = re.compile(r"^nextval\('(?:\"?[\w]+\"?\.)?\"?([\w]+)\"?'(?:::regclass)?\)$")


def reflect_schema(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    """Tables, columns and every named constraint and index, in a stable order, as plain data."""
    insp = sa.inspect(engine)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(insp.get_table_names()):
        columns = []
        for c in insp.get_columns(name):
            col: dict[str, Any] = {"name": c["name"], "type": _type_name(c["type"], engine.dialect),
                                   "nullable": bool(c["nullable"]), "default": c.get("default")}
            m = _NEXTVAL.match(col["default"] or "")
            if m:
                col["default"], col["autoincrement"], col["sequence"] = None, True, m.group(1)
            elif c.get("identity"):
                col["autoincrement"], col["identity"] = True, True
            if isinstance(c["type"], sa.Enum) and c["type"].enums:
                col["enum"] = {"name": c["type"].name, "values": list(c["type"].enums)}
            columns.append(col)
        pk = insp.get_pk_constraint(name)
        out[name] = {
            "columns": columns,
            "primary_key": {"name": pk.get("name"), "columns": pk.get("constrained_columns", [])} if pk.get("constrained_columns") else None,
            "unique_constraints": sorted(({"name": u["name"], "columns": u["column_names"]} for u in insp.get_unique_constraints(name)),
                                         key=lambda u: u["name"] or ""),
            "foreign_keys": sorted(({"name": f["name"], "columns": f["constrained_columns"], "referred_table": f["referred_table"],
                                     "referred_columns": f["referred_columns"], "ondelete": (f.get("options") or {}).get("ondelete"),
                                     "onupdate": (f.get("options") or {}).get("onupdate")} for f in insp.get_foreign_keys(name)),
                                   key=lambda f: (f["name"] or "", f["columns"])),
            "indexes": sorted((_index(i) for i in insp.get_indexes(name) if not i.get("duplicates_constraint")),
                              key=lambda i: i["name"] or ""),
            "check_constraints": sorted(({"name": c["name"], "sqltext": c["sqltext"]} for c in _checks(insp, name)),
                                        key=lambda c: c["name"] or ""),
        }
    return out


def _checks(insp: sa.Inspector, name: str) -> list[dict]:
    try:
        return insp.get_check_constraints(name)
    except NotImplementedError:
        return []


def _index(i: dict) -> dict:
    out = {"name": i["name"], "columns": i["column_names"], "unique": bool(i.get("unique"))}
    if any(c is None for c in i["column_names"]):
        out["expressions"] = i.get("expressions")
    where = (i.get("dialect_options") or {}).get("postgresql_where")
    if where is not None:
        out["where"] = str(where)
    return out


def _type_name(t: sa.types.TypeEngine, dialect) -> str:
    if isinstance(t, sa.Enum):
        return "ENUM"
    return t.compile(dialect=dialect)


# -- Arrow types --------------------------------------------------------------------------------

def arrow_type(type_name: str) -> pa.DataType:
    """One Arrow type per catalog type, whatever dialect the rows come from."""
    t = type_name.upper()
    if t.startswith("TIMESTAMP") or t.startswith("DATETIME"):
        return pa.timestamp("us", tz="UTC") if "WITHOUT" not in t else pa.timestamp("us")
    if t.startswith("DATE"):
        return pa.date32()
    if t.startswith(("BYTEA", "BLOB", "LONGBLOB", "BINARY", "VARBINARY")):
        return pa.binary()
    if t.startswith("BOOL"):
        return pa.bool_()
    if t.startswith("SMALLINT"):
        return pa.int16()
    if t.startswith("BIGINT"):
        return pa.int64()
    if t.startswith("INT"):
        return pa.int32()
    if t.startswith(("DOUBLE", "FLOAT", "REAL", "NUMERIC", "DECIMAL")):
        return pa.float64()
    return pa.string()  # VARCHAR, TEXT, JSON, JSONB, UUID, ENUM


def arrow_schema(version: str, table: str) -> pa.Schema:
    cols = load(version).columns(table)
    return pa.schema([pa.field(c["name"], arrow_type(c["type"]), nullable=c["nullable"]) for c in cols])


# -- building a database from the catalog ---------------------------------------------------------

_TYPE = re.compile(r"^([A-Z ]+?)(?:\((\d+)(?:,\s*(\d+))?\))?( WITH(?:OUT)? TIME ZONE)?(\[\])?$")


def _sa_type(col: dict, dialect: str, keyed: bool) -> sa.types.TypeEngine:
    t = col["type"].upper()
    if "enum" in col:
        return sa.Enum(*col["enum"]["values"], name=col["enum"]["name"], native_enum=dialect == "postgresql")
    m = _TYPE.match(t)
    base, n = (m.group(1).strip(), m.group(2)) if m else (t, None)
    tz = "WITH TIME ZONE" in t
    if base.startswith("TIMESTAMP"):
        if dialect == "postgresql":
            return postgresql.TIMESTAMP(timezone=tz, precision=int(n) if n else None)
        if dialect == "mysql":
            return mysql.TIMESTAMP(fsp=6) if tz else mysql.DATETIME(fsp=6)
        return sa.DateTime(timezone=tz)
    if base in ("VARCHAR", "CHARACTER VARYING", "CHAR", "CHARACTER"):
        length = int(n) if n else None
        if dialect == "mysql":
            # InnoDB keys hold 3072 bytes; Airflow itself keys its ids with utf8mb3_bin on MySQL.
            if keyed and (length or 0) > 1000:  # asset names and uris, as Airflow keys them on MySQL
                return mysql.VARCHAR(length, charset="latin1", collation="latin1_general_cs")
            return mysql.VARCHAR(length or 255, collation="utf8mb3_bin" if keyed else None)
        return sa.String(length) if base.startswith("VAR") or base == "CHARACTER VARYING" else sa.CHAR(length)
    if base == "TEXT":
        return mysql.LONGTEXT() if dialect == "mysql" else sa.Text()
    if base == "BYTEA":
        return mysql.LONGBLOB() if dialect == "mysql" else sa.LargeBinary()
    if base in ("JSON", "JSONB"):
        if dialect == "postgresql":
            return postgresql.JSONB() if base == "JSONB" else postgresql.JSON()
        return mysql.LONGTEXT() if dialect == "mysql" else sa.JSON()
    if base == "UUID":
        return postgresql.UUID(as_uuid=False) if dialect == "postgresql" else sa.String(36)
    if base == "BOOLEAN":
        return sa.Boolean(create_constraint=False)
    if base == "SMALLINT":
        return sa.SmallInteger()
    if base == "BIGINT":
        return sa.BigInteger()
    if base == "INTEGER":
        return sa.Integer()
    if base in ("DOUBLE PRECISION", "FLOAT", "REAL"):
        return postgresql.DOUBLE_PRECISION() if dialect == "postgresql" and base == "DOUBLE PRECISION" else sa.Float()
    if base in ("NUMERIC", "DECIMAL"):
        return sa.Numeric(int(n) if n else None, int(m.group(3)) if m and m.group(3) else None)
    if base == "DATE":
        return sa.Date()
    if base == "INTERVAL":
        return postgresql.INTERVAL() if dialect == "postgresql" else sa.Interval()
    raise EtlError(f"catalog type {col['type']!r} of column {col['name']} has no mapping")


def _default(text: str | None, dialect: str):
    if text is None:
        return None
    if dialect == "postgresql":
        return sa.text(text)
    plain = re.sub(r"::[\w ]+(\[\])?", "", text).strip()
    if plain.startswith("(") and plain.endswith(")"):
        plain = plain[1:-1]
    lowered = plain.lower()
    if lowered in ("now()", "current_timestamp", "clock_timestamp()"):
        return sa.text("CURRENT_TIMESTAMP")
    if lowered in ("true", "false"):
        return sa.text("1" if lowered == "true" else "0")
    if dialect == "mysql" and plain.startswith(("'{", "'[")):
        return None  # MySQL takes no literal default on LONGTEXT/JSON; Airflow sets these in Python
    return sa.text(plain)


def metadata(version: str, dialect: str) -> sa.MetaData:
    """Every table of ``version`` with the catalog's names, typed for ``dialect``."""
    schema = load(version)
    meta = sa.MetaData()
    for name, spec in schema.tables.items():
        keyed = set(spec["primary_key"]["columns"] if spec["primary_key"] else [])
        for group in (spec["unique_constraints"], spec["indexes"], spec["foreign_keys"]):
            for item in group:
                keyed.update(c for c in item["columns"] if c)
        cols = []
        for c in spec["columns"]:
            args: list[Any] = []
            kwargs: dict[str, Any] = {"nullable": c["nullable"]}
            if c.get("autoincrement"):
                kwargs["autoincrement"] = True
                if dialect == "postgresql" and c.get("sequence"):
                    # Not SERIAL: the sequence keeps the name real Airflow gave it (dataset_id_seq
                    # behind asset.id after 3.0's rename, user_id_seq behind 1.10's users).
                    kwargs["server_default"] = sa.text(f"nextval('{c['sequence']}'::regclass)")
                    kwargs["autoincrement"] = False
                elif dialect == "postgresql" and c.get("identity"):
                    args.append(sa.Identity())
            else:
                kwargs["autoincrement"] = False
                default = _default(c.get("default"), dialect)
                if default is not None:
                    kwargs["server_default"] = default
            cols.append(sa.Column(c["name"], _sa_type(c, dialect, c["name"] in keyed), *args, **kwargs))
        items: list[Any] = []
        if spec["primary_key"]:
            items.append(sa.PrimaryKeyConstraint(*spec["primary_key"]["columns"], name=spec["primary_key"]["name"]))
        for u in spec["unique_constraints"]:
            items.append(sa.UniqueConstraint(*u["columns"], name=u["name"]))
        for f in spec["foreign_keys"]:
            items.append(sa.ForeignKeyConstraint(f["columns"], [f"{f['referred_table']}.{r}" for r in f["referred_columns"]],
                                                 name=f["name"], ondelete=f.get("ondelete"), onupdate=f.get("onupdate"),
                                                 use_alter=True))
        if dialect == "postgresql":
            for ck in spec.get("check_constraints", []):
                items.append(sa.CheckConstraint(sa.text(ck["sqltext"]), name=ck["name"]))
        table = sa.Table(name, meta, *cols, *items)
        for i in spec["indexes"]:
            if i.get("expressions") or None in i["columns"]:
                if dialect != "postgresql":
                    continue
                exprs = [sa.text(e) for e in i["expressions"]]
            else:
                exprs = [table.c[c] for c in i["columns"]]
            kw = {"postgresql_where": sa.text(i["where"])} if i.get("where") and dialect == "postgresql" else {}
            if dialect == "mysql":
                kw["mysql_length"] = {c["name"]: 191 for c in spec["columns"]
                                      if c["name"] in i["columns"] and c["type"].upper() in ("TEXT", "JSON", "JSONB")}
            sa.Index(i["name"], *exprs, unique=i["unique"], _table=table, **kw)
    return meta


def create_empty(engine: sa.Engine, version: str) -> None:
    """Build ``version``'s schema on an empty database and stamp its alembic revision."""
    dialect = engine.dialect.name
    meta = metadata(version, dialect)
    schema = load(version)
    with engine.begin() as conn:
        if dialect == "postgresql":
            for name, spec in schema.tables.items():
                for c in spec["columns"]:
                    if c.get("sequence"):
                        conn.exec_driver_sql(f'CREATE SEQUENCE IF NOT EXISTS "{c["sequence"]}"')
        meta.create_all(conn)
        if dialect == "postgresql":
            for name, spec in schema.tables.items():
                for c in spec["columns"]:
                    if c.get("sequence"):
                        conn.exec_driver_sql(f'ALTER SEQUENCE "{c["sequence"]}" OWNED BY "{name}"."{c["name"]}"')
        if "alembic_version" in meta.tables:
            conn.execute(meta.tables["alembic_version"].delete())
            conn.execute(meta.tables["alembic_version"].insert().values(version_num=schema.alembic_revision))
