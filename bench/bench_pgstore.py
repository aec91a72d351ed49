"""Benchmark of the PostgreSQL ledger store beside SQLite (not a test: prints a table).

Measures, in one process, on the same pre-signed workload (``Workload`` default mix:
records, consents, access decisions; three organisations):

(a) committed transactions per second of an embedded node on a durable SQLite store
    (WAL, ``synchronous=FULL``) and on PostgreSQL (``synchronous_commit=on``), the
    transactions submitted in chunks of ``--chunk`` through the node's orderer
    (blocks of up to 2,000), timed from the first submit to the last receipt;
(b) the storage share of that: every ``commit_block`` call is timed (p50 / p99 / max
    per block, and rows written per second);
(c) the storage ceiling: the very same blocks (recorded in (a)) written again with
    ``commit_block`` into a fresh store, with nothing else going on;
(d) the CPU ceiling: single-core Ed25519 verifications per second (every committed
    transaction costs at least one);
(e) ``verify_ledger`` throughput on both ledgers.

Each backend runs ``--runs`` times, alternating, on fresh stores, and the best run is
shown (the machine may be shared). PostgreSQL: the server of ``MEDLEDGER_BENCH_PG``
(default ``postgresql://postgres@127.0.0.1:5432/test``); the bench creates its own
databases and drops them.

Run: ``.venv/bin/python bench/bench_pgstore.py [--quick]`` (``--quick``: 4,000 txs
instead of 20,000).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

import medledger.node
from medledger.crypto.signing import SigningKey
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import verify_ledger
from medledger.node import Node
from medledger.store import BlockRecord, LedgerStore, TxRecord, open_store
from medledger.store.base import BlockWrite
from medledger.workload import DEFAULT_MIX, Workload

ADMIN_URL = os.environ.get("MEDLEDGER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")

Commit = tuple[
    BlockRecord,
    Sequence[TxRecord],
    Sequence[tuple[tuple[int, int], bytes]],
    dict[bytes, bytes | None],
    dict[bytes, bytes | None],
    str | None,
]


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    name = f"mlbench_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(ADMIN_URL)
    url = (
        f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
        f"{params.get('port', '5432')}/{name}"
    )
    try:
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class Recording:
    """A store that times (and optionally keeps) every ``commit_block`` call."""

    def __init__(self, inner: LedgerStore, keep: bool) -> None:
        self._inner = inner
        self.keep = keep
        self.commits: list[Commit] = []
        self.seconds: list[float] = []
        self.rows: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def commit_block(
        self,
        block: BlockRecord,
        txs: Sequence[TxRecord],
        tree_nodes: Sequence[tuple[tuple[int, int], bytes]],
        state_changes: dict[bytes, bytes | None],
        smt_writes: dict[bytes, bytes | None],
        checkpoint: str | None = None,
        meta: Mapping[str, bytes] | None = None,
    ) -> None:
        t0 = time.perf_counter()
        self._inner.commit_block(
            block, txs, tree_nodes, state_changes, smt_writes, checkpoint, meta
        )
        self.seconds.append(time.perf_counter() - t0)
        self.rows.append(1 + len(txs) + len(tree_nodes) + len(state_changes) + len(smt_writes))
        if self.keep:
            self.commits.append(
                (
                    block,
                    list(txs),
                    list(tree_nodes),
                    dict(state_changes),
                    dict(smt_writes),
                    checkpoint,
                )
            )

    def commit_blocks(
        self, blocks: Sequence[BlockWrite], meta: Mapping[str, bytes] | None = None
    ) -> None:
        if len(blocks) == 1:  # what the node does for one block: recorded as above
            w = blocks[0]
            self.commit_block(
                w.block, w.txs, w.tree_nodes, w.state_changes, w.smt_writes, w.checkpoint, meta
            )
            return
        for w in blocks:  # a group (etcd orderer only): one block at a time here
            self.commit_block(
                w.block, w.txs, w.tree_nodes, w.state_changes, w.smt_writes, w.checkpoint, meta
            )


RECORDERS: list[Recording] = []


def _recording_open_store(url: str) -> LedgerStore:
    rec = Recording(open_store(url), keep=True)
    RECORDERS.append(rec)
    return rec


def make_workload(
    n: int, chunk: int
) -> tuple[Workload, list[Transaction], list[tuple[int, list[Transaction]]]]:
    wl = Workload("bench-pgstore", orgs=3, patients_per_org=100)
    setup = wl.setup_txs()
    batches = []
    for _ in range(0, n, chunk):
        wl.time += 60_000
        batches.append((wl.time, wl.mixed(chunk, mix=DEFAULT_MIX)))
    return wl, setup, batches


async def bench_node(
    url: str, wl: Workload, setup: list[Transaction], batches: list[tuple[int, list[Transaction]]]
) -> dict[str, Any]:
    # the node opens its store through this module attribute: record every commit
    setattr(medledger.node, "open_store", _recording_open_store)  # noqa: B010
    node = await Node.create(url, wl.genesis, wl.signers)
    rec = RECORDERS[-1]
    now = wl.genesis["time"] + 1_000
    node.clock = lambda: now
    await node.start(max_batch=2000)
    try:
        await asyncio.gather(*(node.enqueue(tx) for tx in setup))
        first = len(rec.seconds)
        n = 0
        t0 = time.perf_counter()
        for block_time, txs in batches:
            now = block_time
            await asyncio.gather(*(node.enqueue(tx) for tx in txs))
            n += len(txs)
        elapsed = time.perf_counter() - t0
        height = node.head.height
    finally:
        await node.close()
        setattr(medledger.node, "open_store", open_store)  # noqa: B010
    secs = sorted(rec.seconds[first:])
    return {
        "tx_s": n / elapsed,
        "seconds": elapsed,
        "height": height,
        "store_s": sum(secs),
        "p50_ms": statistics.median(secs) * 1000,
        "p99_ms": secs[math.ceil(0.99 * len(secs)) - 1] * 1000,  # nearest rank
        "max_ms": secs[-1] * 1000,
        "rows_s": sum(rec.rows[first:]) / sum(secs),
        "commits": rec.commits,
        "txs": n,
    }


def bench_replay(url: str, commits: list[Commit]) -> dict[str, float]:
    """Write the recorded blocks again into a fresh store: storage alone."""
    store = open_store(url)
    try:
        txs = 0
        t0 = time.perf_counter()
        for block, btxs, tree, state, smt, cp in commits:
            store.commit_block(block, btxs, tree, state, smt, cp)
            txs += len(btxs)
        elapsed = time.perf_counter() - t0
    finally:
        store.close()
    return {"tx_s": txs / elapsed, "seconds": elapsed}


def bench_verify(url: str) -> dict[str, float]:
    store = open_store(url)
    try:
        t0 = time.perf_counter()
        report = verify_ledger(store)
        dt = time.perf_counter() - t0
    finally:
        store.close()
    assert report.ok, report.failure
    return {"tx_s": report.transactions / dt, "seconds": dt}


def bench_ed25519(seconds: float = 1.0, msg_len: int = 180) -> float:
    # verified exactly as the node verifies transactions (medledger.crypto.signing)
    key = SigningKey.generate()
    pub = key.public
    msg = os.urandom(msg_len)
    sig = key.sign(msg)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(200):
            pub.verify(sig, msg)
        n += 200
    return n / (time.perf_counter() - t0)


def run_backend(backend: str, tmp: Path, run: int, n: int, chunk: int) -> dict[str, Any]:
    """(a), (b), (c) and (e) for one backend, on fresh stores."""
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp / f'ledger-{run}.db'}"
            replay_url = f"sqlite:///{tmp / f'replay-{run}.db'}"
        else:
            url = stack.enter_context(pg_database())
            replay_url = stack.enter_context(pg_database())
        wl, setup, batches = make_workload(n, chunk)  # identical for both backends
        print(f"  run {run + 1}: committing on {backend} ...")
        res = asyncio.run(bench_node(url, wl, setup, batches))
        res["replay"] = bench_replay(replay_url, res.pop("commits"))
        res["verify"] = bench_verify(url)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4,000 txs instead of 20,000")
    parser.add_argument("--txs", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=2000, help="txs submitted per chunk")
    parser.add_argument(
        "--runs", type=int, default=2, help="alternating runs per backend; the best is shown"
    )
    args = parser.parse_args()
    n = args.txs or (4_000 if args.quick else 20_000)

    print(f"cpus: {os.cpu_count()}; {n:,} workload txs per run, {args.runs} runs per backend")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="medledger-bench-") as tmp:
        for run in range(args.runs):
            for backend in ("sqlite", "postgresql"):
                res = run_backend(backend, Path(tmp), run, n, args.chunk)
                if backend not in results or res["tx_s"] > results[backend]["tx_s"]:
                    results[backend] = res
    print("(d) Ed25519 verify ceiling (one core) ...")
    ceiling = bench_ed25519()

    s, p = results["sqlite"], results["postgresql"]

    def both(fmt: Callable[[dict[str, Any]], str]) -> tuple[str, str]:
        return fmt(s), fmt(p)

    rows = [
        ("(a) committed tx/s, embedded node", *both(lambda r: f"{r['tx_s']:,.0f}")),
        ("    txs / head height / wall time",
         *both(lambda r: f"{r['txs']:,} / {r['height']} / {r['seconds']:.1f} s")),
        ("(b) commit_block share of wall time",
         *both(lambda r: f"{r['store_s'] / r['seconds']:.0%}")),
        ("    commit_block per block p50 / p99 / max",
         *both(lambda r: f"{r['p50_ms']:,.0f} / {r['p99_ms']:,.0f} / {r['max_ms']:,.0f} ms")),
        ("    rows written per second in commit_block", *both(lambda r: f"{r['rows_s']:,.0f}")),
        ("(c) storage ceiling: same blocks replayed, tx/s",
         *both(lambda r: f"{r['replay']['tx_s']:,.0f}")),
        ("(d) CPU ceiling: Ed25519 verifications/s", f"{ceiling:,.0f}", f"{ceiling:,.0f}"),
        ("    ratio committed / Ed25519 ceiling", *both(lambda r: f"{r['tx_s'] / ceiling:.1%}")),
        ("(e) verify_ledger tx/s", *both(lambda r: f"{r['verify']['tx_s']:,.0f}")),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'measure':<{width}}  {'sqlite':>26}  {'postgresql':>26}")
    print(f"{'-' * width}  {'-' * 26}  {'-' * 26}")
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>26}  {b:>26}")
    print(f"\nPostgreSQL / SQLite committed tx/s: {p['tx_s'] / s['tx_s']:.2f}")


if __name__ == "__main__":
    main()
