"""C2SP signed notes (https://c2sp.org/signed-note), Ed25519 only.

A signed note is a text ending in a newline, one empty line, then one or more
signature lines::

    <text, ending in \\n>
    \\n
    — <key name> <base64(4-byte key hash || signature)>\\n
    ...

The signature is Ed25519 over the UTF-8 bytes of the text (including its final
newline, excluding the separating empty line). The key hash is the first four
bytes of SHA-256(key name || "\\n" || 0x01 || 32-byte public key) and a verifier
key is written ``<name>+<8 hex digits of key hash>+<base64(0x01 || public key)>``.

Parsing follows Go's ``golang.org/x/mod/sumdb/note`` (the reference
implementation), with a few deliberate tightenings noted inline:

* the note must be valid UTF-8 without ASCII control characters other than
  newline; the text is everything up to the *last* empty line (the text itself
  may contain empty lines, as the spec allows);
* key names are non-empty and contain neither Unicode spaces nor ``+``;
* at most :data:`MAX_SIGNATURES` signature lines (Go's limit; the spec requires
  accepting at least 16);
* signatures from unknown keys (name *and* key hash not both matching a known
  verifier) are ignored; a signature from a known key that fails to verify
  rejects the whole note; a note without any verified signature is rejected.

Every failure raises :class:`~medledger.errors.CheckpointError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from medledger.crypto.hashing import sha256
from medledger.crypto.signing import SigningKey, VerifyKey
from medledger.errors import CheckpointError, CryptoError, InvalidSignature

__all__ = [
    "ALG_ED25519",
    "KEY_HASH_SIZE",
    "MAX_SIGNATURES",
    "SIGNATURE_PREFIX",
    "NoteSigner",
    "NoteVerifier",
    "OpenedNote",
    "Signature",
    "add_signatures",
    "b64decode_strict",
    "is_valid_key_name",
    "key_hash",
    "note_text",
    "open_note",
    "sign_note",
    "signature_lines",
]

#: Signature type byte of Ed25519 in signed-note key hashes and verifier keys.
ALG_ED25519 = 0x01
KEY_HASH_SIZE = 4
#: Maximum number of signature lines accepted in one note (as Go's sumdb/note).
MAX_SIGNATURES = 100
#: Every signature line starts with U+2014 EM DASH and a space.
SIGNATURE_PREFIX = "\u2014 "

_ED25519_PUBLIC_KEY_SIZE = 32
_ED25519_SIGNATURE_SIZE = 64

# Exactly Go's unicode.IsSpace: the Latin-1 spaces plus the Unicode White_Space
# property. (Python's str.isspace also counts U+001C..U+001F, which control-character
# checks reject anyway; spelling the set out keeps the rule identical to Go's.)
_SPACES = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?", re.ASCII)
_HEX8 = re.compile(r"[0-9A-Fa-f]{8}", re.ASCII)


def b64decode_strict(text: str) -> bytes | None:
    """Decode standard (RFC 4648 section 4) base64, padded and canonical.

    Returns ``None`` for anything else: other alphabets, missing padding,
    whitespace, or non-zero trailing bits (which Go's decoder would tolerate; we
    refuse them so that every byte string has exactly one textual form).
    """
    if not _B64.fullmatch(text):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # pragma: no cover - the regex already guards
        return None
    if base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def is_valid_key_name(name: str) -> bool:
    """Key names are non-empty UTF-8 without Unicode spaces or ``+``."""
    if not isinstance(name, str) or not name or "+" in name:
        return False
    if any(ch in _SPACES for ch in name) or _CONTROL.search(name):
        return False
    return _utf8(name) is not None


def _utf8(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return None


def key_hash(name: str, public_key: bytes) -> bytes:
    """The 4-byte key hash of an Ed25519 key: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    if len(public_key) != _ED25519_PUBLIC_KEY_SIZE:
        raise CheckpointError("an Ed25519 public key is 32 bytes")
    encoded = _utf8(name)
    if encoded is None:
        raise CheckpointError("key name is not valid UTF-8")
    return sha256(encoded, b"\n", bytes([ALG_ED25519]), public_key)[:KEY_HASH_SIZE]


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature line: key name, 4-byte key hash and the raw signature bytes."""

    name: str
    key_hash: bytes
    signature: bytes

    @property
    def base64(self) -> str:
        """``base64(key hash || signature)`` as it appears on the line."""
        return _b64encode(self.key_hash + self.signature)

    def to_line(self) -> str:
        """The signature line, without its trailing newline."""
        return f"{SIGNATURE_PREFIX}{self.name} {self.base64}"

    @classmethod
    def parse_line(cls, line: str) -> Signature:
        """Parse one signature line (without its trailing newline)."""
        if not line.startswith(SIGNATURE_PREFIX):
            raise CheckpointError("malformed note: signature line must start with '— '")
        name, _, b64 = line[len(SIGNATURE_PREFIX) :].partition(" ")
        if not is_valid_key_name(name):
            raise CheckpointError("malformed note: invalid key name in signature line")
        raw = b64decode_strict(b64) if b64 else None
        if raw is None or len(raw) <= KEY_HASH_SIZE:
            raise CheckpointError("malformed note: invalid signature encoding")
        return cls(name, raw[:KEY_HASH_SIZE], raw[KEY_HASH_SIZE:])


class NoteVerifier:
    """A known Ed25519 note key: a name and a public key."""

    __slots__ = ("key", "key_hash", "name")

    def __init__(self, name: str, key: VerifyKey) -> None:
        if not is_valid_key_name(name):
            raise CheckpointError(f"invalid key name {name!r}")
        self.name = name
        self.key = key
        self.key_hash = key_hash(name, key.raw)

    @classmethod
    def from_verifier_key(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<8 hex key hash>+<base64(0x01 || public key)>``.

        The key hash must match the name and key; the algorithm byte must be
        Ed25519 and the key 32 bytes. Hex digits may be in either case (as Go).
        """
        if not isinstance(vkey, str):
            raise CheckpointError("verifier key must be a string")
        name, sep1, rest = vkey.partition("+")
        hash16, sep2, key64 = rest.partition("+")
        if not sep1 or not sep2 or not is_valid_key_name(name) or not _HEX8.fullmatch(hash16):
            raise CheckpointError("malformed verifier key")
        raw = b64decode_strict(key64) if key64 else None
        if raw is None:
            raise CheckpointError("malformed verifier key")
        if raw[0] != ALG_ED25519:
            raise CheckpointError("unknown verifier key algorithm")
        if len(raw) != 1 + _ED25519_PUBLIC_KEY_SIZE:
            raise CheckpointError("malformed verifier key: wrong key length")
        if bytes.fromhex(hash16) != key_hash(name, raw[1:]):
            raise CheckpointError("verifier key hash does not match name and key")
        try:
            key = VerifyKey(raw[1:])
        except CryptoError as exc:
            raise CheckpointError("invalid Ed25519 public key in verifier key") from exc
        return cls(name, key)

    def verifier_key(self) -> str:
        return _verifier_key(self.name, self.key_hash, self.key.raw)

    def verify(self, text: str | bytes, sig: bytes | Signature) -> bool:
        """Whether ``sig`` is this key's signature over ``text``.

        ``sig`` is either the raw 64-byte signature or a parsed :class:`Signature`
        (whose name and key hash must then be this key's).
        """
        if isinstance(sig, Signature):
            if sig.name != self.name or sig.key_hash != self.key_hash:
                return False
            sig = sig.signature
        msg = text if isinstance(text, bytes) else _utf8(text)
        if msg is None or len(sig) != _ED25519_SIGNATURE_SIZE:
            return False
        try:
            self.key.verify(sig, msg)
        except InvalidSignature:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, NoteVerifier)
            and other.name == self.name
            and other.key.raw == self.key.raw
        )

    def __hash__(self) -> int:
        return hash((self.name, self.key.raw))

    def __repr__(self) -> str:
        return f"NoteVerifier({self.name}+{self.key_hash.hex()})"


