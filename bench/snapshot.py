"""Consent evaluation, snapshot building and audit appends: throughput on one core.

Usage (from the project root):
    .venv/bin/python bench/snapshot.py [--corpus DIR] [--runs 5] [--min-seconds 1] \
        [--json OUT] [--profile 20] [--no-pin] [--no-redis]

Twins are real patients of the corpus (the Synthea FHIR bundles of ``synthea-csv-fhir-10pt``
and the patients of ``smart-sample-bulk-fhir-10-patients``), each with a privacy and a research
Consent written here, in two flavours: a simple root permit, and a nested one (deny a class to
one actor, deny by sensitivity and confidentiality label, deny old data by dataPeriod with a
depth-2 permit inside, deny by code). On ONE core (one process, pinned unless --no-pin), the
median of ``--runs`` runs, each repeating the pass until it lasts ``--min-seconds``, of:

* consent evaluation: ``Policy.decide(resource)`` on every resource of every twin, and the
  cost of ``prepare`` per twin on its own;
* snapshot building for a care subscriber (no de-identification) and a research subscriber
  (Safe Harbor): what ``SnapshotPublisher.evaluate`` does for one twin and one subscriber,
  prepare, request and per-resource decisions, reference pruning, de-identification, the
  state Parameters, the Bundle and its bytes, with the Redis and Kafka calls left out;
* audit appends: ``MerkleLog.append`` / ``extend`` (batches of 1 and 1000) on ``DictStore``
  and on ``RedisNodeStore`` against a private Redis, and checkpoint signing.

See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import math
import os
import platform
import pstats
import resource
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from bench._scratch import private_home  # noqa: E402
from fhirtwin.consent import Policy, prepare  # noqa: E402
from fhirtwin.merkle import (  # noqa: E402
    DictStore,
    MerkleLog,
    generate_key,
    parse_signer_key,
    sign_checkpoint,
)
from fhirtwin.snapshot import (  # noqa: E402
    audit_decision,
    audit_disclosure,
)
from fhirtwin.snapshot import build_snapshot as build_bundle  # noqa: E402
from fhirtwin.subscribers import Subscriber, make_subscriber  # noqa: E402
from fhirtwin.twin import STATE_LATEST, STATE_SETS, clinical_time_ms, state_op  # noqa: E402

DEFAULT_JSON = BENCH_DIR / "results" / "snapshot.json"
GOAL_RESOURCES = 20_000.0
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

SCOPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/consentscope"
RTYPES = "http://hl7.org/fhir/resource-types"
ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
ACTREASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SNOMED = "http://snomed.info/sct"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CARE_ACTOR = "urn:oid:1.2.3|sim-care"
RESEARCH_ACTOR = "urn:oid:1.2.3|sim-research"
# Every LABEL_EVERY-th Condition is labelled PSY and every LABEL_EVERY-th Observation R, so
# that the label provisions of the nested consent have something to withhold.
LABEL_EVERY = 10


@dataclass
class Twin:
    name: str
    source: str
    patient_id: str
    data: list[dict[str, Any]]  # the patient's resources, without consents
    state: dict[str, Any]
    pseudonym: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class Row:
    section: str
    what: str
    unit: str
    rate: float  # units/s, median of the runs
    per_unit_us: float
    goal: float | None = None
    runs: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.goal is None:
            return ""
        return "PASS" if self.rate >= self.goal else "FAIL"


# --------------------------------------------------------------------------- corpus


def default_corpus() -> Path:
    env = os.environ.get("FHIRTWIN_CORPUS")
    if env:
        return Path(env)
    for base in (Path.cwd(), PROJECT_ROOT):
        cand = (base / ".." / "shared" / "corpus").resolve()
        if cand.is_dir():
            return cand
    return (PROJECT_ROOT / ".." / "shared" / "corpus").resolve()


def derive_state(resources: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The twin's derived state as ``TwinStore.state`` returns it, computed in memory with
    the store's own ``state_op`` (sets; latest-by-code by clinical time)."""
    sets: dict[str, set[str]] = {n: set() for n in STATE_SETS}
    latest: dict[str, dict[str, tuple[int, str]]] = {n: {} for n in STATE_LATEST}
    for r in resources:
        op = state_op(r)
        if not op:
            continue
        ref = f"{r['resourceType']}/{r['id']}"
        kind, name, rest = op.split(":", 2)
        sign, _, code = rest.partition(":")
        if kind == "set" and sign == "+":
            sets[name].add(ref)
        elif kind == "latest" and sign == "+":
            t = clinical_time_ms(r) or 0
            if code not in latest[name] or latest[name][code][0] <= t:
                latest[name][code] = (t, ref)
    state: dict[str, Any] = {n: sorted(v) for n, v in sets.items()}
    for n, v in latest.items():
        state[n] = {code: ref for code, (_, ref) in sorted(v.items())}
    return state


