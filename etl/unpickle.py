"""A restricted unpickler: plain data in, nothing executed.

Airflow 2 stores ``dag_run.conf`` as a pickle, and Airflow 3's migration e39a26ac59f6 turns it
into JSON with ``pickle.loads``, which runs whatever the pickle asks for. A metadata database
is not a trusted source, so we never import or call anything a pickle names unless it is on
the list below: the builtin containers and scalars, ``datetime``, ``Decimal``, and the
date, duration and timezone classes Airflow values carry (pendulum 1, 2 and 3, dateutil, pytz). Those third-party
timezones are rebuilt as ``datetime.timezone`` or ``zoneinfo.ZoneInfo`` by stand-ins defined
here, so none of their libraries' code runs (or needs to be installed). Anything else raises
``PickleRefused`` and the caller quarantines the row with that reason.
"""
from __future__ import annotations

import builtins
import datetime as dt
import decimal
import io
import pickle
import zoneinfo
from typing import Any, Callable


class PickleRefused(ValueError):
    """The pickle names something that is not plain data; nothing it names was imported or run."""


class PickleUnreadable(ValueError):
    """The bytes are not a pickle this unpickler can read (truncated, corrupt, unknown opcode)."""


def loads(data: bytes) -> Any:
    """Unpickle ``data`` admitting plain data only; the result holds stdlib types only."""
    try:
        return _plain(_Unpickler(io.BytesIO(data), encoding="ASCII").load())
    except PickleRefused:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, RecursionError, UnicodeDecodeError) as exc:
        raise PickleUnreadable(f"unreadable pickle: {type(exc).__name__}: {exc}") from None


# -- stand-ins for third-party timezones ---------------------------------------------------------

class _Zone(dt.tzinfo):
    """A pickled third-party timezone while unpickling; ``_plain`` swaps in ``self.tz``.

    Subclassing ``tzinfo`` lets stdlib ``datetime`` accept it as its tzinfo argument during
    the load. ``__setstate__`` drops library-private state (pendulum's transition tables,
    dateutil's ``_ttinfo`` lists): the constructor arguments already name the zone.
    """

    tz: dt.tzinfo = dt.timezone.utc

    def __init__(self, *args) -> None:
        pass  # __new__ resolved the zone; tzinfo.__init__ takes no arguments

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict) and isinstance(state.get("_offset"), (int, dt.timedelta)):
            # dateutil tzoffset, created empty by NEWOBJ and filled here
            self.tz = _fixed(state["_offset"], state.get("_name"))

    def utcoffset(self, when):
        return self.tz.utcoffset(when)

    def dst(self, when):
        return self.tz.dst(when)

    def tzname(self, when):
        return self.tz.tzname(when)


def _fixed(offset: int | dt.timedelta, name: str | None = None) -> dt.timezone:
    delta = offset if isinstance(offset, dt.timedelta) else dt.timedelta(seconds=offset)
    if not delta:
        return dt.timezone.utc
    return dt.timezone(delta, name) if isinstance(name, str) and name else dt.timezone(delta)


def _named(name: str) -> dt.tzinfo:
    return dt.timezone.utc if name in ("UTC", "Etc/UTC", "utc") else zoneinfo.ZoneInfo(name)


def _zone(tz: dt.tzinfo) -> _Zone:
    zone = _Zone()
    zone.tz = tz
    return zone


class _PendulumTimezone(_Zone):
    """pendulum ``Timezone(name)`` (2.x: REDUCE + BUILD) and ``Timezone._unpickle(name, v)`` (3.x)."""

    def __new__(cls, name: str = "UTC", *_):
        zone = super().__new__(cls)
        zone.tz = _named(name)
        return zone

    @classmethod
    def _unpickle(cls, name: str, *_):
        return cls(name)


