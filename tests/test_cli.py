"""The real ``medledger`` command line, run as a subprocess.

A data directory is initialised once with ``medledger init``; a few blocks of
``note.anchor`` transactions are then committed in-process with the data
directory's admin key (the CLI has no submit command); every command is then run
against it (or a tampered copy) and its output re-verified here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medledger.datadir import DataDir
from medledger.ledger.checkpoint import Checkpoint, verify_checkpoint
from medledger.ledger.note import NoteVerifier
from medledger.ledger.tx import Transaction, make_tx
from medledger.merkle.hasher import leaf_hash
from medledger.merkle.verify import verify_consistency, verify_inclusion
from medledger.node import Receipt

BIN = Path(sys.executable).with_name("medledger")
NETWORK = "cli-test-net"
ORG = "org-a"
BATCHES = [3, 5, 1, 7]


def cli_cmd() -> list[str]:
    if BIN.exists():
        return [str(BIN)]
    return [sys.executable, "-m", "medledger.cli"]  # pragma: no cover


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(*args: str | Path, check: bool = True, timeout: float = 60) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    env["COLUMNS"] = "80"
    proc = subprocess.run(
        [*cli_cmd(), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )
    res = Result(proc.returncode, proc.stdout, proc.stderr)
    if check:
        assert res.code == 0, f"{args}: exit {res.code}\nstdout: {res.out}\nstderr: {res.err}"
    assert "Traceback" not in res.err, res.err
    return res


@dataclass(frozen=True)
class Ledger:
    data_dir: Path
    receipts: list[Receipt]
    txs: list[Transaction]
    init: dict[str, Any]


async def _commit(data_dir: Path) -> tuple[list[Transaction], list[Receipt]]:
    dd = DataDir(data_dir)
    admin = dd.identity(dd.config()["admin_key"]).signing
    node = await dd.open_node()
    await node.start()
    txs: list[Transaction] = []
    receipts: list[Receipt] = []
    try:
        now = int(time.time() * 1000)
        seq = 0
        for n in BATCHES:
            batch = []
            for _ in range(n):
                seq += 1
                digest = hashlib.sha256(f"cli-doc-{seq}".encode()).digest()
                batch.append(
                    make_tx(
                        admin,
                        node.network,
                        "note.anchor",
                        {"digest": digest, "kind": "document"},
                        seq=seq,
                        time=now,
                    )
                )
            results = await node.commit_batch(batch)
            assert all(isinstance(r, Receipt) for r in results), results
            txs.extend(batch)
            receipts.extend(r for r in results if isinstance(r, Receipt))
    finally:
        await node.close()
    return txs, receipts


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    data_dir = tmp_path_factory.mktemp("cli") / "node"
    info = run("init", "--data-dir", data_dir, "--network", NETWORK, "--org", ORG, "--json").json()
    txs, receipts = asyncio.run(_commit(data_dir))
    return Ledger(data_dir, receipts, txs, info)


def _verifiers(ledger: Ledger) -> list[NoteVerifier]:
    return [NoteVerifier.from_verifier_key(vk) for vk in ledger.init["verifier_keys"]]


def _one_line_error(res: Result) -> str:
    assert res.code != 0
    lines = res.err.strip("\n").split("\n")
    assert len(lines) == 1, res.err
    assert lines[0].startswith("error: "), res.err
    return lines[0]


# -- init, checkpoint ---------------------------------------------------------------------------


def test_init(ledger: Ledger) -> None:
    info = ledger.init
    assert info["network"] == NETWORK and info["org"] == ORG
    assert Path(info["data_dir"]) == ledger.data_dir
    assert info["store"].startswith("sqlite:///")
    assert (ledger.data_dir / "node.json").exists()
    assert (ledger.data_dir / "genesis.json").exists()
    assert len(info["verifier_keys"]) == 1


def test_init_twice_is_refused(ledger: Ledger) -> None:
    res = run("init", "--data-dir", ledger.data_dir, check=False)
    assert "already initialised" in _one_line_error(res)


def test_checkpoint_verifier_key(ledger: Ledger) -> None:
    res = run("checkpoint", "--verifier-key", "--data-dir", ledger.data_dir)
    lines = res.out.strip("\n").split("\n")
    assert lines == ledger.init["verifier_keys"]
    name, khash, key64 = lines[0].split("+", 2)
    assert name == f"{NETWORK}/{ORG}"
    assert len(khash) == 8 and int(khash, 16) >= 0
    raw = base64.b64decode(key64, validate=True)
    assert raw[0] == 0x01 and len(raw) == 33
    v = NoteVerifier.from_verifier_key(lines[0])
    assert v.verifier_key() == lines[0]


def test_checkpoint(ledger: Ledger) -> None:
    note = run("checkpoint", "--data-dir", ledger.data_dir).out
    cp = verify_checkpoint(note, _verifiers(ledger), origin=f"medledger/{NETWORK}")
    assert cp.size == sum(BATCHES)
    ref = cp.block_info()
    assert ref is not None and ref.height == len(BATCHES)


# -- tx list / show ---------------------------------------------------------------------------


def test_tx_list_json(ledger: Ledger) -> None:
    docs = run("tx", "list", "--json", "--data-dir", ledger.data_dir).json()
    assert [d["index"] for d in docs] == list(range(sum(BATCHES)))
    assert [d["tx_id"] for d in docs] == [tx.tx_id.hex() for tx in ledger.txs]
    assert [d["height"] for d in docs] == [r.height for r in ledger.receipts]
    assert {d["type"] for d in docs} == {"note.anchor"}
    page = run(
        "tx", "list", "--json", "--start", "4", "--limit", "3", "--data-dir", ledger.data_dir
    ).json()
    assert [d["index"] for d in page] == [4, 5, 6]


def test_tx_list_text(ledger: Ledger) -> None:
    out = run("tx", "list", "--data-dir", ledger.data_dir).out
    lines = out.strip("\n").split("\n")
    assert len(lines) == sum(BATCHES)
    assert ledger.txs[0].tx_id.hex() in lines[0]


def test_tx_show_json(ledger: Ledger) -> None:
    tx, receipt = ledger.txs[6], ledger.receipts[6]
    doc = run("tx", "show", tx.tx_id.hex(), "--json", "--data-dir", ledger.data_dir).json()
    raw = base64.b64decode(doc["canonical_bytes"], validate=True)
    assert hashlib.sha256(raw).hexdigest() == doc["tx_id"] == tx.tx_id.hex()
    assert raw == tx.raw
    assert doc["index"] == receipt.index == 6
    assert doc["height"] == receipt.height
    parsed = Transaction.from_bytes(raw)
    parsed.verify_signature()
    assert doc["seq"] == parsed.seq and doc["type"] == "note.anchor"
    # upper-case hex is accepted too
    again = run("tx", "show", tx.tx_id.hex().upper(), "--json", "--data-dir", ledger.data_dir)
    assert again.json()["tx_id"] == doc["tx_id"]


# -- proofs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", [0, 7, 15])
def test_proof_inclusion_json(ledger: Ledger, i: int) -> None:
    tx = ledger.txs[i]
    doc = run("proof", "inclusion", tx.tx_id.hex(), "--json", "--data-dir", ledger.data_dir).json()
    assert set(doc) >= {"leaf_index", "tree_size", "leaf_hash", "proof", "checkpoint"}
    assert doc["leaf_index"] == ledger.receipts[i].index
    assert doc["leaf_hash"] == leaf_hash(tx.raw).hex()
    cp = verify_checkpoint(doc["checkpoint"], _verifiers(ledger), origin=f"medledger/{NETWORK}")
    assert cp.size == doc["tree_size"] == sum(BATCHES)
    proof = [bytes.fromhex(h) for h in doc["proof"]]
    verify_inclusion(doc["leaf_index"], doc["tree_size"], leaf_hash(tx.raw), proof, cp.root)


def test_proof_inclusion_text(ledger: Ledger) -> None:
    out = run("proof", "inclusion", ledger.txs[2].tx_id.hex(), "--data-dir", ledger.data_dir).out
    # the checkpoint note is printed intact (no wrapping of its long signature line)
    note = out[out.index(f"medledger/{NETWORK}\n") :]
    verify_checkpoint(note, _verifiers(ledger), origin=f"medledger/{NETWORK}")


def test_proof_consistency_json(ledger: Ledger) -> None:
    sizes = [0]
    for n in BATCHES:
        sizes.append(sizes[-1] + n)
    roots: dict[int, str] = {}
    for a, b in [(1, sizes[-1]), (sizes[1], sizes[3]), (sizes[2], sizes[2]), (0, sizes[2])]:
        doc = run(
            "proof",
            "consistency",
            "--from",
            str(a),
            "--to",
            str(b),
            "--json",
            "--data-dir",
            ledger.data_dir,
        ).json()
        assert (doc["size1"], doc["size2"]) == (a, b)
        proof = [bytes.fromhex(h) for h in doc["proof"]]
        verify_consistency(a, b, proof, bytes.fromhex(doc["root1"]), bytes.fromhex(doc["root2"]))
        for size, root in ((a, doc["root1"]), (b, doc["root2"])):
            assert roots.setdefault(size, root) == root
    # the newest root is the one the signed checkpoint commits to
    note = run("checkpoint", "--data-dir", ledger.data_dir).out
    cp = Checkpoint.parse(note.split("\n\n", 1)[0] + "\n")
    assert roots[sizes[-1]] == cp.root.hex()


def test_proof_consistency_bad_range(ledger: Ledger) -> None:
    res = run(
        "proof", "consistency", "--from", "5", "--to", "2", "--data-dir", ledger.data_dir,
        check=False,
    )  # fmt: skip
    assert "--from" in _one_line_error(res)
    res = run(
        "proof", "consistency", "--from", "1", "--to", "9999", "--data-dir", ledger.data_dir,
        check=False,
    )  # fmt: skip
    _one_line_error(res)


# -- verify ---------------------------------------------------------------------------------------


def test_verify_ok(ledger: Ledger) -> None:
    res = run("verify", "--data-dir", ledger.data_dir)
    assert res.out.startswith("OK:")
    doc = run("verify", "--json", "--data-dir", ledger.data_dir).json()
    assert doc["ok"] is True
    assert doc["blocks"] == len(BATCHES) + 1
    assert doc["transactions"] == sum(BATCHES)
    assert doc["checkpoints"] == len(BATCHES)


def test_verify_tampered_copy(ledger: Ledger, tmp_path: Path) -> None:
    copy = tmp_path / "node"
    shutil.copytree(ledger.data_dir, copy)
    cfg = json.loads((copy / "node.json").read_text())
    cfg["store"] = f"sqlite:///{copy / 'ledger.db'}"
    (copy / "node.json").write_text(json.dumps(cfg))
    victim = ledger.receipts[10]
    with sqlite3.connect(copy / "ledger.db") as db:
        (raw,) = db.execute("SELECT raw FROM txs WHERE idx=?", (victim.index,)).fetchone()
        bad = bytearray(raw)
        bad[len(bad) // 2] ^= 0x04
        db.execute("UPDATE txs SET raw=? WHERE idx=?", (bytes(bad), victim.index))
    db.close()
    res = run("verify", "--data-dir", copy, check=False)
    assert res.code != 0
    lines = res.err.strip("\n").split("\n")
    assert len(lines) == 1, res.err
    assert f"block {victim.height}" in lines[0]
    assert f"tx #{victim.index}" in lines[0]
    doc = run("verify", "--json", "--data-dir", copy, check=False)
    assert doc.code != 0
    failure = doc.json()["failure"]
    assert (failure["height"], failure["index"]) == (victim.height, victim.index)
    # the original is untouched
    run("verify", "--data-dir", ledger.data_dir)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("txid", ["not-hex", "abcd", "ab" * 33])
@pytest.mark.parametrize("cmd", [("tx", "show"), ("proof", "inclusion")])
def test_bad_txid(ledger: Ledger, cmd: tuple[str, str], txid: str) -> None:
    res = run(*cmd, txid, "--data-dir", ledger.data_dir, check=False)
    line = _one_line_error(res)
    assert "transaction id" in line
    assert res.out == ""


def test_unknown_txid(ledger: Ledger) -> None:
    res = run("tx", "show", "ab" * 32, "--data-dir", ledger.data_dir, check=False)
    assert "not on the ledger" in _one_line_error(res)
    res = run("proof", "inclusion", "cd" * 32, "--data-dir", ledger.data_dir, check=False)
    assert "not on the ledger" in _one_line_error(res)


@pytest.mark.parametrize(
    "args",
    [
        ("verify",),
        ("checkpoint",),
        ("tx", "list"),
        ("tx", "show", "ab" * 32),
        ("proof", "consistency", "--from", "0", "--to", "1"),
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_missing_data_dir(tmp_path: Path, args: tuple[str, ...]) -> None:
    missing = tmp_path / "no" / "such" / "directory-with-a-rather-long-name-to-tempt-wrapping"
    res = run(*args, "--data-dir", missing, check=False)
    line = _one_line_error(res)
    assert str(missing) in line
    assert "medledger init" in line
    assert not missing.exists()  # nothing was created


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("init",),
        ("verify",),
        ("checkpoint",),
        ("tx",),
        ("tx", "list"),
        ("tx", "show"),
        ("proof",),
        ("proof", "inclusion"),
        ("proof", "consistency"),
        ("demo",),
    ],
    ids=lambda a: " ".join(a) or "top",
)
def test_help(args: tuple[str, ...]) -> None:
    res = run(*args, "--help")
    assert "Usage" in res.out
    assert "--help" in res.out


def test_demo_help() -> None:
    """The demo's options (the scenario itself runs in tests/test_demo.py)."""
    res = run("demo", "--help")
    for option in ("--no-serve", "--json", "--port", "--dir"):
        assert option in res.out, option
    assert "--count" not in res.out
