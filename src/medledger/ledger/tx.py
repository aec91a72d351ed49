"""Signed transactions.

A transaction is a canonical-CBOR map (see :mod:`medledger.encoding`)::

    {
      "v":       1,                  envelope version
      "net":     "medledger-demo",   network id
      "type":    "note.anchor",      transaction type (must be known at the block's height)
      "payload": {...},              type-specific map
      "signer":  h'<16-byte key id>',
      "pub":     h'<32-byte Ed25519 public key>',   key id must equal key_id(pub)
      "seq":     7,                  per-signer sequence number, 1, 2, 3, ... (replay protection)
      "time":    1764000000000,      signer's clock, milliseconds since the Unix epoch
      "sig":     h'<64-byte Ed25519 signature>'
    }

The signature covers ``b"medledger/tx/v1\\x00" || encode(envelope without "sig")``.
The canonical bytes of the whole map (signature included) are the log leaf; the
transaction id is ``SHA-256(those bytes)``.

The public key travels with the transaction so that signatures verify without
state (fast, parallel, and checkable by anyone holding the log). Whether that
key may sign, and whether the sequence number is the next one, are stateful
checks done when the transaction is applied (:mod:`medledger.ledger.apply`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from medledger.crypto.signing import KEY_ID_SIZE, SigningKey, VerifyKey
from medledger.encoding import decode, encode
from medledger.errors import (
    BadTransactionSignature,
    EncodingError,
    InvalidSignature,
    MalformedTransaction,
    WrongNetwork,
)

__all__ = [
    "MAX_TX_BYTES",
    "SIG_DOMAIN",
    "Transaction",
    "check_signed",
    "make_tx",
]

SIG_DOMAIN = b"medledger/tx/v1\x00"
ENVELOPE_VERSION = 1
MAX_TX_BYTES = 256 * 1024
_FIELDS = frozenset({"v", "net", "type", "payload", "signer", "pub", "seq", "time", "sig"})
_MAX_TYPE_LEN = 64


@dataclass(frozen=True, slots=True)
class Transaction:
    """A decoded, structurally valid (not necessarily authorised) transaction."""

    network: str
    type: str
    payload: dict[str, Any]
    signer: bytes
    pub: bytes
    seq: int
    time: int
    sig: bytes
    raw: bytes = field(repr=False)
    tx_id: bytes = field(repr=False)
    # By-products of parsing, kept so that checking the signature does not derive
    # them again; not part of the value (excluded from ==, hash, repr and pickling).
    _key: VerifyKey | None = field(default=None, repr=False, compare=False)
    _sig_at: int = field(default=-1, repr=False, compare=False)  # offset of "sig" in raw

    def __reduce__(self) -> tuple[Any, ...]:
        # Send the value only; the parsing by-products are derived again on the other side.
        return (
            _rebuild,
            (
                self.network,
                self.type,
                self.payload,
                self.signer,
                self.pub,
                self.seq,
                self.time,
                self.sig,
                self.raw,
                self.tx_id,
            ),
        )

    # -- construction -------------------------------------------------------------
    @staticmethod
    def unsigned_body(
        network: str, type_: str, payload: dict[str, Any], pub: bytes, seq: int, time: int
    ) -> dict[str, Any]:
        return {
            "v": ENVELOPE_VERSION,
            "net": network,
            "type": type_,
            "payload": payload,
            "signer": VerifyKey(pub).key_id,
            "pub": pub,
            "seq": seq,
            "time": time,
        }

    @classmethod
    def from_bytes(cls, raw: bytes) -> Transaction:
        """Parse and structurally validate canonical transaction bytes.

        Raises :class:`MalformedTransaction` for anything that is not a
        well-formed envelope. The signature is *not* checked here; see
        :meth:`verify_signature`.
        """
        if len(raw) > MAX_TX_BYTES:
            raise MalformedTransaction(f"transaction larger than {MAX_TX_BYTES} bytes")
        try:
            env = decode(raw)
        except EncodingError as exc:
            raise MalformedTransaction(f"not canonical CBOR: {exc}") from exc
        return cls._from_map(env, bytes(raw))

    @classmethod
    def _from_map(cls, env: object, raw: bytes) -> Transaction:
        if not isinstance(env, dict):
            raise MalformedTransaction("envelope must be a map")
        keys = set(env)
        if keys != _FIELDS:
            missing = sorted(_FIELDS - keys)
            extra = sorted(keys - _FIELDS)
            raise MalformedTransaction(f"envelope fields wrong (missing {missing}, extra {extra})")
        if env["v"] != ENVELOPE_VERSION or isinstance(env["v"], bool):
            raise MalformedTransaction(f"unsupported envelope version {env['v']!r}")
        net, type_, payload = env["net"], env["type"], env["payload"]
        signer, pub, seq, time, sig = env["signer"], env["pub"], env["seq"], env["time"], env["sig"]
        if not isinstance(net, str) or not net:
            raise MalformedTransaction("net must be a non-empty string")
        if not isinstance(type_, str) or not 0 < len(type_) <= _MAX_TYPE_LEN:
            raise MalformedTransaction("type must be a short non-empty string")
        if not isinstance(payload, dict):
            raise MalformedTransaction("payload must be a map")
        if not isinstance(signer, bytes) or len(signer) != KEY_ID_SIZE:
            raise MalformedTransaction(f"signer must be a {KEY_ID_SIZE}-byte key id")
        if not isinstance(pub, bytes) or len(pub) != 32:
            raise MalformedTransaction("pub must be a 32-byte Ed25519 public key")
        for name, value in (("seq", seq), ("time", time)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MalformedTransaction(f"{name} must be a non-negative integer")
        if seq < 1:
            raise MalformedTransaction("seq starts at 1")
        if not isinstance(sig, bytes) or len(sig) != 64:
            raise MalformedTransaction("sig must be a 64-byte Ed25519 signature")
        try:
            key = VerifyKey(pub)
        except Exception as exc:
            raise MalformedTransaction("pub is not a valid Ed25519 public key") from exc
        if key.key_id != signer:
            raise MalformedTransaction("signer key id does not match pub")
        return cls(
            network=net,
            type=type_,
            payload=payload,
            signer=signer,
            pub=pub,
            seq=seq,
            time=time,
            sig=sig,
            raw=raw,
            tx_id=hashlib.sha256(raw).digest(),
            _key=key,
            _sig_at=_sig_offset(raw, net, seq, sig),
        )

    # -- checks ---------------------------------------------------------------------
    def signing_bytes(self) -> bytes:
        at = self._sig_at
        if at >= 0:
            # ``raw`` is the canonical map of the nine fields; without its "sig" entry
            # (and with the map head counting eight) it is exactly encode(body).
            raw = self.raw
            return b"".join((SIG_DOMAIN, b"\xa8", raw[1:at], raw[at + _SIG_ENTRY_SIZE :]))
        body = self.unsigned_body(
            self.network, self.type, self.payload, self.pub, self.seq, self.time
        )
        return SIG_DOMAIN + encode(body)

    def verify_signature(self) -> None:
        """Raise :class:`BadTransactionSignature` unless the signature is valid."""
        key = self._key
        try:
            (key or VerifyKey(self.pub)).verify(self.sig, self.signing_bytes())
        except InvalidSignature:
            raise BadTransactionSignature(
                f"signature of transaction {self.tx_id.hex()} does not verify"
            ) from None

    def check_network(self, network: str) -> None:
        if self.network != network:
            raise WrongNetwork(f"transaction is for network {self.network!r}, not {network!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly view (bytes as hex); for display, never for hashing."""
        return {
            "tx_id": self.tx_id.hex(),
            "network": self.network,
            "type": self.type,
            "payload": _jsonable(self.payload),
            "signer": self.signer.hex(),
            "pub": self.pub.hex(),
            "seq": self.seq,
            "time": self.time,
            "sig": self.sig.hex(),
        }


