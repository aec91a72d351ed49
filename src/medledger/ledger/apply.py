"""Apply-and-commit: the state transition of a transaction and of a block.

Validating one transaction is this checklist, in order; the first failure
rejects the transaction with the named error and leaves state untouched:

1. It parses as a canonical envelope ............................ MalformedTransaction
2. It names this network ........................................ WrongNetwork
3. Its type is handled by a contract active at this height ...... UnknownTransactionType
4. Its id is not already in the log ............................. ReplayedTransaction
5. Its signature verifies with the public key it carries ........ BadTransactionSignature
6. Its key is registered, current, of an active principal ....... UnknownSigner / Unauthorized
7. Its sequence number is exactly the signer's last + 1 ......... ReplayedTransaction /
                                                                   OutOfOrderSequence
8. Its time is within the policy's skew of the block time ....... StaleTransaction
9. The contract handler accepts it .............................. ContractError subclasses

Then the signer's sequence number and the handler's writes go into the block's
state overlay. A block is the list of accepted transactions; its header commits
to the log (RFC 9162 root), the world state (sparse Merkle root) and the
previous block. Everything here is a pure function of the previous committed
state and the ordered input: no clock, no randomness, no I/O beyond reads of the
previous state, so every node derives byte-identical blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from medledger.contracts.base import Effects, Env, Registry, get_obj
from medledger.contracts.core import SIGNER_STATE, check_signer, k_seq
from medledger.encoding import encode
from medledger.errors import (
    OutOfOrderSequence,
    ReplayedTransaction,
    StaleTransaction,
    TransactionRejected,
)
from medledger.ledger.block import ZERO_HASH, BlockHeader
from medledger.ledger.tx import Transaction
from medledger.merkle.compact import CompactRange
from medledger.merkle.hasher import leaf_hash
from medledger.state.base import StateReader
from medledger.state.overlay import Overlay
from medledger.state.smt import NodeStore, SparseMerkleTree

__all__ = ["BlockResult", "ChainReader", "Rejection", "apply_tx", "build_block"]

#: The receipt of a transaction that emits no event (most do not): encoded once.
_NO_EVENTS = encode({"events": []})

#: signer key id -> (its public key, the principal record step 6 returned)
SignerMemo = dict[bytes, tuple[bytes, Mapping[str, Any]]]


class ChainReader(StateReader, NodeStore, Protocol):
    """What building a block needs to read from the previous committed state."""

    def has_tx(self, tx_id: bytes) -> bool: ...
    def known_txs(self, tx_ids: Sequence[bytes]) -> set[bytes]:
        """The ids among ``tx_ids`` already in the log."""
        ...


@dataclass(frozen=True, slots=True)
class Rejection:
    tx: Transaction
    error: TransactionRejected
    position: int = -1  # index of the transaction in the input sequence of build_block


@dataclass(slots=True)
class BlockResult:
    """Everything a store must write, atomically, to commit one block."""

    header: BlockHeader
    txs: list[Transaction]
    receipts: list[bytes]  # canonical CBOR {"events": [...]} per accepted tx
    tree_nodes: list[tuple[tuple[int, int], bytes]]
    state_changes: dict[bytes, bytes | None]
    smt_writes: dict[bytes, bytes | None]
    rejected: list[Rejection] = field(default_factory=list)
    #: the keys of ``smt_writes`` where the state tree held no node before the block
    smt_created: frozenset[bytes] = frozenset()


def apply_tx(
    state: Overlay,
    tx: Transaction,
    *,
    height: int,
    block_time: int,
    registry: Registry,
    config: Mapping[str, Any],
    seen: Callable[[bytes], bool],
    signature_checked: bool = False,
    signers: SignerMemo | None = None,
) -> Effects:
    """Run the checklist above for one transaction and write its effects to ``state``.

    On any rejection, ``state`` is unchanged (the caller's savepoint is rolled back).
    ``signers``, when given, holds step 6's outcome for signers already checked on
    this same ``state`` (and height); it is emptied whenever a transaction writes
    state that step 6 reads.
    """
    sp = state.savepoint()
    try:
        tx.check_network(config["network"])
        handler = registry.handler(tx.type, height)
        if seen(tx.tx_id):
            raise ReplayedTransaction(f"transaction {tx.tx_id.hex()} is already on the ledger")
        if not signature_checked:
            tx.verify_signature()
        hit = signers.get(tx.signer) if signers is not None else None
        if hit is not None and hit[0] == tx.pub:
            principal = hit[1]
        else:
            principal = check_signer(state, tx, height)
            if signers is not None:
                signers[tx.signer] = (tx.pub, principal)
        seq_key = k_seq(tx.signer)
        last = get_obj(state, seq_key) or 0
        if tx.seq <= last:
            raise ReplayedTransaction(
                f"sequence {tx.seq} of key {tx.signer.hex()} was already used (last {last})"
            )
        if tx.seq != last + 1:
            raise OutOfOrderSequence(
                f"sequence {tx.seq} of key {tx.signer.hex()} skips ahead (expected {last + 1})"
            )
        skew = int(config["policy"]["max_tx_skew_ms"])
        if abs(tx.time - block_time) > skew:
            raise StaleTransaction(
                f"transaction time {tx.time} is more than {skew} ms from block time {block_time}"
            )
        env = Env(
            network=tx.network,
            height=height,
            time=block_time,
            tx_id=tx.tx_id,
            signer=tx.signer,
            principal=principal,
            config=config,
        )
        fx = handler(state, tx, env)
        # a block remembers each signer's check until a transaction writes state that
        # step 6 reads (see build_block)
        if signers and any(key.startswith(SIGNER_STATE) for key in fx.writes):
            signers.clear()  # keys, principals or organisations change: check anew
        state.put(seq_key, encode(tx.seq))
        for key, value in fx.writes.items():
            if value is None:
                state.delete(key)
            else:
                state.put(key, value)
    except BaseException:  # a rejection, or a bug: either way leave no trace
        state.rollback(sp)
        raise
    state.release(sp)
    return fx


def build_block(
    prev: ChainReader,
    prev_header: BlockHeader,
    compact: CompactRange,
    txs: Sequence[Transaction],
    *,
    block_time: int,
    proposer: bytes,
    registry: Registry,
    config: Mapping[str, Any],
    signatures_checked: bool = False,
) -> BlockResult:
    """Apply ``txs`` in order on top of ``prev`` and derive the next block.

    ``compact`` is the log's compact range at ``prev_header.log_size``; it is
    advanced in place (callers pass a copy if the block may be discarded).
    Rejected transactions are left out and listed in ``rejected``.
    """
    height = prev_header.height + 1
    block_time = max(block_time, prev_header.time)
    overlay = Overlay(prev)
    in_block: set[bytes] = set()
    # step 6 reads the same few records for every transaction of a signer: the block
    # checks each signer once, again only after a transaction writes such a record
    signers: SignerMemo = {}
    # the log does not change while the block is built: one lookup for the whole block
    on_ledger = prev.known_txs([tx.tx_id for tx in txs]) if txs else set()

    def seen(tx_id: bytes) -> bool:
        return tx_id in in_block or tx_id in on_ledger

    accepted: list[Transaction] = []
    receipts: list[bytes] = []
    rejected: list[Rejection] = []
    for position, tx in enumerate(txs):
        try:
            fx = apply_tx(
                overlay,
                tx,
                height=height,
                block_time=block_time,
                registry=registry,
                config=config,
                seen=seen,
                signature_checked=signatures_checked,
                signers=signers,
            )
        except TransactionRejected as exc:
            rejected.append(Rejection(tx, exc, position))
            continue
        in_block.add(tx.tx_id)
        accepted.append(tx)
        receipts.append(encode({"events": fx.events}) if fx.events else _NO_EVENTS)

    tree_nodes: list[tuple[tuple[int, int], bytes]] = []
    for tx in accepted:
        tree_nodes.extend(compact.append(leaf_hash(tx.raw)))
    changes = overlay.changes()
    update = SparseMerkleTree(prev).update(changes)
    header = BlockHeader(
        network=prev_header.network,
        height=height,
        prev=prev_header.hash,
        first=prev_header.log_size,
        count=len(accepted),
        log_size=compact.size,
        log_root=compact.root(),
        state_root=update.root,
        time=block_time,
        proposer=proposer,
    )
    return BlockResult(
        header=header,
        txs=accepted,
        receipts=receipts,
        tree_nodes=tree_nodes,
        state_changes=changes,
        smt_writes=dict(update.node_writes),
        rejected=rejected,
        smt_created=update.created,
    )


def genesis_header(
    network: str, genesis_hash: bytes, state_root: bytes, time: int, empty_root: bytes
) -> BlockHeader:
    return BlockHeader(
        network=network,
        height=0,
        prev=ZERO_HASH,
        first=0,
        count=0,
        log_size=0,
        log_root=empty_root,
        state_root=state_root,
        time=time,
        proposer=b"",
        genesis=genesis_hash,
    )
