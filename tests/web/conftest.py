"""Browser-test fixtures: a real uvicorn server on a free loopback port and headless Chromium.

The browser is Debian's ``/usr/bin/chromium`` driven by Playwright; nothing is
downloaded. The server runs in its own thread with its own event loop (as it
would in production), so the test's loop only drives the browser.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from playwright.async_api import Browser, Page, async_playwright

from medledger.web import mount_portal

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerThread:
    """Serve an ASGI app with uvicorn in a background thread until stopped."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start within 60 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def artifacts() -> Path:
    """Where screenshots go: $MEDLEDGER_ARTIFACTS, else tests/web/artifacts."""
    path = Path(os.environ.get("MEDLEDGER_ARTIFACTS") or Path(__file__).parent / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A three-organisation network with one imported patient (see network.py), per module."""
    from .network import build_network

    return asyncio.run(build_network(tmp_path_factory.mktemp("net")))


@pytest.fixture(scope="module")
def server(net: Any) -> Iterator[ServerThread]:
    """The real app (demo identities on) serving ``net``, per module."""
    with net.serve() as s:
        yield s


@pytest.fixture
def static_server() -> Iterator[ServerThread]:
    """Only the portal's static files (enough to run the JS modules in a secure context)."""
    app = FastAPI()
    mount_portal(app)
    with ServerThread(app) as server:
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


class ConsoleErrors:
    """Collects uncaught page errors and console errors so tests can assert there were none.

    The browser's own "Failed to load resource" lines for answers such as 403 are not
    errors of the page: a denied read is an expected outcome the page shows.
    """

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._console)

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.errors.append(f"console.{msg.type}: {msg.text}")


JUNK = re.compile(r"\b(null|undefined|NaN)\b|\[object Object\]")


async def assert_no_junk(page: Page) -> None:
    """The page shows no "null", "undefined", "NaN" or "[object Object]" (a rendering bug)."""
    text = await page.locator("main").inner_text()
    found = JUNK.search(text)
    assert found is None, (
        f"{found.group(0)!r} shown near: {text[max(0, found.start() - 80) : found.end() + 40]!r}"
    )


async def wait_until(predicate: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)
