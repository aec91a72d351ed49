"""The embedded orderer: in-process batching into blocks.

Submitted transactions queue up; one task takes up to ``max_batch`` of them
(waiting at most ``max_wait`` seconds after the first for more to arrive) and
asks the node to commit them as one block. Each submitter is answered once the
block is durable, with its receipt, or with the error its transaction was
rejected for. Blocks are committed one at a time, in submission order.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from medledger.errors import OrdererError, TransactionRejected

if TYPE_CHECKING:
    from medledger.ledger.tx import Transaction
    from medledger.node import Node, Receipt

__all__ = ["EmbeddedOrderer"]

_Item = tuple["Transaction", "asyncio.Future[Receipt]"]


class EmbeddedOrderer:
    def __init__(self, node: Node, *, max_batch: int = 2000, max_wait: float = 0.005) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be >= 1 and max_wait >= 0")
        self._node = node
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="medledger-orderer")

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(OrdererError("the node is shutting down; not committed"))

    def enqueue(self, tx: Transaction) -> asyncio.Future[Receipt]:
        """Queue ``tx`` now (keeping submission order); the future resolves on commit."""
        if self._closed or self._task is None:
            raise OrdererError("the orderer is not running; not committed")
        fut: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((tx, fut))
        return fut

    async def submit(self, tx: Transaction) -> Receipt:
        return await self.enqueue(tx)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._max_wait
            while len(batch) < self._max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            await self._commit(batch)

    async def _commit(self, batch: list[_Item]) -> None:
        try:
            results = await self._node.commit_batch([tx for tx, _ in batch])
        except asyncio.CancelledError:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(OrdererError("the node stopped during commit"))
            raise
        except Exception as exc:  # storage failure: nothing in this batch was acknowledged
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(OrdererError(f"block commit failed: {exc}"))
            return
        for (_, fut), res in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, TransactionRejected):
                fut.set_exception(res)
            else:
                fut.set_result(res)
