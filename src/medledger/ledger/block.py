"""Block headers.

A block groups consecutive log entries. Its header is a canonical-CBOR map::

    {
      "v": 1,
      "net": network id,
      "height": h,                      0 for the genesis block
      "prev": hash of block h-1's header (32 zero bytes for genesis),
      "first": log index of the block's first transaction,
      "count": number of transactions in the block,
      "log_size": log size after the block,
      "log_root": RFC 9162 root of the log at log_size,
      "state_root": commitment to world state after the block,
      "time": block time (ms since epoch; never before the previous block's),
      "proposer": key id of the node that built the block (empty for genesis),
      "genesis": SHA-256 of the canonical genesis document (genesis block only, else empty)
    }

The block hash is ``SHA-256(b"medledger/block/v1\\x00" || header bytes)`` and the
proposer signs that hash (Ed25519). Blocks chain by ``prev``; the log root and
size chain the transactions; the state root chains the world state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from medledger.crypto.signing import SigningKey, VerifyKey
from medledger.encoding import decode, encode
from medledger.errors import EncodingError, IntegrityError, InvalidSignature

__all__ = ["BLOCK_DOMAIN", "ZERO_HASH", "BlockHeader"]

BLOCK_DOMAIN = b"medledger/block/v1\x00"
ZERO_HASH = bytes(32)
_FIELDS = (
    "v",
    "net",
    "height",
    "prev",
    "first",
    "count",
    "log_size",
    "log_root",
    "state_root",
    "time",
    "proposer",
    "genesis",
)


@dataclass(frozen=True, slots=True)
class BlockHeader:
    network: str
    height: int
    prev: bytes
    first: int
    count: int
    log_size: int
    log_root: bytes
    state_root: bytes
    time: int
    proposer: bytes
    genesis: bytes = b""

    def to_map(self) -> dict[str, Any]:
        return {
            "v": 1,
            "net": self.network,
            "height": self.height,
            "prev": self.prev,
            "first": self.first,
            "count": self.count,
            "log_size": self.log_size,
            "log_root": self.log_root,
            "state_root": self.state_root,
            "time": self.time,
            "proposer": self.proposer,
            "genesis": self.genesis,
        }

    def to_bytes(self) -> bytes:
        return encode(self.to_map())

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(BLOCK_DOMAIN + self.to_bytes()).digest()

    def sign(self, key: SigningKey) -> bytes:
        return key.sign(self.hash)

    def verify_signature(self, pub: bytes, sig: bytes) -> None:
        try:
            VerifyKey(pub).verify(sig, self.hash)
        except InvalidSignature:
            raise IntegrityError("proposer signature does not verify") from None

    @classmethod
    def from_bytes(cls, raw: bytes) -> BlockHeader:
        try:
            m = decode(raw)
        except EncodingError as exc:
            raise IntegrityError(f"block header is not canonical CBOR: {exc}") from exc
        if not isinstance(m, dict) or set(m) != set(_FIELDS) or m["v"] != 1:
            raise IntegrityError("block header has the wrong fields")
        try:
            hdr = cls(
                network=m["net"],
                height=m["height"],
                prev=m["prev"],
                first=m["first"],
                count=m["count"],
                log_size=m["log_size"],
                log_root=m["log_root"],
                state_root=m["state_root"],
                time=m["time"],
                proposer=m["proposer"],
                genesis=m["genesis"],
            )
        except KeyError as exc:  # pragma: no cover - guarded by the field check
            raise IntegrityError("block header is incomplete") from exc
        for name in ("prev", "log_root", "state_root"):
            value = getattr(hdr, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise IntegrityError(f"block header {name} must be 32 bytes")
        for name in ("height", "first", "count", "log_size", "time"):
            value = getattr(hdr, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise IntegrityError(f"block header {name} must be a non-negative integer")
        return hdr

    def to_json(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "hash": self.hash.hex(),
            "prev": self.prev.hex(),
            "first": self.first,
            "count": self.count,
            "log_size": self.log_size,
            "log_root": self.log_root.hex(),
            "state_root": self.state_root.hex(),
            "time": self.time,
            "proposer": self.proposer.hex(),
            "genesis": self.genesis.hex(),
        }
