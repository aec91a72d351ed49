"""The orderer interface.

An orderer decides the order of transactions and hands ordered batches to the
node, which turns each batch into the next block. ``submit`` returns only once
the transaction is committed in a durable block (or raises the reason it was
rejected, or :class:`~medledger.errors.OrdererError` if ordering is unavailable:
then nothing was acknowledged).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from medledger.ledger.tx import Transaction
    from medledger.node import Receipt

__all__ = ["Orderer"]


class Orderer(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def submit(self, tx: Transaction) -> Receipt: ...
    def enqueue(self, tx: Transaction) -> asyncio.Future[Receipt]: ...
