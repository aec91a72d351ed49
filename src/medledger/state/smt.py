"""Authenticated world state: a compressed 16-ary sparse Merkle tree.

Structure
=========

Every state key ``key`` (bytes) is placed at the path ``kh = SHA-256(key)``,
read as 64 nibbles (4-bit digits), most significant nibble of ``kh[0]`` first:
nibble ``i`` of ``kh`` is ``kh[i // 2] >> 4`` for even ``i`` and
``kh[i // 2] & 0x0f`` for odd ``i``. Conceptually the tree is the complete
16-ary trie of depth 64 over all possible paths; a *position* is a depth ``d``
(0..64) and the first ``d`` nibbles of a path (its *prefix*).

The hash of the subtree at a position is defined recursively, as a pure
function of the set of ``(kh, value)`` pairs whose path starts with the prefix:

* no pair: ``EMPTY_HASH`` = 32 zero bytes;
* exactly one pair: the leaf hash
  ``leaf_hash = SHA-256(0x00 || kh || SHA-256(value))`` (whatever the depth);
* two or more pairs: the internal hash
  ``SHA-256(0x01 || H(child 0) || H(child 1) || ... || H(child 15))``, where
  child ``n`` is the position one deeper whose last nibble is ``n``.

The state root is the hash of the position at depth 0; the root of the empty
map is therefore ``EMPTY_ROOT`` = 32 zero bytes. So a subtree holding a single
leaf is represented by that leaf placed at the shallowest depth where its
prefix is unique (as in Diem/Aptos' Jellyfish Merkle Tree), while an internal
node with a single *internal* child is kept (it is not path-compressed). No
SHA-256 output is known to be all-zero, so ``EMPTY_HASH`` cannot be confused
with a real node. The root depends only on the key-value set, never on the
order or batching of updates.

Stored nodes
============

Only non-empty positions holding a leaf or internal node are stored.

*Node key* (:func:`node_key`): ``bytes([d]) || packed prefix``, where the
``d``-nibble prefix is packed two nibbles per byte, high nibble first, in
``ceil(d / 2)`` bytes; when ``d`` is odd the low nibble of the last byte is 0.
The root position is ``b"\\x00"``; a node key is at most 33 bytes.

*Node value*:

* leaf: ``0x00 || kh (32) || SHA-256(value) (32)``, 65 bytes, which is
  exactly the leaf-hash preimage (``leaf_hash = SHA-256(node value)``). The
  state value itself is not stored in the tree (it lives in the state rows).
* internal: ``0x01 || bitmap (2 bytes, big-endian) || leafmap (2 bytes,
  big-endian) || child hashes``: bit ``n`` (value ``1 << n``) of ``bitmap`` is
  set iff child ``n`` is non-empty; bit ``n`` of ``leafmap`` is set iff child
  ``n`` is a leaf (``leafmap`` is a subset of ``bitmap``); then the 32-byte
  hashes of the non-empty children in increasing ``n``. Canonical nodes have at
  least two leaves below them, so a node with one child that is a leaf, or no
  child, is invalid.

Updates are batched: :meth:`SparseMerkleTree.update` hashes and sorts the
changed keys, walks the tree once, recursing only into touched children, and
returns the new root and the node writes (puts and deletes) for the caller to
persist atomically with the block. It reads the store but never writes it.

Proofs
======

A :class:`StateProof` for ``key`` lists, from the root down, the 16 child
hashes of each internal node on the path of ``kh`` (with the path's own slot
set to ``EMPTY_HASH``), and the leaf ``(kh', SHA-256(value'))`` where the path
ends, or ``None`` if it ends in an empty slot. It proves membership when
``kh' == kh`` and non-membership when the path ends empty or in another leaf.
:func:`verify_state_proof` is pure.

Why 16-ary
==========

In CPython the cost is dominated by interpreter work per visited node, not by
the bytes hashed. A 16-ary tree of ``n`` keys is ``log16 n`` deep (about 4-5
levels for 100k keys) against ``log2 n`` (17) for a binary tree: a key update
costs ~4-5 hashes of ~513-byte buffers (one ``hashlib`` call each) instead of
~17 hashes of 65-byte buffers plus 4x the node reads, node encodings and
Python-level loop iterations. The price is bigger proofs (up to 15 sibling
hashes per level, sent as a bitmap plus the non-empty ones). Measured with
``bench/bench_state.py`` (batches of 1000 keys into a 100k-key tree): about 4.5
SHA-256 calls and 2.9 node reads per changed key, including hashing the key and
the value, and 60-70k keys/s on one CPython core.

The top of the tree
===================

The internal nodes at depths 0 to ``TOP_DEPTH - 1`` (the root and the 16, 256
and 4,096 positions below it, as far as they hold internal nodes) change with
almost every block: every block rewrites the root, and in a tree of tens of
thousands of keys a block of 50 random keys rewrites ~15 depth-1, ~45 depth-2 and
~50 depth-3 nodes, each up to 517 bytes. Yet they are a pure function of the nodes
below them. So a ledger node does not persist them: :func:`split_top` takes them out of
the node writes it stores (deleting the leaf a position held before it became
internal), the node keeps them in memory, and :func:`rebuild_top` derives them
again, when a ledger is opened, from the stored nodes at depth ``TOP_DEPTH`` and
the leaves above it (at most 65,536 + 4,369 rows, read by key range). Stored
internal nodes above ``TOP_DEPTH`` (from a version that stored them) are ignored
there. The tree itself, its roots and proofs do not change: only what is written
to the store. (PostgreSQL, blocks of 20 ``note.anchor`` transactions into a
70,000-key state: 26 % fewer WAL records and 26 % fewer WAL bytes per
transaction, a throwaway measurement.)

Update semantics
================

``update`` takes state keys (not hashes). Deleting an absent key and rewriting
a value unchanged are no-ops and produce no node writes; internal nodes whose
encoding is unchanged are not rewritten. A deletion that leaves a subtree with
a single leaf moves that leaf up to the shallowest position where it is unique,
deleting the internal nodes and old leaf position it leaves behind, so the
stored node set is always exactly the canonical one for the current key set.
The result also names the positions written where the tree held no node before
(``created``): a store holds nothing there, and may insert them without first
looking for a row to replace. A missing or malformed node met on the way raises
:class:`~medledger.errors.IntegrityError`.
"""

