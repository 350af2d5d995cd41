"""``POST /fhir/Patient/{id}/$erase``: erase a patient (``fhirtwin/erasure.py``), and
``POST /fhir/Patient/{id}/$unmerge``: undo a wrong merge (``TwinStore.unmerge``).

Scope ``fhirtwin/admin``. The body may be a FHIR ``Parameters`` with a ``reason``
(valueString), recorded in the audit (erase) or the twins' identity log (unmerge; required
there). The answer is an OperationOutcome (information) that says what was destroyed, or
(202) that the unmerge is queued for the assembler; an unknown or already-erased patient is
a 404, a patient that was not merged in from another twin a 409.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from fhirtwin.api import ApiError, _FhirRoute, fhir_response
from fhirtwin.assemble import find_unmerge, request_unmerge
from fhirtwin.auth import ADMIN_SCOPE, require_scope
from fhirtwin.erasure import NotFound, erase_patient
from fhirtwin.principal import Principal
from fhirtwin.twin import TwinStore, UnmergeError, UnmergeNotFound

__all__ = ["router"]


def _reason(body: bytes) -> str:
    if not body.strip():
        return ""
    try:
        params = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid", f"body: not JSON ({exc})") from None
    if not isinstance(params, dict) or params.get("resourceType") != "Parameters":
        raise ApiError(400, "invalid", "body: expected a FHIR Parameters resource (or no body)")
    for i, p in enumerate(params.get("parameter") or []):
        if isinstance(p, dict) and p.get("name") == "reason":
            value = p.get("valueString")
            if not isinstance(value, str):
                raise ApiError(400, "invalid", f"Parameters.parameter[{i}].valueString: a string")
            return value[:500]
    return ""


def router(
    store: TwinStore,
    *,
    authenticate: Callable[[str | None], Principal],
    bootstrap: str,
) -> APIRouter:
    r = APIRouter(prefix="/fhir", route_class=_FhirRoute)

    @r.post("/Patient/{pid}/$erase", summary="Erase a patient (crypto-shredding)")
    async def erase(request: Request, pid: str) -> Response:
        principal = authenticate(request.headers.get("authorization"))
        require_scope(principal, ADMIN_SCOPE)
        reason = _reason(await request.body())
        try:
            done = await run_in_threadpool(
                erase_patient,
                store,
                f"Patient/{pid}",
                bootstrap=bootstrap,
                who=principal.client_id,
                reason=reason,
            )
        except NotFound:
            raise ApiError(
                404, "not-found", f"Patient/{pid}: no such patient (or already erased)"
            ) from None
        except RuntimeError as exc:  # the audit log or twin.events did not acknowledge
            raise ApiError(503, "transient", f"{exc}; nothing was erased, try again") from None
        info: dict[str, Any] = done.as_dict()
        text = (
            f"Patient/{pid} erased: twin {done.twin}"
            + (f" and {len(done.twins) - 1} merged twin(s)" if len(done.twins) > 1 else "")
            + f"; {done.data_keys_destroyed} data key(s) destroyed, "
            f"{done.keys_deleted} Redis key(s) deleted; subscribers are notified"
        )
        body = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": text,
                    "details": {"text": orjson.dumps(info).decode()},
                }
            ],
        }
        return fhir_response(body, 200)

    @r.post("/Patient/{pid}/$unmerge", summary="Undo a wrong merge (the patient merged away)")
    async def unmerge(request: Request, pid: str) -> Response:
        principal = authenticate(request.headers.get("authorization"))
        require_scope(principal, ADMIN_SCOPE)
        reason = _reason(await request.body())
        if not reason:
            raise ApiError(
                400,
                "required",
                "body: a Parameters with a 'reason' (valueString): why the merge was wrong",
            )
        try:
            req = await run_in_threadpool(find_unmerge, store, f"Patient/{pid}")
        except UnmergeNotFound as exc:
            raise ApiError(404, "not-found", str(exc)) from None
        except UnmergeError as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        try:
            await run_in_threadpool(
                request_unmerge,
                bootstrap,
                store,
                req,
                reason=reason,
                by=principal.client_id,
                now_ms=int(time.time() * 1000),
            )
        except RuntimeError as exc:  # Kafka did not acknowledge
            raise ApiError(503, "transient", f"{exc}; nothing was queued, try again") from None
        body = {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": f"Patient/{pid}: the unmerge of twin {req.source} out of "
                    f"twin {req.target} is queued; the assembler carries it out and both "
                    "twins' subscribers are told",
                    "details": {
                        "text": orjson.dumps(
                            {"twin": req.source, "from": req.target, "merged_at": req.merged_at}
                        ).decode()
                    },
                }
            ],
        }
        return fhir_response(body, 202)

    return r
