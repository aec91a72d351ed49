"""HTTP routes: FHIR R4 REST at ``/fhir`` and the SMART endpoints.

Every route reads its own query string and body (FHIR search parameters repeat
and vary by type, and a body that is not JSON must be a FHIR 400, not a
framework 422), and declares in OpenAPI exactly what it accepts and answers,
so schema-based testing (schemathesis) checks the real contract.

Interactions (``[type]`` is one of the served types):

=========================================  =============================================
``GET /fhir/metadata``                     CapabilityStatement (no token needed)
``POST /fhir``                             Bundle transaction (all or nothing) or batch
``GET|POST /fhir/[type]``                  search / create (``If-None-Exist``: conditional)
``GET|PUT|DELETE /fhir/[type]/[id]``       read / update (``If-Match``) / delete
``GET /fhir/[type]/[id]/_history[/vid]``   history / vread
``GET /fhir/Patient/[id]/$everything``     everything the caller may see, every custodian
``POST /fhir/Patient/[id]/$erase``         crypto-shredding of the patient's records
``GET /fhir/AuditEvent/[id]/$proof``       inclusion proof + signed checkpoint
``GET /fhir/Observation/$duplicate-check`` recent results of one test for one patient
``GET /.well-known/smart-configuration``   SMART discovery (also under ``/fhir``)
``POST /auth/token``                       client_credentials + private_key_jwt
=========================================  =============================================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from email.utils import formatdate, parsedate_to_datetime
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl

import jwt
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from medledger.api.deps import AuthDep, RuntimeDep, peer_of, security_log
from medledger.api.smart import SmartError
from medledger.fhir.jsontext import dump_json
from medledger.fhir.outcome import FhirError, operation_outcome
from medledger.services.fhir import API_TYPES, RECORD_TYPES, Result, etag

__all__ = [
    "FHIR_JSON",
    "OPERATION_OUTCOME_SCHEMA",
    "auth_router",
    "fhir_error_response",
    "fhir_router",
]

FHIR_JSON = "application/fhir+json"
_RECORD_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "delete",
    "create",
    "search-type",
    "history-instance",
)
#: What the routes below implement, for the CapabilityStatement.
INTERACTIONS: dict[str, tuple[str, ...]] = {
    **{t: _RECORD_INTERACTIONS for t in RECORD_TYPES},
    "Consent": ("read", "create", "delete", "search-type"),
    "AuditEvent": ("read", "search-type"),
}
_BODY_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")

OPERATION_OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {
                        "type": "string",
                        "enum": ["fatal", "error", "warning", "information"],
                    },
                    "code": {"type": "string"},
                    "diagnostics": {"type": "string"},
                    "expression": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_OO_REF = {"$ref": "#/components/schemas/OperationOutcome"}


def _resource_schema(rtype: str | None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string"}},
    }
    if rtype is not None:
        schema["properties"]["resourceType"] = {"type": "string", "enum": [rtype]}
    return schema


_BUNDLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "type"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["Bundle"]},
        "type": {"type": "string"},
        "total": {"type": "integer", "minimum": 0},
        "link": {"type": "array", "items": {"type": "object"}},
        "entry": {"type": "array", "items": {"type": "object"}},
    },
}

_ERROR_TEXT = {
    400: "Malformed request or resource (OperationOutcome)",
    401: "Missing, unknown or expired bearer token",
    403: "Refused by the token's scopes or by the consent decision (logged)",
    404: "No such resource",
    405: "Interaction not supported for this type",
    409: "Version conflict or id already used",
    410: "Deleted or erased",
    412: "If-Match does not name the current version, or If-None-Exist matches more than one",
    406: "The Accept header or _format asks for a format other than JSON",
    415: "Body is not application/fhir+json",
    422: "Valid FHIR that breaks a business rule or invariant",
    500: "Server or integrity failure",
}
_READ_ERRORS = (400, 401, 403, 404, 406, 410, 500)
_WRITE_ERRORS = (400, 401, 403, 404, 405, 406, 409, 410, 412, 415, 422, 500)


def _responses(
    ok: int, ok_schema: dict[str, Any], errors: Sequence[int], ok_text: str = "Success"
) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        ok: {"description": ok_text, "content": {FHIR_JSON: {"schema": ok_schema}}}
    }
    for status in errors:
        out[status] = {
            "description": _ERROR_TEXT.get(status, "Error"),
            "content": {FHIR_JSON: {"schema": _OO_REF}},
        }
    return out


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


_PAGING = [
    _query("_count", "Page size (at most 100)", {"type": "integer", "minimum": 1, "maximum": 100}),
    _query("_offset", "Paging offset", {"type": "integer", "minimum": 0, "maximum": 100000}),
]


def _search_parameters(rtype: str) -> list[dict[str, Any]]:
    """The search parameters a type supports (from :mod:`medledger.fhir.index`)."""
    from medledger.fhir.index import SEARCH_PARAMS, sort_keys

    params = [
        _query(name, doc)
        for name, (_kind, _target, doc) in sorted(SEARCH_PARAMS.get(rtype, {}).items())
        if name not in ("_count", "_offset")
    ]
    if rtype in RECORD_TYPES:
        params.append(
            _query(
                "_sort",
                "Order of the results, one key: "
                + ", ".join(sort_keys(dict(sorted(SEARCH_PARAMS.get(rtype, {}).items()))))
                + "; prefix - for newest first (default: -_lastUpdated). Results "
                "without a date come last",
            )
        )
        if rtype == "Patient":
            params.append(
                _query(
                    "_revinclude",
                    "<type>:patient (or :subject): also the patient's records of that type, "
                    "at most 100 a type, search mode include (repeatable); read with one more "
                    "access decision, logged",
                )
            )
        else:
            params.append(
                _query(
                    "_include",
                    f"{rtype}:patient (or :subject): also the Patient the results are about, "
                    "search mode include; read with one more access decision, logged",
                )
            )
        params.append(
            _query(
                "_summary",
                "count: the total only (no resource is read; the search is decided and "
                "logged); true: the summary elements; text: the narrative and the required "
                "elements; data: all but the narrative; false: whole resources. Subsetted "
                "results carry the SUBSETTED tag. Not with _elements",
            )
        )
        params.append(
            _query(
                "_elements",
                "Top-level elements to return, comma-separated (e.g. code,value): the "
                "results carry those, their id and meta, and the SUBSETTED tag",
            )
        )
    return params + _PAGING


def _body(rtype: str | None, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    shape = schema or _resource_schema(rtype)
    return {
        "requestBody": {
            "required": True,
            "content": {FHIR_JSON: {"schema": shape}, "application/json": {"schema": shape}},
        }
    }


# -- responses ------------------------------------------------------------------------------


class FhirResponse(JSONResponse):
    """A JSON response with the FHIR media type (decimals written with their precision)."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return dump_json(content).encode("utf-8")


