"""Score the pipeline's ConText assertions on a NegEx/ConText annotation file.

Usage (from the project root):
    .venv/bin/python bench/negex_eval.py [PATH] [--rules ours|medspacy-default|DIR] \\
        [--json OUT] [--split dev|test|all] [--errors N] [--errors-from dev|test|...]

PATH is a NegEx-format annotation file: one (condition, sentence) pair per tab-separated
row, the condition written in upper case inside the sentence, with gold labels for
negation (Negated/Affirmed), temporality (Recent/Historical/"Not particular", i.e.
hypothetical) and experiencer (Patient/Family member/Other). Default: the main gold set of
the shared corpus, ``negex-chapmanbe/rsAnnotations-1-120-random.txt`` (``$FHIRTWIN_CORPUS``,
else ``../shared/corpus``). Column layouts are detected from the header:

* NegEx/ConText: line number, Condition, sentence, negation, temporality, experiencer;
* genConText: number, note, phrase, sentence, negation, temporality, experiencer;
* NegEx only: Report No., Concept, Sentence, Negation (only negation is scored).

Files without a header are recognised by their column count (7 = genConText, 6 =
NegEx/ConText, 4 = number, concept, sentence and one label column, told apart by its values).

Method. For each row the condition is located in the sentence (case-insensitive, any run of
white space between its words; an upper-case occurrence is preferred, then one that is not a
``TITLE:`` heading). That character range becomes the only entity of a ``spacy.blank("en")``
doc (label ``CONDITION``), which goes through the rule ``sentencizer`` and medspaCy ConText
(``fhirtwin.nlp_context.add_context``) exactly as in the note pipeline. Predictions: negation
= ``_.is_negated``, historical = ``_.is_historical``, hypothetical = ``_.is_hypothetical``,
experiencer = ``_.is_family``. Positive gold classes: Negated; Historical; Not particular
(or hypothetical); any experiencer but Patient. Rows whose condition cannot be found in the
sentence (sentence-splitter mistakes in the gold set) are not scored; they are counted and
listed. ``n`` is the number of gold positives among the scored rows.

The table gives precision, recall and F1 per category for all scored rows and for the two
halves of the file (by report number if the file has a report column, else by row order), so
that rules tuned on the first half can be checked on the second. Goals (reported, not
asserted): negation F1 >= 0.96, historical >= 0.80, hypothetical >= 0.90. The exit code is 0
unless the bench itself broke.

Dev / test split. Every row is also put in ``dev`` or ``test`` by a hash of its sentence
(SHA-256 of the sentence case-folded with white space collapsed; low bit of the first
byte: 0 = dev, 1 = test). The split is deterministic, does not depend on row order, and
keeps every row of one sentence (several targets of one sentence, whose upper-casing
differs) on the same side. Rules are developed on ``dev`` only (``--errors`` lists dev
errors by default); ``test`` is the held-out check. ``--split dev|test`` scores only that
side; ``--split all`` (the default) scores every row and adds the dev and test figures.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

DEFAULT_JSON = BENCH_DIR / "results" / "negex_eval.json"
CORPUS_FILE = "negex-chapmanbe/rsAnnotations-1-120-random.txt"
TARGET_LABEL = "CONDITION"

CATEGORIES = ("negation", "historical", "hypothetical", "experiencer")
ATTRIBUTE = {
    "negation": "is_negated",
    "historical": "is_historical",
    "hypothetical": "is_hypothetical",
    "experiencer": "is_family",
}
GOALS: dict[str, float | None] = {
    "negation": 0.96,
    "historical": 0.80,
    "hypothetical": 0.90,
    "experiencer": None,
}


class AnnotationFormatError(ValueError):
    """The annotation file is not in a NegEx/ConText layout we know."""


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Row:
    """One annotated (condition, sentence) pair."""

    position: int  # 1-based position among the data rows of the file
    line: int  # line number in the file
    row_id: str  # the file's own number column
    report: str | None
    condition: str
    sentence: str
    gold: dict[str, bool]  # only the categories this file annotates


@dataclass(frozen=True)
class AnnotationFile:
    path: Path
    layout: str
    has_report: bool
    categories: tuple[str, ...]
    rows: list[Row]


_LAYOUTS: dict[int, tuple[str, tuple[str, ...]]] = {
    7: (
        "genConText",
        ("id", "note", "condition", "sentence", "negation", "temporality", "experiencer"),
    ),
    6: ("NegEx/ConText", ("id", "condition", "sentence", "negation", "temporality", "experiencer")),
}


def _header_role(name: str) -> str | None:
    n = name.strip().lower()
    if "report" in n:
        return "report"
    if "sentence" in n:
        return "sentence"
    if "negation" in n or n.startswith("negated"):
        return "negation"
    if "temporal" in n:
        return "temporality"
    if "experiencer" in n:
        return "experiencer"
    if any(w in n for w in ("condition", "concept", "phrase", "target")):
        return "condition"
    if n == "note" or n.startswith("note "):
        return "note"
    if any(w in n for w in ("number", "line", "id", "no.", "#")):
        return "id"
    return None


def _is_header(cells: Sequence[str]) -> bool:
    return not cells[0].strip().lstrip("#").strip().isdigit()


def _label_kind(values: Iterable[str]) -> str:
    """negation / temporality / experiencer, from the values of a label column."""
    seen = {v.strip().lower() for v in values if v.strip()}
    for kind in ("negation", "temporality", "experiencer"):
        if seen and all(_parse_label(kind, v) is not None for v in seen):
            return kind
    raise AnnotationFormatError(f"cannot tell what the label column holds: {sorted(seen)[:6]}")


def _parse_label(kind: str, value: str) -> dict[str, bool] | None:
    """The gold categories one label value sets, or None if the value is not a label."""
    v = value.strip().lower()
    if kind == "negation":
        if v.startswith("negated") or v == "negative":
            return {"negation": True}
        if v.startswith("affirmed") or v.startswith("possible"):
            return {"negation": False}
        return None
    if kind == "temporality":
        if v.startswith("historical"):
            return {"historical": True, "hypothetical": False}
        if v in ("not particular", "hypothetical") or v.startswith("not particular"):
            return {"historical": False, "hypothetical": True}
        if v.startswith("recent"):
            return {"historical": False, "hypothetical": False}
        return None
    if kind == "experiencer":
        if v == "patient":
            return {"experiencer": False}
        if v and v not in ("affirmed", "negated", "recent", "historical"):
            return {"experiencer": True}
        return None
    return None


def _unquote(cell: str) -> str:
    c = cell.strip("\r\n")
    if len(c) >= 2 and c[0] == c[-1] == '"':
        c = c[1:-1].replace('""', '"')
    return c


def read_annotations(path: Path) -> AnnotationFile:
    """Parse a NegEx/ConText annotation file (layout detected from the header)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [
        (i + 1, row)
        for i, row in enumerate(
            csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
        )
        if any(c.strip() for c in row)
    ]
    if not lines:
        raise AnnotationFormatError(f"{path}: no rows")
    first = lines[0][1]
    if _is_header(first):
        roles = [_header_role(c) for c in first]
        layout = "header: " + " | ".join(c.strip() for c in first)
        lines = lines[1:]
        # a bare "number" column after a "report" column is the row number
    else:
        width = len(first)
        if width in _LAYOUTS:
            layout, names = _LAYOUTS[width]
            roles = list(names)
        elif width == 4:
            kind = _label_kind(row[3] for _, row in lines if len(row) == 4)
            layout = f"number, concept, sentence, {kind}"
            roles = ["id", "condition", "sentence", kind]
        else:
            raise AnnotationFormatError(
                f"{path}: no header and {width} columns; expected 7 (genConText), 6 "
                "(NegEx/ConText) or 4 (NegEx), or a header naming the columns"
            )
    for needed in ("condition", "sentence"):
        if needed not in roles:
            raise AnnotationFormatError(f"{path}: no {needed} column found (columns: {roles})")
    labels = [r for r in ("negation", "temporality", "experiencer") if r in roles]
    if not labels:
        raise AnnotationFormatError(f"{path}: no label column (negation/temporality/experiencer)")
    col = {role: roles.index(role) for role in set(roles) if role is not None}

    categories: list[str] = []
    if "negation" in labels:
        categories.append("negation")
    if "temporality" in labels:
        categories += ["historical", "hypothetical"]
    if "experiencer" in labels:
        categories.append("experiencer")

    rows: list[Row] = []
    for position, (line_no, cells) in enumerate(lines, start=1):
        if len(cells) < len(roles):
            raise AnnotationFormatError(
                f"{path}:{line_no}: {len(cells)} columns, expected {len(roles)}"
            )
        gold: dict[str, bool] = {}
        for kind in labels:
            value = _unquote(cells[col[kind]])
            parsed = _parse_label(kind, value)
            if parsed is None:
                raise AnnotationFormatError(f"{path}:{line_no}: unknown {kind} label {value!r}")
            gold.update(parsed)
        rows.append(
            Row(
                position=position,
                line=line_no,
                row_id=_unquote(cells[col["id"]]).strip() if "id" in col else str(position),
                report=_unquote(cells[col["report"]]).strip() if "report" in col else None,
                condition=_unquote(cells[col["condition"]]),
                sentence=_unquote(cells[col["sentence"]]),
                gold=gold,
            )
        )
    return AnnotationFile(path, layout, "report" in col, tuple(categories), rows)


