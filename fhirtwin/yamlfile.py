"""YAML for the files people edit (rules, profiles, lexicons): a key given twice in one
mapping is an error that names both lines, never a silent overwrite.

PyYAML keeps the last of two equal keys: a rule file with two ``requires:`` blocks, or a
segment rule with two ``when:`` on one line, loads without a word and loses the first.
"""

from __future__ import annotations

from typing import IO, Any

import yaml

__all__ = ["load"]

# The C parser when libyaml is there (several times faster); the mapping check is ours.
_BASE: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE = "tag:yaml.org,2002:merge"


class _StrictLoader(_BASE):  # type: ignore[misc]
    pass


def _mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE:
            continue  # '<<: *base' then a key of its own: an override, as YAML means it
        key = loader.construct_object(key_node, deep=True)
        try:
            line = first.get(key)
        except TypeError:  # an unhashable key: PyYAML's own error says so below
            continue
        if line is not None:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"found the key {key!r} a second time (first on line {line + 1}); "
                "YAML would keep only the second: merge the two into one",
                key_node.start_mark,
            )
        first[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)  # type: ignore[arg-type]


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load(source: str | bytes | IO[Any]) -> Any:
    """``yaml.safe_load``, but a key given twice in one mapping raises yaml.YAMLError."""
    return yaml.load(source, Loader=_StrictLoader)
