"""Turn the HL7 v2-to-FHIR IG's code system CSVs into codes/*.yaml rule files.

Run once when the IG changes; the YAML files are then ours to edit (a site's
local codes go into its sender profile, not here). Usage:

    python tools/import_ig_codes.py ../shared/corpus/hl7-v2-to-fhir/mappings/codesystems \
        mappings/hl7v2/codes
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import yaml


def _name(path: Path) -> str:
    m = re.search(r"Concept Map_ (.+?) - ", path.name)
    title = m.group(1) if m else path.stem
    return re.sub(r"\[(.+?)\]", r"-\1", title).replace(".", "-").replace(" ", "")


def _v2_system(table: str) -> str | None:
    m = re.fullmatch(r"HL7(\d{4})", table.strip())
    return f"http://terminology.hl7.org/CodeSystem/v2-{m.group(1)}" if m else None


def convert(src: Path, out_dir: Path) -> Path | None:
    rows = list(csv.reader(src.open(encoding="utf-8-sig")))
    body = [r for r in rows[2:] if len(r) > 9 and r[0].strip()]
    if not body:
        return None
    tables = {r[2].strip() for r in body if r[2].strip()}
    targets = {r[9].strip() for r in body if r[9].strip()}
    mapping: dict[str, dict[str, str] | str] = {}
    for r in body:
        code, target_code, display, target_sys = (
            r[0].strip(),
            r[6].strip(),
            r[8].strip(),
            r[9].strip(),
        )
        if not target_code or code in mapping:
            continue
        entry = {"code": target_code}
        if display:
            entry["display"] = display
        if target_sys and (len(targets) > 1):
            entry["system"] = target_sys
        mapping[code] = entry
    doc = {
        "name": _name(src),
        "source": _v2_system(next(iter(tables))) if len(tables) == 1 else None,
        "target": next(iter(targets)) if len(targets) == 1 else None,
        "map": mapping,
    }
    out = out_dir / f"{doc['name']}.yaml"
    header = (
        f"# From the HL7 v2-to-FHIR IG concept map '{src.name}' (Apache-2.0),\n"
        "# converted by tools/import_ig_codes.py. Edit freely; site-specific codes belong\n"
        "# in the sender profile's code_maps.\n"
    )
    out.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return out


def main() -> None:
    src_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for src in sorted(src_dir.glob("*.csv")):
        if convert(src, out_dir):
            n += 1
    print(f"wrote {n} code maps to {out_dir}")


if __name__ == "__main__":
    main()