# --------------------------------------------------------------------------- split

SPLITS = ("dev", "test")


def split_of(sentence: str) -> str:
    """``dev`` or ``test``: a deterministic hash of the sentence (case and spacing ignored)."""
    key = " ".join(sentence.casefold().split()).encode("utf-8")
    return SPLITS[hashlib.sha256(key).digest()[0] & 1]


# --------------------------------------------------------------------------- target


def locate(condition: str, sentence: str) -> tuple[int, int] | None:
    """Character range of ``condition`` in ``sentence``, or None if it is not there.

    Case-insensitive, any run of white space between words. If it occurs more than once,
    prefer an upper-case occurrence (the NegEx kit marks the target by upper-casing it),
    then one not followed by a colon (a section title such as ``ALLERGIES:``), then the first.
    """
    words = condition.split()
    if not words:
        return None
    body = r"\s+".join(re.escape(w) for w in words)
    for pattern in (rf"(?<![A-Za-z0-9]){body}(?![A-Za-z0-9])", body):
        found = list(re.finditer(pattern, sentence, flags=re.IGNORECASE))
        if found:
            break
    else:
        return None

    def rank(m: re.Match[str]) -> tuple[int, int, int]:
        text = m.group(0)
        upper = any(ch.isalpha() for ch in text) and text == text.upper()
        title = bool(re.match(r"\s*:", sentence[m.end() :]))
        return (0 if upper else 1, 1 if title else 0, m.start())

    best = min(found, key=rank)
    return best.start(), best.end()