class _PendulumTimezoneInfo(_Zone):
    """pendulum 1 ``TimezoneInfo(tz, utc_offset, is_dst, dst, abbrev)``: one offset of a zone, kept as the zone
    when it has a name, else as that offset."""

    def __new__(cls, tz=None, utc_offset=0, *_):
        zone = super().__new__(cls)
        named = isinstance(tz, _PendulumTimezone) and isinstance(tz.tz, zoneinfo.ZoneInfo)
        zone.tz = tz.tz if named or isinstance(tz, _UTC) else _fixed(utc_offset if isinstance(utc_offset, int) else 0)
        return zone


class _FixedTimezone(_Zone):
    """pendulum ``FixedTimezone(offset, name)`` and dateutil ``tzoffset(name, offset)``."""

    def __new__(cls, *args):
        zone = super().__new__(cls)
        ints = [a for a in args if isinstance(a, (int, dt.timedelta)) and not isinstance(a, bool)]
        names = [a for a in args if isinstance(a, str)]
        if ints:
            zone.tz = _fixed(ints[0], names[0] if names else None)
        return zone


class _UTC(_Zone):
    """dateutil ``tzutc()`` and pytz ``_UTC()``."""


class _TzFile(_Zone):
    """dateutil ``tzfile(None, '/usr/share/zoneinfo/Europe/Amsterdam')`` (the name is the key)."""

    def __new__(cls, fileobj=None, filename: str | None = None, *_):
        zone = super().__new__(cls)
        path = filename or fileobj
        key = path.split("zoneinfo/", 1)[-1] if isinstance(path, str) else None
        if not key or key.startswith("/"):
            raise PickleRefused(f"dateutil tzfile {path!r} names no IANA zone")
        zone.tz = _named(key)
        return zone


def _dateutil_tzfile_unpickle(cls, name: str | None = None, filename: str | None = None, *_):
    return _TzFile(None, name or filename)


def _pytz_p(zone: str, utcoffset: int | None = None, dstoffset: int | None = None, tzname: str | None = None):
    """pytz pickles a localized tzinfo as (zone, utcoffset, dst, name): keep the exact offset."""
    if utcoffset is None:
        return _zone(_named(zone))
    return _zone(_fixed(utcoffset, tzname))


class _Ignored:
    """Private helper objects inside a timezone's pickled state (pendulum transitions, dateutil
    ``_ttinfo``): accepted while loading, refused by ``_plain`` if they surface as data."""

    def __setstate__(self, state: Any) -> None:
        pass


def _datetime(*args):
    """pendulum ``DateTime(y, m, d, H, M, S, us, tz)`` -> stdlib datetime (same for Date, Time)."""
    return dt.datetime(*args)


def _pendulum1(year, month, day, hour=0, minute=0, second=0, microsecond=0, tzinfo=None, fold=0):
    """pendulum 1 ``Pendulum(y, m, d, H, M, S, us, tz, fold)``: the same fold rule as stdlib's (1: the later of
    an ambiguous local time)."""
    return dt.datetime(year, month, day, hour, minute, second, microsecond, tzinfo, fold=1 if fold == 1 else 0)


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol 2 spells bytes as ``_codecs.encode(str, 'latin1')``; no other codec is run."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise PickleRefused(f"_codecs.encode with {encoding!r} is not plain data")
    return text.encode("latin1")


def _getattr(obj, name: str):
    """pendulum 3 pickles ``getattr(Timezone, '_unpickle')``: only that attribute is reachable."""
    if obj is _PendulumTimezone and name == "_unpickle":
        return _PendulumTimezone._unpickle
    raise PickleRefused(f"getattr({obj!r}, {name!r}) is not plain data")


def _reconstructor(cls, base, state):
    """Protocol 0/1 spelling of ``cls.__new__(cls)``, allowed for the timezone stand-ins only."""
    if isinstance(cls, type) and issubclass(cls, (_Zone, _Ignored)):
        return cls.__new__(cls)
    raise PickleRefused(f"copyreg._reconstructor for {cls!r} is not plain data")


