"""Clinical-note NLP speed: notes/s and KB/s on one core over MTSamples, and peak RSS.

Usage (from the project root):
    .venv/bin/python bench/notes.py [--corpus DIR] [--notes 500] [--runs 3] \\
        [--json bench/results/notes.json] [--no-pin]

Each row runs in a fresh child process of its own, pinned to one CPU (unless
``--no-pin``), single-threaded. The child loads the first ``--notes`` non-empty
MTSamples transcriptions, builds the pipeline (the load time is reported apart), does
one warm-up pass, then ``--runs`` timed passes over all the notes; the table gives the
median pass. Peak RSS is the child's ``VmHWM`` over everything it did.

Rows:

* ``analyse``: ``fhirtwin.nlp.pipeline().analyse_many`` — sentences, concepts,
  sections, ConText, measurements and sigs (what the NLP costs).
* ``notes → FHIR``: ``fhirtwin.notes.convert`` on each note as a plain-text note (the
  above plus reading and building the resources, the Provenance and the Bundle-ready
  dicts), validation off as on the pipeline's hot path.
* ``notes → FHIR, validated``: the same with every resource validated with R4B.
* ``medspaCy lean`` (reference): ``spacy.blank("en")`` + sentencizer + medspaCy target
  matcher with our lexicon + medspaCy ConText with its default rules, nothing else.

Goals (reported, not asserted): >= 200 notes/s per core for ``notes → FHIR``, peak RSS
<= 400 MB. The exit code is 0 unless the bench itself broke.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOAL_RATE = 200.0
GOAL_RSS_MB = 400.0
MODES = ("analyse", "convert", "convert-validated", "medspacy-lean")
LABELS = {
    "analyse": "analyse (NLP only)",
    "convert": "notes → FHIR",
    "convert-validated": "notes → FHIR, validated",
    "medspacy-lean": "medspaCy lean (reference)",
}


def corpus_dir(arg: str | None) -> Path:
    for c in (arg, os.environ.get("FHIRTWIN_CORPUS"), str(ROOT.parent / "shared" / "corpus")):
        if c and (Path(c) / "MANIFEST.md").is_file():
            return Path(c)
    sys.exit("corpus not found: pass --corpus DIR or set FHIRTWIN_CORPUS")


def load_notes(corpus: Path, n: int) -> list[str]:
    csv.field_size_limit(sys.maxsize)
    path = corpus / "mtsamples-clinspacy" / "data" / "mtsamples.csv"
    with path.open(newline="", encoding="utf-8") as fh:
        texts = [r["transcription"] for r in csv.DictReader(fh) if r["transcription"].strip()]
    return texts[:n]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, corpus: Path, n: int, runs: int) -> dict[str, Any]:
    texts = load_notes(corpus, n)
    t0 = time.perf_counter()
    if mode == "medspacy-lean":
        import medspacy  # noqa: F401  (registers the medspaCy pipeline factories)
        import spacy

        from fhirtwin.nlp import default_nlp_dir
        from fhirtwin.nlp_lexicon import load_lexicon, target_rules

        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        tm = nlp.add_pipe("medspacy_target_matcher")
        tm.add(target_rules(load_lexicon(default_nlp_dir()), default_nlp_dir()))
        nlp.add_pipe("medspacy_context")

        def one_pass() -> int:
            return sum(len(d.ents) for d in nlp.pipe(texts, batch_size=32))

    elif mode == "analyse":
        from fhirtwin.nlp import pipeline

        pipe = pipeline()

        def one_pass() -> int:
            return sum(len(a.mentions) + len(a.measurements) for a in pipe.analyse_many(texts))

    else:
        from fhirtwin import notes
        from fhirtwin.nlp import pipeline

        pipeline()
        validate = mode == "convert-validated"

        def one_pass() -> int:
            made = 0
            for i, text in enumerate(texts):
                for _, res in notes.convert(
                    text.encode(), source=f"n{i}", patient="Patient/bench", validate=validate
                ):
                    made += len(res)
            return made

    load_s = time.perf_counter() - t0
    items = one_pass()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    size_kb = sum(len(t.encode()) for t in texts) / 1024
    return {
        "mode": mode,
        "notes": len(texts),
        "kb": round(size_kb, 1),
        "load_s": round(load_s, 2),
        "items_per_pass": items,
        "seconds": [round(x, 3) for x in times],
        "notes_per_s": round(len(texts) / med, 1),
        "kb_per_s": round(size_kb / med, 1),
        "ms_per_note": round(1000 * med / len(texts), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus")
    ap.add_argument("--notes", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "notes.json")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    corpus = corpus_dir(args.corpus)
    if args.child:
        if not args.no_pin and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        print(json.dumps(child(args.child, corpus, args.notes, args.runs)))
        return 0
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--corpus", str(corpus)]
        cmd += ["--notes", str(args.notes), "--runs", str(args.runs)]
        cmd += ["--no-pin"] if args.no_pin else []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return 2
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    head = ("row", "notes", "KB", "notes/s", "KB/s", "ms/note", "load s", "peak RSS MB", "goal")
    cells = []
    for r in rows:
        goal = ""
        if r["mode"] == "convert":
            ok = r["notes_per_s"] >= GOAL_RATE and r["peak_rss_mb"] <= GOAL_RSS_MB
            goal = f"≥{GOAL_RATE:.0f}/s, ≤{GOAL_RSS_MB:.0f} MB: {'PASS' if ok else 'FAIL'}"
        cells.append(
            (
                LABELS[r["mode"]],
                str(r["notes"]),
                f"{r['kb']:.0f}",
                f"{r['notes_per_s']:.1f}",
                f"{r['kb_per_s']:.0f}",
                f"{r['ms_per_note']:.2f}",
                f"{r['load_s']:.2f}",
                f"{r['peak_rss_mb']:.0f}",
                goal,
            )
        )
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for c in cells:
        print("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)))
    print(
        f"\none process per row, {'not pinned' if args.no_pin else 'pinned to one CPU'}; "
        f"median of {args.runs} passes over {rows[0]['notes']} MTSamples notes; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "bench": "notes",
                "goal": {"notes_per_s": GOAL_RATE, "peak_rss_mb": GOAL_RSS_MB},
                "pinned": not args.no_pin,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
