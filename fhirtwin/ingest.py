"""Files → raw topics (``ehr.<kind>``): original bytes, one record per message / line / file.

* hl7v2: each message of a file (batches and concatenated files are split; the bytes of
  each message are a slice of the file, unaltered), keyed by the patient's first PID-3
  identifier so that one patient's messages stay in order on one partition.
* fhir: a ``.ndjson`` file (FHIR Bulk export) line by line, read in bounded memory; any
  other file (a Bundle or one resource) as one record.
* csv: one record per data row; the header row travels in the ``fhirtwin-csv-header``
  header, so each record can be read alone.
* ccda, notes: one record per file.

Every record carries ``fhirtwin-source-kind``, ``fhirtwin-filename`` and
``fhirtwin-position`` (message index or line number) headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhirtwin import bus
from fhirtwin.crypto import default_keyring, seal_raw_record
from fhirtwin.hl7v2 import HL7ParseError, split_batch
from fhirtwin.mllp import inspect

__all__ = ["IngestRecord", "hl7v2_patient_key", "ingest", "records_of", "source_files"]

SUFFIXES = {
    "hl7v2": (".hl7", ".txt", ".msg", ".hl7v2"),
    "fhir": (".json", ".ndjson"),
    "csv": (".csv",),
    "ccda": (".xml", ".ccda", ".cda"),
    "notes": (".txt", ".note", ".md", ".json", ".ndjson", ".xml", ".ccda", ".cda", ".hl7"),
}


@dataclass(frozen=True, slots=True)
class IngestRecord:
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]


def hl7v2_patient_key(message: bytes) -> bytes | None:
    """The patient's first PID-3 identifier (as the MLLP listener keys it), or None when the
    message has no PID or cannot be read (it still goes in: normalize dead-letters it)."""
    try:
        return inspect(message).key
    except HL7ParseError:
        return None


def source_files(paths: Iterable[str], kind: str) -> Iterator[Path]:
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in SUFFIXES[kind]:
                    yield child
        else:
            yield path


def records_of(path: Path, kind: str) -> Iterator[IngestRecord]:
    """The raw records of one file (streaming for NDJSON and CSV)."""
    base = [("fhirtwin-source-kind", kind.encode()), ("fhirtwin-filename", path.name.encode())]
    if kind == "hl7v2":
        data = path.read_bytes()
        for i, msg in enumerate(split_batch(data) or [data]):
            yield IngestRecord(
                msg, hl7v2_patient_key(msg), [*base, ("fhirtwin-position", str(i).encode())]
            )
    elif kind == "fhir" and path.suffix.lower() == ".ndjson":
        with path.open("rb") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    yield IngestRecord(
                        line.rstrip(b"\r\n"),
                        None,
                        [
                            *base,
                            ("fhirtwin-position", str(n).encode()),
                            ("content-type", b"application/fhir+ndjson"),
                        ],
                    )
    elif kind == "csv":
        with path.open("rb") as fh:
            header = fh.readline().rstrip(b"\r\n")
            for n, line in enumerate(fh, 2):
                if line.strip():
                    yield IngestRecord(
                        line.rstrip(b"\r\n"),
                        None,
                        [
                            *base,
                            ("fhirtwin-position", str(n).encode()),
                            ("fhirtwin-csv-header", header),
                        ],
                    )
    else:
        yield IngestRecord(path.read_bytes(), None, [*base, ("fhirtwin-position", b"0")])


def ingest(
    bootstrap: str,
    kind: str,
    paths: Iterable[str],
    *,
    progress: Callable[[int], None] | None = None,
    headers: Sequence[tuple[str, bytes]] = (),
) -> dict[str, int]:
    """Put every record of ``paths`` on ``ehr.<kind>``; returns counts. Raises on a write
    that Kafka did not acknowledge (nothing is reported as ingested that is not durable)."""
    if kind not in bus.RAW_TOPICS:
        raise ValueError(f"unknown source kind {kind!r}; one of {', '.join(bus.SOURCE_KINDS)}")
    topic = bus.RAW_TOPICS[kind]
    producer: Any = bus.producer(bootstrap, linger_ms=5)
    failures: list[str] = []
    counts = {"files": 0, "records": 0, "bytes": 0}

    def delivered(err: object, msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    extra = list(headers)
    keys = default_keyring()  # sealed with today's epoch key (fhirtwin/crypto.py)
    for path in source_files(paths, kind):
        counts["files"] += 1
        for rec in records_of(path, kind):
            record_headers = [
                *rec.headers,
                *extra,
                ("fhirtwin-received-at", str(int(time.time() * 1000)).encode()),
            ]
            value, key, sealed = seal_raw_record(keys, rec.value, rec.key, record_headers)
            while True:
                try:
                    producer.produce(topic, value, key, headers=sealed, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
            counts["records"] += 1
            counts["bytes"] += len(rec.value)
            if progress is not None:
                progress(1)
    left = producer.flush(60)
    if left or failures:
        raise RuntimeError(
            f"Kafka did not acknowledge {left + len(failures)} records "
            f"({'; '.join(failures[:3]) or 'timeout'}); run ingest again (the pipeline is idempotent)"
        )
    return counts
