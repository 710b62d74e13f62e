"""The chain of mapping steps: built in memory like Alembic's RevisionMap tests, and the installed one."""
from __future__ import annotations

import random
import re
import types

import pytest

from etl import catalog
from etl.chain import Chain, ChainError, Step, default
from etl.errors import EtlError


def steps(*links: tuple[str, str | None]) -> list[Step]:
    return [Step(version=v, down_version=d) for v, d in links]


def chain(*links, has_schema=lambda v: True) -> Chain:
    return Chain(steps(*links), has_schema=has_schema)


LINE = (("1.0.0", None), ("1.2.0", "1.0.0"), ("2.0.0", "1.2.0"), ("2.5.0", "2.0.0"))


def test_order_comes_from_the_links_alone():
    links = list(LINE)
    random.Random(4).shuffle(links)
    c = chain(*links)
    assert [s.version for s in c.steps] == ["1.0.0", "1.2.0", "2.0.0", "2.5.0"]
    assert (c.base, c.head) == ("1.0.0", "2.5.0")


def test_path_takes_the_steps_after_the_source_up_to_the_target():
    c = chain(*LINE)
    assert [s.version for s in c.path("1.0.0", "2.5.0")] == ["1.2.0", "2.0.0", "2.5.0"]
    assert [s.version for s in c.path("1.2.0", "2.0.0")] == ["2.0.0"]
    # versions between steps (schema-only releases) map with the steps around them
    assert [s.version for s in c.path("1.1.0", "2.3.0")] == ["1.2.0", "2.0.0"]
    assert [s.version for s in c.path("2.5.0", "3.1.0")] == []


def test_same_version_is_an_empty_path():
    assert chain(*LINE).path("2.0.0", "2.0.0") == []


def test_target_older_than_source_is_one_clear_line():
    with pytest.raises(EtlError) as err:
        chain(*LINE).path("2.5.0", "1.2.0")
    assert "older than the source" in str(err.value) and "\n" not in str(err.value)


def test_source_older_than_the_base():
    with pytest.raises(EtlError, match="older than 1.0.0"):
        chain(*LINE).path("0.9.0", "2.0.0")


@pytest.mark.parametrize("links,message", [
    ((("1.0.0", None), ("1.2.0", "1.0.0"), ("1.3.0", "1.0.0")), "1.2.0 and 1.3.0 both follow 1.0.0: the chain forks"),
    ((("1.0.0", None), ("1.2.0", "1.1.0")), "1.2.0 follows 1.1.0, which no step provides"),
    ((("1.0.0", None), ("1.2.0", "1.3.0"), ("1.3.0", "1.2.0")), "1.2.0, 1.3.0 form a cycle"),
    ((("1.0.0", None), ("1.2.0", None)), "exactly one base step"),
    ((("1.2.0", "1.0.0"), ("1.0.0", "1.2.0")), "exactly one base step (down_version None); found none"),
    ((("1.0.0", None), ("0.9.0", "1.0.0")), "0.9.0 follows the newer 1.0.0"),
])
def test_bad_chains_are_refused_by_name(links, message):
    with pytest.raises(ChainError, match=re.escape(message)):
        chain(*links)


def test_two_steps_claiming_one_version():
    twins = [Step("1.0.0", None, source="a.py"), Step("1.0.0", None, source="b.py")]
    with pytest.raises(ChainError, match="a.py and b.py both claim version 1.0.0"):
        Chain(twins, has_schema=lambda v: True)


def test_a_step_without_a_schema_is_refused():
    with pytest.raises(ChainError, match=r"1.2.0 has no schema: schemas/airflow-1.2.0.json is missing"):
        chain(*LINE, has_schema=lambda v: v != "1.2.0")


def test_identity_is_read_from_the_module():
    module = types.ModuleType("etl.mappings.whatever_name")
    module.__doc__ = "1.2: runs get a colour.\n\nLonger text."
    module.version, module.down_version, module.airflow_revisions = "1.2.0", "1.0.0", ("abc123def456",)
    module.TABLES = {"dag_run": lambda batch, ctx: batch}
    step = Step.from_module(module)
    assert (step.version, step.down_version, step.airflow_revisions, step.doc) == \
        ("1.2.0", "1.0.0", ("abc123def456",), "1.2: runs get a colour.")
    del module.version
    with pytest.raises(ChainError, match="has no version"):
        Step.from_module(module)


# -- the installed chain ---------------------------------------------------------------------------

def test_the_installed_chain_links_every_data_step_from_1_10_12():
    c = default()
    assert c.base == "1.10.12" and c.steps[0].down_version is None
    versions = [s.version for s in c.steps]
    assert versions == sorted(versions, key=catalog.version_key)
    assert {"1.10.15", "2.0.0", "2.0.2", "2.2.2", "2.3.0", "2.4.1", "2.7.3", "3.0.2", "3.2.2"} <= set(versions)
    assert set(versions) <= set(catalog.versions())


def test_every_rule_names_revisions_its_step_declares():
    for step in default().steps:
        assert step.doc, step.source
        for rev in step.airflow_revisions:
            assert re.fullmatch(r"[0-9a-f]{12}", rev), (step.version, rev)
        for table, fn in step.tables.items():
            revisions = getattr(fn, "airflow_revisions", ())
            assert revisions, f"{step.version} {table} names no Airflow revision"
            assert set(revisions) <= set(step.airflow_revisions), (step.version, table)
            assert fn.__doc__, (step.version, table)


def test_every_revision_sits_in_the_step_of_the_first_snapshot_that_has_it():
    """A rule in a later step than its migration's first snapshot would run a second time on data from that
    snapshot's releases (2.2.0's rules in a 2.2.5 step, given 2.2.2 data, as before 2.2.2 had a snapshot)."""
    known = catalog_revisions()
    for step in default().steps:
        for rev in step.airflow_revisions:
            assert rev in known, (step.version, rev)
            first = next(v for v in catalog.versions() if catalog.version_key(v) >= catalog.version_key(known[rev]))
            assert step.version == first, (step.version, rev, known[rev], first)


def catalog_revisions() -> dict[str, str]:
    import json
    from importlib import resources

    return json.loads(resources.files("etl.schemas").joinpath("revisions.json").read_text())
