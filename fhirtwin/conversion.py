"""HL7 v2 bytes → FHIR R4 Bundle: the pure function the CLI and the pipeline call."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fhirtwin.hl7v2 import HL7ParseError, _msh18, parse, split_batch
from fhirtwin.mapping import ConversionError, Engine
from fhirtwin.rules import SenderProfile, load_rules

__all__ = [
    "Conversion",
    "ConversionError",
    "HL7ParseError",
    "convert_hl7v2",
    "convert_hl7v2_batch",
    "engine",
    "validation_summary",
]


@dataclass(frozen=True, slots=True)
class Conversion:
    """The Bundle, the loss report, and (when asked for) validation issues."""

    bundle: dict[str, Any]
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.report.get("validation")


def validation_summary(report: dict[str, Any]) -> str:
    """What the R4 models found wrong with a converted message, and what to do: "N FHIR
    validation problem(s), first: PATH (SEGMENT): ERROR; ...". A value of the message that
    was dropped as invalid (``report["errors"]``) often leaves a required element empty, so
    the first one is named; otherwise the fault is a mapping rule's."""
    problems = report.get("validation") or []
    first = problems[0]
    where = f" ({first['source']})" if first.get("source") else ""
    head = (
        f"{len(problems)} FHIR validation problem(s), first: {first['path']}{where}: "
        f"{first['error']}"
    )
    dropped = report.get("errors") or []
    if dropped:
        d = dropped[0]
        return (
            f"{head}; {len(dropped)} value(s) of the message were dropped as invalid, first "
            f"{d.get('field')}: {d.get('error')}: if that value was meant for the element, "
            "fix the message (or its sender profile), else the mapping rule"
        )
    return f"{head}; fix the mapping rule that makes that element"


@lru_cache(maxsize=4)
def engine(mappings: Path | None = None) -> Engine:
    """The compiled rules of a mappings folder (cached: compile once per process)."""
    return Engine(load_rules(mappings))


def _profile_for(eng: Engine, data: bytes) -> SenderProfile:
    # MSH-3/MSH-4 pick the profile before decoding, since it may force the charset.
    head = data[:512].lstrip(b"\xef\xbb\xbf\x0b \r\n")
    app = fac = ""
    if head.startswith(b"MSH") and len(head) > 4:
        parts = head.split(b"\r")[0].split(b"\n")[0].split(head[3:4])
        comp = head[4:5]
        if len(parts) > 3:
            app = parts[2].split(comp)[0].decode("latin-1")
            fac = parts[3].split(comp)[0].decode("latin-1")
    return eng.rules.sender_for(app, fac)


def convert_hl7v2(
    data: bytes | str,
    *,
    validate: bool = False,
    mappings: Path | None = None,
    profile: SenderProfile | None = None,
) -> Conversion:
    """Convert one HL7 v2 message. Raises HL7ParseError or ConversionError, nothing else.

    With ``validate=True`` every resource is checked against the FHIR R4 models
    (fhir.resources R4B); problems go to ``report["validation"]``.
    """
    eng = engine(mappings)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if profile is None:
        profile = _profile_for(eng, raw)
    charset = None
    if profile.charset and (not profile.trust_msh18 or not _msh18(raw)):
        charset = profile.charset
    msg = parse(raw, charset=charset)
    bundle, report = eng.convert(msg, profile)
    if validate:
        from fhirtwin.validation import validate_converted

        report["validation"] = validate_converted(bundle)
    return Conversion(bundle, report)


def convert_hl7v2_batch(
    data: bytes, *, validate: bool = False, mappings: Path | None = None
) -> list[Conversion | HL7ParseError | ConversionError]:
    """Convert every message of a batch file; a bad message yields its error, not an exception."""
    out: list[Conversion | HL7ParseError | ConversionError] = []
    for i, chunk in enumerate(split_batch(data)):
        try:
            out.append(convert_hl7v2(chunk, validate=validate, mappings=mappings))
        except HL7ParseError as exc:
            exc.message_index = i
            out.append(exc)
        except ConversionError as exc:
            out.append(exc)
    return out