# --------------------------------------------------------------------------- pipeline


def build_nlp(rules: str) -> Any:
    """blank English + rule sentencizer + ConText with ``rules``.

    ``rules``: ``ours`` (the project's ``nlp/``), ``medspacy-default`` (medspaCy's bundled
    English rules, unchanged) or a directory holding a ``context.yaml``.
    """
    import spacy

    from fhirtwin.nlp_context import add_context

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    if rules == "medspacy-default":
        add_context(nlp, None)
    else:
        add_context(nlp, PROJECT_ROOT / "nlp" if rules == "ours" else Path(rules))
    return nlp


@dataclass
class Prediction:
    row: Row
    span: tuple[int, int] | None
    predicted: dict[str, bool] = field(default_factory=dict)
    modifiers: list[str] = field(default_factory=list)


def predict(nlp: Any, rows: Sequence[Row]) -> list[Prediction]:
    """Run ConText on every row's condition span."""
    out: list[Prediction] = []
    for row in rows:
        span = locate(row.condition, row.sentence)
        pred = Prediction(row, span)
        out.append(pred)
        if span is None:
            continue
        doc = nlp.make_doc(row.sentence)
        ent = doc.char_span(span[0], span[1], label=TARGET_LABEL, alignment_mode="expand")
        if ent is None:  # cannot happen with "expand" on a non-empty range, but be safe
            pred.span = None
            continue
        doc.ents = [ent]
        for _, proc in nlp.pipeline:
            doc = proc(doc)
        target = doc.ents[0]
        pred.predicted = {c: bool(getattr(target._, ATTRIBUTE[c])) for c in CATEGORIES}
        pred.modifiers = [
            f"{m.category}:{doc[m.modifier_span[0] : m.modifier_span[1]].text!r}"
            for m in target._.modifiers
        ]
    return out


# --------------------------------------------------------------------------- scoring


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fn

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / self.n if self.n else None

    @property
    def f1(self) -> float | None:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else None

    def add(self, gold: bool, predicted: bool) -> None:
        if gold and predicted:
            self.tp += 1
        elif predicted:
            self.fp += 1
        elif gold:
            self.fn += 1
        else:
            self.tn += 1


