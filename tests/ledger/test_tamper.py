"""verify_ledger catches tampering with every kind of stored item.

One small ledger (five blocks, one of them a key rotation, a second signer) is built
once; every test copies its SQLite file, alters one thing with plain ``sqlite3`` and
runs ``verify_ledger`` on the copy, which must fail and, where the damage belongs to
a block or a transaction, name it.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medledger.encoding import decode, encode
from medledger.ledger.tx import make_tx
from medledger.ledger.verify import VerifyReport, verify_ledger
from medledger.node import Receipt
from medledger.store.sqlite import SqliteStore

from .conftest import (
    BLOCK_TIME,
    NETWORK,
    Keys,
    TxFactory,
    make_test_genesis,
    new_node,
    seeded_key,
)


@dataclass(frozen=True)
class Ledger:
    path: Path
    #: log index -> block height, for every stored transaction
    heights: dict[int, int]
    head: int
    log_size: int
    rotate_index: int
    checkpoint_heights: list[int]


async def _build(path: Path) -> Ledger:
    node_key, admin_key = seeded_key("node"), seeded_key("admin")
    genesis = make_test_genesis(node_key, admin_key)
    node = await new_node(path, genesis, Keys(node=node_key, admin=admin_key))
    admin = TxFactory(admin_key)
    rotated = TxFactory(seeded_key("admin-rotated"))
    nodesigner = TxFactory(node_key)
    batches = [
        [admin.anchor() for _ in range(3)],
        [admin.anchor(), admin.rotate(rotated.key)],
        [rotated.anchor(), rotated.anchor(), nodesigner.anchor()],
        [rotated.anchor(kind="report") for _ in range(4)],
        [nodesigner.anchor(), rotated.anchor()],
    ]
    heights: dict[int, int] = {}
    rotate_index = -1
    try:
        for batch in batches:
            results = await node.commit_batch(batch)
            for tx, r in zip(batch, results, strict=True):
                assert isinstance(r, Receipt), r
                heights[r.index] = r.height
                if tx.type == "key.rotate":
                    rotate_index = r.index
        cps = await node._run(lambda: [h for h, _ in node.store.iter_checkpoints()])
        head, size = node.head.height, node.head.log_size
    finally:
        await node.close()
    return Ledger(path, heights, head, size, rotate_index, cps)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    path = tmp_path_factory.mktemp("tamper") / "ledger.db"
    return asyncio.run(_build(path))


def _copy(ledger: Ledger, dst: Path) -> Path:
    out = dst / "copy.db"
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(ledger.path) + suffix)
        if src.exists():
            shutil.copy(src, str(out) + suffix)
    return out


def _verify(path: Path) -> VerifyReport:
    store = SqliteStore(path)
    try:
        return verify_ledger(store)
    finally:
        store.close()


def _flip(data: bytes, i: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[i % len(b)] ^= mask
    return bytes(b)


def _flip_b64_char(text: str, i: int) -> str:
    c = text[i]
    return text[:i] + ("A" if c != "A" else "B") + text[i + 1 :]


Tamper = Callable[[sqlite3.Connection, Ledger], dict[str, Any]]
CASES: dict[str, Tamper] = {}


def case(fn: Tamper) -> Tamper:
    CASES[fn.__name__] = fn
    return fn


def _one(db: sqlite3.Connection, sql: str, *args: Any) -> Any:
    row = db.execute(sql, args).fetchone()
    assert row is not None, sql
    return row[0]


# -- transactions ----------------------------------------------------------------------------


@case
def tx_raw_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    raw = _one(db, "SELECT raw FROM txs WHERE idx=4")
    db.execute("UPDATE txs SET raw=? WHERE idx=4", (_flip(raw, len(raw) // 2),))
    return {"what": "tx", "index": 4, "height": lg.heights[4]}


@case
def tx_raw_signature_byte_with_matching_id(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    """The id is updated too, so only the signature check can catch it."""
    raw = _one(db, "SELECT raw FROM txs WHERE idx=2")
    bad = _flip(raw, len(raw) - 3)
    db.execute("UPDATE txs SET raw=?, tx_id=? WHERE idx=2", (bad, hashlib.sha256(bad).digest()))
    return {"what": "tx", "index": 2, "height": lg.heights[2], "message": "bad-signature"}


@case
def rotate_tx_raw_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    i = lg.rotate_index
    raw = _one(db, "SELECT raw FROM txs WHERE idx=?", i)
    db.execute("UPDATE txs SET raw=? WHERE idx=?", (_flip(raw, 20, 0x40), i))
    return {"what": "tx", "index": i, "height": lg.heights[i]}


@case
def tx_replaced_by_validly_signed_other(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    """An attacker holding the admin key rewrites tx 1 (same seq): the block no longer matches."""
    tx = make_tx(
        seeded_key("admin"),
        NETWORK,
        "note.anchor",
        {"digest": bytes(32), "kind": "other"},
        seq=2,
        time=BLOCK_TIME,
    )
    db.execute("UPDATE txs SET raw=?, tx_id=? WHERE idx=1", (tx.raw, tx.tx_id))
    return {"what": "block", "height": lg.heights[1]}


@case
def tx_receipt(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    i = lg.rotate_index  # the rotation's receipt carries an event
    rc = decode(_one(db, "SELECT receipt FROM txs WHERE idx=?", i))
    assert rc["events"], rc
    rc["events"][0]["principal"] = "someone-else"
    db.execute("UPDATE txs SET receipt=? WHERE idx=?", (encode(rc), i))
    return {"what": "tx", "index": i, "height": lg.heights[i], "message": "receipt"}


@case
def tx_receipt_empty_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    rc = _one(db, "SELECT receipt FROM txs WHERE idx=7")
    db.execute("UPDATE txs SET receipt=? WHERE idx=7", (_flip(rc, -1),))
    return {"what": "tx", "index": 7, "height": lg.heights[7], "message": "receipt"}


@case
def tx_id(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    tid = _one(db, "SELECT tx_id FROM txs WHERE idx=6")
    db.execute("UPDATE txs SET tx_id=? WHERE idx=6", (_flip(tid, 0),))
    return {"what": "tx", "index": 6, "height": lg.heights[6]}


@case
def tx_height_column(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("UPDATE txs SET height=height+1 WHERE idx=5")
    return {"what": "tx", "index": 5, "height": lg.heights[5]}


@case
def tx_swapped_within_block(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    a = db.execute("SELECT tx_id, raw, receipt FROM txs WHERE idx=8").fetchone()
    b = db.execute("SELECT tx_id, raw, receipt FROM txs WHERE idx=9").fetchone()
    assert lg.heights[8] == lg.heights[9]
    db.execute("UPDATE txs SET tx_id=? WHERE idx=8", (b"tmp",))
    db.execute("UPDATE txs SET tx_id=?, raw=?, receipt=? WHERE idx=9", a)
    db.execute("UPDATE txs SET tx_id=?, raw=?, receipt=? WHERE idx=8", b)
    return {"height": lg.heights[8]}


@case
def tx_deleted(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("DELETE FROM txs WHERE idx=3")
    return {"what": "block", "height": lg.heights[3]}


@case
def extra_tx_beyond_head(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    tx = make_tx(
        seeded_key("admin-rotated"),
        NETWORK,
        "note.anchor",
        {"digest": b"\x07" * 32, "kind": "other"},
        seq=99,
        time=BLOCK_TIME,
    )
    db.execute(
        "INSERT INTO txs(idx, tx_id, height, raw, receipt) VALUES(?, ?, ?, ?, ?)",
        (lg.log_size, tx.tx_id, lg.head, tx.raw, encode({"events": []})),
    )
    return {"what": "tx", "index": lg.log_size}


# -- blocks ---------------------------------------------------------------------------------


@case
def block_header_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    hdr = _one(db, "SELECT header FROM blocks WHERE height=3")
    db.execute("UPDATE blocks SET header=? WHERE height=3", (_flip(hdr, len(hdr) - 5),))
    return {"what": "block", "height": 3}


@case
def block_header_field_reencoded(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    hdr = decode(_one(db, "SELECT header FROM blocks WHERE height=2"))
    hdr["time"] += 1
    db.execute("UPDATE blocks SET header=? WHERE height=2", (encode(hdr),))
    return {"what": "block", "height": 2}


@case
def block_header_resigned_by_a_stranger(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    from medledger.ledger.block import BlockHeader

    hdr = BlockHeader.from_bytes(_one(db, "SELECT header FROM blocks WHERE height=4"))
    db.execute("UPDATE blocks SET sig=? WHERE height=4", (hdr.sign(seeded_key("mallory")),))
    return {"what": "block", "height": 4, "message": "signature"}


@case
def genesis_block_header_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    hdr = _one(db, "SELECT header FROM blocks WHERE height=0")
    db.execute("UPDATE blocks SET header=? WHERE height=0", (_flip(hdr, 30),))
    return {"what": "block", "height": 0}


@case
def block_signature_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    sig = _one(db, "SELECT sig FROM blocks WHERE height=2")
    db.execute("UPDATE blocks SET sig=? WHERE height=2", (_flip(sig, 40),))
    return {"what": "block", "height": 2, "message": "signature"}


@case
def genesis_block_signature_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    sig = _one(db, "SELECT sig FROM blocks WHERE height=0")
    db.execute("UPDATE blocks SET sig=? WHERE height=0", (_flip(sig, 5),))
    return {"what": "block", "height": 0, "message": "signature"}


@case
def missing_block(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("DELETE FROM blocks WHERE height=2")
    return {"what": "block", "height": 2, "message": "missing"}


@case
def missing_genesis_block(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("DELETE FROM blocks WHERE height=0")
    return {"what": "block", "height": 0}


@case
def missing_last_block(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("DELETE FROM blocks WHERE height=?", (lg.head,))
    first = min(i for i, h in lg.heights.items() if h == lg.head)
    return {"what": "tx", "index": first, "message": "beyond the last block"}


@case
def blocks_swapped(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    a = db.execute("SELECT header, sig FROM blocks WHERE height=3").fetchone()
    b = db.execute("SELECT header, sig FROM blocks WHERE height=4").fetchone()
    db.execute("UPDATE blocks SET header=?, sig=? WHERE height=3", b)
    db.execute("UPDATE blocks SET header=?, sig=? WHERE height=4", a)
    return {"what": "block", "height": 3}


# -- log tree, state, state tree ---------------------------------------------------------------


@case
def tree_node_hash(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    nid, h = db.execute("SELECT id, hash FROM tree ORDER BY id LIMIT 1 OFFSET 5").fetchone()
    db.execute("UPDATE tree SET hash=? WHERE id=?", (_flip(h, 31), nid))
    return {"what": "log tree node"}


@case
def tree_node_deleted(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("DELETE FROM tree WHERE id=(SELECT MAX(id) FROM tree)")
    return {"what": "log tree node"}


@case
def tree_node_extra(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("INSERT INTO tree(id, hash) VALUES(?, ?)", (10**6, bytes(32)))
    return {"what": "log tree node"}


@case
def state_row_value(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    k = _one(db, "SELECT k FROM state WHERE CAST(k AS TEXT) LIKE 'anchor/%' ORDER BY k LIMIT 1")
    v = decode(_one(db, "SELECT v FROM state WHERE k=?", k))
    v["kind"] = "dataset" if v["kind"] != "dataset" else "report"
    db.execute("UPDATE state SET v=? WHERE k=?", (encode(v), k))
    return {"what": "state row"}


@case
def state_seq_value(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    k = _one(db, "SELECT k FROM state WHERE CAST(k AS TEXT) LIKE 'seq/%' ORDER BY k LIMIT 1")
    db.execute("UPDATE state SET v=? WHERE k=?", (encode(1000), k))
    return {"what": "state row"}


@case
def state_row_deleted(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute(
        "DELETE FROM state WHERE k=(SELECT MIN(k) FROM state WHERE CAST(k AS TEXT) LIKE 'key/%')"
    )
    return {"what": "state row", "message": "missing"}


@case
def state_row_extra(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("INSERT INTO state(k, v) VALUES(?, ?)", (b"anchor/" + b"0" * 64, encode({})))
    return {"what": "state row", "message": "unexpected"}


@case
def smt_node_value(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    k, v = db.execute("SELECT k, v FROM smt ORDER BY k LIMIT 1 OFFSET 3").fetchone()
    db.execute("UPDATE smt SET v=? WHERE k=?", (_flip(v, len(v) - 1), k))
    return {"what": "state tree node"}


@case
def smt_node_deleted(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("DELETE FROM smt WHERE k=(SELECT MAX(k) FROM smt)")
    return {"what": "state tree node", "message": "missing"}


@case
def smt_node_extra(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("INSERT INTO smt(k, v) VALUES(?, ?)", (b"\xfe\xfe\xfe", b"\x00" * 33))
    return {"what": "state tree node"}


# -- checkpoints and genesis --------------------------------------------------------------------


def _checkpoint(db: sqlite3.Connection, height: int) -> tuple[str, str]:
    note = _one(db, "SELECT note FROM checkpoints WHERE height=?", height)
    body, sigs = note.split("\n\n", 1)
    return body, sigs


@case
def checkpoint_body_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    h = lg.checkpoint_heights[2]
    body, sigs = _checkpoint(db, h)
    lines = body.split("\n")
    lines[2] = _flip_b64_char(lines[2], 10)  # the root hash
    db.execute(
        "UPDATE checkpoints SET note=? WHERE height=?", ("\n".join(lines) + "\n\n" + sigs, h)
    )
    return {"what": "checkpoint", "height": h}


@case
def checkpoint_size(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    h = lg.checkpoint_heights[1]
    body, sigs = _checkpoint(db, h)
    lines = body.split("\n")
    lines[1] = str(int(lines[1]) + 1)
    db.execute(
        "UPDATE checkpoints SET note=? WHERE height=?", ("\n".join(lines) + "\n\n" + sigs, h)
    )
    return {"what": "checkpoint", "height": h}


@case
def checkpoint_signature_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    h = lg.checkpoint_heights[-1]
    body, sigs = _checkpoint(db, h)
    prefix, b64 = sigs.rstrip("\n").rsplit(" ", 1)
    bad = _flip_b64_char(b64, 30)
    db.execute("UPDATE checkpoints SET note=? WHERE height=?", (f"{body}\n\n{prefix} {bad}\n", h))
    return {"what": "checkpoint", "height": h}


@case
def checkpoint_moved_to_another_block(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    a, b = lg.checkpoint_heights[0], lg.checkpoint_heights[1]
    note = _one(db, "SELECT note FROM checkpoints WHERE height=?", a)
    db.execute("UPDATE checkpoints SET note=? WHERE height=?", (note, b))
    return {"what": "checkpoint", "height": b}


@case
def checkpoint_for_a_missing_block(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    note = _one(db, "SELECT note FROM checkpoints WHERE height=?", lg.head)
    db.execute("INSERT INTO checkpoints(height, note) VALUES(?, ?)", (lg.head + 5, note))
    return {"what": "checkpoint", "height": lg.head + 5}


@case
def genesis_meta_reencoded(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    g = decode(_one(db, "SELECT v FROM meta WHERE k='genesis'"))
    g["policy"]["max_tx_skew_ms"] += 1
    db.execute("UPDATE meta SET v=? WHERE k='genesis'", (encode(g),))
    return {"what": "block", "height": 0}


@case
def genesis_meta_byte(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    g = _one(db, "SELECT v FROM meta WHERE k='genesis'")
    db.execute("UPDATE meta SET v=? WHERE k='genesis'", (_flip(g, len(g) // 3),))
    return {}


@case
def genesis_meta_admin_key(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    """Swap in another admin key: block 0 no longer matches the genesis document."""
    g = decode(_one(db, "SELECT v FROM meta WHERE k='genesis'"))
    g["admins"][0]["key"] = seeded_key("mallory").public.raw
    db.execute("UPDATE meta SET v=? WHERE k='genesis'", (encode(g),))
    return {"what": "block", "height": 0}


@case
def genesis_meta_deleted(db: sqlite3.Connection, lg: Ledger) -> dict[str, Any]:
    db.execute("DELETE FROM meta WHERE k='genesis'")
    return {"what": "genesis"}


# -- the tests ----------------------------------------------------------------------------------


def test_untampered_ledger_verifies(ledger: Ledger) -> None:
    report = _verify(ledger.path)
    assert report.ok, report.failure
    assert report.blocks == ledger.head + 1
    assert report.transactions == ledger.log_size
    assert report.checkpoints == len(ledger.checkpoint_heights) == ledger.head
    assert ledger.rotate_index >= 0


def test_untampered_copy_verifies(ledger: Ledger, tmp_path: Path) -> None:
    report = _verify(_copy(ledger, tmp_path))
    assert report.ok, report.failure


@pytest.mark.parametrize("name", sorted(CASES))
def test_tampering_is_detected(ledger: Ledger, tmp_path: Path, name: str) -> None:
    path = _copy(ledger, tmp_path)
    with sqlite3.connect(path) as db:
        expect = CASES[name](db, ledger)
    db.close()
    report = _verify(path)
    assert not report.ok, f"{name}: tampering not detected"
    failure = report.failure
    assert failure is not None
    if "what" in expect:
        assert failure.what == expect["what"], failure
    if "height" in expect:
        assert failure.height == expect["height"], failure
        assert f"block {expect['height']}" in str(failure)
    if "index" in expect:
        assert failure.index == expect["index"], failure
        assert f"tx #{expect['index']}" in str(failure)
    if "message" in expect:
        assert expect["message"] in failure.message, failure
    # the original is untouched
    assert report.to_json()["ok"] is False


def test_original_still_verifies_after_all_copies(ledger: Ledger) -> None:
    assert _verify(ledger.path).ok