from __future__ import annotations

import hashlib
import struct
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from medledger.errors import IntegrityError, ProofError

__all__ = [
    "EMPTY_HASH",
    "EMPTY_ROOT",
    "TOP_DEPTH",
    "MemoryNodeStore",
    "NodeStore",
    "SparseMerkleTree",
    "StateProof",
    "UpdateResult",
    "apply_writes",
    "compute_root",
    "in_top",
    "internal_hash",
    "key_hash",
    "leaf_hash",
    "node_key",
    "rebuild_top",
    "split_top",
    "verify_state_proof",
]

_sha256 = hashlib.sha256

HASH_SIZE = 32
#: Hash of an empty subtree.
EMPTY_HASH = bytes(HASH_SIZE)
#: State root of the empty map.
EMPTY_ROOT = EMPTY_HASH
#: Maximum depth of a position (a path has 64 nibbles).
MAX_DEPTH = 64

_LEAF_TAG = b"\x00"
_INTERNAL_TAG = b"\x01"
_LEAF_NODE_SIZE = 1 + 2 * HASH_SIZE
_ROOT_KEY = b"\x00"
_NIBBLE_BYTES = tuple(bytes((n,)) for n in range(256))
_HEADER = struct.Struct(">BHH")
_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from


def key_hash(key: bytes) -> bytes:
    """The path of a state key: ``SHA-256(key)``."""
    return _sha256(key).digest()


def leaf_hash(kh: bytes, value_hash: bytes) -> bytes:
    """``SHA-256(0x00 || kh || value_hash)`` with ``value_hash = SHA-256(value)``."""
    return _sha256(_LEAF_TAG + kh + value_hash).digest()


def internal_hash(children: Sequence[bytes]) -> bytes:
    """``SHA-256(0x01 || children[0] || ... || children[15])`` (16 hashes)."""
    return _sha256(_INTERNAL_TAG + b"".join(children)).digest()


def _nibble(kh: bytes, depth: int) -> int:
    byte = kh[depth >> 1]
    return byte & 0x0F if depth & 1 else byte >> 4


def node_key(kh: bytes, depth: int) -> bytes:
    """Node key of the depth-``depth`` position on the path ``kh`` (see module doc)."""
    half = depth >> 1
    if depth & 1:
        return _NIBBLE_BYTES[depth] + kh[:half] + _NIBBLE_BYTES[kh[half] & 0xF0]
    return _NIBBLE_BYTES[depth] + kh[:half]


def _child_key(pos: bytes, depth: int, nib: int) -> bytes:
    """Node key of child ``nib`` of the depth-``depth`` position with node key ``pos``."""
    if depth & 1:
        return _NIBBLE_BYTES[depth + 1] + pos[1:-1] + _NIBBLE_BYTES[pos[-1] | nib]
    return _NIBBLE_BYTES[depth + 1] + pos[1:] + _NIBBLE_BYTES[nib << 4]


