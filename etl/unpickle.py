"""A restricted unpickler: plain data loads, anything that would run code does not.

Airflow stored ``dag_run.conf``, ``executor_config`` and (before 2.0, or with pickling enabled)
xcom values as pickles. Loading a pickle with the full unpickler imports and calls whatever it
names, so a hostile or merely odd row could run code inside the migration. Only the classes
listed here are admitted; the timezone types Airflow's values carry are rebuilt as the
standard library's own, without importing pendulum or pytz.
"""
from __future__ import annotations

import datetime as dt
import decimal
import io
import pickle
import zoneinfo


class UnsafePickle(ValueError):
    """The pickle names something that is not plain data; the row is quarantined with this reason."""


def _zone(name, *_):
    try:
        return zoneinfo.ZoneInfo(name)
    except Exception:
        return dt.timezone.utc if str(name).upper() in ("UTC", "Z") else None


def _fixed(offset, *_):
    return dt.timezone(dt.timedelta(seconds=offset))


def _pendulum_datetime(*args):
    return dt.datetime(*args)


_PLAIN = {
    ("builtins", n): getattr(__import__("builtins"), n)
    for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "complex", "bool")
}
_PLAIN.update({("__builtin__", n[1]): v for n, v in list(_PLAIN.items())})  # protocol 0-2 pickles from Python 2
_PLAIN.update({
    ("datetime", "datetime"): dt.datetime, ("datetime", "date"): dt.date, ("datetime", "time"): dt.time,
    ("datetime", "timedelta"): dt.timedelta, ("datetime", "timezone"): dt.timezone, ("decimal", "Decimal"): decimal.Decimal,
    ("pytz", "_UTC"): lambda: dt.timezone.utc, ("pytz", "_p"): _zone, ("pytz", "utc"): dt.timezone.utc,
    ("pendulum.tz.timezone", "Timezone"): _zone, ("pendulum.tz.timezone", "FixedTimezone"): _fixed,
    ("pendulum.datetime", "DateTime"): _pendulum_datetime, ("dateutil.tz.tz", "tzutc"): lambda: dt.timezone.utc,
})


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _PLAIN[(module, name)]
        except KeyError:
            raise UnsafePickle(f"pickle refers to {module}.{name}, which is not plain data") from None


def loads(data: bytes):
    """Like ``pickle.loads`` for plain data; raises ``UnsafePickle`` for anything else."""
    try:
        return _Restricted(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except Exception as exc:
        raise UnsafePickle(f"unreadable pickle: {type(exc).__name__}") from None


def is_pickle(data: bytes | None) -> bool:
    """Airflow's own test in 3.0's migration: protocol 2+ pickles start with byte 0x80."""
    return bool(data) and data[:1] == b"\x80"
