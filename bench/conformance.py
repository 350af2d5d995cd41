"""Score fhirtwin's HL7 v2 -> FHIR and C-CDA -> FHIR output against oracle Bundles, by meaning.

Usage (from the project root):
    .venv/bin/python bench/conformance.py --pairs ../shared/corpus/_index/oracle_pairs.csv \
        --root ../shared/corpus [--json OUT] [--kind all|hl7v2|ccda] [--only SUBSTRING] \
        [--show PAIRNAME] [--min-score PERCENT] [--against-expected] [--all-types]

Every kind is scored on its own (HL7 v2 and C-CDA figures are never mixed), then overall.

The comparison rules live in bench/_compare.py and are documented in docs/conformance.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import random
import signal
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
for _p in (str(BENCH_DIR), str(PROJECT_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _compare  # noqa: E402  (a sibling file, found through sys.path above)

DELIBERATE = _compare.DELIBERATE
DEFAULT_JSON = BENCH_DIR / "results" / "conformance.json"
WORST_N = 15
KINDS = _compare.KINDS  # the kinds of pairs this script can convert: hl7v2, ccda
KIND_TITLES = {"hl7v2": "HL7 v2", "ccda": "C-CDA"}

Converter = Callable[[bytes, dict[str, Any]], dict[str, Any]]


@dataclass
class Pair:
    """One row of the pairs file that is going to be scored."""

    name: str
    input: str
    expected: str
    label: str
    kind: str = "hl7v2"


@dataclass
class PairResult:
    """Outcome of one scored pair."""

    pair: Pair
    result: _compare.CompareResult
    error: str | None = None
    detail: list[str] = field(default_factory=list)
    # The same comparison with no DELIBERATE rule at all: the oracle taken at its word.
    raw: _compare.CompareResult | None = None

    def row(self) -> dict[str, Any]:
        """JSON form of this pair's result."""
        r = self.result
        return {
            "name": self.pair.name,
            "kind": self.pair.kind,
            "input": self.pair.input,
            "expected_output": self.pair.expected,
            "label": self.pair.label,
            "compared": r.compared,
            "agreed": r.agreed,
            "score": None if r.score is None else round(r.score, 2),
            "extra": r.extra,
            "extra_resources": dict(r.extra_resources),
            "excluded": r.excluded,
            "excluded_by_rule": dict(r.excluded_by_rule()),
            "error": self.error,
            "disagreements": [
                {"path": o.path, "where": o.where, "expected": o.expected, "actual": o.actual}
                for o in r.disagreements()
            ],
        }


# --------------------------------------------------------------------------------------------
# Pairs file
# --------------------------------------------------------------------------------------------


