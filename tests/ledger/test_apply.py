"""The validation checklist and block building, exercised through a real Node."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from medledger.contracts.core import k_key, k_seq
from medledger.encoding import decode, encode
from medledger.errors import (
    BadTransactionSignature,
    MalformedTransaction,
    OutOfOrderSequence,
    ReplayedTransaction,
    StaleTransaction,
    TransactionRejected,
    UnknownSigner,
    UnknownTransactionType,
    WrongNetwork,
)
from medledger.ledger.checkpoint import verify_checkpoint
from medledger.ledger.note import NoteVerifier
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import verify_ledger
from medledger.merkle.hasher import leaf_hash
from medledger.merkle.verify import verify_consistency, verify_inclusion
from medledger.node import Node, Receipt

from .conftest import BLOCK_TIME, Keys, TxFactory, new_node, seeded_key

Snapshot = dict[str, Any]


async def snapshot(node: Node) -> Snapshot:
    """Everything a rejected transaction must leave untouched."""

    def _snap() -> Snapshot:
        st = node.store
        return {
            "head": st.head_height(),
            "log_size": node.head.log_size,
            "txs": [(r.index, r.tx_id) for r in st.iter_txs()],
            "blocks": [(b.height, b.header, b.sig) for b in st.iter_blocks()],
            "state": list(st.iter_state()),
            "smt": list(st.iter_nodes()),
            "tree": list(st.iter_tree_nodes()),
            "checkpoints": list(st.iter_checkpoints()),
        }

    return await node._run(_snap)


async def state_obj(node: Node, key: bytes) -> Any:
    raw = await node.state_get(key)
    assert raw is not None, key
    return decode(raw)


async def verify(node: Node) -> None:
    report = await node._run(lambda: verify_ledger(node.store))
    assert report.ok, report.failure


async def rejected_without_change(
    node: Node, tx: Transaction | bytes, error: type[TransactionRejected]
) -> TransactionRejected:
    before = await snapshot(node)
    with pytest.raises(error) as info:
        await node.submit(tx)
    assert type(info.value) is error
    after = await snapshot(node)
    assert after == before
    return info.value


def resign_raw(tx: Transaction, **changes: Any) -> bytes:
    """``tx`` with fields changed but the original signature kept (canonical bytes)."""
    env = decode(tx.raw)
    env.update(changes)
    return encode(env)


# -- the checklist, one rejection at a time --------------------------------------------------


async def test_valid_anchor_is_committed(node: Node, anchors: TxFactory) -> None:
    tx = anchors.anchor()
    receipt = await node.submit(tx)
    assert receipt == Receipt(tx.tx_id, 0, 1)
    rec = await node.get_tx(tx.tx_id)
    assert (rec.index, rec.height, rec.raw) == (0, 1, tx.raw)
    assert await state_obj(node, k_seq(anchors.key.key_id)) == 1
    anchor = await state_obj(node, b"anchor/" + tx.payload["digest"].hex().encode())
    assert anchor["tx"] == tx.tx_id
    await verify(node)


async def test_unknown_type(node: Node, anchors: TxFactory) -> None:
    await node.submit(anchors.anchor())
    tx = anchors.tx("no.such.type", {"x": 1})
    await rejected_without_change(node, tx, UnknownTransactionType)


async def test_bad_signature(node: Node, anchors: TxFactory) -> None:
    await node.submit(anchors.anchor())
    good = anchors.anchor()
    bad = resign_raw(good, sig=bytes([good.sig[0] ^ 1]) + good.sig[1:])
    await rejected_without_change(node, bad, BadTransactionSignature)
    # a signature from another transaction of the same key
    other = anchors.anchor(seq=good.seq)
    await rejected_without_change(node, resign_raw(good, sig=other.sig), BadTransactionSignature)
    # the genuine one still goes through with that seq
    assert (await node.submit(good)).index == 1


async def test_malformed_bytes(node: Node, anchors: TxFactory) -> None:
    before = await snapshot(node)
    with pytest.raises(MalformedTransaction):
        await node.submit(anchors.anchor().raw[:-1])
    assert await snapshot(node) == before


async def test_wrong_network(node: Node, anchors: TxFactory) -> None:
    await node.submit(anchors.anchor())
    tx = anchors.anchor(network="some-other-network")
    await rejected_without_change(node, tx, WrongNetwork)


async def test_replay_same_bytes(node: Node, anchors: TxFactory) -> None:
    tx = anchors.anchor()
    await node.submit(tx)
    await rejected_without_change(node, tx, ReplayedTransaction)
    await rejected_without_change(node, tx.raw, ReplayedTransaction)


async def test_replay_same_seq_other_content(node: Node, anchors: TxFactory) -> None:
    first = anchors.anchor()
    await node.submit(first)
    second = anchors.anchor(seq=first.seq)
    assert second.tx_id != first.tx_id
    err = await rejected_without_change(node, second, ReplayedTransaction)
    assert "sequence" in str(err)
    # and an older seq too
    await node.submit(anchors.anchor())
    await rejected_without_change(node, anchors.anchor(seq=1), ReplayedTransaction)


async def test_seq_gap(node: Node, anchors: TxFactory) -> None:
    await node.submit(anchors.anchor())
    await rejected_without_change(node, anchors.anchor(seq=3), OutOfOrderSequence)
    await rejected_without_change(node, anchors.anchor(seq=10**6), OutOfOrderSequence)
    assert (await node.submit(anchors.anchor(seq=2))).index == 1


async def test_unregistered_key(node: Node) -> None:
    stranger = TxFactory(seeded_key("stranger"))
    await rejected_without_change(node, stranger.anchor(), UnknownSigner)


async def test_first_seq_of_a_key_must_be_1(node: Node, anchors: TxFactory) -> None:
    await rejected_without_change(node, anchors.anchor(seq=2), OutOfOrderSequence)
    assert (await node.submit(anchors.anchor(seq=1))).index == 0


async def test_key_id_of_registered_key_with_other_pub_is_rejected(
    node: Node, anchors: TxFactory
) -> None:
    # an envelope cannot claim a registered key id with another public key (signer = kid(pub))
    stranger = seeded_key("impostor")
    tx = TxFactory(stranger).anchor()
    with pytest.raises(MalformedTransaction):
        await node.submit(resign_raw(tx, signer=anchors.key.key_id))


@pytest.mark.parametrize("offset_ms", [10 * 60 * 1000 + 1, -(10 * 60 * 1000 + 1), 10**9])
async def test_stale_time(node: Node, anchors: TxFactory, offset_ms: int) -> None:
    await node.submit(anchors.anchor())
    tx = anchors.anchor(time=BLOCK_TIME + offset_ms)
    await rejected_without_change(node, tx, StaleTransaction)


@pytest.mark.parametrize("offset_ms", [10 * 60 * 1000, -(10 * 60 * 1000)])
async def test_time_at_the_edge_of_the_window_is_accepted(
    node: Node, anchors: TxFactory, offset_ms: int
) -> None:
    await node.submit(anchors.anchor(time=BLOCK_TIME + offset_ms))


async def test_node_signer_may_anchor(node: Node, keys: Keys) -> None:
    tx = TxFactory(keys.node).anchor()
    assert (await node.submit(tx)).index == 0
    await verify(node)


# -- key rotation ---------------------------------------------------------------------------


async def test_key_rotation(node: Node, anchors: TxFactory, keys: Keys) -> None:
    before_rotation = anchors.anchor()
    await node.submit(before_rotation)  # the old key signs before the rotation
    new_key = seeded_key("admin-rotated")
    rot = anchors.rotate(new_key)
    r = await node.submit(rot)
    rot_height = r.height

    old_rec = await state_obj(node, k_key(keys.admin.key_id))
    new_rec = await state_obj(node, k_key(new_key.key_id))
    assert old_rec["until"] is not None and old_rec["until"] <= rot_height + 1
    assert new_rec["pub"] == new_key.public.raw
    assert new_rec["principal"] == old_rec["principal"]
    receipt = decode((await node.get_tx(rot.tx_id)).receipt)
    assert receipt["events"][0]["event"] == "key.rotated"

    # after: the old key signs nothing, whatever its seq
    await rejected_without_change(node, anchors.anchor(), UnknownSigner)
    # the new key starts its own sequence at 1
    new = TxFactory(new_key)
    assert (await node.submit(new.anchor())).height > rot_height
    await node.submit(new.anchor())
    # rotating to an already registered key is refused (the new key rotates back to the old)
    with pytest.raises(TransactionRejected):
        await node.submit(new.rotate(keys.admin))
    # old transactions still verify, and so does the whole ledger
    rec = await node.get_tx(before_rotation.tx_id)
    Transaction.from_bytes(rec.raw).verify_signature()
    await verify(node)


async def test_old_key_signs_nothing_after_rotation_in_the_same_block(
    node: Node, anchors: TxFactory
) -> None:
    rot = anchors.rotate(seeded_key("admin-rotated-2"))
    after = anchors.anchor()
    results = await node.commit_batch([rot, after])
    assert isinstance(results[0], Receipt)
    assert isinstance(results[1], UnknownSigner)


# -- batches --------------------------------------------------------------------------------


async def test_batch_with_rejections_commits_the_others(node: Node, anchors: TxFactory) -> None:
    a1 = anchors.anchor()
    unknown = anchors.tx("no.such.type", {}, seq=2)  # rejected: seq 2 stays free
    a2 = anchors.anchor(seq=2)
    replay = a1
    gap = anchors.anchor(seq=9)
    stranger = TxFactory(seeded_key("stranger")).anchor()
    a3 = anchors.anchor(seq=3)
    stale = anchors.anchor(seq=4, time=BLOCK_TIME + 10**9)
    batch = [a1, unknown, a2, replay, gap, stranger, a3, stale]
    results = await node.commit_batch(batch)
    kinds = [type(r) for r in results]
    assert kinds == [
        Receipt,
        UnknownTransactionType,
        Receipt,
        ReplayedTransaction,
        OutOfOrderSequence,
        UnknownSigner,
        Receipt,
        StaleTransaction,
    ]
    receipts = [r for r in results if isinstance(r, Receipt)]
    assert [r.index for r in receipts] == [0, 1, 2]
    assert {r.height for r in receipts} == {1}
    assert node.head.count == 3 and node.head.log_size == 3
    for r, tx in zip(receipts, [a1, a2, a3], strict=True):
        assert r.tx_id == tx.tx_id
        assert (await node.get_tx(tx.tx_id)).index == r.index
    await verify(node)


async def test_same_object_submitted_twice_in_one_batch(node: Node, anchors: TxFactory) -> None:
    """One submission is committed and acknowledged, the other is a replay."""
    tx = anchors.anchor()
    results = await node.commit_batch([tx, tx])
    assert results[0] == Receipt(tx.tx_id, 0, 1)
    assert isinstance(results[1], ReplayedTransaction)
    tx2 = anchors.anchor()
    got = await asyncio.gather(node.submit(tx2), node.submit(tx2), return_exceptions=True)
    assert got[0] == Receipt(tx2.tx_id, 1, 2)
    assert isinstance(got[1], ReplayedTransaction)
    await verify(node)


async def test_batch_of_only_rejections_writes_no_block(node: Node, anchors: TxFactory) -> None:
    before = await snapshot(node)
    results = await node.commit_batch([anchors.anchor(seq=5), anchors.anchor(seq=6)])
    assert all(isinstance(r, OutOfOrderSequence) for r in results)
    assert await snapshot(node) == before


async def test_concurrent_submissions_with_some_rejected(node: Node, anchors: TxFactory) -> None:
    good = [anchors.anchor() for _ in range(40)]
    bad = [anchors.tx("no.such.type", {"i": i}, seq=1000 + i) for i in range(10)]
    results = await asyncio.gather(*(node.submit(t) for t in good + bad), return_exceptions=True)
    assert all(isinstance(r, Receipt) for r in results[:40])
    assert all(isinstance(r, UnknownTransactionType) for r in results[40:])
    indexes = [r.index for r in results[:40] if isinstance(r, Receipt)]
    assert indexes == list(range(40))  # submission order is log order
    await verify(node)


# -- receipts, proofs and checkpoints -------------------------------------------------------


async def _build_ledger(node: Node, anchors: TxFactory, sizes: list[int]) -> list[Receipt]:
    receipts: list[Receipt] = []
    for n in sizes:
        batch = [anchors.anchor() for _ in range(n)]
        results = await node.commit_batch(batch)
        assert all(isinstance(r, Receipt) for r in results)
        receipts.extend(r for r in results if isinstance(r, Receipt))
    return receipts


async def test_receipts_inclusion_and_consistency(node: Node, anchors: TxFactory) -> None:
    sizes = [1, 2, 3, 5, 8, 1, 13, 7]
    receipts = await _build_ledger(node, anchors, sizes)
    total = sum(sizes)
    assert [r.index for r in receipts] == list(range(total))
    assert [r.height for r in receipts] == [h + 1 for h, n in enumerate(sizes) for _ in range(n)]

    verifiers = [NoteVerifier.from_verifier_key(vk) for vk in node.verifier_keys()]
    for r in receipts:
        rec = await node.get_tx(r.tx_id)
        assert (rec.index, rec.height) == (r.index, r.height)
        proof = await node.inclusion_proof(r.tx_id)
        cp = verify_checkpoint(proof.checkpoint, verifiers, origin=node.origin)
        assert cp.size == proof.tree_size == total
        assert proof.leaf_index == r.index
        assert proof.leaf_hash == leaf_hash(rec.raw)
        verify_inclusion(proof.leaf_index, proof.tree_size, proof.leaf_hash, proof.proof, cp.root)
        assert cp.root == node.head.log_root

    checkpoints = await node._run(lambda: list(node.store.iter_checkpoints()))
    assert [h for h, _ in checkpoints] == list(range(1, len(sizes) + 1))
    cps = [verify_checkpoint(note, verifiers, origin=node.origin) for _, note in checkpoints]
    assert [cp.size for cp in cps] == list(itertools.accumulate(sizes))
    for (h, _), cp in zip(checkpoints, cps, strict=True):
        header, _sig = await node.get_block(h)
        ref = cp.block_info()
        assert ref is not None and ref.height == h and ref.block_hash == header.hash
        assert cp.root == header.log_root and ref.state_root == header.state_root
    for a, b in itertools.combinations_with_replacement(cps, 2):
        root1, root2, cproof = await node.consistency_proof(a.size, b.size)
        assert (root1, root2) == (a.root, b.root)
        verify_consistency(a.size, b.size, cproof, a.root, b.root)
    await verify(node)


async def test_checkpoint_of_genesis_is_signed(node: Node) -> None:
    verifiers = [NoteVerifier.from_verifier_key(vk) for vk in node.verifier_keys()]
    cp = verify_checkpoint(await node.checkpoint(), verifiers, origin=node.origin)
    assert cp.size == 0
    ref = cp.block_info()
    assert ref is not None and ref.height == 0


# -- determinism ----------------------------------------------------------------------------


async def test_two_nodes_derive_identical_blocks(
    tmp_path: Path, genesis: dict[str, Any], keys: Keys
) -> None:
    factory = TxFactory(keys.admin)
    rotated = seeded_key("admin-rotated")
    batches = [
        [factory.anchor() for _ in range(3)],
        [factory.anchor(), factory.tx("no.such.type", {}, seq=99)],
        [factory.rotate(rotated)],
        [TxFactory(rotated).anchor(), factory.anchor()],  # the second is rejected
        [factory.anchor(seq=1)],  # all rejected: no block
    ]
    nodes = [await new_node(tmp_path / f"n{i}.db", genesis, keys) for i in range(2)]
    try:
        outcomes = []
        for n in nodes:
            results = []
            for batch in batches:
                results.append([type(r).__name__ for r in await n.commit_batch(batch)])
            outcomes.append(results)
        assert outcomes[0] == outcomes[1]
        blocks = [await n._run(lambda n=n: list(n.store.iter_blocks())) for n in nodes]  # type: ignore[misc]
        assert len(blocks[0]) == 5  # genesis + 4
        assert [b.header for b in blocks[0]] == [b.header for b in blocks[1]]
        assert [b.sig for b in blocks[0]] == [b.sig for b in blocks[1]]
        states = [await n._run(lambda n=n: list(n.store.iter_state())) for n in nodes]  # type: ignore[misc]
        assert states[0] == states[1]
        for n in nodes:
            await verify(n)
    finally:
        for n in nodes:
            await n.close()
