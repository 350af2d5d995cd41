"""Check FHIR output against the R4 models (fhir.resources' R4B package).

R4B models accept R4 JSON unchanged; R5-only elements are rejected, which is
what we want from an R4 converter. Value-set bindings are not checked by the
models (see docs/architecture.md).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import ValidationError

__all__ = ["validate_bundle", "validate_resource"]


@cache
def _model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def validate_resource(resource: dict[str, Any], path: str = "") -> list[dict[str, str]]:
    """Problems with one resource, each with its JSON path; [] when it is valid."""
    rt = resource.get("resourceType", "")
    try:
        model = _model(rt)
    except (KeyError, ValueError):
        return [{"path": f"{path}.resourceType", "error": f"{rt!r} is not an R4 resource type"}]
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"] if x != "__root__")
            out.append({"path": f"{path}.{loc}" if loc else path, "error": err["msg"]})
        return out
    return []


def validate_bundle(bundle: dict[str, Any]) -> list[dict[str, str]]:
    """Problems in a Bundle: each entry's resource, then the Bundle shell."""
    problems: list[dict[str, str]] = []
    for i, entry in enumerate(bundle.get("entry", [])):
        res = entry.get("resource", {})
        for p in validate_resource(res, f"entry[{i}].resource"):
            lineage = next(
                (
                    e.get("valueString")
                    for e in res.get("extension", [])
                    if "source-segment" in e.get("url", "")
                ),
                None,
            )
            if lineage:
                p["source"] = lineage
            problems.append(p)
    shell = {k: v for k, v in bundle.items() if k != "entry"}
    problems.extend(validate_resource(shell, "Bundle"))
    return problems
