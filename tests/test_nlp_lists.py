"""List items under a header line inherit its ConText modifier (``list_headers`` in
``nlp/sections.yaml``), and what that makes in FHIR (``clinical_status`` in ``nlp/fhir.yaml``).

The sentences are synthetic: none comes from an evaluation file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fhirtwin import notes
from fhirtwin.nlp import NlpRulesError, NotePipeline, pipeline

ROOT = Path(__file__).resolve().parent.parent


def _flags(text: str) -> dict[str, tuple[bool, bool, str | None]]:
    """Mention text (lower-case) → (historical, family, relative)."""
    return {
        m.text.lower(): (m.historical, m.family, m.relative)
        for m in pipeline().analyse(text).mentions
    }


def test_numbered_items_under_a_history_header_are_historical() -> None:
    f = _flags(
        "Past medical history is significant for:\n1. Hypertension.\n2. Gout.\n\n"
        "Today she has pneumonia."
    )
    assert f["hypertension"][0] and f["gout"][0]
    assert not f["pneumonia"][0]  # after the list: the header no longer applies


def test_bulleted_items_and_items_on_the_header_line() -> None:
    f = _flags("She has had these operations in the past:\n- appendectomy\n* cholecystectomy\n")
    assert f["appendectomy"][0] and f["cholecystectomy"][0]
    f = _flags("Medical history includes: 1. Asthma. 2. Gout.\nNow: cough.")
    assert f["asthma"][0] and f["gout"][0]
    assert not f["cough"][0]


def test_family_header_gives_the_relative() -> None:
    f = _flags("Mother has:\n1. Breast cancer.\n2. Diabetes.\nThe patient has asthma.")
    assert f["breast cancer"][1:] == (True, "mother")
    assert f["diabetes"][1:] == (True, "mother")
    assert f["asthma"][1] is False


@pytest.mark.parametrize(
    "text",
    [
        # the modifier has its own concept: not a header
        "History of asthma:\n1. Pneumonia.",
        # a line that is not an item ends the list
        "Past medical history is significant for:\nShe now has pneumonia.",
        # too many words between the modifier and the colon
        "History is noted in the chart, and the findings of today's visit are:\n1. Pneumonia.",
        # no modifier at all
        "Current problems are:\n1. Pneumonia.",
    ],
)
def test_not_a_list_header(text: str) -> None:
    assert _flags(text)["pneumonia"][0] is False


def test_list_headers_rules_are_checked(tmp_path: Path) -> None:
    import shutil

    rules = tmp_path / "nlp"
    shutil.copytree(ROOT / "nlp", rules)
    path = rules / "sections.yaml"
    path.write_text(
        path.read_text(encoding="utf-8").replace(
            "inherit: [HISTORICAL, FAMILY]", "inherit: [HISTORICAL, PAST]"
        ),
        encoding="utf-8",
    )
    with pytest.raises(NlpRulesError, match=r"list_headers.inherit: 'PAST' is not a ConText"):
        NotePipeline(rules)


def _conditions(text: bytes) -> dict[str, dict[str, Any]]:
    ((_, resources),) = notes.convert(text, source="n.txt", patient="Patient/1", validate=True)
    out = {}
    for r in resources:
        if r["resourceType"] == "Condition":
            out[r["code"]["text"].lower()] = r
    return out


def test_historical_items_get_the_clinical_status_of_fhir_yaml() -> None:
    # nlp/fhir.yaml: a historical condition stays active, a historical finding is resolved
    conds = _conditions(
        b"Past medical history is significant for:\n1. Hypertension.\n2. Fever.\n\n"
        b"Assessment: pneumonia.\n"
    )
    status = {k: v["clinicalStatus"]["coding"][0]["code"] for k, v in conds.items()}
    htn = next(k for k in status if "hypertension" in k)
    fever = next(k for k in status if "fever" in k)
    pna = next(k for k in status if "pneumonia" in k)
    assert status[htn] == "active"
    assert status[fever] == "resolved"
    assert status[pna] == "active"
    for r in conds.values():
        assert r["verificationStatus"]["coding"][0]["code"] == "confirmed"
