"""The healthcare contracts through real nodes on SQLite stores.

* **Determinism**: a ledger of ~3000 mixed transactions built on node A is
  replayed block by block (same transactions, same block times) on a fresh
  node B: state root, log root and header bytes agree at every height, and the
  whole stored state is identical; ``verify_ledger`` accepts A.
* **Tamper evidence**: flipping one bit in any stored state row (a sample
  across every key prefix) makes ``verify_ledger`` fail.
* **Rejections end to end**: a forged consent, a suspended practitioner, a
  practitioner of a removed organisation, a replayed transaction and an
  explosive CEL rule are all refused by the node and leave the head and every
  state row unchanged.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medledger.errors import ReplayedTransaction, RuleError, TransactionRejected, Unauthorized
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import verify_ledger
from medledger.node import Node, Receipt
from medledger.store import open_store
from medledger.workload import KINDS, Workload

#: every kind of the workload, access decisions dominating
FULL_MIX = {kind: 1.0 for kind in KINDS} | {"access": 6.0}
CHUNK_MS = 60_000  # block time step between chunks (well inside max_tx_skew_ms)


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


async def _commit(node: Node, txs: Sequence[Transaction]) -> list[Receipt]:
    """Enqueue ``txs`` in order and wait for all of them; every one must be accepted."""
    futures = [node.enqueue(tx) for tx in txs]
    results = await asyncio.gather(*futures, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    return [r for r in results if isinstance(r, Receipt)]


@dataclass
class Built:
    path: Path
    workload: Workload
    txs: int


async def _build(path: Path, seed: int, n: int, chunk: int) -> Built:
    wl = Workload(seed, orgs=3, patients_per_org=15)
    node = await Node.create(_url(path), wl.genesis, signers=wl.signers)
    node.clock = lambda: wl.time
    await node.start()
    try:
        count = len(await _commit(node, wl.setup_txs()))
        for _ in range(0, n, chunk):
            wl.time += CHUNK_MS
            count += len(await _commit(node, wl.mixed(chunk, mix=FULL_MIX)))
    finally:
        await node.close()
    return Built(path, wl, count)


@pytest.fixture(scope="module")
def big_ledger(tmp_path_factory: pytest.TempPathFactory) -> Built:
    path = tmp_path_factory.mktemp("big") / "a.db"
    return asyncio.run(_build(path, seed=2024, n=3000, chunk=250))


@pytest.fixture(scope="module")
def small_ledger(tmp_path_factory: pytest.TempPathFactory) -> Built:
    path = tmp_path_factory.mktemp("small") / "a.db"
    return asyncio.run(_build(path, seed=7, n=300, chunk=100))


# -- (a) determinism ---------------------------------------------------------------------


async def test_replay_on_fresh_node_is_identical_at_every_height(
    big_ledger: Built, tmp_path: Path
) -> None:
    wl = big_ledger.workload
    a = await Node.open(_url(big_ledger.path), signers=[])
    b = await Node.create(_url(tmp_path / "b.db"), wl.genesis, signers=wl.signers)
    try:
        assert a.head.height >= 10 and a.head.log_size == big_ledger.txs >= 3000
        header0, _ = await a.get_block(0)
        assert b.head.to_bytes() == header0.to_bytes()
        block_time = 0
        b.clock = lambda: block_time
        await b.start()
        for height in range(1, a.head.height + 1):
            header, sig = await a.get_block(height)
            records = await a.list_txs(header.first, header.count)
            assert [r.height for r in records] == [height] * header.count
            block_time = header.time
            await _commit(b, [Transaction.from_bytes(r.raw) for r in records])
            got, got_sig = await b.get_block(height)
            assert b.head.height == height
            assert got.state_root == header.state_root, height
            assert got.log_root == header.log_root, height
            assert got.to_bytes() == header.to_bytes(), height
            assert got_sig == sig  # Ed25519 is deterministic: same key, same header
        assert await b.state_scan(b"") == await a.state_scan(b"")
        assert await b.checkpoint() == await a.checkpoint()
    finally:
        await a.close()
        await b.close()
    store = open_store(_url(big_ledger.path))
    try:
        report = verify_ledger(store)
    finally:
        store.close()
    assert report.ok, report.failure
    assert report.transactions == big_ledger.txs


# -- (b) tampering with any state row ------------------------------------------------------

PREFIXES = (
    b"cfg/",
    b"org/",
    b"principal/",
    b"key/",
    b"seq/",
    b"patient/",
    b"record/",
    b"recver/",
    b"patrec/",
    b"consent/",
    b"consent-id/",
    b"audit/",
    b"audit-req/",
    b"bg/",
    b"review/",
    b"referral/",
)


def _sample_rows(path: Path) -> list[tuple[bytes, bytes]]:
    """~20 rows: one per prefix, plus a second row of the busiest prefixes."""
    db = sqlite3.connect(path)
    try:
        rows: list[tuple[bytes, bytes]] = []
        for prefix in PREFIXES:
            found = db.execute(
                "SELECT k, v FROM state WHERE substr(k, 1, ?) = ? ORDER BY k",
                (len(prefix), prefix),
            ).fetchall()
            assert found, f"the workload wrote no {prefix!r} row"
            picks = [found[len(found) // 2]]
            if prefix in (b"consent/", b"audit/", b"principal/", b"seq/"):
                picks.append(found[-1])
            rows.extend((bytes(k), bytes(v)) for k, v in picks)
        return rows
    finally:
        db.close()


def _flip_bit(value: bytes, i: int) -> bytes:
    pos = (i * 7919) % len(value)
    return value[:pos] + bytes([value[pos] ^ (1 << (i % 8))]) + value[pos + 1 :]


def test_flipping_one_bit_in_any_state_row_fails_verification(
    small_ledger: Built, tmp_path: Path
) -> None:
    clean = open_store(_url(small_ledger.path))
    try:
        assert verify_ledger(clean).ok
    finally:
        clean.close()
    rows = _sample_rows(small_ledger.path)
    assert len(rows) >= 20
    for i, (key, value) in enumerate(rows):
        copy = tmp_path / f"tampered-{i}.db"
        shutil.copyfile(small_ledger.path, copy)
        db = sqlite3.connect(copy)
        try:
            changed = db.execute("UPDATE state SET v=? WHERE k=?", (_flip_bit(value, i), key))
            assert changed.rowcount == 1
            db.commit()
        finally:
            db.close()
        store = open_store(_url(copy))
        try:
            report = verify_ledger(store)
        finally:
            store.close()
        assert not report.ok, f"verify accepted a flipped bit in {key!r}"
        assert report.failure is not None


# -- (c) rejections through a node ---------------------------------------------------------


async def _snapshot(node: Node) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    return node.head.to_bytes(), await node.state_scan(b"")


async def _started(path: Path, *, seed: int, patients: int) -> tuple[Workload, Node]:
    """A workload's three-organisation network on a fresh embedded node, started, with
    the workload's setup committed."""
    wl = Workload(seed, orgs=3, patients_per_org=patients)
    node = await Node.create(_url(path), wl.genesis, signers=wl.signers)
    node.clock = lambda: wl.time
    await node.start()
    try:
        await _commit(node, wl.setup_txs())
    except BaseException:
        await node.close()
        raise
    return wl, node


