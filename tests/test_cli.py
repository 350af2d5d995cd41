"""The command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "hl7v2"


def _fhirtwin(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fhirtwin.cli", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )


def test_convert_writes_one_bundle_per_message_and_reports(tmp_path: Path) -> None:
    res = _fhirtwin("convert", "--from", "hl7v2", str(EXAMPLES), "--out", str(tmp_path), "--report")
    assert res.returncode == 0, res.stderr.decode()
    names = sorted(p.name for p in tmp_path.glob("*.json") if not p.name.endswith(".report.json"))
    stems = sorted(p.stem for p in EXAMPLES.glob("*.hl7") if p.stem != "batch-adt")
    assert names == sorted([f"{s}.json" for s in stems] + ["batch-adt-1.json", "batch-adt-2.json"])
    report = json.loads((tmp_path / "adt-a01-admit.report.json").read_text())
    assert report["message"]["control_id"] == "ADT0001"
    assert "messages converted" in res.stdout.decode()


def test_stdin_to_stdout() -> None:
    data = (EXAMPLES / "adt-a01-admit.hl7").read_bytes()
    res = _fhirtwin("convert", "--from", "hl7v2", "-", stdin=data)
    assert res.returncode == 0, res.stderr.decode()
    bundle = json.loads(res.stdout)
    assert bundle["resourceType"] == "Bundle"


def test_bad_message_exits_nonzero_but_converts_the_rest(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.hl7").write_bytes((EXAMPLES / "adt-a01-admit.hl7").read_bytes())
    (tmp_path / "in" / "bad.hl7").write_bytes(b"EVN|A01\rPID|1\r")
    res = _fhirtwin(
        "convert", "--from", "hl7v2", str(tmp_path / "in"), "--out", str(tmp_path / "o")
    )
    assert res.returncode == 1
    assert (tmp_path / "o" / "good.json").is_file()
    assert not (tmp_path / "o" / "bad.json").exists()
    assert "bad: " in res.stderr.decode() and "MSH" in res.stderr.decode()