class NoteSigner:
    """An Ed25519 signing key under a note key name."""

    __slots__ = ("key", "key_hash", "name")

    def __init__(self, name: str, key: SigningKey) -> None:
        if not is_valid_key_name(name):
            raise CheckpointError(f"invalid key name {name!r}")
        self.name = name
        self.key = key
        self.key_hash = key_hash(name, key.public.raw)

    def verifier_key(self) -> str:
        return _verifier_key(self.name, self.key_hash, self.key.public.raw)

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self.key.public)

    def sign(self, text: str) -> Signature:
        """Sign a note text (which must be well formed, see :func:`sign_note`)."""
        msg = _check_text(text)
        return Signature(self.name, self.key_hash, self.key.sign(msg))

    def __repr__(self) -> str:
        return f"NoteSigner({self.name}+{self.key_hash.hex()})"


def _verifier_key(name: str, khash: bytes, public_key: bytes) -> str:
    return f"{name}+{khash.hex()}+{_b64encode(bytes([ALG_ED25519]) + public_key)}"


def _check_text(text: str) -> bytes:
    """Validate a note text for signing; return its UTF-8 bytes."""
    if not isinstance(text, str) or not text.endswith("\n"):
        raise CheckpointError("malformed note: text must end in a newline")
    if _CONTROL.search(text):
        raise CheckpointError("malformed note: control character in text")
    msg = _utf8(text)
    if msg is None:
        raise CheckpointError("malformed note: text is not valid UTF-8")
    return msg


class OpenedNote(NamedTuple):
    """The result of :func:`open_note` (unpacks as ``text, verified, unverified``)."""

    text: str
    #: Verified signatures, one per known key, in note order.
    verified: tuple[Signature, ...]
    #: Signature lines from unknown keys (without newline), duplicates removed.
    unverified: tuple[str, ...]


