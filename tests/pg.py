"""Throwaway PostgreSQL databases for tests.

PostgreSQL runs at 127.0.0.1:5432 (user ``postgres``, trust auth; override the
admin URL with ``MEDLEDGER_TEST_PG``). Every database made here has a unique name
(``mlt_<tag>_<pid>_<random>``) and is dropped on exit, even with clients still
connected (``DROP DATABASE ... WITH (FORCE)``)::

    from pg import pg_url, pg_clone

    with pg_url() as url:                 # a new empty database
        store = open_store(url)
        with pg_clone(url) as copy:       # a byte-for-byte copy (CREATE DATABASE ... TEMPLATE)
            ...

Tests usually take the ``pg_url`` fixture of ``tests/conftest.py`` instead.
(``tests/`` is on ``sys.path`` in pytest's default import mode, so ``import pg`` works
from any test module.)
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = ["ADMIN_URL", "create_database", "drop_database", "pg_clone", "pg_url", "url_for"]

ADMIN_URL = os.environ.get("MEDLEDGER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def url_for(dbname: str) -> str:
    """The URL of database ``dbname`` on the test server."""
    params = conninfo_to_dict(ADMIN_URL)
    params["dbname"] = dbname
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    user = params.get("user", "postgres")
    password = f":{params['password']}" if "password" in params else ""
    return f"postgresql://{user}{password}@{host}:{port}/{dbname}"


def _name(tag: str) -> str:
    tag = re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_")[:20] or "db"
    return f"mlt_{tag}_{os.getpid()}_{secrets.token_hex(4)}"


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(make_conninfo(ADMIN_URL), autocommit=True, connect_timeout=10)


def create_database(tag: str = "db", *, template: str | None = None) -> str:
    """Create a uniquely named database (a copy of ``template`` if given); return its name."""
    name = _name(tag)
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    with _admin() as conn:
        conn.execute(query)
    return name


def drop_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextmanager
def pg_url(tag: str = "db") -> Iterator[str]:
    """A new empty database for the duration of the block; yields its URL."""
    name = create_database(tag)
    try:
        yield url_for(name)
    finally:
        drop_database(name)


@contextmanager
def pg_clone(url: str, tag: str = "clone") -> Iterator[str]:
    """A copy of the database at ``url`` (which must have no open connections)."""
    source = conninfo_to_dict(url)["dbname"]
    assert isinstance(source, str)
    name = create_database(tag, template=source)
    try:
        yield url_for(name)
    finally:
        drop_database(name)
