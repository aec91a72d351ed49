"""RFC 9162 section 2.1.1 hashing: domain-separated SHA-256 for leaves and interior nodes.

A leaf is hashed as ``SHA-256(0x00 || data)`` and an interior node as
``SHA-256(0x01 || left || right)``; the different one-byte prefixes stop a leaf from
being passed off as an interior node (second-preimage attacks). The hash of the empty
tree is ``SHA-256()`` of the empty string.

``leaf_hash`` and ``node_hash`` are on every hot path (appending, proving, verifying),
so they call :mod:`hashlib` directly rather than the generic ``sha256(*parts)`` helper.
"""

from __future__ import annotations

import hashlib
from typing import Final

from medledger.crypto.hashing import HASH_SIZE

__all__ = ["EMPTY_ROOT", "HASH_SIZE", "leaf_hash", "node_hash"]

_sha256 = hashlib.sha256
_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
# Below this size one concatenation is cheaper than a second ``update`` call; above it,
# copying the data would cost more than the call.
_CONCAT_LIMIT: Final = 4096

EMPTY_ROOT: Final[bytes] = _sha256(b"").digest()
"""MTH({}) — the root hash of the tree with no leaves, ``SHA-256("")``."""


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 9162 leaf hash ``SHA-256(0x00 || data)``."""
    if len(data) <= _CONCAT_LIMIT:
        return _sha256(_LEAF_PREFIX + data).digest()
    h = _sha256(_LEAF_PREFIX)
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 9162 interior node hash ``SHA-256(0x01 || left || right)``."""
    return _sha256(_NODE_PREFIX + left + right).digest()
