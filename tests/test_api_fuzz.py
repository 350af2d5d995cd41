"""Schemathesis against the FHIR API's own OpenAPI schema: no 5xx on generated requests.

The app is the one tests/test_api.py serves (twins built by the pipeline from the HL7 v2
examples on real Tansu and Redis, served by uvicorn; its module fixture is reused here, so
this module gets its own instance). The routes read their query strings from the request,
so the served ``/openapi.json`` declares only path parameters; :func:`augment` adds the
query parameters the routes read, free-form extra ones, and (the "known" variant) the
types and ids that exist, so that generation gets past the 404s. Each operation is run
with a valid bearer token and the one check ``not_a_server_error``: on the served schema
(any strings) positive, on the "known" one positive and negative. Then regressions for
what review found (``_count`` / ``_offset``), and raw paths the schema cannot describe.
"""

from __future__ import annotations

import copy
import http.client
import string
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

import tests.test_api as served
from fhirtwin.api import SUPPORTED_TYPES
from tests.test_api import Env, bearer

env = served.env  # the module fixture: its own Tansu, Redis, twins and uvicorn here

MAX_EXAMPLES = 30
DATE = (
    r"^(eq|ne|gt|lt|ge|le|sa|eb)?\d{4}(-\d{2}(-\d{2}"
    r"(T\d{2}:\d{2}(:\d{2}(\.\d{1,3})?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
STRING: dict[str, Any] = {"type": "string"}


def _enum(values: list[str]) -> dict[str, Any]:
    return {"type": "string", "enum": sorted(set(values))}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _extra() -> dict[str, Any]:
    """Any further parameters, by any name: ``?<name>=<value>&…``."""
    return {
        "name": "extra",
        "in": "query",
        "required": False,
        "style": "form",
        "explode": True,
        "schema": {"type": "object", "additionalProperties": STRING},
    }


def augment(openapi: dict[str, Any], e: Env | None) -> dict[str, Any]:
    """The /fhir part of the app's schema, with the query parameters the routes read.

    ``e`` None: every parameter any string (the served schema as it is, plus the query).
    Else "known": path parameters are the types and ids that exist, query parameters the
    values FHIR allows (a date pattern, whole numbers, the patients' references …), so that
    positive cases get past the 404s and negative cases violate one thing at a time. (An
    ``anyOf`` of an enum and any string would not do: it is merged into any string.)
    """
    spec = copy.deepcopy(openapi)
    path_schemas: dict[str, dict[str, Any]] = {}
    names = "_count _offset _sort _include _id patient subject date _lastUpdated birthdate"
    search = {n: STRING for n in f"{names} code identifier status category name gender".split()}
    everything = {n: STRING for n in ("_since", "_type", "_count", "_offset")}
    if e is not None:
        resources = [*e.store.resources(e.twin_a), *e.store.resources(e.twin_b)]
        ids = [str(r["id"]) for r in resources]
        versions = [
            str(v["meta"]["versionId"]) for v in e.store.history(e.twin_a, f"Patient/{e.a}")
        ]
        patients = [e.a, e.b, f"Patient/{e.a}", f"Patient/{e.b}", f"{e.a},{e.b}"]
        number = {"type": "integer", "minimum": 0}
        date = {"type": "string", "pattern": DATE}
        path_schemas = {
            "rtype": _enum(
                [str(r["resourceType"]) for r in resources if r["resourceType"] in SUPPORTED_TYPES]
            ),
            "rid": _enum(ids),
            "pid": _enum([e.a, e.b]),
            "vid": _enum(versions),
        }
        search |= {
            "_count": number,
            "_offset": number,
            "_sort": _enum(["date", "-date", "_lastUpdated", "-_lastUpdated", "_id", "-_id"]),
            "_include": _enum(["Observation:patient", "Encounter:subject", "*"]),
            "_id": _enum(ids),
            "patient": _enum(patients),
            "subject": _enum(patients),
            "date": date,
            "_lastUpdated": date,
            "birthdate": date,
            "code": _enum(["2160-0", "http://loinc.org|2160-0", "|x", "http://loinc.org|"]),
            "identifier": _enum(["MRN448812", "urn:oid:2.16.840.1.113883.3.9001.1|"]),
            "gender": _enum(["male", "female", "other", "unknown"]),
        }
        everything |= {
            "_since": date,
            "_type": _enum(["Patient", "Observation,Condition", "Immunization", "Starship"]),
            "_count": number,
            "_offset": number,
        }
    # only the FHIR API (the token endpoint of the same app is tests/test_auth.py's)
    paths = {p: v for p, v in spec["paths"].items() if p.startswith("/fhir/")}
    for path, item in paths.items():
        op = item["get"]
        for p in op.get("parameters", []):
            if p["in"] == "path" and p["name"] in path_schemas:
                p["schema"] = path_schemas[p["name"]]
        if path == "/fhir/{rtype}":
            op["parameters"] += [_query(n, sch) for n, sch in search.items()] + [_extra()]
        elif path.endswith("/$everything"):
            op["parameters"] += [_query(n, sch) for n, sch in everything.items()] + [_extra()]
    spec["paths"] = paths
    return spec


@pytest.fixture(scope="module")
def openapi(env: Env) -> dict[str, Any]:
    """The schema the running app serves."""
    r = httpx.get(env.base.removesuffix("/fhir") + "/openapi.json", timeout=30)
    assert r.status_code == 200
    spec: dict[str, Any] = r.json()
    return spec


@pytest.fixture(scope="module")
def schemas(env: Env, openapi: dict[str, Any]) -> dict[str, Any]:
    return {
        "served": schemathesis.openapi.from_dict(augment(openapi, None)),
        "known": schemathesis.openapi.from_dict(augment(openapi, env)),
    }


# (schemathesis.pytest.from_fixture would build these from the fixture, but 4.32.5's lazy
# schema sets Node._nodeid, which pytest 9 no longer has; so: one test per operation and
# mode, each a Hypothesis test over the operation's strategy.)
OPERATIONS = (
    "/fhir/.well-known/smart-configuration",  # fhirtwin.auth's router, under /fhir too
    "/fhir/metadata",
    "/fhir/{rtype}",
    "/fhir/{rtype}/{rid}",
    "/fhir/{rtype}/{rid}/_history",
    "/fhir/{rtype}/{rid}/_history/{vid}",
    "/fhir/Patient/{pid}/$everything",
)


def test_openapi_describes_the_fhir_routes(openapi: dict[str, Any]) -> None:
    """Every interaction is in the schema, with its path parameters (the query parameters
    are read from the request and not declared: :func:`augment` adds them)."""
    paths = openapi["paths"]
    assert sorted(p for p in paths if p.startswith("/fhir/")) == sorted(OPERATIONS)
    for path in OPERATIONS[1:]:
        assert set(paths[path]) == {"get"}, path
        params = paths[path]["get"].get("parameters", [])
        names = [p["name"] for p in params if p["in"] == "path"]
        assert names == [n.strip("{}") for n in path.split("/") if n.startswith("{")], path


POS, NEG = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (operation, schema, mode, pinned path parameters). Negative mode only on the "known"
# schema: in the served one every parameter is any string, so nothing can be violated.
CASES: list[tuple[str, str, GenerationMode, str]] = [
    *[(p, "served", POS, "") for p in OPERATIONS],
    *[(p, "known", m, "") for p in OPERATIONS[2:] for m in (POS, NEG)],
    ("/fhir/{rtype}/{rid}/_history/{vid}", "known", POS, "Patient/a"),
    ("/fhir/Patient/{pid}/$everything", "known", POS, "a"),
    ("/fhir/Patient/{pid}/$everything", "known", NEG, "a"),
]


def _pinned(e: Env, pin: str) -> dict[str, str] | None:
    """Path parameters fixed to patient A (its record is visible to the token's subscriber)."""
    if pin == "Patient/a":
        return {"rtype": "Patient", "rid": e.a}
    if pin == "a":
        return {"pid": e.a}
    return None


@pytest.mark.parametrize(
    ("path", "variant", "mode", "pin"),
    CASES,
    ids=[f"{p}-{v}-{m.value}{'-' + pin if pin else ''}" for p, v, m, pin in CASES],
)
def test_no_server_error(
    schemas: dict[str, Any], env: Env, path: str, variant: str, mode: GenerationMode, pin: str
) -> None:
    operation = schemas[variant][path]["GET"]
    root = env.base.removesuffix("/fhir")
    headers = bearer("fuzz")

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=_pinned(env, pin)))
    def run(case: Any) -> None:
        case.call_and_validate(
            base_url=root, headers=headers, checks=[not_a_server_error], timeout=30
        )

    run()


