"""The restricted unpickler: plain data and Airflow's timezone values load; nothing else runs."""
from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import pickle
import subprocess
import sys
import types
import zoneinfo
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from etl import sample, unpickle, urls
from helpers import report, rows

#: Pickles made by the libraries in the Airflow 1.10.12, 2.2.5 and 3.3.2 virtualenvs, with what they must become.
REAL = [
    (  # pendulum 2.1.2 DateTime(FixedTimezone(3600)), protocol 2
        '80026370656e64756c756d2e6461746574696d650a4461746554696d650a7100284de5074b034b044b004b004b004b006370'
        '656e64756c756d2e747a2e74696d657a6f6e650a466978656454696d657a6f6e650a71014d100e58060000002b30313a3030'
        '71028671035271047d71052858050000005f6e616d657106680258070000005f6f666673657471074d100e580a0000005f75'
        '74636f66667365747108636461746574696d650a74696d6564656c74610a71094b004d100e4b0087710a52710b756274710c'
        '52710d2e',
        dt.datetime(2021, 3, 4, tzinfo=dt.timezone(dt.timedelta(hours=1), '+01:00'))),
    (  # pendulum 2.1.2 Date, protocol 2 (bytes spelled _codecs.encode)
        '80026370656e64756c756d2e646174650a446174650a7100635f636f646563730a656e636f64650a7101580500000007c3a5'
        '0304710258060000006c6174696e3171038671045271058571065271072e',
        dt.date(2021, 3, 4)),
    (  # dateutil 2.8.2 tzutc, protocol 0 (copy_reg._reconstructor)
        '636461746574696d650a6461746574696d650a70300a28635f636f646563730a656e636f64650a70310a285607e501015c75'
        '303030305c75303030305c75303030305c75303030305c75303030305c75303030300a70320a566c6174696e310a70330a74'
        '70340a5270350a63636f70795f7265670a5f7265636f6e7374727563746f720a70360a2863646174657574696c2e747a2e74'
        '7a0a747a7574630a70370a636461746574696d650a747a696e666f0a70380a67380a28745270390a747031300a527031310a'
        '747031320a527031330a2e',
        dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc)),
    (  # dateutil 2.8.2 tzoffset, protocol 2 (NEWOBJ + BUILD)
        '8002636461746574696d650a6461746574696d650a7100635f636f646563730a656e636f64650a7101580b00000007c3a501'
        '01000000000000710258060000006c6174696e31710386710452710563646174657574696c2e747a2e747a0a747a6f666673'
        '65740a7106298171077d71082858050000005f6e616d657109580100000058710a58070000005f6f6666736574710b636461'
        '746574696d650a74696d6564656c74610a710c4b004d100e4b0087710d52710e756286710f5271102e',
        dt.datetime(2021, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1), 'X'))),
    (  # dateutil 2.9 tzoffset, protocol 2 (REDUCE)
        '8002636461746574696d650a6461746574696d650a7100635f636f646563730a656e636f64650a7101580b00000007c3a501'
        '01000000000000710258060000006c6174696e31710386710452710563646174657574696c2e747a2e747a0a747a6f666673'
        '65740a71065801000000587107636461746574696d650a74696d6564656c74610a71084b004d100e4b0087710952710a8671'
        '0b52710c86710d52710e2e',
        dt.datetime(2021, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1), 'X'))),
    (  # pytz 2025.1 Europe/Amsterdam localized in July, protocol 4
        '8004955d000000000000008c086461746574696d65948c086461746574696d65949394430a07e50701000000000000948c04'
        '7079747a948c025f70949394288c104575726f70652f416d7374657264616d944d201c4d100e8c0443455354947494529486'
        '9452942e',
        dt.datetime(2021, 7, 1, tzinfo=dt.timezone(dt.timedelta(hours=2), 'CEST'))),
    (  # collections.OrderedDict, protocol 2
        '800263636f6c6c656374696f6e730a4f726465726564446963740a71002952710158010000006171024b01732e',
        {'a': 1}),
    (  # pendulum 3.3.0 {'d': DateTime in Europe/Amsterdam}, protocol 4 (getattr(Timezone, '_unpickle'))
        '800495a1000000000000007d948c0164948c1170656e64756c756d2e6461746574696d65948c084461746554696d65949394'
        '284de5074b034b044b054b064b074b008c086275696c74696e73948c07676574617474729493948c1470656e64756c756d2e'
        '747a2e74696d657a6f6e65948c0854696d657a6f6e659493948c095f756e7069636b6c6594869452948c104575726f70652f'
        '416d7374657264616d944b018694529474945294732e',
        {'d': dt.datetime(2021, 3, 4, 5, 6, 7, tzinfo=zoneinfo.ZoneInfo('Europe/Amsterdam'))}),
    (  # pendulum 3.3.0 Duration, protocol 4
        '8004952d000000000000008c1170656e64756c756d2e6475726174696f6e948c084475726174696f6e9493944b014d201c4b'
        '00879452942e',
        dt.timedelta(days=1, hours=2)),
    (  # pendulum 3.3.0 Time, protocol 4
        '80049528000000000000008c0d70656e64756c756d2e74696d65948c0454696d65949394284b014b024b034b004e74945294'
        '2e',
        dt.time(1, 2, 3)),
    (  # pendulum 1.4.4 Pendulum in UTC (Airflow 1.10 execution_date), protocol 2
        '80027d710058040000007768656e71016370656e64756c756d2e70656e64756c756d0a50656e64756c756d0a7102284de407'
        '4b084b064b014b024b034b006370656e64756c756d2e747a2e74696d657a6f6e655f696e666f0a54696d657a6f6e65496e66'
        '6f0a7103286370656e64756c756d2e747a2e74696d657a6f6e650a5f5554430a7104295271057d71062858050000005f6e61'
        '6d65710758030000005554437108580c0000005f7472616e736974696f6e7371095d710a58120000005f54696d657a6f6e65'
        '5f5f747a696e666f73710b5d710c58080000005f747a696e666f73710d68032868054b00894e680874710e52710f7d711028'
        '58030000005f747a71116805580b0000005f7574635f6f666673657471124b0058100000005f61646a75737465645f6f6666'
        '7365747113636461746574696d650a74696d6564656c74610a71144b004b004b0087711552711658070000005f69735f6473'
        '7471178958040000005f64737471184e58070000005f61626272657671196808756285711a58150000005f64656661756c74'
        '5f747a696e666f5f696e646578711b4b0058150000005f7574635f7472616e736974696f6e5f74696d6573711c6364617465'
        '74696d650a6461746574696d650a711d635f636f646563730a656e636f64650a711e580b00000007c2b20101000000000000'
        '711f58060000006c6174696e317120867121527122857123527124857125580b0000005f6c6f63616c5f68696e7471267d71'
        '2758070000005f747a696e666f7128680f58070000005f6f666673657471294b0075624b00894e680874712a5230680f4b01'
        '74712b52712c732e',
        {'when': dt.datetime(2020, 8, 6, 1, 2, 3, tzinfo=dt.timezone.utc)}),
    (  # pendulum 1.4.4 Pendulum in FixedTimezone(7200), protocol 4
        '800495f1010000000000008c1170656e64756c756d2e70656e64756c756d948c0850656e64756c756d949394284de4074b08'
        '4b054b014b024b034dc8018c1970656e64756c756d2e747a2e74696d657a6f6e655f696e666f948c0c54696d657a6f6e6549'
        '6e666f949394288c1470656e64756c756d2e747a2e74696d657a6f6e65948c0d466978656454696d657a6f6e659493944d20'
        '1c859452947d94288c055f6e616d65948c062b30323a3030948c0c5f7472616e736974696f6e73945d948c125f54696d657a'
        '6f6e655f5f747a696e666f73945d948c085f747a696e666f7394680528680a4d201c894e8c0094749452947d94288c035f74'
        '7a94680a8c0b5f7574635f6f6666736574944d201c8c105f61646a75737465645f6f6666736574948c086461746574696d65'
        '948c0974696d6564656c74619493944b004d201c4b00879452948c075f69735f64737494898c045f647374944e8c075f6162'
        '62726576946813756285948c155f64656661756c745f747a696e666f5f696e646578944b008c155f7574635f7472616e7369'
        '74696f6e5f74696d657394681a8c086461746574696d65949394430a07b20101000000000000948594529485948c0b5f6c6f'
        '63616c5f68696e74947d948c075f747a696e666f9468158c075f6f6666736574944d201c75624d201c894e68137494523068'
        '154b01749452942e',
        dt.datetime(2020, 8, 5, 1, 2, 3, 456, tzinfo=dt.timezone(dt.timedelta(hours=2), '+02:00'))),
    (  # pendulum 1.4.4 Interval, protocol 2
        '80026370656e64756c756d2e696e74657276616c0a496e74657276616c0a71004b014b054b008771015271022e',
        dt.timedelta(days=1, seconds=5)),
]