def _split(khs: list[bytes], lo: int, hi: int, depth: int) -> list[tuple[int, int, int]]:
    """Group the sorted ``khs[lo:hi]`` (sharing ``depth`` nibbles) by nibble ``depth``.

    Returns ``(nibble, start, end)`` for each non-empty group, in nibble order.
    """
    groups: list[tuple[int, int, int]] = []
    half = depth >> 1
    odd = depth & 1
    i = lo
    while i < hi:
        kh = khs[i]
        byte = kh[half]
        if odd:
            nib = byte & 0x0F
            if nib == 15 or hi - i == 1:
                groups.append((nib, i, hi))
                return groups
            bound = kh[:half] + _NIBBLE_BYTES[byte + 1]
        else:
            nib = byte >> 4
            if nib == 15 or hi - i == 1:
                groups.append((nib, i, hi))
                return groups
            bound = kh[:half] + _NIBBLE_BYTES[(nib + 1) << 4]
        j = bisect_left(khs, bound, i + 1, hi)
        groups.append((nib, i, j))
        i = j
    return groups


# -- node encoding ---------------------------------------------------------------


def _slots_of(bitmap: int) -> tuple[int, ...]:
    """The set bits of a 16-bit bitmap, ascending (memoised)."""
    slots = _SLOTS.get(bitmap)
    if slots is None:
        slots = _SLOTS[bitmap] = tuple(n for n in range(16) if bitmap >> n & 1)
    return slots


_SLOTS: dict[int, tuple[int, ...]] = {}


class _Internal:
    """A decoded internal node: 16 child hashes (``EMPTY_HASH`` if empty), bitmaps, raw."""

    __slots__ = ("bitmap", "children", "leafmap", "raw")

    def __init__(self, children: list[bytes], bitmap: int, leafmap: int, raw: bytes) -> None:
        self.children = children
        self.bitmap = bitmap
        self.leafmap = leafmap
        self.raw = raw


#: Decoded internal nodes by node key, each kept with the very bytes object it was
#: decoded from or encoded to. The node's read cache hands back the same object for a
#: node until it changes, so a node read again is decoded again only when its bytes are
#: other bytes (``is``, not ``==``: what a hit returns is exactly the decoding of what
#: the store returned). Shared by every tree in the process; bounded (cleared when full):
#: about 15 MB when full with a 300,000-key tree's nodes (468 bytes an entry besides
#: the raw bytes it shares with the store, tracemalloc in a throwaway script), and 42 MB
#: if every entry had 16 children (1,345 bytes an entry, the same way, synthetic nodes).
_decoded: dict[bytes, _Internal] = {}
_DECODED_LIMIT = 1 << 15


def _remember(nk: bytes, node: _Internal) -> None:
    if len(_decoded) >= _DECODED_LIMIT:
        _decoded.clear()
    _decoded[nk] = node


def _encode_internal(children: list[bytes], bitmap: int, leafmap: int) -> bytes:
    parts = [_pack_header(1, bitmap, leafmap)]
    parts += [children[n] for n in _slots_of(bitmap)]
    return b"".join(parts)


def _decode(raw: bytes, where: bytes) -> tuple[bytes, bytes] | _Internal:
    """Decode a stored node: ``(kh, value_hash)`` for a leaf, else :class:`_Internal`."""
    tag = raw[:1]
    if tag == _LEAF_TAG:
        if len(raw) != _LEAF_NODE_SIZE:
            raise IntegrityError("malformed state tree leaf node", node_key=where.hex())
        return raw[1:33], raw[33:65]
    if tag == _INTERNAL_TAG and len(raw) >= 5:
        _, bitmap, leafmap = _unpack_header(raw, 0)
        slots = _slots_of(bitmap)
        count = len(slots)
        if (
            len(raw) == 5 + HASH_SIZE * count
            and leafmap & ~bitmap == 0
            and count > 0
            and not (count == 1 and leafmap)
        ):
            children = [EMPTY_HASH] * 16
            off = 5
            for n in slots:
                children[n] = raw[off : off + HASH_SIZE]
                off += HASH_SIZE
            return _Internal(children, bitmap, leafmap, raw)
    raise IntegrityError("malformed state tree node", node_key=where.hex())


def _hash_of(node: tuple[bytes, bytes] | _Internal) -> bytes:
    """The hash of a decoded node (its subtree's hash)."""
    if isinstance(node, _Internal):
        return internal_hash(node.children)
    return leaf_hash(node[0], node[1])


def _decoded_node(raw: bytes, nk: bytes) -> tuple[bytes, bytes] | _Internal:
    """:func:`_decode`, or the node remembered for ``nk`` if it has exactly ``raw``."""
    hit = _decoded.get(nk)
    if hit is not None and hit.raw is raw:
        return hit
    node = _decode(raw, nk)
    if isinstance(node, _Internal):
        _remember(nk, node)
    return node