async def _rejected(node: Node, tx: Transaction, exc: type[TransactionRejected]) -> str:
    before = await _snapshot(node)
    with pytest.raises(exc) as info:
        await node.submit(tx)
    assert await _snapshot(node) == before
    return str(info.value)


async def test_a_signer_suspended_or_removed_within_a_block_signs_nothing_after(
    tmp_path: Path,
) -> None:
    # A block checks each signer once and remembers it (apply.build_block) until a
    # transaction writes keys, principals or organisations: then every signer is
    # checked anew, so what a block changes binds the transactions after it in the
    # same block exactly as in the next one.
    wl, node = await _started(tmp_path / "m.db", seed=98, patients=2)
    try:
        org1, org3 = wl.org_ids[0], wl.org_ids[2]
        doctor, other = f"phys-1-{org1}", f"phys-1-{org3}"

        def note(n: int) -> dict[str, Any]:
            return {"digest": bytes([n]) * 32, "kind": "document"}

        async def refused_after(who: str, n: int, change: Callable[[], Transaction]) -> object:
            """One block: ``who`` signs, ``change()`` commits, ``who`` signs again: the
            third transaction's outcome (the workload applies each as it is signed)."""
            first = wl.tx(who, "note.anchor", note(n))
            middle = change()
            then = wl.forge(who, "note.anchor", note(n + 1))
            results = await node.commit_batch([first, middle, then])
            assert isinstance(results[0], Receipt) and isinstance(results[1], Receipt)
            return results[2]

        # the doctor signs, is suspended, signs again (refused); is reinstated, signs
        refused = await refused_after(
            doctor, 1, lambda: wl.tx(f"admin-{org1}", "principal.suspend", {"id": doctor})
        )
        assert isinstance(refused, Unauthorized), refused
        block = [
            wl.tx(f"admin-{org1}", "principal.reinstate", {"id": doctor}),
            wl.tx(doctor, "note.anchor", note(3)),
        ]
        assert all(isinstance(r, Receipt) for r in await node.commit_batch(block))

        # one block: org-3's practitioner signs, org-3 is removed by majority, it signs again
        await node.submit(
            wl.tx(f"node:{org1}", "org.propose", {"action": "remove", "org": {"id": org3}})
        )
        proposal = (await node.list_txs(node.head.log_size - 1, 1))[0].tx_id.hex()
        refused = await refused_after(
            other, 4, lambda: wl.tx(f"admin-{wl.org_ids[1]}", "org.approve", {"proposal": proposal})
        )
        assert isinstance(refused, Unauthorized) and "removed" in str(refused)
    finally:
        await node.close()
    store = open_store(_url(tmp_path / "m.db"))
    try:
        report = verify_ledger(store)
        assert report.ok, report.failure
    finally:
        store.close()


