"""A slow, obviously correct Merkle tree, transcribed from RFC 9162 section 2.1 (tests only).

Each function mirrors one recursive definition of the RFC, written over the leaf range
``D[lo:hi]`` of a fixed list of leaf hashes instead of copying sub-lists. ``MTH`` results
are memoised per range, which changes nothing but the speed. Nothing is imported from
``medledger``: hashing is spelled out with :mod:`hashlib`.

The same recursions are also given over *symbolic* hashes — a subtree stands for the leaf
range it covers — so proof shapes can be checked at sizes far too large to hash.
"""

from __future__ import annotations

import hashlib
from functools import cache


def rfc_leaf_hash(data: bytes) -> bytes:
    """``MTH({d0}) = SHA-256(0x00 || d0)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def rfc_node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """``k``: the largest power of two smaller than ``n`` (``n > 1``)."""
    assert n > 1
    k = 1
    while k * 2 < n:
        k *= 2
    return k


class ReferenceTree:
    """RFC 9162 definitions over the leaf data ``entries`` (any prefix is a tree)."""

    def __init__(self, entries: list[bytes]) -> None:
        self.entries = entries
        self.mth = cache(self._mth)

    def _mth(self, lo: int, hi: int) -> bytes:
        """``MTH(D[lo:hi])`` (section 2.1.1)."""
        n = hi - lo
        if n == 0:
            return hashlib.sha256(b"").digest()
        if n == 1:
            return rfc_leaf_hash(self.entries[lo])
        k = split_point(n)
        return rfc_node_hash(self.mth(lo, lo + k), self.mth(lo + k, hi))

    def root(self, n: int) -> bytes:
        """``MTH(D[0:n])``."""
        return self.mth(0, n)

    def path(self, m: int, n: int) -> list[bytes]:
        """``PATH(m, D[0:n])``, the inclusion proof of leaf ``m`` (section 2.1.3.1)."""
        return self._path(m, 0, n)

    def _path(self, m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        assert 0 <= m < n
        if n == 1:
            return []
        k = split_point(n)
        if m < k:
            return [*self._path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self._path(m - k, lo + k, hi), self.mth(lo, lo + k)]

    def proof(self, m: int, n: int) -> list[bytes]:
        """``PROOF(m, D[0:n])``, the consistency proof from size ``m`` (section 2.1.4.1)."""
        assert 0 < m <= n
        return self._subproof(m, 0, n, True)

    def _subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if b else [self.mth(lo, hi)]
        k = split_point(n)
        if m <= k:
            return [*self._subproof(m, lo, lo + k, b), self.mth(lo + k, hi)]
        return [*self._subproof(m - k, lo + k, hi, False), self.mth(lo, lo + k)]


# Symbolic versions: a hash is replaced by the leaf range (lo, hi) it commits to.


def symbolic_path(m: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """``PATH`` over ``D[lo:hi]`` where ``MTH(D[a:b])`` is written ``(a, b)``."""
    n = hi - lo
    assert 0 <= m < n
    if n == 1:
        return []
    k = split_point(n)
    if m < k:
        return [*symbolic_path(m, lo, lo + k), (lo + k, hi)]
    return [*symbolic_path(m - k, lo + k, hi), (lo, lo + k)]


def symbolic_subproof(m: int, lo: int, hi: int, b: bool) -> list[tuple[int, int]]:
    """``SUBPROOF`` over ``D[lo:hi]`` where ``MTH(D[a:b])`` is written ``(a, b)``."""
    n = hi - lo
    if m == n:
        return [] if b else [(lo, hi)]
    k = split_point(n)
    if m <= k:
        return [*symbolic_subproof(m, lo, lo + k, b), (lo + k, hi)]
    return [*symbolic_subproof(m - k, lo + k, hi, False), (lo, lo + k)]
