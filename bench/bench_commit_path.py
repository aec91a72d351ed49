"""Instructions a node spends per committed transaction (not a test: prints a table).

Wall-clock and CPU-time figures on a shared 2-core machine drift by 20-30 % within
minutes, too much to see a change of a few percent. Instructions counted by
valgrind's callgrind repeat to within about 0.2 % for the same code and input with
SQLite, and about 2 % with PostgreSQL (the client's waits for the server vary),
whatever else the machine is doing. This bench counts them for the path every node
runs for every block: deriving it (:func:`medledger.ledger.apply.build_block` through
:meth:`medledger.node.Node.commit_group`: the checklist, the contracts, the state
tree, the log tree), signing its header and checkpoint, and committing it to the
store. Not counted: parsing the transactions, checking their signatures (the bench
passes them as checked, as the etcd orderer does after its worker process), the
orderer, the HTTP API, and the database server's own work.

How: the same script runs as a worker under ``valgrind --tool=callgrind`` twice, on a
fresh store each time (PostgreSQL by default, in a database of its own on the server
of ``MEDLEDGER_BENCH_PG``; ``--sqlite``: a file in a temporary directory). Each run
creates the ledger, signs ``--warm + --blocks`` blocks of ``--block`` deterministic
``note.anchor`` transactions (one signer, fixed keys and times, ``PYTHONHASHSEED=0``)
and commits the first ``--warm`` blocks; the second run then commits ``--blocks``
more. The difference of the two totals, over the transactions of those blocks, is the
figure: everything else (start-up, signing, the warm-up) is the same in both runs.
Before the counted blocks the worker runs a full garbage collection and freezes what
is left (``gc.freeze``), so that both runs start from the same heap and a collection
during the counted blocks walks only what they create (without it, full collections
of the setup's objects that fell inside the counted blocks made the figure about 8 %
higher).

The ceiling, counted the same way in the same run: instructions per Ed25519
verification (libsodium, through :class:`medledger.crypto.signing.VerifyKey`, on a
message the size of a transaction's signing bytes), which every node spends on every
transaction besides this path. The ratio is this path's count over it.

Run: ``.venv/bin/python bench/bench_commit_path.py [--sqlite] [--block 100]``
(needs ``valgrind``: ``apt-get install valgrind``). About two minutes on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NETWORK = "medledger-bench"
ORG = "bench-org"
T0 = 1_800_000_000_000  # fixed times: every run signs the same bytes
VERIFY_MSG = 190  # about a transaction's signing bytes


def _genesis(node_pub: bytes, admin_pub: bytes) -> dict[str, object]:
    return {
        "network": NETWORK,
        "time": T0,
        "orgs": [{"id": ORG, "name": "Bench", "node_key": node_pub, "enc_key": bytes(32)}],
        "admins": [{"id": "bench-admin", "org": ORG, "key": admin_pub}],
    }


async def _commit_worker(url: str, block: int, warm: int, blocks: int, more: int) -> None:
    from bench_ledger import NETWORK as LEDGER_NETWORK
    from bench_ledger import _presign
    from medledger.crypto.signing import SigningKey
    from medledger.node import BlockSpec, Node

    assert LEDGER_NETWORK == NETWORK
    assert url.startswith(("sqlite:///", "postgresql://", "postgres://")), url
    node_key, admin = SigningKey.from_seed(b"n" * 32), SigningKey.from_seed(b"a" * 32)
    node = await Node.create(
        url, _genesis(node_key.public.raw, admin.public.raw), [(ORG, node_key)]
    )
    node.clock = lambda: T0 + 1000
    txs = _presign(admin, (warm + blocks) * block, now=T0 + 1000)
    try:
        for b in range(warm + more):
            if b == warm:
                # the same heap in both runs from here: what the setup left is frozen
                # (a full collection then walks only what the counted blocks create)
                gc.collect()
                gc.freeze()
            chunk = txs[b * block : (b + 1) * block]
            await node.commit_group([BlockSpec(chunk, [True] * len(chunk), block_time=T0 + 1000)])
    finally:
        await node.close()


def _verify_worker(count: int) -> None:
    from medledger.crypto.signing import SigningKey

    key = SigningKey.from_seed(b"v" * 32)
    msg = bytes(VERIFY_MSG)
    sig = key.sign(msg)
    pub = key.public
    for _ in range(count):
        pub.verify(sig, msg)


def _callgrind(args: list[str], work: Path, tag: str) -> int:
    """Instructions of ``python this-script args`` under callgrind."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = work / f"callgrind.{tag}.out"
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run {tag} failed:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--block", type=int, default=100, help="transactions per block")
    parser.add_argument("--warm", type=int, default=20, help="blocks committed first")
    parser.add_argument("--blocks", type=int, default=10, help="blocks counted")
    parser.add_argument("--verifies", type=int, default=200, help="verifications counted")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        if opts.worker[0] == "commit":
            url, block, warm, blocks, more = opts.worker[1:]
            asyncio.run(_commit_worker(url, int(block), int(warm), int(blocks), int(more)))
        else:
            _verify_worker(int(opts.worker[1]))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("this bench needs valgrind (apt-get install valgrind)")
    # here, not at the top: the workers load only what they count (what a module
    # imports at start-up shifts their caches and so the count, by a few percent)
    from bench_pgstore import pg_database

    shape = [str(opts.block), str(opts.warm), str(opts.blocks)]
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medledger-bench-")))
        if opts.sqlite:
            urls = [f"sqlite:///{work / f'{tag}.db'}" for tag in ("base", "more")]
        else:  # a fresh database each, dropped afterwards (bench_pgstore's)
            urls = [stack.enter_context(pg_database()) for _ in range(2)]
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=2))  # two cores, two runs
        base = pool.submit(_callgrind, ["--worker", "commit", urls[0], *shape, "0"], work, "a")
        more = pool.submit(
            _callgrind,
            ["--worker", "commit", urls[1], *shape, str(opts.blocks)],
            work,
            "b",
        )
        v0 = pool.submit(_callgrind, ["--worker", "verify", "0"], work, "v0")
        v1 = pool.submit(_callgrind, ["--worker", "verify", str(opts.verifies)], work, "v1")
        per_tx = (more.result() - base.result()) / (opts.blocks * opts.block)
        per_verify = (v1.result() - v0.result()) / opts.verifies
    store = "SQLite" if opts.sqlite else "PostgreSQL"
    print(
        f"\none node, {store} store, blocks of {opts.block} note.anchor transactions "
        f"(one signer), after {opts.warm} blocks; callgrind, PYTHONHASHSEED=0\n"
    )
    print(f"{'measure':<60}{'value':>14}")
    print(f"{'instructions per committed transaction (node side)':<60}{per_tx:>14,.0f}")
    print(f"{'ceiling: instructions per Ed25519 verification (libsodium)':<60}{per_verify:>14,.0f}")
    print(f"{'  ratio (transaction / verification)':<60}{per_tx / per_verify:>14.2f}")


if __name__ == "__main__":
    main()
