"""Clinical-note NLP: one rule-based spaCy pipeline whose rules are the data in ``nlp/``.

``spacy.blank("en")`` (no model, nothing downloaded) with:

* spaCy's rule ``sentencizer`` (PyRuSH gives the same entities here about 7× slower);
* medspaCy's target matcher, fed by the concept lexicon in ``nlp/lexicon/``
  (``fhirtwin.nlp_lexicon``): each match knows its concept and codes;
* medspaCy's sectionizer, with its bundled titles plus ``nlp/sections.yaml``; being in
  "past medical history" or "family history" makes a mention historical or familial;
* medspaCy's ConText with ``nlp/context.yaml`` (``fhirtwin.nlp_context``): negated,
  uncertain, historical, hypothetical, family;
* regex extractors for measurements written in text and medication sigs
  (``fhirtwin.nlp_measure``, rules in ``nlp/measurements.yaml`` and ``nlp/sig.yaml``).

``analyse(text)`` returns plain dataclasses with character offsets into ``text``;
``fhirtwin.notes`` turns them into FHIR. Nothing here knows a concept or a code.
"""

from __future__ import annotations

import bisect
import os
import re
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fhirtwin import yamlfile
from fhirtwin.nlp_lexicon import Concept, load_lexicon, target_rules

__all__ = [
    "Analysis",
    "Mention",
    "NlpRulesError",
    "NotePipeline",
    "Section",
    "default_nlp_dir",
    "pipeline",
]

ROOT = Path(__file__).resolve().parent.parent
# medspaCy runs spaCy's token Matcher even when every rule is a phrase: spaCy warns on
# each document that it "does not have any patterns defined". Harmless; silence it.
warnings.filterwarnings("ignore", message=r"\[W036\]", category=UserWarning)
_ASSERTIONS = ("is_negated", "is_uncertain", "is_historical", "is_hypothetical", "is_family")


class NlpRulesError(Exception):
    """A broken file in ``nlp/``: which file, which entry, what to do."""


def default_nlp_dir() -> Path:
    """``$FHIRTWIN_NLP``, else the ``nlp/`` folder shipped with the package."""
    env = os.environ.get("FHIRTWIN_NLP")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here / "nlp", here.parent / "nlp"):
        if (candidate / "lexicon").is_dir():
            return candidate
    raise NlpRulesError("no nlp/ rules folder found: set FHIRTWIN_NLP to the folder with lexicon/")


@dataclass(frozen=True, slots=True)
class Section:
    category: str
    title: str
    start: int  # character offsets of the whole section (title + body)
    end: int


@dataclass(frozen=True, slots=True)
class Mention:
    """One concept found in the text, with what the text says about it."""

    concept: Concept
    text: str
    start: int
    end: int
    sentence_start: int
    sentence_end: int
    section: Section | None
    negated: bool
    uncertain: bool
    historical: bool
    hypothetical: bool
    family: bool
    relative: str | None  # the family word ConText found ("mother"), lower-case
    allergy: bool  # written as an allergy (allergies section or "allergic to")
    planned: bool  # in a plan section: intended, not done
    sig: Any = None  # fhirtwin.nlp_measure.Sig for medications, when the text gives one

    @property
    def category(self) -> str:
        return self.concept.category


@dataclass(frozen=True, slots=True)
class Analysis:
    text: str
    mentions: list[Mention]
    measurements: list[Any]  # fhirtwin.nlp_measure.Measurement
    sections: list[Section]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yamlfile.load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise NlpRulesError(f"{path}: missing; restore it from the fhirtwin release") from exc
    except yaml.YAMLError as exc:
        raise NlpRulesError(f"{path}: not valid YAML ({exc}); fix the file") from exc
    if not isinstance(data, dict):
        raise NlpRulesError(f"{path}: expected a mapping at the top level")
    return data


@dataclass(frozen=True)
class ListHeaders:
    """``list_headers`` of ``nlp/sections.yaml``: which header modifiers list items inherit."""

    inherit: dict[str, str]  # ConText category → the mention flag it sets ("is_historical")
    max_words: int = 6  # words allowed between the header's modifier and its colon


@dataclass(frozen=True)
class NoteRules:
    """``nlp/fhir.yaml`` and the role/attribute parts of ``nlp/sections.yaml``."""

    section_attrs: dict[str, dict[str, bool]]
    section_roles: dict[str, str]
    ccda_sections: frozenset[str]
    list_headers: ListHeaders
    clinical_status: dict[str, dict[str, str]]
    medication_status: dict[str, str]
    allergy_cue: re.Pattern[str] | None
    family_relations: dict[str, tuple[str, str]]
    default_relation: tuple[str, str]
    observation_categories: dict[str, tuple[str, str]]