# -- stores ----------------------------------------------------------------------


@runtime_checkable
class NodeStore(Protocol):
    """Where the tree's nodes are persisted (by the caller, see :class:`UpdateResult`)."""

    def get_node(self, node_key: bytes) -> bytes | None:
        """Return the stored node value under ``node_key``, or ``None``."""
        ...


class MemoryNodeStore:
    """A dict-backed :class:`NodeStore`."""

    __slots__ = ("nodes",)

    def __init__(self, nodes: Mapping[bytes, bytes] | None = None) -> None:
        self.nodes: dict[bytes, bytes] = dict(nodes or {})

    def get_node(self, node_key: bytes) -> bytes | None:
        return self.nodes.get(node_key)

    def apply(self, node_writes: Mapping[bytes, bytes | None]) -> None:
        """Apply the ``node_writes`` of an :class:`UpdateResult` (``None`` = delete)."""
        apply_writes(self.nodes, node_writes)

    def __len__(self) -> int:
        return len(self.nodes)


def apply_writes(nodes: dict[bytes, bytes], writes: Mapping[bytes, bytes | None]) -> None:
    """Apply node writes to a dict of nodes (``None`` = delete)."""
    for k, v in writes.items():
        if v is None:
            nodes.pop(k, None)
        else:
            nodes[k] = v


# -- the top of the tree (module docstring) ----------------------------------------

#: Internal nodes at depths below this are kept in memory, not stored (module doc).
TOP_DEPTH = 4


def in_top(node_key: bytes, value: bytes | None) -> bool:
    """Whether ``value`` at ``node_key`` is an internal node of the top (never stored)."""
    return node_key[0] < TOP_DEPTH and value is not None and value[:1] == _INTERNAL_TAG


def split_top(
    writes: Mapping[bytes, bytes | None], top: Mapping[bytes, bytes]
) -> tuple[dict[bytes, bytes | None], dict[bytes, bytes | None]]:
    """Split an update's node writes into ``(to store, changes of the top)``.

    ``top`` holds the internal nodes of the top before the writes. A position that
    becomes internal in the top is left out of the store's writes, or deleted there
    if it was not in ``top`` (it may hold the leaf it had before); a position of
    ``top`` that becomes a leaf or empty leaves the top (``None`` in the changes)
    and is written to the store as usual.
    """
    stored: dict[bytes, bytes | None] = {}
    changes: dict[bytes, bytes | None] = {}
    for nk, value in writes.items():
        if nk[0] < TOP_DEPTH:
            if value is not None and value[:1] == _INTERNAL_TAG:
                changes[nk] = value
                if nk not in top:
                    stored[nk] = None
                continue
            if nk in top:
                changes[nk] = None
        stored[nk] = value
    return stored, changes


def _parent(nk: bytes) -> tuple[bytes, int]:
    """Node key of the parent of the position ``nk`` (depth >= 1), and its nibble there."""
    depth = nk[0]
    if depth & 1:
        return _NIBBLE_BYTES[depth - 1] + nk[1:-1], nk[-1] >> 4
    return _NIBBLE_BYTES[depth - 1] + nk[1:-1] + _NIBBLE_BYTES[nk[-1] & 0xF0], nk[-1] & 0x0F


