"""The web portal: a static single-page app served by the node itself.

Patients see their records from every organisation, who accessed them (each
entry checked in the browser against a signed checkpoint) and manage consent;
clinicians search a patient, read what consent allows and are warned about
duplicate tests; everyone can explore the ledger. The pages are plain HTML, CSS
and ES modules shipped in ``static/`` with no external fetch, so the portal
works offline; they call the node's FHIR API and ``/api`` with a bearer token.

:func:`mount_portal` serves ``index.html`` at ``/`` (with the inactivity
timeout for automatic logoff filled in) and the assets at ``/static``, both
with a strict Content-Security-Policy.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

__all__ = ["DEFAULT_IDLE_TIMEOUT", "STATIC_DIR", "mount_portal"]

STATIC_DIR = Path(__file__).parent / "static"
#: Seconds of inactivity after which the portal signs the user out (HIPAA 164.312(a)(2)(iii)).
DEFAULT_IDLE_TIMEOUT = 900

#: The app's own middleware adds ``X-Content-Type-Options: nosniff`` to every response.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


class _PortalStatic(StaticFiles):
    """Static files with the portal's security headers and revalidation on every load."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                for name, value in SECURITY_HEADERS.items():
                    headers.append((name.lower().encode(), value.encode()))
                headers.append((b"cache-control", b"no-cache"))
                message["headers"] = headers
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def render_index(idle_timeout: int = DEFAULT_IDLE_TIMEOUT) -> str:
    """``index.html`` with the automatic-logoff timeout (seconds) filled in."""
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return html.replace("__IDLE_TIMEOUT__", str(int(idle_timeout)))


def mount_portal(app: FastAPI, *, idle_timeout: int = DEFAULT_IDLE_TIMEOUT) -> None:
    """Serve the portal at ``/`` and its assets at ``/static`` on ``app``.

    ``idle_timeout`` is the inactivity period, in seconds, after which the page
    discards its token and any displayed data and returns to sign-in.
    """
    if idle_timeout < 10:
        raise ValueError("idle_timeout must be at least 10 seconds")
    page = render_index(idle_timeout)

    @app.get("/", include_in_schema=False)
    async def portal_index() -> HTMLResponse:
        return HTMLResponse(page, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    app.mount("/static", _PortalStatic(directory=STATIC_DIR), name="portal-static")
