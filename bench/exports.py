"""EHR-export converters: C-CDA documents/s (against python-fhir-converter), CSV rows/s,
Bulk NDJSON resources/s, and the peak RSS of each.

Usage (from the project root):
    .venv/bin/python bench/exports.py [--corpus DIR] [--runs 3] [--min-seconds 1] \\
        [--json bench/results/exports.json] [--skip-pfc] [--only ccda|csv|ndjson] [--no-pin]

Every measurement runs in a fresh child process of its own (one per converter and
validation setting), pinned to one CPU unless ``--no-pin``: a single process on one core, no
threads, no multiprocessing. The child reports its peak RSS (``VmHWM`` of
``/proc/self/status``) over everything it did: loading the input, a warm-up pass, and the
timed runs. Each timed run repeats the whole input until it lasts at least
``--min-seconds``; the table gives the **median** of ``--runs`` runs (the JSON keeps every
run and the best).

* **C-CDA.** The 17 C-CDA inputs of ``_index/oracle_pairs.csv`` plus every complete
  document (root element ``ClinicalDocument``) under ``hl7-c-cda-examples/``.
  ``fhirtwin.ccda.convert(data, source=..., validate=...)`` with validation off and on, and
  python-fhir-converter 0.3.0 (``CcdaRenderer().render_to_fhir(template, data)``, Microsoft's
  Liquid templates ported to Python), which lives in its own virtual environment
  (``bench/.venv-pfc/``, created on first use; it pins typing-extensions differently from
  us). A document that raises is a failure; the rates count the documents that convert,
  each timed on its own. The speed ratio is taken on the documents both convert.
* **CSV.** ``csvsource.convert_dir`` with the ``synthea`` profile on
  ``synthea-csv-fhir-10pt/output/csv``: rows/s.
* **NDJSON.** ``fhirsource.convert_files`` (what ``fhirtwin convert --from fhir --out DIR``
  runs) on ``smart-sample-bulk-fhir-10-patients``: resources/s, writing the patient
  Bundles to a temporary folder.

With validation on, the validation cache is emptied before every pass over the input
(only repeats within one pass hit). Goals (PASS/FAIL, reported, not asserted): C-CDA
>= 150 documents/s per core, >= 5x python-fhir-converter in the same run, no document of
the corpus fails. The exit code is 0 unless the bench itself broke. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Only the standard library at module level: the python-fhir-converter worker runs this
# same file with the interpreter of bench/.venv-pfc, where fhirtwin is not installed.

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
DEFAULT_JSON = BENCH_DIR / "results" / "exports.json"
DEFAULT_PFC_VENV = BENCH_DIR / ".venv-pfc"
PFC_PACKAGE = "python-fhir-converter"
PFC_VERSION = "0.3.0"
PFC_PIN = f"{PFC_PACKAGE}=={PFC_VERSION}"
GOAL_DOCS_PER_S = 150.0
GOAL_RATIO = 5.0
CSV_DIR = "synthea-csv-fhir-10pt/output/csv"
NDJSON_DIR = "smart-sample-bulk-fhir-10-patients"
ERROR_CHARS = 300

# Document type (C-CDA R2.1 document templateId 2.16.840.1.113883.10.20.22.1.N) → the
# python-fhir-converter root template. Types without a template of their own (US Realm
# Header only, Diagnostic Imaging, Unstructured, Care Plan, patient generated) use CCD.
CCDA_DOC_OID = "2.16.840.1.113883.10.20.22.1."
PFC_TEMPLATES = {
    "2": "CCD",
    "3": "HistoryandPhysical",
    "4": "ConsultationNote",
    "6": "ProcedureNote",
    "7": "OperativeNote",
    "8": "DischargeSummary",
    "9": "ProgressNote",
    "13": "TransferSummary",
    "14": "ReferralNote",
}
_TEMPLATE_ID = re.compile(rb'<(?:\w+:)?templateId\b[^>]*?\broot\s*=\s*"([0-9.]+)"')


# --------------------------------------------------------------------------- corpus


def default_corpus() -> Path:
    env = os.environ.get("FHIRTWIN_CORPUS")
    if env:
        return Path(env)
    return (PROJECT_ROOT / ".." / "shared" / "corpus").resolve()


def root_tag(path: Path) -> str | None:
    """Local name of the root element (the first start event), or None if not XML."""
    from xml.etree.ElementTree import ParseError, iterparse

    try:
        for _, elem in iterparse(str(path), events=("start",)):
            return elem.tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]
    except (ParseError, OSError, UnicodeDecodeError):
        return None
    return None


def well_formed(path: Path) -> str:
    """ "yes" for namespace-well-formed XML whose root is the HL7 v3 ClinicalDocument, else
    why not. Some hl7-c-cda-examples files are guide snippets wrapped in a ClinicalDocument
    root: no namespace, or xsi:/sdtc: prefixes used without a declaration."""
    from xml.etree.ElementTree import ParseError, parse

    try:
        root = parse(path).getroot()
    except ParseError as exc:
        return f"not namespace-well-formed XML: {exc}"
    if root.tag != "{urn:hl7-org:v3}ClinicalDocument":
        return f"root element {root.tag!r} is not ClinicalDocument in namespace urn:hl7-org:v3"
    return "yes"


def pfc_template(data: bytes) -> str:
    """The python-fhir-converter root template for a document, from its templateIds."""
    head = data[:16384]
    end = head.find(b"<recordTarget")
    for oid in _TEMPLATE_ID.findall(head if end < 0 else head[:end]):
        if oid.startswith(CCDA_DOC_OID.encode()):
            tpl = PFC_TEMPLATES.get(oid.decode()[len(CCDA_DOC_OID) :])
            if tpl:
                return tpl
    return "CCD"


def ccda_documents(corpus: Path) -> tuple[list[dict[str, str]], list[str]]:
    """[{id, path, set, template}], notes. ids are paths relative to the corpus."""
    docs: list[dict[str, str]] = []
    notes: list[str] = []
    seen: set[Path] = set()
    pairs = corpus / "_index" / "oracle_pairs.csv"
    if pairs.is_file():
        with pairs.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("kind") != "ccda":
                    continue
                path = (corpus / row["input"]).resolve()
                if path in seen:
                    continue
                if not path.is_file():
                    notes.append(f"oracle input missing: {row['input']}")
                    continue
                seen.add(path)
                docs.append(
                    {
                        "id": row["input"],
                        "path": str(path),
                        "set": "oracle_pairs",
                        "template": row.get("root_template_or_label") or "CCD",
                        "well_formed": well_formed(path),
                    }
                )
    else:
        notes.append(f"{pairs} not found: no oracle C-CDA documents")
    examples = corpus / "hl7-c-cda-examples"
    if examples.is_dir():
        fragments = 0
        for path in sorted(examples.rglob("*")):
            if not path.is_file() or path.suffix.lower() != ".xml":
                continue
            if root_tag(path) != "ClinicalDocument":
                fragments += 1
                continue
            path = path.resolve()
            if path in seen:
                continue
            seen.add(path)
            docs.append(
                {
                    "id": str(path.relative_to(corpus.resolve())),
                    "path": str(path),
                    "set": "hl7-c-cda-examples",
                    "template": pfc_template(path.read_bytes()),
                    "well_formed": well_formed(path),
                }
            )
        notes.append(f"hl7-c-cda-examples: {fragments} XML fragments (not documents) left out")
    else:
        notes.append(f"{examples} not found")
    return docs, notes


# --------------------------------------------------------------------------- child side


def memory() -> dict[str, float | None]:
    """This process's current and peak RSS in MiB (VmRSS, VmHWM; ru_maxrss as fallback)."""
    out: dict[str, float | None] = {"rss_mib": None, "peak_rss_mib": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mib"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    if out["peak_rss_mib"] is None:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) not in text:
        # some errors carry (message, partial output): keep the message
        args = cause.args
        ctext = args[0] if len(args) > 1 and isinstance(args[0], str) else str(cause)
        if len(ctext) > ERROR_CHARS:
            ctext = ctext[:ERROR_CHARS] + "…"
        text += f" (caused by {type(cause).__name__}: {ctext})"
    return text if len(text) <= 2 * ERROR_CHARS else text[: 2 * ERROR_CHARS] + "…"


def time_documents(
    convert: Callable[[dict[str, Any]], int],
    docs: list[dict[str, Any]],
    runs: int,
    min_seconds: float,
    before_pass: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Warm-up pass (finds the failures), then ``runs`` runs over the documents that
    converted, each repeating the pass ``reps`` times; every conversion is timed on its own,
    so the parent can take the rate of any subset. Seconds per document per run."""
    failures: dict[str, str] = {}
    resources: dict[str, int] = {}
    ok: list[dict[str, Any]] = []
    if before_pass:
        before_pass()
    for d in docs:
        try:
            resources[d["id"]] = convert(d)
        except Exception as exc:
            failures[d["id"]] = error_text(exc)
        else:
            ok.append(d)
    # a second, timed warm-up pass sets the repetitions per run
    if before_pass:
        before_pass()
    t0 = time.perf_counter()
    for d in ok:
        convert(d)
    one = time.perf_counter() - t0
    reps = max(1, math.ceil(min_seconds / max(one, 1e-9)))
    times = {d["id"]: [0.0] * runs for d in ok}
    perf = time.perf_counter
    for r in range(runs):
        for _ in range(reps):
            if before_pass:
                before_pass()
            for d in ok:
                t = perf()
                try:
                    convert(d)
                except Exception as exc:  # failed only in a timed run: still a failure
                    failures.setdefault(d["id"], f"in a timed run: {error_text(exc)}")
                times[d["id"]][r] += perf() - t
    for bad in failures:
        times.pop(bad, None)
    return {
        "documents": len(docs),
        "failures": failures,
        "resources": {k: v for k, v in resources.items() if k in times},
        "reps_per_run": reps,
        "seconds": times,
        "bytes": {d["id"]: len(d["data"]) for d in ok if d["id"] in times},
    }


def measure_passes(
    one_pass: Callable[[], int],
    runs: int,
    min_seconds: float,
    before_pass: Callable[[], None] | None = None,
) -> tuple[list[float], int, float]:
    """Items/s of each run (a run repeats the pass until it lasts min_seconds); before_pass
    runs outside the timing. Also the repetitions per run and one warm pass's seconds."""
    if before_pass:
        before_pass()
    one_pass()  # warm-up: imports, compiled rules, models
    if before_pass:
        before_pass()
    t0 = time.perf_counter()
    one_pass()  # a second, timed warm-up pass sets the repetitions per run
    warm = time.perf_counter() - t0
    reps = max(1, math.ceil(min_seconds / max(warm, 1e-9)))
    rates = []
    for _ in range(runs):
        spent = 0.0
        items = 0
        for _ in range(reps):
            if before_pass:
                before_pass()
            t0 = time.perf_counter()
            items += one_pass()
            spent += time.perf_counter() - t0
        rates.append(items / spent)
    return rates, reps, warm


def _fhirtwin_path() -> None:
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))