#: Canonical encoding of the envelope's "sig" entry: text "sig", then a 64-byte string head.
_SIG_ENTRY_HEAD = b"\x63sig\x58\x40"
_SIG_ENTRY_SIZE = len(_SIG_ENTRY_HEAD) + 64


def _head_size(n: int) -> int:
    """Size of the canonical CBOR head carrying argument ``n`` (0 <= n < 2**64)."""
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    if n < 0x100000000:
        return 5
    return 9


def _sig_offset(raw: bytes, net: str, seq: int, sig: bytes) -> int:
    """Offset of the "sig" entry in the canonical envelope ``raw``, or -1.

    Canonical key order is v, net, pub, seq, sig, time, type, signer, payload,
    so the entry follows "v": 1, "net": <net>, "pub": <32 bytes>, "seq": <seq>.
    The computed position is confirmed against ``raw`` before it is used.
    """
    n = len(net.encode())
    at = 4 + 4 + _head_size(n) + n + 4 + 34 + 4 + _head_size(seq)
    if (
        raw[:4] == b"\xa9\x61v\x01"
        and raw.startswith(_SIG_ENTRY_HEAD, at)
        and raw[at + len(_SIG_ENTRY_HEAD) : at + _SIG_ENTRY_SIZE] == sig
    ):
        return at
    return -1


def _rebuild(
    network: str,
    type_: str,
    payload: dict[str, Any],
    signer: bytes,
    pub: bytes,
    seq: int,
    time: int,
    sig: bytes,
    raw: bytes,
    tx_id: bytes,
) -> Transaction:
    return Transaction(network, type_, payload, signer, pub, seq, time, sig, raw, tx_id)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def check_signed(items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
    """Check ``(pub, sig, signing bytes)`` triples: the signature step of parsed transactions.

    For a caller that has already parsed the transactions (and so derived their
    signing bytes from their own raw bytes): the worker process then only verifies,
    without parsing every transaction a second time. ``False`` where the public key
    is invalid or the signature does not verify.
    """
    out = []
    for pub, sig, message in items:
        try:
            key = VerifyKey(pub)
        except Exception:
            out.append(False)
            continue
        out.append(key.is_valid(sig, message))
    return out


def make_tx(
    key: SigningKey,
    network: str,
    type_: str,
    payload: dict[str, Any],
    *,
    seq: int,
    time: int,
) -> Transaction:
    """Build and sign a transaction."""
    body = Transaction.unsigned_body(network, type_, payload, key.public.raw, seq, time)
    signing = SIG_DOMAIN + encode(body)
    body["sig"] = key.sign(signing)
    raw = encode(body)
    return Transaction._from_map(decode(raw), raw)