def _render(
    doc: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return FhirResponse(doc, status_code=status, headers=headers)


def _validators(result: Result) -> dict[str, str]:
    """``ETag`` and ``Last-Modified`` of a result, where it has them."""
    headers: dict[str, str] = {}
    if result.version is not None:
        headers["ETag"] = etag(result.version)
    if result.last_updated is not None:
        headers["Last-Modified"] = formatdate(result.last_updated / 1000, usegmt=True)
    return headers


def _not_modified(request: Request, result: Result) -> bool:
    """A conditional read (RFC 9110 13.1.2, 13.1.3) whose client already holds this version.

    ``If-None-Match`` (weak comparison, ``*`` matches any) takes precedence over
    ``If-Modified-Since``, which compares whole seconds with the version's lastUpdated.
    """
    inm = request.headers.get("if-none-match")
    if inm is not None:
        if result.version is None:
            return False
        mine = etag(result.version).removeprefix("W/")
        tags = {t.strip().removeprefix("W/") for t in inm.split(",")}
        return "*" in tags or mine in tags
    ims = request.headers.get("if-modified-since")
    if ims is None or result.last_updated is None:
        return False
    try:
        since = parsedate_to_datetime(ims)
    except (TypeError, ValueError):
        return False  # an invalid date is ignored (RFC 9110 13.1.3)
    if since.tzinfo is None:
        return False
    return result.last_updated // 1000 <= int(since.timestamp())


def _result_response(result: Result) -> Response:
    headers = _validators(result)
    if result.location is not None:
        headers["Location"] = result.location
        headers["Content-Location"] = result.location
    return _render(result.resource, result.status, headers)


def _prefer_return(request: Request) -> str:
    """The ``return`` preference of a write (``representation`` when none is given)."""
    for part in request.headers.get("prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "return":
            return value.strip().strip('"').lower()
    return "representation"


def _written_response(request: Request, result: Result) -> Response:
    """A create's or update's answer as ``Prefer: return=`` asks: the resource (the
    default), no body (``minimal``) or an ``OperationOutcome``; the headers are the same."""
    prefer = _prefer_return(request)
    if prefer not in ("minimal", "operationoutcome"):
        return _result_response(result)
    headers = _validators(result)
    if result.location is not None:
        headers["Location"] = result.location
    if prefer == "minimal":
        return Response(status_code=result.status, headers=headers)
    res = result.resource
    what = f"{res.get('resourceType')}/{res.get('id')}"
    text = (
        f"created {what} version {result.version}"
        if result.status == 201
        else f"{what} is at version {result.version}"
    )
    return _render(operation_outcome(result.status, text), result.status, headers)


def fhir_error_response(exc: FhirError, request: Request | None = None) -> Response:
    """An OperationOutcome response for ``exc`` (with the RFC 6750 challenge on 401)."""
    headers: dict[str, str] = {}
    if exc.status == 401:
        challenge = 'Bearer realm="medledger"'
        if request is not None and request.headers.get("authorization"):
            challenge += ', error="invalid_token"'
        headers["WWW-Authenticate"] = challenge
    return _render(operation_outcome(exc), exc.status, headers)


# -- request helpers ------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype not in _BODY_TYPES:
        raise FhirError(415, "not-supported", f"send {FHIR_JSON}, not {ctype}")
    body = await request.body()
    if not body.strip():
        raise FhirError(400, "structure", "the request body is empty")
    return body


#: media types (and ``_format`` values) that JSON answers; a "+" in an unencoded query
#: string arrives as a space, so ``application/fhir json`` is the same as ``...+json``
_JSON_MEDIA = frozenset(
    {"application/fhir+json", "application/json", "application/json+fhir", "*/*", "application/*"}
)
_JSON_FORMATS = frozenset(
    {"json", "application/fhir+json", "application/json", "application/json+fhir"}
)


def _negotiate(request: Request) -> None:
    """406 unless the client accepts JSON: ``_format`` first, else the Accept header.

    The API speaks FHIR JSON only; a client that asks for XML (or Turtle) only is
    told so instead of being sent a format it did not ask for.
    """
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt.strip().lower().replace(" ", "+") not in _JSON_FORMATS:
            raise FhirError(406, "not-supported", f"_format={fmt}: only {FHIR_JSON} is served")
        return
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0 and media.lower() in _JSON_MEDIA:
            return
    raise FhirError(406, "not-supported", f"Accept: {accept}: only {FHIR_JSON} is served")


def _params(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _lenient(request: Request) -> bool:
    prefer = request.headers.get("prefer", "").replace(" ", "").lower()
    return "handling=lenient" in prefer.split(",")


# -- SMART ----------------------------------------------------------------------------------

auth_router = APIRouter(tags=["SMART on FHIR"])

_OAUTH_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}
_TOKEN_SCHEMA = {
    "type": "object",
    "required": ["access_token", "token_type", "expires_in", "scope"],
    "properties": {
        "access_token": {"type": "string"},
        "token_type": {"type": "string"},
        "expires_in": {"type": "integer"},
        "scope": {"type": "string"},
    },
}


async def smart_configuration(runtime: RuntimeDep) -> Response:
    return JSONResponse(runtime.require_smart().smart_configuration())


for _path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
    auth_router.add_api_route(
        _path,
        smart_configuration,
        methods=["GET"],
        summary="SMART configuration (discovery of the token endpoint)",
        operation_id="smart_configuration" + ("_fhir" if _path.startswith("/fhir") else ""),
        responses={
            200: {"description": "SMART configuration", "content": {"application/json": {}}}
        },
        response_class=JSONResponse,
    )


@auth_router.post(
    "/auth/token",
    summary="Token endpoint: client_credentials with a private_key_jwt client assertion",
    operation_id="token",
    response_class=JSONResponse,
    responses={
        200: {
            "description": "Access token",
            "content": {"application/json": {"schema": _TOKEN_SCHEMA}},
        },
        400: {
            "description": "OAuth error",
            "content": {"application/json": {"schema": _OAUTH_ERROR}},
        },
        401: {
            "description": "Client authentication failed",
            "content": {"application/json": {"schema": _OAUTH_ERROR}},
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "required": ["grant_type", "client_assertion_type", "client_assertion"],
                        "properties": {
                            "grant_type": {"type": "string", "enum": ["client_credentials"]},
                            "client_assertion_type": {
                                "type": "string",
                                "enum": ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"],
                            },
                            "client_assertion": {"type": "string"},
                            "scope": {"type": "string"},
                        },
                    }
                }
            },
        }
    },
)
async def token(request: Request, runtime: RuntimeDep) -> Response:
    form: dict[str, str] = {}
    try:
        doc = await _token(request, runtime, form)
    except SmartError as exc:
        security_log.warning(
            "refused a token request from %s: %s (%s); client claimed %r",
            peer_of(request),
            exc.error,
            exc.description,
            _claimed_client(form),
        )
        raise
    security_log.info(
        "issued a token to client %r (scope %r) from %s",
        _claimed_client(form),
        doc.get("scope"),
        peer_of(request),
    )
    return JSONResponse(doc, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def _claimed_client(form: dict[str, str]) -> str:
    """The ``iss`` a client assertion claims (unverified: for the log only), or ``?``."""
    try:
        claims = jwt.decode(form.get("client_assertion", ""), options={"verify_signature": False})
    except jwt.PyJWTError:
        return "?"
    iss = claims.get("iss")
    return iss[:100] if isinstance(iss, str) else "?"


async def _token(request: Request, runtime: RuntimeDep, form: dict[str, str]) -> dict[str, Any]:
    """The token endpoint's work; fills ``form`` as it parses it (for the log)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise SmartError(400, "invalid_request", "send application/x-www-form-urlencoded")
    try:
        text = (await request.body()).decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SmartError(400, "invalid_request", "the form body is not valid") from exc
    for key, value in pairs:
        if key in form:
            raise SmartError(400, "invalid_request", f"parameter {key} is repeated")
        form[key] = value
    doc: dict[str, Any] = await runtime.require_smart().token(form)
    return doc


# -- FHIR -----------------------------------------------------------------------------------

Handler = Callable[..., Awaitable[Response]]


def fhir_router() -> APIRouter:
    """Every FHIR route, declared per resource type (so OpenAPI names each one)."""
    router = APIRouter(prefix="/fhir", dependencies=[Depends(_negotiate)])

    async def metadata(request: Request) -> Response:
        from medledger.fhir.capability import capability_statement

        settings = request.app.state.settings
        return _render(
            capability_statement(
                settings.fhir_base,
                smart=True,
                token_url=settings.token_url,
                interactions=INTERACTIONS,
            )
        )

    router.add_api_route(
        "/metadata",
        metadata,
        methods=["GET"],
        summary="CapabilityStatement",
        operation_id="metadata",
        tags=["FHIR"],
        responses=_responses(200, _resource_schema("CapabilityStatement"), (500,)),
        response_class=FhirResponse,
    )

    async def bundle(request: Request, auth: AuthDep, runtime: RuntimeDep) -> Response:
        body = await _read_body(request)
        return _render(await runtime.fhir.bundle(auth, body))

    router.add_api_route(
        "",
        bundle,
        methods=["POST"],
        summary="Bundle transaction (all or nothing) or batch",
        operation_id="bundle",
        tags=["FHIR"],
        responses=_responses(200, _BUNDLE_SCHEMA, _WRITE_ERRORS),
        openapi_extra=_body("Bundle"),
        response_class=FhirResponse,
    )

    # operations first, so their literal path segments win over [id]
    async def everything(
        pid: str, request: Request, auth: AuthDep, runtime: RuntimeDep
    ) -> Response:
        return _render(await runtime.fhir.everything(auth, pid, _params(request)))

    router.add_api_route(
        "/Patient/{pid}/$everything",
        everything,
        methods=["GET"],
        summary="Everything about a patient the caller may see, from every custodian",
        operation_id="patient_everything",
        tags=["Patient"],
        responses=_responses(200, _BUNDLE_SCHEMA, _READ_ERRORS),
        response_class=FhirResponse,
    )

    async def erase(pid: str, auth: AuthDep, runtime: RuntimeDep) -> Response:
        return _render(await runtime.fhir.erase(auth, pid))

    router.add_api_route(
        "/Patient/{pid}/$erase",
        erase,
        methods=["POST"],
        summary="Crypto-shred every record of the patient (the custodian's system client)",
        operation_id="patient_erase",
        tags=["Patient"],
        responses=_responses(200, _OO_REF, _READ_ERRORS),
        response_class=FhirResponse,
    )

    async def proof(aid: str, request: Request, auth: AuthDep, runtime: RuntimeDep) -> Response:
        height = request.query_params.get("height")
        return _render(await runtime.fhir.audit_proof(auth, aid, height))

    router.add_api_route(
        "/AuditEvent/{aid}/$proof",
        proof,
        methods=["GET"],
        summary="Inclusion proof of an AuditEvent's ledger transaction, with the checkpoint",
        operation_id="auditevent_proof",
        tags=["AuditEvent"],
        responses=_responses(200, _resource_schema("Parameters"), (*_READ_ERRORS, 422)),
        response_class=FhirResponse,
        openapi_extra={
            "parameters": [
                _query(
                    "height",
                    "Prove against the checkpoint of this block (default: the latest); "
                    "422 if the entry is not yet in the log there",
                    {"type": "integer", "minimum": 0},
                )
            ]
        },
    )

    async def duplicate_check(request: Request, auth: AuthDep, runtime: RuntimeDep) -> Response:
        return _render(await runtime.fhir.duplicate_check(auth, _params(request)))

    router.add_api_route(
        "/Observation/$duplicate-check",
        duplicate_check,
        methods=["GET"],
        summary="Recent results of a test (LOINC code) for a patient, from every custodian",
        operation_id="observation_duplicate_check",
        tags=["Observation"],
        responses=_responses(200, _BUNDLE_SCHEMA, _READ_ERRORS),
        openapi_extra={
            "parameters": [
                {**_query("patient", "Patient id"), "required": True},
                {**_query("code", "system|code, e.g. http://loinc.org|4548-4"), "required": True},
                _query("since", "Only results on or after this date"),
                _query(
                    "_count",
                    "How many (default 10)",
                    {"type": "integer", "minimum": 1, "maximum": 100},
                ),
            ]
        },
        response_class=FhirResponse,
    )

    for rtype in sorted(API_TYPES):
        _type_routes(router, rtype)
    return router


def _type_routes(router: APIRouter, rtype: str) -> None:
    low = rtype.lower()
    tags: list[str | Enum] = [rtype]
    schema = _resource_schema(rtype)
    if_match = _header("If-Match", 'Version to replace, e.g. W/"1"')

    async def search(request: Request, auth: AuthDep, runtime: RuntimeDep) -> Response:
        doc = await runtime.fhir.search(auth, rtype, _params(request), lenient=_lenient(request))
        return _render(doc)

    router.add_api_route(
        f"/{rtype}",
        search,
        methods=["GET"],
        summary=f"Search {rtype}",
        operation_id=f"search_{low}",
        tags=tags,
        responses=_responses(200, _BUNDLE_SCHEMA, _READ_ERRORS),
        openapi_extra={"parameters": _search_parameters(rtype)},
        response_class=FhirResponse,
    )

    if rtype != "AuditEvent":

        async def create(request: Request, auth: AuthDep, runtime: RuntimeDep) -> Response:
            body = await _read_body(request)
            criteria = request.headers.get("if-none-exist")
            return _written_response(
                request, await runtime.fhir.create(auth, rtype, body, if_none_exist=criteria)
            )

        create_responses = _responses(201, schema, _WRITE_ERRORS, "Created")
        if rtype != "Consent":
            create_responses[200] = {
                "description": "If-None-Exist found one match: that resource; nothing created",
                "content": {FHIR_JSON: {"schema": schema}},
            }
        router.add_api_route(
            f"/{rtype}",
            create,
            methods=["POST"],
            summary=f"Create {rtype}"
            + ("" if rtype == "Consent" else " (If-None-Exist: only if the criteria match none)"),
            operation_id=f"create_{low}",
            tags=tags,
            responses=create_responses,
            openapi_extra={
                **_body(rtype),
                "parameters": []
                if rtype == "Consent"
                else [
                    _header(
                        "If-None-Exist",
                        "Search criteria (a query string, e.g. identifier=system|value): "
                        "create only if they match nothing",
                    )
                ],
            },
            response_class=FhirResponse,
        )

    async def read(rid: str, request: Request, auth: AuthDep, runtime: RuntimeDep) -> Response:
        result = await runtime.fhir.read(auth, rtype, rid)  # decided and logged either way
        if _not_modified(request, result):
            return Response(status_code=304, headers=_validators(result))
        return _result_response(result)

    router.add_api_route(
        f"/{rtype}/{{rid}}",
        read,
        methods=["GET"],
        summary=f"Read {rtype}",
        operation_id=f"read_{low}",
        tags=tags,
        responses={
            **_responses(200, schema, _READ_ERRORS),
            304: {"description": "Not modified (If-None-Match or If-Modified-Since)"},
        },
        response_class=FhirResponse,
    )

    if rtype in RECORD_TYPES:

        async def update(
            rid: str, request: Request, auth: AuthDep, runtime: RuntimeDep
        ) -> Response:
            body = await _read_body(request)
            result = await runtime.fhir.update(
                auth, rtype, rid, body, if_match=request.headers.get("if-match")
            )
            return _written_response(request, result)

        ok = _responses(200, schema, _WRITE_ERRORS)
        router.add_api_route(
            f"/{rtype}/{{rid}}",
            update,
            methods=["PUT"],
            summary=f"Update {rtype} (If-Match: the version replaced)",
            operation_id=f"update_{low}",
            tags=tags,
            responses=ok,
            openapi_extra={**_body(rtype), "parameters": [if_match]},
            response_class=FhirResponse,
        )

    if rtype != "AuditEvent":

        async def delete(
            rid: str, request: Request, auth: AuthDep, runtime: RuntimeDep
        ) -> Response:
            result = await runtime.fhir.delete(
                auth, rtype, rid, if_match=request.headers.get("if-match")
            )
            return _result_response(result)

        router.add_api_route(
            f"/{rtype}/{{rid}}",
            delete,
            methods=["DELETE"],
            summary=f"Delete {rtype}" + (" (revokes the consent)" if rtype == "Consent" else ""),
            operation_id=f"delete_{low}",
            tags=tags,
            responses=_responses(200, _OO_REF, _WRITE_ERRORS),
            openapi_extra={"parameters": [if_match]},
            response_class=FhirResponse,
        )

    async def history(rid: str, auth: AuthDep, runtime: RuntimeDep) -> Response:
        return _render(await runtime.fhir.history(auth, rtype, rid))

    router.add_api_route(
        f"/{rtype}/{{rid}}/_history",
        history,
        methods=["GET"],
        summary=f"History of a {rtype}",
        operation_id=f"history_{low}",
        tags=tags,
        responses=_responses(200, _BUNDLE_SCHEMA, _READ_ERRORS),
        response_class=FhirResponse,
    )

    async def vread(rid: str, vid: str, auth: AuthDep, runtime: RuntimeDep) -> Response:
        return _result_response(await runtime.fhir.vread(auth, rtype, rid, vid))

    router.add_api_route(
        f"/{rtype}/{{rid}}/_history/{{vid}}",
        vread,
        methods=["GET"],
        summary=f"Read one version of a {rtype}",
        operation_id=f"vread_{low}",
        tags=tags,
        responses=_responses(200, schema, _READ_ERRORS),
        response_class=FhirResponse,
    )