def _validation_hooks(validate: bool) -> tuple[Callable[[], None] | None, Callable[[], Any]]:
    """With validation on: a hook that empties the validation cache before every pass (and
    counts its hits), and the hit rate. Off: nothing (and nothing imported)."""
    if not validate:
        return None, lambda: None
    from fhirtwin import validation

    validation.set_cache_size(validation.DEFAULT_CACHE_SIZE)
    validation.clear_cache()
    totals = {"hits": 0, "misses": 0}

    def before() -> None:
        info = validation.cache_info()
        totals["hits"] += info["hits"]
        totals["misses"] += info["misses"]
        validation.clear_cache()

    def hit_rate() -> float | None:
        before()
        looked = totals["hits"] + totals["misses"]
        return totals["hits"] / looked if looked else None

    return before, hit_rate


def child_ccda(spec: dict[str, Any]) -> dict[str, Any]:
    _fhirtwin_path()
    validate = bool(spec["validate"])
    try:
        from fhirtwin import ccda

        convert_fn = ccda.convert
    except Exception as exc:  # missing, half written, or broken: report, do not crash
        return {
            "available": False,
            "reason": f"cannot import fhirtwin.ccda.convert: {error_text(exc)}",
        }
    before, hit_rate = _validation_hooks(validate)
    docs = [{**d, "data": Path(d["path"]).read_bytes()} for d in spec["docs"]]
    base = memory()

    def convert(d: dict[str, Any]) -> int:
        bundle = convert_fn(d["data"], source=d["id"], validate=validate)
        return len(bundle.get("entry") or ())

    out = time_documents(convert, docs, spec["runs"], spec["min_seconds"], before)
    out.update(available=True, what="fhirtwin.ccda.convert", validate=validate)
    out["validation_cache_hit_rate"] = hit_rate() if validate else None
    out["memory_after_load"] = base
    return out


