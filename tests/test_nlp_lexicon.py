"""The clinical concept lexicon (nlp/lexicon/*.yaml) and its loader, fhirtwin.nlp_lexicon."""

from __future__ import annotations

import csv
import re
import sys
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

from fhirtwin.nlp_lexicon import (
    CATEGORIES,
    CODE_SYSTEMS,
    Concept,
    LexiconError,
    load_lexicon,
    loinc_check_ok,
    target_rules,
    verhoeff_ok,
)

ROOT = Path(__file__).resolve().parent.parent
NLP_DIR = ROOT / "nlp"

ICD10CM_RE = re.compile(r"^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$")


@pytest.fixture(scope="module")
def concepts() -> list[Concept]:
    return load_lexicon(NLP_DIR)


@pytest.fixture(scope="module")
def nlp(concepts: list[Concept]) -> Any:
    spacy = pytest.importorskip("spacy")
    pytest.importorskip("medspacy")
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    tm = nlp.add_pipe("medspacy_target_matcher")
    tm.add(target_rules(concepts, NLP_DIR))
    return nlp


def spans(nlp: Any, text: str) -> list[tuple[str, str, str]]:
    """(span text, label, concept id) for each entity found in ``text``."""
    doc = nlp(text)
    out = []
    for ent in doc.ents:
        concept = ent._.target_rule.metadata["concept"]
        out.append((ent.text, ent.label_, concept.id))
    return out


# --- the shipped lexicon ---------------------------------------------------------------


def test_shipped_lexicon_loads(concepts: list[Concept]) -> None:
    assert len(concepts) >= 300
    counts = Counter(c.category for c in concepts)
    assert set(counts) == set(CATEGORIES), counts
    for category in CATEGORIES:
        assert counts[category] >= 20, (category, counts)


def test_ids_unique_and_every_concept_coded_and_findable(concepts: list[Concept]) -> None:
    ids = [c.id for c in concepts]
    assert len(ids) == len(set(ids))
    for c in concepts:
        assert c.codes, c.id
        assert c.terms or c.patterns, c.id
        assert c.display.strip(), c.id


def test_terms_are_normalised_and_claimed_once(concepts: list[Concept]) -> None:
    seen: dict[str, str] = {}
    for c in concepts:
        for t in c.terms:
            assert t == " ".join(t.lower().split()), (c.id, t)
            assert t not in seen, f"{t!r} in {seen.get(t)} and {c.id}"
            seen[t] = c.id


def test_every_code_well_formed(concepts: list[Concept]) -> None:
    for c in concepts:
        for system, code in c.codes:
            assert system in CODE_SYSTEMS, (c.id, system)
            if system == "snomed":
                assert verhoeff_ok(code), (c.id, code)
                assert code[-3:-1] in ("00", "10"), (c.id, code)
            elif system == "icd10cm":
                assert ICD10CM_RE.match(code), (c.id, code)
            elif system == "rxnorm":
                assert code.isdigit(), (c.id, code)
            elif system == "loinc":
                assert loinc_check_ok(code), (c.id, code)


def test_category_code_systems(concepts: list[Concept]) -> None:
    """Medications carry RxNorm; the other categories carry SNOMED CT or ICD-10-CM."""
    for c in concepts:
        systems = {s for s, _ in c.codes}
        if c.category == "medication":
            assert "rxnorm" in systems, c.id
        elif c.category in ("procedure", "allergen"):
            assert "snomed" in systems, c.id
        else:
            assert systems & {"snomed", "icd10cm"}, c.id


def test_codings_snomed_first_with_display(concepts: list[Concept]) -> None:
    htn = next(c for c in concepts if c.id == "hypertension")
    codings = htn.codings()
    assert codings[0] == {
        "system": "http://snomed.info/sct",
        "code": "59621000",
        "display": "Essential hypertension",
    }
    assert codings[1]["system"] == "http://hl7.org/fhir/sid/icd-10-cm"
    assert codings[1]["code"] == "I10"
    assert htn.code("icd10cm") == "I10"
    assert htn.code("rxnorm") is None