def _list_headers(nlp_dir: Path, raw: Any) -> ListHeaders:
    from fhirtwin.nlp_context import CATEGORY_ATTRIBUTES

    where = f"{nlp_dir / 'sections.yaml'}: list_headers"
    if raw is None:
        return ListHeaders(inherit={})
    if not isinstance(raw, dict) or set(raw) - {"inherit", "max_words"}:
        raise NlpRulesError(f"{where}: expected a mapping with keys inherit and max_words")
    inherit: dict[str, str] = {}
    for cat in raw.get("inherit") or ():
        attrs = CATEGORY_ATTRIBUTES.get(str(cat).upper())
        if attrs is None:
            raise NlpRulesError(
                f"{where}.inherit: {cat!r} is not a ConText category; "
                f"use some of {', '.join(CATEGORY_ATTRIBUTES)}"
            )
        inherit[str(cat).upper()] = next(iter(attrs))
    words = raw.get("max_words", 6)
    if isinstance(words, bool) or not isinstance(words, int) or words < 0:
        raise NlpRulesError(f"{where}.max_words: {words!r} is not a number of words (>= 0)")
    return ListHeaders(inherit=inherit, max_words=words)


# A list item line: "1. ", "2) ", "- ", "* ", "• " at its start.
_LIST_ITEM = re.compile(r"[ \t]*(?:\d{1,2}[.)]|[-*\u2022])[ \t]")
# From the end of a header's modifier to its colon, on the same line.
_TO_COLON = re.compile(r"[^\n:.;]*:")


def _list_regions(text: str, doc: Any, headers: ListHeaders) -> list[tuple[int, int, str, str]]:
    """Lists headed by a ConText modifier: ``(start, end, flag, modifier text)`` each.

    A header is a modifier of an inherited category followed, on its line, by at most
    ``max_words`` words, no concept, and a colon ("Past medical history is significant
    for:", "Mother has had:"). The list is the lines below it that start with a number or
    a bullet (and the rest of the header line when it starts with one), up to the first
    line that does not. ConText scopes end with the sentence, and the rule sentencizer ends
    one at every "1." and every item, so each item is otherwise a sentence of its own.
    """
    graph = doc._.context_graph
    if not headers.inherit or graph is None:
        return []
    starts = None
    regions: list[tuple[int, int, str, str]] = []
    for mod in graph.modifiers:
        flag = headers.inherit.get(mod.category)
        if flag is None or mod.direction in ("PSEUDO", "TERMINATE"):
            continue
        first, last = mod.modifier_span
        end = _char_end(doc, last)
        m = _TO_COLON.match(text, end)
        if m is None or len(text[end : m.end() - 1].split()) > headers.max_words:
            continue
        colon = m.end()
        if starts is None:
            starts = [e.start_char for e in doc.ents]
        i = bisect.bisect_left(starts, end)
        if i < len(starts) and starts[i] < colon:
            continue  # "history of asthma:": the modifier has its concept
        line_end = text.find("\n", colon)
        line_end = len(text) if line_end < 0 else line_end
        region_end = colon
        if text[colon:line_end].strip():
            if not _LIST_ITEM.match(text, colon):
                continue  # inline text after the colon: ConText's sentence scope covers it
            region_end = line_end
        while line_end < len(text) and _LIST_ITEM.match(text, line_end + 1):
            nxt = text.find("\n", line_end + 1)
            line_end = region_end = len(text) if nxt < 0 else nxt
        if region_end > colon:
            regions.append((colon, region_end, flag, doc[first:last].text.lower()))
    return regions