def child_pfc(spec: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    from fhir_converter.renderers import CcdaRenderer  # type: ignore[import-not-found]

    renderer = CcdaRenderer()
    docs = [{**d, "data": Path(d["path"]).read_bytes()} for d in spec["docs"]]
    base = memory()

    def convert(d: dict[str, Any]) -> int:
        bundle = renderer.render_to_fhir(d["template"], d["data"])
        return len(bundle.get("entry") or ())

    out = time_documents(convert, docs, spec["runs"], spec["min_seconds"])
    out.update(
        available=True,
        what="fhir_converter.renderers.CcdaRenderer().render_to_fhir(template, bytes)",
        version=version(PFC_PACKAGE),
        python=platform.python_version(),
        templates={d["id"]: d["template"] for d in docs},
    )
    out["memory_after_load"] = base
    return out


def child_csv(spec: dict[str, Any]) -> dict[str, Any]:
    _fhirtwin_path()
    from fhirtwin import csvsource

    validate = bool(spec["validate"])
    before, hit_rate = _validation_hooks(validate)
    profile = csvsource.load_profile("synthea")
    inputs = [spec["input"]]
    base = memory()
    last: dict[str, Any] = {}

    def one_pass() -> int:
        groups, errors, rows = csvsource.convert_dir(inputs, profile, validate=validate)
        last.update(groups=groups, errors=errors, rows=rows)
        return sum(rows.values())

    rates, reps, warm = measure_passes(one_pass, spec["runs"], spec["min_seconds"], before)
    rows = sum(last["rows"].values())
    resources = sum(len(v) for v in last["groups"].values())
    return {
        "available": True,
        "what": "fhirtwin.csvsource.convert_dir(profile synthea)",
        "validate": validate,
        "rows": rows,
        "rows_per_table": last["rows"],
        "resources": resources,
        "bad_rows": len(last["errors"]),
        "bad_row_examples": [str(e) for e in last["errors"][:10]],
        "rates": rates,
        "resources_per_row": resources / rows if rows else None,
        "reps_per_run": reps,
        "warmup_seconds": warm,
        "validation_cache_hit_rate": hit_rate() if validate else None,
        "memory_after_load": base,
    }


def child_ndjson(spec: dict[str, Any]) -> dict[str, Any]:
    _fhirtwin_path()
    from fhirtwin import fhirsource

    validate = bool(spec["validate"])
    before, hit_rate = _validation_hooks(validate)
    inputs = [spec["input"]]
    base = memory()
    tmp = Path(tempfile.mkdtemp(prefix="fhirtwin-bench-exports-"))
    out = tmp / "out"
    last: dict[str, Any] = {}

    def cleanup() -> None:  # outside the timing: the previous pass's Bundles
        shutil.rmtree(out, ignore_errors=True)
        if before is not None:
            before()

    def one_pass() -> int:
        report = fhirsource.convert_files(inputs, out, validate=validate)
        last["report"] = report
        return report.read

    try:
        rates, reps, warm = measure_passes(one_pass, spec["runs"], spec["min_seconds"], cleanup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = last["report"]
    return {
        "available": True,
        "what": "fhirtwin.fhirsource.convert_files(out=temporary folder)",
        "validate": validate,
        "files": report.files,
        "resources": report.read,
        "written": sum(report.written.values()),
        "patients": report.patients,
        "invalid_resources": report.invalid_resources,
        "invalid_examples": report.invalid[:10],
        "unresolved_references": report.unresolved_count,
        "skipped": len(report.skipped),
        "rates": rates,
        "reps_per_run": reps,
        "warmup_seconds": warm,
        "validation_cache_hit_rate": hit_rate() if validate else None,
        "memory_after_load": base,
    }


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ccda": child_ccda,
    "pfc": child_pfc,
    "csv": child_csv,
    "ndjson": child_ndjson,
}


def child_main(part: str, spec_file: Path, out_file: Path) -> int:
    warnings.simplefilter("ignore")
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    if spec.get("cpu") is not None:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setaffinity(0, {spec["cpu"]})
    started = time.perf_counter()
    result = CHILDREN[part](spec)
    result["child_seconds"] = time.perf_counter() - started
    result["memory"] = memory()
    out_file.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------- parent side


def pin_cpu(no_pin: bool) -> tuple[int | None, str]:
    if no_pin:
        return None, "one process per measurement, not pinned (--no-pin)"
    try:
        cpu = min(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, "one process per measurement (not pinned: sched_setaffinity unavailable)"
    return cpu, f"one process per measurement, each pinned to CPU {cpu}"


def run_child(
    python: str | Path, part: str, spec: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Run one measurement in a fresh process; its result, or {"error": ...}."""
    with tempfile.TemporaryDirectory(prefix="fhirtwin-bench-exports-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec), encoding="utf-8")
        cmd = [str(python), str(Path(__file__).resolve()), "--child", part]
        cmd += ["--child-spec", str(spec_file), "--child-out", str(out_file)]
        try:
            proc = subprocess.run(
                cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:g} s"}
        if proc.returncode != 0 or not out_file.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
            return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}
        return dict(json.loads(out_file.read_text(encoding="utf-8")))


def _pip_reason(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip() and "is ignored" not in x]
    return " | ".join(lines[-3:]) or "no output"


def ensure_pfc_venv(venv: Path) -> tuple[Path | None, str]:
    """The venv's python with python-fhir-converter installed, creating it if needed;
    (None, reason) when that is not possible."""
    py = venv / "bin" / "python"
    probe = [
        str(py),
        "-c",
        "import importlib.metadata as m, fhir_converter.renderers; "
        f"print(m.version({PFC_PACKAGE!r}))",
    ]

    def installed() -> str | None:
        if not py.exists():
            return None
        r = subprocess.run(probe, capture_output=True, text=True, timeout=120)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        got = installed()
        if got == PFC_VERSION:
            return py, f"{venv} (existing, {PFC_PACKAGE} {got})"
        if not py.exists():
            print(f"creating {venv} for {PFC_PACKAGE}=={PFC_VERSION} …", flush=True)
            r = subprocess.run(
                [sys.executable, "-m", "venv", str(venv)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if r.returncode != 0:
                return None, f"python -m venv {venv} failed: {_pip_reason(r.stderr + r.stdout)}"
        print(f"installing {PFC_PACKAGE}=={PFC_VERSION} into {venv} …", flush=True)
        r = subprocess.run(
            [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", PFC_PIN],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode != 0:
            return None, f"pip install {PFC_PACKAGE}=={PFC_VERSION} failed: " + _pip_reason(
                r.stderr + r.stdout
            )
        got = installed()
        if got != PFC_VERSION:
            return None, f"{PFC_PACKAGE} does not import in {venv} after install (got {got})"
        return py, f"{venv} (created, {PFC_PACKAGE} {got})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def docs_rates(part: dict[str, Any], ids: list[str] | None = None) -> list[float]:
    """Documents/s of each run over ``ids`` (default: every document that converted)."""
    seconds: dict[str, list[float]] = part["seconds"]
    ids = list(seconds) if ids is None else ids
    if not ids:
        return []
    reps = part["reps_per_run"]
    runs = len(next(iter(seconds.values())))
    out = []
    for r in range(runs):
        spent = sum(seconds[i][r] for i in ids)
        out.append(len(ids) * reps / spent if spent > 0 else 0.0)
    return out


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def print_table(head: tuple[str, ...], cells: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    print(line(head))
    print("-" * len(line(head)))
    for c in cells:
        print(line(c))


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="corpus dir (default $FHIRTWIN_CORPUS or ../shared/corpus)",
    )
    ap.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="minimum length of one run")
    ap.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})"
    )
    ap.add_argument("--skip-pfc", action="store_true", help="do not run python-fhir-converter")
    ap.add_argument("--only", choices=("ccda", "csv", "ndjson"), help="run one part only")
    ap.add_argument(
        "--pfc-venv",
        type=Path,
        default=DEFAULT_PFC_VENV,
        help=f"python-fhir-converter's own venv (default {DEFAULT_PFC_VENV})",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin the children to one CPU")
    ap.add_argument(
        "--timeout", type=float, default=900.0, help="seconds allowed to each child process"
    )
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--child-spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_spec, args.child_out)

    corpus = (args.corpus or default_corpus()).resolve()
    if not corpus.is_dir():
        print(f"corpus {corpus} not found (set --corpus or $FHIRTWIN_CORPUS)", file=sys.stderr)
        return 2
    parts = [args.only] if args.only else ["ccda", "csv", "ndjson"]
    cpu, execution = pin_cpu(args.no_pin)
    load_before = os.getloadavg()
    machine = {
        "cpu_count": os.cpu_count(),
        "mem_total_gib": mem_total_gib(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "execution": execution,
        "loadavg_before": load_before,
    }
    mem = machine["mem_total_gib"]
    print(
        f"machine: {machine['cpu_count']} CPUs, {fmt(mem, 0)} GiB, Python {machine['python']} "
        f"({machine['platform']}); {execution}; load average {load_before[0]:.2f}"
    )
    print(
        f"method: warm-up pass, then median of {args.runs} runs, each ≥ {args.min_seconds:g} s; "
        "peak RSS = VmHWM of each child"
    )
    print(f"corpus: {corpus}")
    common = {"runs": args.runs, "min_seconds": args.min_seconds, "cpu": cpu}
    results: dict[str, Any] = {}
    broke: list[str] = []
    rows: list[dict[str, Any]] = []

    def child(name: str, python: str | Path, part: str, spec: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        print(f"  running {name} …", flush=True)
        res = run_child(python, part, {**common, **spec}, args.timeout)
        res["wall_seconds"] = round(time.perf_counter() - t0, 2)
        if "error" in res:
            broke.append(f"{name}: {res['error']}")
        results[name] = res
        return res

    def peak(res: dict[str, Any]) -> float | None:
        return (res.get("memory") or {}).get("peak_rss_mib")

    # ------------------------------------------------------------------ C-CDA
    docs: list[dict[str, str]] = []
    pfc_reason = "--skip-pfc"
    if "ccda" in parts:
        docs, notes = ccda_documents(corpus)
        n_oracle = sum(d["set"] == "oracle_pairs" for d in docs)
        size = sum(Path(d["path"]).stat().st_size for d in docs)
        print(
            f"C-CDA: {len(docs)} documents ({n_oracle} oracle_pairs + "
            f"{len(docs) - n_oracle} hl7-c-cda-examples), {size:,} bytes"
        )
        malformed = [d for d in docs if d["well_formed"] != "yes"]
        if malformed:
            print(
                f"  NOTE: {len(malformed)} of them are guide snippets with a ClinicalDocument root "
                "that are not well-formed HL7 v3 documents (no urn:hl7-org:v3 namespace, or "
                "undeclared xsi:/sdtc: prefixes); they stay in the set, marked [malformed] below"
            )
        for note in notes:
            print(f"  NOTE: {note}")
        results["ccda_documents"] = docs
        results["ccda_notes"] = notes
        if docs:
            for validate in (False, True):
                child(
                    f"ccda-validate-{'on' if validate else 'off'}",
                    sys.executable,
                    "ccda",
                    {"docs": docs, "validate": validate},
                )
            if not args.skip_pfc:
                pfc_py, pfc_reason = ensure_pfc_venv(args.pfc_venv.resolve())
                if pfc_py is not None:
                    print(f"  python-fhir-converter venv: {pfc_reason}")
                    child("pfc", pfc_py, "pfc", {"docs": docs})
                else:
                    print(f"  python-fhir-converter unavailable: {pfc_reason}")
                    results["pfc"] = {"available": False, "reason": pfc_reason}

    # ------------------------------------------------------------------ CSV, NDJSON
    for part, sub in (("csv", CSV_DIR), ("ndjson", NDJSON_DIR)):
        if part not in parts:
            continue
        src = corpus / sub
        if not src.is_dir():
            print(f"  NOTE: {src} not found: {part} skipped")
            results[part] = {"available": False, "reason": f"{src} not found"}
            continue
        for validate in (False, True):
            child(
                f"{part}-validate-{'on' if validate else 'off'}",
                sys.executable,
                part,
                {"input": str(src), "validate": validate},
            )

    # ------------------------------------------------------------------ report
    goals: list[dict[str, Any]] = []
    failure_lists: dict[str, dict[str, str]] = {}
    ft_off = results.get("ccda-validate-off", {})
    ft_on = results.get("ccda-validate-on", {})
    pfc = results.get("pfc", {})
    ratio: dict[str, Any] | None = None
    if "ccda" in parts and docs:
        for name, label in (
            ("ccda-validate-off", "C-CDA fhirtwin ccda.convert, validation off"),
            ("ccda-validate-on", "C-CDA fhirtwin ccda.convert, validation on (cold cache)"),
            ("pfc", f"C-CDA {PFC_PACKAGE} {PFC_VERSION} CcdaRenderer"),
        ):
            res = results.get(name)
            if res is None:
                rows.append({"what": label, "unit": "docs", "note": f"not run: {pfc_reason}"})
                continue
            if not res.get("available"):
                reason = res.get("error") or res.get("reason", "unavailable")
                rows.append({"what": label, "unit": "docs", "note": f"unavailable: {reason}"})
                continue
            rates = docs_rates(res)
            ok = len(res["seconds"])
            res_total = sum(res["resources"].values())
            med = statistics.median(rates) if rates else None
            res["docs_per_s_runs"] = rates
            res["docs_per_s_median"] = med
            res["docs_per_s_best"] = max(rates) if rates else None
            failure_lists[name] = res["failures"]
            size = sum(res["bytes"].values())
            note = (
                f"rate over the {ok} documents that convert ({size / 1e6:.2f} MB); "
                f"{res_total / max(ok, 1):.1f} resources/doc"
            )
            if med and ok:
                note += f"; {med * size / ok / 1e6:.2f} MB/s"
            if res.get("validation_cache_hit_rate") is not None:
                note += f"; cache hits {res['validation_cache_hit_rate']:.0%}"
            rows.append(
                {
                    "what": label,
                    "unit": "docs",
                    "n": res["documents"],
                    "failed": len(res["failures"]),
                    "rate": med,
                    "resources_per_s": med * res_total / ok if med and ok else None,
                    "peak_rss_mib": peak(res),
                    "runs": rates,
                    "note": note,
                }
            )
        if ft_off.get("available") and pfc.get("available"):
            both = sorted(set(ft_off["seconds"]) & set(pfc["seconds"]))
            ft_r, pfc_r = docs_rates(ft_off, both), docs_rates(pfc, both)
            if both:
                ratio = {
                    "documents": len(both),
                    "fhirtwin_docs_per_s": statistics.median(ft_r),
                    "pfc_docs_per_s": statistics.median(pfc_r),
                    "fhirtwin_runs": ft_r,
                    "pfc_runs": pfc_r,
                }
                ratio["ratio"] = ratio["fhirtwin_docs_per_s"] / ratio["pfc_docs_per_s"]
                rows.append(
                    {
                        "what": f"C-CDA speed ratio fhirtwin / {PFC_PACKAGE} (common subset)",
                        "unit": "×",
                        "n": len(both),
                        "rate": ratio["ratio"],
                        "note": f"on the {len(both)} documents both convert: fhirtwin "
                        f"{ratio['fhirtwin_docs_per_s']:,.1f} vs {ratio['pfc_docs_per_s']:,.1f} docs/s",
                    }
                )
    for part, unit, label in (
        ("csv", "rows", "CSV fhirtwin csvsource.convert_dir (synthea)"),
        ("ndjson", "resources", "NDJSON fhirtwin fhirsource.convert_files"),
    ):
        if part not in parts:
            continue
        for v in ("off", "on"):
            name = f"{part}-validate-{v}"
            what = f"{label}, validation {v}" + (" (cold cache)" if v == "on" else "")
            res = results.get(name)
            if res is None or not res.get("available"):
                reason = (res or results.get(part) or {}).get("error") or (
                    res or results.get(part) or {}
                ).get("reason", "not run")
                rows.append({"what": what, "unit": unit, "note": f"unavailable: {reason}"})
                continue
            med = statistics.median(res["rates"])
            if part == "csv":
                n, failed = res["rows"], res["bad_rows"]
                res_s = med * res["resources_per_row"] if res["resources_per_row"] else None
                note = (
                    f"{res['resources']} resources from {n} rows of "
                    f"{len(res['rows_per_table'])} tables"
                )
            else:
                n, failed = res["resources"], res["invalid_resources"]
                res_s = med
                note = (
                    f"{res['files']} files → {res['patients']} patient Bundles; "
                    f"{res['unresolved_references']} unresolved references"
                )
            if res.get("validation_cache_hit_rate") is not None:
                note += f"; cache hits {res['validation_cache_hit_rate']:.0%}"
            rows.append(
                {
                    "what": what,
                    "unit": unit,
                    "n": n,
                    "failed": failed,
                    "rate": med,
                    "resources_per_s": res_s,
                    "peak_rss_mib": peak(res),
                    "runs": res["rates"],
                    "note": note,
                }
            )

    print()
    head = ("what", "unit", "n", "failed", "per s", "resources/s", "peak RSS MiB")
    cells = [
        (
            r["what"],
            r["unit"],
            str(r.get("n", "-")),
            str(r.get("failed", "-")),
            fmt(r.get("rate"), 2 if r["unit"] == "×" else 1),
            fmt(r.get("resources_per_s")),
            fmt(r.get("peak_rss_mib")),
        )
        for r in rows
    ]
    print_table(head, cells)
    for r in rows:
        if r.get("note"):
            print(f"  * {r['what']}: {r['note']}")

    bad_input = {d["id"] for d in docs if d["well_formed"] != "yes"}
    for name, fails in failure_lists.items():
        total = results[name]["documents"]
        on_good = sum(1 for i in fails if i not in bad_input)
        print(
            f"\nfailures, {name}: {len(fails)} of {total} "
            f"({on_good} of the {total - len(bad_input)} well-formed HL7 v3 documents)"
        )
        results[name]["failures_on_well_formed"] = on_good
        for doc_id, err in sorted(fails.items()):
            mark = " [malformed]" if doc_id in bad_input else ""
            print(f"  {doc_id}{mark}: {err}")

    if "ccda" in parts and docs:

        def goal(
            name: str, value: float | None, target: str, ok: bool | None, why: str = ""
        ) -> None:
            goals.append({"goal": name, "value": value, "target": target, "pass": ok, "note": why})

        def unmeasured(res: dict[str, Any]) -> str:
            if res.get("available"):
                return "no document converts"
            return str(res.get("reason") or res.get("error") or "not run")

        def why_no_ratio() -> str:
            if not ft_off.get("available"):
                return "fhirtwin: " + (ft_off.get("reason") or ft_off.get("error", "not run"))
            if not pfc.get("available"):
                return f"{PFC_PACKAGE}: " + (pfc.get("reason") or pfc.get("error") or pfc_reason)
            return "no document converts with both"

        for res, mode in ((ft_off, "off"), (ft_on, "on")):
            med = res.get("docs_per_s_median")
            goal(
                f"C-CDA ≥ {GOAL_DOCS_PER_S:g} documents/s per core (validation {mode})",
                med,
                f"≥ {GOAL_DOCS_PER_S:g}",
                None if med is None else med >= GOAL_DOCS_PER_S,
                "" if med is not None else unmeasured(res),
            )
        goal(
            f"C-CDA ≥ {GOAL_RATIO:g}× {PFC_PACKAGE} in the same run (validation off)",
            ratio["ratio"] if ratio else None,
            f"≥ {GOAL_RATIO:g}",
            None if ratio is None else ratio["ratio"] >= GOAL_RATIO,
            "" if ratio else why_no_ratio(),
        )
        for res, mode in ((ft_off, "off"), (ft_on, "on")):
            avail = res.get("available")
            nfail = len(res["failures"]) if avail else None
            why = res.get("reason") or res.get("error", "not measured")
            if avail:
                good = len(docs) - len(bad_input)
                why = f"{res['failures_on_well_formed']} of them among the {good} well-formed"
            goal(
                f"no C-CDA document of the corpus fails (validation {mode})",
                nfail,
                "0 failures",
                None if nfail is None else nfail == 0,
                why,
            )
        print("\ngoals:")
        for g in goals:
            verdict = {True: "PASS", False: "FAIL", None: "n/a "}[g["pass"]]
            v = g["value"]
            value = "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:,.2f}"
            extra = f" — {g['note']}" if g["note"] else ""
            print(f"  {verdict}  {g['goal']}: {value} (target {g['target']}){extra}")

    machine["loadavg_after"] = os.getloadavg()
    print(f"\nload average after: {machine['loadavg_after'][0]:.2f}")
    if broke:
        print("\nTHE BENCH BROKE in these children:")
        for b in broke:
            print(f"  {b}")

    out: dict[str, Any] = {
        "benchmark": "exports",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "corpus": str(corpus),
        "runs": args.runs,
        "min_seconds_per_run": args.min_seconds,
        "rows": rows,
        "ccda_ratio": ratio,
        "goals": goals,
        "parts": results,
        "broke": broke,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nJSON: {args.json}")
    return 1 if broke else 0


if __name__ == "__main__":
    sys.exit(main())
