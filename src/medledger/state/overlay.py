"""Pending writes layered over a :class:`~medledger.state.base.StateReader`.

An :class:`Overlay` is what a block executes against: contracts read through it
(seeing the block's own earlier writes) and write into it; the base state is
never touched. At the end of the block :meth:`Overlay.changes` gives the net
writes, which the node applies to its state store and feeds to
:meth:`medledger.state.smt.SparseMerkleTree.update`.

Transaction atomicity uses nested savepoints, with SQL-like semantics::

    sp = overlay.savepoint()
    try:
        run_contract(overlay)
    except TransactionRejected:
        overlay.rollback(sp)     # every write since `sp` is undone, no trace left
        raise
    else:
        overlay.release(sp)      # keep the writes, forget the savepoint

Savepoints form a stack: :meth:`~Overlay.rollback` and :meth:`~Overlay.release`
of a savepoint also discard every savepoint taken after it. Writes are undone
through an undo log that is only kept while at least one savepoint is open.

Net-change reporting: :meth:`~Overlay.changes` reports every key written since
the overlay was created (and not rolled back) with its last written value, or
``None`` for a delete. It does not consult the base, so a key that was put and
then deleted is reported as a delete even when the base never had it, and a
put of the value the base already holds is reported as a put. Both are harmless
to apply (deleting an absent key and rewriting a value are no-ops for the state
and for the state root).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from contextlib import contextmanager

from medledger.errors import MedledgerError
from medledger.state.base import StateReader, scan_bounds

__all__ = ["Overlay"]


class _Absent:
    """Marker for "the key had no pending entry" in the undo log."""

    __slots__ = ()


_ABSENT = _Absent()


class Overlay:
    """A :class:`StateReader` of ``base`` plus pending puts and deletes.

    Reads see pending writes first (a pending delete hides the base value);
    :meth:`scan` merges the base scan with the pending keys in bytewise order.
    """

    __slots__ = ("_base", "_keys", "_marks", "_next_sp", "_pending", "_undo")

    def __init__(self, base: StateReader) -> None:
        self._base = base
        #: Pending entries: bytes = put, None = delete.
        self._pending: dict[bytes, bytes | None] = {}
        #: The keys of ``_pending``, sorted (for scans).
        self._keys: list[bytes] = []
        #: (key, previous pending entry or _ABSENT), only while savepoints are open.
        self._undo: list[tuple[bytes, bytes | _Absent | None]] = []
        #: Open savepoints, oldest first: (savepoint id, undo-log length when taken).
        self._marks: list[tuple[int, int]] = []
        self._next_sp = 1

    @property
    def base(self) -> StateReader:
        """The state this overlay reads through to."""
        return self._base

    # -- reads ---------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        pending = self._pending
        if key in pending:
            return pending[key]
        return self._base.get(key)

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        return self._scan(prefix, start, limit)

    def _scan(
        self, prefix: bytes, start: bytes | None, limit: int | None
    ) -> Iterator[tuple[bytes, bytes]]:
        if limit == 0:
            return
        low, high = scan_bounds(prefix, start)
        keys = self._keys
        i = bisect_left(keys, low)
        j = len(keys) if high is None else bisect_left(keys, high, i)
        pending = self._pending
        # Snapshot the pending entries in range: later writes do not disturb the scan.
        pend = [(k, pending[k]) for k in keys[i:j]]
        # Each pending key hides or replaces at most one base entry, so the base
        # never needs to yield more than limit + len(pend) entries.
        base_limit = None if limit is None else limit + len(pend)
        remaining = -1 if limit is None else limit
        pi = 0
        npend = len(pend)
        for bkey, bvalue in self._base.scan(prefix, start=start, limit=base_limit):
            while pi < npend and pend[pi][0] < bkey:
                pkey, pvalue = pend[pi]
                pi += 1
                if pvalue is not None:
                    yield pkey, pvalue
                    remaining -= 1
                    if remaining == 0:
                        return
            if pi < npend and pend[pi][0] == bkey:
                pvalue = pend[pi][1]
                pi += 1
                if pvalue is None:
                    continue
                bvalue = pvalue
            yield bkey, bvalue
            remaining -= 1
            if remaining == 0:
                return
        while pi < npend:
            pkey, pvalue = pend[pi]
            pi += 1
            if pvalue is not None:
                yield pkey, pvalue
                remaining -= 1
                if remaining == 0:
                    return

    # -- writes --------------------------------------------------------------

    def _set(self, key: bytes, value: bytes | None) -> None:
        pending = self._pending
        previous = pending.get(key, _ABSENT)
        if previous is _ABSENT:
            insort(self._keys, key)
        if self._marks:
            self._undo.append((key, previous))
        pending[key] = value

    def put(self, key: bytes, value: bytes) -> None:
        """Write ``value`` under ``key``."""
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise TypeError("state keys and values must be bytes")
        self._set(key, value)

    def delete(self, key: bytes) -> None:
        """Delete ``key`` (a no-op for the state if it is absent)."""
        if not isinstance(key, bytes):
            raise TypeError("state keys must be bytes")
        self._set(key, None)

    # -- savepoints ----------------------------------------------------------

    def savepoint(self) -> int:
        """Open a nested savepoint and return its id."""
        sp = self._next_sp
        self._next_sp += 1
        self._marks.append((sp, len(self._undo)))
        return sp

    def _index(self, sp: int) -> int:
        marks = self._marks
        for i in range(len(marks) - 1, -1, -1):
            if marks[i][0] == sp:
                return i
        raise MedledgerError(f"savepoint {sp} is not open")

    def rollback(self, sp: int) -> None:
        """Undo every write made since ``sp``; close ``sp`` and all later savepoints."""
        i = self._index(sp)
        mark = self._marks[i][1]
        del self._marks[i:]
        undo = self._undo
        pending = self._pending
        keys = self._keys
        while len(undo) > mark:
            key, previous = undo.pop()
            if isinstance(previous, _Absent):
                del pending[key]
                del keys[bisect_left(keys, key)]
            else:
                pending[key] = previous
        if not self._marks:
            undo.clear()

    def release(self, sp: int) -> None:
        """Keep the writes made since ``sp``; close ``sp`` and all later savepoints."""
        i = self._index(sp)
        del self._marks[i:]
        if not self._marks:
            self._undo.clear()

    @contextmanager
    def atomic(self) -> Iterator[int]:
        """Context manager: savepoint, released on success, rolled back on any exception."""
        sp = self.savepoint()
        try:
            yield sp
        except BaseException:
            self.rollback(sp)
            raise
        self.release(sp)

    @property
    def savepoint_depth(self) -> int:
        """Number of open savepoints."""
        return len(self._marks)

    # -- results -------------------------------------------------------------

    def changes(self) -> dict[bytes, bytes | None]:
        """Net writes since creation: key -> last value, ``None`` for a delete.

        See the module docstring: a put-then-delete of a key the base lacks is
        reported as a delete; the base is not consulted.
        """
        return dict(self._pending)

    def touched_keys(self) -> frozenset[bytes]:
        """Keys written (put or deleted) since creation and not rolled back.

        Reads are not tracked.
        """
        return frozenset(self._pending)

    def __len__(self) -> int:
        """Number of pending entries (puts and deletes)."""
        return len(self._pending)
