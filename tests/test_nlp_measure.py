"""Vital signs / measurements and medication sigs read from free text by rules in nlp/."""

from __future__ import annotations

import csv
import itertools
import shutil
from collections import Counter
from pathlib import Path

import pytest

from fhirtwin.nlp_measure import (
    Measurement,
    MeasureRulesError,
    Rules,
    Sig,
    find_measurements,
    load_rules,
    parse_sig,
)

ROOT = Path(__file__).resolve().parent.parent
NLP = ROOT / "nlp"


@pytest.fixture(scope="module")
def rules() -> Rules:
    return load_rules(NLP)


def _found(text: str, rules: Rules) -> list[Measurement]:
    out = find_measurements(text, rules)
    for m in out:
        assert text[m.start : m.end] == m.text
        for c in m.components:
            assert text[c.start : c.end] == c.text
    starts = [m.start for m in out]
    assert starts == sorted(starts)
    assert all(a.end <= b.start for a, b in itertools.pairwise(out))
    return out


def _summary(text: str, rules: Rules) -> list[tuple[str, float, str]]:
    return [(m.kind, m.value, m.unit) for m in _found(text, rules)]


# --------------------------------------------------------------------------- measurements


def test_every_kind_in_one_sentence(rules: Rules) -> None:
    text = (
        "BP 120/80 mmHg, HR 72, temperature 98.6 F, weight 180 lbs, height 5 feet 10 inches, "
        "respirations 16, O2 sat 97% on room air, pulse 88, BMI 27.5, pain 3/10"
    )
    assert _summary(text, rules) == [
        ("blood-pressure", 120.0, "mm[Hg]"),
        ("heart-rate", 72.0, "/min"),
        ("body-temperature", 98.6, "[degF]"),
        ("body-weight", 180.0, "[lb_av]"),
        ("body-height", 70.0, "[in_i]"),
        ("respiratory-rate", 16.0, "/min"),
        ("oxygen-saturation", 97.0, "%"),
        ("heart-rate", 88.0, "/min"),
        ("bmi", 27.5, "kg/m2"),
        ("pain-score", 3.0, "{score}"),
    ]
    found = _found(text, rules)
    assert found[0].text == "BP 120/80 mmHg"
    assert found[4].text == "height 5 feet 10 inches"


def test_loinc_codes(rules: Rules) -> None:
    text = (
        "BP 120/80, HR 72, RR 16, temp 37 C, weight 80 kg, height 180 cm, SpO2 97%, "
        "O2 sat 95%, BMI 24.7, pain 2/10"
    )
    assert [(m.kind, m.loinc) for m in _found(text, rules)] == [
        ("blood-pressure", "85354-9"),
        ("heart-rate", "8867-4"),
        ("respiratory-rate", "9279-1"),
        ("body-temperature", "8310-5"),
        ("body-weight", "29463-7"),
        ("body-height", "8302-2"),
        ("oxygen-saturation", "59408-5"),
        ("oxygen-saturation", "2708-6"),
        ("bmi", "39156-5"),
        ("pain-score", "72514-3"),
    ]


def test_blood_pressure_is_a_panel_with_two_components(rules: Rules) -> None:
    text = "Her blood pressure was 150/90 mm Hg today."
    (bp,) = _found(text, rules)
    assert (bp.loinc, bp.unit, bp.text) == ("85354-9", "mm[Hg]", "blood pressure was 150/90 mm Hg")
    sys_, dia = bp.components
    assert (sys_.loinc, sys_.value, sys_.unit, sys_.text) == ("8480-6", 150.0, "mm[Hg]", "150")
    assert (dia.loinc, dia.value, dia.unit, dia.text) == ("8462-4", 90.0, "mm[Hg]", "90")


def test_vital_signs_paragraph(rules: Rules) -> None:
    text = "Vital signs: Blood pressure 130/85, pulse 72, respiratory rate 18, temperature 37.2"
    assert _summary(text, rules) == [
        ("blood-pressure", 130.0, "mm[Hg]"),
        ("heart-rate", 72.0, "/min"),
        ("respiratory-rate", 18.0, "/min"),
        ("body-temperature", 37.2, "Cel"),
    ]