def test_load_is_cached(concepts: list[Concept]) -> None:
    again = load_lexicon(NLP_DIR)
    assert again == concepts
    assert all(a is b for a, b in zip(again, concepts, strict=True))


# --- check digits ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sctid", "ok"),
    [
        ("38341003", True),  # Hypertensive disorder
        ("44054006", True),  # Diabetes mellitus type 2
        ("22298006", True),  # Myocardial infarction
        ("442571000124108", True),  # Tree nut (US extension, partition 10)
        ("38341004", False),
        ("44054007", False),
        ("22298060", False),
        ("", False),
        ("3834100x", False),
    ],
)
def test_verhoeff(sctid: str, ok: bool) -> None:
    assert verhoeff_ok(sctid) is ok


@pytest.mark.parametrize(
    ("code", "ok"),
    [
        ("8480-6", True),  # Systolic blood pressure
        ("8462-4", True),  # Diastolic blood pressure
        ("2160-0", True),  # Creatinine
        ("718-7", True),  # Hemoglobin
        ("4548-4", True),  # Hemoglobin A1c
        ("8480-5", False),
        ("2160-1", False),
        ("8480", False),
        ("x-1", False),
    ],
)
def test_loinc_check_digit(code: str, ok: bool) -> None:
    assert loinc_check_ok(code) is ok


# --- malformed files --------------------------------------------------------------------


def write_lexicon(tmp_path: Path, name: str, text: str) -> Path:
    lex = tmp_path / "lexicon"
    lex.mkdir(exist_ok=True)
    (lex / name).write_text(text, encoding="utf-8")
    return tmp_path


GOOD = """\
category: condition
concepts:
  - id: hypertension
    display: Essential hypertension
    codes: {snomed: "59621000", icd10cm: "I10"}
    terms: [hypertension, HTN]
"""


def test_minimal_file_loads(tmp_path: Path) -> None:
    d = write_lexicon(tmp_path, "a.yaml", GOOD)
    [c] = load_lexicon(d)
    assert c.id == "hypertension"
    assert c.terms == ("hypertension", "htn")
    assert c.codes == (("snomed", "59621000"), ("icd10cm", "I10"))


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (
            'codes: {snomed: "59621001"}\n    terms: [x]',
            ["Verhoeff", "59621001"],
        ),
        ('codes: {snomed: "59621120"}\n    terms: [x]', ["partition"]),
        ('codes: {icd10cm: "I10.x"}\n    terms: [x]', ["ICD-10-CM", "I10.x"]),
        ('codes: {icd10cm: "U07.1"}\n    terms: [x]', ["ICD-10-CM"]),
        ('codes: {loinc: "8480-5"}\n    terms: [x]', ["LOINC", "8480-5"]),
        ('codes: {rxnorm: "RX29046"}\n    terms: [x]', ["RxNorm"]),
        ("codes: {rxnorm: 29046}\n    terms: [x]", ["quoted string"]),
        ('codes: {cpt: "99213"}\n    terms: [x]', ["unknown code system", "cpt"]),
        ("codes: {}\n    terms: [x]", ["codes"]),
        ('codes: {snomed: "59621000"}\n    terms: []', ["no 'terms'"]),
        ('codes: {snomed: "59621000"}\n    terms: [x, X]', ["listed twice"]),
        ('codes: {snomed: "59621000"}\n    terms: [x]\n    colour: red', ["unknown key", "colour"]),
        ('codes: {snomed: "59621000"}\n    terms: [x]\n    pattern: MS', ["pattern"]),
        ('codes: {snomed: "59621000"}\n    terms: [x]\n    category: disease', ["category"]),
    ],
)
def test_malformed_concept_names_file_and_concept(
    tmp_path: Path, body: str, needles: list[str]
) -> None:
    text = GOOD + f"  - id: broken_one\n    display: Broken\n    {body}\n"
    d = write_lexicon(tmp_path, "conditions.yaml", text)
    with pytest.raises(LexiconError) as err:
        load_lexicon(d)
    msg = str(err.value)
    assert "conditions.yaml" in msg
    assert "concept #1" in msg and "broken_one" in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_bad_id_and_missing_display(tmp_path: Path) -> None:
    d = write_lexicon(
        tmp_path, "x.yaml", GOOD + '  - id: Bad Id\n    display: X\n    codes: {icd10cm: "I10"}\n'
    )
    with pytest.raises(LexiconError, match=r"x\.yaml: concept #1 .*'id' must be a lower-case slug"):
        load_lexicon(d)
    d = write_lexicon(tmp_path, "x.yaml", GOOD + '  - id: y\n    codes: {icd10cm: "I10"}\n')
    with pytest.raises(LexiconError, match=r"x\.yaml: concept #1 \(id 'y'\).*display"):
        load_lexicon(d)


