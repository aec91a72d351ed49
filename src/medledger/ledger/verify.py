"""Full verification of a stored ledger, from genesis, trusting nothing stored.

``verify_ledger`` replays the whole chain in memory and checks, in order:

1. the genesis document is canonical and its hash and state root match block 0;
2. for every block: it parses; its height follows; ``prev`` is the hash of the
   previous header; the proposer is a registered node key; the stored block
   signature verifies with the node key of a member organisation (the proposer's
   on a single node; in a consortium each node signs the identical header it
   derived with its own key, see :mod:`medledger.orderer.etcd`);
3. for every transaction of the block: its stored index, block and id match
   its bytes (id = SHA-256 of them); its envelope and signature verify;
4. re-applying the block's transactions to the replayed state accepts every
   one of them and derives a header byte-identical to the stored one (so the
   log size and RFC 9162 root, the state root, the counts and time all match)
   and identical receipts;
5. after the last block: every stored state row, sparse-Merkle node and log
   tree node equals the replayed one (nothing missing, extra or altered);
6. every stored checkpoint is a signed note verified by the node keys of the
   member organisations, and matches the block it names.

The first failure is reported with the block height and, where there is one,
the transaction's log index and id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medledger.contracts import make_registry
from medledger.contracts.core import genesis_effects, k_key, k_org, k_principal, normalise_genesis
from medledger.crypto.signing import VerifyKey
from medledger.encoding import decode, encode
from medledger.errors import CheckpointError, IntegrityError, MedledgerError
from medledger.ledger.apply import build_block, genesis_header
from medledger.ledger.block import BlockHeader
from medledger.ledger.checkpoint import verify_checkpoint
from medledger.ledger.note import NoteVerifier
from medledger.ledger.tx import Transaction
from medledger.merkle.compact import CompactRange
from medledger.merkle.hasher import EMPTY_ROOT
from medledger.state.base import MemoryState
from medledger.state.smt import MemoryNodeStore, SparseMerkleTree, in_top
from medledger.store.base import LedgerStore

__all__ = ["VerifyFailure", "VerifyReport", "verify_ledger"]


@dataclass(frozen=True, slots=True)
class VerifyFailure:
    what: str
    message: str
    height: int | None = None
    index: int | None = None
    tx_id: str | None = None

    def __str__(self) -> str:
        where = []
        if self.height is not None:
            where.append(f"block {self.height}")
        if self.index is not None:
            where.append(f"tx #{self.index}")
        if self.tx_id is not None:
            where.append(f"id {self.tx_id}")
        return f"{', '.join(where) or self.what}: {self.message}"


@dataclass(slots=True)
class VerifyReport:
    blocks: int = 0
    transactions: int = 0
    checkpoints: int = 0
    failure: VerifyFailure | None = None
    head_hash: str = ""
    log_root: str = ""
    state_root: str = ""
    log_size: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "blocks": self.blocks,
            "transactions": self.transactions,
            "checkpoints": self.checkpoints,
            "log_size": self.log_size,
            "log_root": self.log_root,
            "state_root": self.state_root,
            "head_hash": self.head_hash,
        }
        if self.failure is not None:
            f = self.failure
            out["failure"] = {
                "what": f.what,
                "message": f.message,
                "height": f.height,
                "index": f.index,
                "tx_id": f.tx_id,
            }
        return out


class _Fail(Exception):
    def __init__(self, failure: VerifyFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


class _Replay:
    """In-memory chain state used for the replay (a ChainReader)."""

    def __init__(self) -> None:
        self.state = MemoryState()
        self.nodes = MemoryNodeStore()
        self.tx_ids: set[bytes] = set()

    def get(self, key: bytes) -> bytes | None:
        return self.state.get(key)

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        return self.state.scan(prefix, start=start, limit=limit)

    def get_node(self, node_key: bytes) -> bytes | None:
        return self.nodes.get_node(node_key)

    def has_tx(self, tx_id: bytes) -> bool:
        return tx_id in self.tx_ids

    def known_txs(self, tx_ids: Sequence[bytes]) -> set[bytes]:
        return {t for t in tx_ids if t in self.tx_ids}


def _fail(what: str, message: str, **where: Any) -> _Fail:
    return _Fail(VerifyFailure(what, message, **where))


def verify_ledger(
    store: LedgerStore, *, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Verify everything in ``store``; never raises for corrupt data, reports it."""
    report = VerifyReport()
    try:
        _verify(store, report, progress)
    except _Fail as exc:
        report.failure = exc.failure
    except MedledgerError as exc:
        report.failure = VerifyFailure("store", f"{exc.code}: {exc}")
    return report


