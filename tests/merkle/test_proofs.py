"""Proof building and verification, checked against the RFC 9162 reference implementation.

Proofs are built the way a store builds them: ``inclusion_nodes`` / ``consistency_nodes``
name perfect nodes, a dict filled by ``CompactRange.append`` supplies their hashes, and
``Nodes.rehash`` assembles the proof. Each proof must equal the reference byte for byte
and pass the verifiers; damaged proofs must raise ``ProofError``.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medledger.errors import ProofError
from medledger.merkle import (
    EMPTY_ROOT,
    CompactRange,
    NodeID,
    Nodes,
    consistency_nodes,
    inclusion_nodes,
    leaf_hash,
    node_range,
    range_nodes,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

from .reference import ReferenceTree, symbolic_path, symbolic_subproof

N = 260  # every size 1..N, every index
CONSISTENCY_ALL = 130  # every pair 0 <= size1 <= size2 <= CONSISTENCY_ALL

# Distinct entries of varied length, the first one empty.
ENTRIES = [b""] + [b"entry %d" % i + b"." * (i % 7) for i in range(1, N)]
REF = ReferenceTree(ENTRIES)
STORE: dict[NodeID, bytes] = {}
_rng = CompactRange()
for _e in ENTRIES:
    for _node, _h in _rng.append(leaf_hash(_e)):
        assert _node not in STORE
        STORE[_node] = _h
LEAVES = [leaf_hash(e) for e in ENTRIES]


def fetch(nodes: Nodes, size: int) -> list[bytes]:
    """Read the hashes of ``nodes`` from the store, checking they exist in tree ``size``."""
    for node in nodes.ids:
        assert node_range(node)[1] <= size, f"{node} is not a perfect node of tree {size}"
    return [STORE[node] for node in nodes.ids]


def build_inclusion(index: int, size: int) -> list[bytes]:
    nodes = inclusion_nodes(index, size)
    proof = nodes.rehash(fetch(nodes, size))
    assert len(proof) == nodes.proof_size
    return proof


def build_consistency(size1: int, size2: int) -> list[bytes]:
    nodes = consistency_nodes(size1, size2)
    proof = nodes.rehash(fetch(nodes, size2))
    assert len(proof) == nodes.proof_size
    return proof


def flip(h: bytes, bit: int) -> bytes:
    b = bytearray(h)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


# --- exhaustive comparison with the reference ----------------------------------------


@pytest.mark.parametrize("first", range(1, N + 1, 20))
def test_inclusion_every_size_and_index(first: int) -> None:
    for size in range(first, min(first + 20, N + 1)):
        root = REF.root(size)
        for index in range(size):
            proof = build_inclusion(index, size)
            assert proof == REF.path(index, size), (index, size)
            verify_inclusion(index, size, LEAVES[index], proof, root)
            assert root_from_inclusion_proof(index, size, LEAVES[index], proof) == root


@pytest.mark.parametrize("size2", range(0, CONSISTENCY_ALL + 1, 10))
def test_consistency_every_pair(size2: int) -> None:
    for s2 in range(size2, min(size2 + 10, CONSISTENCY_ALL + 1)):
        for s1 in range(s2 + 1):
            proof = build_consistency(s1, s2)
            want = REF.proof(s1, s2) if s1 else []
            assert proof == want, (s1, s2)
            verify_consistency(s1, s2, proof, REF.root(s1), REF.root(s2))


def test_consistency_sample_beyond() -> None:
    rnd = random.Random(9162)
    pairs = [(rnd.randint(0, s2), s2) for s2 in range(CONSISTENCY_ALL + 1, N + 1) for _ in range(8)]
    pairs += [(s1, N) for s1 in range(N + 1)]
    for s1, s2 in pairs:
        proof = build_consistency(s1, s2)
        assert proof == (REF.proof(s1, s2) if s1 else []), (s1, s2)
        verify_consistency(s1, s2, proof, REF.root(s1), REF.root(s2))


# --- damaged proofs ------------------------------------------------------------------

INCLUSION_CASES = [
    (i, s) for s in (2, 3, 5, 7, 8, 13, 64, 100, 129, 255, 260) for i in {0, s // 3, s - 1}
]
CONSISTENCY_CASES = [
    (1, 2),
    (1, 8),
    (2, 5),
    (3, 7),
    (4, 7),
    (6, 8),
    (7, 130),
    (64, 200),
    (129, 260),
]
BITS = (0, 1, 7, 8, 100, 128, 200, 255)


@pytest.mark.parametrize(("index", "size"), INCLUSION_CASES)
def test_damaged_inclusion_proofs(index: int, size: int) -> None:
    proof = build_inclusion(index, size)
    root, leaf = REF.root(size), LEAVES[index]
    verify_inclusion(index, size, leaf, proof, root)

    def bad(
        p: list[bytes], i: int = index, s: int = size, lf: bytes = leaf, r: bytes = root
    ) -> None:
        with pytest.raises(ProofError):
            verify_inclusion(i, s, lf, p, r)

    for k in range(len(proof)):
        for bit in BITS:
            bad([*proof[:k], flip(proof[k], bit), *proof[k + 1 :]])
        bad(proof[:k] + proof[k + 1 :])  # removed component
        bad([*proof[:k], proof[k][:-1], *proof[k + 1 :]])  # short hash
        bad([*proof[:k], proof[k] + b"\0", *proof[k + 1 :]])  # long hash
    for bit in BITS:
        bad(proof, r=flip(root, bit))
        bad(proof, lf=flip(leaf, bit))
    bad([*proof, proof[-1] if proof else root])  # extended
    bad([root, *proof])  # preceding garbage
    bad([*proof, b""])  # trailing garbage
    bad(proof, r=root[:-1])
    bad(proof, lf=leaf + b"\0")
    bad(proof, r=EMPTY_ROOT)
    for other in range(size):
        if other != index:
            bad(proof, i=other)  # wrong index
            bad(proof, lf=LEAVES[other])  # wrong leaf
    bad(proof, i=size)  # index out of range
    bad(proof, i=-1)
    for s in {1, size - 1, size + 1, 2 * size, size // 2, N}:
        if index < s <= N and s != size and REF.path(index, s) != proof:
            bad(proof, s=s, r=REF.root(s))  # wrong size, with that size's root
    bad(proof, s=index)


@pytest.mark.parametrize(("size1", "size2"), CONSISTENCY_CASES)
def test_damaged_consistency_proofs(size1: int, size2: int) -> None:
    proof = build_consistency(size1, size2)
    r1, r2 = REF.root(size1), REF.root(size2)
    verify_consistency(size1, size2, proof, r1, r2)

    def bad(p: list[bytes], s1: int = size1, s2: int = size2, a: bytes = r1, b: bytes = r2) -> None:
        with pytest.raises(ProofError):
            verify_consistency(s1, s2, p, a, b)

    for k in range(len(proof)):
        for bit in BITS:
            bad([*proof[:k], flip(proof[k], bit), *proof[k + 1 :]])
        bad(proof[:k] + proof[k + 1 :])
        bad([*proof[:k], proof[k][:-1], *proof[k + 1 :]])
    for bit in BITS:
        bad(proof, a=flip(r1, bit))
        bad(proof, b=flip(r2, bit))
    bad([])
    bad([*proof, r2])
    bad([r1, *proof])
    bad(proof, a=r2, b=r1)  # swapped roots
    bad(proof, s1=size2, s2=size1)
    bad(proof, a=r1 + b"\0")
    for s1 in range(1, size2):
        if s1 != size1 and REF.proof(s1, size2) != proof:
            bad(proof, s1=s1, a=REF.root(s1))  # wrong size1, with that size's root
    for s2 in {size1, size2 - 1, size2 + 1, 2 * size2, N}:
        if s2 != size2 and size1 <= s2 <= N and REF.proof(size1, s2) != proof:
            bad(proof, s2=s2, b=REF.root(s2))  # wrong size2, with that size's root


def test_inclusion_edge_cases() -> None:
    leaf = LEAVES[0]
    verify_inclusion(0, 1, leaf, [], leaf)
    verify_inclusion(0, 1, leaf, None, leaf)
    for args in [(0, 0), (1, 1), (5, 3), (-1, 3)]:
        with pytest.raises(ProofError):
            verify_inclusion(*args, leaf, [], leaf)
        with pytest.raises(ProofError):
            inclusion_nodes(*args)
    with pytest.raises(ProofError, match="wrong inclusion proof size"):
        verify_inclusion(0, 1, leaf, [leaf], leaf)
    with pytest.raises(ProofError, match="root mismatch"):
        verify_inclusion(0, 1, leaf, [], LEAVES[1])
    with pytest.raises(ProofError, match="leaf hash has 0 bytes"):
        verify_inclusion(0, 1, b"", [], leaf)
    with pytest.raises(ProofError, match="root has 31 bytes"):
        verify_inclusion(0, 1, leaf, [], leaf[:31])
    with pytest.raises(ProofError, match="must be an int"):
        verify_inclusion(True, 2, leaf, [leaf], leaf)


def test_consistency_edge_cases() -> None:
    r1, r5 = REF.root(1), REF.root(5)
    for size in (0, 1, 5):
        verify_consistency(size, size, [], REF.root(size), REF.root(size))
        verify_consistency(size, size, None, REF.root(size), REF.root(size))
        assert consistency_nodes(size, size).ids == ()
    verify_consistency(0, 5, [], EMPTY_ROOT, r5)
    assert consistency_nodes(0, 5).ids == ()
    with pytest.raises(ProofError, match="larger than"):
        verify_consistency(5, 1, [], r5, r1)
    with pytest.raises(ProofError, match="larger than"):
        consistency_nodes(5, 1)
    with pytest.raises(ProofError):
        consistency_nodes(-1, 1)
    with pytest.raises(ProofError, match="root mismatch"):
        verify_consistency(5, 5, [], r5, r1)
    with pytest.raises(ProofError, match="proof has 1 hashes"):
        verify_consistency(5, 5, [r1], r5, r5)
    with pytest.raises(ProofError, match="proof has 1 hashes"):
        verify_consistency(0, 5, [r1], EMPTY_ROOT, r5)
    with pytest.raises(ProofError, match="empty tree root1"):
        verify_consistency(0, 5, [], r1, r5)
    with pytest.raises(ProofError, match="empty tree root1"):
        verify_consistency(0, 0, [], r1, r1)
    with pytest.raises(ProofError, match="empty consistency proof"):
        verify_consistency(1, 5, [], r1, r5)
    with pytest.raises(ProofError, match="wrong consistency proof size"):
        verify_consistency(1, 5, [r1], r1, r5)
    with pytest.raises(ProofError, match="root2 has 0 bytes"):
        verify_consistency(1, 5, build_consistency(1, 5), r1, b"")


def test_rehash_checks_its_input() -> None:
    nodes = inclusion_nodes(5, 11)
    hashes = fetch(nodes, 11)
    with pytest.raises(ProofError, match="node hashes"):
        nodes.rehash(hashes[:-1])
    with pytest.raises(ProofError, match="bytes"):
        nodes.rehash([*hashes[:-1], b"short"])


def test_nodes_shape() -> None:
    # Leaf 0 of 6: sibling leaf 1, sibling (1, 1), then the ephemeral node is (2, 1)
    # cut at 6, which is the single perfect node (1, 2).
    assert inclusion_nodes(0, 6) == Nodes(((0, 1), (1, 1), (1, 2)), 2, 3, (2, 1))
    # Leaf 4 of 7: sibling leaf 5, ephemeral = leaf 6, then left subtree (2, 0).
    assert inclusion_nodes(4, 7) == Nodes(((0, 5), (0, 6), (2, 0)), 1, 2, (1, 3))
    # Leaf 0 of 7: the ephemeral node covers leaves 4-6 = (1, 2) + (0, 6), right first.
    nodes = inclusion_nodes(0, 7)
    assert nodes == Nodes(((0, 1), (1, 1), (0, 6), (1, 2)), 2, 4, (2, 1))
    assert nodes.proof_size == 3
    # Consistency 3 -> 7 ships the seed (0, 2) first; 4 -> 7 does not (seed is root1).
    assert consistency_nodes(3, 7).ids[0] == (0, 2)
    assert (2, 0) not in consistency_nodes(4, 7).ids


def test_range_nodes() -> None:
    assert range_nodes(0, 0) == []
    assert range_nodes(0, 6) == [(2, 0), (1, 2)]
    assert range_nodes(3, 13) == [(0, 3), (2, 1), (2, 2), (0, 12)]
    with pytest.raises(ProofError):
        range_nodes(5, 3)
    rnd = random.Random(1)
    for _ in range(2000):
        end = rnd.randint(0, 1 << rnd.randint(0, 70))
        begin = rnd.randint(0, end)
        ids = range_nodes(begin, end)
        pos = begin
        for node in ids:  # contiguous, perfect, aligned
            lo, hi = node_range(node)
            assert lo == pos
            pos = hi
        assert pos == end
        assert len(ids) <= 2 * max(1, (end - begin).bit_length())


# --- O(log n) at large sizes ----------------------------------------------------------


def _bound(n: int) -> int:
    return 2 * math.ceil(math.log2(n)) + 2


def test_node_count_is_logarithmic_at_large_size() -> None:
    n = 10**9
    rnd = random.Random(7)
    indices = [0, 1, n // 2, n - 2, n - 1, *(rnd.randrange(n) for _ in range(2000))]
    for index in indices:
        nodes = inclusion_nodes(index, n)
        assert len(nodes.ids) <= _bound(n)
        assert all(node_range(node)[1] <= n for node in nodes.ids)
    for size1 in [1, 2, n // 2, n - 1, n, *(rnd.randint(1, n) for _ in range(2000))]:
        nodes = consistency_nodes(size1, n)
        assert len(nodes.ids) <= _bound(n)
        assert all(node_range(node)[1] <= n for node in nodes.ids)


# --- symbolic proofs: shapes at sizes too large to hash ------------------------------


def _sym(lo: int, hi: int) -> bytes:
    return lo.to_bytes(16, "big") + hi.to_bytes(16, "big")


def _unsym(h: bytes) -> tuple[int, int]:
    return int.from_bytes(h[:16], "big"), int.from_bytes(h[16:], "big")


def _sym_children(left: bytes, right: bytes) -> bytes:
    (a, b), (c, d) = _unsym(left), _unsym(right)
    assert b == c, "rehash combined non-adjacent nodes"
    return _sym(a, d)


def _sym_fetch(nodes: Nodes) -> list[bytes]:
    return [_sym(*node_range(node)) for node in nodes.ids]


sizes = st.integers(min_value=1, max_value=2**64)


@given(data=st.data(), size=sizes)
def test_symbolic_inclusion_matches_rfc_path(data: st.DataObject, size: int) -> None:
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    nodes = inclusion_nodes(index, size)
    assert len(nodes.ids) <= _bound(max(size, 2))
    assert all(node_range(node)[1] <= size for node in nodes.ids)
    proof = nodes.rehash(_sym_fetch(nodes), _sym_children)
    assert [_unsym(h) for h in proof] == symbolic_path(index, 0, size)


@given(data=st.data(), size2=sizes)
def test_symbolic_consistency_matches_rfc_proof(data: st.DataObject, size2: int) -> None:
    size1 = data.draw(st.integers(min_value=1, max_value=size2))
    nodes = consistency_nodes(size1, size2)
    assert len(nodes.ids) <= _bound(max(size2, 2))
    assert all(node_range(node)[1] <= size2 for node in nodes.ids)
    proof = nodes.rehash(_sym_fetch(nodes), _sym_children)
    assert [_unsym(h) for h in proof] == symbolic_subproof(size1, 0, size2, True)


# --- hypothesis with real hashes --------------------------------------------------------


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.integers(min_value=1, max_value=N))
def test_random_inclusion_roundtrip_and_tamper(data: st.DataObject, size: int) -> None:
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = build_inclusion(index, size)
    root = REF.root(size)
    verify_inclusion(index, size, LEAVES[index], proof, root)
    other = data.draw(st.integers(min_value=0, max_value=size - 1))
    if other != index:
        with pytest.raises(ProofError):
            verify_inclusion(other, size, LEAVES[index], proof, root)
    if proof:
        k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        bit = data.draw(st.integers(min_value=0, max_value=255))
        proof[k] = flip(proof[k], bit)
        with pytest.raises(ProofError):
            verify_inclusion(index, size, LEAVES[index], proof, root)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size2=st.integers(min_value=1, max_value=N))
def test_random_consistency_roundtrip_and_tamper(data: st.DataObject, size2: int) -> None:
    size1 = data.draw(st.integers(min_value=1, max_value=size2))
    proof = build_consistency(size1, size2)
    r1, r2 = REF.root(size1), REF.root(size2)
    verify_consistency(size1, size2, proof, r1, r2)
    if proof:
        k = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        bit = data.draw(st.integers(min_value=0, max_value=255))
        proof[k] = flip(proof[k], bit)
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, proof, r1, r2)


@settings(max_examples=60, deadline=None)
@given(entries=st.lists(st.binary(max_size=40), min_size=1, max_size=80), data=st.data())
def test_random_entries(entries: list[bytes], data: st.DataObject) -> None:
    """Arbitrary (possibly duplicate) leaf data: proofs still match the reference."""
    ref = ReferenceTree(entries)
    store: dict[NodeID, bytes] = {}
    rng = CompactRange()
    for e in entries:
        store.update(rng.append(leaf_hash(e)))
    size = len(entries)
    assert rng.root() == ref.root(size)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    nodes = inclusion_nodes(index, size)
    proof = nodes.rehash([store[n] for n in nodes.ids])
    assert proof == ref.path(index, size)
    verify_inclusion(index, size, leaf_hash(entries[index]), proof, ref.root(size))
    size1 = data.draw(st.integers(min_value=1, max_value=size))
    nodes = consistency_nodes(size1, size)
    proof = nodes.rehash([store[n] for n in nodes.ids])
    assert proof == ref.proof(size1, size)
    verify_consistency(size1, size, proof, ref.root(size1), ref.root(size))
