"""The clinical concept lexicon: coded terms for the rule-based note pipeline.

The lexicon is data: ``nlp/lexicon/*.yaml``, one file per category (see
``nlp/lexicon/README.md`` for the format). :func:`load_lexicon` reads and validates
it (known categories and code systems, code formats and check digits, unique ids,
no term claimed by two concepts) and :func:`target_rules` turns it into medspaCy
``TargetRule`` objects, one per term or token pattern, each carrying its
:class:`Concept` in ``metadata["concept"]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fhirtwin import yamlfile

if TYPE_CHECKING:
    from medspacy.ner import TargetRule

__all__ = [
    "CATEGORIES",
    "CODE_SYSTEMS",
    "Concept",
    "LexiconError",
    "load_lexicon",
    "loinc_check_ok",
    "normalize_term",
    "target_rules",
    "verhoeff_ok",
]

CODE_SYSTEMS: dict[str, str] = {
    "snomed": "http://snomed.info/sct",
    "icd10cm": "http://hl7.org/fhir/sid/icd-10-cm",
    "rxnorm": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "loinc": "http://loinc.org",
}
"""Code-system key used in the YAML files → FHIR ``Coding.system`` URI."""

CATEGORIES: tuple[str, ...] = ("condition", "finding", "medication", "procedure", "allergen")
"""Known concept categories; a rule's category is the upper-cased name (``CONDITION``, ...)."""

# Order of codings in Concept.codings(): SNOMED first, then the rest.
_SYSTEM_ORDER = ("snomed", "icd10cm", "rxnorm", "loinc")

_CONCEPT_KEYS = frozenset({"id", "display", "category", "codes", "terms", "pattern"})
_FILE_KEYS = frozenset({"category", "concepts"})
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_SNOMED_RE = re.compile(r"^[1-9][0-9]{5,17}$")
_ICD10CM_RE = re.compile(r"^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$")
_RXNORM_RE = re.compile(r"^[1-9][0-9]{0,9}$")
_LOINC_RE = re.compile(r"^[1-9][0-9]{0,6}-[0-9]$")

TokenPattern = list[dict[str, Any]]


class LexiconError(Exception):
    """A lexicon file is malformed; the message names the file, the concept and the fix."""


@dataclass(frozen=True)
class Concept:
    """One coded clinical concept.

    ``codes`` is a tuple of ``(system key, code)`` pairs, keys from :data:`CODE_SYSTEMS`.
    ``terms`` (lower-case phrases) and ``patterns`` (spaCy token patterns) are how the
    concept is found in text; they take no part in equality or hashing.
    """

    id: str
    display: str
    category: str
    codes: tuple[tuple[str, str], ...]
    terms: tuple[str, ...] = field(default=(), compare=False)
    patterns: tuple[TokenPattern, ...] = field(default=(), compare=False, repr=False)

    def code(self, system: str) -> str | None:
        """The code in ``system`` (a key of :data:`CODE_SYSTEMS`), or ``None``."""
        for key, value in self.codes:
            if key == system:
                return value
        return None

    def codings(self) -> list[dict[str, str]]:
        """FHIR ``Coding`` dicts, SNOMED CT first; each carries the concept's display."""
        ordered = sorted(
            self.codes,
            key=lambda kc: _SYSTEM_ORDER.index(kc[0]) if kc[0] in _SYSTEM_ORDER else 99,
        )
        return [
            {"system": CODE_SYSTEMS[key], "code": value, "display": self.display}
            for key, value in ordered
        ]


# --- check digits ---------------------------------------------------------------------

_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def verhoeff_ok(digits: str) -> bool:
    """True if ``digits`` (check digit last) passes the Verhoeff check, as SNOMED CT ids do."""
    if not digits.isascii() or not digits.isdigit():
        return False
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _VERHOEFF_D[c][_VERHOEFF_P[i % 8][int(ch)]]
    return c == 0


def loinc_check_ok(code: str) -> bool:
    """True if a LOINC code ``NNNNN-C`` has the right mod-10 (Luhn-style) check digit."""
    if not _LOINC_RE.match(code):
        return False
    body, check = code.split("-")
    total = 0
    # Double every second digit counting from the right-most digit of the body.
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d = d // 10 + d % 10
        total += d
    return (10 - total % 10) % 10 == int(check)


