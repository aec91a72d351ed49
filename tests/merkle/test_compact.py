"""Hashing and compact ranges, checked against the RFC 9162 reference implementation."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medledger.errors import IntegrityError, ProofError
from medledger.merkle import (
    EMPTY_ROOT,
    CompactRange,
    NodeID,
    border_ids,
    leaf_hash,
    node_hash,
    node_range,
    root_from_border,
)

from .reference import ReferenceTree, rfc_leaf_hash, rfc_node_hash

N = 300
ENTRIES = [b"compact %d" % i for i in range(N)]
REF = ReferenceTree(ENTRIES)


def test_hashes_match_rfc() -> None:
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    for data in (b"", b"x", b"\x00" * 4096, b"\x01" * 4097, bytes(range(256)) * 100):
        assert leaf_hash(data) == rfc_leaf_hash(data) == hashlib.sha256(b"\x00" + data).digest()
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(a, b) == rfc_node_hash(a, b) != node_hash(b, a)
    assert leaf_hash(b"") != EMPTY_ROOT
    # Domain separation: a node is not the leaf of its concatenated children.
    assert node_hash(a, b) != leaf_hash(a + b)


def test_roots_and_completed_nodes_at_every_size() -> None:
    rng = CompactRange()
    assert rng.size == 0
    assert rng.root() == EMPTY_ROOT == REF.root(0)
    assert rng.to_hashes() == []
    store: dict[NodeID, bytes] = {}
    for i, entry in enumerate(ENTRIES):
        completed = rng.append(leaf_hash(entry))
        # The leaf itself, then one parent per trailing one bit of the old size.
        trailing_ones = (~i & (i + 1)).bit_length() - 1
        assert [node for node, _ in completed] == [
            (level, i >> level) for level in range(trailing_ones + 1)
        ]
        for node, h in completed:
            assert node not in store
            assert h == REF.mth(*node_range(node)), node
            store[node] = h
        size = i + 1
        assert rng.size == size
        assert rng.root() == REF.root(size), size
        assert rng.ids() == border_ids(size)
        assert rng.to_hashes() == [REF.mth(*node_range(node)) for node in border_ids(size)]
        assert root_from_border(rng.to_hashes()) == rng.root()
    # Every perfect node of the final tree was reported exactly once.
    assert len(store) == sum(N >> level for level in range(N.bit_length()))


def test_border_ids() -> None:
    assert border_ids(0) == []
    assert border_ids(1) == [(0, 0)]
    assert border_ids(6) == [(2, 0), (1, 2)]
    assert border_ids(7) == [(2, 0), (1, 2), (0, 6)]
    assert border_ids(8) == [(3, 0)]
    for size in range(2000):
        ids = border_ids(size)
        assert len(ids) == size.bit_count()
        assert [level for level, _ in ids] == sorted(
            (b for b in range(size.bit_length()) if size >> b & 1), reverse=True
        )
        assert (node_range(ids[-1])[1] if ids else 0) == size


def test_restore_from_hashes_at_every_size() -> None:
    rng = CompactRange()
    for i in range(N):
        restored = CompactRange.from_hashes(rng.size, rng.to_hashes())
        assert restored == rng
        assert restored.root() == rng.root()
        # A restored range appends exactly like the original.
        h = leaf_hash(ENTRIES[i])
        assert restored.append(h) == rng.append(h)
        assert restored == rng


def test_from_hashes_rejects_bad_input() -> None:
    h = leaf_hash(b"x")
    CompactRange.from_hashes(5, [h, h])
    for size, hashes in [(5, [h]), (5, [h, h, h]), (0, [h]), (4, []), (-1, [])]:
        with pytest.raises(IntegrityError):
            CompactRange.from_hashes(size, hashes)
    with pytest.raises(IntegrityError, match="not 32 bytes"):
        CompactRange.from_hashes(3, [h, h[:31]])


def test_append_rejects_bad_leaf_hash() -> None:
    rng = CompactRange()
    for bad in (b"", b"x" * 31, b"x" * 33):
        with pytest.raises(ProofError):
            rng.append(bad)
    assert rng.size == 0


def test_copy_extend_and_equality() -> None:
    rng = CompactRange()
    completed = rng.extend(leaf_hash(e) for e in ENTRIES[:7])
    assert [node for node, _ in completed] == [
        (0, 0), (0, 1), (1, 0), (0, 2), (0, 3), (1, 1), (2, 0), (0, 4), (0, 5), (1, 2), (0, 6),
    ]  # fmt: skip
    other = rng.copy()
    assert other == rng
    other.append(leaf_hash(b"more"))
    assert other != rng
    assert rng.size == 7
    assert rng != "not a range"
    assert "size=7" in repr(rng)
    with pytest.raises(TypeError):
        hash(rng)


@given(st.lists(st.binary(max_size=16), max_size=70), st.integers(min_value=0, max_value=70))
def test_split_appends_and_restore(entries: list[bytes], cut: int) -> None:
    """Appending in one go equals appending, persisting, restoring and appending the rest."""
    cut = min(cut, len(entries))
    whole = CompactRange()
    whole.extend(leaf_hash(e) for e in entries)
    first = CompactRange()
    first.extend(leaf_hash(e) for e in entries[:cut])
    resumed = CompactRange.from_hashes(first.size, first.to_hashes())
    resumed.extend(leaf_hash(e) for e in entries[cut:])
    assert resumed == whole
    assert whole.root() == ReferenceTree(entries).root(len(entries))