def read_pairs(
    path: Path, kind: str | Sequence[str], only: str | None
) -> tuple[list[Pair], list[str]]:
    """Rows of `kind` (one kind, or several) with a .json expected output, plus messages
    about skipped rows. Rows of a kind this script cannot convert are skipped silently
    when they were not asked for."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    pairs: list[Pair] = []
    skipped: list[str] = []
    seen: Counter[str] = Counter()
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            row_kind = row.get("kind") or ""
            if row_kind not in kinds:
                continue
            inp, exp = row.get("input", ""), row.get("expected_output", "")
            if only and only not in inp and only not in exp:
                continue
            if not exp.lower().endswith(".json"):
                skipped.append(
                    f"skipped {inp} -> {exp}: expected output is not a .json FHIR Bundle "
                    "(FHIR XML is not scored)"
                )
                continue
            name = Path(inp).name.rsplit(".", 1)[0]
            seen[name] += 1
            if seen[name] > 1:
                name = f"{name}~{seen[name]}"
            pairs.append(Pair(name, inp, exp, row.get("root_template_or_label", ""), row_kind))
    return pairs, skipped


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


class ConversionTimeout(Exception):
    """The converter took longer than --timeout seconds."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise ConversionTimeout after `seconds` (POSIX main thread only; else no limit)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        """Signal handler."""
        raise ConversionTimeout(f"conversion exceeded {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fhirtwin_converter() -> Converter:
    """The real converter: fhirtwin.conversion.convert_hl7v2(data, validate=False).bundle."""
    from fhirtwin.conversion import convert_hl7v2

    def convert(data: bytes, expected: dict[str, Any]) -> dict[str, Any]:
        """Convert one message and return its Bundle."""
        bundle = convert_hl7v2(data, validate=False).bundle
        if not isinstance(bundle, dict):
            raise TypeError(f"conv.bundle is {type(bundle).__name__}, not dict")
        return bundle

    return convert


def ccda_converter() -> Converter:
    """The C-CDA converter: fhirtwin.ccda.convert(data) -> one FHIR R4 Bundle."""
    from fhirtwin.ccda import convert as convert_ccda

    def convert(data: bytes, expected: dict[str, Any]) -> dict[str, Any]:
        """Convert one document and return its Bundle."""
        bundle = convert_ccda(data)
        if not isinstance(bundle, dict):
            raise TypeError(f"fhirtwin.ccda.convert returned {type(bundle).__name__}, not dict")
        return bundle

    return convert


def _rename_references(node: Any, renames: dict[str, str]) -> None:
    """Rewrite every Reference.reference found in `node` through `renames` (in place)."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in renames:
            node["reference"] = renames[ref]
        for value in node.values():
            _rename_references(value, renames)
    elif isinstance(node, list):
        for value in node:
            _rename_references(value, renames)


def expected_converter(data: bytes, expected: dict[str, Any]) -> dict[str, Any]:
    """Sanity baseline: the expected Bundle shuffled, with ids/fullUrls/references renamed."""
    bundle = copy.deepcopy(expected)
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    random.Random(0).shuffle(entries)
    renames: dict[str, str] = {}
    for n, entry in enumerate(entries):
        entry.pop("request", None)
        res = entry.get("resource")
        if isinstance(entry.get("fullUrl"), str):
            renames[entry["fullUrl"]] = f"urn:uuid:renamed-{n}"
        entry["fullUrl"] = f"urn:uuid:renamed-{n}"
        if isinstance(res, dict):
            renames[f"{res.get('resourceType')}/{res.get('id')}"] = f"urn:uuid:renamed-{n}"
            res["id"] = f"renamed-{n}"
    _rename_references(entries, renames)
    bundle["entry"] = entries
    return bundle


def failing_converter(message: str) -> Converter:
    """A converter that always fails (used when fhirtwin.conversion cannot be imported)."""

    def convert(data: bytes, expected: dict[str, Any]) -> dict[str, Any]:
        """Raise the import error."""
        raise RuntimeError(message)

    return convert


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def load_json(path: Path) -> Any:
    """JSON file, tolerating a UTF-8 BOM."""
    return json.loads(path.read_text(encoding="utf-8-sig"))


def score_pair(
    pair: Pair,
    root: Path,
    convert: Converter,
    timeout: int,
    types: Sequence[str] | None = None,
) -> PairResult:
    """Convert one input and compare; any failure becomes a failed pair (never raises).

    ``types`` None compares the default types of the pair's kind (_compare.default_types).
    """
    empty_bundle: dict[str, Any] = {"resourceType": "Bundle", "entry": []}

    def compare(actual: Any, data: bytes | None, **kw: Any) -> _compare.CompareResult:
        """compare_bundles for this pair's kind and types."""
        return _compare.compare_bundles(
            expected, actual, source=data, kind=pair.kind, types=types, **kw
        )

    try:
        expected = load_json(root / pair.expected)
    except Exception as exc:
        empty = _compare.CompareResult()
        return PairResult(pair, empty, f"cannot read expected output: {exc!r}")
    data: bytes | None = None
    try:
        data = (root / pair.input).read_bytes()
        with time_limit(timeout):
            actual = convert(data, expected)
    except Exception as exc:
        detail = traceback.format_exception_only(type(exc), exc)
        return PairResult(
            pair,
            compare(empty_bundle, data),
            f"{type(exc).__name__}: {exc}",
            detail,
            raw=compare(empty_bundle, data, rules=()),
        )
    try:
        return PairResult(pair, compare(actual, data), raw=compare(actual, data, rules=()))
    except Exception as exc:
        failed = compare(empty_bundle, data)
        message = f"comparison failed: {type(exc).__name__}: {exc}"
        return PairResult(pair, failed, message, raw=compare(empty_bundle, data, rules=()))