def _split(note: str | bytes) -> tuple[str, list[tuple[str, Signature]]]:
    """Check the note's structure; return its text and parsed signature lines."""
    if isinstance(note, (bytes, bytearray, memoryview)):
        try:
            note = bytes(note).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError("malformed note: not valid UTF-8") from None
    elif not isinstance(note, str):
        raise CheckpointError("a note is text")
    elif _utf8(note) is None:
        raise CheckpointError("malformed note: not valid UTF-8")
    if _CONTROL.search(note):
        raise CheckpointError("malformed note: control character")
    split = note.rfind("\n\n")
    if split < 0:
        raise CheckpointError("malformed note: no empty line before the signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block or not block.endswith("\n"):
        raise CheckpointError("malformed note: signatures must end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError(f"malformed note: more than {MAX_SIGNATURES} signatures")
    return text, [(line, Signature.parse_line(line)) for line in lines]


def note_text(note: str | bytes) -> str:
    """The text of a well-formed signed note, *without* checking any signature.

    For reading what a note says (e.g. the tree size a proof was built for);
    use :func:`open_note` to trust it.
    """
    return _split(note)[0]


def signature_lines(note: str | bytes) -> list[tuple[str, Signature]]:
    """The signature lines of a well-formed signed note with their parsed signatures,
    in note order, *without* checking any (use :func:`open_note` to trust them)."""
    return _split(note)[1]


def _index(verifiers: Iterable[NoteVerifier]) -> dict[tuple[str, bytes], list[NoteVerifier]]:
    known: dict[tuple[str, bytes], list[NoteVerifier]] = {}
    for v in verifiers:
        if not isinstance(v, NoteVerifier):
            raise CheckpointError("verifiers must be NoteVerifier instances")
        same = known.setdefault((v.name, v.key_hash), [])
        if v not in same:
            same.append(v)
    return known


def open_note(note: str | bytes, verifiers: Iterable[NoteVerifier]) -> OpenedNote:
    """Parse ``note`` and check its signatures against the known ``verifiers``.

    Returns the text, the verified signatures and the (ignored) lines of unknown
    keys. Raises :class:`CheckpointError` if the note is malformed, if any
    signature from a known key fails to verify, if two different known keys share
    a name and key hash, or if no known key signed the note.
    """
    text, sigs = _split(note)
    msg = text.encode("utf-8")
    known = _index(verifiers)
    verified: dict[tuple[str, bytes], Signature] = {}
    unverified: dict[str, None] = {}
    checked: set[str] = set()
    for line, sig in sigs:
        ident = (sig.name, sig.key_hash)
        candidates = known.get(ident)
        if candidates is None:
            unverified.setdefault(line, None)
            continue
        if len(candidates) > 1:
            raise CheckpointError(f"ambiguous key {sig.name}+{sig.key_hash.hex()}")
        if line in checked:
            continue
        checked.add(line)
        # Unlike Go, which skips later lines of an already-verified key, every
        # distinct line from a known key must verify.
        if not candidates[0].verify(msg, sig.signature):
            raise CheckpointError(f"invalid signature for key {sig.name}+{sig.key_hash.hex()}")
        verified.setdefault(ident, sig)
    if not verified:
        raise CheckpointError("note has no verifiable signatures")
    return OpenedNote(text, tuple(verified.values()), tuple(unverified))


def _dedup_signers(signers: Iterable[NoteSigner]) -> list[NoteSigner]:
    out: dict[tuple[str, bytes], NoteSigner] = {}
    for s in signers:
        if not isinstance(s, NoteSigner):
            raise CheckpointError("signers must be NoteSigner instances")
        out.setdefault((s.name, s.key_hash), s)
    if not out:
        raise CheckpointError("at least one signer is required")
    return list(out.values())


def sign_note(text: str, signers: Iterable[NoteSigner]) -> str:
    """Sign ``text`` with every signer; returns the encoded signed note.

    Signers repeating a key (same name and key hash) sign once.
    """
    _check_text(text)
    lines = [s.sign(text).to_line() for s in _dedup_signers(signers)]
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError(f"more than {MAX_SIGNATURES} signatures")
    return text + "\n" + "".join(line + "\n" for line in lines)


def add_signatures(
    note: str,
    signers: Iterable[NoteSigner],
    *,
    verifiers: Iterable[NoteVerifier] | None = None,
) -> str:
    """Co-sign: add the signers' lines to an already signed note.

    The text is unchanged. Existing lines are kept in order, with identical
    duplicates dropped; a signer whose line is already present adds nothing, and
    an existing line of the same key (name and key hash) but different bytes is
    replaced by the fresh signature. If ``verifiers`` is given, the note is first
    opened with them (so one does not co-sign something unverified).
    """
    if verifiers is not None:
        open_note(note, verifiers)
    text, existing = _split(note)
    fresh = [s.sign(text) for s in _dedup_signers(signers)]
    fresh_lines = {sig.to_line() for sig in fresh}
    fresh_ids = {(sig.name, sig.key_hash) for sig in fresh}
    lines: dict[str, None] = {}
    for line, sig in existing:
        if (sig.name, sig.key_hash) in fresh_ids and line not in fresh_lines:
            continue
        lines.setdefault(line, None)
    for sig in fresh:
        lines.setdefault(sig.to_line(), None)
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError(f"more than {MAX_SIGNATURES} signatures")
    return text + "\n" + "".join(line + "\n" for line in lines)
