"""Patient identity (MPI): which twin a message's patient belongs to, and why.

Rules come from ``mappings/mpi.yaml``. The state is in Redis: ``ft:id:<blind>`` → twin id,
where ``<blind>`` is a keyed hash of ``system|value`` (``fhirtwin/crypto.py``: no identifier
is stored in clear), and ``ft:demo:<blind>`` → twin id for the optional demographic match.
``ft:erased:id:<blind>`` → twin id marks an identifier of an erased patient: a message that
names it again resolves to the erased twin, which takes no data. A new
identifier is claimed with ``SET NX``, so two workers that see a new patient at once agree
on one twin. The decision (rule, identifiers, matches) travels with the event on
``fhir.resources`` and is stored with the twin, so it can be explained and survives a rebuild.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fhirtwin import yamlfile
from fhirtwin.crypto import KeyRing, default_keyring
from fhirtwin.redisconn import RedisClient, mget, mset
from fhirtwin.twin import follow_merges_many

__all__ = ["Identity", "MPIConfig", "Resolver", "linking_identifiers", "split_patients"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "mappings" / "mpi.yaml"


@dataclass(frozen=True)
class MPIConfig:
    link_types: frozenset[str] = frozenset({"MR", "PI", "PT"})
    never_link_types: frozenset[str] = frozenset({"SS"})
    link_untyped: bool = True
    link_without_system: bool = True
    demographic: bool = False
    demographic_fields: tuple[str, ...] = ("family", "given", "birthDate", "gender")

    @classmethod
    def load(cls, path: Path | None = None) -> MPIConfig:
        return _load(path or DEFAULT_CONFIG)


@lru_cache(maxsize=8)
def _load(path: Path) -> MPIConfig:
    data: dict[str, Any] = yamlfile.load(path.read_text()) or {}
    demo = data.get("demographic") or {}
    return MPIConfig(
        link_types=frozenset(data.get("link_types", ())),
        never_link_types=frozenset(data.get("never_link_types", ())),
        link_untyped=bool(data.get("link_untyped", True)),
        link_without_system=bool(data.get("link_without_system", True)),
        demographic=bool(demo.get("enabled", False)),
        demographic_fields=tuple(demo.get("fields") or ("family", "given", "birthDate", "gender")),
    )


def _type_codes(ident: dict[str, Any]) -> set[str]:
    t = ident.get("type")
    if not isinstance(t, dict):
        return set()
    return {c.get("code", "") for c in t.get("coding", ()) if isinstance(c, dict)} - {""}


def linking_identifiers(patient: dict[str, Any], cfg: MPIConfig) -> list[str]:
    """The patient's identifiers that may link records (``system|value``), in order."""
    out: list[str] = []
    for ident in patient.get("identifier", ()):
        if not isinstance(ident, dict) or not ident.get("value"):
            continue
        system = ident.get("system") or ""
        if not system and not cfg.link_without_system:
            continue
        types = _type_codes(ident)
        if types & cfg.never_link_types:
            continue
        if types and not (types & cfg.link_types):
            continue
        if not types and not cfg.link_untyped:
            continue
        key = f"{system}|{ident['value']}"
        if key not in out:
            out.append(key)
    return out


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if c.isalnum()).upper()


def demographic_key(patient: dict[str, Any], cfg: MPIConfig) -> str | None:
    names = [n for n in patient.get("name", ()) if isinstance(n, dict)]
    official = next((n for n in names if n.get("use") == "official"), names[0] if names else {})
    values = {
        "family": _norm(official.get("family", "")),
        "given": _norm((official.get("given") or [""])[0]),
        "birthDate": patient.get("birthDate", ""),
        "gender": patient.get("gender", ""),
    }
    parts = [values.get(f, "") for f in cfg.demographic_fields]
    if not all(parts):
        return None
    return "|".join(parts)