def score(preds: Iterable[Prediction], categories: Sequence[str]) -> dict[str, Counts]:
    """Confusion counts per category over the predictions whose target was found."""
    counts = {c: Counts() for c in categories}
    for p in preds:
        if p.span is None:
            continue
        for c in categories:
            counts[c].add(p.row.gold[c], p.predicted[c])
    return counts


def halves(ann: AnnotationFile, preds: Sequence[Prediction]) -> list[tuple[str, list[Prediction]]]:
    """The two halves: by report number if the file has one, else by row order."""
    if ann.has_report:

        def key(r: str) -> tuple[int, int | str]:
            return (0, int(r)) if r.isdigit() else (1, r)

        reports = sorted({p.row.report or "" for p in preds}, key=key)
        cut = math.ceil(len(reports) / 2)
        first = set(reports[:cut])
        if not reports:
            return []
        names = (
            f"reports {reports[0]}-{reports[cut - 1]}",
            f"reports {reports[cut]}-{reports[-1]}" if cut < len(reports) else "reports -",
        )
        a = [p for p in preds if (p.row.report or "") in first]
        b = [p for p in preds if (p.row.report or "") not in first]
        return [(names[0], a), (names[1], b)]
    cut = math.ceil(len(preds) / 2)
    return [
        (f"rows 1-{cut}", list(preds[:cut])),
        (f"rows {cut + 1}-{len(preds)}", list(preds[cut:])),
    ]


