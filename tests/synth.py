"""A synthetic HL7 v2 feed for pipeline tests: the shipped examples, re-addressed.

Message *i* is example template ``i % len(templates)`` for patient ``i % patients``: the
MRNs of the examples become ``MRN<patient>``, MSH-10 becomes ``SYN<i>`` and MSH-7 moves
forward one second per message, so a run of any length has a known set of patients,
distinct messages and a clinical order.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from fhirtwin.hl7v2 import split_batch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "hl7v2"
START = datetime(2026, 11, 1)


def templates() -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(EXAMPLES.glob("*.hl7")):
        out.extend(split_batch(path.read_bytes()))
    return out


def mrn(patient: int) -> str:
    return f"MRN{patient:07d}"


def message(i: int, patients: int, tmpl: list[bytes]) -> bytes:
    msg = tmpl[i % len(tmpl)]
    p = mrn(i % patients).encode()
    msg = msg.replace(b"MRN448812", p).replace(b"MRN550021", p)
    lines = msg.split(b"\r")
    fields = lines[0].split(b"|")
    fields[6] = (START + timedelta(seconds=i)).strftime("%Y%m%d%H%M%S-0500").encode()
    fields[9] = f"SYN{i:07d}".encode()
    lines[0] = b"|".join(fields)
    return b"\r".join(lines)


def feed(n: int, patients: int) -> list[bytes]:
    tmpl = templates()
    return [message(i, patients, tmpl) for i in range(n)]