def split_patients(
    resources: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(subject patients, prior patients): a prior one is ``replaced-by`` another (MRG)."""
    subjects, priors = [], []
    for res in resources:
        if res.get("resourceType") != "Patient":
            continue
        links = res.get("link") or ()
        if any(isinstance(lk, dict) and lk.get("type") == "replaced-by" for lk in links):
            priors.append(res)
        else:
            subjects.append(res)
    return subjects, priors


@dataclass
class Identity:
    """The twin an event belongs to and the decision that chose it."""

    twin: str
    rule: str
    identifiers: list[str] = field(default_factory=list)  # linked to ``twin`` by this event
    matched: list[str] = field(default_factory=list)  # identifiers that were already known
    merge_from: str | None = None  # a twin to merge into ``twin`` (ADT merge)
    conflicts: dict[str, str] = field(default_factory=dict)  # identifier → other twin

    def decision(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rule": self.rule, "twin": self.twin}
        if self.identifiers:
            d["linked"] = self.identifiers
        if self.matched:
            d["matched"] = self.matched
        if self.merge_from:
            d["merge_from"] = self.merge_from
        if self.conflicts:
            d["conflicts"] = self.conflicts
        return d


# subject patients, prior patients, their linking identifiers, the priors'
_Unit = tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], list[str]]


class Resolver:
    """Finds or creates the twin of a message's patient (state in Redis).

    A worker that handles records in batches calls ``prefetch`` with the batch first: the
    lookups of every identifier in it then cost two round trips for the whole batch
    instead of two per record. What this resolver writes meanwhile (a new twin, a new
    link, a merge) updates what it read, so a later record of the same batch sees it;
    ``forget`` drops it all at the end of the batch.
    """

    def __init__(
        self, client: RedisClient, cfg: MPIConfig | None = None, keys: KeyRing | None = None
    ) -> None:
        self.r: Any = client
        self.cfg = cfg or MPIConfig.load()
        self.keys = keys or default_keyring()
        # identifier → (its twin, the erased twin it names), both as read; twin → live twin
        self._seen: dict[str, tuple[str | None, str | None]] | None = None
        self._live: dict[str, str] = {}
        # id(resources) → (resources, patient identifiers, their _identifiers): computed
        # once by prefetch, used by resolve (the list is held, so its id is not reused)
        self._units: dict[int, tuple[list[dict[str, Any]], tuple[str, ...], _Unit]] = {}

    def _k(self, ident: str) -> str:
        return f"ft:id:{self.keys.blind(ident)}"

    def _identifiers(
        self, resources: list[dict[str, Any]], patient_identifiers: Sequence[str]
    ) -> _Unit:
        """(subject patients, prior patients, their linking identifiers, the priors')."""
        hit = self._units.get(id(resources))
        if hit is not None and hit[0] is resources and hit[1] == tuple(patient_identifiers):
            return hit[2]
        subjects, priors = split_patients(resources)
        idents: list[str] = []
        for p in subjects:
            idents += [i for i in linking_identifiers(p, self.cfg) if i not in idents]
        idents += [i for i in patient_identifiers if i not in idents]
        prior_ids: list[str] = []
        for p in priors:
            prior_ids += [i for i in linking_identifiers(p, self.cfg) if i not in prior_ids]
        return subjects, priors, idents, prior_ids

    def _lookup(self, idents: Sequence[str]) -> list[tuple[str | None, str | None]]:
        """One round trip: the twin of each identifier, and the erased twin it names."""
        blinds = [self.keys.blind(i) for i in idents]
        vals = mget(self.r, [f"ft:id:{b}" for b in blinds] + [f"ft:erased:id:{b}" for b in blinds])
        n = len(idents)
        return [
            (v.decode() if v else None, e.decode() if e else None)
            for v, e in zip(vals[:n], vals[n:], strict=True)
        ]

    def prefetch(self, units: Iterable[tuple[list[dict[str, Any]], Sequence[str]]]) -> None:
        """Read what ``resolve`` will need for these (resources, patient identifiers)."""
        every: list[str] = []
        self._units = {}
        for resources, patient_identifiers in units:
            unit = self._identifiers(resources, patient_identifiers)
            self._units[id(resources)] = (resources, tuple(patient_identifiers), unit)
            every += unit[2] + unit[3]
        every = list(dict.fromkeys(every))
        looked = self._lookup(every) if every else []
        self._seen = dict(zip(every, looked, strict=True))
        twins = {t for t, _ in looked if t}
        self._live = follow_merges_many(self.r, twins) if twins else {}

    def forget(self) -> None:
        self._seen, self._live, self._units = None, {}, {}

    def _saw(self, ident: str, twin: str | None) -> None:
        """Record what this resolver wrote (None: a write it lost; read it again)."""
        if self._seen is not None:
            if twin is None:
                self._seen.pop(ident, None)
            else:
                self._seen[ident] = (twin, None)
                self._live.setdefault(twin, twin)

    def resolve(
        self, resources: list[dict[str, Any]], patient_identifiers: Sequence[str] = ()
    ) -> Identity | None:
        """The identity for one message's resources; None when no patient is named.

        ``patient_identifiers`` (``system|value``) name the patient when the record holds
        no Patient resource (a Bulk NDJSON Observation, a CSV row): they link like a
        Patient's identifiers would.
        """
        subjects, priors, idents, prior_ids = self._identifiers(resources, patient_identifiers)
        if not subjects and not idents:
            return None
        every = list(dict.fromkeys(idents + prior_ids))
        seen = self._seen
        if seen is not None and all(i in seen for i in every):
            looked = [seen[i] for i in every]
        else:
            looked = self._lookup(every)
        if erased := next((e for _, e in looked if e), None):
            return Identity(twin=erased, rule="erased")
        found = {i: t for i, (t, _) in zip(every, looked, strict=True) if t}
        live = {t: self._live[t] for t in found.values() if t in self._live}
        if missing := set(found.values()) - live.keys():
            live.update(follow_merges_many(self.r, missing))
        known = {i: live[found[i]] for i in idents if i in found}
        prior_known = {i: live[found[i]] for i in prior_ids if i in found}
        twins = list(dict.fromkeys(known.values()))
        prior_twins = list(dict.fromkeys(prior_known.values()))

        if twins:
            twin, rule = twins[0], "identifier"
        elif prior_twins:
            # Identifier change (A47) or merge into a not-yet-known number: keep the twin.
            twin, rule = prior_twins[0], "identifier-change"
        elif subjects and self.cfg.demographic and (dk := demographic_key(subjects[0], self.cfg)):
            demo = self.r.get(f"ft:demo:{self.keys.blind(dk)}")
            twin, rule = (demo.decode(), "demographic") if demo else ("", "new")
        else:
            twin, rule = "", "new"
        if not twin:
            twin = str(uuid.uuid4())
            # Claim the first identifier; a racing worker may have claimed it first.
            if idents:
                claimed = bool(self.r.set(self._k(idents[0]), twin, nx=True))
                if not claimed and (got := self.r.get(self._k(idents[0]))):
                    twin, rule, claimed = got.decode(), "identifier", True
                if claimed:
                    found[idents[0]] = twin
                self._saw(idents[0], twin if claimed else None)
        identity = Identity(twin=twin, rule=rule, matched=sorted(known))
        for i in idents:
            other = known.get(i)
            if other is None or other == twin:
                identity.identifiers.append(i)
            else:
                identity.conflicts[i] = other  # never linked silently: stays where it was
        # Link what is not linked yet (SET NX of a key that exists would change nothing: a
        # message of a known patient with known identifiers costs no write).
        pipe = self.r.pipeline(transaction=False)
        linking = [i for i in identity.identifiers if i not in found]
        for i in linking:
            pipe.set(self._k(i), twin, nx=True)
        if subjects and self.cfg.demographic and (dk := demographic_key(subjects[0], self.cfg)):
            pipe.set(f"ft:demo:{self.keys.blind(dk)}", twin, nx=True)
        if len(pipe):
            for i, won in zip(linking, pipe.execute(), strict=False):
                self._saw(i, twin if won else None)
        if priors:
            others = [t for t in prior_twins if t != twin]
            if others:
                identity.merge_from = others[0]
                identity.rule = "merge"
                mset(self.r, {self._k(i): twin for i in prior_known})
                for i in prior_known:
                    self._saw(i, twin)
            for i in prior_ids:
                if i not in prior_known:
                    identity.identifiers.append(i)
                    won = self.r.set(self._k(i), twin, nx=True)
                    self._saw(i, twin if won else None)
        return identity
