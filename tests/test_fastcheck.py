"""fastcheck never says "the models accept it" when the R4B models do not.

Checked against the models themselves on every resource the converters make from the
shipped examples (always) and from the corpus (HL7 v2, C-CDA, the FHIR R4 examples of 57
types, the SMART bulk NDJSON), and on seeded random mutations of them: keys dropped,
unknown or Python-named keys added, values of the wrong type or form, lists where one
value belongs and back, two values of one choice, wrong nested resource types, required
primitives replaced by their ``_name`` extension.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhirtwin import ccda, fastcheck, validation
from fhirtwin.conversion import convert_hl7v2
from fhirtwin.hl7v2 import split_batch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "hl7v2"


def _models_accept(res: dict[str, Any]) -> bool:
    try:
        return validation._check_models(res) == ()
    except Exception:  # a crash of the models is not an acceptance
        return False


def _hl7v2_resources(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        for msg in split_batch(path.read_bytes()) or [path.read_bytes()]:
            try:
                conv = convert_hl7v2(msg, validate=False)
            except Exception:  # the corpus has messages that are meant to fail
                continue
            out += [e["resource"] for e in conv.bundle.get("entry", ())]
    return out


def _corpus_resources(corpus: Path) -> list[dict[str, Any]]:
    hl7 = sorted(corpus.rglob("*.hl7"))
    hl7 += sorted((corpus / "hl7-v2-to-fhir" / "samples" / "messages").glob("*.txt"))
    out = _hl7v2_resources(hl7)
    for path in sorted((corpus / "microsoft-fhir-converter/data/SampleData/Ccda").glob("*.ccda")):
        out += [e["resource"] for e in ccda.convert(path.read_bytes())["entry"]]
    for path in sorted((corpus / "fhir-r4-examples" / "package").glob("*.json")):
        data = json.loads(path.read_bytes())
        if isinstance(data, dict) and "resourceType" in data:
            out.append(data)
    for path in sorted((corpus / "smart-sample-bulk-fhir-10-patients").glob("*.ndjson")):
        lines = [line for line in path.read_bytes().splitlines() if line.strip()]
        out += [json.loads(line) for line in lines[:150]]
    return out


def _differences(pool: list[dict[str, Any]]) -> tuple[list[str], int, int]:
    """(false accepts, resources the models accept, of those how many fastcheck accepts)"""
    wrong, valid, fast = [], 0, 0
    for res in pool:
        says = fastcheck.accepts(res)
        truth = _models_accept(res)
        valid += truth
        fast += says and truth
        if says and not truth:
            wrong.append(json.dumps(res)[:300])
    return wrong, valid, fast


def test_examples_agree_with_the_models() -> None:
    pool = _hl7v2_resources(sorted(EXAMPLES.glob("*.hl7")))
    assert len(pool) > 50
    wrong, valid, fast = _differences(pool)
    assert wrong == []
    assert valid == len(pool) and fast == valid  # the converter's output: all on the fast path


def test_corpus_agrees_with_the_models(corpus: Path) -> None:
    pool = _corpus_resources(corpus)
    assert len(pool) > 6000
    wrong, valid, fast = _differences(pool)
    assert wrong == []
    assert fast >= 0.99 * valid, f"fastcheck sure of only {fast} of {valid} valid resources"


# -- mutations ----------------------------------------------------------------------------

_ODD_VALUES: list[Any] = [
    None, "", " ", "x y", "  padded ", 0, -1, 1.5, True, "true", "2020-02-30", "2020-13",
    "20200101", "2020-01-01T10:00:00", "abc", {}, [], {"foo": 1}, ["a"], [None], [{}],
    "http://example.org/x", "urn:uuid:not-a-uuid", 10**20, float("nan"),
]  # fmt: skip


def _nodes(obj: Any, table: Any) -> Iterator[tuple[dict[str, Any], Any]]:
    """Every object of a resource with the fastcheck table that models it (None: unknown)."""
    if not isinstance(obj, dict):
        return
    yield obj, table
    for key, value in obj.items():
        f = table.fields.get(key) if table is not None else None
        sub = None
        if f is not None and f.kind == fastcheck._MODEL:
            sub = f.table
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                if f is not None and f.kind == fastcheck._RESOURCE:
                    sub = fastcheck._resource_table(item.get("resourceType"))
                yield from _nodes(item, sub)


def _mutate(res: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = copy.deepcopy(res)
    nodes = list(_nodes(out, fastcheck._resource_table(out.get("resourceType"))))
    node, table = rng.choice(nodes)
    keys = [k for k in node if k != "resourceType"] or ["id"]
    key = rng.choice(keys)
    kind = rng.randrange(8)
    if kind == 0:
        node.pop(key, None)
    elif kind == 1:
        names = ["bogusKey", "resource_type", "fhir_comments", "class_fhir", "_id", f"{key}__ext"]
        if table is not None:
            names += [n for n, i in table_fields(table) if n != i]
        node[rng.choice(names)] = rng.choice(["x", 1, {"id": "a"}, ["x"]])
    elif kind == 2:
        node[key] = copy.deepcopy(rng.choice(_ODD_VALUES))
    elif kind == 3:
        value = node.get(key)
        node[key] = value[0] if isinstance(value, list) and value else [value]
    elif kind == 4 and table is not None and table.choices:
        aliases, _ = rng.choice(table.choices)
        for alias in rng.sample(aliases, min(2, len(aliases))):
            node[alias] = _sample_value(alias)
    elif kind == 5:
        node["resourceType"] = rng.choice(["Patient", "Nope", "HumanName", "Bundle", 7])
    elif kind == 6 and table is not None and table.required:
        alias, ext = rng.choice(table.required)
        node.pop(alias, None)
        node[ext or f"_{alias}"] = rng.choice(
            [{"id": "a"}, {"extension": [{"url": "http://e.org/x", "valueCode": "unknown"}]}]
        )
    else:
        value = node.get(key)
        if isinstance(value, list):
            value.append(rng.choice([None, {}, "x", value[0] if value else 1]))
        elif isinstance(value, str):
            node[key] = value + rng.choice([" ", "\n", "T", "-", "Z", "x" * 10_000])
        elif isinstance(value, dict):
            node[key] = {}
    return out


def table_fields(table: Any) -> list[tuple[str, str]]:
    return [(k, k) for k in table.fields] + [(k, "") for k in table.unsure]


def _sample_value(alias: str) -> Any:
    for suffix, value in (
        ("Boolean", True), ("String", "x"), ("DateTime", "2020-01-01"), ("Integer", 3),
        ("Period", {"start": "2020-01-01"}), ("Quantity", {"value": 1}),
        ("CodeableConcept", {"text": "x"}), ("Reference", {"reference": "Patient/p"}),
    ):  # fmt: skip
        if alias.endswith(suffix):
            return value
    return {"id": "x"}


def _mutation_check(pool: list[dict[str, Any]], per_resource: int, seed: int) -> int:
    rng = random.Random(seed)
    wrong: list[str] = []
    tried = 0
    for res in pool:
        for _ in range(per_resource):
            mutant = _mutate(res, rng)
            tried += 1
            if fastcheck.accepts(mutant) and not _models_accept(mutant):
                wrong.append(json.dumps(mutant, default=str)[:400])
    assert wrong == [], f"{len(wrong)} false accepts of {tried}, first: {wrong[0]}"
    return tried


def test_mutations_of_examples_are_never_falsely_accepted() -> None:
    pool = _hl7v2_resources(sorted(EXAMPLES.glob("*.hl7")))
    assert _mutation_check(pool, 20, seed=11) > 1000


def test_mutations_of_corpus_resources_are_never_falsely_accepted(corpus: Path) -> None:
    pool = _corpus_resources(corpus)
    sample = random.Random(5).sample(pool, 1500)
    assert _mutation_check(sample, 4, seed=7) == 6000


def test_validation_reports_what_the_models_report() -> None:
    """With fastcheck first, validate_resource still gives the models' messages."""
    (res,) = [r for r in _hl7v2_resources(sorted(EXAMPLES.glob("*.hl7")))[:1]]
    bad = copy.deepcopy(res)
    bad["birthDate" if res["resourceType"] == "Patient" else "id"] = 12
    bad["bogusKey"] = 1
    got = validation.validate_resource(bad, "r")
    assert got and all(p["path"].startswith("r") for p in got)
    assert any("bogusKey" in p["path"] for p in got)
    assert validation.validate_resource(res) == []


def test_a_table_still_being_built_makes_it_unsure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread may meet a model's table before its required fields and choices are
    filled in: that must read as "not sure", even through a nested type."""
    patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Doe"}]}
    assert fastcheck.accepts(patient)
    human_name = fastcheck._resource_table("Patient").fields["name"].table
    monkeypatch.setattr(human_name, "ready", False)
    assert not fastcheck.accepts(patient)
    assert fastcheck.accepts({"resourceType": "Patient", "id": "p1"})  # no name: unaffected