def _note_rules(nlp_dir: Path, sections: dict[str, Any]) -> NoteRules:
    path = nlp_dir / "fhir.yaml"
    data = _read_yaml(path)
    attrs = sections.get("attributes") or {}
    for cat, values in attrs.items():
        bad = [k for k in values or {} if f"is_{k.removeprefix('is_')}" not in _ASSERTIONS]
        if bad:
            raise NlpRulesError(
                f"{nlp_dir / 'sections.yaml'}: attributes.{cat}: unknown {bad[0]!r}; "
                f"use one of {', '.join(_ASSERTIONS)}"
            )
    headers = _list_headers(nlp_dir, sections.get("list_headers"))
    cues = [str(c).lower() for c in data.get("allergy_cues") or ()]
    cue = (
        re.compile(r"\b(?:" + "|".join(re.escape(c) for c in cues) + r")\b", re.I) if cues else None
    )
    relations: dict[str, tuple[str, str]] = {}
    for word, pair in (data.get("family_relations") or {}).items():
        if not (isinstance(pair, list) and len(pair) == 2):
            raise NlpRulesError(f"{path}: family_relations.{word}: expected [CODE, display]")
        relations[str(word).lower()] = (str(pair[0]), str(pair[1]))
    default = data.get("default_relation") or ["FAMMEMB", "family member"]
    categories: dict[str, tuple[str, str]] = {}
    for kind, pair in (data.get("observation_categories") or {}).items():
        if not (isinstance(pair, list) and len(pair) == 2):
            raise NlpRulesError(f"{path}: observation_categories.{kind}: expected [code, display]")
        categories[str(kind)] = (str(pair[0]), str(pair[1]))
    return NoteRules(
        section_attrs={str(k): dict(v or {}) for k, v in attrs.items()},
        section_roles={str(k): str(v) for k, v in (sections.get("roles") or {}).items()},
        ccda_sections=frozenset(str(c) for c in sections.get("ccda_sections") or ()),
        list_headers=headers,
        clinical_status={str(k): dict(v) for k, v in (data.get("clinical_status") or {}).items()},
        medication_status=dict(data.get("medication_status") or {}),
        allergy_cue=cue,
        family_relations=relations,
        default_relation=(str(default[0]), str(default[1])),
        observation_categories=categories,
    )


class NotePipeline:
    """The spaCy pipeline and the extractors, built once per rules folder."""

    def __init__(self, nlp_dir: Path | None = None) -> None:
        import medspacy  # noqa: F401  (registers the medspaCy pipeline factories)
        import spacy
        from medspacy.section_detection import SectionRule

        from fhirtwin import nlp_measure
        from fhirtwin.nlp_context import add_context

        _speed_up_medspacy()
        self.nlp_dir = (nlp_dir or default_nlp_dir()).resolve()
        sections = _read_yaml(self.nlp_dir / "sections.yaml")
        self.rules = _note_rules(self.nlp_dir, sections)
        self.concepts = load_lexicon(self.nlp_dir)

        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        matcher: Any = nlp.add_pipe("medspacy_target_matcher")
        matcher.add(target_rules(self.concepts, self.nlp_dir))
        sectionizer: Any = nlp.add_pipe(
            "medspacy_sectionizer",
            config={
                "rules": "default" if sections.get("medspacy_defaults", True) else None,
                "span_attrs": None,  # applied below, from sections.yaml
            },
        )
        extra = []
        for i, rule in enumerate(sections.get("rules") or ()):
            try:
                extra.append(SectionRule(literal=rule["literal"], category=rule["category"]))
            except (KeyError, TypeError) as exc:
                raise NlpRulesError(
                    f"{self.nlp_dir / 'sections.yaml'}: rules[{i}]: needs literal and "
                    f"category ({exc})"
                ) from exc
        sectionizer.add(extra)
        add_context(nlp, self.nlp_dir)
        self.nlp = nlp
        self.measure_rules = nlp_measure.load_rules(self.nlp_dir)
        self._measure = nlp_measure.find_measurements
        self._sig = nlp_measure.parse_sig

    # -- analysis ---------------------------------------------------------------------

    def analyse(self, text: str) -> Analysis:
        return self._analysis(text, self.nlp(text))

    def analyse_many(self, texts: Iterable[str], batch_size: int = 32) -> Iterator[Analysis]:
        """Faster than ``analyse`` one by one: spaCy batches the tokenizer and matchers."""
        pending: list[str] = []

        def flush() -> Iterator[Analysis]:
            for text, doc in zip(
                pending, self.nlp.pipe(pending, batch_size=batch_size), strict=True
            ):
                yield self._analysis(text, doc)
            pending.clear()

        for text in texts:
            pending.append(text)
            if len(pending) >= batch_size:
                yield from flush()
        yield from flush()

    def _analysis(self, text: str, doc: Any) -> Analysis:
        rules = self.rules
        sections: list[Section] = []
        for sec in doc._.sections:
            title_start, _ = sec.title_span
            start, end = sec.section_span
            if title_start is None or sec.category is None:
                continue
            title = doc[sec.title_span[0] : sec.title_span[1]].text
            sections.append(Section(sec.category, title, doc[start].idx, _char_end(doc, end)))
        lists = _list_regions(text, doc, rules.list_headers)
        mentions: list[Mention] = []
        for ent in doc.ents:
            rule = ent._.target_rule
            concept: Concept = rule.metadata["concept"]
            sent = ent.sent
            section = _section_at(sections, ent.start_char)
            implied = rules.section_attrs.get(section.category, {}) if section else {}
            flags = {a: bool(getattr(ent._, a)) for a in _ASSERTIONS}
            for key, value in implied.items():
                name = f"is_{key.removeprefix('is_')}"
                flags[name] = flags[name] or bool(value)
            relative = None
            for mod in ent._.modifiers:
                if mod.category == "FAMILY":
                    s, e = mod.modifier_span
                    relative = doc[s:e].text.lower()
                    break
            for start, end, flag, cue in lists:  # an item of a list under a header
                if start <= ent.start_char < end:
                    if flag == "is_family" and not flags[flag]:
                        relative = relative or cue
                    flags[flag] = True
            role = rules.section_roles.get(section.category) if section else None
            allergy = role == "allergy"
            if not allergy and rules.allergy_cue is not None:
                before = text[sent.start_char : ent.start_char]
                allergy = bool(rules.allergy_cue.search(before))
            sig = None
            if concept.category == "medication":
                sig = self._sig(text, ent.end_char, self.measure_rules)
            mentions.append(
                Mention(
                    concept=concept,
                    text=ent.text,
                    start=ent.start_char,
                    end=ent.end_char,
                    sentence_start=sent.start_char,
                    sentence_end=sent.end_char,
                    section=section,
                    negated=flags["is_negated"],
                    uncertain=flags["is_uncertain"],
                    historical=flags["is_historical"],
                    hypothetical=flags["is_hypothetical"],
                    family=flags["is_family"],
                    relative=relative,
                    allergy=allergy,
                    planned=role == "plan",
                    sig=sig,
                )
            )
        measurements = self._measure(text, self.measure_rules)
        return Analysis(text, mentions, measurements, sections)


