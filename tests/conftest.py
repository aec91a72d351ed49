"""Fixtures shared by every test package."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import pg


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped after the test."""
    with pg.pg_url(request.node.name) as url:
        yield url
