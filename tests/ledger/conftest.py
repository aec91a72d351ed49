"""Shared fixtures for ledger tests: a one-organisation network on a fresh SQLite node.

* ``keys``     deterministic node and admin signing keys (from fixed seeds);
* ``genesis``  a genesis document with one org (the node key) and one admin;
* ``node``     a started :class:`~medledger.node.Node` on a tmp SQLite store, with a
  fixed clock (``T0 + 1000``), closed after the test;
* ``anchors``  a :class:`TxFactory` for ``note.anchor`` transactions signed by the admin
  with increasing ``seq``.

Everything is deterministic: same seeds, same times, same transactions.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medledger.crypto.signing import SigningKey
from medledger.ledger.tx import Transaction, make_tx
from medledger.node import Node

NETWORK = "medledger-test"
ORG = "org-1"
ADMIN = "admin-1"
#: genesis time (ms since the epoch); the node clock and tx times sit just after it
T0 = 1_764_000_000_000
BLOCK_TIME = T0 + 1_000


def seeded_key(label: str) -> SigningKey:
    """A deterministic Ed25519 key derived from ``label``."""
    return SigningKey.from_seed(hashlib.sha256(b"medledger-test-key/" + label.encode()).digest())


@dataclass(frozen=True)
class Keys:
    node: SigningKey
    admin: SigningKey


def make_test_genesis(node_key: SigningKey, admin_key: SigningKey) -> dict[str, Any]:
    return {
        "network": NETWORK,
        "time": T0,
        "orgs": [
            {
                "id": ORG,
                "name": "Test Hospital",
                "node_key": node_key.public.raw,
                "enc_key": hashlib.sha256(b"enc-key").digest(),
            }
        ],
        "admins": [{"id": ADMIN, "org": ORG, "key": admin_key.public.raw}],
    }


class TxFactory:
    """Signs transactions for one key, numbering ``seq`` 1, 2, 3, ..."""

    def __init__(self, key: SigningKey, network: str = NETWORK, *, start_seq: int = 1) -> None:
        self.key = key
        self.network = network
        self.seq = start_seq - 1
        self._n = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def tx(
        self,
        type_: str,
        payload: dict[str, Any],
        *,
        seq: int | None = None,
        time: int = BLOCK_TIME,
        network: str | None = None,
    ) -> Transaction:
        return make_tx(
            self.key,
            network or self.network,
            type_,
            payload,
            seq=self.next_seq() if seq is None else seq,
            time=time,
        )

    def digest(self) -> bytes:
        self._n += 1
        return hashlib.sha256(f"{self.key.key_id.hex()}/doc/{self._n}".encode()).digest()

    def anchor(self, *, kind: str = "document", **kw: Any) -> Transaction:
        """A fresh ``note.anchor`` (unique digest) with the next ``seq``."""
        return self.tx("note.anchor", {"digest": self.digest(), "kind": kind}, **kw)

    def rotate(self, new_key: SigningKey, **kw: Any) -> Transaction:
        return self.tx("key.rotate", {"pub": new_key.public.raw}, **kw)


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(node=seeded_key("node"), admin=seeded_key("admin"))


@pytest.fixture
def genesis(keys: Keys) -> dict[str, Any]:
    return make_test_genesis(keys.node, keys.admin)


def store_url(path: Path) -> str:
    return f"sqlite:///{path}"


async def new_node(path: Path, genesis: dict[str, Any], keys: Keys) -> Node:
    """Create and start a node on a new SQLite store with the fixed test clock."""
    node = await Node.create(store_url(path), genesis, [(ORG, keys.node)])
    node.clock = lambda: BLOCK_TIME
    await node.start()
    return node


@pytest.fixture
async def node(tmp_path: Path, genesis: dict[str, Any], keys: Keys) -> AsyncIterator[Node]:
    n = await new_node(tmp_path / "ledger.db", genesis, keys)
    try:
        yield n
    finally:
        await n.close()


@pytest.fixture
def anchors(keys: Keys) -> TxFactory:
    return TxFactory(keys.admin)
