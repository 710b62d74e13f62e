"""Airflow 3's rules for turning 2.x byte values into JSON, per target release.

Both migrations were edited after 3.0.0 shipped, so the rows a database ends up with depend on
the release that runs the upgrade, i.e. on our *target* version (read from the wheels of 3.0.6,
3.1.8, 3.2.2 and 3.3.2; the edits landed somewhere in 3.1.0..3.1.8 and 3.2.2..3.3.2):

xcom.value (eed27faa34e3), first archiving every pickled value (first byte 0x80) to ``_xcom_archive``,
then ``CAST(convert_from(value, 'UTF8') AS JSONB)`` on PostgreSQL:
  * 3.0: no clean-up; one value that is not strict JSON (NaN, Infinity, a ``\\u0000`` escape) or not
    UTF-8 text makes the cast, and so the whole upgrade, fail.
  * 3.1, 3.2: NaN / Infinity / -Infinity tokens are first quoted into strings ("NaN"), by a regular
    expression over every value.
  * 3.3: ``\\u0000`` escapes are first stripped, then, only in values that still are not valid JSONB,
    the same tokens become ``null``.
An empty value makes every release fail (``get_byte(value, 0)`` is out of range).

dag_run.conf (e39a26ac59f6): the exact pickle of ``{}`` (protocol 5) stays NULL; anything else is
``json.dumps(pickle.loads(conf))``, NULL when that raises.
  * 3.0, 3.1, 3.2: plain ``json.dumps``: NaN or a NUL character produce text JSONB rejects, and on
    PostgreSQL the failed UPDATE aborts the upgrade (on MySQL the row is just left NULL).
  * 3.3: first ``_json_safe``: non-finite floats become "NaN"/"Infinity"/"-Infinity", NUL characters go.

Where Airflow's own upgrade would stop, we cannot produce "its" rows: xcom rows are quarantined, and a
run keeps its place with conf NULL (as on MySQL) while its original row is set aside with the reason.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

from etl import unpickle

#: What Airflow 3 compares conf with to skip it (an empty dict pickled with protocol 5).
EMPTY_CONF = b"\x80\x05}\x94."

_SPACE = r"[ \t\n\r\f\v]"  # PostgreSQL's \s ([[:space:]])
_NON_FINITE = re.compile(rf"([:,\[]{_SPACE}*|^)(NaN|-?Infinity)(?={_SPACE}*[,}}\]]|\Z)")


class _Constant(ValueError):
    pass


def _reject_constant(name: str):
    raise _Constant(name)


def _bad_text(obj) -> bool:
    """A string JSONB cannot hold: a NUL character, or half of a surrogate pair."""
    if isinstance(obj, str):
        return "\x00" in obj or any("\ud800" <= ch <= "\udfff" for ch in obj)
    if isinstance(obj, dict):
        return any(_bad_text(k) or _bad_text(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_bad_text(v) for v in obj)
    return False


def jsonb_accepts(text: str) -> bool:
    """Whether PostgreSQL's JSONB input would take ``text`` (strict JSON, no NUL, no lone surrogates)."""
    if "\x00" in text:
        return False
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False
    return not ("\\u" in text and _bad_text(obj))


def xcom_value(raw: bytes, target: tuple[int, ...]) -> tuple[str | None, str | None]:
    """(JSON text, None), or (None, why Airflow's upgrade to ``target`` would stop on this value)."""
    release = ".".join(map(str, target))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        return None, f"value is not UTF-8 text: Airflow {release}'s migration eed27faa34e3 stops on it"
    if target >= (3, 3):
        if "\\u0000" in text:
            text = text.replace("\\\\", "\x01").replace("\\u0000", "").replace("\x01", "\\\\")
        if ("NaN" in text or "Infinity" in text) and not jsonb_accepts(text):
            text = _NON_FINITE.sub(r"\1null", text)
    elif target >= (3, 1):
        text = _NON_FINITE.sub(r'\1"\2"', text)
    if not jsonb_accepts(text):
        return None, f"value is not strict JSON: Airflow {release}'s migration eed27faa34e3 stops on it"
    return text, None


def _json_safe(obj):
    """Airflow 3.3's clean-up of an unpickled conf before ``json.dumps``."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, str):
        return obj.replace(chr(0), "")
    if isinstance(obj, Mapping):
        return {_json_safe(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (bytes, bytearray)):
        return [_json_safe(v) for v in obj]
    return obj


def conf_json(raw: bytes, target: tuple[int, ...]) -> tuple[str | None, str | None]:
    """(JSON text or None, why the value is not carried over, or None when Airflow leaves it NULL too)."""
    release = ".".join(map(str, target))
    if raw == EMPTY_CONF:
        return None, None
    try:
        obj = unpickle.loads(raw)
    except unpickle.PickleRefused as exc:
        return None, f"conf not unpickled, loaded as NULL: {exc}"
    except unpickle.PickleUnreadable:
        return None, "conf is not a readable pickle: loaded as NULL, as Airflow does (e39a26ac59f6)"
    if target >= (3, 3):
        obj = _json_safe(obj)
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError, RecursionError):
        return None, "conf holds values JSON cannot represent: loaded as NULL, as Airflow does (e39a26ac59f6)"
    if not jsonb_accepts(text):
        return None, (f"conf holds NaN, Infinity or a NUL character: Airflow {release}'s migration e39a26ac59f6 "
                      "stops on it on PostgreSQL; loaded as NULL, as on MySQL")
    return text, None