def test_single_letter_labels_in_a_row(rules: Rules) -> None:
    text = "T 101.2 P 110 R 22 BP 150/90 SpO2 92% RA"
    assert _summary(text, rules) == [
        ("body-temperature", 101.2, "[degF]"),
        ("heart-rate", 110.0, "/min"),
        ("respiratory-rate", 22.0, "/min"),
        ("blood-pressure", 150.0, "mm[Hg]"),
        ("oxygen-saturation", 92.0, "%"),
    ]


def test_single_letter_labels_alone_or_lower_case_are_ignored(rules: Rules) -> None:
    assert _found("Disc herniation at L5. P 100 was noted on the chart.", rules) == []
    assert _found("the t 98 p 80 notation", rules) == []
    assert _found("T1 and T2 weighted images were obtained", rules) == []


def test_mtsamples_style_commas(rules: Rules) -> None:
    text = "VITAL SIGNS:, Temperature 98, pulse 60, respirations 16, blood pressure 140/70.,HEENT:"
    assert _summary(text, rules) == [
        ("body-temperature", 98.0, "[degF]"),
        ("heart-rate", 60.0, "/min"),
        ("respiratory-rate", 16.0, "/min"),
        ("blood-pressure", 140.0, "mm[Hg]"),
    ]


def test_label_forms(rules: Rules) -> None:
    text = (
        "Blood pressure:  128/62.  Pulse:  60.  Respirations:  20.  Temperature:  96.8.  "
        "BP = 120/80 mmHg.  Pulse = 80 bpm.  heart rate of 86 beats per minute.  "
        "B/P: 142/70.  BP160/74 HR95 RR12.  Temp 34.6C.  Wt. 86.4kg.  Ht. 5'6\".  "
        "pulse oximetry of 98%.  saturating at 97% on room air"
    )
    assert _summary(text, rules) == [
        ("blood-pressure", 128.0, "mm[Hg]"),
        ("heart-rate", 60.0, "/min"),
        ("respiratory-rate", 20.0, "/min"),
        ("body-temperature", 96.8, "[degF]"),
        ("blood-pressure", 120.0, "mm[Hg]"),
        ("heart-rate", 80.0, "/min"),
        ("heart-rate", 86.0, "/min"),
        ("blood-pressure", 142.0, "mm[Hg]"),
        ("blood-pressure", 160.0, "mm[Hg]"),
        ("heart-rate", 95.0, "/min"),
        ("respiratory-rate", 12.0, "/min"),
        ("body-temperature", 34.6, "Cel"),
        ("body-weight", 86.4, "kg"),
        ("body-height", 66.0, "[in_i]"),
        ("oxygen-saturation", 98.0, "%"),
        ("oxygen-saturation", 97.0, "%"),
    ]


def test_units_are_kept_as_written(rules: Rules) -> None:
    text = (
        "temperature 37.2 degrees Celsius, temperature of 100.4 degrees Fahrenheit, "
        "weight 72 kg, weight 3200 grams, weight 154 pounds, height 70 inches, height 178 cm, "
        "height 1.78 m, weighing 7 pounds 3 ounces, Height 42-1/4 inches, weight 189-1/2 pounds"
    )
    assert _summary(text, rules) == [
        ("body-temperature", 37.2, "Cel"),
        ("body-temperature", 100.4, "[degF]"),
        ("body-weight", 72.0, "kg"),
        ("body-weight", 3200.0, "g"),
        ("body-weight", 154.0, "[lb_av]"),
        ("body-height", 70.0, "[in_i]"),
        ("body-height", 178.0, "cm"),
        ("body-height", 1.78, "m"),
        ("body-weight", 7.1875, "[lb_av]"),
        ("body-height", 42.25, "[in_i]"),
        ("body-weight", 189.5, "[lb_av]"),
    ]


