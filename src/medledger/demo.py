"""``medledger demo``: a narrated tour of the ledger core on a fresh embedded node.

Steps: initialise a node; commit a few thousand signed transactions; print the
signed checkpoint; prove and verify one transaction's inclusion and a
consistency proof between two checkpoints; verify the whole ledger; then flip
one byte of a stored transaction in a *copy* of the data and show ``verify``
naming the block and transaction it broke.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medledger.datadir import DataDir
from medledger.ledger.checkpoint import verify_checkpoint
from medledger.ledger.note import NoteVerifier
from medledger.ledger.tx import make_tx
from medledger.ledger.verify import verify_ledger
from medledger.merkle.verify import verify_consistency, verify_inclusion
from medledger.store.sqlite import SqliteStore

__all__ = ["run_demo"]


async def run_demo(
    data_dir: Path | None, *, count: int = 3000, quiet: bool = False
) -> dict[str, Any]:
    console = Console(quiet=quiet, highlight=False)
    steps: list[dict[str, Any]] = []

    def step(name: str, ok: bool, **info: Any) -> None:
        steps.append({"step": name, "ok": ok, **info})
        mark = "[green]✔[/]" if ok else "[red]✘[/]"
        console.print(f"{mark} {name}" + (f": {info.get('detail')}" if info.get("detail") else ""))

    root = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="medledger-demo-"))
    dd = DataDir(root / "node")
    console.rule("[bold]medledger demo: the verifiable ledger core")
    console.print(f"data directory: {dd.path}")
    node = await dd.init(network="medledger-demo", org="st-mary", org_name="St Mary's Hospital")
    step("node initialised", True, detail=f"network {node.network}, org st-mary")
    admin = dd.identity(dd.config()["admin_key"])
    await node.start()
    try:
        now = int(time.time() * 1000)
        txs = [
            make_tx(
                admin.signing,
                node.network,
                "note.anchor",
                {
                    "digest": hashlib.sha256(f"demo document {i}".encode()).digest(),
                    "kind": "document",
                },
                seq=i + 1,
                time=now,
            )
            for i in range(count)
        ]
        receipts = []
        started = time.perf_counter()
        chunk = 500
        with Progress(
            TextColumn("committing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=quiet,
        ) as progress:
            task = progress.add_task("commit", total=count)
            import asyncio

            for i in range(0, count, chunk):
                batch = txs[i : i + chunk]
                receipts.extend(await asyncio.gather(*(node.submit(t) for t in batch)))
                progress.update(task, advance=len(batch))
        elapsed = time.perf_counter() - started
        step(
            "transactions committed",
            len(receipts) == count,
            detail=f"{count} signed transactions in {node.head.height} blocks, "
            f"{count / elapsed:.0f} tx/s (durable)",
            count=count,
        )
        mid_size = receipts[count // 2].index + 1

        note = await node.checkpoint()
        verifiers = [NoteVerifier.from_verifier_key(vk) for vk in node.verifier_keys()]
        cp = verify_checkpoint(note, verifiers, origin=node.origin)
        console.print("\n[bold]latest signed checkpoint[/] (C2SP tlog-checkpoint signed note):")
        console.print(note, end="", markup=False)
        step("checkpoint signed and verified", True, detail=f"tree size {cp.size}")

        target = txs[count // 3]
        proof = await node.inclusion_proof(target.tx_id)
        cp_for_proof = verify_checkpoint(proof.checkpoint, verifiers, origin=node.origin)
        verify_inclusion(
            proof.leaf_index, proof.tree_size, proof.leaf_hash, proof.proof, cp_for_proof.root
        )
        step(
            "inclusion proof verified",
            True,
            detail=f"tx {target.tx_id.hex()[:16]}… at index {proof.leaf_index}, "
            f"{len(proof.proof)} hashes",
            tx_id=target.tx_id.hex(),
        )
        root1, root2, cproof = await node.consistency_proof(mid_size, cp.size)
        verify_consistency(mid_size, cp.size, cproof, root1, root2)
        step(
            "consistency proof verified",
            True,
            detail=f"log of {mid_size} is a prefix of log of {cp.size}, {len(cproof)} hashes",
        )
        report = await node._run(lambda: verify_ledger(node.store))
        step("verify (whole ledger)", report.ok, detail=str(report.failure or "OK"))
    finally:
        await node.close()

    tampered = root / "tampered"
    if tampered.exists():
        shutil.rmtree(tampered)
    shutil.copytree(dd.path, tampered)
    db_path = tampered / "ledger.db"
    victim_index = count // 4
    with sqlite3.connect(db_path) as db:
        (raw,) = db.execute("SELECT raw FROM txs WHERE idx=?", (victim_index,)).fetchone()
        raw = bytearray(raw)
        raw[len(raw) // 2] ^= 0x01
        db.execute("UPDATE txs SET raw=? WHERE idx=?", (bytes(raw), victim_index))
    store = SqliteStore(db_path)
    try:
        bad = verify_ledger(store)
    finally:
        store.close()
    caught = (not bad.ok) and bad.failure is not None and bad.failure.index == victim_index
    step(
        "tampering caught by verify",
        caught,
        detail=f"flipped one bit of tx #{victim_index} in a copy -> {bad.failure}",
    )
    ok = all(s["ok"] for s in steps)
    console.rule("[bold green]all steps passed" if ok else "[bold red]some steps failed")
    return {"ok": ok, "data_dir": str(root), "steps": steps}