def overall(results: list[PairResult]) -> dict[str, Any]:
    """Totals across all pairs."""
    compared = sum(r.result.compared for r in results)
    agreed = sum(r.result.agreed for r in results)
    errors = sum(1 for r in results if r.error)
    return {
        "compared": compared,
        "agreed": agreed,
        "score": round(100.0 * agreed / compared, 2) if compared else None,
        "pairs_total": len(results),
        "pairs_converted": len(results) - errors,
        "errors": errors,
        "extra": sum(r.result.extra for r in results),
        "excluded": sum(r.result.excluded for r in results),
        "raw_agreed": sum((r.raw or r.result).agreed for r in results),
        "raw_compared": sum(
            (r.raw.compared if r.raw else r.result.compared + r.result.excluded) for r in results
        ),
    }


def worst_fields(results: list[PairResult], n: int = WORST_N) -> list[dict[str, Any]]:
    """Most frequent disagreeing field paths across pairs."""
    counts: Counter[str] = Counter()
    pairs_with: dict[str, set[str]] = {}
    for r in results:
        for o in r.result.disagreements():
            counts[o.path] += 1
            pairs_with.setdefault(o.path, set()).add(r.pair.name)
    return [{"path": p, "count": c, "pairs": len(pairs_with[p])} for p, c in counts.most_common(n)]


def _type_of(path: str) -> str:
    """The resource type a field path belongs to (``count:Observation`` → Observation)."""
    return path.removeprefix("count:").split(".", 1)[0]


def type_breakdown(results: list[PairResult]) -> list[dict[str, Any]]:
    """Compared, agreed and disagreeing fields per resource type, most disagreements first."""
    rows: dict[str, Counter[str]] = {}
    for r in results:
        for o in r.result.outcomes:
            if o.status in ("agree", "disagree"):
                rows.setdefault(_type_of(o.path), Counter())[o.status] += 1
    out = [
        {
            "type": t,
            "compared": c["agree"] + c["disagree"],
            "agreed": c["agree"],
            "disagreed": c["disagree"],
        }
        for t, c in rows.items()
    ]
    return sorted(out, key=lambda row: (-row["disagreed"], row["type"]))


def excluded_summary(results: list[PairResult], kind: str | None = None) -> list[dict[str, Any]]:
    """Each DELIBERATE rule (of one kind, or all) with the number of fields it excluded."""
    counts: Counter[str] = Counter()
    for r in results:
        counts.update(r.result.excluded_by_rule())
    return [
        {
            "rule": d.rule_id,
            "resource": d.resource,
            "path": d.path or "(whole resource)",
            "reason": d.reason,
            "ig_ref": d.ig_ref,
            "kinds": list(d.kinds),
            "fields_excluded": counts.get(d.rule_id, 0),
        }
        for d in DELIBERATE
        if kind is None or kind in d.kinds
    ]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt_score(score: float | None) -> str:
    """Score cell."""
    return "n/a" if score is None else f"{score:6.1f}"


