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
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from medledger.errors import OrdererError, TransactionRejected
from medledger.ledger.tx import check_signed

if TYPE_CHECKING:
    from medledger.ledger.tx import Transaction
    from medledger.node import Node, Receipt

__all__ = ["EmbeddedOrderer"]

_Item = tuple["Transaction", "asyncio.Future[Receipt]"]


class EmbeddedOrderer:
    def __init__(
        self,
        node: Node,
        *,
        max_batch: int = 2000,
        max_wait: float = 0.005,
        verify_workers: int = 1,
        parallel_threshold: int = 64,
    ) -> None:
        if max_batch < 1 or max_wait < 0 or verify_workers < 0:
            raise ValueError("max_batch must be >= 1, max_wait and verify_workers >= 0")
        self._verify_workers = verify_workers
        self._parallel_threshold = parallel_threshold
        self._pool: ProcessPoolExecutor | None = None
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
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
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

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self._max_wait
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives just as get() completes, and stop() would then hang.
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    async def _verify(self, batch: list[_Item]) -> list[bool] | None:
        """Check the batch's signatures in a worker process (None: let the node check inline).

        Ed25519 verification holds the GIL, so a second process is the only way to
        use the second core; small batches are not worth the round trip.
        """
        if self._verify_workers == 0 or len(batch) < self._parallel_threshold:
            return None
        try:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self._verify_workers, mp_context=mp.get_context("spawn")
                )
            # the worker verifies (pub, sig, signing bytes): it need not parse again
            items = [(tx.pub, tx.sig, tx.signing_bytes()) for tx, _ in batch]
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, check_signed, items)
        except (BrokenProcessPool, OSError):
            self._verify_workers = 0  # fall back to checking inline from now on
            return None

    async def _run(self) -> None:
        # Pipeline: while block N commits on the storage thread, the signatures of
        # batch N+1 are checked in the worker process. Blocks still commit one at a
        # time, in submission order.
        committing: asyncio.Task[None] | None = None
        try:
            while True:
                batch = await self._collect()
                verdicts = await self._verify(batch)
                if committing is not None:
                    await committing
                committing = asyncio.create_task(self._commit(batch, verdicts))
        finally:
            if committing is not None and not committing.done():
                committing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await committing

    async def _commit(self, batch: list[_Item], verdicts: list[bool] | None) -> None:
        try:
            results = await self._node.commit_batch([tx for tx, _ in batch], verdicts)
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
