"""Child process of ``test_crash.py``: opens a node and submits until it is killed.

Usage::

    python crash_worker.py DB_PATH NETWORK ORG NODE_SEED_HEX ADMIN_SEED_HEX [WINDOW]

It opens the existing ledger at ``DB_PATH``, reads the admin key's last sequence
number from state (``seq/<kid hex>``, a CBOR int), prints ``ready <seq>`` and then
submits ``note.anchor`` transactions forever, ``WINDOW`` at a time concurrently.
As soon as ``submit`` returns for a transaction it prints ``<tx id hex> <index>``
and flushes, so every printed line is an acknowledgement the parent can hold the
store to after killing this process with SIGKILL.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time

from medledger.contracts.core import k_seq
from medledger.crypto.signing import SigningKey
from medledger.encoding import decode
from medledger.ledger.tx import Transaction, make_tx
from medledger.node import Node


async def run(
    db: str, network: str, org: str, node_seed: bytes, admin_seed: bytes, window: int
) -> None:
    node_key = SigningKey.from_seed(node_seed)
    admin = SigningKey.from_seed(admin_seed)
    node = await Node.open(f"sqlite:///{db}", [(org, node_key)])
    raw = await node.state_get(k_seq(admin.key_id))
    seq = 0 if raw is None else int(decode(raw))
    await node.start()
    out = sys.stdout
    out.write(f"ready {seq}\n")
    out.flush()

    async def submit(tx: Transaction) -> None:
        receipt = await node.submit(tx)
        out.write(f"{tx.tx_id.hex()} {receipt.index}\n")
        out.flush()

    while True:
        now = int(time.time() * 1000)
        batch = [
            make_tx(
                admin,
                network,
                "note.anchor",
                {
                    "digest": hashlib.sha256(f"crash-test/{s}".encode()).digest(),
                    "kind": "other",
                },
                seq=s,
                time=now,
            )
            for s in range(seq + 1, seq + 1 + window)
        ]
        await asyncio.gather(*(submit(tx) for tx in batch))
        seq += window


def main() -> None:
    db, network, org, node_seed, admin_seed = sys.argv[1:6]
    window = int(sys.argv[6]) if len(sys.argv) > 6 else 16
    asyncio.run(run(db, network, org, bytes.fromhex(node_seed), bytes.fromhex(admin_seed), window))


if __name__ == "__main__":
    main()