def test_term_claimed_twice_names_both_concepts(tmp_path: Path) -> None:
    write_lexicon(tmp_path, "a.yaml", GOOD)
    d = write_lexicon(
        tmp_path,
        "b.yaml",
        "category: condition\nconcepts:\n"
        '  - {id: essential_htn, display: X, codes: {icd10cm: "I10"}, terms: [HTN]}\n',
    )
    with pytest.raises(LexiconError) as err:
        load_lexicon(d)
    msg = str(err.value)
    assert "b.yaml" in msg and "essential_htn" in msg and "hypertension" in msg and "'htn'" in msg


def test_duplicate_id_across_files(tmp_path: Path) -> None:
    write_lexicon(tmp_path, "a.yaml", GOOD)
    d = write_lexicon(
        tmp_path,
        "b.yaml",
        "category: finding\nconcepts:\n"
        '  - {id: hypertension, display: X, codes: {icd10cm: "I10"}, terms: [high bp]}\n',
    )
    with pytest.raises(LexiconError, match=r"b\.yaml: concept #0 \(id 'hypertension'\).*a\.yaml"):
        load_lexicon(d)


def test_malformed_files(tmp_path: Path) -> None:
    d = write_lexicon(tmp_path, "a.yaml", "category: condition\nconcepts: [\n")
    with pytest.raises(LexiconError, match=r"a\.yaml: not valid YAML"):
        load_lexicon(d)
    d = write_lexicon(tmp_path, "a.yaml", "- just a list\n")
    with pytest.raises(LexiconError, match=r"a\.yaml: the file must be a mapping"):
        load_lexicon(d)
    d = write_lexicon(tmp_path, "a.yaml", "category: gizmo\nconcepts: []\n")
    with pytest.raises(LexiconError, match=r"a\.yaml: file category 'gizmo'"):
        load_lexicon(d)
    d = write_lexicon(tmp_path, "a.yaml", "category: condition\nconcepts:\n  - just text\n")
    with pytest.raises(LexiconError, match=r"a\.yaml: concept #0 is a str"):
        load_lexicon(d)
    with pytest.raises(LexiconError, match="no lexicon directory"):
        load_lexicon(tmp_path / "nowhere")


def test_reload_after_edit(tmp_path: Path) -> None:
    d = write_lexicon(tmp_path, "a.yaml", GOOD)
    assert len(load_lexicon(d)) == 1
    write_lexicon(
        tmp_path,
        "a.yaml",
        GOOD + '  - {id: b, display: B, codes: {icd10cm: "I11.9"}, terms: [hypertensive heart]}\n',
    )
    assert [c.id for c in load_lexicon(d)] == ["hypertension", "b"]


# --- target rules and matching ------------------------------------------------------------


def test_target_rules_one_per_term_and_pattern(concepts: list[Concept]) -> None:
    rules = target_rules(concepts, NLP_DIR)
    assert len(rules) == sum(len(c.terms) + len(c.patterns) for c in concepts)
    labels = {r.category for r in rules}
    assert labels == {c.upper() for c in CATEGORIES}
    metformin = [r for r in rules if r.literal == "glucophage"]
    assert len(metformin) == 1
    assert metformin[0].metadata["concept"].id == "metformin"
    assert metformin[0].category == "MEDICATION"