def _code_problem(system: str, code: str) -> str | None:
    """What is wrong with ``code`` in ``system``, or ``None`` if it is well-formed."""
    if system == "snomed":
        if not _SNOMED_RE.match(code):
            return "is not a SNOMED CT id (6-18 digits, no leading zero)"
        if code[-3:-1] not in ("00", "10"):
            return (
                f"has partition id {code[-3:-1]!r}, not a concept id (concept partitions are "
                "'00' and '10'; is this a description or relationship id?)"
            )
        if not verhoeff_ok(code):
            return "fails the SNOMED CT Verhoeff check digit (a typo?)"
        return None
    if system == "icd10cm":
        if not _ICD10CM_RE.match(code):
            return "is not an ICD-10-CM code (letter, 2 digits, optional '.' and 1-4 characters)"
        return None
    if system == "rxnorm":
        if not _RXNORM_RE.match(code):
            return "is not an RxNorm RXCUI (digits only)"
        return None
    if system == "loinc":
        if not _LOINC_RE.match(code):
            return "is not a LOINC code (digits, '-', check digit)"
        if not loinc_check_ok(code):
            return "fails the LOINC mod-10 check digit (a typo?)"
        return None
    return "uses an unknown code system"  # pragma: no cover - keys are checked first


# --- loading --------------------------------------------------------------------------


def normalize_term(term: str) -> str:
    """A term as matched and compared: lower case, single spaces, trimmed."""
    return " ".join(term.lower().split())


def _where(path: Path, index: int, cid: object) -> str:
    ident = f" (id {cid!r})" if isinstance(cid, str) and cid else ""
    return f"{path}: concept #{index}{ident}"


def _parse_pattern(raw: object, where: str) -> tuple[TokenPattern, ...]:
    """``pattern:`` is one token pattern (list of dicts) or a list of them."""

    def one(p: object) -> TokenPattern:
        if (
            not isinstance(p, list)
            or not p
            or not all(isinstance(t, dict) and t and all(isinstance(k, str) for k in t) for t in p)
        ):
            raise LexiconError(
                f"{where}: 'pattern' must be a spaCy token pattern, a non-empty list of "
                'non-empty mappings such as [{"TEXT": "MS"}], or a list of such patterns'
            )
        return [dict(t) for t in p]

    if isinstance(raw, list) and raw and all(isinstance(p, list) for p in raw):
        return tuple(one(p) for p in raw)
    return (one(raw),)


def _parse_concept(raw: object, index: int, path: Path, default_category: str | None) -> Concept:
    if not isinstance(raw, dict):
        raise LexiconError(
            f"{path}: concept #{index} is a {type(raw).__name__}, not a mapping; write it as "
            "'- id: ...' with display, codes and terms keys"
        )
    cid = raw.get("id")
    where = _where(path, index, cid)
    unknown = sorted(str(k) for k in raw if k not in _CONCEPT_KEYS)
    if unknown:
        raise LexiconError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_CONCEPT_KEYS))}"
        )
    if not isinstance(cid, str) or not _ID_RE.match(cid):
        raise LexiconError(
            f"{where}: 'id' must be a lower-case slug (a-z, 0-9, '_'), got {cid!r}; give the "
            "concept a unique id such as 'type_2_diabetes'"
        )
    display = raw.get("display")
    if not isinstance(display, str) or not display.strip():
        raise LexiconError(f"{where}: 'display' is missing or empty; add the preferred name")
    category = raw.get("category", default_category)
    if category not in CATEGORIES:
        raise LexiconError(
            f"{where}: category {category!r} is not one of {', '.join(CATEGORIES)}; set "
            "'category:' at the top of the file or on the concept"
        )
    codes_raw = raw.get("codes")
    if not isinstance(codes_raw, dict) or not codes_raw:
        raise LexiconError(
            f"{where}: 'codes' must be a non-empty mapping such as "
            '{snomed: "38341003", icd10cm: "I10"}'
        )
    codes: list[tuple[str, str]] = []
    for key, value in codes_raw.items():
        if key not in CODE_SYSTEMS:
            raise LexiconError(
                f"{where}: unknown code system {key!r}; use one of {', '.join(CODE_SYSTEMS)}"
            )
        if not isinstance(value, str):
            raise LexiconError(
                f"{where}: {key} code {value!r} must be a quoted string (YAML reads bare "
                f'numbers as ints and drops leading zeros); write {key}: "{value}"'
            )
        problem = _code_problem(key, value)
        if problem:
            raise LexiconError(
                f"{where}: {key} code {value!r} {problem}; fix it, or leave {key} out if unsure"
            )
        codes.append((key, value))
    terms_raw = raw.get("terms", [])
    if not isinstance(terms_raw, list) or not all(
        isinstance(t, str) and t.strip() for t in terms_raw
    ):
        raise LexiconError(f"{where}: 'terms' must be a list of non-empty strings")
    terms: list[str] = []
    for t in terms_raw:
        norm = normalize_term(t)
        if norm in terms:
            raise LexiconError(f"{where}: term {norm!r} is listed twice; remove one")
        terms.append(norm)
    patterns = _parse_pattern(raw["pattern"], where) if "pattern" in raw else ()
    if not terms and not patterns:
        raise LexiconError(f"{where}: no 'terms' and no 'pattern'; give at least one term")
    return Concept(
        id=cid,
        display=display.strip(),
        category=category,
        codes=tuple(codes),
        terms=tuple(terms),
        patterns=patterns,
    )