@pytest.mark.parametrize("hexdata,expected", REAL)
def test_pickles_made_by_airflow_libraries_become_stdlib_values(hexdata, expected):
    value = unpickle.loads(bytes.fromhex(hexdata))
    assert value == expected and type(value) is type(expected)
    inner = value["d"] if isinstance(value, dict) and "d" in value else value
    if isinstance(inner, (dt.datetime, dt.time)) and inner.tzinfo is not None:
        assert type(inner.tzinfo) in (dt.timezone, zoneinfo.ZoneInfo)
        assert inner.utcoffset() == expected_offset(expected)


def expected_offset(expected):
    inner = expected["d"] if isinstance(expected, dict) and "d" in expected else expected
    return inner.utcoffset()


PLAIN = {"s": "x", "b": b"\x00\xff", "ba": bytearray(b"ab"), "i": 2 ** 70, "f": 1.5, "nan": float("nan"), "c": 1 + 2j,
         "t": (1, None, True), "set": {1, 2}, "fs": frozenset({"a"}), "l": [[], {}], "d": decimal.Decimal("1.10"),
         "when": dt.datetime(2021, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=-5))), "day": dt.date(2020, 2, 29),
         "clock": dt.time(23, 59), "span": dt.timedelta(seconds=-1), "utc": dt.timezone.utc}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_round_trips_in_every_protocol(protocol):
    value = unpickle.loads(pickle.dumps(PLAIN, protocol=protocol))
    assert set(value) == set(PLAIN)
    for key, expected in PLAIN.items():
        if key == "nan":
            assert value[key] != value[key]
        else:
            assert value[key] == expected and type(value[key]) is type(expected), key


