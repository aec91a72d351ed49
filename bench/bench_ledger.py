"""Benchmark of the ledger core (not a test: prints a table, asserts nothing).

Measures, in one run:

(a) committed transactions per second on an embedded node: a fresh durable SQLite store
    (WAL, ``synchronous=FULL``), ``--txs`` pre-signed ``note.anchor`` transactions
    submitted concurrently (all at once; the embedded orderer batches them into blocks
    of up to 2000), timed from the first submit to the last receipt;
(b) the ceiling: single-core Ed25519 verifications per second exactly as the node
    verifies (``medledger.crypto.signing``, libsodium) on a message of the size of a
    transaction's signing bytes, and
    the ratio (a) / (b) (every committed transaction costs at least one verification);
(c) inclusion-proof build time (reading the perfect-subtree nodes from SQLite, exactly
    as ``Node.inclusion_proof`` does) and verify time, in a tree of ``--leaves`` leaves.
    That tree lives in a bench-only SQLite store: the leaf hashes (``leaf_hash`` of
    SHA-256(i)) are appended to a ``CompactRange`` and every node it completes is written
    with one ``SqliteStore.commit_block`` (a placeholder block record, no transactions,
    state or checkpoint), i.e. the same ``tree`` table layout a real node writes, without
    signing or applying a million transactions;
(d) ``verify_ledger`` throughput (transactions per second) on the ledger from (a).

Run: ``.venv/bin/python bench/bench_ledger.py [--quick]`` (``--quick``: 2,000 txs and
10^5 leaves instead of 20,000 and 10^6).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from medledger.crypto.signing import SigningKey
from medledger.ledger.tx import Transaction, make_tx
from medledger.ledger.verify import verify_ledger
from medledger.merkle.compact import CompactRange
from medledger.merkle.hasher import leaf_hash
from medledger.merkle.proof import inclusion_nodes
from medledger.merkle.verify import verify_inclusion
from medledger.node import Node
from medledger.store.base import BlockRecord
from medledger.store.sqlite import SqliteStore

NETWORK = "medledger-bench"
ORG = "bench-org"


def _genesis(node_key: SigningKey, admin: SigningKey) -> dict[str, object]:
    return {
        "network": NETWORK,
        "time": int(time.time() * 1000),
        "orgs": [
            {
                "id": ORG,
                "name": "Bench Hospital",
                "node_key": node_key.public.raw,
                "enc_key": os.urandom(32),
            }
        ],
        "admins": [{"id": "bench-admin", "org": ORG, "key": admin.public.raw}],
    }


def _presign(admin: SigningKey, n: int, now: int | None = None) -> list[Transaction]:
    """``n`` ``note.anchor`` transactions of ``admin``, seq 1..n, at ``now`` (ms; the clock
    by default)."""
    now = int(time.time() * 1000) if now is None else now
    return [
        make_tx(
            admin,
            NETWORK,
            "note.anchor",
            {"digest": hashlib.sha256(b"bench/%d" % i).digest(), "kind": "document"},
            seq=i + 1,
            time=now,
        )
        for i in range(n)
    ]


async def bench_commit(db: Path, n: int) -> dict[str, float]:
    node_key, admin = SigningKey.generate(), SigningKey.generate()
    t0 = time.perf_counter()
    txs = _presign(admin, n)
    sign_s = time.perf_counter() - t0
    node = await Node.create(f"sqlite:///{db}", _genesis(node_key, admin), [(ORG, node_key)])
    await node.start()
    try:
        t0 = time.perf_counter()
        receipts = await asyncio.gather(*(node.submit(tx) for tx in txs))
        commit_s = time.perf_counter() - t0
        blocks = node.head.height
    finally:
        await node.close()
    assert len(receipts) == n
    return {"tx_s": n / commit_s, "seconds": commit_s, "blocks": blocks, "sign_s": sign_s}


def bench_ed25519(seconds: float = 1.0, msg_len: int = 180) -> float:
    # verified exactly as the node verifies transactions (medledger.crypto.signing)
    key = SigningKey.generate()
    pub = key.public
    msg = os.urandom(msg_len)
    sig = key.sign(msg)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(200):
            pub.verify(sig, msg)
        n += 200
        if time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - t0)


def build_tree_store(db: Path, leaves: int) -> tuple[SqliteStore, bytes, float, float]:
    """A bench-only store holding the RFC 9162 tree nodes of ``leaves`` leaves."""
    t0 = time.perf_counter()
    compact = CompactRange()
    nodes: list[tuple[tuple[int, int], bytes]] = []
    sha = hashlib.sha256
    for i in range(leaves):
        nodes.extend(compact.append(leaf_hash(sha(i.to_bytes(8, "big")).digest())))
    hash_s = time.perf_counter() - t0
    store = SqliteStore(db)
    t0 = time.perf_counter()
    store.commit_block(BlockRecord(0, b"bench", b"bench"), [], nodes, {}, {})
    write_s = time.perf_counter() - t0
    return store, compact.root(), hash_s, write_s


def bench_proofs(store: SqliteStore, root: bytes, leaves: int, samples: int) -> dict[str, float]:
    rng = random.Random(1)
    build: list[float] = []
    check: list[float] = []
    sizes: list[int] = []
    sha = hashlib.sha256
    for _ in range(samples):
        index = rng.randrange(leaves)
        t0 = time.perf_counter()
        nodes = inclusion_nodes(index, leaves)
        proof = nodes.rehash(store.get_tree_nodes(nodes.ids))
        t1 = time.perf_counter()
        verify_inclusion(
            index, leaves, leaf_hash(sha(index.to_bytes(8, "big")).digest()), proof, root
        )
        t2 = time.perf_counter()
        build.append(t1 - t0)
        check.append(t2 - t1)
        sizes.append(len(proof))
    return {
        "build_us": statistics.median(build) * 1e6,
        "build_p99_us": sorted(build)[int(0.99 * (len(build) - 1))] * 1e6,
        "verify_us": statistics.median(check) * 1e6,
        "hashes": statistics.mean(sizes),
    }


def bench_verify(db: Path) -> dict[str, float]:
    store = SqliteStore(db)
    try:
        t0 = time.perf_counter()
        report = verify_ledger(store)
        dt = time.perf_counter() - t0
    finally:
        store.close()
    assert report.ok, report.failure
    return {"tx_s": report.transactions / dt, "seconds": dt, "txs": report.transactions}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k txs, 10^5 leaves")
    parser.add_argument("--txs", type=int, default=None)
    parser.add_argument("--leaves", type=int, default=None)
    parser.add_argument("--samples", type=int, default=2000, help="inclusion proofs to time")
    parser.add_argument(
        "--dir", type=Path, default=None, help="keep the stores here (default: a tmp dir, removed)"
    )
    args = parser.parse_args()
    n_txs = args.txs or (2_000 if args.quick else 20_000)
    n_leaves = args.leaves or (100_000 if args.quick else 1_000_000)

    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="medledger-bench-") as tmp:
            run(Path(tmp), n_txs, n_leaves, args.samples)
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        run(args.dir, n_txs, n_leaves, args.samples)


def run(work: Path, n_txs: int, n_leaves: int, samples: int) -> None:
    print(f"work directory: {work}  (cpus: {os.cpu_count()})")

    print(f"(a) committing {n_txs:,} pre-signed note.anchor txs on an embedded node ...")
    commit = asyncio.run(bench_commit(work / "ledger.db", n_txs))
    print("(b) Ed25519 verify ceiling (single core, as the node verifies) ...")
    ceiling = bench_ed25519()
    print(f"(c) building a {n_leaves:,}-leaf tree in a bench-only SQLite store ...")
    store, root, hash_s, write_s = build_tree_store(work / "tree.db", n_leaves)
    try:
        proofs = bench_proofs(store, root, n_leaves, samples)
    finally:
        store.close()
    print("(d) verify_ledger on the ledger from (a) ...")
    ver = bench_verify(work / "ledger.db")

    rows = [
        ("(a) committed tx/s (durable sqlite, embedded orderer)", f"{commit['tx_s']:,.0f}"),
        ("    txs / blocks / wall time", f"{n_txs:,} / {commit['blocks']:,.0f} / "
         f"{commit['seconds']:.2f} s"),
        ("    (pre-signing, not timed above)", f"{n_txs / commit['sign_s']:,.0f} tx/s"),
        ("(b) Ed25519 verifications/s, one core (ceiling)", f"{ceiling:,.0f}"),
        ("    ratio committed / ceiling", f"{commit['tx_s'] / ceiling:.1%}"),
        (f"(c) tree of {n_leaves:,} leaves: hashing / sqlite write",
         f"{hash_s:.2f} s / {write_s:.2f} s"),
        ("    inclusion proof build (median / p99)",
         f"{proofs['build_us']:,.0f} us / {proofs['build_p99_us']:,.0f} us"),
        ("    inclusion proof verify (median)", f"{proofs['verify_us']:,.1f} us"),
        ("    proof length (hashes, mean)", f"{proofs['hashes']:.1f}"),
        ("(d) verify_ledger throughput", f"{ver['tx_s']:,.0f} tx/s "
         f"({ver['txs']:,.0f} txs in {ver['seconds']:.2f} s)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print()
    print(f"{'measure':<{width}}  result")
    print(f"{'-' * width}  {'-' * 30}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
