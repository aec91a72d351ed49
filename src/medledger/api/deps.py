"""Request dependencies: the runtime, the bearer token and who the caller is.

A bearer token names a SMART client; the client was registered for an
organisation and, optionally, for one practitioner or one patient. That fixes
the :class:`~medledger.services.records.Caller` the record service decides for;
nothing in the request can change who the caller is. Two request headers can
only *narrow or qualify* the access, never widen it: ``X-Purpose-Of-Use`` (an
HL7 v3 PurposeOfUse code, default ``TREAT``) and ``X-Break-Glass: true``
(requested emergency access, which the consent contract grants only to an
emergency clinician holding an open break-glass declaration, and always logs).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from medledger.api.runtime import Runtime
from medledger.api.smart import SmartError, TokenInfo
from medledger.fhir.outcome import FhirError
from medledger.services.fhir import Auth
from medledger.services.records import Caller

__all__ = [
    "AuthDep",
    "RuntimeDep",
    "TokenDep",
    "caller_for",
    "current_auth",
    "current_token",
    "get_runtime",
]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="smart",
    description="A SMART Backend Services access token from POST /auth/token.",
)

#: authentication events (refused bearer tokens and token requests, issued tokens), for
#: log-in monitoring; never a token or an assertion, only what identifies the attempt
security_log = logging.getLogger("medledger.security")

_PURPOSE_HEADER = "x-purpose-of-use"
_BREAK_GLASS_HEADER = "x-break-glass"


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:  # pragma: no cover - only before lifespan startup
        raise FhirError(503, "transient", "the server is starting")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def peer_of(request: Request) -> str:
    """The address a request came from (after uvicorn's proxy-header handling)."""
    return request.client.host if request.client is not None else "?"


async def current_token(
    request: Request,
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenInfo:
    """The introspected bearer token; 401 when missing, unknown or expired (logged)."""
    if credentials is None:
        security_log.info(
            "no bearer token for %s %s from %s", request.method, request.url.path, peer_of(request)
        )
        raise FhirError(401, "login", "a bearer token is required (see /auth/token)")
    try:
        return await runtime.require_smart().introspect(credentials.credentials)
    except SmartError as exc:
        security_log.warning(
            "refused a bearer token (%s) for %s %s from %s",
            exc.description,
            request.method,
            request.url.path,
            peer_of(request),
        )
        raise FhirError(401, "login", "the bearer token is not valid or has expired") from exc


TokenDep = Annotated[TokenInfo, Depends(current_token)]


def caller_for(info: TokenInfo, *, purpose: str = "TREAT", break_glass: bool = False) -> Caller:
    """The record-service caller a token speaks for (see SPEC Part C)."""
    client = info.client
    if client.practitioner is not None:
        return Caller(
            "practitioner",
            client.practitioner,
            client.org,
            purpose=purpose,
            break_glass=break_glass,
            client=client.client_id,
        )
    if client.patient is not None:
        return Caller("patient", client.patient, None, purpose=purpose, client=client.client_id)
    return Caller(
        "system",
        client.client_id,
        client.org,
        purpose=purpose,
        break_glass=break_glass,
        client=client.client_id,
    )


async def current_auth(request: Request, info: TokenDep) -> Auth:
    """Who is asking, with the scopes the token was granted."""
    purpose = request.headers.get(_PURPOSE_HEADER, "TREAT").strip() or "TREAT"
    break_glass = request.headers.get(_BREAK_GLASS_HEADER, "").strip().lower() in (
        "1",
        "true",
        "yes",
    )
    return Auth(
        caller_for(info, purpose=purpose, break_glass=break_glass),
        scopes=tuple(info.scopes),
    )


AuthDep = Annotated[Auth, Depends(current_auth)]