def _verify(
    store: LedgerStore, report: VerifyReport, progress: Callable[[int, int], None] | None
) -> None:
    raw_genesis = store.get_meta("genesis")
    if raw_genesis is None:
        raise _fail("genesis", "no genesis document in the store")
    try:
        genesis = decode(raw_genesis)
        if normalise_genesis(genesis) != genesis:
            raise _fail("genesis", "stored genesis document is not in normal form")
    except MedledgerError as exc:
        raise _fail("genesis", f"stored genesis document is invalid: {exc}") from exc

    replay = _Replay()
    fx = genesis_effects(genesis)
    upd = SparseMerkleTree(replay).update(fx.writes)
    replay.state.apply(fx.writes)
    replay.nodes.apply(upd.node_writes)
    expect0 = genesis_header(
        genesis["network"],
        hashlib.sha256(encode(genesis)).digest(),
        upd.root,
        genesis["time"],
        EMPTY_ROOT,
    )
    head = store.head_height()
    if head is None:
        raise _fail("blocks", "the store holds no blocks")
    rec0 = store.get_block(0)
    if rec0 is None:
        raise _fail("block", "genesis block is missing", height=0)
    if rec0.header != expect0.to_bytes():
        raise _fail("block", "genesis block header does not match the genesis document", height=0)
    config: dict[str, Any] = decode(replay.state.get(b"cfg/network") or encode({}))
    registry = make_registry(config)
    genesis_keys = [first_node_key(genesis)] + [o["node_key"] for o in genesis["orgs"][1:]]
    _check_block_sig(replay, expect0, rec0.sig, genesis_keys)

    prev = expect0
    compact = CompactRange()
    tree_nodes: dict[tuple[int, int], bytes] = {}
    headers = {0: expect0}
    report.blocks = 1
    for height in range(1, head + 1):
        rec = store.get_block(height)
        if rec is None:
            raise _fail("block", "block is missing", height=height)
        try:
            header = BlockHeader.from_bytes(rec.header)
        except IntegrityError as exc:
            raise _fail("block", str(exc), height=height) from exc
        if header.height != height:
            raise _fail("block", f"header says height {header.height}", height=height)
        if header.prev != prev.hash:
            raise _fail("block", "prev does not match the previous block's hash", height=height)
        if header.network != prev.network:
            raise _fail("block", "network id changed", height=height)
        if header.first != prev.log_size:
            raise _fail("block", "first index does not follow the previous block", height=height)
        pub = _proposer_pub(replay, header.proposer)
        if pub is None:
            raise _fail("block", "proposer key is not a registered node key", height=height)
        _check_block_sig(replay, header, rec.sig, [pub, *_member_node_keys(replay)])

        txs: list[Transaction] = []
        expected_receipts: list[bytes] = []
        records = list(store.iter_txs(header.first, header.first + header.count))
        if len(records) != header.count:
            raise _fail(
                "block",
                f"{header.count} transactions expected, {len(records)} stored",
                height=height,
            )
        for i, tr in enumerate(records):
            index = header.first + i
            where = {"height": height, "index": index, "tx_id": tr.tx_id.hex()}
            if tr.index != index or tr.height != height:
                raise _fail("tx", "stored position does not match the block", **where)
            if hashlib.sha256(tr.raw).digest() != tr.tx_id:
                raise _fail("tx", "transaction bytes do not hash to the stored id", **where)
            try:
                tx = Transaction.from_bytes(tr.raw)
                tx.verify_signature()
            except MedledgerError as exc:
                raise _fail("tx", f"{exc.code}: {exc}", **where) from exc
            txs.append(tx)
            expected_receipts.append(tr.receipt)

        result = build_block(
            replay,
            prev,
            compact,
            txs,
            block_time=header.time,
            proposer=header.proposer,
            registry=registry,
            config=config,
            signatures_checked=True,
        )
        if result.rejected:
            bad = result.rejected[0]
            index = header.first + bad.position
            raise _fail(
                "tx",
                f"re-applying the transaction fails: {bad.error.code}: {bad.error}",
                height=height,
                index=index,
                tx_id=bad.tx.tx_id.hex(),
            )
        if result.header.to_bytes() != rec.header:
            diff = [k for k, v in result.header.to_map().items() if header.to_map().get(k) != v]
            raise _fail(
                "block",
                f"re-derived header differs from the stored one in {', '.join(diff)}",
                height=height,
            )
        for i, (got, want) in enumerate(zip(result.receipts, expected_receipts, strict=True)):
            if got != want:
                raise _fail(
                    "tx",
                    "stored receipt differs from the re-derived one",
                    height=height,
                    index=header.first + i,
                    tx_id=txs[i].tx_id.hex(),
                )
        for node_id, h in result.tree_nodes:
            tree_nodes[node_id] = h
        replay.state.apply(result.state_changes)
        replay.nodes.apply(result.smt_writes)
        replay.tx_ids.update(tx.tx_id for tx in txs)
        headers[height] = result.header
        prev = result.header
        report.blocks += 1
        report.transactions += len(txs)
        if progress is not None:
            progress(height, head)

    # checked first: a truncated chain (last block deleted) shows up here, by index
    extra = store.get_tx_at(prev.log_size)
    if extra is not None:
        raise _fail("tx", "a transaction is stored beyond the last block", index=extra.index)
    _compare_rows("state row", store.iter_state(), replay.state.items())
    # the internal nodes of the state tree's top are not stored (state.smt: The top
    # of the tree); those a store may still hold from an earlier version are unused
    _compare_rows(
        "state tree node",
        ((k, v) for k, v in store.iter_nodes() if not in_top(k, v)),
        {k: v for k, v in replay.nodes.nodes.items() if not in_top(k, v)},
    )
    stored_tree = {(lv, ix): h for lv, ix, h in store.iter_tree_nodes()}
    if stored_tree != tree_nodes:
        wrong = sorted(
            k for k in set(stored_tree) | set(tree_nodes) if stored_tree.get(k) != tree_nodes.get(k)
        )
        raise _fail("log tree node", f"stored log tree node (level, index) {wrong[0]} is wrong")

    verifiers = _verifiers(replay.state, genesis["network"])
    origin = f"medledger/{genesis['network']}"
    for height, note in store.iter_checkpoints():
        try:
            cp = verify_checkpoint(note, verifiers, origin=origin)
        except CheckpointError as exc:
            raise _fail("checkpoint", f"checkpoint does not verify: {exc}", height=height) from exc
        ref = cp.block_info()
        hdr = headers.get(height)
        if ref is None or hdr is None or ref.height != height:
            raise _fail("checkpoint", "checkpoint names no stored block", height=height)
        if (
            ref.block_hash != hdr.hash
            or ref.state_root != hdr.state_root
            or cp.size != hdr.log_size
            or cp.root != hdr.log_root
        ):
            raise _fail("checkpoint", "checkpoint does not match its block", height=height)
        report.checkpoints += 1

    report.head_hash = prev.hash.hex()
    report.log_root = prev.log_root.hex()
    report.state_root = prev.state_root.hex()
    report.log_size = prev.log_size


