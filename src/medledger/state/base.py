"""The read interface of the world state, and a dict-backed implementation.

The world state is a map from ``bytes`` keys to ``bytes`` values (values are
canonical CBOR produced by the contracts; this layer never looks inside them).
Contracts only see a :class:`StateReader`: point reads with :meth:`~StateReader.get`
and ordered prefix scans with :meth:`~StateReader.scan`.

Ordering is plain bytewise (lexicographic) order of the keys, the order of
Python's ``bytes`` comparison, so ``b"a" < b"a\\x00" < b"b"``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol, runtime_checkable

__all__ = ["MemoryState", "StateReader", "prefix_upper_bound", "scan_bounds"]


@runtime_checkable
class StateReader(Protocol):
    """Read-only view of a key-value world state."""

    def get(self, key: bytes) -> bytes | None:
        """Return the value stored under ``key``, or ``None`` if it is absent."""
        ...

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(key, value)`` for the keys starting with ``prefix``, ascending.

        ``start`` is an inclusive lower bound on the keys (keys ``< start`` are
        skipped; a ``start`` below ``prefix`` has no effect). ``limit`` caps the
        number of pairs yielded (``None``: no cap; ``0``: nothing). Mutating the
        underlying state while iterating gives unspecified (but memory-safe) results.
        """
        ...


def prefix_upper_bound(prefix: bytes) -> bytes | None:
    """Smallest key greater than every key starting with ``prefix``.

    ``None`` when there is none (``prefix`` is empty or all ``0xff`` bytes).
    """
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes((trimmed[-1] + 1,))


def scan_bounds(prefix: bytes, start: bytes | None) -> tuple[bytes, bytes | None]:
    """Return the half-open key range ``[low, high)`` a ``scan`` call covers.

    ``high`` is ``None`` for an unbounded range.
    """
    low = prefix if start is None or start < prefix else start
    return low, prefix_upper_bound(prefix)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")


class MemoryState:
    """A :class:`StateReader` over a plain ``dict``, with :meth:`apply` to change it.

    Meant for tests, contract unit tests and tools. The sorted key list used by
    :meth:`scan` is rebuilt lazily after changes.
    """

    __slots__ = ("_data", "_sorted")

    def __init__(self, items: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]] = ()) -> None:
        self._data: dict[bytes, bytes] = dict(items)
        self._sorted: list[bytes] | None = None

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        _check_limit(limit)
        return self._scan(prefix, start, limit)

    def _scan(
        self, prefix: bytes, start: bytes | None, limit: int | None
    ) -> Iterator[tuple[bytes, bytes]]:
        if self._sorted is None:
            self._sorted = sorted(self._data)
        keys = self._sorted
        low, high = scan_bounds(prefix, start)
        i = bisect_left(keys, low)
        end = len(keys) if high is None else bisect_left(keys, high, i)
        if limit is not None:
            end = min(end, i + limit)
        data = self._data
        for key in keys[i:end]:
            value = data.get(key)
            if value is not None:
                yield key, value

    def apply(self, changes: Mapping[bytes, bytes | None]) -> None:
        """Apply net changes: a ``bytes`` value is a put, ``None`` a delete."""
        data = self._data
        for key, value in changes.items():
            if value is None:
                if data.pop(key, None) is not None:
                    self._sorted = None
            else:
                if key not in data:
                    self._sorted = None
                data[key] = value

    def items(self) -> dict[bytes, bytes]:
        """A copy of the whole state."""
        return dict(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