def test_feet_without_inch_unit_before_punctuation(rules: Rules) -> None:
    assert _summary("Height 5 feet 3, weight 106 pounds", rules) == [
        ("body-height", 63.0, "[in_i]"),
        ("body-weight", 106.0, "[lb_av]"),
    ]


def test_temperature_unit_inferred_from_the_value(rules: Rules) -> None:
    assert _summary("temperature 36.9", rules) == [("body-temperature", 36.9, "Cel")]
    assert _summary("temperature 99.1 degrees", rules) == [("body-temperature", 99.1, "[degF]")]
    # between the two ranges, or outside both: no unit can be inferred
    assert _summary("temperature 60", rules) == []
    assert _summary("temperature 120", rules) == []


@pytest.mark.parametrize(
    "text",
    [
        "BP 400/80",  # systolic out of range
        "blood pressure 80/120",  # diastolic above systolic
        "HR 12",
        "pulse 400",
        "temperature 50 C",
        "temperature 120 F",
        "O2 sat 40%",
        "SpO2 101%",
        "respiratory rate 200",
        "BMI 5",
        "weight 2000 pounds",
        "pain 12/10",
    ],
)
def test_implausible_values_are_rejected(rules: Rules, text: str) -> None:
    assert _found(text, rules) == []


@pytest.mark.parametrize(
    "text",
    [
        "He was seen on 8/12/2008 and 11/20/2006.",
        "Blood pressure on 8/12/2008 was not recorded.",
        "aspirin 81 mg daily, Novolin 70/30, 15 units b.i.d.",
        "potassium 4.2, sodium 138, creatinine 1.1",
        "age 72, a 72-year-old man",
        "follow up at 10:30 on 3/4",
        "The patient reports 2/10 pain in the knee.",
        "120/80",  # a bare ratio outside a vital-signs context
        "pulses 2+ bilaterally, pulse 2+",
        "heart rate in the 80s, pulse 80s",
        "weight loss of 10 pounds, weight is up about 14 pounds",
        "Ideal body weight: 190 pounds.  Estimated fetal weight is 3 pounds.",
        "the specimen weighed 758 g",
        "Right atrial saturation is 76%, mixed venous saturation 65%",
        "weight 123",  # no unit: pounds or kilograms?
        "T 100.9-102.7 over the day",  # a range
        "HR 72 hours after surgery",
    ],
)
def test_no_false_vitals(rules: Rules, text: str) -> None:
    found = _found(text, rules)
    assert [m for m in found if m.kind != "pain-score"] == []


def test_pain_fraction_is_a_pain_score_not_a_blood_pressure(rules: Rules) -> None:
    text = "The patient reports 2/10 pain; pain is a 7 out of 10 later."
    assert _summary(text, rules) == [
        ("pain-score", 2.0, "{score}"),
        ("pain-score", 7.0, "{score}"),
    ]


def test_bare_values_in_a_vital_signs_context(rules: Rules) -> None:
    text = "VITAL SIGNS:  120/80, 36.8C, pain 2/10, 98% on room air.,HEENT:  118/70, 37.0C"
    assert _summary(text, rules) == [
        ("blood-pressure", 120.0, "mm[Hg]"),
        ("body-temperature", 36.8, "Cel"),
        ("pain-score", 2.0, "{score}"),
        ("oxygen-saturation", 98.0, "%"),
    ]


def test_empty_and_no_numbers(rules: Rules) -> None:
    assert find_measurements("", rules) == []
    assert find_measurements("Vital signs stable. Afebrile.", rules) == []


def test_unicode_and_case(rules: Rules) -> None:
    text = "İİ TEMPERATURE 38.2 °C, sp o2 95 %"
    assert _summary(text, rules) == [
        ("body-temperature", 38.2, "Cel"),
        ("oxygen-saturation", 95.0, "%"),
    ]


def test_rules_are_cached_by_resolved_path() -> None:
    assert load_rules(NLP) is load_rules(NLP / ".." / "nlp")


# --------------------------------------------------------------------------- sig