class _Fake:
    """Classes pickled under a third-party module's name, without that library installed."""

    def __init__(self, module: str, name: str, **attrs):
        self.module, self.name, self.attrs = module, name, attrs

    def __enter__(self):
        cls = type(self.name, (), self.attrs)
        cls.__module__, cls.__qualname__ = self.module, self.name
        parts = self.module.split(".")
        self.added = [n for n in (".".join(parts[:i + 1]) for i in range(len(parts))) if n not in sys.modules]
        for name in self.added:
            sys.modules[name] = types.ModuleType(name)
        setattr(sys.modules[self.module], self.name, cls)
        return cls

    def __exit__(self, *exc):
        for name in self.added:
            del sys.modules[name]


def test_pendulum_2_named_timezone_with_its_transition_tables():
    """pendulum 2 pickles Timezone(name) and then its whole transition table as BUILD state."""
    with _Fake("pendulum.tz.zoneinfo.transition", "Transition") as transition, \
            _Fake("pendulum.tz.timezone", "Timezone", __reduce__=lambda self: (type(self), ("Europe/Amsterdam",), self.__dict__),
                  __init__=lambda self, *a: None) as timezone:
        step = transition()
        step._at, step._offset = -1693706, 1172
        zone = timezone()
        zone._name, zone._transitions = "Europe/Amsterdam", [step]
        data = pickle.dumps({"zone": zone, "when": dt.datetime(2021, 7, 1, 12)}, protocol=2)
    value = unpickle.loads(data)
    assert value["zone"] == zoneinfo.ZoneInfo("Europe/Amsterdam")


def test_a_helper_object_left_as_data_is_refused():
    with _Fake("pendulum.tz.zoneinfo.transition", "Transition") as transition:
        data = pickle.dumps([transition()], protocol=2)
    with pytest.raises(unpickle.PickleRefused, match="not plain data"):
        unpickle.loads(data)


class _System:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _Open:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("evil", [_System, _Open])
def test_code_in_a_pickle_never_runs(tmp_path, evil):
    target = tmp_path / "pwned"
    for protocol in (0, 2, 5):
        with pytest.raises(unpickle.PickleRefused, match="not plain data"):
            unpickle.loads(pickle.dumps({"conf": evil(str(target))}, protocol=protocol))
    assert not target.exists()


