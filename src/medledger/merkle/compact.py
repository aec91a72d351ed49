"""Compact Merkle ranges: append leaves in O(log n) while keeping only the right border.

A tree of ``size`` leaves is, left to right, a sequence of perfect subtrees, one per set
bit of ``size`` with the highest level first (:func:`border_ids`). Those roots are all a
log needs to keep to go on appending and to compute the RFC 9162 root, as in
transparency-dev/merkle ``compact/range.go`` (specialised to ranges starting at 0).

Appending a leaf works like incrementing a binary counter: the new leaf becomes a level-0
node, and while the node just completed is a right child (its index is odd) it merges
with the border node to its left into their parent. Each merge completes a perfect node,
which :meth:`CompactRange.append` reports so a store can persist it for proof building.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from medledger.errors import IntegrityError, ProofError
from medledger.merkle.hasher import EMPTY_ROOT, HASH_SIZE, node_hash
from medledger.merkle.proof import NodeID, range_nodes

__all__ = ["CompactRange", "border_ids", "root_from_border"]


def border_ids(size: int) -> list[NodeID]:
    """Ids of the perfect subtrees making up a tree of ``size`` leaves, left to right.

    One node per set bit of ``size``, highest level first: e.g. size 6 gives
    ``[(2, 0), (1, 2)]`` (leaves 0-3 and 4-5).
    """
    return range_nodes(0, size)


def root_from_border(hashes: Sequence[bytes]) -> bytes:
    """RFC 9162 root of the tree whose border node hashes are ``hashes`` (left to right).

    RFC 9162's tree is left-balanced, so the root is the border folded from the right:
    ``node_hash(h0, node_hash(h1, ... node_hash(h[-2], h[-1])))``; ``EMPTY_ROOT`` if empty.
    """
    if not hashes:
        return EMPTY_ROOT
    root = hashes[-1]
    for i in range(len(hashes) - 2, -1, -1):
        root = node_hash(hashes[i], root)
    return root


class CompactRange:
    """The right border of a Merkle tree over leaves ``[0, size)``.

    Holds ``size`` and the hashes of :func:`border_ids` ``(size)``; memory and work per
    append are O(log size). Not thread-safe: callers serialise appends.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        """An empty range (size 0)."""
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_hashes(cls, size: int, hashes: Sequence[bytes]) -> CompactRange:
        """Restore a range from ``size`` and its border hashes (as from :meth:`to_hashes`).

        Raises :class:`~medledger.errors.IntegrityError` if the number of hashes does not
        match ``size`` (one per set bit) or a hash has the wrong length.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise IntegrityError(f"invalid compact range size {size!r}", size=size)
        want = size.bit_count()
        if len(hashes) != want:
            raise IntegrityError(
                f"compact range of size {size} needs {want} hashes, got {len(hashes)}",
                size=size,
                got=len(hashes),
                want=want,
            )
        for i, h in enumerate(hashes):
            if not isinstance(h, bytes) or len(h) != HASH_SIZE:
                raise IntegrityError(
                    f"compact range hash {i} is not {HASH_SIZE} bytes", size=size, position=i
                )
        rng = cls()
        rng._size = size
        rng._hashes = list(hashes)
        return rng

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def ids(self) -> list[NodeID]:
        """Ids of the border nodes, in the order of :meth:`to_hashes`."""
        return border_ids(self._size)

    def to_hashes(self) -> list[bytes]:
        """Border node hashes, left to right (a copy)."""
        return list(self._hashes)

    def copy(self) -> CompactRange:
        """An independent copy of this range."""
        return CompactRange.from_hashes(self._size, self._hashes)

    def append(self, leaf_hash: bytes) -> list[tuple[NodeID, bytes]]:
        """Append one leaf hash; return the perfect nodes this completes, lowest first.

        The first entry is always the leaf itself, ``((0, old_size), leaf_hash)``, followed
        by one entry per merge (as many as the trailing one bits of the old size). Raises
        :class:`~medledger.errors.ProofError` if ``leaf_hash`` is not 32 bytes.
        """
        if len(leaf_hash) != HASH_SIZE:
            raise ProofError(
                f"leaf hash has {len(leaf_hash)} bytes, expected {HASH_SIZE}",
                got=len(leaf_hash),
            )
        hashes = self._hashes
        index = self._size
        level = 0
        h = bytes(leaf_hash)
        completed: list[tuple[NodeID, bytes]] = [((0, index), h)]
        while index & 1:
            h = node_hash(hashes.pop(), h)
            index >>= 1
            level += 1
            completed.append(((level, index), h))
        hashes.append(h)
        self._size += 1
        return completed

    def extend(self, leaf_hashes: Iterable[bytes]) -> list[tuple[NodeID, bytes]]:
        """Append several leaf hashes; return all the perfect nodes completed, in order."""
        completed: list[tuple[NodeID, bytes]] = []
        for h in leaf_hashes:
            completed.extend(self.append(h))
        return completed

    def root(self) -> bytes:
        """RFC 9162 ``MTH`` of the leaves so far (``EMPTY_ROOT`` for size 0)."""
        return root_from_border(self._hashes)

    def __eq__(self, other: object) -> bool:
        # Defining __eq__ alone leaves instances unhashable, as befits a mutable object.
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"