def _sig(text: str, drug: str, rules: Rules) -> Sig | None:
    sig = parse_sig(text, text.index(drug) + len(drug), rules)
    if sig is not None:
        assert text[sig.end - len(sig.text) : sig.end] == sig.text
    return sig


def test_sig_basic(rules: Rules) -> None:
    text = "Lisinopril 10 mg p.o. daily, metoprolol 25 mg b.i.d."
    sig = _sig(text, "Lisinopril", rules)
    assert sig is not None
    assert (sig.dose_value, sig.dose_unit) == (10.0, "mg")
    assert sig.route == ("26643006", "Oral route")
    assert sig.frequency == {"frequency": 1, "period": 1, "periodUnit": "d"}
    assert sig.as_needed is False
    assert sig.text == "10 mg p.o. daily"
    assert text[sig.end :].startswith(", metoprolol")
    sig2 = _sig(text, "metoprolol", rules)
    assert sig2 is not None and sig2.frequency == {"frequency": 2, "period": 1, "periodUnit": "d"}


@pytest.mark.parametrize(
    ("text", "drug", "dose", "route", "freq", "prn"),
    [
        ("Norco one tablet p.o. q.4h. p.r.n., Zofran 4 mg IV", "Norco", (1.0, "{tbl}"),
         "26643006", {"frequency": 1, "period": 4, "periodUnit": "h"}, True),
        ("Zofran 4 mg IV q.6h, then", "Zofran", (4.0, "mg"),
         "47625008", {"frequency": 1, "period": 6, "periodUnit": "h"}, False),
        ("Vicoprofen #30 1 p.o. q.4-6h p.r.n., ", "Vicoprofen", (1.0, None),
         "26643006", {"frequency": 1, "period": 4, "periodMax": 6, "periodUnit": "h"}, True),
        ("Levothyroxine 25 mcg, 1 p.o. q.a.m.,8.  Protonix", "Levothyroxine", (25.0, "ug"),
         "26643006", {"frequency": 1, "period": 1, "periodUnit": "d", "when": ["MORN"]}, False),
        ("Detrol 4 mg q.h.s.  3.  Neurontin", "Detrol", (4.0, "mg"),
         None, {"frequency": 1, "period": 1, "periodUnit": "d", "when": ["HS"]}, False),
        ("MiraLax 17 g PO every other day", "MiraLax", (17.0, "g"),
         "26643006", {"frequency": 1, "period": 2, "periodUnit": "d"}, False),
        ("Albuterol 2 puffs inhaled q 6 h as needed", "Albuterol", (2.0, "{puff}"),
         "447694001", {"frequency": 1, "period": 6, "periodUnit": "h"}, True),
        ("insulin 10 units subcutaneously BID and PRN", "insulin", (10.0, "[iU]"),
         "34206005", {"frequency": 2, "period": 1, "periodUnit": "d"}, True),
        ("Tylenol 650 mg PR Q6H PRN fever", "Tylenol", (650.0, "mg"),
         "37161004", {"frequency": 1, "period": 6, "periodUnit": "h"}, True),
        ("nitroglycerin 0.4 mg SL q5 min prn chest pain", "nitroglycerin", (0.4, "mg"),
         "37839007", {"frequency": 1, "period": 5, "periodUnit": "min"}, True),
        ("ceftriaxone 1 g IM once a day", "ceftriaxone", (1.0, "g"),
         "78421000", {"frequency": 1, "period": 1, "periodUnit": "d"}, False),
        ("hydrocortisone cream applied topically t.i.d.", "cream", (None, None),
         "6064005", {"frequency": 3, "period": 1, "periodUnit": "d"}, False),
        ("Lipitor 20 mg by mouth nightly", "Lipitor", (20.0, "mg"),
         "26643006", {"frequency": 1, "period": 1, "periodUnit": "d", "when": ["HS"]}, False),
        ("Keflex 500 mg QID", "Keflex", (500.0, "mg"),
         None, {"frequency": 4, "period": 1, "periodUnit": "d"}, False),
        ("Coumadin 5 mg weekly", "Coumadin", (5.0, "mg"),
         None, {"frequency": 1, "period": 1, "periodUnit": "wk"}, False),
        ("Klonopin 0.5 mg twice a day", "Klonopin", (0.5, "mg"),
         None, {"frequency": 2, "period": 1, "periodUnit": "d"}, False),
        ("Humalog 5 units three times a day with meals", "Humalog", (5.0, "[iU]"),
         None, {"frequency": 3, "period": 1, "periodUnit": "d", "when": ["C"]}, False),
        ("Tylenol 1-2 tablets by mouth every 6 hours as needed", "Tylenol", (None, "{tbl}"),
         "26643006", {"frequency": 1, "period": 6, "periodUnit": "h"}, True),
    ],
)  # fmt: skip
def test_sig_variants(
    rules: Rules,
    text: str,
    drug: str,
    dose: tuple[float | None, str | None],
    route: str | None,
    freq: dict[str, object],
    prn: bool,
) -> None:
    sig = _sig(text, drug, rules)
    assert sig is not None
    assert (sig.dose_value, sig.dose_unit) == dose
    assert (sig.route[0] if sig.route else None) == route
    assert sig.frequency == freq
    assert sig.as_needed is prn