def test_target_rules_for_bare_concept_reads_terms_from_lexicon(concepts: list[Concept]) -> None:
    full = next(c for c in concepts if c.id == "asthma")
    bare = Concept(id=full.id, display=full.display, category=full.category, codes=full.codes)
    rules = target_rules([bare], NLP_DIR)
    assert sorted(r.literal for r in rules) == sorted(full.terms)
    assert all(r.metadata["concept"] is bare for r in rules)


def test_match_example_sentence(nlp: Any) -> None:
    doc = nlp("History of HTN and type 2 diabetes, on metformin 500 mg.")
    found = {ent._.target_rule.metadata["concept"].id: ent for ent in doc.ents}
    assert set(found) == {"hypertension", "type_2_diabetes", "metformin"}
    assert found["hypertension"].label_ == "CONDITION"
    assert found["metformin"].label_ == "MEDICATION"
    t2dm = found["type_2_diabetes"]._.target_rule.metadata["concept"]
    assert t2dm.codings()[0]["code"] == "44054006"
    assert t2dm.code("icd10cm") == "E11.9"
    met = found["metformin"]._.target_rule.metadata["concept"]
    assert met.codings() == [
        {
            "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
            "code": "6809",
            "display": "Metformin",
        }
    ]


def test_case_insensitive_and_longest_match(nlp: Any) -> None:
    assert spans(nlp, "TYPE 2 DIABETES MELLITUS, poorly controlled.") == [
        ("TYPE 2 DIABETES MELLITUS", "CONDITION", "type_2_diabetes")
    ]
    assert spans(nlp, "Known congestive heart failure.") == [
        ("congestive heart failure", "CONDITION", "congestive_heart_failure")
    ]
    assert spans(nlp, "She had a laparoscopic cholecystectomy in 2010.") == [
        ("laparoscopic cholecystectomy", "PROCEDURE", "laparoscopic_cholecystectomy")
    ]


def test_brand_names_and_allergens(nlp: Any) -> None:
    got = spans(nlp, "Takes Lipitor and Coumadin. Allergic to peanuts and latex.")
    assert got == [
        ("Lipitor", "MEDICATION", "atorvastatin"),
        ("Coumadin", "MEDICATION", "warfarin"),
        ("peanuts", "ALLERGEN", "peanut"),
        ("latex", "ALLERGEN", "latex"),
    ]


def test_findings_and_abbreviations(nlp: Any) -> None:
    got = {
        cid
        for _, _, cid in spans(
            nlp, "Presents with SOB, chest pain and fever. PMH: COPD, CAD, GERD."
        )
    }
    assert got == {"dyspnea", "chest_pain", "fever", "copd", "coronary_artery_disease", "gerd"}


def test_case_sensitive_pattern(nlp: Any) -> None:
    assert [cid for _, _, cid in spans(nlp, "Diagnosed with AIDS in 1999.")] == ["hiv_infection"]
    assert spans(nlp, "He uses hearing aids.") == []


# --- the corpus ----------------------------------------------------------------------------


@pytest.mark.corpus
def test_corpus_coverage(corpus: Path, nlp: Any) -> None:
    """On the first 500 MTSamples notes, >= 90 % of non-empty notes yield at least one concept."""
    path = corpus / "mtsamples-clinspacy" / "data" / "mtsamples.csv"
    if not path.is_file():
        pytest.skip(f"{path} not in the corpus")
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as fh:
        notes = [row.get("transcription") or "" for row in islice(csv.DictReader(fh), 500)]
    texts = [t for t in notes if t.strip()]
    assert len(texts) >= 400
    hits = sum(1 for doc in nlp.pipe(texts) if doc.ents)
    coverage = hits / len(texts)
    print(f"lexicon corpus coverage: {hits}/{len(texts)} = {coverage:.1%}")
    assert coverage >= 0.90
