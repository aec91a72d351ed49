"""C2SP transparency-log checkpoints (https://c2sp.org/tlog-checkpoint).

A checkpoint body is at least three non-empty lines, each ending in a newline::

    <origin>
    <tree size, decimal, no leading zeros>
    <standard base64 of the 32-byte RFC 9162 root hash>
    [extension lines...]

and is distributed as a C2SP signed note (:mod:`medledger.ledger.note`), which
lets several organisations co-sign the same body.

medledger carries one extension line of its own, binding the checkpoint to the
block that produced it::

    medledger-block <height> <base64 block hash> <base64 state root>

:meth:`Checkpoint.parse` is strict: anything but the one canonical text of a
checkpoint raises :class:`~medledger.errors.CheckpointError`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass

from medledger.errors import CheckpointError
from medledger.ledger.note import (
    NoteSigner,
    NoteVerifier,
    b64decode_strict,
    note_text,
    open_note,
    sign_note,
)

__all__ = [
    "BLOCK_EXTENSION",
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "BlockRef",
    "Checkpoint",
    "checkpoint_of",
    "sign_checkpoint",
    "verify_checkpoint",
]

HASH_SIZE = 32
#: Tree sizes are RFC 9162 ``uint64`` values.
MAX_TREE_SIZE = 2**64 - 1
#: Keyword opening medledger's extension line.
BLOCK_EXTENSION = "medledger-block"

_DECIMAL = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f]")


def _parse_uint(text: str, what: str) -> int:
    # int() would also take "+1", "1_0", " 1", "٣" (Arabic-Indic digits): refuse them.
    if not _DECIMAL.fullmatch(text):
        raise CheckpointError(f"{what} must be decimal without leading zeros, got {text!r}")
    value = int(text)
    if value > MAX_TREE_SIZE:
        raise CheckpointError(f"{what} does not fit in 64 bits")
    return value


def _parse_hash(text: str, what: str) -> bytes:
    raw = b64decode_strict(text)
    if raw is None:
        raise CheckpointError(f"{what} is not canonical standard base64")
    if len(raw) != HASH_SIZE:
        raise CheckpointError(f"{what} must be {HASH_SIZE} bytes, got {len(raw)}")
    return raw


def _check_uint(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{what} must be an int")
    if not 0 <= value <= MAX_TREE_SIZE:
        raise CheckpointError(f"{what} out of range [0, 2**64)")
    return value


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise CheckpointError(f"{what} must be {HASH_SIZE} bytes")
    return value


def _check_line(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise CheckpointError(f"{what} must be a non-empty string")
    if _CONTROL.search(value):
        raise CheckpointError(f"{what} must not contain newlines or control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{what} is not valid UTF-8") from None
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class BlockRef:
    """The block a checkpoint was cut at: height, block hash and state root."""

    height: int
    block_hash: bytes
    state_root: bytes

    def __post_init__(self) -> None:
        _check_uint(self.height, "block height")
        _check_hash(self.block_hash, "block hash")
        _check_hash(self.state_root, "state root")

    def to_extension(self) -> str:
        """The ``medledger-block`` extension line (without newline)."""
        return f"{BLOCK_EXTENSION} {self.height} {_b64(self.block_hash)} {_b64(self.state_root)}"

    @classmethod
    def from_extension(cls, line: str) -> BlockRef:
        parts = line.split(" ")
        if len(parts) != 4 or parts[0] != BLOCK_EXTENSION:
            raise CheckpointError(
                f"malformed {BLOCK_EXTENSION} line: want "
                f"'{BLOCK_EXTENSION} <height> <block hash> <state root>'"
            )
        return cls(
            _parse_uint(parts[1], "block height"),
            _parse_hash(parts[2], "block hash"),
            _parse_hash(parts[3], "state root"),
        )


def _is_block_extension(line: str) -> bool:
    return line.split(" ", 1)[0] == BLOCK_EXTENSION


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A log checkpoint: origin, tree size, root hash and optional extension lines.

    Validated on construction, so a ``Checkpoint`` always has a canonical text.
    At most one ``medledger-block`` extension line is allowed and it must be well
    formed.
    """

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        _check_uint(self.size, "tree size")
        _check_hash(self.root, "root hash")
        if not isinstance(self.extensions, tuple):
            if isinstance(self.extensions, (str, bytes)):
                raise CheckpointError("extensions must be a sequence of lines")
            object.__setattr__(self, "extensions", tuple(self.extensions))
        blocks = 0
        for line in self.extensions:
            _check_line(line, "extension line")
            if _is_block_extension(line):
                BlockRef.from_extension(line)
                blocks += 1
        if blocks > 1:
            raise CheckpointError(f"more than one {BLOCK_EXTENSION} extension line")

    @classmethod
    def for_block(
        cls,
        origin: str,
        size: int,
        root: bytes,
        block: BlockRef,
        *,
        extensions: Iterable[str] = (),
    ) -> Checkpoint:
        """A checkpoint whose first extension line is ``block``'s."""
        return cls(origin, size, root, (block.to_extension(), *extensions))

    def block_info(self) -> BlockRef | None:
        """The ``medledger-block`` extension, if this checkpoint carries one."""
        for line in self.extensions:
            if _is_block_extension(line):
                return BlockRef.from_extension(line)
        return None

    def to_text(self) -> str:
        """The checkpoint body (the signed-note text), ending in a newline."""
        lines = [self.origin, str(self.size), _b64(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str | bytes) -> Checkpoint:
        """Parse a checkpoint body, refusing anything not in canonical form."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError("checkpoint is not valid UTF-8") from None
        if not isinstance(text, str):
            raise CheckpointError("a checkpoint is text")
        if not text.endswith("\n"):
            raise CheckpointError("checkpoint must end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError("checkpoint needs origin, size and root lines")
        if any(not line for line in lines):
            raise CheckpointError("checkpoint lines must be non-empty")
        origin, size, root, *extensions = lines
        return cls(
            _check_line(origin, "origin"),
            _parse_uint(size, "tree size"),
            _parse_hash(root, "root hash"),
            tuple(extensions),
        )


def checkpoint_of(note: str | bytes) -> Checkpoint:
    """The checkpoint a signed note carries, signatures *not* checked.

    To trust it, use :func:`verify_checkpoint` with the verifier keys.
    """
    return Checkpoint.parse(note_text(note))


def sign_checkpoint(cp: Checkpoint, signers: Iterable[NoteSigner]) -> str:
    """The checkpoint as a signed note, signed by every signer."""
    return sign_note(cp.to_text(), signers)


def _distinct_signers(pairs: Iterable[tuple[str, bytes]]) -> int:
    """Count signers, merging signatures that share a key name or a public key."""
    groups: list[tuple[set[str], set[bytes]]] = []
    for name, key in pairs:
        names, keys = {name}, {key}
        rest = []
        for g_names, g_keys in groups:
            if g_names & names or g_keys & keys:
                names |= g_names
                keys |= g_keys
            else:
                rest.append((g_names, g_keys))
        groups = [*rest, (names, keys)]
    return len(groups)


def verify_checkpoint(
    note: str | bytes,
    verifiers: Iterable[NoteVerifier],
    *,
    quorum: int = 1,
    origin: str | None = None,
) -> Checkpoint:
    """Open a signed checkpoint and return it if at least ``quorum`` signers verify.

    Signers are counted as distinct organisations: two verified signatures
    count once if they share a key name or a public key. Signatures from unknown
    keys are ignored; a failing signature from a known key rejects the note. If
    ``origin`` is given the checkpoint's origin must equal it.
    """
    if not isinstance(quorum, int) or isinstance(quorum, bool) or quorum < 1:
        raise CheckpointError("quorum must be a positive integer")
    known = list(verifiers)
    opened = open_note(note, known)
    keys = {(v.name, v.key_hash): v.key.raw for v in known}
    count = _distinct_signers((s.name, keys[(s.name, s.key_hash)]) for s in opened.verified)
    if count < quorum:
        raise CheckpointError(f"checkpoint has {count} of the {quorum} required signatures")
    cp = Checkpoint.parse(opened.text)
    if origin is not None and cp.origin != origin:
        raise CheckpointError(f"checkpoint origin {cp.origin!r} is not {origin!r}")
    return cp