def test_reachable_callables_are_fenced():
    getattr_os = b"\x80\x04cbuiltins\ngetattr\ncos\nenviron\n\x8c\x03get\x86R."
    with pytest.raises(unpickle.PickleRefused, match="os.environ"):
        unpickle.loads(getattr_os)
    codec = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(unpickle.PickleRefused, match="zlib"):
        unpickle.loads(codec)
    reconstruct = b"ccopy_reg\n_reconstructor\n(c__builtin__\ndict\ncdatetime\ntzinfo\nNtR."
    with pytest.raises(unpickle.PickleRefused, match="_reconstructor"):
        unpickle.loads(reconstruct)
    huge = b"\x80\x02c__builtin__\nbytearray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85R."  # bytearray(2**40)
    with pytest.raises(unpickle.PickleRefused, match="size"):
        unpickle.loads(huge)
    with pytest.raises(unpickle.PickleRefused, match="persistent id"):
        unpickle.loads(b"\x80\x02X\x01\x00\x00\x00aQ.")


def test_unreadable_bytes_are_a_different_error():
    for data in (b"", b"\x80\x05}", b"not a pickle", pickle.dumps([1, 2])[:-3]):
        with pytest.raises(unpickle.PickleUnreadable):
            unpickle.loads(data)


def test_a_migrated_conf_pickle_that_would_create_a_file_creates_none_and_is_quarantined(tmp_path):
    """End to end: a 2.x dag run whose conf would run ``touch`` when loaded, migrated to 3.x by the CLI."""
    created = tmp_path / "created-by-the-pickle"
    source, target = f"sqlite:///{tmp_path / 'source.db'}", f"sqlite:///{tmp_path / 'target.db'}"
    engine = urls.open_engine(source, create=True)
    sample.sample(engine, "2.10.5", dag_runs=3, seed=1)
    with engine.begin() as conn:
        run_id = conn.execute(sa.text("SELECT run_id FROM dag_run ORDER BY id LIMIT 1")).scalar_one()
        conn.execute(sa.text("UPDATE dag_run SET conf = :c WHERE run_id = :r"),
                     {"c": pickle.dumps({"p": _System(str(created))}), "r": run_id})
    engine.dispose()
    migrated = report("migrate", "--source", source, "--target", target, "--target-version", "3.3.2",
                      "--via", str(tmp_path / "via"))
    assert not created.exists()
    assert dict(rows(target, "dag_run", ["run_id", "conf"]))[run_id] is None  # the run is kept, its conf is not
    [kept] = [pq.read_table(f).to_pylist() for f in Path(migrated["quarantine"], "dag_run.conf").glob("*.parquet")]
    assert [(r["run_id"], "posix.system" in r["reason"]) for r in kept] == [(run_id, True)]
    assert migrated["tables"]["dag_run.conf"]["quarantined"] == 1


_PENDULUM_1 = """
import json, pickle, sys
import pendulum
from pendulum.tz.timezone import FixedTimezone
values = {"amsterdam": pendulum.create(2020, 10, 25, 2, 30, tz="Europe/Amsterdam"),
          "new_york": pendulum.create(2020, 8, 6, 12, tz="UTC").in_tz("America/New_York"),
          "utc": pendulum.utcnow(), "fixed": pendulum.create(2020, 1, 2, tz=FixedTimezone(-3600)),
          "date": pendulum.Date(2020, 8, 5), "interval": pendulum.Interval(days=2, seconds=7)}
out = {}
for name, value in values.items():
    for protocol in (0, 2, 4):
        text = value.isoformat() if hasattr(value, "isoformat") else value.total_seconds()
        zone = getattr(getattr(value, "tzinfo", None), "name", None) if name in ("amsterdam", "new_york") else None
        out[f"{name}-{protocol}"] = [pickle.dumps({"v": value}, protocol=protocol).hex(), text, zone]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_pendulum_1_values_as_airflow_1_10_12_pickles_them_load_as_the_same_instants():
    """Made by the pendulum 1.4 that 1.10.12 installs: no later pendulum can read these at all."""
    from etl import airflow_release

    venv = airflow_release.ensure_venv("1.10.12")
    made = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", _PENDULUM_1], capture_output=True, text=True,
                                     check=True).stdout)
    for name, (hexdata, text, zone) in made.items():
        value = unpickle.loads(bytes.fromhex(hexdata))["v"]
        if isinstance(value, dt.timedelta):
            assert value.total_seconds() == text, name
        else:
            assert value.isoformat() == text, name
            if zone:
                assert value.tzinfo == zoneinfo.ZoneInfo(zone), name
