"""The validation cache: bounded, keyed by content, never changes a verdict."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirtwin import validation
from fhirtwin.conversion import convert_hl7v2
from fhirtwin.hl7v2 import split_batch
from fhirtwin.mapping import LINEAGE_EXTENSION

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "hl7v2"


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    """The cache serves the models' path (fastcheck off, as FHIRTWIN_VALIDATOR=models, and
    the resources fastcheck is not sure of): these tests take that path."""
    fast = validation.set_fast(False)
    validation.set_cache_size(validation.DEFAULT_CACHE_SIZE)
    validation.clear_cache()
    yield
    validation.set_fast(fast)
    validation.set_cache_size(validation.DEFAULT_CACHE_SIZE)
    validation.clear_cache()


def _org(name: str, **extra: object) -> dict:
    return {
        "resourceType": "Organization",
        "id": "9b8f2c1e-0000-5000-8000-000000000001",
        "meta": {"source": "urn:hl7v2:APP@FAC:MSG1"},
        "extension": [{"url": LINEAGE_EXTENSION, "valueString": "PV1[3]"}],
        "name": name,
        **extra,
    }


def _uncached(res: dict) -> list[dict[str, str]]:
    size = validation.cache_info()["maxsize"]
    validation.set_cache_size(0)
    try:
        return validation.validate_resource(res, "r")
    finally:
        validation.set_cache_size(size)


def test_cache_is_bounded() -> None:
    validation.set_cache_size(3)
    for i in range(10):
        assert validation.validate_resource(_org(f"org {i}")) == []
    info = validation.cache_info()
    assert info["size"] == 3 and info["maxsize"] == 3 and info["misses"] == 10


def test_least_recently_used_goes_first() -> None:
    validation.set_cache_size(2)
    a, b, c = _org("a"), _org("b"), _org("c")
    validation.validate_resource(a)
    validation.validate_resource(b)
    validation.validate_resource(a)  # a is now the most recent
    validation.validate_resource(c)  # evicts b
    validation.validate_resource(a)
    assert validation.cache_info()["hits"] == 2
    validation.validate_resource(b)
    assert validation.cache_info()["misses"] == 4


def test_repeat_hits_and_changed_resource_is_revalidated() -> None:
    good = _org("Acme")
    assert validation.validate_resource(good, "r") == []
    assert validation.validate_resource(copy.deepcopy(good), "r") == []
    assert validation.cache_info()["hits"] == 1
    bad = _org("Acme", bogus=1)
    got = validation.validate_resource(bad, "r")
    assert got and got == _uncached(bad)
    assert any(p["path"] == "r.bogus" for p in got)
    assert validation.cache_info()["misses"] == 2


def test_new_message_same_resource_hits() -> None:
    """meta.source and the lineage tags change with every message: still a hit."""
    validation.validate_resource(_org("Acme"))
    again = _org("Acme")
    again["meta"]["source"] = "urn:hl7v2:APP@FAC:MSG2"
    again["extension"][0]["valueString"] = "PV1[4],PV1[9]"
    assert validation.validate_resource(again) == []
    assert validation.cache_info()["hits"] == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r["meta"].__setitem__("source", 5),
        lambda r: r["meta"].__setitem__("source", None),
        lambda r: r["meta"].__setitem__("source", ["x"]),
        lambda r: r["extension"][0].__setitem__("valueString", ""),
        lambda r: r["extension"][0].__setitem__("valueString", "\x0b"),
        lambda r: r["extension"][0].__setitem__("valueString", 3),
        lambda r: r["extension"][0].__setitem__("other", 3),
        lambda r: r.__setitem__("id", "not an id!"),
        lambda r: r.__setitem__("name", ""),
        lambda r: r.__setitem__("id", uuid.UUID(int=1)),
        lambda r: r.__setitem__("active", float("nan")),
    ],
)
def test_verdict_is_the_models_verdict(change) -> None:
    validation.validate_resource(_org("Acme"), "r")  # a cached sibling
    res = _org("Acme")
    change(res)
    expected = _uncached(res)
    assert validation.validate_resource(res, "r") == expected
    assert validation.validate_resource(res, "r") == expected  # and again, cached or not


def test_non_json_values_are_not_cached() -> None:
    res = _org("Acme")
    res["id"] = uuid.UUID(int=1)  # orjson would write it as the plain string
    validation.validate_resource(res)
    assert validation.cache_info()["size"] == 0


def test_converted_bundles_validate_the_same_with_and_without_cache() -> None:
    bundles = [
        convert_hl7v2(m).bundle
        for p in sorted(EXAMPLES.glob("*.hl7"))
        for m in split_batch(p.read_bytes())
    ]
    assert bundles
    validation.set_cache_size(0)
    expected = [validation.validate_bundle(copy.deepcopy(b)) for b in bundles]
    validation.set_cache_size(validation.DEFAULT_CACHE_SIZE)
    for _ in range(2):  # cold, then warm
        assert [validation.validate_bundle(b) for b in bundles] == expected
        assert [validation.validate_converted(b) for b in bundles] == expected
    assert validation.cache_info()["hits"] > 0
