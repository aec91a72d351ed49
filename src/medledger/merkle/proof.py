"""Proof building: which stored nodes a proof needs, and how to turn them into the proof.

Building a proof is split in two, following transparency-dev/merkle ``proof/proof.go``:

1. :func:`inclusion_nodes` / :func:`consistency_nodes` are pure arithmetic on sizes and
   indices. They return a :class:`Nodes` naming the *perfect* subtrees (see
   :data:`NodeID`) a store must read. Perfect subtrees never change once complete, so a
   store can persist each one exactly once (see :meth:`CompactRange.append
   <medledger.merkle.compact.CompactRange.append>`).
2. :meth:`Nodes.rehash` takes the hashes of those nodes, in the same order, and folds the
   run of nodes that together make up the one *ephemeral* node — the imperfect subtree on
   the right border of the tree, which a store does not keep — into its hash. The result
   is the RFC 9162 proof.

Every proof is an audit path from some seed node up to the root. Walking up from the seed
``(level, index)``, the path to the seed and the path to the right edge of the tree (leaf
position ``size``) first share an ancestor above the *fork* node: the seed's ancestor that
is a left child and whose right sibling contains position ``size``. Hence the proof is:

* the siblings of the seed's ancestors below the fork (all perfect);
* the fork's right sibling, restricted to ``[end_of_fork, size)`` — the ephemeral node,
  covered by :func:`range_nodes` ``(end, size)`` (may be empty, or a single perfect node);
* the left siblings of the ancestors above the fork, i.e. the perfect subtrees covering
  ``[0, begin_of_fork)``, lowest level first. Right siblings above the fork lie beyond the
  end of the tree and do not exist in RFC 9162's left-balanced tree.

All counts are O(log n).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from medledger.errors import ProofError
from medledger.merkle.hasher import HASH_SIZE, node_hash

__all__ = [
    "NodeID",
    "Nodes",
    "consistency_nodes",
    "inclusion_nodes",
    "node_range",
    "range_nodes",
]

NodeID = tuple[int, int]
"""``(level, index)``: the perfect subtree over leaves ``[index << level, (index + 1) << level)``.

