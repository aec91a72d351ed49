"""Micro-benchmark of the state tree (not a test: prints, asserts nothing).

Measures, in one run:

* the ceiling: raw ``hashlib.sha256(x).digest()`` calls per second on 32-byte inputs;
* ``compute_root`` and the initial bulk load of a tree of ``--size`` keys;
* batched updates of ``--batch`` keys (half overwrites of existing keys, a quarter
  inserts, a quarter deletes) into that tree: ``SparseMerkleTree.update`` alone, and
  update + applying ``node_writes`` to a ``MemoryNodeStore``; keys per second and
  the ratio to the raw hash rate.

Run: ``.venv/bin/python bench/bench_state.py [--size 100000] [--batch 1000] [--rounds 20]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import time

from medledger.state import MemoryNodeStore, SparseMerkleTree, compute_root


def raw_hash_rate(n: int = 1_000_000) -> float:
    data = os.urandom(32)
    sha = hashlib.sha256
    t0 = time.perf_counter()
    for _ in range(n):
        sha(data).digest()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    rng = random.Random(42)
    ceiling = raw_hash_rate()
    print(f"raw hashlib.sha256 (32-byte input): {ceiling:,.0f} hashes/s")

    items = {f"key/{i:08d}".encode(): os.urandom(64) for i in range(args.size)}
    t0 = time.perf_counter()
    root = compute_root(items)
    dt = time.perf_counter() - t0
    print(f"compute_root({args.size:,} keys): {dt:.3f} s ({args.size / dt:,.0f} keys/s)")

    store = MemoryNodeStore()
    tree = SparseMerkleTree(store)
    t0 = time.perf_counter()
    result = tree.update(items)
    store.apply(result.node_writes)
    dt = time.perf_counter() - t0
    assert result.root == root
    print(f"bulk load ({args.size:,} keys): {dt:.3f} s, {len(store):,} nodes")

    keys = list(items)
    next_id = args.size
    t_update = 0.0
    t_apply = 0.0
    writes = 0
    for _ in range(args.rounds):
        batch: dict[bytes, bytes | None] = {}
        quarter = args.batch // 4
        for k in rng.sample(keys, args.batch - 2 * quarter):
            batch[k] = os.urandom(64)
        for k in rng.sample(keys, quarter):
            batch[k] = None
        for _ in range(quarter):
            batch[f"key/{next_id:08d}".encode()] = os.urandom(64)
            next_id += 1
        t0 = time.perf_counter()
        result = tree.update(batch)
        t1 = time.perf_counter()
        store.apply(result.node_writes)
        t2 = time.perf_counter()
        t_update += t1 - t0
        t_apply += t2 - t1
        writes += len(result.node_writes)
        for k, v in batch.items():
            if v is None:
                items.pop(k, None)
            else:
                items[k] = v
        keys = list(items)
    n = args.rounds * args.batch
    rate = n / t_update
    rate_all = n / (t_update + t_apply)
    print(
        f"update: {args.rounds} batches x {args.batch} keys into ~{args.size:,} keys: "
        f"{rate:,.0f} keys/s ({1e6 / rate:.1f} us/key), "
        f"{writes / args.rounds:,.0f} node writes/batch"
    )
    print(f"update + apply to MemoryNodeStore: {rate_all:,.0f} keys/s")
    print(f"ratio raw hashes/s : keys/s = {ceiling / rate:.1f} (hash-call equivalents per key)")
    t0 = time.perf_counter()
    check = compute_root(items)
    print(
        f"final root matches compute_root: {check == tree.root()} "
        f"({time.perf_counter() - t0:.3f} s)"
    )


if __name__ == "__main__":
    main()