def _label(resources: list[dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    for r in resources:
        rtype = r.get("resourceType")
        if rtype not in ("Condition", "Observation"):
            continue
        counts[rtype] = counts.get(rtype, 0) + 1
        if counts[rtype] % LABEL_EVERY:
            continue
        label = (
            {"system": ACTCODE, "code": "PSY"}
            if rtype == "Condition"
            else {"system": CONF, "code": "R"}
        )
        meta = dict(r.get("meta") or {})
        meta["security"] = [*meta.get("security", []), label]
        r["meta"] = meta


def _twin(name: str, source: str, resources: list[dict[str, Any]]) -> Twin | None:
    patient = next((r for r in resources if r.get("resourceType") == "Patient"), None)
    if patient is None:
        return None
    resources = [r for r in resources if r.get("resourceType") != "Consent"]
    _label(resources)
    resources.sort(key=lambda r: (r["resourceType"], r["id"]))  # as TwinStore.resources
    return Twin(name, source, str(patient["id"]), resources, derive_state(resources))


def load_twins(root: Path) -> tuple[list[Twin], str]:
    twins: list[Twin] = []
    synthea = root / "synthea-csv-fhir-10pt" / "output" / "fhir"
    for path in sorted(synthea.glob("*_*_*.json")):
        doc = orjson.loads(path.read_bytes())
        t = _twin(path.stem[:24], "synthea", [e["resource"] for e in doc.get("entry", [])])
        if t:
            twins.append(t)
    bulk = root / "smart-sample-bulk-fhir-10-patients"
    everything: list[dict[str, Any]] = []
    for f in sorted(bulk.glob("*.ndjson")):
        if f.name != "log.ndjson":
            everything += [orjson.loads(line) for line in f.read_bytes().splitlines() if line]
    dumped = [(r, orjson.dumps(r)) for r in everything if r.get("resourceType") != "Patient"]
    for p in (r for r in everything if r.get("resourceType") == "Patient"):
        ref = f'"Patient/{p["id"]}"'.encode()
        mine = [p] + [copy.deepcopy(r) for r, text in dumped if ref in text]
        t = _twin(f"bulk-{str(p['id'])[:8]}", "smart-bulk", mine)
        if t:
            twins.append(t)
    if twins:
        return twins, ""
    # No corpus: one twin per example HL7 v2 message set, converted here.
    from fhirtwin.conversion import convert_hl7v2
    from fhirtwin.hl7v2 import split_batch

    by_ref: dict[str, dict[str, Any]] = {}
    for p in sorted((PROJECT_ROOT / "examples" / "hl7v2").glob("*.hl7")):
        for m in split_batch(p.read_bytes()):
            try:
                bundle = convert_hl7v2(m, validate=False).bundle
            except Exception:
                continue
            for e in bundle.get("entry", []):
                r = e["resource"]
                by_ref.setdefault(f"{r['resourceType']}/{r['id']}", r)
    t = _twin("examples", "examples/hl7v2", list(by_ref.values()))
    note = f"corpus {root} not found: one twin converted from examples/hl7v2"
    return ([t] if t else []), note


# --------------------------------------------------------------------------- consents


def _consent(cid: str, patient_id: str, scope: str, provision: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": cid,
        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
        "status": "active",
        "scope": {"coding": [{"system": SCOPE_SYSTEM, "code": scope}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateTime": "2024-01-01T00:00:00Z",
        "policyRule": {"coding": [{"system": ACTCODE, "code": "OPTIN"}]},
        "provision": provision,
    }


def simple_consents(patient_id: str) -> list[dict[str, Any]]:
    """A root permit for care (privacy scope) and one for research (HRESCH)."""
    return [
        _consent(
            "privacy-simple",
            patient_id,
            "patient-privacy",
            {"type": "permit", "period": {"start": "2020-01-01"}},
        ),
        _consent(
            "research-simple",
            patient_id,
            "research",
            {
                "type": "permit",
                "period": {"start": "2020-01-01"},
                "purpose": [{"system": ACTREASON, "code": "HRESCH"}],
            },
        ),
    ]


def _nested(actor: str) -> list[dict[str, Any]]:
    system, _, value = actor.partition("|")
    return [
        {  # one class withheld from one actor
            "type": "deny",
            "actor": [
                {
                    "role": {"coding": [{"system": PARTICIPATION, "code": "IRCP"}]},
                    "reference": {"identifier": {"system": system, "value": value}},
                }
            ],
            "class": [{"system": RTYPES, "code": "Procedure"}],
        },
        {  # sensitivity label
            "type": "deny",
            "securityLabel": [{"system": ACTCODE, "code": "PSY"}],
        },
        {  # confidentiality high-water mark: R and V withheld
            "type": "deny",
            "securityLabel": [{"system": CONF, "code": "R"}],
        },
        {  # old results withheld, except allergies and immunizations (depth 2)
            "type": "deny",
            "dataPeriod": {"end": "2000-01-01"},
            "class": [
                {"system": RTYPES, "code": c}
                for c in ("Observation", "DiagnosticReport", "Encounter", "AllergyIntolerance")
            ],
            "provision": [
                {
                    "type": "permit",
                    "class": [{"system": RTYPES, "code": "AllergyIntolerance"}],
                }
            ],
        },
        {  # HIV and substance-use diagnoses withheld
            "type": "deny",
            "code": [
                {"system": SNOMED, "code": c}
                for c in ("86406008", "62479008", "66214007", "7200002")
            ],
        },
    ]


def nested_consents(patient_id: str) -> list[dict[str, Any]]:
    """Root permits with five deny provisions (one with a nested permit), for each scope."""
    return [
        _consent(
            "privacy-nested",
            patient_id,
            "patient-privacy",
            {
                "type": "permit",
                "period": {"start": "2020-01-01"},
                "provision": _nested(CARE_ACTOR),
            },
        ),
        _consent(
            "research-nested",
            patient_id,
            "research",
            {
                "type": "permit",
                "period": {"start": "2020-01-01"},
                "purpose": [{"system": ACTREASON, "code": "HRESCH"}],
                "provision": _nested(RESEARCH_ACTOR),
            },
        ),
    ]


CONSENT_KINDS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "simple": simple_consents,
    "nested": nested_consents,
}


# --------------------------------------------------------------------------- snapshot


def _ref(res: dict[str, Any]) -> str:
    return f"{res.get('resourceType')}/{res.get('id')}"


def build_snapshot(
    twin: Twin,
    resources: list[dict[str, Any]],
    consents: list[dict[str, Any]],
    sub: Subscriber,
    request: dict[str, Any],
    *,
    audit: bool = False,
) -> tuple[int, int, bytes]:
    """``SnapshotPublisher.evaluate`` + ``_snapshot`` for one twin and one subscriber, in
    memory: (resources decided, resources sent, Bundle bytes).

    The Redis calls are replaced: the twin's resources and state are given; the pseudonym
    is the twin's fixed one (Registry.pseudonym is stable); the random resource ids that
    ``Registry.resource_ids`` makes with ``uuid4`` are made here the same way. With
    ``audit`` the AuditEvents (one per decision group, one disclosure) are built and
    serialized too.
    """
    policy = prepare(consents, request, now=NOW, known=resources)
    req = policy.decide()
    if not req.allowed:
        return 0, 0, b""
    events: list[dict[str, Any]] = []
    if audit:
        events.append(
            audit_decision(sub, twin.name, twin.patient_id, req, now=NOW, level="request")
        )
    wanted = [r for r in resources if sub.wants(str(r.get("resourceType")))]
    permitted: list[dict[str, Any]] = []
    groups: dict[str, tuple[Any, list[str]]] = {}
    for r in wanted:
        d = policy.decide(r)
        if d.allowed:
            permitted.append(r)
        if audit:
            gk = orjson.dumps(
                [d.decision, d.allowed, list(d.deciding), list(d.consents)],
                option=orjson.OPT_SORT_KEYS,
            ).decode()
            groups.setdefault(gk, (d, []))[1].append(_ref(r))
    for d, refs in groups.values():
        events.append(
            audit_decision(
                sub, twin.name, twin.patient_id, d, now=NOW, level="resource", resources=refs
            )
        )
    deid = sub.deidentify == "safe-harbor"
    key = twin.pseudonym if deid else twin.name
    built = build_bundle(
        permitted,
        twin.state,
        deidentify=deid,
        key=key,
        new_ids=lambda refs: {r: str(uuid.uuid4()) for r in refs},  # as the registry does
        now=NOW,
    )
    bundle, refs, sent, snapshot_id = built.bundle, built.refs, built.sent, built.id
    data = orjson.dumps(bundle, option=orjson.OPT_SORT_KEYS)
    if audit:
        events.append(
            audit_disclosure(
                sub,
                twin.name,
                twin.patient_id,
                req,
                now=NOW,
                snapshot_id=snapshot_id,
                disclosed=list(zip(refs, sent, strict=True)),
                key=key,
            )
        )
        for ev in events:
            orjson.dumps(ev, option=orjson.OPT_SORT_KEYS)
    return len(wanted), len(refs), data


# --------------------------------------------------------------------------- timing


def measure(one_pass: Callable[[], int], runs: int, min_seconds: float) -> list[float]:
    """Units/s of each run; a run repeats the pass (which returns its units) for min_seconds."""
    one_pass()  # warm-up: imports, terminology, caches
    t0 = time.perf_counter()
    one_pass()
    elapsed = time.perf_counter() - t0
    reps = max(1, math.ceil(min_seconds / max(elapsed, 1e-9)))
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        units = 0
        for _ in range(reps):
            units += one_pass()
        rates.append(units / (time.perf_counter() - t0))
    return rates


def pin_one_core() -> tuple[str, int | None]:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"single process pinned to CPU {cpu}", cpu
    except (AttributeError, OSError):
        return "single process (not pinned: sched_setaffinity unavailable)", None


def row(
    section: str, what: str, unit: str, rates: list[float], goal: float | None, note: str = ""
) -> Row:
    med = statistics.median(rates)
    return Row(section, what, unit, med, 1e6 / med if med else math.inf, goal, rates, note)


# --------------------------------------------------------------------------- sections


def bench_consent(
    twins: list[Twin],
    subs: dict[str, Subscriber],
    kinds: dict[str, dict[str, list[dict[str, Any]]]],
    args: argparse.Namespace,
) -> list[Row]:
    rows: list[Row] = []
    n_res = sum(len(t.data) for t in twins)
    for kind, consents_of in kinds.items():
        for label, sub in subs.items():
            req = sub.request()
            policies: list[tuple[Policy, list[dict[str, Any]]]] = []
            outcome: dict[str, int] = {}
            for t in twins:
                resources = [*t.data, *consents_of[t.name]]
                policy = prepare(consents_of[t.name], req, now=NOW, known=resources)
                policies.append((policy, t.data))
                for r in t.data:
                    d = policy.decide(r)
                    outcome[d.decision] = outcome.get(d.decision, 0) + 1

            def decide_all(policies=policies) -> int:
                n = 0
                for policy, data in policies:
                    decide = policy.decide
                    for r in data:
                        decide(r)
                    n += len(data)
                return n

            rates = measure(decide_all, args.runs, args.min_seconds)
            shown = ", ".join(f"{k} {v}" for k, v in sorted(outcome.items()))
            rows.append(
                row(
                    "consent",
                    f"Policy.decide, {kind} consent, {label}",
                    "resources",
                    rates,
                    GOAL_RESOURCES,
                    f"{n_res} resources in {len(twins)} twins; {shown}",
                )
            )

            def prepare_all(req=req, consents_of=consents_of) -> int:
                for t in twins:
                    prepare(consents_of[t.name], req, now=NOW, known=t.data)
                return len(twins)

            rates = measure(prepare_all, args.runs, args.min_seconds)
            rows.append(
                row(
                    "consent",
                    f"prepare (per twin), {kind} consent, {label}",
                    "twins",
                    rates,
                    None,
                    f"known = the twin's {n_res // max(len(twins), 1)} resources on average",
                )
            )
    return rows


def bench_snapshots(
    twins: list[Twin],
    subs: dict[str, Subscriber],
    kinds: dict[str, dict[str, list[dict[str, Any]]]],
    args: argparse.Namespace,
) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    details: dict[str, Any] = {}
    for kind, consents_of in kinds.items():
        for label, sub in subs.items():
            req = sub.request()
            cases = [(t, [*t.data, *consents_of[t.name]], consents_of[t.name]) for t in twins]
            decided = sent = size = 0
            for t, resources, consents in cases:
                n, k, data = build_snapshot(t, resources, consents, sub, req)
                decided, sent, size = decided + n, sent + k, size + len(data)
            details[f"{kind}/{label}"] = {
                "resources_decided": decided,
                "resources_sent": sent,
                "bundle_bytes": size,
            }

            def one_pass(cases=cases, sub=sub, req=req) -> int:
                n = 0
                for t, resources, consents in cases:
                    n += build_snapshot(t, resources, consents, sub, req)[0]
                return n

            rates = measure(one_pass, args.runs, args.min_seconds)
            rows.append(
                row(
                    "snapshot",
                    f"snapshot, {kind} consent, {label}",
                    "resources",
                    rates,
                    GOAL_RESOURCES,
                    f"{decided} decided, {sent} sent, {size / 1e6:.1f} MB of Bundles per pass",
                )
            )
            if kind == "nested":

                def with_audit(cases=cases, sub=sub, req=req) -> int:
                    n = 0
                    for t, resources, consents in cases:
                        n += build_snapshot(t, resources, consents, sub, req, audit=True)[0]
                    return n

                rates = measure(with_audit, args.runs, args.min_seconds)
                rows.append(
                    row(
                        "snapshot",
                        f"snapshot + AuditEvents, {kind} consent, {label}",
                        "resources",
                        rates,
                        None,
                        "context: also builds and serializes the AuditEvents evaluate() emits",
                    )
                )
    return rows, details


def audit_leaves(twins: list[Twin], subs: dict[str, Subscriber], n: int) -> list[bytes]:
    """Real AuditEvent bytes (resource-level decisions of the first twins), cycled to n."""
    out: list[bytes] = []
    sub = subs["care"]
    for t in twins:
        consents = nested_consents(t.patient_id)
        policy = prepare(consents, sub.request(), now=NOW, known=t.data)
        for r in t.data[:200]:
            d = policy.decide(r)
            ev = audit_decision(
                sub, t.name, t.patient_id, d, now=NOW, level="resource", resources=[_ref(r)]
            )
            out.append(orjson.dumps(ev, option=orjson.OPT_SORT_KEYS))
            if len(out) >= n:
                return out
    return (out * (n // max(len(out), 1) + 1))[:n] if out else [b"{}"] * n


def bench_audit(
    leaves: list[bytes], args: argparse.Namespace, redis_cpu: set[int] | None
) -> tuple[list[Row], str]:
    rows: list[Row] = []
    avg = sum(map(len, leaves)) / len(leaves)
    stores: list[tuple[str, Callable[[], Any], Callable[[], None]]] = [
        ("DictStore", DictStore, lambda: None)
    ]
    key_name, key = parse_signer_key(generate_key("fhirtwin.local/audit")[0])
    redis_note = "skipped (--no-redis)"
    server = None
    if not args.no_redis:
        try:
            import redis as redis_py

            from fhirtwin.audit import CHECKPOINTS, NODES, SIZE, RedisNodeStore
            from fhirtwin.infra import EmbeddedRedis

            server = EmbeddedRedis(prefer_existing=False).start()
            if redis_cpu and server.proc is not None:
                os.sched_setaffinity(server.proc.pid, redis_cpu)
            client = redis_py.Redis.from_url(server.url)

            def flush() -> None:
                client.delete(NODES, SIZE, CHECKPOINTS)

            stores.append(("RedisNodeStore", lambda: RedisNodeStore(client), flush))
            redis_note = (
                f"private {server.binary} on port {server.port}"
                + (f", pinned to CPU {sorted(redis_cpu)}" if redis_cpu else ", not pinned")
                + "; loopback TCP, redis-py, one round trip per command"
            )
        except Exception as exc:  # no Redis binary: the in-process rows still run
            redis_note = f"not run: {type(exc).__name__}: {exc}"
    try:
        for name, make, flush in stores:
            for batch in (1, 1000):
                flush()
                log = MerkleLog(make())
                pos = [0]

                def one_pass(log=log, batch=batch, pos=pos) -> int:
                    reps = 200 if batch == 1 else 5
                    for _ in range(reps):
                        i = pos[0] % len(leaves)
                        pos[0] += batch
                        chunk = leaves[i : i + batch]
                        if batch == 1:
                            log.append(chunk[0])
                        else:
                            log.extend(chunk)
                    return reps * batch

                rates = measure(one_pass, args.runs, args.min_seconds)
                how = "MerkleLog.append" if batch == 1 else "MerkleLog.extend"
                rows.append(
                    row(
                        "audit",
                        f"{how}, batch {batch}, {name}",
                        "appends",
                        rates,
                        None,
                        f"leaves are AuditEvents of {avg:,.0f} B; tree size at the end "
                        f"{log.size:,}",
                    )
                )
            if name == "DictStore":
                root = log.root()
                size = log.size

                def sign(key_name=key_name, key=key, root=root, size=size) -> int:
                    for _ in range(100):
                        sign_checkpoint("fhirtwin.local/audit", size, root, key_name, key)
                    return 100

                rates = measure(sign, args.runs, args.min_seconds)
                rows.append(
                    row(
                        "audit",
                        "sign_checkpoint (Ed25519, C2SP note)",
                        "checkpoints",
                        rates,
                        None,
                        "signing only: root and size given",
                    )
                )
            else:
                from fhirtwin.audit import CHECKPOINTS

                def checkpoint(log=log, key_name=key_name, key=key) -> int:
                    for _ in range(50):
                        note = sign_checkpoint(
                            "fhirtwin.local/audit", log.size, log.root(), key_name, key
                        )
                        client.rpush(CHECKPOINTS, note.encode())
                    return 50

                rates = measure(checkpoint, args.runs, args.min_seconds)
                rows.append(
                    row(
                        "audit",
                        "checkpoint: size + root from Redis, sign, RPUSH",
                        "checkpoints",
                        rates,
                        None,
                        "what AuditSequencer.checkpoint does after each batch",
                    )
                )
                flush()
    finally:
        if server is not None:
            server.stop()
    return rows, redis_note


def profile_snapshots(
    twins: list[Twin],
    subs: dict[str, Subscriber],
    kinds: dict[str, dict[str, list[dict[str, Any]]]],
    top: int,
    seconds: float = 3.0,
) -> dict[str, str]:
    """cProfile of the nested-consent snapshot build, per subscriber: top N by tottime."""
    out: dict[str, str] = {}
    consents_of = kinds["nested"]
    for label, sub in subs.items():
        req = sub.request()
        cases = [(t, [*t.data, *consents_of[t.name]], consents_of[t.name]) for t in twins]

        def one_pass(cases=cases, sub=sub, req=req) -> None:
            for t, resources, consents in cases:
                build_snapshot(t, resources, consents, sub, req)

        t0 = time.perf_counter()
        one_pass()
        reps = max(1, math.ceil(seconds / max(time.perf_counter() - t0, 1e-9)))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(reps):
            one_pass()
        prof.disable()
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
            out[f"{label} by {key}"] = buf.getvalue()
    return out


# --------------------------------------------------------------------------- report


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def print_table(rows: list[Row]) -> None:
    head = ("what", "unit", "per s", "µs each", "goal")
    cells = [
        (
            r.what,
            r.unit,
            fmt(r.rate),
            fmt(r.per_unit_us, 2),
            f"{r.verdict} ≥ {r.goal:,.0f}" if r.goal else "",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i in (0, 1, 4) else v.rjust(w)
            for i, (v, w) in enumerate(zip(vals, widths, strict=True))
        ).rstrip()

    print(line(head))
    print("-" * len(line(head)))
    section = rows[0].section if rows else ""
    for r, c in zip(rows, cells, strict=True):
        if r.section != section:
            print()
            section = r.section
        print(line(c))
    print()
    for r in rows:
        if r.note:
            print(f"  * {r.what}: {r.note}")


def main(argv: list[str] | None = None) -> int:
    """The bench, with its keys and state in a temporary FHIRTWIN_HOME (bench/_scratch.py)."""
    with private_home("fhirtwin-bench-snapshot-"):
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--corpus", type=Path, default=None, help="default $FHIRTWIN_CORPUS or ../shared/corpus"
    )
    ap.add_argument("--runs", type=int, default=5, help="runs per row; the median is reported")
    ap.add_argument("--min-seconds", type=float, default=1.0, help="minimum length of one run")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile the snapshot builds; print the top N",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one CPU")
    ap.add_argument("--no-redis", action="store_true", help="skip the RedisNodeStore rows")
    args = ap.parse_args(argv)

    warnings.simplefilter("ignore")
    load_before = os.getloadavg()
    if args.no_pin:
        pinned, cpu = "single process (not pinned: --no-pin)", None
    else:
        pinned, cpu = pin_one_core()
    redis_cpu: set[int] | None = None
    if cpu is not None:
        try:
            others = set(range(os.cpu_count() or 1)) - {cpu}
            redis_cpu = others or None
        except OSError:
            redis_cpu = None

    root = args.corpus or default_corpus()
    twins, corpus_note = load_twins(root)
    if not twins:
        print("no patients found", file=sys.stderr)
        return 2
    care = make_subscriber(
        "sim-care", actor=[CARE_ACTOR], purpose=["TREAT"], scope="patient-privacy"
    )
    research = make_subscriber(
        "sim-research", actor=[RESEARCH_ACTOR], purpose=["HRESCH"], scope="research"
    )
    subs = {"care": care, "research": research}
    kinds = {
        kind: {t.name: make(t.patient_id) for t in twins} for kind, make in CONSENT_KINDS.items()
    }
    n_res = sum(len(t.data) for t in twins)
    sizes = sorted(len(t.data) for t in twins)
    machine = {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "execution": pinned,
    }
    print(
        f"corpus: {root} — {len(twins)} twins "
        f"({sum(t.source == 'synthea' for t in twins)} Synthea, "
        f"{sum(t.source == 'smart-bulk' for t in twins)} SMART bulk), {n_res:,} resources "
        f"({sizes[0]}–{sizes[-1]} per twin), {sum(len(orjson.dumps(t.data)) for t in twins) / 1e6:.1f} MB"
    )
    if corpus_note:
        print(f"NOTE: {corpus_note}")
    print(
        f"machine: {machine['cpu_count']} CPUs, Python {machine['python']} "
        f"({machine['platform']}); {pinned}; median of {args.runs} runs, each ≥ "
        f"{args.min_seconds:g} s; load average before {load_before[0]:.2f} "
        f"{load_before[1]:.2f} {load_before[2]:.2f}"
    )

    rows = bench_consent(twins, subs, kinds, args)
    snap_rows, details = bench_snapshots(twins, subs, kinds, args)
    rows += snap_rows
    leaves = audit_leaves(twins, subs, 4000)
    audit_rows, redis_note = bench_audit(leaves, args, redis_cpu)
    rows += audit_rows
    load_after = os.getloadavg()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print()
    print_table(rows)
    print(f"  * Redis: {redis_note}")
    print(
        f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
        f"peak RSS {peak_rss_mib:,.0f} MiB"
    )
    goals = [r for r in rows if r.goal is not None]
    print("\ngoals (≥ 20,000 resources/s on one core):")
    for r in goals:
        print(f"  {r.verdict}  {r.what}: {r.rate:,.0f} resources/s")

    profile: dict[str, str] = {}
    if args.profile:
        profile = profile_snapshots(twins, subs, kinds, args.profile)
        for key, text in profile.items():
            print(f"\ncProfile of the nested-consent snapshot build, {key}, top {args.profile}:")
            lines = text.splitlines()
            start = next((i for i, x in enumerate(lines) if x.strip().startswith("ncalls")), 0)
            print("\n".join(x for x in lines[start:] if x.strip()))

    result: dict[str, Any] = {
        "benchmark": "snapshot",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "corpus": {
            "source": str(root),
            "note": corpus_note,
            "twins": [
                {"name": t.name, "source": t.source, "resources": len(t.data)} for t in twins
            ],
            "resources": n_res,
            "labelled_every": LABEL_EVERY,
        },
        "consents": {k: v[twins[0].name] for k, v in kinds.items()},
        "subscribers": {k: s.to_json() for k, s in subs.items()},
        "runs": args.runs,
        "min_seconds_per_run": args.min_seconds,
        "rows": [{**asdict(r), "verdict": r.verdict} for r in rows],
        "snapshots": details,
        "redis": redis_note,
        "peak_rss_mib": round(peak_rss_mib, 1),
        "goals": [
            {"goal": r.what, "value": r.rate, "target": r.goal, "pass": r.verdict == "PASS"}
            for r in goals
        ],
    }
    if profile:
        result["profile"] = profile
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nJSON: {args.json}")
    return 0 if all(r.verdict == "PASS" for r in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