def _load_file(path: Path) -> list[Concept]:
    try:
        data = yamlfile.load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise LexiconError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise LexiconError(
            f"{path}: the file must be a mapping with 'category' and 'concepts' keys"
        )
    unknown = sorted(str(k) for k in data if k not in _FILE_KEYS)
    if unknown:
        raise LexiconError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: category, concepts"
        )
    default_category = data.get("category")
    if default_category is not None and default_category not in CATEGORIES:
        raise LexiconError(
            f"{path}: file category {default_category!r} is not one of {', '.join(CATEGORIES)}"
        )
    concepts = data.get("concepts")
    if not isinstance(concepts, list):
        raise LexiconError(f"{path}: 'concepts' must be a list of concepts")
    return [_parse_concept(raw, i, path, default_category) for i, raw in enumerate(concepts)]


_CACHE: dict[tuple[Path, tuple[tuple[str, int, int], ...]], tuple[Concept, ...]] = {}


def load_lexicon(nlp_dir: Path) -> list[Concept]:
    """Read and validate ``nlp_dir/lexicon/*.yaml`` (in file-name order).

    Raises :class:`LexiconError` on any problem. The result is cached per resolved
    directory and the files' modification times, so repeated calls are cheap.
    """
    lex_dir = Path(nlp_dir).resolve() / "lexicon"
    if not lex_dir.is_dir():
        raise LexiconError(f"{lex_dir}: no lexicon directory; expected nlp/lexicon/*.yaml")
    files = sorted(lex_dir.glob("*.yaml"), key=lambda p: p.name)
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    key = (lex_dir, stamp)
    cached = _CACHE.get(key)
    if cached is not None:
        return list(cached)

    concepts: list[Concept] = []
    seen_ids: dict[str, Path] = {}
    term_owner: dict[str, tuple[str, Path]] = {}
    for path in files:
        for index, concept in enumerate(_load_file(path)):
            where = _where(path, index, concept.id)
            if concept.id in seen_ids:
                raise LexiconError(
                    f"{where}: id {concept.id!r} is already used in {seen_ids[concept.id]}; "
                    "ids must be unique across the lexicon"
                )
            seen_ids[concept.id] = path
            for term in concept.terms:
                owner = term_owner.get(term)
                if owner is not None:
                    raise LexiconError(
                        f"{where}: term {term!r} is also claimed by concept {owner[0]!r} "
                        f"({owner[1].name}); keep it on one of the two"
                    )
                term_owner[term] = (concept.id, path)
            concepts.append(concept)
    if not concepts:
        raise LexiconError(f"{lex_dir}: no concepts found in *.yaml")
    _CACHE.clear()  # keep only the latest version of each directory's lexicon small
    _CACHE[key] = tuple(concepts)
    return concepts


def target_rules(concepts: list[Concept], nlp_dir: Path) -> list[TargetRule]:
    """medspaCy ``TargetRule`` objects: one per term and one per token pattern.

    ``literal`` is the term (the concept's display for a pattern), ``category`` the
    upper-cased concept category and ``metadata={"concept": concept}``. A concept built
    by hand without terms or patterns takes them from the lexicon in ``nlp_dir``.
    """
    from medspacy.ner import TargetRule  # heavy import: only when rules are wanted

    by_id: dict[str, Concept] | None = None
    rules: list[TargetRule] = []
    for concept in concepts:
        source = concept
        if not concept.terms and not concept.patterns:
            if by_id is None:
                by_id = {c.id: c for c in load_lexicon(nlp_dir)}
            source = by_id.get(concept.id, concept)
        label = concept.category.upper()
        meta = {"concept": concept}
        for term in source.terms:
            rules.append(TargetRule(literal=term, category=label, metadata=meta))
        for pattern in source.patterns:
            rules.append(
                TargetRule(
                    literal=concept.display,
                    category=label,
                    pattern=[dict(t) for t in pattern],
                    metadata=meta,
                )
            )
    return rules
