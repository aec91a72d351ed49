"""Signing and submitting transactions on behalf of local identities.

A :class:`Submitter` tracks each local key's next sequence number (read from
the committed state on first use, then counted locally) and serialises
signing per key, so concurrent callers never reuse or skip a number: each
transaction is queued at the orderer in sequence order while the key's lock
is held, and many may be in flight at once (:meth:`Submitter.submit_many`
queues a whole batch in one go).

Sequence numbers after a failure
--------------------------------
The ledger accepts a key's transaction only with sequence number ``last + 1``,
so when one in-flight transaction is refused (or its block fails to commit),
every later in-flight transaction of the same key fails too, with
:class:`~medledger.errors.OutOfOrderSequence`, through no fault of its own.
After any failure of a key's transaction the submitter therefore lets that
key's in-flight transactions drain, re-reads the last committed sequence
number from state, and only then signs the key's next transaction. Transactions
refused only for their *sequencing* (:class:`OutOfOrderSequence`, a sequence
number already used, :class:`~medledger.errors.StaleTransaction` after waiting
in a long queue) were not applied, so they are signed again with a fresh
number and time and resubmitted, a few times at most; the caller sees only the
outcome of its own transaction's content.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

from medledger.contracts.core import k_seq
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode
from medledger.errors import (
    MedledgerError,
    NotFoundError,
    OrdererError,
    OutOfOrderSequence,
    ReplayedTransaction,
    StaleTransaction,
    TransactionRejected,
)
from medledger.ledger.tx import Transaction, make_tx
from medledger.node import Node, Receipt

__all__ = ["Submitter"]

#: how often a transaction refused only for its sequence number or time is signed again
_ATTEMPTS = 4
_RETRYABLE = (OutOfOrderSequence, ReplayedTransaction, StaleTransaction)


class _KeyState:
    """Per signing key: the lock, the next number, what is in flight."""

    __slots__ = ("dirty", "idle", "inflight", "lock", "next")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.next: int | None = None  # None: read from state before the next signature
        self.inflight = 0
        self.dirty = False  # a transaction failed: drain, then re-read the number
        self.idle = asyncio.Event()
        self.idle.set()


class Submitter:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._keys: dict[bytes, _KeyState] = {}

    async def _last_seq(self, key: SigningKey) -> int:
        raw = await self.node.state_get(k_seq(key.key_id))
        return 0 if raw is None else int(decode(raw))

    def _settled(self, ks: _KeyState, fut: asyncio.Future[Receipt]) -> None:
        ks.inflight -= 1
        if fut.cancelled() or fut.exception() is not None:
            ks.dirty = True
        if ks.inflight == 0:
            ks.idle.set()

    async def _enqueue(
        self, key: SigningKey, items: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[tuple[Transaction, asyncio.Future[Receipt]] | MedledgerError]:
        """Sign ``items`` with consecutive numbers and queue them, in order."""
        ks = self._keys.setdefault(key.key_id, _KeyState())
        out: list[tuple[Transaction, asyncio.Future[Receipt]] | MedledgerError] = []
        async with ks.lock:
            if ks.dirty:
                while ks.inflight:  # nothing new is queued meanwhile: we hold the lock
                    await ks.idle.wait()
                ks.dirty, ks.next = False, None
            seq = ks.next if ks.next is not None else await self._last_seq(key) + 1
            try:
                for type_, payload in items:
                    try:
                        tx = make_tx(
                            key, self.node.network, type_, payload, seq=seq, time=self.node.clock()
                        )
                        fut = self.node.enqueue(tx)  # queued in sequence order under the lock
                    except MedledgerError as exc:  # malformed payload, orderer unavailable
                        out.append(exc)
                        continue
                    seq += 1
                    ks.inflight += 1
                    ks.idle.clear()
                    fut.add_done_callback(functools.partial(self._settled, ks))
                    out.append((tx, fut))
            finally:
                ks.next = seq
        return out

    async def _committed(self, tx: Transaction) -> Receipt | None:
        """The receipt of ``tx`` if this very transaction is on the ledger."""
        try:
            rec = await self.node.get_tx(tx.tx_id)
        except NotFoundError:
            return None
        return Receipt(rec.tx_id, rec.index, rec.height)

    async def submit_many(
        self, key: SigningKey, items: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[Receipt | MedledgerError]:
        """Sign and queue every ``(type, payload)`` at once; wait until each is decided.

        Returns, in order, each transaction's :class:`Receipt` (committed in a
        durable block) or the error it was refused with (a
        :class:`~medledger.errors.TransactionRejected` subclass, or
        :class:`~medledger.errors.OrdererError` when it was not committed). One
        item's refusal does not affect the others.
        """
        results: list[Receipt | MedledgerError | None] = [None] * len(items)
        todo = list(range(len(items)))
        for attempt in range(_ATTEMPTS):
            queued = await self._enqueue(key, [items[i] for i in todo])
            retry: list[int] = []
            for i, q in zip(todo, queued, strict=True):
                if isinstance(q, MedledgerError):
                    results[i] = q
                    continue
                tx, fut = q
                try:
                    # shielded: a cancelled caller must not cancel the queued transaction
                    results[i] = await asyncio.shield(fut)
                except _RETRYABLE as exc:
                    found = (
                        await self._committed(tx) if isinstance(exc, ReplayedTransaction) else None
                    )
                    results[i] = exc if found is None else found
                    if found is None and attempt + 1 < _ATTEMPTS:
                        retry.append(i)
                except (TransactionRejected, OrdererError) as exc:
                    results[i] = exc
            todo = retry
            if not todo:
                break
        done: list[Receipt | MedledgerError] = []
        for r in results:
            assert r is not None
            done.append(r)
        return done

    async def submit(self, key: SigningKey, type_: str, payload: dict[str, Any]) -> Receipt:
        """Sign ``payload`` as ``type_`` with ``key`` and wait until it is committed.

        Raises the :class:`~medledger.errors.TransactionRejected` subclass it was
        refused with, or :class:`~medledger.errors.OrdererError`.
        """
        (result,) = await self.submit_many(key, [(type_, payload)])
        if isinstance(result, MedledgerError):
            raise result
        return result