async def test_rejections_change_nothing(tmp_path: Path) -> None:
    wl, node = await _started(tmp_path / "c.db", seed=99, patients=4)
    try:
        await _commit(node, wl.mixed(60))
        org1, org3 = wl.org_ids[0], wl.org_ids[2]
        patient = wl.patients[org1][0]
        doctor = f"phys-1-{org1}"

        # a consent signed by a practitioner instead of the patient
        forged: dict[str, Any] = {
            "consent": {"id": "cns-forged", "patient": patient, "provision": {"type": "permit"}}
        }
        await _rejected(node, wl.forge(doctor, "consent.grant", forged), Unauthorized)
        # the patient may; the same payload then goes through
        await node.submit(wl.tx(patient, "consent.grant", forged))

        # a replayed transaction: byte-identical, and a fresh one reusing a sequence number
        old = wl.tx(patient, "consent.revoke", {"id": "cns-forged"})
        await node.submit(old)
        await _rejected(node, old, ReplayedTransaction)
        wl.seqs[patient] -= 1
        reuse = wl.forge(patient, "note.anchor", {"digest": b"\x01" * 32})
        wl.seqs[patient] += 1
        await _rejected(node, reuse, ReplayedTransaction)

        # a CEL rule whose cost explodes
        rule = {
            "id": "rule-boom",
            "owner": patient,
            "expression": 'patient.orgs.map(x, x + x).map(y, y + y).exists(z, z == "")',
            "grantee": {"kind": "org", "id": wl.org_ids[1]},
        }
        await _rejected(node, wl.forge(patient, "rule.register", rule), RuleError)

        # a suspended practitioner
        await node.submit(wl.tx(f"admin-{org1}", "principal.suspend", {"id": doctor}))
        note = {"digest": b"\x02" * 32, "kind": "document"}
        await _rejected(node, wl.forge(doctor, "note.anchor", note), Unauthorized)

        # a practitioner of an organisation removed by majority
        await node.submit(
            wl.tx(f"node:{org1}", "org.propose", {"action": "remove", "org": {"id": org3}})
        )
        proposal = (await node.list_txs(node.head.log_size - 1, 1))[0].tx_id.hex()
        await node.submit(wl.tx(f"admin-{wl.org_ids[1]}", "org.approve", {"proposal": proposal}))
        assert (await node.state_get(f"org/{org3}".encode())) is not None
        record = {
            "record": "rec-after-removal",
            "patient": wl.patients[org3][0],
            "resource_type": "Observation",
            "commitment": b"\x03" * 32,
            "version": 1,
            "prev": None,
        }
        msg = await _rejected(
            node, wl.forge(f"phys-1-{org3}", "record.register", record), Unauthorized
        )
        assert "removed" in msg
    finally:
        await node.close()
    store = open_store(_url(tmp_path / "c.db"))
    try:
        assert verify_ledger(store).ok
    finally:
        store.close()