def _token_at(starts: list[int], char: int, resolve: str) -> int | None:
    """medspaCy's ``get_token_for_char`` by bisection (it scans every token)."""
    i = bisect.bisect_left(starts, char)
    if i == len(starts):
        return len(starts) - 1 if resolve == "left" else None
    if starts[i] == char:
        return i
    if resolve == "left":
        return i - 1 if i else len(starts) - 1  # medspaCy's doc[i - 1], i.e. doc[-1] at 0
    return i


def _regex_matcher_call(self: Any, doc: Any) -> list[tuple[int, int, int]]:
    """medspaCy's ``RegexMatcher.__call__`` with the same results, made cheaper.

    The original rebuilds ``doc.text_with_ws`` for every pattern and maps a match that
    does not fall on token boundaries to tokens by scanning the document from the start:
    about a fifth of the pipeline's time on MTSamples dictations.
    """
    matches: list[tuple[int, int, int]] = []
    text = doc.text_with_ws
    starts: list[int] | None = None
    for match_id, patterns in self._patterns.items():
        for pattern in patterns:
            on_match = self._callbacks[match_id]
            for m in pattern.finditer(text):
                span = doc.char_span(m.start(), m.end())
                if span is None:
                    if starts is None:
                        starts = [t.idx for t in doc]
                    first = _token_at(starts, m.start(), self.resolve_start)
                    last = _token_at(starts, m.end(), self.resolve_end)
                    span = doc[first : len(doc) if last is None else last]
                if len(span):
                    matches.append((match_id, span.start, span.end))
                if on_match is not None:  # as medspaCy does, even for an empty span
                    on_match(self, doc, len(matches) - 1, matches)
    return matches


def _speed_up_medspacy() -> None:
    from medspacy.common.regex_matcher import RegexMatcher

    if RegexMatcher.__call__ is not _regex_matcher_call:
        RegexMatcher.__call__ = _regex_matcher_call


def _char_end(doc: Any, token_end: int) -> int:
    if token_end <= 0:
        return 0
    last = doc[token_end - 1]
    return int(last.idx + len(last.text))


def _section_at(sections: list[Section], offset: int) -> Section | None:
    for sec in sections:
        if sec.start <= offset < sec.end:
            return sec
    return None


_pipelines: dict[Path, NotePipeline] = {}
_lock = threading.Lock()


def pipeline(nlp_dir: Path | None = None) -> NotePipeline:
    """The pipeline for a rules folder, built on first use (about a second) and kept."""
    key = (nlp_dir or default_nlp_dir()).resolve()
    with _lock:
        if key not in _pipelines:
            _pipelines[key] = NotePipeline(key)
        return _pipelines[key]
