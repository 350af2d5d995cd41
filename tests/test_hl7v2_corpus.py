"""Every HL7 v2 message of the shared corpus converts to valid FHIR R4, and stays as close
to the oracle pairs as it is today (a floor that only moves up)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from fhirtwin.conversion import convert_hl7v2
from fhirtwin.hl7v2 import split_batch

ROOT = Path(__file__).resolve().parent.parent
# Overall field agreement with the oracle pairs (bench/conformance.py), in percent.
# Raise it when the score improves; never lower it to make a change pass.
CONFORMANCE_FLOOR = 98.1


def _messages(corpus: Path) -> list[tuple[str, bytes]]:
    files = sorted(corpus.glob("**/*.hl7"))
    files += sorted((corpus / "hl7-v2-to-fhir/samples/messages").glob("*.txt"))
    out = []
    for f in files:
        for i, m in enumerate(split_batch(f.read_bytes())):
            out.append((f"{f.relative_to(corpus)}#{i + 1}", m))
    return out


def test_corpus_has_the_expected_mix(corpus: Path) -> None:
    msgs = _messages(corpus)
    assert len(msgs) >= 100, f"only {len(msgs)} HL7 v2 messages found under {corpus}"


def test_every_corpus_message_converts_to_valid_r4(corpus: Path) -> None:
    failures = []
    for name, data in _messages(corpus):
        try:
            conv = convert_hl7v2(data, validate=True)
        except Exception as exc:  # the test reports every message, not the first
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        problems = conv.report["validation"]
        if problems:
            failures.append(f"{name}: {len(problems)} R4 problems, first {problems[0]}")
        if not conv.bundle["entry"]:
            failures.append(f"{name}: empty Bundle")
    assert not failures, f"{len(failures)} messages failed:\n" + "\n".join(failures[:40])


def test_conformance_with_oracle_pairs_keeps_its_floor(corpus: Path) -> None:
    spec = importlib.util.spec_from_file_location("_compare", ROOT / "bench" / "_compare.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_compare"] = mod
    spec.loader.exec_module(mod)
    import csv

    compared = agreed = 0
    with (corpus / "_index" / "oracle_pairs.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["kind"] != "hl7v2" or not row["expected_output"].endswith(".json"):
                continue
            import json

            expected = json.loads((corpus / row["expected_output"]).read_text())
            data = (corpus / row["input"]).read_bytes()
            try:
                actual = convert_hl7v2(data).bundle
            except Exception:  # a failed conversion scores zero on every expected field
                actual = {"resourceType": "Bundle", "entry": []}
            result = mod.compare_bundles(expected, actual, source=data)
            compared += result.compared
            agreed += result.agreed
    score = 100.0 * agreed / compared
    assert score >= CONFORMANCE_FLOOR, (
        f"conformance fell to {score:.2f}% (floor {CONFORMANCE_FLOOR}%)"
    )


def test_comparison_finds_no_difference_between_an_oracle_and_itself(
    corpus: Path, tmp_path: Path
) -> None:
    """Shuffled, renamed copies of every expected Bundle must score 100 %, exclusions included:
    otherwise the conformance score measures the comparison, not the converter."""
    import subprocess

    res = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "conformance.py"),
            "--pairs", str(corpus / "_index" / "oracle_pairs.csv"), "--root", str(corpus),
            "--against-expected", "--min-score", "100", "--json", str(tmp_path / "self.json"),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
