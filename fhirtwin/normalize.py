"""Normalize workers: raw source records → FHIR resources on ``fhir.resources``.

parse → map → validate → resolve identity → publish one event per message, keyed by twin
id, so that one patient's events stay in order on one partition. Input that fails any
stage goes to ``twin.deadletter`` with its original bytes, the stage, the reason and the
location; the worker goes on.

The event on ``fhir.resources`` (JSON)::

    {"v": 1, "twin": "<uuid>", "event_ms": 1700000000000,
     "source": {"kind": "hl7v2", "record": "ehr.hl7v2/0/42", "control_id": "..."},
     "identity": {"rule": "identifier", "linked": [...], "matched": [...]},
     "identifiers": ["system|value", ...], "merge_from": null,
     "resources": [{...}, ...]}
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fhirtwin import bus, metrics
from fhirtwin.crypto import (
    SEALED_HEADERS,
    CryptoError,
    KeyRing,
    open_raw_headers,
    seal_event,
)
from fhirtwin.erasure import ERASED_DROPPED
from fhirtwin.metrics import CONVERSION_ERRORS, LOSSES, observe_batch
from fhirtwin.mpi import MPIConfig, Resolver
from fhirtwin.redisconn import connect
from fhirtwin.twin import TwinStore, fhir_time_ms
from fhirtwin.worker import INFRA_ERRORS, Out, StreamWorker, dead_letter, internal_dead_letter

__all__ = ["SHARED_TWIN", "NormalizeWorker", "SourceError", "convert_record"]

log = logging.getLogger("fhirtwin.normalize")

SHARED_TWIN = "_shared"  # messages that name no patient (master files, queries)


class SourceError(Exception):
    """Input that cannot become FHIR: which stage, why, and where (JSON-ready)."""

    def __init__(self, stage: str, reason: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.stage, self.reason, self.error = stage, reason, error or {}


@dataclass(frozen=True, slots=True)
class Converted:
    """One unit of a source (a message, a document, a line): its resources, when it
    happened, its id at the source, and — when it holds no Patient resource — the
    identifiers (``system|value``) of the patient it is about."""

    resources: list[dict[str, Any]]
    event_ms: int | None
    control_id: str
    patient_identifiers: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()  # ``Type/id`` the source deleted (found in the twins by id)


# summed per message, written to the metric once per batch (NormalizeWorker.handle)
_LOSS_TALLY: dict[Any, int] = {}
_LOSS_KINDS = (
    "unmapped_segments",
    "unmapped_fields",
    "untranslated_codes",
    "assumptions",
    "errors",
)


def _hl7v2(value: bytes, validate: bool, mappings: Path | None) -> list[Converted]:
    from fhirtwin.conversion import (
        ConversionError,
        HL7ParseError,
        convert_hl7v2,
        validation_summary,
    )

    try:
        conv = convert_hl7v2(value, validate=validate, mappings=mappings)
    except HL7ParseError as exc:
        raise SourceError("parse", str(exc), exc.to_dict()) from exc
    except ConversionError as exc:
        raise SourceError("map", str(exc), exc.to_dict()) from exc
    report = conv.report
    for what in _LOSS_KINDS:  # the loss report, counted (fhirtwin_conversion_losses_total)
        if n := len(report.get(what) or ()):
            metrics.count(LOSSES, ("hl7v2", what), n, _LOSS_TALLY)
    problems = report.get("validation") or []
    control = str(report.get("message", {}).get("control_id", "") or "")
    if problems:
        raise SourceError(
            "validate",
            f"{validation_summary(report)}; then replay this dead letter",
            {"problems": problems[:50], "control_id": control},
        )
    bundle = conv.bundle
    resources = [e["resource"] for e in bundle.get("entry", ())]
    return [Converted(resources, fhir_time_ms(bundle.get("timestamp")), control)]


# Source kind → converter(record, validate, mappings) → units. HL7 v2 is built in; the
# other kinds are modules that define ``convert_record`` with that signature, imported
# when first needed (so a site without, say, the C-CDA extras still runs HL7 v2).
Converter = Callable[[bus.Record, bool, Path | None], list[Converted]]
CONVERTERS: dict[str, Converter] = {"hl7v2": lambda rec, v, m: _hl7v2(rec.value, v, m)}
PLUGINS = {
    "fhir": "fhirtwin.fhirsource",
    "csv": "fhirtwin.csvsource",
    "ccda": "fhirtwin.ccda",
    "notes": "fhirtwin.notes",
}


# -- notes inside other sources → ehr.notes ------------------------------------------

_TEXT_CONTENT = ("text/plain", "text/markdown", "text/x-markdown", "text/html")
_V2_TEXT_OBX = re.compile(rb"(?:^|[\r\n])OBX\|[^|\r\n]*\|(?:TX|FT)\|")


def _carries_text(kind: str, value: bytes) -> bool:
    """Raw records the notes reader takes whole: HL7 v2 with TX/FT OBX text, C-CDA."""
    if kind == "hl7v2":
        # the plain search first: ten times cheaper than the pattern's, which tries every
        # position of the message (most messages carry no text: ~1 µs instead of ~10)
        return (b"|TX|" in value or b"|FT|" in value) and bool(_V2_TEXT_OBX.search(value))
    return kind == "ccda"


def _text_docref(res: dict[str, Any]) -> bool:
    if res.get("resourceType") != "DocumentReference":
        return False
    for content in res.get("content") or ():
        att = content.get("attachment") if isinstance(content, dict) else None
        if isinstance(att, dict) and isinstance(att.get("data"), str):
            ctype = str(att.get("contentType") or "").split(";")[0].strip().lower()
            if ctype in _TEXT_CONTENT:
                return True
    return False


def _to_notes(
    keys: KeyRing, rec: bus.Record, value: bytes, key: bytes | None, identifiers: list[str]
) -> Out:
    headers = [
        ("fhirtwin-source-kind", b"notes"),
        ("fhirtwin-filename", rec.header("fhirtwin-filename", rec.ref).encode()),
        ("fhirtwin-derived-from", rec.ref.encode()),
    ]
    if identifiers:
        headers.append(("fhirtwin-patient-identifiers", orjson.dumps(identifiers)))
    sealed = [(k, keys.seal_raw(v) if k in SEALED_HEADERS else v) for k, v in headers]
    return Out(bus.RAW_TOPICS["notes"], keys.seal_raw(value), key, sealed)


def converter(kind: str) -> Converter | None:
    if kind not in CONVERTERS and kind in PLUGINS:
        try:
            module = importlib.import_module(PLUGINS[kind])
        except ModuleNotFoundError:
            return None
        CONVERTERS[kind] = module.convert_record
    return CONVERTERS.get(kind)


def convert_record(
    kind: str, rec: bus.Record, *, validate: bool, mappings: Path | None = None
) -> list[Converted]:
    conv = converter(kind)
    if conv is None:
        raise SourceError(
            "map",
            f"no converter for source kind {kind!r} yet",
            {"hint": f"known kinds: {', '.join(sorted(CONVERTERS))}"},
        )
    return conv(rec, validate, mappings)


class NormalizeWorker:
    def __init__(
        self,
        bootstrap: str,
        redis_url: str,
        kind: str = "hl7v2",
        *,
        validate: bool = True,
        mappings: Path | None = None,
        mpi: MPIConfig | None = None,
        group: str | None = None,
        notes_fanout: bool | None = None,
    ) -> None:
        self.kind = kind
        # Text notes that arrive inside other sources also go to ehr.notes, where the NLP
        # worker reads them (its own consumer group: NLP never slows the HL7 v2 feed).
        if notes_fanout is None:
            notes_fanout = os.environ.get("FHIRTWIN_NOTES_FANOUT", "1") != "0"
        self.notes_fanout = notes_fanout and kind != "notes"
        self.validate = validate
        self.mappings = mappings
        self.resolver = Resolver(connect(redis_url), mpi)
        self.store = TwinStore(self.resolver.r, self.resolver.keys)  # deletions: who holds it
        self.stream = StreamWorker(
            bootstrap, group or f"fhirtwin-normalize-{kind}", [bus.RAW_TOPICS[kind]], self.handle
        )

    def _notes_of(
        self, rec: bus.Record, conv: Converted, twin: str, identifiers: list[str]
    ) -> list[Out]:
        """DocumentReferences with text (Synthea's and Bulk exports' notes) → ehr.notes,
        with the patient's linked identifiers so the facts join the same twin."""
        if self.kind in ("hl7v2", "ccda"):
            return []  # these go whole (see _carries_text): the reader needs the source
        return [
            _to_notes(self.resolver.keys, rec, orjson.dumps(r), twin.encode(), identifiers)
            for r in conv.resources
            if _text_docref(r)
        ]

    def run(self, stop: threading.Event, idle_exit: float | None = None) -> int:
        return self.stream.run(stop, idle_exit=idle_exit)

    def _deletions(
        self, rec: bus.Record, conv: Converted, holders: dict[str, list[str]]
    ) -> list[Out]:
        """One ``fhir.resources`` event per twin that holds a deleted resource."""
        per_twin: dict[str, list[str]] = {}
        for ref in conv.deleted:
            for twin in holders[ref]:
                per_twin.setdefault(twin, []).append(ref)
        return [
            self._event(rec, conv, twin, {"rule": "deletion"}, [], None, [], deleted=refs)
            for twin, refs in sorted(per_twin.items())
        ]

    def _event(
        self,
        rec: bus.Record,
        conv: Converted,
        twin: str,
        identity: dict[str, Any],
        identifiers: list[str],
        merge_from: str | None,
        resources: list[dict[str, Any]],
        *,
        deleted: list[str] | None = None,
    ) -> Out:
        """The ``fhir.resources`` record of one unit for one twin, sealed with its key."""
        event: dict[str, Any] = {
            "v": 1,
            "twin": twin,
            "event_ms": conv.event_ms if conv.event_ms is not None else rec.timestamp_ms,
            "source": {
                "kind": self.kind,
                "record": rec.ref,
                "control_id": conv.control_id,
                "received_ms": rec.timestamp_ms,
                **({"replay_of": r} if (r := rec.header("fhirtwin-replay-of")) else {}),
            },
            "identity": identity,
            "identifiers": identifiers,
            "merge_from": merge_from,
            "resources": resources,
        }
        if deleted:
            event["deleted"] = deleted
        headers = [
            ("fhirtwin-source-kind", self.kind.encode()),
            ("fhirtwin-source-record", rec.ref.encode()),
        ]
        value = seal_event(self.resolver.keys, twin, orjson.dumps(event))
        return Out(bus.RESOURCES, value, twin.encode(), headers)

    def handle(self, recs: list[bus.Record]) -> list[list[Out]]:
        """Convert every record, read the identities the batch needs in one go (the MPI's
        ``prefetch``), then resolve and publish each record, in order. The data keys of
        the batch's new patients reach the disk together when it ends, before the worker
        writes anything sealed with them (``KeyRing.deferred``)."""
        t0 = time.perf_counter()
        with self.resolver.keys.deferred():
            outs = self._handle(recs)
        observe_batch(f"normalize-{self.kind}", time.perf_counter() - t0, len(recs))
        return outs

    def _handle(self, recs: list[bus.Record]) -> list[list[Out]]:
        staged = [self._convert(rec) for rec in recs]
        self.resolver.prefetch(
            (conv.resources, conv.patient_identifiers)
            for st in staged
            if isinstance(st, tuple)
            for conv in st[1]
            if conv.resources
        )
        outs: list[list[Out]] = []
        try:
            for sealed, st in zip(recs, staged, strict=True):
                if isinstance(st, list):
                    outs.append(st)
                    continue
                # A record that trips a bug is dead-lettered here, alone: were the batch
                # handled again one record at a time (the worker's fallback), the records
                # before it would be resolved twice and logged as known ("identifier")
                # instead of "new".
                try:
                    outs.append(self._route(sealed, *st))
                except INFRA_ERRORS:
                    raise
                except Exception as exc:
                    log.exception("normalize: record %s failed; dead-lettered", sealed.ref)
                    outs.append([internal_dead_letter(sealed, exc)])
        finally:
            self.resolver.forget()
            metrics.flush(_LOSS_TALLY)
        return outs

    def handle_one(self, sealed: bus.Record) -> list[Out]:
        return self.handle([sealed])[0]

    def _convert(self, sealed: bus.Record) -> list[Out] | tuple[bus.Record, list[Converted]]:
        """(the opened record, its converted units), or the dead letter it became."""
        try:  # raw records are sealed with an epoch key (fhirtwin/crypto.py)
            keys = self.resolver.keys
            rec = dataclasses.replace(
                sealed,
                value=keys.open_raw(sealed.value),
                headers=open_raw_headers(keys, sealed.headers),
            )
        except CryptoError as exc:
            CONVERSION_ERRORS.labels("decrypt", type(exc).__name__).inc()
            return [dead_letter(sealed, stage="decrypt", reason=str(exc))]
        try:
            converted = convert_record(
                self.kind, rec, validate=self.validate, mappings=self.mappings
            )
        except SourceError as exc:
            CONVERSION_ERRORS.labels(exc.stage, exc.error.get("error", exc.stage)[:60]).inc()
            # the dead letter keeps the original (sealed) bytes and headers
            return [dead_letter(sealed, stage=exc.stage, reason=exc.reason, error=exc.error)]
        return rec, converted

    def _route(self, sealed: bus.Record, rec: bus.Record, converted: list[Converted]) -> list[Out]:
        """Identity, then the ``fhir.resources`` events (and notes) of one converted record."""
        deleted = {ref for conv in converted for ref in conv.deleted}
        holders = {ref: self.store.holders(ref) for ref in sorted(deleted)}
        if unknown := [ref for ref, twins in holders.items() if not twins]:
            # Deleting what no twin holds is either a resource never seen or one whose record
            # is not assembled yet: keep the whole record, to replay (idempotent) later.
            CONVERSION_ERRORS.labels("map", "deletion of an unknown resource").inc()
            shown = ", ".join(unknown[:5])
            if len(unknown) > 5:
                shown += f" (and {len(unknown) - 5} more)"
            return [
                dead_letter(
                    sealed,
                    stage="map",
                    reason=f"{len(unknown)} DELETE(s) of resources no twin holds: {shown}; "
                    "if they arrive later (a record not yet applied), replay this dead letter",
                    error={"error": "deletion of an unknown resource", "refs": unknown[:1000]},
                )
            ]
        outs: list[Out] = []
        for conv in converted:
            if conv.deleted:
                outs += self._deletions(rec, conv, holders)
            if not conv.resources:
                continue
            identity = self.resolver.resolve(conv.resources, conv.patient_identifiers)
            if identity is not None and identity.rule == "erased":
                # the patient asked to be forgotten: nothing of this message is kept
                ERASED_DROPPED.labels(f"normalize-{self.kind}").inc()
                continue
            twin = identity.twin if identity else SHARED_TWIN
            outs.append(
                self._event(
                    rec,
                    conv,
                    twin,
                    identity.decision() if identity else {"rule": "no-patient"},
                    identity.identifiers if identity else [],
                    identity.merge_from if identity else None,
                    conv.resources,
                )
            )
            if self.notes_fanout:
                outs += self._notes_of(rec, conv, twin, identity.identifiers if identity else [])
        if self.notes_fanout and converted and _carries_text(self.kind, rec.value):
            outs.append(_to_notes(self.resolver.keys, rec, rec.value, rec.key, []))
        return outs