def test_sig_stops_at_the_next_drug_or_sentence(rules: Rules) -> None:
    text = "Coreg 6.25 mg b.i.d.  This should be increased up to 25 mg b.i.d."
    sig = _sig(text, "Coreg", rules)
    assert sig is not None and sig.text == "6.25 mg b.i.d."
    text = "4.  Novolin 70/30, 15 units b.i.d.,5.  Metformin 500 mg p.o. daily."
    sig = _sig(text, "Novolin", rules)
    # "70/30" (a combination strength) gives no single dose
    assert sig is not None and sig.text == "70/30, 15 units b.i.d."
    assert (sig.dose_value, sig.dose_unit) == (15.0, "[iU]")
    text = "aspirin 81 mg daily. Lasix 40 mg b.i.d."
    sig = _sig(text, "aspirin", rules)
    assert sig is not None and sig.text == "81 mg daily"


def test_sig_none_when_nothing_follows(rules: Rules) -> None:
    assert _sig("Zyrtec and hydrocodone 7.5 mg", "Zyrtec", rules) is None
    assert _sig("She takes Zyrtec.", "Zyrtec", rules) is None
    assert parse_sig("aspirin", 7, rules) is None


def test_sig_window(rules: Rules) -> None:
    text = "aspirin" + " " * 80 + "81 mg daily"
    assert parse_sig(text, 7, rules) is None


# --------------------------------------------------------------------------- bad rules


def _rules_dir(tmp_path: Path, measurements: str | None = None, sig: str | None = None) -> Path:
    d = tmp_path / "nlp"
    d.mkdir()
    shutil.copy(NLP / "measurements.yaml", d)
    shutil.copy(NLP / "sig.yaml", d)
    if measurements is not None:
        (d / "measurements.yaml").write_text(measurements)
    if sig is not None:
        (d / "sig.yaml").write_text(sig)
    return d


def _measurements_with(rule: str) -> str:
    base = (NLP / "measurements.yaml").read_text()
    return base + rule


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("  - kind: broken\n    loinc: 1234-5\n    display: X\n    labels: ['(unclosed']\n"
         "    units: [{code: x, spellings: [x], range: [1, 2]}]\n", "bad regex"),
        ("  - kind: broken\n    loinc: not-loinc\n    display: X\n    labels: [x]\n"
         "    units: [{code: x, spellings: [x], range: [1, 2]}]\n", "not a LOINC code"),
        ("  - kind: broken\n    loinc: 1234-5\n    display: X\n    labels: [x]\n"
         "    units: [{code: x, spellings: [x], range: [5, 2]}]\n", "range must be"),
        ("  - kind: broken\n    loinc: 1234-5\n    display: X\n    labels: [x]\n"
         "    units: [{code: x, spellings: [x], range: [1, 2]}]\n    colour: red\n", "unknown key"),
        ("  - kind: broken\n    loinc: 1234-5\n    display: X\n    labels: [x]\n"
         "    units: [{code: x, spellings: [x], range: [1, 2]}]\n    default_unit: y\n",
         "not one of the rule's units"),
        ("  - kind: broken\n    loinc: 1234-5\n    display: X\n    labels: [x]\n"
         "    value: ratio\n    units: [{code: x, spellings: [x]}]\n    default_unit: x\n",
         "non-empty list"),
    ],
)  # fmt: skip
def test_bad_measurement_rule_names_file_and_rule(tmp_path: Path, rule: str, message: str) -> None:
    d = _rules_dir(tmp_path, measurements=_measurements_with(rule))
    with pytest.raises(MeasureRulesError) as exc:
        load_rules(d)
    text = str(exc.value)
    assert "measurements.yaml" in text
    assert "(broken)" in text
    assert message in text