def first_node_key(genesis: Mapping[str, Any]) -> bytes:
    key: bytes = genesis["orgs"][0]["node_key"]
    return key


def _proposer_pub(replay: _Replay, proposer: bytes) -> bytes | None:
    raw = replay.state.get(k_key(proposer))
    if raw is None:
        return None
    rec = decode(raw)
    principal = decode(replay.state.get(k_principal(rec["principal"])) or encode({}))
    if principal.get("kind") != "node":
        return None
    pub: bytes = rec["pub"]
    return pub


def _member_node_keys(replay: _Replay) -> list[bytes]:
    return [decode(raw)["node_key"] for _, raw in replay.state.scan(b"org/")]


def _check_block_sig(replay: _Replay, header: BlockHeader, sig: bytes, pubs: list[bytes]) -> None:
    """The block signature must verify with one of ``pubs`` (tried in order)."""
    error: IntegrityError | None = None
    for pub in dict.fromkeys(pubs):
        try:
            header.verify_signature(pub, sig)
            return
        except IntegrityError as exc:
            error = exc
    raise _fail("block", str(error or "no key to check the block signature"), height=header.height)


def _verifiers(state: MemoryState, network: str) -> list[NoteVerifier]:
    out = []
    for key, raw in state.scan(b"org/"):
        org = decode(raw)
        org_id = key[len(k_org("")) :].decode()
        out.append(NoteVerifier(f"{network}/{org_id}", VerifyKey(org["node_key"])))
    return out


def _compare_rows(
    what: str, stored: Iterator[tuple[bytes, bytes]], expected: Mapping[bytes, bytes]
) -> None:
    seen: set[bytes] = set()
    for key, value in stored:
        want = expected.get(key)
        if want is None:
            raise _fail(what, f"unexpected stored {what} {key[:48]!r}")
        if want != value:
            raise _fail(what, f"stored {what} {key[:48]!r} has been altered")
        seen.add(key)
    if len(seen) != len(expected):
        missing = next(k for k in expected if k not in seen)
        raise _fail(what, f"{what} {missing[:48]!r} is missing from the store")
