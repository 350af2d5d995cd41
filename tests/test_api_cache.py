"""The FHIR API's view cache (fhirtwin/api.py, ``ViewCache``) on a real Redis and the real
router under uvicorn: a cached ``$everything`` must never outlive what made it right — a
change of the twin, a Consent, the subscriber asking, or the time a consent provision ends.

Each test first shows that the view *is* cached (a hit), then changes one thing and
checks the next answer. The twin is written with ``TwinStore.apply`` (no pipeline: these
tests are about the API), the audit sink is a list (tests/test_api.py covers Kafka)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

from fhirtwin.api import View, ViewCache, router
from fhirtwin.infra import free_port
from fhirtwin.principal import AuthError, Principal
from fhirtwin.snapshot import strip_dangling
from fhirtwin.subscribers import Registry, make_subscriber
from fhirtwin.twin import TwinStore
from tests.serving import serve

SCOPES = "http://terminology.hl7.org/CodeSystem/consentscope"
RTYPES = "http://hl7.org/fhir/resource-types"
TWIN, PID = "twin-cache-1", "p1"


def consent(provision: dict[str, Any], *, version: str = "2026-01-01") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "id": "consent-1",
        "status": "active",
        "scope": {"coding": [{"system": SCOPES, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{PID}"},
        "dateTime": version,
        "provision": provision,
    }


def deny_class(rtype: str, **extra: Any) -> dict[str, Any]:
    return {"type": "deny", "class": [{"system": RTYPES, "code": rtype}], **extra}


BASE_RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": PID, "gender": "female"},
    {
        "resourceType": "Encounter",
        "id": "e1",
        "status": "finished",
        "subject": {"reference": f"Patient/{PID}"},
    },
    *[
        {
            "resourceType": "Observation",
            "id": f"o{i}",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{PID}"},
            "encounter": {"reference": "Encounter/e1"},
        }
        for i in range(1, 4)
    ],
]


def authenticate(header: str | None) -> Principal:
    """``Bearer test:<client>:<subscriber>``, scopes ``system/*.rs``."""
    if not header or not header.startswith("Bearer test:"):
        raise AuthError(401, "invalid_token", "expected a test token")
    _, client, sub = header.split(" ", 1)[1].split(":", 2)
    return Principal(client, frozenset({"system/*.rs"}), sub)


@dataclass
class App:
    base: str
    store: TwinStore
    registry: Registry
    cache: ViewCache
    clock: list[datetime]  # clock[0] is "now" for the API
    audit: list[tuple[str, dict[str, Any]]]
    known_ms: int

    def everything(self, sub: str = "care", **params: str) -> httpx.Response:
        return httpx.get(
            f"{self.base}/Patient/{PID}/$everything",
            params=params,
            headers={"Authorization": f"Bearer test:cache-test:{sub}"},
            timeout=30,
        )

    def refs(self, sub: str = "care") -> list[str]:
        r = self.everything(sub, _count="500")
        assert r.status_code == 200, r.text
        return [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in r.json()["entry"]]

    def apply(
        self, resources: list[dict[str, Any]], *, event_ms: int, known_ms: int | None = None
    ) -> None:
        self.store.apply(
            TWIN,
            resources,
            event_ms=event_ms,
            known_ms=self.known_ms if known_ms is None else known_ms,
        )


@pytest.fixture
def make_app(redis_url: str) -> Iterator[Callable[[dict[str, Any]], App]]:
    stops: list[Callable[[], None]] = []

    def make(provision: dict[str, Any]) -> App:
        client = redis.Redis.from_url(redis_url)
        store, registry = TwinStore(client), Registry(client)
        now = datetime.now(UTC).replace(microsecond=0)
        known_ms = int(now.timestamp() * 1000) - 60_000  # a minute ago: recorded before now
        store.apply(TWIN, [*BASE_RESOURCES, consent(provision)], event_ms=1_000, known_ms=known_ms)
        for sub_id, types in (("care", None), ("narrow", ["Patient", "Observation"])):
            registry.put(
                make_subscriber(
                    sub_id,
                    actor=["urn:oid:1.2.3.4|sim-care"],
                    purpose=["TREAT"],
                    scope="patient-privacy",
                    types=types,
                    default="deny",
                )
            )
        clock = [now]
        audit: list[tuple[str, dict[str, Any]]] = []
        cache = ViewCache(max_entries=16, max_bytes=64 << 20, ttl_s=3600)
        app = FastAPI()
        app.include_router(
            router(
                store,
                registry,
                authenticate=authenticate,
                audit=audit.extend,
                clock=lambda: clock[0],
                cache=cache,
            )
        )
        port = free_port()
        stops.append(serve(app, port))
        return App(f"http://127.0.0.1:{port}/fhir", store, registry, cache, clock, audit, known_ms)

    yield make
    for stop in stops:
        stop()


PERMIT = {"type": "permit"}


def cached(app: App, sub: str = "care") -> list[str]:
    """$everything twice: the second answer must come from the cache (and equal the first)."""
    first = app.refs(sub)
    hits = app.cache.stats()["hits"]
    assert app.refs(sub) == first
    assert app.cache.stats()["hits"] > hits, "the view was not cached"
    return first


def test_new_resource_appears_on_next_request(make_app: Callable[..., App]) -> None:
    app = make_app(PERMIT)
    assert "Observation/o9" not in cached(app)
    new = {"resourceType": "Observation", "id": "o9", "status": "final"}
    app.apply([new], event_ms=2_000)  # same knowledge time as the first apply
    assert "Observation/o9" in app.refs()


def test_changed_resource_appears_on_next_request(make_app: Callable[..., App]) -> None:
    """A new version of a resource already there, same knowledge time, no Kafka offset:
    nothing but the current version's order key changes in Redis."""
    app = make_app(PERMIT)

    def status_of_o1() -> str:
        r = app.everything(_count="500", _type="Observation")
        return {e["resource"]["id"]: e["resource"]["status"] for e in r.json()["entry"]}["o1"]

    cached(app)
    app.apply([{**BASE_RESOURCES[2], "status": "amended"}], event_ms=2_000)
    assert status_of_o1() == "amended"
    cached(app)
    # back to the first version: a version the twin already holds (its history and the
    # number of resources do not change, nor does meta: same knowledge time, no offset)
    app.apply([BASE_RESOURCES[2]], event_ms=3_000)
    assert status_of_o1() == "final"


def test_consent_change_takes_effect_on_next_request(make_app: Callable[..., App]) -> None:
    app = make_app(PERMIT)
    before = cached(app)
    assert "Encounter/e1" in before
    app.apply(
        [consent({"type": "permit", "provision": [deny_class("Encounter")]}, version="2026-02-01")],
        event_ms=2_000,
    )
    r = app.everything(_count="500")
    refs = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in r.json()["entry"]]
    assert "Encounter/e1" not in refs and "Observation/o1" in refs
    assert "Encounter/e1" not in r.text  # the Observations' references to it are gone too
    # and a read of the withheld Encounter is the 404 of a missing id
    read = httpx.get(
        f"{app.base}/Encounter/e1", headers={"Authorization": "Bearer test:c:care"}, timeout=30
    )
    assert read.status_code == 404


def test_a_withdrawn_consent_hides_the_patient(make_app: Callable[..., App]) -> None:
    app = make_app(PERMIT)
    cached(app)
    app.apply([{**consent(PERMIT, version="2026-03-01"), "status": "inactive"}], event_ms=2_000)
    assert app.everything().status_code == 404  # care's default is deny


def test_another_subscriber_gets_its_own_view(make_app: Callable[..., App]) -> None:
    app = make_app(PERMIT)
    assert "Encounter/e1" in cached(app, "care")
    r = app.everything("narrow", _count="500")
    assert r.status_code == 200
    refs = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in r.json()["entry"]]
    assert refs and not any(x.startswith("Encounter/") for x in refs)
    assert "Encounter/e1" not in r.text  # stripped against narrow's view, not care's
    # care still gets its own, from the cache
    assert "Encounter/e1" in cached(app, "care")


def test_a_changed_registration_is_not_served_the_old_view(make_app: Callable[..., App]) -> None:
    app = make_app(PERMIT)
    assert "Encounter/e1" in cached(app, "care")
    app.registry.put(
        make_subscriber(
            "care",
            actor=["urn:oid:1.2.3.4|sim-care"],
            purpose=["TREAT"],
            scope="patient-privacy",
            types=["Patient"],
            default="deny",
        )
    )
    assert app.refs("care") == [f"Patient/{PID}"]


def test_a_provision_that_ends_stops_permitting(make_app: Callable[..., App]) -> None:
    """The permit's period ends 2 s after "now" (the API's injected clock): cached while it
    holds, and not one request longer."""
    now = datetime.now(UTC).replace(microsecond=0)
    end = (now + timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    app = make_app({"type": "permit", "period": {"end": end}})
    app.clock[0] = now
    assert f"Patient/{PID}" in cached(app)
    app.clock[0] = now + timedelta(seconds=2, milliseconds=999)  # inside the last second
    assert app.everything().status_code == 200
    app.clock[0] = now + timedelta(seconds=3)  # the period (to the second) is over
    assert app.everything().status_code == 404


def test_a_deny_provision_that_starts_takes_effect(make_app: Callable[..., App]) -> None:
    """A nested deny of Encounters from now + 2 s (to the millisecond)."""
    now = datetime.now(UTC)
    start = (now + timedelta(seconds=2)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    app = make_app(
        {"type": "permit", "provision": [deny_class("Encounter", period={"start": start})]}
    )
    app.clock[0] = now
    assert "Encounter/e1" in cached(app)
    app.clock[0] = now + timedelta(seconds=2, milliseconds=1)
    assert "Encounter/e1" not in app.refs()


def test_lazy_strip_is_strip_dangling(make_app: Callable[..., App]) -> None:
    """A View strips each resource when served; the result is strip_dangling's."""
    app = make_app({"type": "permit", "provision": [deny_class("Encounter")]})
    app.refs()
    views = [e.view for e in app.cache._items.values()]
    assert len(views) == 1
    view: View = views[0]
    assert view.resources == strip_dangling(view.permitted)
    assert all("encounter" not in r for r in view.resources if r["resourceType"] == "Observation")


def test_cache_is_bounded_by_entries_and_bytes() -> None:
    from fhirtwin.api import _Cached
    from fhirtwin.consent import NOT_APPLICABLE, Decision

    d = Decision(NOT_APPLICABLE, False)

    def entry(size: int) -> _Cached:
        return _Cached(b"s", 0, 0, 10**12, size, View("t", None, d, None))

    cache = ViewCache(max_entries=3, max_bytes=1000, ttl_s=60)
    for i in range(5):
        cache.put((f"t{i}", b""), entry(100))
    assert cache.stats()["entries"] == 3 and cache.get(("t0", b""), b"s", 1) is None
    assert cache.get(("t4", b""), b"s", 1) is not None
    cache.put(("big", b""), entry(900))  # pushes out the least recently used
    assert cache.stats()["bytes"] <= 1000
    assert cache.get(("big", b""), b"s", 1) is not None
    cache.put(("huge", b""), entry(5000))  # larger than the whole cache: not kept
    assert cache.get(("huge", b""), b"s", 1) is None
    assert cache.get(("big", b""), b"other stamp", 1) is None  # a stamp change drops it
    assert cache.get(("big", b""), b"s", 1) is None
    assert cache.get(("t4", b""), b"s", 60_001) is None  # ttl: 60 s after it was built
