"""RFC 9162 Merkle tree log: hashing, compact ranges, proof building and verification.

* :mod:`~medledger.merkle.hasher` — ``leaf_hash``, ``node_hash``, ``EMPTY_ROOT``.
* :mod:`~medledger.merkle.compact` — :class:`CompactRange`, O(log n) appends whose newly
  completed perfect nodes a store persists.
* :mod:`~medledger.merkle.proof` — :func:`inclusion_nodes` / :func:`consistency_nodes`
  say which perfect nodes a proof needs; :meth:`Nodes.rehash` turns their hashes into
  the proof.
* :mod:`~medledger.merkle.verify` — stateless verifiers raising
  :class:`~medledger.errors.ProofError`.

Modelled on transparency-dev/merkle (Go).
"""

from medledger.merkle.compact import CompactRange, border_ids, root_from_border
from medledger.merkle.hasher import EMPTY_ROOT, HASH_SIZE, leaf_hash, node_hash
from medledger.merkle.proof import (
    NodeID,
    Nodes,
    consistency_nodes,
    inclusion_nodes,
    node_range,
    range_nodes,
)
from medledger.merkle.verify import (
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "NodeID",
    "Nodes",
    "border_ids",
    "consistency_nodes",
    "inclusion_nodes",
    "leaf_hash",
    "node_hash",
    "node_range",
    "range_nodes",
    "root_from_border",
    "root_from_inclusion_proof",
    "verify_consistency",
    "verify_inclusion",
]