def print_table(results: list[PairResult]) -> None:
    """Per-pair table sorted by score ascending (pairs with nothing compared last)."""
    ordered = sorted(
        results, key=lambda r: (r.result.score is None, r.result.score or 0.0, r.pair.name)
    )
    width = max([len(r.pair.name) for r in results] + [4])
    print(f"{'pair':<{width}}  compared  agreed  score%   extra  excluded  error")
    for r in ordered:
        res = r.result
        err = (r.error or "")[:60]
        print(
            f"{r.pair.name:<{width}}  {res.compared:8d}  {res.agreed:6d}  "
            f"{_fmt_score(res.score):>6}  {res.extra:6d}  {res.excluded:8d}  {err}"
        )


def _score_line(totals: dict[str, Any]) -> str:
    """'agreed / compared = score' of a totals dict."""
    score = "n/a" if totals["score"] is None else f"{totals['score']:.2f}%"
    return f"{totals['agreed']} agreed / {totals['compared']} compared = {score}"


def print_summary(
    totals: dict[str, Any],
    worst: list[dict[str, Any]],
    excluded: list[dict[str, Any]],
    by_type: list[dict[str, Any]] | None = None,
) -> None:
    """Overall numbers, worst fields and DELIBERATE exclusions (of one kind)."""
    print()
    print(
        f"pairs converted: {totals['pairs_converted']} / {totals['pairs_total']}"
        f"  (errors: {totals['errors']})"
    )
    print(
        f"overall: {_score_line(totals)}"
        f"  (extra leaves in actual: {totals['extra']}, excluded: {totals['excluded']})"
    )
    if totals.get("raw_compared"):
        raw = 100.0 * totals["raw_agreed"] / totals["raw_compared"]
        print(
            f"without any DELIBERATE exclusion: {totals['raw_agreed']} agreed / "
            f"{totals['raw_compared']} compared = {raw:.2f}%"
        )
    print(f"\nworst {len(worst)} disagreeing fields (count over all pairs, #pairs):")
    for w in worst:
        print(f"  {w['path']}: {w['count']}  ({w['pairs']} pairs)")
    if by_type:
        print("\ndisagreeing fields per resource type (disagreed / compared):")
        for row in by_type:
            if row["disagreed"]:
                print(f"  {row['type']}: {row['disagreed']} / {row['compared']}")
    print("\nexcluded by DELIBERATE rules (never counted as agreeing):")
    for e in excluded:
        print(f"  {e['rule']} {e['resource']}.{e['path']}: {e['fields_excluded']} fields")


def show_pair(results: list[PairResult], name: str) -> bool:
    """Print every disagreeing field of one pair; False when the pair is unknown."""
    hits = [r for r in results if r.pair.name == name] or [
        r for r in results if name in r.pair.name
    ]
    if len(hits) != 1:
        names = ", ".join(r.pair.name for r in hits) or "none"
        print(f"--show {name!r}: expected exactly one matching pair, found: {names}")
        return False
    r = hits[0]
    res = r.result
    print(f"\n== {r.pair.name}  ({r.pair.input})")
    print(
        f"compared {res.compared}, agreed {res.agreed}, score {_fmt_score(res.score).strip()}%,"
        f" extra {res.extra}, excluded {res.excluded}"
    )
    if r.error:
        print(f"error: {r.error}")
    for o in res.disagreements():
        print(f"  {o.where:<22} {o.path}\n      expected: {o.expected}\n      actual:   {o.actual}")
    for rule, n in sorted(res.excluded_by_rule().items()):
        print(f"  excluded by {rule}: {n} fields")
    if res.extra_resources:
        print(f"  extra resources in actual: {dict(res.extra_resources)}")
    return True


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", required=True, type=Path, help="pairs CSV (oracle_pairs.csv)")
    ap.add_argument("--root", required=True, type=Path, help="corpus folder the paths are in")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="JSON output file")
    ap.add_argument(
        "--kind",
        default="all",
        choices=("all", *KINDS),
        help="pairs kind to score (default all: every kind, each scored on its own)",
    )
    ap.add_argument("--only", help="only pairs whose input/expected path contains this")
    ap.add_argument("--show", metavar="PAIRNAME", help="print one pair's disagreeing fields")
    ap.add_argument(
        "--min-score", type=float, help="exit 1 if the score %% of any kind scored is below this"
    )
    ap.add_argument("--timeout", type=int, default=60, help="seconds per conversion (0=none)")
    ap.add_argument(
        "--against-expected",
        action="store_true",
        help="sanity check: score the (shuffled, renamed) expected bundles",
    )
    ap.add_argument(
        "--all-types",
        action="store_true",
        help="compare every specified resource type for every kind (HL7 v2 then also "
        "compares Practitioner, Organization, Location, Device and Consent)",
    )
    return ap.parse_args(argv)


