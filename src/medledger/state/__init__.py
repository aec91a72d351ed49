"""World state: the contract read interface, pending-write overlays, and the
authenticated (sparse Merkle tree) commitment carried in block headers.

* :mod:`~medledger.state.base` — :class:`StateReader`, :class:`MemoryState`.
* :mod:`~medledger.state.overlay` — :class:`Overlay` with nested savepoints.
* :mod:`~medledger.state.smt` — :class:`SparseMerkleTree`, node stores, proofs,
  :func:`compute_root`.
"""

from medledger.state.base import MemoryState, StateReader, prefix_upper_bound
from medledger.state.overlay import Overlay
from medledger.state.smt import (
    EMPTY_HASH,
    EMPTY_ROOT,
    MemoryNodeStore,
    NodeStore,
    SparseMerkleTree,
    StateProof,
    UpdateResult,
    compute_root,
    internal_hash,
    key_hash,
    leaf_hash,
    node_key,
    verify_state_proof,
)

__all__ = [
    "EMPTY_HASH",
    "EMPTY_ROOT",
    "MemoryNodeStore",
    "MemoryState",
    "NodeStore",
    "Overlay",
    "SparseMerkleTree",
    "StateProof",
    "StateReader",
    "UpdateResult",
    "compute_root",
    "internal_hash",
    "key_hash",
    "leaf_hash",
    "node_key",
    "prefix_upper_bound",
    "verify_state_proof",
]
