"""Who is calling the FHIR API: the contract between authentication and the API.

``fhirtwin.auth`` turns a bearer token into a :class:`Principal` (or raises
:class:`AuthError`); ``fhirtwin.api`` only ever sees the Principal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AuthError", "Principal"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated API client.

    ``scopes`` are SMART v2 scopes as granted (``system/*.rs``, ``system/Observation.rs``)
    plus fhirtwin's own (``fhirtwin/admin``, ``fhirtwin/audit``). ``subscriber`` is the
    registered subscriber whose purpose and consent scope every read is decided for;
    a client without one may use no patient data.
    """

    client_id: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    subscriber: str | None = None


class AuthError(Exception):
    """Why a request is refused: 401 (no or bad credentials) or 403 (not allowed)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
