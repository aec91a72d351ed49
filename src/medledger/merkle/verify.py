"""Stateless verification of RFC 9162 inclusion and consistency proofs.

Pure functions over sizes, hashes and proofs, following RFC 9162 sections 2.1.3.2 and
2.1.4.2 in the bit-twiddling form of transparency-dev/merkle ``proof/verify.go``. Every
failure raises :class:`~medledger.errors.ProofError`; success returns ``None``.

The audit path of leaf ``index`` in a tree of ``size`` leaves splits in two parts:

* ``inner`` hashes: siblings below the point where the path to ``index`` parts from the
  path to the last leaf ``size - 1``; there are ``bit_length(index ^ (size - 1))`` of them
  and bit ``i`` of ``index`` says whether the sibling at step ``i`` is on the left (1) or
  the right (0);
* ``border`` hashes: above that point the path runs along the right border of the tree,
  where every sibling is on the left; there is one per set bit of ``index >> inner``.

Checking the proof length first rejects truncated, extended or misplaced proofs before
any hashing.
"""

from __future__ import annotations

from collections.abc import Sequence

from medledger.errors import ProofError
from medledger.merkle.hasher import EMPTY_ROOT, HASH_SIZE, node_hash

__all__ = [
    "root_from_inclusion_proof",
    "verify_consistency",
    "verify_inclusion",
]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProofError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ProofError(f"{name} must not be negative, got {value}", **{name: value})


def _check_hash(name: str, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ProofError(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name} has {len(value)} bytes, expected {HASH_SIZE}")


def _check_proof(proof: Sequence[bytes] | None) -> Sequence[bytes]:
    if proof is None:
        return ()
    for i, h in enumerate(proof):
        _check_hash(f"proof[{i}]", h)
    return proof


def _decompose(index: int, size: int) -> tuple[int, int]:
    """Split the audit path of ``index`` in a tree of ``size`` into (inner, border) counts."""
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    """Hash ``seed`` up through ``proof``; bit ``i`` of ``index`` places ``proof[i]``."""
    for i, h in enumerate(proof):
        seed = node_hash(h, seed) if (index >> i) & 1 else node_hash(seed, h)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    """Like :func:`_chain_inner` but only through the left siblings (bit set in ``index``).

    Used for the old root in a consistency proof: right siblings are newer leaves.
    """
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    """Hash ``seed`` up the right border: every ``proof`` hash is a left sibling."""
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def _match(what: str, calculated: bytes, expected: bytes) -> None:
    if bytes(calculated) != bytes(expected):
        raise ProofError(
            f"{what} mismatch: calculated {bytes(calculated).hex()}, expected "
            f"{bytes(expected).hex()}",
            calculated=bytes(calculated),
            expected=bytes(expected),
        )


def root_from_inclusion_proof(
    leaf_index: int, tree_size: int, leaf_hash: bytes, proof: Sequence[bytes] | None
) -> bytes:
    """Compute the root implied by an inclusion proof (RFC 9162 section 2.1.3.2).

    Raises :class:`~medledger.errors.ProofError` if ``leaf_index >= tree_size``, a hash is
    not 32 bytes, or the proof does not have exactly the length the path needs. ``None``
    is accepted as an empty proof.
    """
    _check_count("leaf_index", leaf_index)
    _check_count("tree_size", tree_size)
    if leaf_index >= tree_size:
        raise ProofError(
            f"leaf index {leaf_index} out of range for tree size {tree_size}",
            leaf_index=leaf_index,
            tree_size=tree_size,
        )
    _check_hash("leaf hash", leaf_hash)
    path = _check_proof(proof)
    inner, border = _decompose(leaf_index, tree_size)
    if len(path) != inner + border:
        raise ProofError(
            f"wrong inclusion proof size {len(path)}, want {inner + border} "
            f"(leaf {leaf_index} of {tree_size})",
            got=len(path),
            want=inner + border,
        )
    h = _chain_inner(bytes(leaf_hash), path[:inner], leaf_index)
    return _chain_border_right(h, path[inner:])


def verify_inclusion(
    leaf_index: int,
    tree_size: int,
    leaf_hash: bytes,
    proof: Sequence[bytes] | None,
    root: bytes,
) -> None:
    """Check that ``leaf_hash`` is leaf ``leaf_index`` of the tree of ``tree_size`` with ``root``.

    Raises :class:`~medledger.errors.ProofError` on any failure (see
    :func:`root_from_inclusion_proof`) or if the computed root differs from ``root``.
    """
    calculated = root_from_inclusion_proof(leaf_index, tree_size, leaf_hash, proof)
    _check_hash("root", root)
    _match("root", calculated, root)


def verify_consistency(
    size1: int,
    size2: int,
    proof: Sequence[bytes] | None,
    root1: bytes,
    root2: bytes,
) -> None:
    """Check that the tree of ``size2`` with ``root2`` extends the tree ``size1``/``root1``.

    RFC 9162 section 2.1.4.2. Edge cases as in transparency-dev: ``size1 == size2`` needs
    an empty proof and equal roots; ``size1 == 0`` needs an empty proof (every tree
    extends the empty tree), and here additionally ``root1 == EMPTY_ROOT``; otherwise an
    empty proof is rejected. ``None`` is accepted as an empty proof.

    The proof is the audit path, in the new tree, of the largest perfect subtree ending at
    ``size1`` (``shift`` = trailing zeros of ``size1`` levels up from the leaves), headed
    by that subtree's hash unless ``size1`` is a power of two (then it is ``root1``).
    From the one path both roots are rebuilt: the old root from the seed and the left
    siblings only, the new root from all of them.
    """
    _check_count("size1", size1)
    _check_count("size2", size2)
    if size1 > size2:
        raise ProofError(f"size1 {size1} is larger than size2 {size2}", size1=size1, size2=size2)
    _check_hash("root1", root1)
    _check_hash("root2", root2)
    path = _check_proof(proof)

    if size1 == size2:
        if path:
            raise ProofError(
                f"size1 == size2 == {size1} but the proof has {len(path)} hashes",
                got=len(path),
                want=0,
            )
        if size1 == 0:
            _match("empty tree root1", root1, EMPTY_ROOT)
        _match("root", root1, root2)
        return
    if size1 == 0:
        if path:
            raise ProofError(
                f"size1 == 0 but the proof has {len(path)} hashes", got=len(path), want=0
            )
        _match("empty tree root1", root1, EMPTY_ROOT)
        return
    if not path:
        raise ProofError(f"empty consistency proof from size {size1} to {size2}")

    inner, border = _decompose(size1 - 1, size2)
    shift = (size1 & -size1).bit_length() - 1
    inner -= shift  # shift < inner when size1 < size2

    # The seed is the subtree of 2**shift leaves ending at size1.
    if size1 == 1 << shift:
        seed, start = bytes(root1), 0
    else:
        seed, start = bytes(path[0]), 1
    want = start + inner + border
    if len(path) != want:
        raise ProofError(
            f"wrong consistency proof size {len(path)}, want {want} (from size {size1} to {size2})",
            got=len(path),
            want=want,
        )
    path = path[start:]
    mask = (size1 - 1) >> shift  # the seed's index at level ``shift``

    hash1 = _chain_inner_right(seed, path[:inner], mask)
    hash1 = _chain_border_right(hash1, path[inner:])
    _match("root1", hash1, root1)

    hash2 = _chain_inner(seed, path[:inner], mask)
    hash2 = _chain_border_right(hash2, path[inner:])
    _match("root2", hash2, root2)