def rebuild_top(stored: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The internal nodes of the top, derived from the stored nodes of depth <= ``TOP_DEPTH``.

    ``stored`` yields ``(node key, value)``: the leaves above ``TOP_DEPTH`` and every
    node at ``TOP_DEPTH`` (e.g. ``store.iter_nodes(b"", bytes([TOP_DEPTH + 1]))``).
    Stored internal nodes above ``TOP_DEPTH`` are ignored. Raises
    :class:`~medledger.errors.IntegrityError` for a malformed node, a leaf with
    nodes below it, or a position with a single leaf below it.
    """
    by_depth: list[dict[bytes, bytes]] = [{} for _ in range(TOP_DEPTH + 1)]
    for nk, raw in stored:
        depth = nk[0]
        if depth > TOP_DEPTH:
            raise ValueError(f"node {nk.hex()} is below depth {TOP_DEPTH}")
        if depth == TOP_DEPTH or raw[:1] == _LEAF_TAG:
            by_depth[depth][nk] = raw

    # (hash, is a leaf) of each non-empty position of the depth below the current one
    def decoded(depth: int) -> dict[bytes, tuple[bytes, bool]]:
        out: dict[bytes, tuple[bytes, bool]] = {}
        for nk, raw in by_depth[depth].items():
            node = _decode(raw, nk)
            out[nk] = (_hash_of(node), not isinstance(node, _Internal))
        return out

    below = decoded(TOP_DEPTH)
    top: dict[bytes, bytes] = {}
    for depth in range(TOP_DEPTH - 1, -1, -1):
        here = decoded(depth)  # the leaves at this depth
        kids: dict[bytes, list[tuple[int, bytes, bool]]] = {}
        for nk, (h, leaf) in below.items():
            parent, nib = _parent(nk)
            kids.setdefault(parent, []).append((nib, h, leaf))
        for parent, group in kids.items():
            if parent in here:
                raise IntegrityError("a state tree leaf has nodes below it", node_key=parent.hex())
            children = [EMPTY_HASH] * 16
            bitmap = leafmap = 0
            for nib, h, leaf in group:
                children[nib] = h
                bitmap |= 1 << nib
                if leaf:
                    leafmap |= 1 << nib
            if len(group) == 1 and leafmap:
                raise IntegrityError(
                    "a state tree position holds a single leaf below it", node_key=parent.hex()
                )
            top[parent] = _encode_internal(children, bitmap, leafmap)
            here[parent] = (internal_hash(children), False)
        below = here
    return top


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """Outcome of :meth:`SparseMerkleTree.update`.

    ``node_writes`` maps node keys to new node values, ``None`` meaning "delete
    this node". Applying all of them to the store the update read from (in any
    order) yields exactly the node set of the new tree.
    """

    root: bytes
    node_writes: dict[bytes, bytes | None] = field(default_factory=dict)
    #: the node keys written (not deleted) where the tree had no node before the update:
    #: nothing is stored there, so a store may insert them without looking for a row
    created: frozenset[bytes] = frozenset()


class _LeafRef:
    """A single leaf summarising a subtree during an update.

    ``at`` is the node key where the leaf node is currently stored unchanged, or
    ``None`` if it must be written wherever it ends up.
    """

    __slots__ = ("at", "hash", "kh", "vh")

    def __init__(self, kh: bytes, vh: bytes, h: bytes, at: bytes | None) -> None:
        self.kh = kh
        self.vh = vh
        self.hash = h
        self.at = at


#: Summary of an updated subtree: ``None`` empty, ``bytes`` internal-node hash, or a leaf.
_Summary = bytes | _LeafRef | None


def _build(
    khs: list[bytes],
    vhs: Sequence[bytes | None],
    lo: int,
    hi: int,
    depth: int,
    writes: dict[bytes, bytes | None] | None,
) -> bytes:
    """Hash of the internal node over ``hi - lo >= 2`` sorted puts sharing ``depth`` nibbles.

    When ``writes`` is given, the nodes of the subtree (the internal node at the
    position and everything below it) are recorded there.
    """
    children = [EMPTY_HASH] * 16
    bitmap = 0
    leafmap = 0
    for nib, i, j in _split(khs, lo, hi, depth):
        bitmap |= 1 << nib
        if j - i == 1:
            kh = khs[i]
            vh = vhs[i]
            assert vh is not None
            leaf = _LEAF_TAG + kh + vh
            children[nib] = _sha256(leaf).digest()
            leafmap |= 1 << nib
            if writes is not None:
                writes[node_key(kh, depth + 1)] = leaf
        else:
            children[nib] = _build(khs, vhs, i, j, depth + 1, writes)
    if writes is not None:
        nk = node_key(khs[lo], depth)
        raw = writes[nk] = _encode_internal(children, bitmap, leafmap)
        _remember(nk, _Internal(children, bitmap, leafmap, raw))
    return _sha256(_INTERNAL_TAG + b"".join(children)).digest()


def _prepare(items: Mapping[bytes, bytes | None]) -> tuple[list[bytes], list[bytes | None]]:
    """Hash keys and values; return key hashes sorted, with the matching value hashes."""
    sha = _sha256
    pairs = [(sha(k).digest(), None if v is None else sha(v).digest()) for k, v in items.items()]
    pairs.sort()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def compute_root(items: Mapping[bytes, bytes]) -> bytes:
    """State root of the full key-value set ``items``, computed from scratch.

    Agrees with :meth:`SparseMerkleTree.root` of a tree holding exactly ``items``.
    """
    khs, vhs = _prepare(items)
    n = len(khs)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        vh = vhs[0]
        assert vh is not None
        return leaf_hash(khs[0], vh)
    return _build(khs, vhs, 0, n, 0, None)


class SparseMerkleTree:
    """The authenticated state map over a :class:`NodeStore` (see the module doc).

    The tree object keeps no state besides the store: after persisting an
    update's ``node_writes``, the same object (or a new one) sees the new tree.
    """

    __slots__ = ("_loaded", "_store")

    def __init__(self, store: NodeStore) -> None:
        self._store = store
        #: during :meth:`update`, the node keys where a node was read (present before it)
        self._loaded: set[bytes] | None = None

    @property
    def store(self) -> NodeStore:
        return self._store

    def _load(self, nk: bytes) -> tuple[bytes, bytes] | _Internal | None:
        raw = self._store.get_node(nk)
        if raw is None:
            return None
        if self._loaded is not None:
            self._loaded.add(nk)
        return _decoded_node(raw, nk)

    def _load_child(self, nk: bytes) -> tuple[bytes, bytes] | _Internal:
        raw = self._store.get_node(nk)
        if raw is None:
            raise IntegrityError("state tree node is missing", node_key=nk.hex())
        if self._loaded is not None:
            self._loaded.add(nk)
        return _decoded_node(raw, nk)

    def root(self) -> bytes:
        """The current state root (``EMPTY_ROOT`` for an empty store)."""
        node = self._load(_ROOT_KEY)
        return EMPTY_ROOT if node is None else _hash_of(node)

    # -- update ----------------------------------------------------------------

    def update(self, changes: Mapping[bytes, bytes | None]) -> UpdateResult:
        """Apply ``changes`` (state key -> new value, ``None`` = delete) virtually.

        Returns the new root and the node writes to persist; the store is not
        modified. Deleting an absent key is a no-op.
        """
        writes: dict[bytes, bytes | None] = {}
        if not changes:
            return UpdateResult(self.root(), writes)
        khs, vhs = _prepare(changes)
        # Every position that holds a node and is written is read first (the walk
        # reaches a node only through its parent's bitmap, and reads it), so a written
        # position that was never read held nothing: ``created``.
        loaded = self._loaded = set()
        try:
            summary = self._update_at(
                0, _ROOT_KEY, self._load(_ROOT_KEY), None, khs, vhs, 0, len(khs), writes
            )
        finally:
            self._loaded = None
        if summary is None:
            root = EMPTY_ROOT
        elif isinstance(summary, bytes):
            root = summary
        else:
            _place(summary, _ROOT_KEY, writes)
            root = summary.hash
        created = frozenset(nk for nk, v in writes.items() if v is not None and nk not in loaded)
        return UpdateResult(root, writes, created)

    def _update_at(
        self,
        depth: int,
        pos: bytes,
        existing: tuple[bytes, bytes] | _Internal | None,
        existing_hash: bytes | None,
        khs: list[bytes],
        vhs: list[bytes | None],
        lo: int,
        hi: int,
        writes: dict[bytes, bytes | None],
    ) -> _Summary:
        """Update the subtree at ``pos`` (depth ``depth``) with changes ``[lo, hi)``.

        Contract: if the result is an internal hash, the internal node at ``pos``
        is written; if it is empty or a leaf, ``pos`` has been cleared (unless the
        leaf is unchanged there, ``at == pos``) and the caller places the leaf.
        """
        if isinstance(existing, _Internal):
            return self._update_internal(depth, pos, existing, khs, vhs, lo, hi, writes)
        # Empty slot or single leaf: merge it with the changes into a sorted put list.
        if existing is None:
            if hi - lo == 1:
                vh = vhs[lo]
                if vh is None:
                    return None
                kh = khs[lo]
                return _LeafRef(kh, vh, leaf_hash(kh, vh), None)
            new_khs = [khs[i] for i in range(lo, hi) if vhs[i] is not None]
            new_vhs: list[bytes | None] = [vhs[i] for i in range(lo, hi) if vhs[i] is not None]
        else:
            kh0, vh0 = existing
            k = bisect_left(khs, kh0, lo, hi)
            if k < hi and khs[k] == kh0:
                if hi - lo == 1:
                    vh = vhs[lo]
                    if vh == vh0:
                        return _LeafRef(kh0, vh0, existing_hash or leaf_hash(kh0, vh0), pos)
                    writes[pos] = None
                    if vh is None:
                        return None
                    return _LeafRef(kh0, vh, leaf_hash(kh0, vh), None)
                new_khs = [khs[i] for i in range(lo, hi) if vhs[i] is not None]
                new_vhs = [vhs[i] for i in range(lo, hi) if vhs[i] is not None]
            else:
                new_khs = [khs[i] for i in range(lo, k) if vhs[i] is not None]
                new_vhs = [vhs[i] for i in range(lo, k) if vhs[i] is not None]
                new_khs.append(kh0)
                new_vhs.append(vh0)
                new_khs.extend(khs[i] for i in range(k, hi) if vhs[i] is not None)
                new_vhs.extend(vhs[i] for i in range(k, hi) if vhs[i] is not None)
            if len(new_khs) == 1 and new_khs[0] == kh0 and new_vhs[0] == vh0:
                return _LeafRef(kh0, vh0, existing_hash or leaf_hash(kh0, vh0), pos)
        n = len(new_khs)
        if n >= 2:
            # Overwrites whatever was at pos with the new internal node.
            return _build(new_khs, new_vhs, 0, n, depth, writes)
        if existing is not None:
            writes[pos] = None
        if n == 0:
            return None
        vh = new_vhs[0]
        assert vh is not None
        return _LeafRef(new_khs[0], vh, leaf_hash(new_khs[0], vh), None)

    def _update_internal(
        self,
        depth: int,
        pos: bytes,
        node: _Internal,
        khs: list[bytes],
        vhs: list[bytes | None],
        lo: int,
        hi: int,
        writes: dict[bytes, bytes | None],
    ) -> _Summary:
        children = node.children[:]
        bitmap = node.bitmap
        leafmap = node.leafmap
        placed: list[tuple[int, bytes, _LeafRef]] = []
        child_depth = depth + 1
        update_at = self._update_at
        for nib, i, j in _split(khs, lo, hi, depth):
            child_pos = _child_key(pos, depth, nib)
            bit = 1 << nib
            if bitmap & bit:
                summary = update_at(
                    child_depth,
                    child_pos,
                    self._load_child(child_pos),
                    children[nib],
                    khs,
                    vhs,
                    i,
                    j,
                    writes,
                )
            else:
                summary = update_at(child_depth, child_pos, None, None, khs, vhs, i, j, writes)
            if summary is None:
                children[nib] = EMPTY_HASH
                bitmap &= ~bit
                leafmap &= ~bit
            elif isinstance(summary, bytes):
                children[nib] = summary
                bitmap |= bit
                leafmap &= ~bit
            else:
                children[nib] = summary.hash
                bitmap |= bit
                leafmap |= bit
                placed.append((nib, child_pos, summary))
        if not bitmap:
            writes[pos] = None
            return None
        if leafmap and bitmap == leafmap and bitmap.bit_count() == 1:
            # A single leaf is left: collapse, the caller places it higher up.
            writes[pos] = None
            nib = leafmap.bit_length() - 1
            for pnib, _, leaf in placed:
                if pnib == nib:
                    return leaf
            # The leaf was untouched: it moves up from its current position.
            child_pos = _child_key(pos, depth, nib)
            loaded = self._load_child(child_pos)
            if isinstance(loaded, _Internal):
                raise IntegrityError("state tree leafmap is wrong", node_key=pos.hex())
            return _LeafRef(loaded[0], loaded[1], children[nib], child_pos)
        for _, child_pos, leaf in placed:
            _place(leaf, child_pos, writes)
        raw = _encode_internal(children, bitmap, leafmap)
        if raw != node.raw:
            writes[pos] = raw
            _remember(pos, _Internal(children, bitmap, leafmap, raw))
        return _sha256(_INTERNAL_TAG + b"".join(children)).digest()

    # -- proofs ----------------------------------------------------------------

    def prove(self, key: bytes) -> StateProof:
        """Membership or non-membership proof of ``key`` against :meth:`root`."""
        kh = key_hash(key)
        node = self._load(_ROOT_KEY)
        siblings: list[tuple[bytes, ...]] = []
        depth = 0
        while isinstance(node, _Internal):
            nib = _nibble(kh, depth)
            row = node.children[:]
            child = row[nib]
            row[nib] = EMPTY_HASH
            siblings.append(tuple(row))
            if child == EMPTY_HASH:
                return StateProof(tuple(siblings), None)
            depth += 1
            node = self._load_child(node_key(kh, depth))
        if node is None:
            return StateProof((), None)
        return StateProof(tuple(siblings), (node[0], node[1]))


def _place(leaf: _LeafRef, target: bytes, writes: dict[bytes, bytes | None]) -> None:
    """Store ``leaf`` at node key ``target``, removing it from its old position."""
    at = leaf.at
    if at == target:
        return
    writes[target] = _LEAF_TAG + leaf.kh + leaf.vh
    if at is not None:
        writes[at] = None


# -- proofs ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateProof:
    """Proof that a key has a given value, or is absent, under a state root.

    ``siblings[d]`` holds the 16 child hashes of the internal node at depth ``d``
    on the key's path, with the path's own slot replaced by ``EMPTY_HASH``.
    ``leaf`` is ``(kh', SHA-256(value'))`` of the leaf ending the path, or
    ``None`` if the path ends in an empty slot (or the tree is empty).
    """

    siblings: tuple[tuple[bytes, ...], ...]
    leaf: tuple[bytes, bytes] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: per level a 16-bit ``bitmap`` of non-empty siblings
        (bit ``n`` = slot ``n``) and their hex ``hashes`` in slot order."""
        levels = []
        for row in self.siblings:
            bitmap = 0
            hashes = []
            for n, h in enumerate(row):
                if h != EMPTY_HASH:
                    bitmap |= 1 << n
                    hashes.append(h.hex())
            levels.append({"bitmap": bitmap, "hashes": hashes})
        leaf = None
        if self.leaf is not None:
            leaf = {"key_hash": self.leaf[0].hex(), "value_hash": self.leaf[1].hex()}
        return {"siblings": levels, "leaf": leaf}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StateProof:
        """Parse :meth:`to_dict` output; raises :class:`ProofError` if malformed."""
        try:
            levels = data["siblings"]
            if not isinstance(levels, list) or len(levels) > MAX_DEPTH:
                raise ProofError("state proof: bad siblings")
            siblings = []
            for level in levels:
                bitmap = level["bitmap"]
                hashes = level["hashes"]
                if (
                    not isinstance(bitmap, int)
                    or isinstance(bitmap, bool)
                    or not 0 <= bitmap < 1 << 16
                    or not isinstance(hashes, list)
                    or len(hashes) != bitmap.bit_count()
                ):
                    raise ProofError("state proof: bad sibling level")
                row = [EMPTY_HASH] * 16
                it = iter(hashes)
                for n in range(16):
                    if bitmap >> n & 1:
                        h = _unhex(next(it))
                        if h == EMPTY_HASH:
                            raise ProofError("state proof: non-canonical sibling")
                        row[n] = h
                siblings.append(tuple(row))
            leaf_data = data["leaf"]
            leaf = None
            if leaf_data is not None:
                leaf = (_unhex(leaf_data["key_hash"]), _unhex(leaf_data["value_hash"]))
        except ProofError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProofError(f"state proof: malformed ({exc.__class__.__name__})") from exc
        return cls(tuple(siblings), leaf)


