"""The FastAPI application: FHIR R4 at ``/fhir``, SMART Backend Services, explorer and portal.

``create_app(settings)`` builds the app; its lifespan opens one
:class:`~medledger.api.runtime.Runtime` for the data directory (the node and
every service) and closes it on shutdown. Errors under ``/fhir`` are always
FHIR ``OperationOutcome`` resources (``application/fhir+json``) with the status
the FHIR specification asks for; the token endpoint answers OAuth 2.0 error
objects (RFC 6749 section 5.2).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medledger import __version__
from medledger.api.fhir_routes import (
    OPERATION_OUTCOME_SCHEMA,
    auth_router,
    fhir_error_response,
    fhir_router,
)
from medledger.api.runtime import Runtime
from medledger.api.settings import Settings
from medledger.api.smart import SmartError
from medledger.errors import MedledgerError
from medledger.fhir.outcome import FhirError, from_medledger_error

__all__ = ["create_app"]

log = logging.getLogger("medledger.api")


def _is_fhir(request: Request) -> bool:
    return request.url.path == "/fhir" or request.url.path.startswith("/fhir/")


class SecurityHeaders:
    """Response headers every answer carries (pure ASGI, no per-request task).

    ``Cache-Control: no-store`` on FHIR and token responses keeps PHI and tokens
    out of shared caches; ``Strict-Transport-Security`` when serving TLS.
    """

    def __init__(self, app: ASGIApp, *, tls: bool) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        sensitive = path.startswith(("/fhir", "/auth", "/api"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff")]
                if sensitive and b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                if self.tls:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": headers + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HeadAsGet:
    """``HEAD`` answered as the ``GET`` of the same target, without the body (RFC 9110
    9.3.2): the same status and headers, ``Content-Length`` and ``ETag`` included.

    FastAPI routes declare GET only (Starlette would add HEAD; FastAPI does not), so
    without this every HEAD was 405. The GET runs as it is: a HEAD of a record is
    decided and logged like its read.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """The API for ``settings.data_dir``; with no settings, read them from the environment.

    The lifespan opens a :class:`Runtime` and closes it on shutdown, unless a
    ``runtime`` is given (a process that already runs the node): that one is used
    as is and left open.
    """
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current = runtime or await Runtime.open(settings)
        app.state.runtime = current
        app.state.loop = asyncio.get_running_loop()  # for in-process callers (tests, tools)
        try:
            yield
        finally:
            app.state.runtime = None
            if runtime is None:
                await current.close()

    app = FastAPI(
        title="medledger FHIR API",
        version=__version__,
        description=(
            "FHIR R4 (JSON) over the medledger ledger: encrypted records, consent and audit, "
            "authorised with SMART on FHIR Backend Services."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.runtime = None

    app.include_router(auth_router)
    app.include_router(fhir_router())
    _mount_portal(app)
    _install_error_handlers(app)
    app.add_middleware(SecurityHeaders, tls=settings.tls)
    app.add_middleware(HeadAsGet)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _mount_portal(app: FastAPI) -> None:
    """The explorer API under ``/api`` and the static portal at ``/`` (when present)."""
    from medledger.api.explorer import router as explorer_router
    from medledger.web import mount_portal

    app.include_router(explorer_router, prefix="/api")
    mount_portal(app)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FhirError)
    async def on_fhir_error(request: Request, exc: FhirError) -> Response:
        return fhir_error_response(exc, request)

    @app.exception_handler(SmartError)
    async def on_smart_error(request: Request, exc: SmartError) -> Response:
        return JSONResponse(
            exc.body(),
            status_code=exc.status,
            headers={**exc.headers(), "Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    @app.exception_handler(MedledgerError)
    async def on_medledger_error(request: Request, exc: MedledgerError) -> Response:
        err = from_medledger_error(exc)
        if err.status >= 500:
            log.error("request %s %s failed: %r", request.method, request.url.path, exc)
        if _is_fhir(request):
            return fhir_error_response(err, request)
        return JSONResponse({"detail": err.diagnostics}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if not _is_fhir(request):
            return await http_exception_handler(request, exc)
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        if exc.status_code < 500 and exc.status_code not in (404, 405):
            code = "invalid"
        text = str(exc.detail) if exc.detail else "request failed"
        if exc.status_code == 404 and text == "Not Found":
            text = f"no FHIR interaction at {request.url.path}"
        return fhir_error_response(FhirError(exc.status_code, code, text), request)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        if not _is_fhir(request):
            return await request_validation_exception_handler(request, exc)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        text = f"invalid request: {first.get('msg', 'malformed')} ({where})"
        return fhir_error_response(FhirError(400, "invalid", text), request)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        err = from_medledger_error(exc)
        if _is_fhir(request):
            return fhir_error_response(err, request)
        return JSONResponse({"detail": err.diagnostics}, status_code=500)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, FHIR-shaped: OperationOutcome errors instead of FastAPI's 422."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["OperationOutcome"] = OPERATION_OUTCOME_SCHEMA
    for path, ops in schema.get("paths", {}).items():
        fhir = path == "/fhir" or path.startswith("/fhir/")
        for op in ops.values():
            if not isinstance(op, dict):
                continue
            responses = op.setdefault("responses", {})
            if fhir:
                if "422" in responses and _is_fastapi_422(responses["422"]):
                    del responses["422"]
            elif "requestBody" in op and "400" not in responses:
                # the framework answers a body it cannot parse (bad UTF-8 / JSON) with 400
                responses["400"] = {
                    "description": "The request body cannot be parsed",
                    "content": {"application/json": {"schema": _DETAIL_SCHEMA}},
                }
    if not _referenced(schema, "HTTPValidationError"):  # FastAPI's 422 body, if nothing uses it
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema


_DETAIL_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"detail": {}}}


def _is_fastapi_422(response: dict[str, Any]) -> bool:
    content = response.get("content", {}).get("application/json", {})
    ref = content.get("schema", {}).get("$ref", "")
    return bool(ref.endswith("/HTTPValidationError"))


def _referenced(schema: dict[str, Any], name: str) -> bool:
    import json

    return f"#/components/schemas/{name}" in json.dumps(schema.get("paths", {}))