def test_bad_sig_rule_names_file_and_entry(tmp_path: Path) -> None:
    sig = (NLP / "sig.yaml").read_text().replace("code: '47625008'", "code: 'IV'")
    d = _rules_dir(tmp_path, sig=sig)
    with pytest.raises(MeasureRulesError, match=r"sig\.yaml: routes\[1\] \(Intravenous route\)"):
        load_rules(d)


def test_bad_sig_placeholder(tmp_path: Path) -> None:
    sig = (NLP / "sig.yaml").read_text().replace("periodMax: $m", "periodMax: $x")
    d = _rules_dir(tmp_path, sig=sig)
    with pytest.raises(MeasureRulesError, match=r"frequencies\[0\]\.repeat\.periodMax"):
        load_rules(d)


def test_missing_or_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(MeasureRulesError, match="rules file not found"):
        load_rules(tmp_path)
    d = _rules_dir(tmp_path, measurements="version: 1\nrules: [\n")
    with pytest.raises(MeasureRulesError, match=r"measurements\.yaml: not valid YAML"):
        load_rules(d)


# --------------------------------------------------------------------------- corpus


@pytest.mark.corpus
def test_mtsamples_measurements(corpus: Path, rules: Rules) -> None:
    path = corpus / "mtsamples-clinspacy" / "data" / "mtsamples.csv"
    if not path.is_file():
        pytest.skip(f"corpus has no MTSamples at {path}")
    spans = {  # plausible ranges, restated from the rules
        ("blood-pressure", "mm[Hg]"): (40, 300),
        ("heart-rate", "/min"): (20, 300),
        ("respiratory-rate", "/min"): (4, 100),
        ("body-temperature", "Cel"): (25, 45),
        ("body-temperature", "[degF]"): (77, 113),
        ("body-weight", "[lb_av]"): (1, 1000),
        ("body-weight", "kg"): (0.3, 450),
        ("body-weight", "g"): (300, 9000),
        ("body-height", "[in_i]"): (10, 100),
        ("body-height", "cm"): (25, 250),
        ("body-height", "m"): (0.25, 2.5),
        ("oxygen-saturation", "%"): (50, 100),
        ("bmi", "kg/m2"): (10, 90),
        ("pain-score", "{score}"): (0, 10),
    }
    counts: Counter[str] = Counter()
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            text = row["transcription"]
            for m in find_measurements(text, rules):
                assert text[m.start : m.end] == m.text
                lo, hi = spans[(m.kind, m.unit)]
                assert lo <= m.value <= hi, (m, row["note_id"])
                for c in m.components:
                    assert text[c.start : c.end] == c.text
                if m.components:
                    sys_, dia = m.components
                    assert 40 <= sys_.value <= 300 and 10 <= dia.value <= 200
                    assert sys_.value > dia.value
                counts[m.kind] += 1
    print("MTSamples measurements per kind:", dict(counts.most_common()))
    assert counts["blood-pressure"] >= 300, counts
    for kind in ("heart-rate", "respiratory-rate", "body-temperature", "body-weight"):
        assert counts[kind] >= 200, counts
    for kind in ("body-height", "oxygen-saturation", "bmi", "pain-score"):
        assert counts[kind] >= 20, counts
