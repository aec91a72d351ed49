"""Signing and submitting transactions on behalf of local identities.

A :class:`Submitter` tracks each local key's next sequence number (read from
the committed state on first use, then counted locally) and serialises
submissions per key, so concurrent callers never reuse or skip a number.
After a rejection the counter is re-read from state.
"""

from __future__ import annotations

import asyncio
from typing import Any

from medledger.contracts.core import k_seq
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode
from medledger.errors import TransactionRejected
from medledger.ledger.tx import make_tx
from medledger.node import Node, Receipt

__all__ = ["Submitter"]


class Submitter:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._next: dict[bytes, int] = {}
        self._locks: dict[bytes, asyncio.Lock] = {}

    async def _last_seq(self, key: SigningKey) -> int:
        raw = await self.node.state_get(k_seq(key.key_id))
        return 0 if raw is None else int(decode(raw))

    async def submit(self, key: SigningKey, type_: str, payload: dict[str, Any]) -> Receipt:
        """Sign ``payload`` as ``type_`` with ``key`` and wait until it is committed."""
        kid = key.key_id
        lock = self._locks.setdefault(kid, asyncio.Lock())
        async with lock:
            seq = self._next.get(kid)
            if seq is None:
                seq = await self._last_seq(key) + 1
            tx = make_tx(key, self.node.network, type_, payload, seq=seq, time=self.node.clock())
            fut = self.node.enqueue(tx)  # queued in sequence order while holding the lock
            self._next[kid] = seq + 1
        try:
            return await fut
        except TransactionRejected:
            async with lock:
                self._next.pop(kid, None)  # re-read from state next time
            raise
