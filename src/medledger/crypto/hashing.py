"""Hash functions used across medledger (SHA-256 only)."""

from __future__ import annotations

import hashlib

__all__ = ["HASH_SIZE", "sha256"]

HASH_SIZE = 32


def sha256(*parts: bytes) -> bytes:
    """SHA-256 over the concatenation of ``parts``."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()
