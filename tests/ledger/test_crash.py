"""Durability under SIGKILL: nothing acknowledged is ever lost, the ledger always verifies.

A child process (``crash_worker.py``) opens the node and submits transactions
continuously, printing each acknowledged transaction id and log index the moment
``submit`` returns. The parent kills it with SIGKILL at a random moment, reopens the
store and checks that every acknowledged transaction is at its index and that
``verify_ledger`` passes; the next round continues on the same ledger, the worker
picking up its sequence number from state.

Marked ``slow`` but part of the default run (nothing deselects it).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medledger.contracts.core import k_seq
from medledger.encoding import decode
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import verify_ledger
from medledger.node import Node
from medledger.store.sqlite import SqliteStore

from .conftest import NETWORK, ORG, make_test_genesis, seeded_key

WORKER = Path(__file__).with_name("crash_worker.py")
ROUNDS = 8
SEED = 20240611


class Child:
    """The worker process, with its stdout read line by line on a thread."""

    def __init__(self, db: Path) -> None:
        node_key, admin_key = seeded_key("node"), seeded_key("admin")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(db),
                NETWORK,
                ORG,
                node_key.seed().hex(),
                admin_key.seed().hex(),
                "16",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode()
            if not line.endswith("\n"):  # torn by the kill: not an acknowledgement
                break
            if line.startswith("ready"):
                self.ready.set()
            self.lines.append(line.rstrip("\n"))
        self.ready.set()

    def kill(self) -> tuple[int, list[tuple[bytes, int]]]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        assert self.proc.stderr is not None
        errors = self.proc.stderr.read().decode()
        assert self.proc.returncode == -signal.SIGKILL, (self.proc.returncode, errors)
        assert self.lines and self.lines[0].startswith("ready"), errors
        start_seq = int(self.lines[0].split()[1])
        acks = []
        for line in self.lines[1:]:
            tx_hex, index = line.split()
            acks.append((bytes.fromhex(tx_hex), int(index)))
        return start_seq, acks


async def _create(db: Path) -> None:
    node_key, admin_key = seeded_key("node"), seeded_key("admin")
    genesis = make_test_genesis(node_key, admin_key)
    node = await Node.create(f"sqlite:///{db}", genesis, [(ORG, node_key)])
    await node.close()


@pytest.mark.slow
def test_sigkill_never_loses_acknowledged_transactions(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    asyncio.run(_create(db))
    rng = random.Random(SEED)
    admin_kid = seeded_key("admin").key_id
    acknowledged: dict[bytes, int] = {}
    last_seq = 0
    for round_ in range(ROUNDS):
        child = Child(db)
        assert child.ready.wait(timeout=30), "worker did not start"
        time.sleep(rng.uniform(0.2, 1.5))
        start_seq, acks = child.kill()

        # the worker resumed from the sequence number in state
        assert start_seq == last_seq, (round_, start_seq, last_seq)
        for tx_id, index in acks:
            assert acknowledged.setdefault(tx_id, index) == index

        store = SqliteStore(db)
        try:
            for tx_id, index in acknowledged.items():
                rec = store.get_tx_at(index)
                assert rec is not None, f"round {round_}: acknowledged tx #{index} lost"
                assert rec.tx_id == tx_id, f"round {round_}: tx #{index} is another tx"
            report = verify_ledger(store)
            assert report.ok, f"round {round_}: {report.failure}"
            # every stored admin tx is accounted for by the seq in state
            raw = store.get(k_seq(admin_kid))
            last_seq = 0 if raw is None else int(decode(raw))
            stored = list(store.iter_txs())
            assert report.transactions == len(stored)
            assert [Transaction.from_bytes(r.raw).seq for r in stored] == list(
                range(1, last_seq + 1)
            )
            assert len(acknowledged) <= len(stored)
        finally:
            store.close()
    assert acknowledged, "no transaction was ever acknowledged"