def metrics(c: Counts, goal: float | None) -> dict[str, Any]:
    f1 = c.f1
    return {
        "precision": _r(c.precision),
        "recall": _r(c.recall),
        "f1": _r(f1),
        "n": c.n,
        "tp": c.tp,
        "fp": c.fp,
        "fn": c.fn,
        "tn": c.tn,
        "goal_f1": goal,
        "pass": None if goal is None else (f1 is not None and round(f1, 3) >= goal),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def evaluate(
    path: Path, rules: str = "ours", nlp: Any = None, split: str = "all"
) -> tuple[dict[str, Any], list[Prediction]]:
    """Score ``path`` with ``rules``; the result dict is what ``--json`` writes.

    ``split``: ``all`` rows, or only the ``dev`` or ``test`` side (see ``split_of``); the
    predictions returned are those of the rows scored.
    """
    if split not in ("all", *SPLITS):
        raise ValueError(f"split must be all, dev or test, not {split!r}")
    t0 = time.perf_counter()
    ann = read_annotations(path)
    if split != "all":
        ann = AnnotationFile(
            ann.path,
            ann.layout,
            ann.has_report,
            ann.categories,
            [r for r in ann.rows if split_of(r.sentence) == split],
        )
    if nlp is None:
        nlp = build_nlp(rules)
    preds = predict(nlp, ann.rows)
    unfound = [p.row for p in preds if p.span is None]
    result: dict[str, Any] = {
        "file": str(path),
        "layout": ann.layout,
        "rules": rules,
        "split": split,
        "rows": len(ann.rows),
        "scored": len(ann.rows) - len(unfound),
        "unfound": {
            "count": len(unfound),
            "rows": [{"id": r.row_id, "line": r.line, "condition": r.condition} for r in unfound],
        },
    }
    total = score(preds, ann.categories)
    for c in CATEGORIES:
        result[c] = metrics(total[c], GOALS[c]) if c in total else None
    result["splits"] = []
    if split == "all":
        for name in SPLITS:
            part = [p for p in preds if split_of(p.row.sentence) == name]
            counts = score(part, ann.categories)
            entry: dict[str, Any] = {"name": name, "rows": len(part)}
            for c in CATEGORIES:
                entry[c] = metrics(counts[c], GOALS[c]) if c in counts else None
            result["splits"].append(entry)
    result["halves"] = []
    for name, part in halves(ann, preds):
        counts = score(part, ann.categories)
        entry = {"name": name, "rows": len(part)}
        for c in CATEGORIES:
            entry[c] = metrics(counts[c], GOALS[c]) if c in counts else None
        result["halves"].append(entry)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result, preds


# --------------------------------------------------------------------------- report


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(result: dict[str, Any]) -> str:
    lines = [
        f"file:   {result['file']}",
        f"layout: {result['layout']}",
        f"rules:  {result['rules']}",
        f"split:  {result.get('split', 'all')}",
        f"rows:   {result['rows']}, scored {result['scored']}, condition not found in the "
        f"sentence: {result['unfound']['count']}"
        + (
            " (ids "
            + ", ".join(u["id"] for u in result["unfound"]["rows"][:12])
            + (" ..." if result["unfound"]["count"] > 12 else "")
            + ")"
            if result["unfound"]["count"]
            else ""
        ),
        "",
        f"{'subset':<18} {'category':<13} {'n':>5} {'TP':>5} {'FP':>5} {'FN':>5} "
        f"{'prec':>6} {'recall':>6} {'F1':>6} {'goal':>6}  result",
    ]
    subsets = (
        [(result.get("split", "all"), result)]
        + [(h["name"], h) for h in result.get("splits", [])]
        + [(h["name"], h) for h in result["halves"]]
    )
    for name, sub in subsets:
        lines.append("-" * 92)
        for c in CATEGORIES:
            m = sub.get(c)
            if m is None:
                lines.append(f"{name:<18} {c:<13} {'not annotated in this file':>40}")
                continue
            goal = m["goal_f1"]
            verdict = "" if goal is None else ("PASS" if m["pass"] else "FAIL")
            lines.append(
                f"{name:<18} {c:<13} {m['n']:>5} {m['tp']:>5} {m['fp']:>5} {m['fn']:>5} "
                f"{_fmt(m['precision']):>6} {_fmt(m['recall']):>6} {_fmt(m['f1']):>6} "
                f"{'-' if goal is None else f'>={goal:.2f}':>6}  {verdict}"
            )
    lines.append(f"\n{result['seconds']:.2f} s")
    return "\n".join(lines)


def errors(preds: Sequence[Prediction], which: Sequence[Prediction], limit: int) -> str:
    """Up to ``limit`` false positives and negatives per category among ``which``."""
    del preds
    out: list[str] = []
    for c in CATEGORIES:
        for kind, want_gold in (("FN", True), ("FP", False)):
            shown = 0
            for p in which:
                if p.span is None or c not in p.row.gold:
                    continue
                if p.row.gold[c] == want_gold and p.predicted[c] != want_gold:
                    if shown == 0:
                        out.append(f"\n== {c} {kind}")
                    shown += 1
                    if shown > limit:
                        break
                    s, e = p.span
                    sent = p.row.sentence
                    out.append(
                        f"[{p.row.row_id}] {sent[max(0, s - 160) : s]}[[{sent[s:e]}]]"
                        f"{sent[e : e + 80]}  <- {', '.join(p.modifiers) or 'no modifiers'}"
                    )
    return "\n".join(out)


def default_path() -> Path:
    env = os.environ.get("FHIRTWIN_CORPUS")
    corpus = Path(env) if env else (PROJECT_ROOT / ".." / "shared" / "corpus").resolve()
    return corpus / CORPUS_FILE


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("path", nargs="?", type=Path, default=None, help="annotation file")
    ap.add_argument(
        "--rules",
        default="ours",
        help="ours (nlp/context.yaml, default), medspacy-default, or a folder with context.yaml",
    )
    ap.add_argument("--json", type=Path, default=None, help=f"JSON output (default {DEFAULT_JSON})")
    ap.add_argument(
        "--split",
        choices=("all", *SPLITS),
        default="all",
        help="score all rows (default, with dev and test figures too), or only the dev or "
        "test side (a hash of each sentence; develop rules on dev, check on test)",
    )
    ap.add_argument("--errors", type=int, default=0, help="show up to N errors per category")
    ap.add_argument(
        "--errors-from",
        choices=("dev", "test", "all", "first", "second"),
        default="dev",
        help="which rows the errors are taken from, among those scored: the dev or test side, "
        "all, or the first or second half (default dev: tune on it, check on test)",
    )
    args = ap.parse_args(argv)
    path: Path = args.path or default_path()
    if not path.is_file():
        print(f"annotation file not found: {path}", file=sys.stderr)
        return 2
    result, preds = evaluate(path, args.rules, split=args.split)
    print(table(result))
    if args.errors:
        which: list[Prediction] = list(preds)
        if args.errors_from in SPLITS:
            which = [p for p in preds if split_of(p.row.sentence) == args.errors_from]
        elif args.errors_from in ("first", "second"):
            ann = read_annotations(path)
            parts = halves(ann, preds)
            if parts:
                which = parts[0 if args.errors_from == "first" else 1][1]
        print(errors(preds, which, args.errors))
    out: Path = args.json or (
        DEFAULT_JSON
        if args.rules == "ours"
        else DEFAULT_JSON.with_name(f"negex_eval-{Path(args.rules).name}.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
