"""The sparse Merkle tree, checked against a slow reference written from its definition.

The reference below imports nothing from ``medledger``: it spells out the hash and
node-format definitions of :mod:`medledger.state.smt` with :mod:`hashlib`, recursing
over the sorted hex key hashes (a nibble is one hex digit).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import defaultdict
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.errors import IntegrityError, ProofError
from medledger.state import (
    EMPTY_ROOT,
    MemoryNodeStore,
    SparseMerkleTree,
    StateProof,
    compute_root,
    node_key,
    verify_state_proof,
)
from medledger.state.smt import TOP_DEPTH, apply_writes, in_top, rebuild_top, split_top

# -- reference ---------------------------------------------------------------------

EMPTY = bytes(32)
NIBBLES = "0123456789abcdef"


def H(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def _entries(model: dict[bytes, bytes]) -> list[tuple[str, bytes]]:
    """(hex key hash, value hash) sorted by key hash."""
    return sorted((H(k).hex(), H(v)) for k, v in model.items())


def _ref_hash(entries: list[tuple[str, bytes]], depth: int) -> bytes:
    if not entries:
        return EMPTY
    if len(entries) == 1:
        kh, vh = entries[0]
        return H(b"\x00", bytes.fromhex(kh), vh)
    children = [_ref_hash([e for e in entries if e[0][depth] == n], depth + 1) for n in NIBBLES]
    return H(b"\x01", *children)


def ref_root(model: dict[bytes, bytes]) -> bytes:
    return _ref_hash(_entries(model), 0)


def _ref_key(depth: int, prefix: str) -> bytes:
    return bytes([depth]) + bytes.fromhex(prefix + ("0" if depth % 2 else ""))


def _ref_nodes(
    entries: list[tuple[str, bytes]], depth: int, prefix: str, out: dict[bytes, bytes]
) -> None:
    if not entries:
        return
    if len(entries) == 1:
        kh, vh = entries[0]
        out[_ref_key(depth, prefix)] = b"\x00" + bytes.fromhex(kh) + vh
        return
    bitmap = leafmap = 0
    hashes = []
    for i, n in enumerate(NIBBLES):
        sub = [e for e in entries if e[0][depth] == n]
        _ref_nodes(sub, depth + 1, prefix + n, out)
        if sub:
            bitmap |= 1 << i
            hashes.append(_ref_hash(sub, depth + 1))
            if len(sub) == 1:
                leafmap |= 1 << i
    out[_ref_key(depth, prefix)] = (
        b"\x01" + bitmap.to_bytes(2, "big") + leafmap.to_bytes(2, "big") + b"".join(hashes)
    )


def ref_nodes(model: dict[bytes, bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    _ref_nodes(_entries(model), 0, "", out)
    return out


# -- key pool with long shared hash prefixes ---------------------------------------


def _key_pool() -> list[bytes]:
    """Keys whose hashes share 2..7 leading nibbles, so deep paths get exercised."""
    pool: list[bytes] = [b"", b"a", b"b", b"patient/1", b"patient/2"]
    hexes = [(H(b"p%d" % i).hex(), b"p%d" % i) for i in range(300_000)]
    for n, groups in ((2, 3), (3, 3), (5, 3), (6, 2), (7, 1)):
        buckets: dict[str, list[bytes]] = defaultdict(list)
        for h, k in hexes:
            buckets[h[:n]].append(k)
        found = [b for b in buckets.values() if len(b) >= 2][:groups]
        assert len(found) == groups
        for b in found:
            pool.extend(b[:4])
    return list(dict.fromkeys(pool))


POOL = _key_pool()

keys_st = st.sampled_from(POOL) | st.binary(max_size=3)
values_st = st.binary(max_size=3)
batch_st = st.dictionaries(keys_st, st.none() | values_st, max_size=12)
model_st = st.dictionaries(keys_st, values_st, max_size=40)


def apply_model(model: dict[bytes, bytes], batch: dict[bytes, bytes | None]) -> None:
    for k, v in batch.items():
        if v is None:
            model.pop(k, None)
        else:
            model[k] = v


def build(model: dict[bytes, bytes]) -> tuple[MemoryNodeStore, SparseMerkleTree]:
    store = MemoryNodeStore()
    tree = SparseMerkleTree(store)
    store.apply(tree.update(dict(model)).node_writes)
    return store, tree


# -- fixed cases -------------------------------------------------------------------


def test_reference_pool_has_deep_collisions() -> None:
    hexes = sorted(H(k).hex() for k in POOL)
    longest = max(next(i for i in range(64) if a[i] != b[i]) for a, b in itertools.pairwise(hexes))
    assert longest >= 7


def test_empty_tree() -> None:
    store = MemoryNodeStore()
    tree = SparseMerkleTree(store)
    assert tree.root() == EMPTY_ROOT == EMPTY == compute_root({}) == ref_root({})
    result = tree.update({})
    assert result.root == EMPTY_ROOT and result.node_writes == {}
    result = tree.update({b"absent": None})
    assert result.root == EMPTY_ROOT and result.node_writes == {}
    proof = tree.prove(b"k")
    assert proof.siblings == () and proof.leaf is None
    verify_state_proof(EMPTY_ROOT, b"k", None, proof)
    with pytest.raises(ProofError):
        verify_state_proof(EMPTY_ROOT, b"k", b"v", proof)


def test_single_leaf_sits_at_root() -> None:
    store, tree = build({b"a": b"1"})
    leaf = b"\x00" + H(b"a") + H(b"1")
    assert store.nodes == {b"\x00": leaf}
    assert tree.root() == H(leaf) == compute_root({b"a": b"1"})


def test_golden_vector() -> None:
    """Pins the format: another implementation must produce this root."""
    model = {b"a": b"1", b"b": b"2"}
    expected = "00f76a19acfb8ac48d1fd59d0892dd0828bcaa88a5581f12d0e48ebb2ae0de01"
    assert ref_root(model).hex() == expected
    assert compute_root(model).hex() == expected
    assert build(model)[1].root().hex() == expected


def test_node_key_format() -> None:
    kh = bytes.fromhex("abcdef" + "00" * 29)
    assert node_key(kh, 0) == b"\x00"
    assert node_key(kh, 1) == bytes([1, 0xA0])
    assert node_key(kh, 2) == bytes([2, 0xAB])
    assert node_key(kh, 3) == bytes([3, 0xAB, 0xC0])
    assert node_key(kh, 64) == bytes([64]) + kh


def test_larger_set_matches_reference() -> None:
    model = {b"key/%d" % i: b"v%d" % (i % 7) for i in range(3000)}
    store, tree = build(model)
    assert tree.root() == compute_root(model) == ref_root(model)
    assert store.nodes == ref_nodes(model)
    # Incrementally, in batches, with deletions of a third.
    store2 = MemoryNodeStore()
    tree2 = SparseMerkleTree(store2)
    keys = list(model)
    for i in range(0, len(keys), 500):
        store2.apply(tree2.update({k: model[k] for k in keys[i : i + 500]}).node_writes)
    dels: dict[bytes, bytes | None] = {k: None for k in keys[::3]}
    store2.apply(tree2.update(dels).node_writes)
    apply_model(model, dels)
    assert tree2.root() == ref_root(model)
    assert store2.nodes == ref_nodes(model)


# -- incremental updates vs. the reference -------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(batch_st, min_size=1, max_size=12))
def test_incremental_updates_match_reference(batches: list[dict[bytes, bytes | None]]) -> None:
    store = MemoryNodeStore()
    tree = SparseMerkleTree(store)
    model: dict[bytes, bytes] = {}
    for batch in batches:
        before = dict(store.nodes)
        result = tree.update(batch)
        assert store.nodes == before, "update must not mutate the store"
        store.apply(result.node_writes)
        apply_model(model, batch)
        expected = ref_root(model)
        assert result.root == expected
        assert compute_root(model) == expected
        assert SparseMerkleTree(store).root() == expected
        # The stored node set is exactly the canonical one: no garbage, compressed.
        assert store.nodes == ref_nodes(model)
        assert sum(1 for v in store.nodes.values() if v[0] == 0) == len(model)


@settings(max_examples=300, deadline=None)
@given(st.lists(batch_st, min_size=1, max_size=12))
def test_created_names_exactly_the_written_positions_that_held_no_node(
    batches: list[dict[bytes, bytes | None]],
) -> None:
    # A store inserts these without looking for a row to replace: one named here that
    # held a node would fail its commit; one left out only costs that look.
    store = MemoryNodeStore()
    split = SplitStore()  # a ledger node's: the top kept in memory, not stored
    for batch in batches:
        result = SparseMerkleTree(store).update(batch)
        written = {nk for nk, v in result.node_writes.items() if v is not None}
        assert result.created == written - set(store.nodes)
        store.apply(result.node_writes)
        at_node = SparseMerkleTree(split).update(batch)
        stored, _ = split_top(at_node.node_writes, split.top)
        assert (
            not {nk for nk, v in stored.items() if v is not None}
            & at_node.created
            & set(split.stored)
        )
        split.apply(dict(at_node.node_writes))
    assert SparseMerkleTree(store).update({}).created == frozenset()


@settings(max_examples=100, deadline=None)
@given(model_st, st.randoms(use_true_random=False), st.data())
def test_root_is_independent_of_history(
    model: dict[bytes, bytes], rnd: random.Random, data: st.DataObject
) -> None:
    expected_root = ref_root(model)
    expected_nodes = ref_nodes(model)
    items = list(model.items())
    rnd.shuffle(items)
    store = MemoryNodeStore()
    tree = SparseMerkleTree(store)
    # Random batching, plus junk keys inserted and later deleted.
    junk = data.draw(st.dictionaries(keys_st.filter(lambda k: k not in model), values_st))
    i = 0
    while i < len(items):
        n = rnd.randint(1, 5)
        store.apply(tree.update(dict(items[i : i + n]) | junk).node_writes)
        i += n
    store.apply(tree.update(dict.fromkeys(junk)).node_writes)
    assert tree.root() == expected_root
    assert store.nodes == expected_nodes


@settings(max_examples=75, deadline=None)
@given(model_st, st.booleans())
def test_deleting_everything_leaves_nothing(model: dict[bytes, bytes], one_batch: bool) -> None:
    store, tree = build(model)
    if one_batch:
        result = tree.update(dict.fromkeys(model))
        store.apply(result.node_writes)
        assert result.root == EMPTY_ROOT
    else:
        for k in model:
            store.apply(tree.update({k: None}).node_writes)
    assert tree.root() == EMPTY_ROOT
    assert store.nodes == {}


def test_unchanged_writes_nothing() -> None:
    model = {k: b"x" for k in POOL}
    _store, tree = build(model)
    result = tree.update({POOL[0]: b"x", b"absent-key": None})
    assert result.node_writes == {}
    assert result.root == tree.root()


# -- proofs ------------------------------------------------------------------------


def _check_proofs(model: dict[bytes, bytes], probes: list[bytes]) -> None:
    _store, tree = build(model)
    root = tree.root()
    for key in probes:
        value = model.get(key)
        proof = tree.prove(key)
        verify_state_proof(root, key, value, proof)
        # Round trip through JSON.
        again = StateProof.from_dict(json.loads(json.dumps(proof.to_dict())))
        assert again == proof
        verify_state_proof(root, key, value, again)
        # Wrong root.
        with pytest.raises(ProofError):
            verify_state_proof(bytes([root[0] ^ 1]) + root[1:], key, value, proof)
        if value is not None:
            assert proof.leaf is not None
            with pytest.raises(ProofError):
                verify_state_proof(root, key, value + b"!", proof)
            with pytest.raises(ProofError):
                verify_state_proof(root, key, None, proof)
            with pytest.raises(ProofError):
                verify_state_proof(root, key + b"?", value, proof)
        else:
            with pytest.raises(ProofError):
                verify_state_proof(root, key, b"", proof)
            for other in model:
                if proof.leaf is not None and proof.leaf[0] == H(other):
                    # The leaf ending the path proves its own key's membership.
                    verify_state_proof(root, other, model[other], proof)
                    continue
                with pytest.raises(ProofError):
                    verify_state_proof(root, other, model[other], proof)
        if proof.leaf is not None:
            bad_leaf = (proof.leaf[0], bytes(32))
            with pytest.raises(ProofError):
                verify_state_proof(root, key, value, replace(proof, leaf=bad_leaf))
            with pytest.raises(ProofError):
                verify_state_proof(root, key, value, replace(proof, leaf=None))
        if proof.siblings:
            # Tampered sibling: the last level always has a non-empty sibling.
            last = list(proof.siblings[-1])
            n = next(i for i, h in enumerate(last) if h != EMPTY)
            last[n] = bytes([last[n][0] ^ 1]) + last[n][1:]
            tampered = (*proof.siblings[:-1], tuple(last))
            with pytest.raises(ProofError):
                verify_state_proof(root, key, value, replace(proof, siblings=tampered))
            # A hash smuggled into an empty slot.
            row = list(proof.siblings[0])
            m = next((i for i, h in enumerate(row) if h == EMPTY), None)
            if m is not None:
                row[m] = b"\x42" * 32
                smuggled = (tuple(row), *proof.siblings[1:])
                with pytest.raises(ProofError):
                    verify_state_proof(root, key, value, replace(proof, siblings=smuggled))
            # Truncated proofs.
            for truncated in (proof.siblings[1:], proof.siblings[:-1]):
                with pytest.raises(ProofError):
                    verify_state_proof(root, key, value, replace(proof, siblings=truncated))
            # Extended proof.
            with pytest.raises(ProofError):
                verify_state_proof(
                    root, key, value, replace(proof, siblings=(*proof.siblings, last_row()))
                )


def last_row() -> tuple[bytes, ...]:
    return (b"\x07" * 32,) * 16


@settings(max_examples=100, deadline=None)
@given(model_st, st.lists(keys_st, max_size=8))
def test_proofs(model: dict[bytes, bytes], extra: list[bytes]) -> None:
    _check_proofs(model, list(model)[:10] + extra)


def test_proofs_deep_paths() -> None:
    model = {k: b"v" + k for k in POOL[::2]}
    _check_proofs(model, POOL)


def test_proof_from_dict_rejects_garbage() -> None:
    _, tree = build({k: b"v" for k in POOL})
    good = tree.prove(POOL[0]).to_dict()
    bad_inputs: list[object] = [
        {},
        {"siblings": "x", "leaf": None},
        {"siblings": [{"bitmap": 1, "hashes": []}], "leaf": None},
        {"siblings": [{"bitmap": 1 << 16, "hashes": []}], "leaf": None},
        {"siblings": [{"bitmap": True, "hashes": ["00" * 32]}], "leaf": None},
        {"siblings": [{"bitmap": 1, "hashes": ["zz" * 32]}], "leaf": None},
        {"siblings": [{"bitmap": 1, "hashes": ["00" * 32]}], "leaf": None},
        {"siblings": [{"bitmap": 1, "hashes": ["11" * 31]}], "leaf": None},
        {"siblings": [], "leaf": {"key_hash": "00"}},
        {"siblings": [], "leaf": {"key_hash": 5, "value_hash": "00" * 32}},
        {"siblings": [[]], "leaf": None},
        {**good, "siblings": [good["siblings"][0]] * 65},
    ]
    for bad in bad_inputs:
        with pytest.raises(ProofError):
            StateProof.from_dict(bad)  # type: ignore[arg-type]


def test_verify_rejects_malformed_proof_objects() -> None:
    _, tree = build({b"a": b"1", b"b": b"2"})
    root = tree.root()
    proof = tree.prove(b"a")
    verify_state_proof(root, b"a", b"1", proof)
    for bad in (
        replace(proof, siblings=(proof.siblings[0][:15],)),
        replace(proof, siblings=((b"x",) * 16,)),
        replace(proof, leaf=(b"short", b"x" * 32)),
        replace(proof, siblings=(proof.siblings[0],) * 65),
    ):
        with pytest.raises(ProofError):
            verify_state_proof(root, b"a", b"1", bad)
    with pytest.raises(ProofError):
        verify_state_proof(root, b"a", b"1", proof.to_dict())  # type: ignore[arg-type]


# -- store integrity ---------------------------------------------------------------


def test_missing_or_corrupt_nodes_raise_integrity_error() -> None:
    model = {k: b"v" for k in POOL}
    store, tree = build(model)
    child = next(k for k in store.nodes if k[0] == 1)
    saved = store.nodes.pop(child)
    with pytest.raises(IntegrityError):
        tree.update({k: b"w" for k in POOL})
    with pytest.raises(IntegrityError):
        for k in POOL:
            tree.prove(k)
    store.nodes[child] = saved[:-1]
    with pytest.raises(IntegrityError):
        tree.update({k: b"w" for k in POOL})
    store.nodes[child] = saved
    store.nodes[b"\x00"] = b"\x02junk"
    with pytest.raises(IntegrityError):
        tree.root()


def test_a_node_replaced_in_the_store_is_read_anew() -> None:
    # Decoded internal nodes are remembered by node key together with their very bytes
    # object: other bytes under the same key (a tampered store, a reload) are decoded
    # again, so the tree never answers from the node it saw before.
    model = {k: b"v" for k in POOL}
    store, tree = build(model)
    root = tree.root()
    raw = store.nodes[b"\x00"]
    assert raw[:1] == b"\x01"  # the root is an internal node
    store.nodes[b"\x00"] = raw[:-1] + bytes([raw[-1] ^ 1])  # one child hash flipped
    assert tree.root() != root
    with pytest.raises(ProofError):
        for k in POOL:
            verify_state_proof(root, k, b"v", tree.prove(k))
    store.nodes[b"\x00"] = bytes(bytearray(raw))  # equal bytes, another object
    assert tree.root() == root


# -- the top of the tree: kept in memory, not stored, rebuilt on open ------------------


class SplitStore:
    """What a ledger node keeps: the stored nodes (``split_top``'s first part) and the
    top in memory, read top first, as the node's read cache does."""

    def __init__(self) -> None:
        self.stored: dict[bytes, bytes] = {}
        self.top: dict[bytes, bytes] = {}

    def get_node(self, nk: bytes) -> bytes | None:
        return self.top.get(nk) if nk in self.top else self.stored.get(nk)

    def apply(self, writes: dict[bytes, bytes | None]) -> None:
        stored, changes = split_top(writes, self.top)
        apply_writes(self.stored, stored)
        apply_writes(self.top, changes)

    def upper(self) -> list[tuple[bytes, bytes]]:
        """What the node reads back when it opens the ledger: depth <= TOP_DEPTH, key order."""
        return sorted((k, v) for k, v in self.stored.items() if k[0] <= TOP_DEPTH)


def _check_split(split: SplitStore, model: dict[bytes, bytes]) -> None:
    nodes = ref_nodes(model)
    # exactly the canonical nodes less the top: no leaf left behind where the top grew
    assert split.stored == {k: v for k, v in nodes.items() if not in_top(k, v)}
    assert split.top == {k: v for k, v in nodes.items() if in_top(k, v)}
    assert rebuild_top(split.upper()) == split.top
    assert SparseMerkleTree(split).root() == ref_root(model)


@settings(max_examples=300, deadline=None)
@given(st.lists(batch_st, min_size=1, max_size=12))
def test_the_top_is_never_stored_and_rebuilds_exactly(
    batches: list[dict[bytes, bytes | None]],
) -> None:
    split = SplitStore()
    model: dict[bytes, bytes] = {}
    for batch in batches:
        split.apply(dict(SparseMerkleTree(split).update(batch).node_writes))
        apply_model(model, batch)
        _check_split(split, model)


def test_the_top_of_a_wide_tree_rebuilds_exactly() -> None:
    """20,000 keys: internal nodes at every depth of the top and at TOP_DEPTH itself."""
    rnd = random.Random(7)
    keys = [b"k%d" % i for i in range(20_000)]
    split = SplitStore()
    model: dict[bytes, bytes] = {}
    for i in range(0, len(keys), 997):
        batch: dict[bytes, bytes | None] = {k: b"v" for k in keys[i : i + 997]}
        batch |= {k: None for k in rnd.sample(sorted(model), min(len(model), 50))}
        split.apply(dict(SparseMerkleTree(split).update(batch).node_writes))
        apply_model(model, batch)
    assert {k[0] for k in split.top} == set(range(TOP_DEPTH))
    assert any(k[0] == TOP_DEPTH and v[0] == 1 for k, v in split.stored.items())
    assert rebuild_top(split.upper()) == split.top
    assert SparseMerkleTree(split).root() == compute_root(model)
    # a store written by a version that stored the top: those rows are ignored
    stale = {k: b"\x01" + bytes(36) for k in split.top}
    assert rebuild_top(sorted(split.upper() + list(stale.items()))) == split.top


def test_rebuilding_the_top_refuses_stored_nodes_that_are_no_tree() -> None:
    split = SplitStore()
    model = {b"k%d" % i: b"v" for i in range(600)}
    split.apply(dict(SparseMerkleTree(split).update(dict(model)).node_writes))
    upper = dict(split.upper())
    # depth-3 positions by their depth-2 parent (node key: depth byte, then 1 byte of prefix)
    below: dict[bytes, list[bytes]] = defaultdict(list)
    for k in upper:
        if k[0] == 3:
            below[b"\x02" + k[1:2]].append(k)
    leaf = next(k for k, v in upper.items() if k[0] == 3 and v[0] == 0)
    # the parent of a stored leaf also stored as a leaf: a leaf with nodes below it
    with pytest.raises(IntegrityError, match="has nodes below it"):
        rebuild_top(sorted({**upper, b"\x02" + leaf[1:2]: upper[leaf]}.items()))
    # one of exactly two leaves below a position deleted: a single leaf below it
    pair = next(ks for ks in below.values() if len(ks) == 2 and all(upper[k][0] == 0 for k in ks))
    with pytest.raises(IntegrityError, match="single leaf below it"):
        rebuild_top(sorted((k, v) for k, v in upper.items() if k != pair[0]))
    with pytest.raises(IntegrityError, match="malformed"):
        rebuild_top(sorted({**upper, leaf: upper[leaf][:-1]}.items()))
    with pytest.raises(ValueError, match="below depth"):
        rebuild_top([(bytes([TOP_DEPTH + 1]) + bytes(3), upper[leaf])])
