"""ConText assertion rules as data: ``nlp/context.yaml`` → medspaCy ``ConTextRule`` objects.

The file (documented at its top) starts from medspaCy's bundled English ConText rules
(``medspacy_defaults: true``), removes the ones listed under ``drop`` (by literal) and adds
ours under ``rules``. ``add_context`` puts medspaCy's ``medspacy_context`` component at the
end of a pipeline with those rules, so that every target span gets ``_.is_negated``,
``_.is_uncertain``, ``_.is_historical``, ``_.is_hypothetical`` and ``_.is_family``.

Every mistake in the file raises ``ContextRulesError`` naming the file, the rule (index and
literal), what is wrong and what to do about it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fhirtwin import yamlfile

if TYPE_CHECKING:
    from spacy.language import Language

__all__ = [
    "CATEGORY_ATTRIBUTES",
    "DIRECTIONS",
    "ContextConfig",
    "ContextRulesError",
    "add_context",
    "context_rules_path",
    "load_context_config",
    "load_context_rules",
    "medspacy_default_rules",
]

CONTEXT_FILE = "context.yaml"

CATEGORY_ATTRIBUTES: dict[str, dict[str, Any]] = {
    "NEGATED_EXISTENCE": {"is_negated": True},
    "POSSIBLE_EXISTENCE": {"is_uncertain": True},
    "HISTORICAL": {"is_historical": True},
    "HYPOTHETICAL": {"is_hypothetical": True},
    "FAMILY": {"is_family": True},
}
"""ConText modifier category → the span attribute it sets (medspaCy's own mapping)."""

DIRECTIONS = ("FORWARD", "BACKWARD", "BIDIRECTIONAL", "TERMINATE", "PSEUDO")

_TOP_KEYS = frozenset({"medspacy_defaults", "component", "drop", "terminated_by", "rules"})
_COMPONENT_KEYS = frozenset({"prune_on_target_overlap"})
_CUSTOM_CATEGORY = re.compile(r"^[A-Z][A-Z0-9_]*$")
_RULE_KEYS = frozenset(
    {
        "literal",
        "category",
        "direction",
        "pattern",
        "max_scope",
        "max_targets",
        "allowed_types",
        "excluded_types",
        "terminated_by",
    }
)


class ContextRulesError(Exception):
    """``nlp/context.yaml`` is wrong: the message names the file, the rule and the fix."""


@dataclass(frozen=True)
class ContextConfig:
    """What ``context.yaml`` says: the rules and the component settings."""

    rules: list[Any]  # medspacy.context.ConTextRule
    prune_on_target_overlap: bool = False
    # category → the span attributes it sets: CATEGORY_ATTRIBUTES plus the combined
    # categories of this file ("NEGATED_EXISTENCE+HISTORICAL")
    attributes: Mapping[str, Mapping[str, Any]] = field(
        default_factory=lambda: dict(CATEGORY_ATTRIBUTES)
    )


def context_rules_path(nlp_dir: Path) -> Path:
    return Path(nlp_dir) / CONTEXT_FILE


def medspacy_default_rules() -> list[Any]:
    """medspaCy's bundled English ConText rules (``resources/en/context_rules.json``)."""
    from medspacy.context import ConTextRule
    from medspacy.context import context as context_module

    path = (
        Path(context_module.__file__).resolve().parents[2]
        / "resources"
        / "en"
        / "context_rules.json"
    )
    if not path.is_file():
        raise ContextRulesError(
            f"medspaCy's default ConText rules are missing ({path}); reinstall medspacy or set "
            "'medspacy_defaults: false' in context.yaml"
        )
    rules: list[Any] = ConTextRule.from_json(str(path))
    return rules


def _fail(path: Path, where: str, what: str, fix: str) -> ContextRulesError:
    return ContextRulesError(f"{path}: {where}: {what}; {fix}")


def _rule_where(index: int, raw: object) -> str:
    literal = raw.get("literal") if isinstance(raw, Mapping) else None
    return f"rules[{index}]" + (f" (literal {literal!r})" if literal is not None else "")


def _category(value: object, path: Path, where: str, key: str, custom: frozenset[str]) -> str:
    if isinstance(value, str) and (value.upper() in CATEGORY_ATTRIBUTES or value in custom):
        return value.upper()
    extra = (
        f", or a termination category of this file ({', '.join(sorted(custom))})" if custom else ""
    )
    raise _fail(
        path,
        where,
        f"{key} {value!r} is not a ConText category",
        f"use one of {', '.join(CATEGORY_ATTRIBUTES)}{extra}",
    )


def _combined_category(value: list[Any], path: Path, where: str) -> list[str]:
    """``category: [NEGATED_EXISTENCE, HISTORICAL]``: one modifier that sets both."""
    parts = [v.upper() if isinstance(v, str) else v for v in value]
    if (
        len(parts) < 2
        or len(set(parts)) != len(parts)
        or not all(isinstance(v, str) and v in CATEGORY_ATTRIBUTES for v in parts)
    ):
        raise _fail(
            path,
            where,
            f"category {value!r} is not a list of two or more different ConText categories",
            f"write category: [A, B] with A, B from {', '.join(CATEGORY_ATTRIBUTES)}",
        )
    return parts


def _categories(
    value: object, path: Path, where: str, key: str, custom: frozenset[str]
) -> set[str]:
    if not isinstance(value, list) or not value:
        raise _fail(path, where, f"{key} must be a non-empty list", f"write {key}: [CATEGORY, ...]")
    return {_category(v, path, where, key, custom) for v in value}


def _labels(value: object, path: Path, where: str, key: str) -> set[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(
            path,
            where,
            f"{key} must be a non-empty list of target labels",
            f"write {key}: [CONDITION, ...] (upper-cased lexicon categories)",
        )
    return {v.upper() for v in value}


def _positive_int(value: object, path: Path, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(
            path, where, f"{key} {value!r} is not a positive integer", f"give {key} in tokens"
        )
    return value


def _pattern(value: object, path: Path, where: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str) and value:
        try:
            re.compile(value)
        except re.error as exc:
            raise _fail(
                path, where, f"pattern is not a valid regex ({exc})", "fix the regex"
            ) from exc
        return value
    if isinstance(value, list) and value and all(isinstance(t, dict) and t for t in value):
        return [dict(t) for t in value]
    raise _fail(
        path,
        where,
        "pattern must be a regex string or a non-empty list of spaCy token patterns",
        "e.g. pattern: [{LOWER: {IN: [denies, denied]}}] or leave it out to match the literal",
    )


def _custom_categories(raw_rules: list[Any], path: Path) -> frozenset[str]:
    """Categories of our own: PSEUDO rules whose category sets no attribute."""
    custom: set[str] = set()
    for i, raw in enumerate(raw_rules):
        if not isinstance(raw, Mapping):
            continue
        cat = raw.get("category")
        if not isinstance(cat, str) or cat.upper() in CATEGORY_ATTRIBUTES:
            continue
        where = _rule_where(i, raw)
        if not _CUSTOM_CATEGORY.match(cat):
            raise _fail(
                path,
                where,
                f"category {cat!r} is not a ConText category",
                f"use one of {', '.join(CATEGORY_ATTRIBUTES)}, or an UPPER_CASE termination "
                "category (direction PSEUDO, named in a terminated_by)",
            )
        if str(raw.get("direction", "")).upper() != "PSEUDO":
            raise _fail(
                path,
                where,
                f"category {cat!r} sets no attribute, so the rule can only end other scopes",
                f"give it direction: PSEUDO and name {cat} in a terminated_by, or use one of "
                f"{', '.join(CATEGORY_ATTRIBUTES)}",
            )
        custom.add(cat)
    return frozenset(custom)


def _parse_rule(
    raw: object,
    index: int,
    path: Path,
    terminators: Mapping[str, set[str]],
    custom: frozenset[str],
) -> Any:
    from medspacy.context import ConTextRule

    where = _rule_where(index, raw)
    if not isinstance(raw, Mapping):
        raise _fail(path, where, "a rule must be a mapping", "write {literal: ..., category: ...}")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise _fail(
            path,
            where,
            f"unknown key(s) {', '.join(map(str, unknown))}",
            f"allowed keys: {', '.join(sorted(_RULE_KEYS))}",
        )
    literal = raw.get("literal")
    if literal is not None and not isinstance(literal, str):
        raise _fail(
            path,
            where,
            f"literal {literal!r} is not text",
            "quote it (YAML reads bare no/yes/on/off as booleans and digits as numbers)",
        )
    if not isinstance(literal, str) or not literal.strip():
        raise _fail(path, where, "literal is missing or empty", "give the phrase the rule matches")
    raw_category = raw.get("category")
    if isinstance(raw_category, list):
        # A combined category sets every attribute of its parts; like a modifier of one of
        # them, its scope ends where the parts' scopes end (their terminated_by) and at
        # another modifier of one of the parts.
        parts = _combined_category(raw_category, path, where)
        category = "+".join(parts)
        base_terms = set(parts).union(*(terminators.get(p, set()) for p in parts))
    else:
        category = _category(raw_category, path, where, "category", custom)
        base_terms = set(terminators.get(category, set()))
    direction = raw.get("direction", "BIDIRECTIONAL")
    if not isinstance(direction, str) or direction.upper() not in DIRECTIONS:
        raise _fail(
            path,
            where,
            f"direction {direction!r} is not valid",
            f"use one of {', '.join(DIRECTIONS)}",
        )
    kwargs: dict[str, Any] = {}
    if "pattern" in raw:
        kwargs["pattern"] = _pattern(raw["pattern"], path, where)
    for key in ("max_scope", "max_targets"):
        if key in raw:
            kwargs[key] = _positive_int(raw[key], path, where, key)
    if "allowed_types" in raw and "excluded_types" in raw:
        raise _fail(
            path, where, "both allowed_types and excluded_types are set", "keep only one of them"
        )
    for key in ("allowed_types", "excluded_types"):
        if key in raw:
            kwargs[key] = _labels(raw[key], path, where, key)
    terminated_by = base_terms
    if "terminated_by" in raw:
        terminated_by |= _categories(raw["terminated_by"], path, where, "terminated_by", custom)
    try:
        return ConTextRule(
            literal=literal,
            category=category,
            direction=direction.upper(),
            terminated_by=terminated_by or None,
            **kwargs,
        )
    except (ValueError, TypeError) as exc:  # medspaCy's own checks
        raise _fail(path, where, f"medspaCy rejected the rule ({exc})", "fix the rule") from exc


def _read(path: Path) -> Mapping[str, Any]:
    try:
        data = yamlfile.load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ContextRulesError(
            f"{path}: cannot read the ConText rules ({exc}); create it or point nlp_dir elsewhere"
        ) from exc
    except yaml.YAMLError as exc:
        raise ContextRulesError(f"{path}: not valid YAML ({exc}); fix the syntax") from exc
    if not isinstance(data, Mapping):
        raise _fail(
            path, "top level", "must be a mapping", "see the comment at the top of the file"
        )
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _fail(
            path,
            "top level",
            f"unknown key(s) {', '.join(map(str, unknown))}",
            f"allowed keys: {', '.join(sorted(_TOP_KEYS))}",
        )
    return data


def load_context_config(nlp_dir: Path) -> ContextConfig:
    """``nlp_dir/context.yaml``: the rules (kept medspaCy defaults, then ours) and settings."""
    path = context_rules_path(nlp_dir)
    data = _read(path)
    use_defaults = data.get("medspacy_defaults", True)
    if not isinstance(use_defaults, bool):
        raise _fail(
            path, "medspacy_defaults", f"{use_defaults!r} is not true/false", "write true or false"
        )
    component = data.get("component") or {}
    if not isinstance(component, Mapping) or set(component) - _COMPONENT_KEYS:
        raise _fail(
            path,
            "component",
            f"must be a mapping with keys from {', '.join(sorted(_COMPONENT_KEYS))}",
            "remove the other keys",
        )
    prune = component.get("prune_on_target_overlap", False)
    if not isinstance(prune, bool):
        raise _fail(
            path,
            "component.prune_on_target_overlap",
            f"{prune!r} is not true/false",
            "write true or false",
        )
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise _fail(path, "rules", "must be a list", "write rules: [{literal: ..., category: ...}]")
    custom = _custom_categories(raw_rules, path)

    # terminated_by: {CATEGORY: [CATEGORY, ...]}, applied to every rule of that category
    # (the kept medspaCy defaults too).
    terminators: dict[str, set[str]] = {}
    raw_terms = data.get("terminated_by") or {}
    if not isinstance(raw_terms, Mapping):
        raise _fail(path, "terminated_by", "must be a mapping", "write {CATEGORY: [CATEGORY, ...]}")
    for key, value in raw_terms.items():
        where = f"terminated_by.{key}"
        terminators[_category(key, path, where, "category", custom)] = _categories(
            value, path, where, "terminated_by", custom
        )
    used = set().union(*terminators.values()) if terminators else set()
    for raw in raw_rules:
        if isinstance(raw, Mapping) and isinstance(raw.get("terminated_by"), list):
            used |= {str(c).upper() for c in raw["terminated_by"]}
    for i, raw in enumerate(raw_rules):
        if (
            isinstance(raw, Mapping)
            and isinstance(raw.get("category"), str)
            and raw["category"] in custom - used
        ):
            raise _fail(
                path,
                _rule_where(i, raw),
                f"category {raw['category']!r} is named in no terminated_by, so the rule does nothing",
                f"add it to terminated_by (e.g. terminated_by: {{HISTORICAL: [{raw['category']}]}})",
            )

    rules: list[Any] = []
    drop = data.get("drop") or []
    if not isinstance(drop, list) or not all(isinstance(d, str) for d in drop):
        raise _fail(path, "drop", "must be a list of literals", 'write drop: ["literal", ...]')
    if use_defaults:
        defaults = medspacy_default_rules()
        known = {r.literal.lower() for r in defaults}
        for i, literal in enumerate(drop):
            if literal.lower() not in known:
                raise _fail(
                    path,
                    f"drop[{i}] ({literal!r})",
                    "no medspaCy default rule has this literal",
                    "remove it from drop or correct the spelling",
                )
        dropped = {d.lower() for d in drop}
        for rule in defaults:
            if rule.literal.lower() in dropped:
                continue
            rule.terminated_by = set(rule.terminated_by) | terminators.get(rule.category, set())
            rules.append(rule)
    elif drop:
        raise _fail(path, "drop", "drop needs medspacy_defaults: true", "remove drop or the flag")

    rules.extend(_parse_rule(raw, i, path, terminators, custom) for i, raw in enumerate(raw_rules))
    attributes: dict[str, dict[str, Any]] = dict(CATEGORY_ATTRIBUTES)
    for rule in rules:
        if "+" in rule.category:
            attributes[rule.category] = {
                name: value
                for part in rule.category.split("+")
                for name, value in CATEGORY_ATTRIBUTES[part].items()
            }
    return ContextConfig(rules=rules, prune_on_target_overlap=prune, attributes=attributes)


_MAX_EXPANSION = 256


def _phrases(pattern: list[dict[str, Any]], one_token: Callable[[str], bool]) -> list[str] | None:
    """The phrases a token pattern of LOWER literals and sets (OP absent or "?") matches;
    None when it uses anything else or expands to too many."""
    options: list[list[str]] = []
    for tok in pattern:
        if set(tok) - {"LOWER", "OP"} or tok.get("OP") not in (None, "?"):
            return None
        value = tok.get("LOWER")
        if isinstance(value, str):
            words = [value]
        elif isinstance(value, Mapping) and set(value) == {"IN"} and isinstance(value["IN"], list):
            words = [str(w) for w in value["IN"]]
        else:
            return None
        if any(w != w.lower() for w in words):
            return None
        # A word that is not one token on its own never equals a token of a note, so it
        # never matched and must not start matching as a phrase: a multi-word entry
        # (medspaCy's default "risks of" rule lists ["risks of", "risk of"] as one token
        # set) or one the tokenizer splits ("s/p" is s / p).
        words = [w for w in words if " " not in w and one_token(w)]
        if not words:
            return []
        options.append(words + ([""] if tok.get("OP") == "?" else []))
    phrases = [""]
    for words in options:
        phrases = [f"{p} {w}".strip() for p in phrases for w in words]
        if len(phrases) > _MAX_EXPANSION:
            return None
    return list(dict.fromkeys(p for p in phrases if p))


def as_phrases(rules: list[Any], tokenize: Callable[[str], list[str]]) -> list[Any]:
    """Rewrite token-pattern rules that only list lower-case words as phrase rules.

    Same matches, much cheaper: medspaCy runs token patterns through spaCy's Matcher,
    which tests every pattern's first-token set at every token of the note (about half
    of the ConText time on MTSamples dictations), while phrases go through the
    PhraseMatcher's hash lookup. Rules with callbacks, regexes or other token attributes
    are kept as they are.
    """
    from medspacy.context import ConTextRule

    def one_token(word: str) -> bool:
        return tokenize(word) == [word]

    out: list[Any] = []
    for rule in rules:
        phrases = None
        if isinstance(rule.pattern, list) and rule.on_match is None and rule.on_modifies is None:
            phrases = _phrases(rule.pattern, one_token)
        if phrases is None:
            out.append(rule)
            continue
        for phrase in phrases:
            out.append(
                ConTextRule(
                    literal=phrase,
                    category=rule.category,
                    direction=rule.direction,
                    allowed_types=rule.allowed_types,
                    excluded_types=rule.excluded_types,
                    max_scope=rule.max_scope,
                    max_targets=rule.max_targets,
                    terminated_by=set(rule.terminated_by) or None,
                    metadata={"from_pattern": rule.literal, **(rule.metadata or {})},
                )
            )
    return out


def load_context_rules(nlp_dir: Path) -> list[Any]:
    """The ConText rules of ``nlp_dir/context.yaml``: kept medspaCy defaults, then ours.

    Returns ``medspacy.context.ConTextRule`` objects, ready for ``ConText.add``.
    """
    return load_context_config(nlp_dir).rules


def _register_attributes() -> None:
    from spacy.tokens import Span

    for attrs in CATEGORY_ATTRIBUTES.values():
        for name in attrs:
            if not Span.has_extension(name):
                Span.set_extension(name, default=False)


_FACTORY = "fhirtwin_context"


def _register_factory() -> str:
    """Register ``fhirtwin_context``: medspaCy's ConText with target-overlap pruning done
    before the scopes are set.

    medspaCy's ``prune_on_target_overlap`` "removes matched modifiers which overlap with
    target entities", but only after every modifier has limited the scopes of the others: a
    removed modifier still cut them. In "Allergies: allergy to latex" (target "allergy to
    latex") the inner, removed "allergy" ended the scope of the title's "Allergies", so the
    target was not historical. Here the modifiers that overlap a
    target are dropped first; everything else is medspaCy's ``ConText.__call__`` unchanged.
    """
    from spacy.language import Language

    if Language.has_factory(_FACTORY):
        return _FACTORY
    from medspacy.common.util import tuple_overlaps
    from medspacy.context import ConText
    from medspacy.context.context_graph import ConTextGraph
    from medspacy.context.context_modifier import ConTextModifier

    class TargetPrunedContext(ConText):  # type: ignore[misc]
        def __call__(self, doc: Any, targets: str | None = None) -> Any:
            if not self.prune_on_target_overlap:
                return super().__call__(doc, targets)
            if targets:
                spans = getattr(doc._, targets)
            elif self.input_span_type == "group":
                spans = doc.spans[self.span_group_name]
            else:
                spans = doc.ents
            graph = ConTextGraph(prune_on_modifier_overlap=True)
            graph.targets = spans
            matcher = self._ConText__matcher
            bounds = [(t.start, t.end) for t in spans]
            graph.modifiers = []
            for match_id, start, end in matcher(doc):
                if any(tuple_overlaps((start, end), b) for b in bounds):
                    continue
                rule = matcher.rule_map[self.nlp.vocab[match_id].text]
                graph.modifiers.append(
                    ConTextModifier(rule, start, end, doc, max_scope=self.max_scope)
                )
            graph.update_scopes()
            graph.apply_modifiers()
            for target, modifier in graph.edges:
                target._.modifiers += (modifier,)
            if self.context_attributes_mapping:
                self.set_context_attributes(graph.edges)
            doc._.context_graph = graph
            return doc

    Language.factory(_FACTORY)(TargetPrunedContext)
    return _FACTORY


def add_context(nlp: Language, nlp_dir: Path | None, *, input_span_type: str = "ents") -> Any:
    """Add medspaCy's ``medspacy_context`` to ``nlp`` with the rules of ``nlp_dir``.

    ``nlp_dir=None`` means medspaCy's bundled default rules and settings, unchanged (the
    baseline of bench/negex_eval.py). Target spans (``doc.ents``, or the ``medspacy_spans``
    group with ``input_span_type="group"``) get ``_.is_negated``, ``_.is_uncertain``,
    ``_.is_historical``, ``_.is_hypothetical`` and ``_.is_family``. The pipeline needs
    sentence boundaries before this component (the rule ``sentencizer``). Returns the
    component.
    """
    if nlp_dir is None:
        config = ContextConfig(rules=medspacy_default_rules())
    else:
        config = load_context_config(nlp_dir)
    _register_attributes()
    # our rules: medspaCy's ConText, pruning target-overlapping modifiers before scoping
    # (see _register_factory); the pipe keeps medspaCy's name
    component: Any = nlp.add_pipe(
        "medspacy_context" if nlp_dir is None else _register_factory(),
        name="medspacy_context",
        config={
            "rules": None,
            "span_attrs": dict(config.attributes),
            "input_span_type": input_span_type,
            "prune_on_target_overlap": config.prune_on_target_overlap,
        },
    )
    # medspaCy runs the pipeline over each literal to build its phrase patterns: only the
    # tokenizer is needed for that.
    with nlp.select_pipes(disable=nlp.pipe_names):
        component.add(as_phrases(config.rules, lambda w: [t.lower_ for t in nlp.make_doc(w)]))
    return component