def _sized(cls: type) -> Callable:
    """``bytes(n)`` / ``bytearray(n)`` would allocate n zero bytes: only copies of given content are built."""

    def build(*args):
        if args and isinstance(args[0], int):
            raise PickleRefused(f"{cls.__name__}(<size>) is not plain data")
        return cls(*args)

    return build


_BUILTINS = {name: getattr(builtins, name) for name in ("dict", "list", "tuple", "set", "frozenset", "str", "int",
                                                         "float", "complex", "bool")}
_BUILTINS.update(bytes=_sized(bytes), bytearray=_sized(bytearray))

#: (module, name) -> what the pickle gets instead. Nothing here runs code of the named library.
ALLOWED: dict[tuple[str, str], Callable] = {
    **{("builtins", n): f for n, f in _BUILTINS.items()},
    **{("__builtin__", n): f for n, f in _BUILTINS.items()},  # Python 2 pickles (Airflow 1.10)
    ("builtins", "getattr"): _getattr,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,  # _reconstructor's base argument in protocols 0 and 1; as data, refused
    ("__builtin__", "object"): object,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("collections", "OrderedDict"): dict,
    ("datetime", "datetime"): dt.datetime,
    ("datetime", "date"): dt.date,
    ("datetime", "time"): dt.time,
    ("datetime", "timedelta"): dt.timedelta,
    ("datetime", "timezone"): dt.timezone,
    ("datetime", "tzinfo"): dt.tzinfo,
    ("decimal", "Decimal"): decimal.Decimal,
    ("pendulum.datetime", "DateTime"): _datetime,
    ("pendulum.pendulum", "Pendulum"): _pendulum1,  # Airflow 1.10's; no later pendulum has the module
    ("pendulum.interval", "Interval"): dt.timedelta,  # pendulum 1's duration; pendulum 3's Interval is a period
    ("pendulum.date", "Date"): dt.date,
    ("pendulum.time", "Time"): dt.time,
    ("pendulum.duration", "Duration"): dt.timedelta,
    ("pendulum.tz.timezone", "Timezone"): _PendulumTimezone,
    ("pendulum.tz.timezone", "FixedTimezone"): _FixedTimezone,
    ("pendulum.tz.timezone", "_UTC"): _UTC,
    ("pendulum.tz.timezone_info", "_UTC"): _UTC,
    ("pendulum.tz.timezone_info", "TimezoneInfo"): _PendulumTimezoneInfo,
    ("pendulum.tz.transition", "Transition"): _Ignored,
    ("pendulum.tz.zoneinfo.transition", "Transition"): _Ignored,
    ("pendulum.tz.zoneinfo.transition_type", "TransitionType"): _Ignored,
    ("dateutil.tz.tz", "tzutc"): _UTC,
    ("dateutil.tz.tz", "tzoffset"): _FixedTimezone,
    ("dateutil.tz.tz", "tzfile"): _TzFile,
    ("dateutil.tz.tz", "_ttinfo"): _Ignored,
    ("dateutil.tz._tzfile", "_unpickle"): _dateutil_tzfile_unpickle,
    ("dateutil.tz._tzfile", "tzfile"): _TzFile,
    ("pytz", "_UTC"): _UTC,
    ("pytz", "_p"): _pytz_p,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise PickleRefused(f"pickle refers to {module}.{name}, which is not plain data") from None

    def persistent_load(self, pid):
        raise PickleRefused("pickle uses a persistent id, which is not plain data")


_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None), decimal.Decimal, dt.date,
            dt.time, dt.timedelta, dt.timezone, zoneinfo.ZoneInfo)


def _plain(obj: Any) -> Any:
    """Swap the timezone stand-ins for stdlib ones, and refuse any helper object left as data."""
    if isinstance(obj, _Zone):
        return obj.tz
    if isinstance(obj, (dt.datetime, dt.time)) and isinstance(obj.tzinfo, _Zone):
        return obj.replace(tzinfo=obj.tzinfo.tz)
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(_plain(v) for v in obj)
    raise PickleRefused(f"pickle holds a {type(obj).__name__}, which is not plain data")

