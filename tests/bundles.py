"""Helpers the rule tests share: find resources in a converted Bundle and check its links."""

from __future__ import annotations

from typing import Any


def resources(conv: Any, rtype: str) -> list[dict[str, Any]]:
    """Every resource of one type in a Conversion's Bundle."""
    return [e["resource"] for e in conv.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def one(conv: Any, rtype: str) -> dict[str, Any]:
    """The single resource of a type (fails if there are none or several)."""
    found = resources(conv, rtype)
    assert len(found) == 1, f"{len(found)} {rtype} resources"
    return found[0]


def by_ref(conv: Any, ref: dict[str, str]) -> dict[str, Any]:
    """The resource a {'reference': 'Type/id'} points to, which must be in the Bundle."""
    rtype, rid = ref["reference"].split("/")
    for res in resources(conv, rtype):
        if res["id"] == rid:
            return res
    raise AssertionError(f"{ref['reference']} is not in the bundle")


def assert_references_resolve(conv: Any) -> None:
    """Every relative reference in the Bundle points at one of its entries."""
    present = {
        f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in conv.bundle["entry"]
    }

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str) and "/" in ref and not ref.startswith("Bundle"):
                assert ref in present, f"dangling reference {ref}"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(conv.bundle)