def pick_converter(against_expected: bool, kind: str = "hl7v2") -> Converter:
    """The converter to score for one kind (fhirtwin, or the expected-bundle baseline).

    A converter that cannot be imported fails every pair of its kind with the import error.
    """
    if against_expected:
        return expected_converter
    module, factory = {
        "hl7v2": ("fhirtwin.conversion", fhirtwin_converter),
        "ccda": ("fhirtwin.ccda", ccda_converter),
    }[kind]
    try:
        return factory()
    except Exception as exc:
        message = f"cannot import {module}: {type(exc).__name__}: {exc}"
        print(message, file=sys.stderr)
        return failing_converter(message)


def kind_report(results: list[PairResult], kind: str) -> dict[str, Any]:
    """Totals, worst fields and exclusions of the pairs of one kind."""
    mine = [r for r in results if r.pair.kind == kind]
    return {
        "overall": overall(mine),
        "worst_fields": worst_fields(mine),
        "by_type": type_breakdown(mine),
        "excluded": excluded_summary(mine, kind),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the process exit code."""
    args = parse_args(argv)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    pairs, skipped = read_pairs(args.pairs, kinds, args.only)
    for msg in skipped:
        print(msg)
    scored = [k for k in kinds if any(p.kind == k for p in pairs)]
    converters = {k: pick_converter(args.against_expected, k) for k in scored}
    types = tuple(_compare.SPECS) if args.all_types else None
    results = [score_pair(p, args.root, converters[p.kind], args.timeout, types) for p in pairs]
    for r in results:
        if r.error:
            print(f"ERROR {r.pair.name}: {r.error}", file=sys.stderr)
    by_kind = {k: kind_report(results, k) for k in scored}
    for k in scored:
        title = KIND_TITLES.get(k, k)
        print(f"\n==== {title} (kind {k}) " + "=" * max(0, 70 - len(title) - len(k)))
        print_table([r for r in results if r.pair.kind == k])
        report = by_kind[k]
        print_summary(
            report["overall"], report["worst_fields"], report["excluded"], report["by_type"]
        )
    totals = overall(results)
    print("\n==== scores by kind (never mixed) " + "=" * 45)
    for k in scored:
        t = by_kind[k]["overall"]
        print(
            f"  {KIND_TITLES.get(k, k):<7} {_score_line(t)}"
            f"  ({t['pairs_converted']}/{t['pairs_total']} pairs converted)"
        )
    if len(scored) > 1:
        print(f"  {'all':<7} {_score_line(totals)}  (fields summed over every kind)")
    out = {
        "kinds": scored,
        "all_types": args.all_types,
        "pairs": [r.row() for r in results],
        "skipped": skipped,
        "overall": totals,
        "by_kind": by_kind,
        "worst_fields": worst_fields(results),
        "excluded": excluded_summary(results),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nwrote {args.json}")
    if args.show and not show_pair(results, args.show):
        return 2
    if args.min_score is not None:
        low = [
            (k, by_kind[k]["overall"]["score"])
            for k in scored
            if (by_kind[k]["overall"]["score"] or 0.0) < args.min_score
        ]
        for k, score in low:
            print(f"{KIND_TITLES.get(k, k)} score {score} < --min-score {args.min_score}")
        if low or not scored:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