# -- regressions ----------------------------------------------------------------------------


# What schemathesis did not generate but review found: ``str.isdigit`` is true of digits
# ``int`` cannot read (superscripts, circled digits), and ``int`` refuses more than 4300
# digits; both were a 500 from ``_count`` / ``_offset``.
ODD_NUMBERS = ["²", "①", "12³", "1" * 5000, "٣", "\u0663\u0660", " 7 ", "+5", "0x10"]


@pytest.mark.parametrize("name", ["_count", "_offset"])
@pytest.mark.parametrize("value", ODD_NUMBERS, ids=range(len(ODD_NUMBERS)))
def test_odd_whole_numbers_are_not_a_server_error(env: Env, name: str, value: str) -> None:
    h = bearer("odd-numbers")
    for path, params in (
        ("Observation", {"patient": env.a}),
        (f"Patient/{env.a}/$everything", {}),
    ):
        r = httpx.get(f"{env.base}/{path}", params={**params, name: value}, headers=h, timeout=30)
        assert r.status_code in (200, 400), (path, name, value[:20], r.text[:300])
        assert r.json()["resourceType"] in ("Bundle", "OperationOutcome")


def test_huge_whole_numbers_page_past_the_end(env: Env) -> None:
    h = bearer("huge-numbers")
    huge = "9" * 5000
    r = httpx.get(f"{env.base}/Observation", params={"_offset": huge}, headers=h, timeout=30)
    assert r.status_code == 200 and r.json()["entry"] == []
    r = httpx.get(f"{env.base}/Observation", params={"_count": huge}, headers=h, timeout=30)
    assert r.status_code == 200 and "_count=500" in r.json()["link"][0]["url"]


# Paths the schema cannot describe (the catch-all route is not in it): raw segments with
# dot segments, encoded slashes and NULs, sent as they are (http.client does not normalise).
SEGMENT = st.one_of(
    st.sampled_from(["..", ".", "", "Patient", "Observation", "_history", "$everything"]),
    st.sampled_from(["%2F", "%2e%2e", "%00", "%ZZ", "%", "%C3%28", "%F0%9F%92%A9", ";x", "a?b"]),
    st.text(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@%", max_size=12),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(segments=st.lists(SEGMENT, min_size=1, max_size=6))
def test_raw_paths_are_not_a_server_error(env: Env, segments: list[str]) -> None:
    host, _, port = env.base.split("//", 1)[1].split("/", 1)[0].partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/fhir/" + "/".join(segments), headers=bearer("raw-paths"))
        r = conn.getresponse()
        assert r.status < 500, (segments, r.status, r.read()[:300])
    finally:
        conn.close()
