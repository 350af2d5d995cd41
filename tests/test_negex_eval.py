"""bench/negex_eval.py (ConText scoring on NegEx annotation files) and fhirtwin/nlp_context.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fhirtwin.nlp_context import ContextRulesError, add_context, load_context_rules
from tests.bench_module import load_bench

ROOT = Path(__file__).resolve().parent.parent
NLP_DIR = ROOT / "nlp"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "negex"


E = load_bench("negex_eval")


@pytest.fixture(scope="module")
def nlp() -> Any:
    return E.build_nlp("ours")


# --------------------------------------------------------------------------- scoring


def _counts(metrics: dict[str, Any]) -> tuple[int, int, int]:
    return metrics["tp"], metrics["fp"], metrics["fn"]


@pytest.mark.parametrize("name", ["mini-negex.tsv", "mini-gencontext.tsv"])
def test_scoring_on_synthetic_file(nlp: Any, name: str, tmp_path: Path) -> None:
    result, preds = E.evaluate(FIXTURES / name, nlp=nlp)
    assert result["rows"] == 13
    assert result["scored"] == 12
    assert result["unfound"]["count"] == 1
    assert [u["id"] for u in result["unfound"]["rows"]] == ["12"]
    # negation: TP rows 1 and 6, FP row 10 (gold says affirmed), FN row 9 (gold says negated)
    assert _counts(result["negation"]) == (2, 1, 1)
    assert result["negation"]["n"] == 3
    assert result["negation"]["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["negation"]["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["negation"]["f1"] == pytest.approx(2 / 3, abs=1e-4)
    # historical: rows 3 and 11 found, row 8 has no cue
    assert _counts(result["historical"]) == (2, 0, 1)
    assert _counts(result["hypothetical"]) == (1, 0, 0)
    assert _counts(result["experiencer"]) == (1, 0, 0)
    assert result["experiencer"]["f1"] == 1.0
    # halves by row order: rows 1-7 and 8-13
    first, second = result["halves"]
    assert (first["name"], first["rows"], second["rows"]) == ("rows 1-7", 7, 6)
    assert _counts(first["negation"]) == (2, 0, 0)
    assert _counts(second["negation"]) == (0, 1, 1)
    # the unfound row has no prediction and is not scored
    assert next(p for p in preds if p.row.row_id == "12").span is None
    json.dumps(result)  # what --json writes


def test_layout_detection() -> None:
    with_header = E.read_annotations(FIXTURES / "mini-negex.tsv")
    headerless = E.read_annotations(FIXTURES / "mini-gencontext.tsv")
    assert with_header.layout.startswith("header:")
    assert headerless.layout == "genConText"
    assert [r.condition for r in with_header.rows] == [r.condition for r in headerless.rows]
    assert [r.gold for r in with_header.rows] == [r.gold for r in headerless.rows]
    assert with_header.categories == ("negation", "historical", "hypothetical", "experiencer")


def test_negation_only_file_with_report_numbers(tmp_path: Path, nlp: Any) -> None:
    path = tmp_path / "negex-only.txt"
    path.write_text(
        "Report No.\tConcept\tSentence\tNegation\n"
        "1\tcough\tShe denies any COUGH.\tNegated\n"
        "1\tfever\tShe has FEVER.\tAffirmed\n"
        "2\tedema\tNo EDEMA.\tNegated\n"
        '3\trales\t"Lungs: no RALES, clear."\tNegated\n',
        encoding="utf-8",
    )
    result, _ = E.evaluate(path, nlp=nlp)
    assert result["historical"] is None and result["experiencer"] is None
    assert _counts(result["negation"]) == (3, 0, 0)
    names = [h["name"] for h in result["halves"]]
    assert names == ["reports 1-2", "reports 3-3"]
    assert [h["rows"] for h in result["halves"]] == [3, 1]


def test_unknown_label_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("1\tcough\tNo COUGH.\tMaybe\tRecent\tPatient\n", encoding="utf-8")
    with pytest.raises(E.AnnotationFormatError, match=r"bad.txt:1: unknown negation label 'Maybe'"):
        E.read_annotations(path)


def test_metrics_edge_cases() -> None:
    c = E.Counts()
    assert (c.precision, c.recall, c.f1) == (None, None, None)
    c.add(gold=True, predicted=False)
    assert (c.precision, c.recall, c.f1) == (None, 0.0, 0.0)
    c.add(gold=True, predicted=True)
    c.add(gold=False, predicted=True)
    c.add(gold=False, predicted=False)
    assert (c.tp, c.fp, c.fn, c.tn, c.n) == (1, 1, 1, 1, 2)
    assert c.f1 == pytest.approx(0.5)


def test_locate_prefers_the_upper_case_mention() -> None:
    s = "ALLERGIES:  He has no known ALLERGIES."
    assert E.locate("allergies", s) == (s.rindex("ALLERGIES"), len(s) - 1)
    assert E.locate("staph bacteremia", "found to have STAPH   BACTEREMIA.") == (14, 32)
    assert E.locate("appendicitis", "Nothing here.") is None


def test_main_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert E.main([str(FIXTURES / "mini-negex.tsv"), "--json", str(out), "--errors", "3"]) == 0
    printed = capsys.readouterr().out
    assert "negation" in printed
    assert "PASS" in printed or "FAIL" in printed
    assert "not found in the sentence: 1" in printed
    data = json.loads(out.read_text(encoding="utf-8"))
    for cat in ("negation", "historical", "hypothetical", "experiencer"):
        assert set(data[cat]) >= {"precision", "recall", "f1", "n"}


# --------------------------------------------------------------------------- ConText behaviour


def _assertions(nlp: Any, sentence: str, target: str) -> dict[str, bool]:
    span = E.locate(target, sentence)
    assert span is not None, target
    doc = nlp.make_doc(sentence)
    doc.ents = [doc.char_span(span[0], span[1], label="CONDITION", alignment_mode="expand")]
    for _, proc in nlp.pipeline:
        doc = proc(doc)
    ent = doc.ents[0]
    return {a: bool(getattr(ent._, a)) for a in E.ATTRIBUTE.values()}


@pytest.mark.parametrize(
    ("sentence", "target", "attribute", "expected"),
    [
        ("No evidence of pneumonia.", "pneumonia", "is_negated", True),
        ("There is no increase in edema.", "edema", "is_negated", False),
        ("Gram negative rods in the sputum.", "rods", "is_negated", False),
        ("History of MI.", "MI", "is_historical", True),
        (
            "History of present illness: chest pain for two days.",
            "chest pain",
            "is_historical",
            False,
        ),
        ("Status post appendectomy.", "appendectomy", "is_historical", True),
        ("Return if chest pain develops.", "chest pain", "is_hypothetical", True),
        ("Call for any fever or chills.", "chills", "is_hypothetical", True),
        ("Mother had breast cancer.", "breast cancer", "is_family", True),
        ("Denies fever but reports cough.", "fever", "is_negated", True),
        ("Denies fever but reports cough.", "cough", "is_negated", False),
        ("She is a 60-year-old woman with pneumonia.", "pneumonia", "is_historical", False),
        # "resolved" negates both ways (genConText PREN and POST)
        ("Her rash and itching resolved.", "rash", "is_negated", True),
        ("The headache has resolved by now.", "headache", "is_negated", True),
        ("Resolved otitis media on the right.", "otitis media", "is_negated", True),
        # an earlier episode
        ("He got dizzy the last time he took codeine.", "dizzy", "is_historical", True),
        # ", with" attaches what the patient has now to a historical item
        (
            "History of gastric bypass, with fatigue and anemia.",
            "gastric bypass",
            "is_historical",
            True,
        ),
        ("History of gastric bypass, with fatigue and anemia.", "anemia", "is_historical", False),
        # a denied habit is negated and historical; any other denial only negated
        ("Patient denies tobacco or cannabis.", "tobacco", "is_historical", True),
        ("Patient denies tobacco or cannabis.", "cannabis", "is_negated", True),
        ("She denied any smoking.", "smoking", "is_historical", True),
        ("Patient denies headache.", "headache", "is_historical", False),
        ("Patient denies headache.", "headache", "is_negated", True),
        # a relative who asks or decides about the patient's care is not the experiencer
        (
            "The family  had wanted her admitted for her chest pain.",
            "chest pain",
            "is_family",
            False,
        ),
        ("Her husband requested imaging of her knee pain.", "knee pain", "is_family", False),
        ("Her mother had breast cancer.", "breast cancer", "is_family", True),
        # a trigger inside the target neither modifies it nor ends another trigger's scope
        ("Allergies: allergy to latex since 2001.", "allergy to latex", "is_historical", True),
    ],
)
def test_context_behaviour(
    nlp: Any, sentence: str, target: str, attribute: str, expected: bool
) -> None:
    assert _assertions(nlp, sentence, target)[attribute] is expected


def test_add_context_api_sets_span_attributes() -> None:
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    component = add_context(nlp, NLP_DIR)
    assert nlp.pipe_names[-1] == "medspacy_context"
    # token patterns that list plain words are added as the phrases they match
    loaded = load_context_rules(NLP_DIR)
    added = {r.metadata.get("from_pattern") if r.metadata else None for r in component.rules}
    assert len(component.rules) >= len(loaded)
    assert {r.literal for r in loaded if isinstance(r.pattern, list)} >= added - {None}
    doc = nlp.make_doc("Denies chest pain.")
    span = doc.char_span(7, 17, label="CONDITION")
    assert span is not None
    doc.ents = [span]
    doc = nlp(doc)
    ent = doc.ents[0]
    assert ent._.is_negated and not ent._.is_uncertain and not ent._.is_family


# --------------------------------------------------------------------------- rules-file errors


def _rules_dir(tmp_path: Path, text: str) -> Path:
    (tmp_path / "context.yaml").write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "rules:\n  - {literal: 'no', category: NEGATED_EXISTENCE, direction: FORWARD}\n"
            "  - {literal: history of, category: HISTORICAL, direction: SIDEWAYS}\n",
            r"rules\[1\] \(literal 'history of'\): direction 'SIDEWAYS' is not valid; use one of",
        ),
        (
            "rules:\n  - {literal: denies, category: NEGATED}\n",
            r"rules\[0\] \(literal 'denies'\): category 'NEGATED' sets no attribute",
        ),
        (
            "rules:\n  - {literal: s/p, category: HISTORICAL, max_scope: 0}\n",
            r"rules\[0\] \(literal 's/p'\): max_scope 0 is not a positive integer",
        ),
        (
            "rules:\n  - {literal: s/p, category: HISTORICAL, scope: 3}\n",
            r"rules\[0\] \(literal 's/p'\): unknown key\(s\) scope; allowed keys:",
        ),
        (
            "rules:\n  - {literal: no, category: NEGATED_EXISTENCE}\n",
            r"rules\[0\] \(literal False\): literal False is not text.*quote it",
        ),
        (
            "rules:\n  - {category: HISTORICAL}\n",
            r"rules\[0\]: literal is missing or empty",
        ),
        (
            "drop: [no such rule]\n",
            r"drop\[0\] \('no such rule'\): no medspaCy default rule has this literal",
        ),
        (
            "rules:\n  - {literal: today, category: CURRENT, direction: PSEUDO}\n",
            r"rules\[0\] \(literal 'today'\): category 'CURRENT' is named in no terminated_by",
        ),
        (
            "rules:\n  - {literal: today, category: CURRENT, direction: FORWARD}\n",
            r"rules\[0\] \(literal 'today'\): category 'CURRENT' sets no attribute",
        ),
        (
            "rules:\n  - {literal: x, category: HISTORICAL, pattern: '(unclosed'}\n",
            r"rules\[0\] \(literal 'x'\): pattern is not a valid regex",
        ),
        (
            "rules:\n  - {literal: x, category: [HISTORICAL]}\n",
            r"rules\[0\] \(literal 'x'\): category \['HISTORICAL'\] is not a list of two",
        ),
        (
            "rules:\n  - {literal: x, category: [HISTORICAL, NEGATED]}\n",
            r"rules\[0\] \(literal 'x'\): category .* is not a list of two or more different",
        ),
        ("rules: [\n", r"context.yaml: not valid YAML"),
        ("colour: blue\n", r"top level: unknown key\(s\) colour"),
    ],
)
def test_rules_file_errors_name_the_rule(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ContextRulesError, match=message) as info:
        load_context_rules(_rules_dir(tmp_path, text))
    assert str(tmp_path / "context.yaml") in str(info.value)


def test_missing_rules_file(tmp_path: Path) -> None:
    with pytest.raises(ContextRulesError, match="cannot read the ConText rules"):
        load_context_rules(tmp_path)


def test_project_rulesload_bench() -> None:
    rules = load_context_rules(NLP_DIR)
    literals = {r.literal for r in rules}
    assert "evaluate for" in literals  # re-added as POSSIBLE_EXISTENCE
    assert next(r for r in rules if r.literal == "evaluate for").category == "POSSIBLE_EXISTENCE"
    assert {"history of", "status post", "no increase"} <= literals


# --------------------------------------------------------------------------- corpus


@pytest.mark.corpus
def test_corpus_file_every_row_scored(corpus: Path, nlp: Any) -> None:
    path = corpus / E.CORPUS_FILE
    if not path.is_file():
        pytest.skip(f"corpus file missing: {path}")
    result, _ = E.evaluate(path, nlp=nlp)
    n_rows = sum(1 for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip())
    assert result["rows"] == n_rows
    assert result["scored"] + result["unfound"]["count"] == n_rows
    assert result["unfound"]["count"] < n_rows * 0.01
    for cat in E.CATEGORIES:
        m = result[cat]
        assert m is not None and m["n"] > 0
        assert m["f1"] is not None
    assert len(result["halves"]) == 2
    assert sum(h["rows"] for h in result["halves"]) == n_rows


def test_token_patterns_become_the_phrases_they_match() -> None:
    import spacy
    from medspacy.context import ConTextRule

    from fhirtwin.nlp_context import as_phrases

    nlp = spacy.blank("en")

    def tokenize(w: str) -> list[str]:
        return [t.lower_ for t in nlp.make_doc(w)]

    rule = ConTextRule(
        "status post",
        "HISTORICAL",
        pattern=[{"LOWER": {"IN": ["status", "s/p"]}}, {"LOWER": "post", "OP": "?"}],
        direction="FORWARD",
        max_scope=4,
    )
    out = as_phrases([rule], tokenize)
    # "s/p" is three tokens, so the token pattern never matched it: no phrase for it
    assert sorted(r.literal for r in out) == ["status", "status post"]
    assert all(r.max_scope == 4 and r.direction == "FORWARD" for r in out)
    never = ConTextRule("risks of", "HYPOTHETICAL", pattern=[{"LOWER": {"IN": ["risks of"]}}])
    assert as_phrases([never], tokenize) == []
    kept = ConTextRule(
        "no change", "PSEUDO_NEGATED_EXISTENCE", pattern=[{"LOWER": "no", "OP": "*"}]
    )
    assert as_phrases([kept], tokenize) == [kept]
    contraction = ConTextRule(
        "did not",
        "NEGATED_EXISTENCE",
        pattern=[{"LOWER": "did"}, {"LOWER": {"IN": ["not", "n't"]}}],
    )
    assert sorted(r.literal for r in as_phrases([contraction], tokenize)) == ["did n't", "did not"]


def test_split_is_deterministic_and_keeps_a_sentence_together(nlp: Any) -> None:
    # the same sentence with another target upper-cased, or other spacing, stays on its side
    assert E.split_of("No EDEMA or cyanosis.") == E.split_of("no edema or  CYANOSIS.")
    sides = {E.split_of(f"Sentence number {i}.") for i in range(40)}
    assert sides == {"dev", "test"}
    path = FIXTURES / "mini-negex.tsv"
    full, _ = E.evaluate(path, nlp=nlp)
    assert [s["name"] for s in full["splits"]] == ["dev", "test"]
    assert sum(s["rows"] for s in full["splits"]) == full["rows"]
    dev, dev_preds = E.evaluate(path, nlp=nlp, split="dev")
    test, _ = E.evaluate(path, nlp=nlp, split="test")
    assert dev["split"] == "dev" and dev["splits"] == []
    assert dev["rows"] + test["rows"] == full["rows"]
    assert all(E.split_of(p.row.sentence) == "dev" for p in dev_preds)
    for cat in ("negation", "historical"):
        d, t, a = dev[cat], test[cat], full[cat]
        assert (d["tp"] + t["tp"], d["fp"] + t["fp"], d["fn"] + t["fn"]) == _counts(a)
    with pytest.raises(ValueError, match="split"):
        E.evaluate(path, nlp=nlp, split="train")