Level 0 nodes are leaves; ``(level + 1, index // 2)`` is the parent of ``(level, index)``.
"""


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProofError(f"{name} must be an int, got {type(value).__name__}", **{name: value})
    if value < 0:
        raise ProofError(f"{name} must not be negative, got {value}", **{name: value})


def node_range(node: NodeID) -> tuple[int, int]:
    """Return the half-open range of leaf indices ``[begin, end)`` covered by ``node``."""
    level, index = node
    return index << level, (index + 1) << level


def range_nodes(begin: int, end: int) -> list[NodeID]:
    """Decompose the leaf range ``[begin, end)`` into the fewest perfect subtrees.

    Returns them left to right. Greedily takes, at each position, the largest subtree that
    is aligned there and still fits; levels first rise then fall, so there are at most
    ``2 * log2(end - begin) + 2`` nodes. ``range_nodes(0, size)`` is the right border of a
    tree of ``size`` leaves: one node per set bit of ``size``, highest level first.
    """
    _check_count("begin", begin)
    _check_count("end", end)
    if begin > end:
        raise ProofError(f"invalid range [{begin}, {end})", begin=begin, end=end)
    ids: list[NodeID] = []
    while begin < end:
        # Largest level allowed by alignment of ``begin`` and by the room left.
        level = (end - begin).bit_length() - 1
        if begin:
            level = min(level, (begin & -begin).bit_length() - 1)
        ids.append((level, begin >> level))
        begin += 1 << level
    return ids


@dataclass(frozen=True, slots=True)
class Nodes:
    """The perfect nodes a store must read to build one proof, and how to assemble it.

    ``ids[begin:end]`` (empty if ``begin == end``) are the nodes that make up the
    ephemeral node ``ephem``, ordered right to left so that :meth:`rehash` can fold them
    as ``node_hash(ids[i], acc)``. Every other id is a proof element as it stands.
    """

    ids: tuple[NodeID, ...]
    begin: int = 0
    end: int = 0
    ephem: NodeID | None = None
    """The imperfect right-border node the ``ids[begin:end]`` run stands for, if any.
    (It may lie partly beyond the tree: only ``[its begin, size)`` counts.)"""

    @property
    def proof_size(self) -> int:
        """Number of hashes in the final proof (after :meth:`rehash`)."""
        run = self.end - self.begin
        return len(self.ids) - run + (1 if run else 0)

    def rehash(
        self,
        hashes: Sequence[bytes],
        hash_children: Callable[[bytes, bytes], bytes] = node_hash,
    ) -> list[bytes]:
        """Turn the hashes of :attr:`ids` (same order) into the RFC 9162 proof.

        Hashes outside the ephemeral run are copied; the run ``hashes[begin:end]`` is
        folded right to left into one hash. ``hash_children`` defaults to
        :func:`~medledger.merkle.hasher.node_hash` (tests may pass another combiner).
        """
        if len(hashes) != len(self.ids):
            raise ProofError(
                f"got {len(hashes)} node hashes, expected {len(self.ids)}",
                got=len(hashes),
                want=len(self.ids),
            )
        for i, h in enumerate(hashes):
            if len(h) != HASH_SIZE:
                raise ProofError(
                    f"hash of node {self.ids[i]} has {len(h)} bytes, expected {HASH_SIZE}",
                    node=self.ids[i],
                )
        if self.begin >= self.end:
            return list(hashes)
        ephem = hashes[self.begin]
        for i in range(self.begin + 1, self.end):
            ephem = hash_children(hashes[i], ephem)
        return [*hashes[: self.begin], ephem, *hashes[self.end :]]


def _path_nodes(level: int, index: int, size: int, *, include_seed: bool) -> Nodes:
    """Nodes proving that perfect node ``(level, index)`` is in the tree of ``size`` leaves.

    The node must lie inside the tree: ``(index + 1) << level <= size``. If
    ``include_seed`` the node itself comes first (a consistency proof ships it).
    """
    # The seed's ancestors and the ancestors of position ``size`` agree above the highest
    # bit where ``index`` and ``size >> level`` differ; the fork sits just below.
    inner = (index ^ (size >> level)).bit_length() - 1
    fork_level = level + inner
    fork_index = index >> inner
    fork_begin, fork_end = node_range((fork_level, fork_index))

    ids: list[NodeID] = [(level, index)] if include_seed else []
    # Siblings of the seed and of its ancestors, up to (not including) the fork.
    ids.extend((lvl, (index >> (lvl - level)) ^ 1) for lvl in range(level, fork_level))
    # The ephemeral node: fork's right sibling cut at ``size``, stored right to left.
    right = range_nodes(fork_end, size)
    right.reverse()
    begin = len(ids)
    ids.extend(right)
    end = len(ids)
    # Left siblings above the fork: perfect nodes covering [0, fork_begin), lowest first.
    left = range_nodes(0, fork_begin)
    left.reverse()
    ids.extend(left)

    if begin == end:
        return Nodes(tuple(ids))
    return Nodes(tuple(ids), begin, end, (fork_level, fork_index ^ 1))


def inclusion_nodes(index: int, size: int) -> Nodes:
    """Nodes for the inclusion proof of leaf ``index`` in the tree of ``size`` leaves.

    The rehashed proof is RFC 9162 ``PATH(index, D[size])`` (section 2.1.3.1).
    Raises :class:`~medledger.errors.ProofError` unless ``0 <= index < size``.
    """
    _check_count("index", index)
    _check_count("size", size)
    if index >= size:
        raise ProofError(
            f"leaf index {index} out of range for tree size {size}", index=index, size=size
        )
    return _path_nodes(0, index, size, include_seed=False)


def consistency_nodes(size1: int, size2: int) -> Nodes:
    """Nodes for the consistency proof from tree size ``size1`` to ``size2``.

    The rehashed proof is RFC 9162 ``PROOF(size1, D[size2])`` (section 2.1.4.1). It is
    the audit path, in the tree of ``size2``, of the largest perfect subtree ending at
    ``size1`` (level = trailing zeros of ``size1``), preceded by that subtree's own hash
    unless ``size1`` is a power of two (then the subtree is the old tree and the verifier
    already holds its root). Empty if ``size1 == size2`` or ``size1 == 0``.
    Raises :class:`~medledger.errors.ProofError` unless ``0 <= size1 <= size2``.
    """
    _check_count("size1", size1)
    _check_count("size2", size2)
    if size1 > size2:
        raise ProofError(f"size1 {size1} is larger than size2 {size2}", size1=size1, size2=size2)
    if size1 == size2 or size1 == 0:
        return Nodes(())
    level = (size1 & -size1).bit_length() - 1
    index = (size1 - 1) >> level
    return _path_nodes(level, index, size2, include_seed=index != 0)