def _unhex(value: object) -> bytes:
    if not isinstance(value, str):
        raise ProofError("state proof: hash must be a hex string")
    raw = bytes.fromhex(value)
    if len(raw) != HASH_SIZE:
        raise ProofError("state proof: hash must be 32 bytes")
    return raw


def verify_state_proof(root: bytes, key: bytes, value: bytes | None, proof: StateProof) -> None:
    """Check that under ``root``, ``key`` maps to ``value`` (``None``: is absent).

    Pure; raises :class:`ProofError` unless the proof establishes exactly that.
    """
    if not isinstance(proof, StateProof):
        raise ProofError("not a state proof")
    siblings = proof.siblings
    depth = len(siblings)
    if depth > MAX_DEPTH:
        raise ProofError("state proof is too deep")
    kh = key_hash(key)
    leaf = proof.leaf
    if leaf is None:
        if value is not None:
            raise ProofError("state proof shows the key is absent")
        h = EMPTY_HASH
    else:
        lkh, lvh = leaf
        if (
            not isinstance(lkh, bytes)
            or not isinstance(lvh, bytes)
            or len(lkh) != HASH_SIZE
            or len(lvh) != HASH_SIZE
        ):
            raise ProofError("state proof leaf is malformed")
        if value is None:
            if lkh == kh:
                raise ProofError("state proof shows the key is present")
        elif lkh != kh:
            raise ProofError("state proof is for another key")
        elif lvh != _sha256(value).digest():
            raise ProofError("state proof is for another value")
        # The leaf must lie on the key's path down to where the path ends.
        for d in range(depth):
            if _nibble(lkh, d) != _nibble(kh, d):
                raise ProofError("state proof leaf is not on the key's path")
        h = leaf_hash(lkh, lvh)
    for row in siblings:
        if not isinstance(row, tuple) or len(row) != 16:
            raise ProofError("state proof level must have 16 entries")
        for c in row:
            if not isinstance(c, bytes) or len(c) != HASH_SIZE:
                raise ProofError("state proof sibling is malformed")
    if depth and siblings[-1].count(EMPTY_HASH) == 16:
        # A node with nothing beside the path would have been compressed away.
        raise ProofError("state proof is not canonical")
    for d in range(depth - 1, -1, -1):
        row = siblings[d]
        nib = _nibble(kh, d)
        if row[nib] != EMPTY_HASH:
            raise ProofError("state proof level has a value in the path slot")
        children = list(row)
        children[nib] = h
        h = _sha256(_INTERNAL_TAG + b"".join(children)).digest()
    if h != root:
        raise ProofError("state proof does not match the state root")
