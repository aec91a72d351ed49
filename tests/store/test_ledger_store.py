"""The ledger store contract, run alike on SQLite and on PostgreSQL.

* **Contract** (every test parametrized on the backend): metadata, state rows and
  their ordered prefix scans (checked against :class:`MemoryState` on awkward
  keys), state-tree nodes, the log, log tree nodes, blocks, checkpoints, and
  ``commit_block`` atomicity (a block that fails half-way, e.g. on a duplicate
  transaction id, leaves nothing behind and the head unchanged).
* **PostgreSQL specifics**: ``ledger_`` tables only, errors become
  :class:`StorageError` (without the password), a lost connection is re-established
  (and a block whose ``COMMIT`` outcome was lost is not applied twice), a failure in
  the last statement of a block rolls back all of it, the presence filters answer
  absent keys without a query and stay exact as they grow, lookups of key lists
  still use the index after their table grew (no stale generic plan), concurrent
  first opens, one ledger per PostgreSQL schema.
* **End to end**: the same realistic :class:`Workload` ledger is committed block by
  block on a SQLite node and on a PostgreSQL node: every stored byte is identical;
  the PostgreSQL node reopens, proves inclusion, keeps committing through its
  orderer, and ``verify_ledger`` passes; tampering with the PostgreSQL rows with
  plain SQL (a flipped byte in a state row of every kind, a transaction, a block, a
  tree node, a checkpoint...) makes ``verify_ledger`` fail and say where; and a
  node process killed with SIGKILL never loses an acknowledged transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pg
from medledger.contracts.core import k_seq
from medledger.encoding import decode, encode
from medledger.errors import ReplayedTransaction, StorageError
from medledger.ledger.checkpoint import checkpoint_of
from medledger.ledger.tx import Transaction
from medledger.ledger.verify import VerifyReport, verify_ledger
from medledger.merkle.hasher import leaf_hash
from medledger.merkle.verify import verify_consistency, verify_inclusion
from medledger.node import Node, Receipt
from medledger.state.base import MemoryState
from medledger.store import BlockRecord, LedgerStore, TxRecord, open_store
from medledger.store import postgres as pgstore
from medledger.store.base import BlockWrite
from medledger.store.postgres import PostgresStore
from medledger.store.sqlite import SqliteStore
from medledger.workload import KINDS, Workload

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[LedgerStore]:
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()


def _tx(index: int, height: int, tag: bytes | None = None) -> TxRecord:
    raw = b"raw/" + (tag if tag is not None else str(index).encode())
    return TxRecord(index, hashlib.sha256(raw).digest(), height, raw, b"receipt/%d" % index)


def _commit(
    store: LedgerStore,
    height: int,
    *,
    txs: Sequence[TxRecord] = (),
    tree: Sequence[tuple[tuple[int, int], bytes]] = (),
    state: dict[bytes, bytes | None] | None = None,
    smt: dict[bytes, bytes | None] | None = None,
    checkpoint: str | None = None,
) -> None:
    store.commit_block(
        BlockRecord(height, b"header/%d" % height, b"sig/%d" % height),
        list(txs),
        list(tree),
        dict(state or {}),
        dict(smt or {}),
        checkpoint=checkpoint,
    )


def _snapshot(store: LedgerStore) -> dict[str, Any]:
    """Everything a store holds, as plain data (for before/after comparisons)."""
    return {
        "head": store.head_height(),
        "blocks": list(store.iter_blocks()),
        "txs": list(store.iter_txs()),
        "tree": list(store.iter_tree_nodes()),
        "state": list(store.iter_state()),
        "smt": list(store.iter_nodes()),
        "checkpoints": list(store.iter_checkpoints()),
    }


# -- the store contract, on both backends ------------------------------------------------------


def test_a_new_store_is_empty(store: LedgerStore) -> None:
    assert store.head_height() is None
    assert store.get_block(0) is None
    assert store.get_checkpoint() is None and store.get_checkpoint(0) is None
    assert store.get_meta("genesis") is None
    assert store.get_meta("schema") == b"1"
    assert store.get(b"x") is None and store.get_node(b"\x00") is None
    assert not store.has_tx(bytes(32))
    assert store.get_tx(bytes(32)) is None and store.get_tx_at(0) is None
    assert store.get_tree_nodes([]) == []
    assert list(store.scan(b"")) == []
    snap = _snapshot(store)
    assert snap == {
        "head": None,
        "blocks": [],
        "txs": [],
        "tree": [],
        "state": [],
        "smt": [],
        "checkpoints": [],
    }


def test_meta_set_replace_and_reopen(store_url: str) -> None:
    store = open_store(store_url)
    try:
        store.set_meta("genesis", b"\x00\xff genesis \x00")
        store.set_meta("nöde/ключ", b"")
        store.set_meta("genesis", b"\x00\xff replaced")
        assert store.get_meta("genesis") == b"\x00\xff replaced"
        assert store.get_meta("nöde/ключ") == b""
        assert store.get_meta("other") is None
    finally:
        store.close()
    store = open_store(store_url)
    try:
        assert store.get_meta("genesis") == b"\x00\xff replaced"
        assert store.get_meta("nöde/ключ") == b""
        assert store.get_meta("schema") == b"1"
    finally:
        store.close()


def test_unknown_schema_version_is_refused(store_url: str) -> None:
    store = open_store(store_url)
    store.set_meta("schema", b"99")
    store.close()
    with pytest.raises(StorageError, match="schema"):
        open_store(store_url)


#: an alphabet of awkward key bytes: NUL, 0x7f/0x80 (signedness), 0xff (prefix ends)
_KEY_BYTES = b"\x00\x01a/\x7f\x80\xfe\xff"


def _random_key(rng: random.Random) -> bytes:
    return bytes(rng.choice(_KEY_BYTES) for _ in range(rng.randrange(0, 5)))


def _check_scans(store: LedgerStore, ref: MemoryState, rng: random.Random) -> None:
    assert list(store.iter_state()) == list(ref.scan(b""))
    assert list(store.scan(b"")) == list(ref.scan(b""))
    for _ in range(150):
        prefix = _random_key(rng)[:3]
        start = rng.choice([None, _random_key(rng), prefix + _random_key(rng)])
        limit = rng.choice([None, 0, 1, 2, 3, 5, 8, 1000])
        got = list(store.scan(prefix, start=start, limit=limit))
        want = list(ref.scan(prefix, start=start, limit=limit))
        assert got == want, (prefix, start, limit)
    for key in [_random_key(rng) for _ in range(50)]:
        assert store.get(key) == ref.get(key), key


def test_state_get_and_scan_match_the_reference(
    store: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tiny pages, so the PostgreSQL iterators cross many page boundaries
    monkeypatch.setattr(pgstore, "PAGE", 3)
    rng = random.Random(5)
    ref = MemoryState()
    changes: dict[bytes, bytes | None] = {}
    while len(changes) < 200:
        changes[_random_key(rng)] = bytes([rng.randrange(256)]) * rng.randrange(0, 40)
    changes[b""] = b"the empty key"
    ref.apply(changes)
    _commit(store, 0, state=changes)
    _check_scans(store, ref, rng)

    # the next block replaces some rows, deletes others and adds new ones
    keys = sorted(ref.items())
    second: dict[bytes, bytes | None] = {}
    for k in rng.sample(keys, 60):
        second[k] = None if rng.random() < 0.5 else b"v2/" + k
    second[b"\xff\xff\xff\xff\xff"] = b"top"
    second[b"never-there"] = None  # deleting an absent key is a no-op
    ref.apply(second)
    _commit(store, 1, state=second)
    _check_scans(store, ref, rng)


def test_scan_edges(store: LedgerStore) -> None:
    keys = [
        b"a",
        b"a\x00",
        b"ab",
        b"a\x7f",
        b"a\x80",
        b"a\xff",
        b"a\xff\x00",
        b"b",
        b"\xff",
        b"\xff\xff",
    ]
    _commit(store, 0, state={k: b"v" + k for k in reversed(keys)})
    assert [k for k, _ in store.scan(b"a")] == keys[:7]
    assert [k for k, _ in store.scan(b"a\xff")] == [b"a\xff", b"a\xff\x00"]
    assert [k for k, _ in store.scan(b"\xff")] == [b"\xff", b"\xff\xff"]
    assert [k for k, _ in store.scan(b"a", start=b"a\x7f")] == keys[3:7]
    assert [k for k, _ in store.scan(b"a", start=b"")] == keys[:7]  # start below the prefix
    assert [k for k, _ in store.scan(b"a", start=b"a\x80", limit=2)] == [b"a\x80", b"a\xff"]
    assert list(store.scan(b"a", start=b"b")) == []  # start beyond the prefix
    assert list(store.scan(b"a", limit=0)) == []
    assert list(store.scan(b"c")) == []
    assert [v for _, v in store.scan(b"ab")] == [b"vab"]


def test_state_tree_nodes(store: LedgerStore) -> None:
    nodes: dict[bytes, bytes | None] = {
        b"\x00": b"\x01" + bytes(36),
        b"\x01\x30": b"\x00" + bytes(64),
        b"\x02\xab": b"\x01" + b"\xff" * 68,
    }
    _commit(store, 0, smt=nodes)
    assert store.get_node(b"\x00") == b"\x01" + bytes(36)
    assert store.get_node(b"\x01") is None
    assert list(store.iter_nodes()) == sorted((k, v) for k, v in nodes.items() if v is not None)
    _commit(store, 1, smt={b"\x01\x30": None, b"\x00": b"root2", b"\x01\x40": b"leaf"})
    assert store.get_node(b"\x01\x30") is None
    assert list(store.iter_nodes()) == [
        (b"\x00", b"root2"),
        (b"\x01\x40", b"leaf"),
        (b"\x02\xab", b"\x01" + b"\xff" * 68),
    ]
    assert list(store.iter_state()) == []  # state rows and tree nodes are separate


def test_log_transactions(store: LedgerStore) -> None:
    first = [_tx(i, 1) for i in range(3)]
    second = [_tx(i, 2) for i in range(3, 8)]
    _commit(store, 0)
    _commit(store, 1, txs=first)
    _commit(store, 2, txs=second)
    every = first + second
    for t in every:
        assert store.has_tx(t.tx_id)
        assert store.get_tx(t.tx_id) == t
        assert store.get_tx_at(t.index) == t
    assert not store.has_tx(hashlib.sha256(b"other").digest())
    assert store.get_tx_at(8) is None and store.get_tx_at(-1) is None
    assert list(store.iter_txs()) == every
    assert list(store.iter_txs(2)) == every[2:]
    assert list(store.iter_txs(2, 5)) == every[2:5]
    assert list(store.iter_txs(0, 0)) == []
    assert list(store.iter_txs(6, 3)) == []
    assert list(store.iter_txs(7, 100)) == every[7:]


def test_known_txs_answers_for_many_ids_at_once(store: LedgerStore) -> None:
    stored = [_tx(i, 1) for i in range(1200)]  # more than one SQLite "IN (...)" chunk
    _commit(store, 0)
    _commit(store, 1, txs=stored)
    new = [hashlib.sha256(b"new/%d" % i).digest() for i in range(800)]
    asked = [t.tx_id for t in stored[::2]] + new + [stored[0].tx_id]  # a repeat too
    assert store.known_txs(asked) == {t.tx_id for t in stored[::2]}
    assert store.known_txs(new) == set()
    assert store.known_txs([]) == set()


def test_meta_written_with_a_block_commits_with_it(store: LedgerStore) -> None:
    _commit(store, 0)
    store.commit_block(
        BlockRecord(1, b"header/1", b"sig/1"), [_tx(0, 1)], [], {}, {}, meta={"pos": b"1"}
    )
    assert store.get_meta("pos") == b"1"
    with pytest.raises(StorageError):  # height 1 again: the whole block, meta too, is refused
        store.commit_block(
            BlockRecord(1, b"header/1", b"sig/1"), [_tx(1, 1)], [], {}, {}, meta={"pos": b"2"}
        )
    assert store.get_meta("pos") == b"1"


def test_log_tree_nodes(store: LedgerStore) -> None:
    ids = [(0, 0), (0, 1), (1, 0), (3, 5), (40, 2**50 + 3), (55, 1)]
    tree = [(i, hashlib.sha256(repr(i).encode()).digest()) for i in ids]
    _commit(store, 0, tree=list(reversed(tree)))
    by_id = dict(tree)
    want = [(3, 5), (0, 0), (40, 2**50 + 3), (0, 0), (55, 1)]  # any order, repeats allowed
    assert store.get_tree_nodes(want) == [by_id[i] for i in want]
    assert store.get_tree_nodes([]) == []
    with pytest.raises(StorageError, match="missing"):
        store.get_tree_nodes([(0, 0), (9, 9)])
    assert list(store.iter_tree_nodes()) == [(lv, ix, by_id[(lv, ix)]) for lv, ix in sorted(ids)]
    # a later block may rewrite a node (last write wins, also within one block)
    _commit(store, 1, tree=[((0, 1), b"a" * 32), ((2, 0), b"b" * 32), ((0, 1), b"c" * 32)])
    assert store.get_tree_nodes([(0, 1), (2, 0)]) == [b"c" * 32, b"b" * 32]
    assert len(list(store.iter_tree_nodes())) == len(ids) + 1


def test_blocks_and_checkpoints(store: LedgerStore) -> None:
    _commit(store, 0)
    _commit(store, 1, checkpoint="note one\n\n— sig\n")
    _commit(store, 2)
    _commit(store, 3, checkpoint="note three\n")
    assert store.head_height() == 3
    assert store.get_block(2) == BlockRecord(2, b"header/2", b"sig/2")
    assert store.get_block(4) is None
    assert [b.height for b in store.iter_blocks()] == [0, 1, 2, 3]
    assert [b.height for b in store.iter_blocks(2)] == [2, 3]
    assert list(store.iter_blocks(9)) == []
    assert store.get_checkpoint() == (3, "note three\n")
    assert store.get_checkpoint(1) == (1, "note one\n\n— sig\n")
    assert store.get_checkpoint(2) is None
    store.put_checkpoint(2, "note two")
    store.put_checkpoint(1, "note one, co-signed")
    assert list(store.iter_checkpoints()) == [
        (1, "note one, co-signed"),
        (2, "note two"),
        (3, "note three\n"),
    ]
    store.put_checkpoint(7, "ahead of the head")
    assert store.get_checkpoint() == (7, "ahead of the head")


def _full_block(height: int, first: int, n: int) -> dict[str, Any]:
    return {
        "txs": [_tx(first + i, height) for i in range(n)],
        "tree": [((0, first + i), bytes([height]) * 32) for i in range(n)],
        "state": {b"row/%d/%d" % (height, i): b"v" for i in range(n)},
        "smt": {b"\x01node/%d/%d" % (height, i): b"n" for i in range(n)},
        "checkpoint": f"checkpoint {height}",
    }


def test_commit_with_a_duplicate_tx_id_in_the_block_leaves_nothing(store: LedgerStore) -> None:
    _commit(store, 0, **_full_block(0, 0, 3))
    before = _snapshot(store)
    bad = _full_block(1, 3, 4)
    bad["txs"][3] = _tx(6, 1, tag=b"3")  # same bytes, hence same id, as tx 3
    with pytest.raises(StorageError, match="block 1"):
        _commit(store, 1, **bad)
    assert _snapshot(store) == before
    assert store.head_height() == 0
    # the store is still usable, and the block commits once corrected
    _commit(store, 1, **_full_block(1, 3, 4))
    assert store.head_height() == 1 and len(list(store.iter_txs())) == 7


def test_commit_with_a_tx_id_already_on_the_ledger_leaves_nothing(store: LedgerStore) -> None:
    _commit(store, 0, **_full_block(0, 0, 3))
    before = _snapshot(store)
    bad = _full_block(1, 3, 3)
    bad["txs"][2] = _tx(5, 1, tag=b"1")  # tx 1's bytes again
    with pytest.raises(StorageError):
        _commit(store, 1, **bad)
    assert _snapshot(store) == before


@pytest.mark.parametrize("clash", ["height", "index"])
def test_commit_of_an_existing_height_or_index_leaves_nothing(
    store: LedgerStore, clash: str
) -> None:
    _commit(store, 0, **_full_block(0, 0, 3))
    _commit(store, 1, **_full_block(1, 3, 2))
    before = _snapshot(store)
    bad = _full_block(1, 5, 2) if clash == "height" else _full_block(2, 4, 2)
    with pytest.raises(StorageError):
        _commit(store, 1 if clash == "height" else 2, **bad)
    assert _snapshot(store) == before


def test_rows_of_earlier_or_failed_blocks_never_come_back(store: LedgerStore) -> None:
    _commit(store, 0, state={b"k": b"v1"}, smt={b"n": b"v1"}, tree=[((0, 0), b"t" * 32)])
    _commit(store, 1, state={b"k": None}, smt={b"n": None})
    with pytest.raises(StorageError):  # fails after its rows were sent
        _commit(
            store,
            2,
            txs=[_tx(0, 2), _tx(1, 2, tag=b"0")],
            state={b"ghost": b"g"},
            smt={b"ghost": b"g"},
            tree=[((0, 9), b"g" * 32)],
        )
    _commit(store, 2, state={b"j": b"v3"}, smt={b"m": b"v3"})
    assert list(store.iter_state()) == [(b"j", b"v3")]
    assert list(store.iter_nodes()) == [(b"m", b"v3")]
    assert list(store.iter_tree_nodes()) == [(0, 0, b"t" * 32)]


def _write(height: int, first: int, n: int, **changes: Any) -> BlockWrite:
    b = _full_block(height, first, n)
    b.update(changes)
    return BlockWrite(
        BlockRecord(height, b"header/%d" % height, b"sig/%d" % height),
        b["txs"],
        b["tree"],
        b["state"],
        b["smt"],
        b["checkpoint"],
    )


def test_a_group_of_blocks_stores_what_one_commit_per_block_stores(
    store_url: str, tmp_path: Path
) -> None:
    # later blocks rewrite and delete earlier blocks' rows: last write wins, as one by one
    blocks = [
        _write(0, 0, 2),
        _write(1, 2, 3, state={b"k": b"1", b"gone": b"x"}, smt={b"\x01n": b"1", b"\x01m": b"m"}),
        _write(2, 5, 1, state={b"k": b"2", b"gone": None}, smt={b"\x01n": None}),
        _write(3, 6, 2, tree=[((0, 6), b"z" * 32), ((0, 2), b"y" * 32)], checkpoint=None),
    ]
    one = open_store(f"sqlite:///{tmp_path / 'one.db'}")
    group = open_store(store_url)
    try:
        for w in blocks:
            one.commit_block(
                w.block, w.txs, w.tree_nodes, w.state_changes, w.smt_writes, w.checkpoint
            )
        group.commit_blocks(blocks[:1])
        group.commit_blocks(blocks[1:], meta={"pos": b"3"})
        assert _snapshot(group) == _snapshot(one)
        assert group.get_meta("pos") == b"3"
        assert group.get_tree_nodes([(0, 2)]) == [b"y" * 32]
    finally:
        one.close()
        group.close()


def test_a_group_that_fails_in_any_block_leaves_nothing(store: LedgerStore) -> None:
    store.commit_blocks([_write(0, 0, 3)], meta={"pos": b"0"})
    before = _snapshot(store)
    bad = _write(3, 9, 2, txs=[_tx(9, 3), _tx(10, 3, tag=b"1")])  # tx 1's bytes again
    with pytest.raises(StorageError, match=r"block 1\.\.3"):
        store.commit_blocks([_write(1, 3, 3), _write(2, 6, 3), bad], meta={"pos": b"3"})
    assert _snapshot(store) == before
    assert store.get_meta("pos") == b"0"
    store.commit_blocks([_write(1, 3, 3), _write(2, 6, 3)], meta={"pos": b"2"})
    assert store.head_height() == 2 and store.get_meta("pos") == b"2"


def test_a_block_of_two_thousand_transactions(store: LedgerStore) -> None:
    n = 2000
    block = {
        "txs": [_tx(i, 0) for i in range(n)],
        "tree": [((0, i), hashlib.sha256(b"%d" % i).digest()) for i in range(n)],
        "state": {hashlib.sha256(b"k%d" % i).digest(): os.urandom(120) for i in range(5 * n)},
        "smt": {
            b"\x03" + hashlib.sha256(b"n%d" % i).digest(): os.urandom(300) for i in range(10 * n)
        },
    }
    _commit(store, 0, **block)  # its speed is measured in bench/bench_pgstore.py, not here
    assert list(store.iter_txs()) == block["txs"]
    assert list(store.iter_state()) == sorted(block["state"].items())
    assert list(store.iter_nodes()) == sorted(block["smt"].items())
    assert len(list(store.iter_tree_nodes())) == n
    # and deleting them all again is one block too
    _commit(
        store,
        1,
        state=dict.fromkeys(block["state"]),
        smt=dict.fromkeys(block["smt"]),
    )
    assert list(store.iter_state()) == [] and list(store.iter_nodes()) == []


def test_everything_survives_reopening(store_url: str) -> None:
    store = open_store(store_url)
    for h in range(3):
        _commit(store, h, **_full_block(h, 3 * h, 3))
    store.set_meta("genesis", b"g")
    before = _snapshot(store)
    store.close()
    store = open_store(store_url)
    try:
        assert _snapshot(store) == before
        assert store.get_meta("genesis") == b"g"
    finally:
        store.close()


def test_a_closed_store_raises_storage_error(store_url: str) -> None:
    store = open_store(store_url)
    store.close()
    with pytest.raises(StorageError):
        store.get(b"x")
    with pytest.raises(StorageError):
        store.head_height()
    with pytest.raises(StorageError):
        list(store.iter_state())
    with pytest.raises(StorageError):
        _commit(store, 0)
    store.close()  # closing twice is harmless


def test_store_urls(store_url: str, tmp_path: Path) -> None:
    store = open_store(store_url)
    try:
        expected = SqliteStore if store_url.startswith("sqlite") else PostgresStore
        assert isinstance(store, expected)
        store.set_meta("here", b"yes")
    finally:
        store.close()
    again = open_store(store.url)  # a store's url opens it again
    try:
        assert again.get_meta("here") == b"yes"
    finally:
        again.close()
    with pytest.raises(StorageError, match="scheme"):
        open_store("mysql://localhost/ledger")
    with pytest.raises(StorageError):
        open_store("sqlite://host/ledger.db")


# -- PostgreSQL specifics ----------------------------------------------------------------------


def _pg(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(url, autocommit=True)


def test_pg_tables_are_prefixed_and_postgres_scheme_works(pg_url: str) -> None:
    store = open_store(pg_url.replace("postgresql://", "postgres://", 1))
    store.close()
    with _pg(pg_url) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    assert sorted(t for (t,) in tables) == [
        "ledger_blocks",
        "ledger_checkpoints",
        "ledger_meta",
        "ledger_smt",
        "ledger_state",
        "ledger_tree",
        "ledger_txs",
    ]


def test_pg_connection_errors_are_storage_errors(pg_url: str) -> None:
    with pytest.raises(StorageError, match="cannot connect"):
        open_store("postgresql://postgres:s3cret@127.0.0.1:1/nowhere")
    try:
        open_store("postgresql://postgres:s3cret@127.0.0.1:1/nowhere")
    except StorageError as exc:
        assert "s3cret" not in str(exc)
    missing = pg.url_for("mlt_does_not_exist_" + os.urandom(4).hex())
    with pytest.raises(StorageError, match="does not exist"):
        open_store(missing)
    with pytest.raises(StorageError):
        open_store("postgresql://[not a url")


def _kill_backend(url: str, store: PostgresStore) -> None:
    pid = store._db.info.backend_pid
    with _pg(url) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    deadline = time.monotonic() + 5
    with _pg(url) as conn:
        while conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_pg_reconnects_after_losing_its_connection(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        _commit(store, 0, **_full_block(0, 0, 2))
        _kill_backend(pg_url, store)
        assert store.head_height() == 0  # a read reconnects and retries
        _kill_backend(pg_url, store)
        _commit(store, 1, **_full_block(1, 2, 2))  # so does a commit that never started
        _kill_backend(pg_url, store)
        assert list(store.scan(b"row/1/")) == [(b"row/1/0", b"v"), (b"row/1/1", b"v")]
        _kill_backend(pg_url, store)
        store.set_meta("k", b"v")
        assert store.get_meta("k") == b"v"
        assert store.head_height() == 1
    finally:
        store.close()


def test_pg_a_block_whose_commit_outcome_was_lost_is_not_applied_twice(pg_url: str) -> None:
    """The connection drops after the server committed the block: the store finds it there."""
    store, other = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        _commit(store, 0, **_full_block(0, 0, 2))
        block1 = _full_block(1, 2, 3)
        _commit(other, 1, **block1)  # the server has it; our client never heard back
        _kill_backend(pg_url, store)
        _commit(store, 1, **block1)  # no error: it is the block that is stored
        assert store.head_height() == 1 and len(list(store.iter_txs())) == 5
        # a different block at that height is still refused
        _kill_backend(pg_url, store)
        with pytest.raises(StorageError, match="block 1"):
            store.commit_block(BlockRecord(1, b"another header", b"sig"), [], [], {}, {})
        assert store.get_block(1) == BlockRecord(1, b"header/1", b"sig/1")
    finally:
        store.close()
        other.close()


def test_pg_failure_in_the_last_statement_rolls_back_the_whole_block(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        _commit(store, 0, **_full_block(0, 0, 2))
        before = _snapshot(store)
        bad = _full_block(1, 2, 3) | {"checkpoint": "a NUL \x00 is not valid text"}
        with pytest.raises(StorageError, match="block 1"):
            _commit(store, 1, **bad)
        assert _snapshot(store) == before
    finally:
        store.close()


class _CountingStore(PostgresStore):
    """Counts the point queries that reach the server."""

    queries = 0

    def _one(self, what: str, sql: str, args: Sequence[object]) -> tuple[Any, ...] | None:
        self.queries += 1
        return super()._one(what, sql, args)


def test_pg_absent_keys_and_new_tx_ids_cost_no_query(pg_url: str) -> None:
    store = _CountingStore(pg_url)
    try:
        txs = [_tx(i, 0) for i in range(50)]
        _commit(store, 0, txs=txs, state={b"k%d" % i: b"v" for i in range(500)})
        store.queries = 0
        assert all(store.get(b"k%d" % i) == b"v" for i in range(500))
        assert all(store.has_tx(t.tx_id) for t in txs)
        assert store.queries == 550  # one each: present keys are looked up
        store.queries = 0
        assert all(store.get(b"absent/%d" % i) is None for i in range(2000))
        assert not any(store.has_tx(hashlib.sha256(b"new/%d" % i).digest()) for i in range(2000))
        assert store.queries < 40  # ~0.3 % false positives
    finally:
        store.close()


def _table_stats(
    conn: psycopg.Connection[tuple[Any, ...]], column: str, *tables: str
) -> tuple[int, ...]:
    """``column`` of ``pg_stat_user_tables`` for ``tables``, in that order, as seen after
    this session's own counts were flushed (they otherwise reach the shared statistics
    only at its next idle moment)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    got = dict(
        conn.execute(
            f"SELECT relname, {column} FROM pg_stat_user_tables WHERE relname = ANY(%s)",
            (list(tables),),
        ).fetchall()
    )
    return tuple(int(got[t]) for t in tables)


def test_pg_key_list_lookups_use_the_index_after_the_table_grew(pg_url: str) -> None:
    # psycopg prepares a statement after a few runs and PostgreSQL may then keep one
    # generic plan: for "= ANY($1)" on a small table that is a sequential scan, kept
    # while the table grows unless something analyses it (this server's autovacuum
    # is off). known_txs runs for every block.
    store = PostgresStore(pg_url)
    try:
        few = [_tx(i, 0) for i in range(300)]
        _commit(store, 0, txs=few, tree=[((0, i), b"%032d" % i) for i in range(300)])
        # past psycopg's prepare threshold, on small tables, with lists of a block's size
        # (PostgreSQL prefers its generic plan for a list of more than ~10 keys)
        absent = [hashlib.sha256(b"absent/%d" % i).digest() for i in range(30)]
        for _ in range(12):
            assert store.known_txs([few[0].tx_id, *absent]) == {few[0].tx_id}
            nodes = store.get_tree_nodes([(0, i % 3) for i in range(30)])
            assert nodes == [b"%032d" % (i % 3) for i in range(30)]
        many = [_tx(i, 1) for i in range(300, 20_300)]
        _commit(store, 1, txs=many, tree=[((0, i), b"%032d" % i) for i in range(300, 20_300)])
        conn = store._conn()

        def seq_scans() -> tuple[int, ...]:
            return _table_stats(conn, "seq_scan", "ledger_txs", "ledger_tree")

        before = seq_scans()
        for _ in range(3):
            asked = [many[7].tx_id, many[-1].tx_id, *absent]
            assert store.known_txs(asked) == {many[7].tx_id, many[-1].tx_id}
            at = [(0, 10 + 600 * i) for i in range(30)]
            assert store.get_tree_nodes(at) == [b"%032d" % i for _, i in at]
        assert seq_scans() == before  # neither table was read whole
    finally:
        store.close()


def test_pg_deletions_read_only_their_keys_after_the_tables_grew(pg_url: str) -> None:
    # A store's first commit runs on empty tables. A statement prepared then keeps the
    # plan it got (this server's autovacuum is off, so nothing analyses the tables): a
    # large first commit (a node catching up) made deleting a commit's keys a hash join
    # that read the whole table, at every later commit that deleted anything, however
    # large the table had grown.
    store = PostgresStore(pg_url)
    try:
        first: dict[bytes, bytes | None] = {b"s/0/%d" % i: b"v" for i in range(4000)}
        _commit(store, 0, state={**first, b"s/gone": None}, smt={**first, b"n/gone": None})
        for h in range(1, 6):
            _commit(
                store,
                h,
                state={b"s/%d/%d" % (h, i): b"v" for i in range(4000)},
                smt={b"n/%d/%d" % (h, i): b"v" for i in range(4000)},
            )
        conn = store._conn()

        def rows_read() -> tuple[int, ...]:
            return _table_stats(conn, "seq_tup_read", "ledger_state", "ledger_smt")

        before = rows_read()
        for h in range(6, 9):
            _commit(
                store,
                h,
                state={b"s/1/%d" % h: None, b"s/new/%d" % h: b"v"},
                smt={b"n/2/%d" % h: None, b"n/new/%d" % h: b"v"},
            )
        after = rows_read()
        assert after[0] - before[0] < 100 and after[1] - before[1] < 100, (before, after)
        for h in range(6, 9):
            assert store.get(b"s/1/%d" % h) is None and store.get(b"s/new/%d" % h) == b"v"
            assert store.get_node(b"n/2/%d" % h) is None and store.get_node(b"n/new/%d" % h) == b"v"
        assert store.get(b"s/1/9") == b"v" and store.get_node(b"n/2/9") == b"v"
    finally:
        store.close()


def test_pg_rows_taken_for_new_are_inserted_and_a_wrong_guess_costs_a_retry(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Rows known to be new (log tree nodes, state keys the presence filter knows to be
    # absent, state tree positions the tree held no node at) are inserted without
    # ON CONFLICT's look-up. Should one be there after all (a bug, or another writer of
    # the tables), the commit is rolled back and retried with every row an upsert.
    store = PostgresStore(pg_url)
    other = PostgresStore(pg_url)  # a second writer, unknown to the first's filter
    try:
        assert store.get(b"s/shared") is None  # loads the state filter
        _commit(store, 0, state={b"s/a": b"1"}, smt={b"\x05n/a": b"1"}, tree=[((0, 0), b"a" * 32)])
        caplog.set_level("WARNING", logger="medledger.store")
        store.commit_blocks(
            [
                BlockWrite(
                    BlockRecord(1, b"header/1", b"sig/1"),
                    [],
                    [((0, 1), b"b" * 32)],
                    {b"s/a": b"2", b"s/b": b"1"},
                    {b"\x05n/a": b"2", b"\x05n/b": b"1"},
                    smt_new=frozenset({b"\x05n/b"}),
                )
            ]
        )
        assert not caplog.records  # the guesses were right: no retry
        other.set_meta("x", b"y")
        _commit(other, 2, state={b"s/shared": b"theirs"})
        # the first store's filter still says absent: its insert fails, the retry upserts
        store.commit_blocks(
            [
                BlockWrite(
                    BlockRecord(3, b"header/3", b"sig/3"),
                    [],
                    [],
                    {b"s/shared": b"mine"},
                    {b"\x05n/a": b"3"},
                    smt_new=frozenset({b"\x05n/a"}),  # wrong: it is stored
                )
            ]
        )
        assert len(caplog.records) == 1
        assert "retrying with upserts" in caplog.records[0].getMessage()
        assert store.get(b"s/shared") == b"mine" and store.get(b"s/a") == b"2"
        assert store.get_node(b"\x05n/a") == b"3" and store.get_node(b"\x05n/b") == b"1"
        assert store.get_tree_nodes([(0, 0), (0, 1)]) == [b"a" * 32, b"b" * 32]
        assert store.head_height() == 3
        # a block already there still fails, after the retry, and leaves nothing
        before = _snapshot(store)
        with pytest.raises(StorageError, match="block 3"):
            _commit(store, 3, state={b"s/c": b"1"}, tree=[((0, 2), b"c" * 32)])
        assert _snapshot(store) == before
    finally:
        other.close()
        store.close()


def test_pg_a_group_takes_a_position_for_new_only_if_its_first_block_did(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # In a group commit, the rows of all its blocks are merged per key (the last write
    # wins). A state tree position is new to the table only if the first block that
    # touches it found it empty: a later block finds the earlier one's node there.
    store = PostgresStore(pg_url)
    try:
        _commit(store, 0, smt={b"\x05q": b"old"})
        caplog.set_level("WARNING", logger="medledger.store")

        def write(height: int, smt: dict[bytes, bytes | None], new: set[bytes]) -> BlockWrite:
            return BlockWrite(
                BlockRecord(height, b"header/%d" % height, b"sig/%d" % height),
                [],
                [],
                {},
                smt,
                smt_new=frozenset(new),
            )

        store.commit_blocks(
            [
                write(1, {b"\x05p": b"p1", b"\x05q": None}, {b"\x05p"}),  # p made, q removed
                write(2, {b"\x05p": b"p2", b"\x05q": b"q2"}, {b"\x05q"}),  # p rewritten, q made
            ]
        )
        assert not caplog.records  # p inserted, q (still in the table) upserted
        assert store.get_node(b"\x05p") == b"p2" and store.get_node(b"\x05q") == b"q2"
    finally:
        store.close()


@pytest.mark.parametrize("filters", [True, False])
def test_pg_presence_filters_grow_and_stay_exact(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, filters: bool
) -> None:
    monkeypatch.setattr(pgstore, "BLOOM_MIN_CAPACITY", 16)
    # rows already stored when the store opens, then many more in later blocks
    first = PostgresStore(pg_url)
    _commit(first, 0, txs=[_tx(0, 0)], state={b"old": b"o"})
    first.close()
    store = PostgresStore(pg_url, presence_filters=filters)
    try:
        assert store.get(b"old") == b"o" and store.has_tx(_tx(0, 0).tx_id)
        index = 1
        for h in range(1, 21):
            txs = [_tx(index + i, h) for i in range(10)]
            index += 10
            state: dict[bytes, bytes | None] = {b"r/%d/%d" % (h, i): b"%d" % h for i in range(10)}
            if h % 3 == 0:
                state[b"r/%d/0" % (h - 1)] = None
            _commit(store, h, txs=txs, state=state)
            for t in txs:
                assert store.has_tx(t.tx_id)
            for k, v in state.items():
                assert store.get(k) == v
        for h in range(1, 21):
            deleted = (h + 1) % 3 == 0 and h < 20  # by block h + 1
            assert store.get(b"r/%d/0" % h) == (None if deleted else b"%d" % h)
        assert store.get(b"old") == b"o"
        assert [t.index for t in store.iter_txs()] == list(range(index))
        assert all(store.has_tx(t.tx_id) for t in store.iter_txs())
        assert not store.has_tx(bytes(32)) and store.get(b"r/99/0") is None
    finally:
        store.close()


def test_presence_filter_grows_in_layers_without_false_negatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pgstore, "BLOOM_MIN_CAPACITY", 1024)
    f = pgstore._Presence(0)
    keys = [b"state/%d" % i for i in range(31 * 1024)]  # five full layers: 1, 2, 4, 8, 16 K
    for k in keys:
        f.add(k)
        f.add(k)  # a key written again is counted once
    assert all(k in f for k in keys)
    assert [layer.capacity for layer in f.layers][:5] == [1024, 2048, 4096, 8192, 16384]
    assert len(f.layers) <= 6 and f.count <= len(keys)
    # false positives, every layer full: the layers' rates add up to about 0.5 %
    probes = 200_000
    rate = sum(b"absent/%d" % i in f for i in range(probes)) / probes
    assert 0.002 < rate < 0.0065, rate


def test_pg_presence_filters_never_reload_their_table_as_they_grow(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A filter is read from its table once; it then grows with the writes. (Rebuilding
    # it from the table when full paused the node for the whole read, every doubling.)
    monkeypatch.setattr(pgstore, "BLOOM_MIN_CAPACITY", 16)
    store = PostgresStore(pg_url)
    loads: list[str] = []
    load = store._load_filter

    def counted(table: str) -> Any:
        loads.append(table)
        return load(table)

    monkeypatch.setattr(store, "_load_filter", counted)
    try:
        assert store.get(b"nothing") is None and not store.has_tx(bytes(32))
        index = 0
        for h in range(30):  # 600 state keys and 300 transactions: many times 16
            txs = [_tx(index + i, h) for i in range(10)]
            index += 10
            _commit(store, h, txs=txs, state={b"k/%d/%d" % (h, i): b"v" for i in range(20)})
            assert store.get(b"k/%d/19" % h) == b"v" and store.has_tx(txs[-1].tx_id)
        assert sorted(loads) == ["state", "txs"]
        store.queries = 0
        assert all(store.get(b"absent/%d" % i) is None for i in range(2000))
        assert store.queries < 40
        assert all(store.get(b"k/%d/%d" % (h, i)) == b"v" for h in range(30) for i in range(20))
    finally:
        store.close()


def test_pg_concurrent_first_opens_create_the_schema_once(pg_url: str) -> None:
    errors: list[BaseException] = []
    stores: list[LedgerStore] = []
    barrier = threading.Barrier(4)

    def opener() -> None:
        barrier.wait()
        try:
            stores.append(open_store(pg_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert not errors, errors
    assert len(stores) == 4


def test_pg_one_ledger_per_schema(pg_url: str) -> None:
    with _pg(pg_url) as conn:
        conn.execute("CREATE SCHEMA node_a; CREATE SCHEMA node_b")
    a = open_store(pg_url + "?options=-csearch_path%3Dnode_a")
    b = open_store(pg_url + "?options=-csearch_path%3Dnode_b")
    try:
        _commit(a, 0, state={b"k": b"a"})
        assert b.head_height() is None and b.get(b"k") is None
        _commit(b, 0, state={b"k": b"b"})
        assert a.get(b"k") == b"a" and b.get(b"k") == b"b"
    finally:
        a.close()
        b.close()


# -- end to end: a realistic ledger on both backends ---------------------------------------------

FULL_MIX = {kind: 1.0 for kind in KINDS} | {"access": 6.0}
CHUNK_MS = 60_000


@dataclass
class Ledgers:
    workload: Workload
    sqlite_url: str
    pg_url: str
    txs: int
    head: int
    #: more transactions, valid after the committed ones, stamped ``extra_time``
    extra: list[Transaction]
    extra_time: int


def _accepted(results: Sequence[object]) -> list[Receipt]:
    bad = [r for r in results if not isinstance(r, Receipt)]
    assert not bad, bad[:3]
    return [r for r in results if isinstance(r, Receipt)]


async def _build_both(sqlite_url: str, pg_url: str) -> Ledgers:
    wl = Workload(31, orgs=3, patients_per_org=8)
    nodes = [await Node.create(u, wl.genesis, signers=wl.signers) for u in (sqlite_url, pg_url)]
    count = 0
    try:
        chunks = [wl.setup_txs()]
        for _ in range(8):
            wl.time += CHUNK_MS
            chunks.append(wl.mixed(120, mix=FULL_MIX))
        block_time = wl.genesis["time"] + 1_000
        for chunk in chunks:
            block_time = max(block_time, chunk[0].time)
            for node in nodes:
                node.clock = lambda t=block_time: t
                _accepted(await node.commit_batch(chunk))
            count += len(chunk)
        head = nodes[1].head.height
    finally:
        for node in nodes:
            await node.close()
    wl.time += CHUNK_MS
    extra = wl.mixed(300, mix=FULL_MIX)
    return Ledgers(wl, sqlite_url, pg_url, count, head, extra, wl.time)


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledgers]:
    sqlite_url = f"sqlite:///{tmp_path_factory.mktemp('e2e') / 'ledger.db'}"
    with pg.pg_url("e2e") as url:
        yield asyncio.run(_build_both(sqlite_url, url))


def _verify(url: str) -> VerifyReport:
    store = open_store(url)
    try:
        return verify_ledger(store)
    finally:
        store.close()


def test_e2e_both_backends_store_identical_bytes(ledgers: Ledgers) -> None:
    a, b = open_store(ledgers.sqlite_url), open_store(ledgers.pg_url)
    try:
        assert isinstance(b, PostgresStore)
        assert b.head_height() == a.head_height() == ledgers.head >= 9
        assert a.get_meta("genesis") == b.get_meta("genesis") is not None
        for name, sa in _snapshot(a).items():
            assert _snapshot(b)[name] == sa, name
        assert len(list(b.iter_txs())) == ledgers.txs
    finally:
        a.close()
        b.close()


async def test_e2e_pg_node_reopens_proves_and_verifies(ledgers: Ledgers) -> None:
    wl = ledgers.workload
    node = await Node.open(ledgers.pg_url, signers=wl.signers)
    try:
        assert node.head.height == ledgers.head and node.head.log_size == ledgers.txs
        recs = await node.list_txs(0, ledgers.txs)
        for rec in random.Random(3).sample(recs, 20):
            proof = await node.inclusion_proof(rec.tx_id)
            cp = checkpoint_of(proof.checkpoint)
            assert proof.leaf_hash == leaf_hash(rec.raw)
            verify_inclusion(rec.index, proof.tree_size, proof.leaf_hash, proof.proof, cp.root)
        root1, root2, cproof = await node.consistency_proof(100, ledgers.txs)
        verify_consistency(100, ledgers.txs, cproof, root1, root2)
        assert await node.state_get(b"cfg/network") is not None
        sqlite = open_store(ledgers.sqlite_url)
        try:
            for prefix in (b"patient/", b"consent/", b"record/", b"seq/"):
                rows = await node.state_scan(prefix)
                assert rows and rows == list(sqlite.scan(prefix)), prefix
                assert await node.state_scan(prefix, limit=3) == rows[:3]
        finally:
            sqlite.close()
    finally:
        await node.close()
    report = _verify(ledgers.pg_url)
    assert report.ok, report.failure
    assert report.transactions == ledgers.txs and report.blocks == ledgers.head + 1
    assert report.checkpoints == ledgers.head
    sqlite_report = _verify(ledgers.sqlite_url)
    assert sqlite_report.to_json() == report.to_json()


async def test_e2e_pg_node_keeps_committing_through_its_orderer(ledgers: Ledgers) -> None:
    wl = ledgers.workload
    with pg.pg_clone(ledgers.pg_url) as url:
        node = await Node.open(url, signers=wl.signers)
        try:
            node.clock = lambda: ledgers.extra_time
            await node.start(max_batch=100)
            results = await asyncio.gather(*(node.enqueue(tx) for tx in ledgers.extra))
            receipts = _accepted(results)
            assert [r.index for r in receipts] == list(
                range(ledgers.txs, ledgers.txs + len(ledgers.extra))
            )
            assert node.head.height > ledgers.head + 1  # several blocks of at most 100
            # a replayed transaction is refused and changes nothing
            head = node.head
            with pytest.raises(ReplayedTransaction):
                await node.submit(ledgers.extra[0])
            assert node.head == head
        finally:
            await node.close()
        node = await Node.open(url, signers=wl.signers)
        try:
            assert node.head == head
        finally:
            await node.close()
        report = _verify(url)
        assert report.ok, report.failure
        assert report.transactions == ledgers.txs + len(ledgers.extra)


# -- tampering with the PostgreSQL rows ------------------------------------------------------------

Conn = psycopg.Connection[tuple[Any, ...]]


def _val(conn: Conn, sql: str, *args: object) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None, sql
    return row[0]


def _flip_sql(table: str, col: str, where: str) -> str:
    """SQL flipping the lowest bit of the middle byte of ``col`` in the row(s) ``where``."""
    mid = f"length({col}) / 2"
    flipped = f"set_byte({col}, {mid}, get_byte({col}, {mid}) # 1)"
    return f"UPDATE {table} SET {col} = {flipped} WHERE {where}"


def _first_of_last_block(conn: Conn) -> int:
    return int(
        _val(
            conn,
            "SELECT min(idx) FROM ledger_txs "
            "WHERE height = (SELECT max(height) FROM ledger_blocks)",
        )
    )


PgTamper = Callable[[Conn], dict[str, Any]]
PG_CASES: dict[str, PgTamper] = {}


def pg_case(fn: PgTamper) -> PgTamper:
    PG_CASES[fn.__name__] = fn
    return fn


@pg_case
def state_row_byte(conn: Conn) -> dict[str, Any]:
    key = _val(conn, "SELECT k FROM ledger_state WHERE k LIKE 'consent/%%' ORDER BY k LIMIT 1")
    conn.execute(_flip_sql("ledger_state", "v", "k = %s"), (key,))
    return {"what": "state row", "message": f"{key[:48]!r} has been altered"}


@pg_case
def state_key_byte(conn: Conn) -> dict[str, Any]:
    key = _val(conn, "SELECT k FROM ledger_state WHERE k LIKE 'record/%%' ORDER BY k LIMIT 1")
    conn.execute(_flip_sql("ledger_state", "k", "k = %s"), (key,))
    return {"what": "state row", "message": "unexpected"}


@pg_case
def state_row_deleted(conn: Conn) -> dict[str, Any]:
    conn.execute(
        "DELETE FROM ledger_state "
        "WHERE k = (SELECT k FROM ledger_state WHERE k LIKE 'patient/%%' ORDER BY k DESC LIMIT 1)"
    )
    return {"what": "state row", "message": "missing"}


@pg_case
def state_row_extra(conn: Conn) -> dict[str, Any]:
    conn.execute(
        "INSERT INTO ledger_state(k, v) VALUES (%s, %s)", (b"patient/pat-" + b"0" * 32, encode({}))
    )
    return {"what": "state row", "message": "unexpected"}


@pg_case
def state_tree_node_byte(conn: Conn) -> dict[str, Any]:
    conn.execute(
        _flip_sql("ledger_smt", "v", "k = (SELECT k FROM ledger_smt ORDER BY k OFFSET 7 LIMIT 1)")
    )
    return {"what": "state tree node", "message": "altered"}


@pg_case
def tx_raw_byte(conn: Conn) -> dict[str, Any]:
    height = _val(conn, "SELECT height FROM ledger_txs WHERE idx = 500")
    conn.execute(_flip_sql("ledger_txs", "raw", "idx = 500"))
    return {"what": "tx", "index": 500, "height": height}


@pg_case
def tx_receipt_byte(conn: Conn) -> dict[str, Any]:
    height = _val(conn, "SELECT height FROM ledger_txs WHERE idx = 321")
    conn.execute(_flip_sql("ledger_txs", "receipt", "idx = 321"))
    return {"what": "tx", "index": 321, "height": height, "message": "receipt"}


@pg_case
def tx_deleted(conn: Conn) -> dict[str, Any]:
    height = _val(conn, "SELECT height FROM ledger_txs WHERE idx = 700")
    conn.execute("DELETE FROM ledger_txs WHERE idx = 700")
    return {"what": "block", "height": height}


@pg_case
def txs_swapped_within_a_block(conn: Conn) -> dict[str, Any]:
    height = _val(conn, "SELECT height FROM ledger_txs WHERE idx = 400")
    assert _val(conn, "SELECT height FROM ledger_txs WHERE idx = 401") == height
    a = conn.execute("SELECT tx_id, raw, receipt FROM ledger_txs WHERE idx = 400").fetchone()
    b = conn.execute("SELECT tx_id, raw, receipt FROM ledger_txs WHERE idx = 401").fetchone()
    conn.execute("UPDATE ledger_txs SET tx_id = 'tmp' WHERE idx = 400")
    conn.execute("UPDATE ledger_txs SET tx_id = %s, raw = %s, receipt = %s WHERE idx = 401", a)
    conn.execute("UPDATE ledger_txs SET tx_id = %s, raw = %s, receipt = %s WHERE idx = 400", b)
    return {"height": height}


@pg_case
def block_header_byte(conn: Conn) -> dict[str, Any]:
    conn.execute(_flip_sql("ledger_blocks", "header", "height = 3"))
    return {"what": "block", "height": 3}


@pg_case
def block_signature_byte(conn: Conn) -> dict[str, Any]:
    conn.execute(_flip_sql("ledger_blocks", "sig", "height = 5"))
    return {"what": "block", "height": 5, "message": "signature"}


@pg_case
def last_block_deleted(conn: Conn) -> dict[str, Any]:
    first = _first_of_last_block(conn)
    conn.execute("DELETE FROM ledger_blocks WHERE height = (SELECT max(height) FROM ledger_blocks)")
    return {"what": "tx", "index": first, "message": "beyond the last block"}


@pg_case
def log_tree_node_byte(conn: Conn) -> dict[str, Any]:
    conn.execute(
        _flip_sql(
            "ledger_tree", "hash", "id = (SELECT id FROM ledger_tree ORDER BY id OFFSET 40 LIMIT 1)"
        )
    )
    return {"what": "log tree node"}


@pg_case
def checkpoint_moved_to_another_block(conn: Conn) -> dict[str, Any]:
    conn.execute(
        "UPDATE ledger_checkpoints "
        "SET note = (SELECT note FROM ledger_checkpoints WHERE height = 2) WHERE height = 4"
    )
    return {"what": "checkpoint", "height": 4}


@pg_case
def genesis_meta_byte(conn: Conn) -> dict[str, Any]:
    conn.execute(_flip_sql("ledger_meta", "v", "k = 'genesis'"))
    return {}


@pytest.mark.parametrize("name", sorted(PG_CASES))
def test_e2e_pg_tampering_is_detected(ledgers: Ledgers, name: str) -> None:
    with pg.pg_clone(ledgers.pg_url) as url:
        with _pg(url) as conn:
            expect = PG_CASES[name](conn)
        report = _verify(url)
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


def test_e2e_pg_a_flipped_byte_in_any_kind_of_state_row_fails_verification(
    ledgers: Ledgers,
) -> None:
    with pg.pg_clone(ledgers.pg_url) as url:
        with _pg(url) as conn:
            keys = [bytes(k) for (k,) in conn.execute("SELECT k FROM ledger_state ORDER BY k")]
        kinds: dict[bytes, bytes] = {}
        for k in keys:
            kinds.setdefault(k.split(b"/", 1)[0], k)  # the first row of every key prefix
        assert len(kinds) >= 10, sorted(kinds)
        for key in kinds.values():
            with _pg(url) as conn:
                conn.execute(_flip_sql("ledger_state", "v", "k = %s"), (key,))
            report = _verify(url)
            assert not report.ok and report.failure is not None, key
            assert report.failure.what == "state row", report.failure
            assert f"{key[:48]!r} has been altered" in report.failure.message
            with _pg(url) as conn:  # flip it back
                conn.execute(_flip_sql("ledger_state", "v", "k = %s"), (key,))
        assert _verify(url).ok  # everything restored, byte for byte


# -- durability: a node process killed with SIGKILL ------------------------------------------------

_WORKER = r"""
import asyncio, hashlib, sys, time
from medledger.contracts.core import k_seq
from medledger.encoding import decode
from medledger.ledger.tx import make_tx
from medledger.node import Node
from medledger.workload import Workload

async def main(url: str, seed: str) -> None:
    wl = Workload(seed, orgs=1, patients_per_org=1)
    admin = wl.key("admin-org-01")
    node = await Node.open(url, wl.signers)
    raw = await node.state_get(k_seq(admin.key_id))
    seq = 0 if raw is None else int(decode(raw))
    await node.start(verify_workers=0)  # no worker process to orphan when killed
    out = sys.stdout
    out.write(f"ready {seq}\n")
    out.flush()

    async def submit(tx):
        receipt = await node.submit(tx)
        out.write(f"{tx.tx_id.hex()} {receipt.index}\n")
        out.flush()

    while True:
        now = int(time.time() * 1000)
        digest = lambda s: hashlib.sha256(f"pg-crash/{s}".encode()).digest()
        batch = [
            make_tx(admin, wl.network, "note.anchor", {"digest": digest(s), "kind": "other"},
                    seq=s, time=now)
            for s in range(seq + 1, seq + 17)
        ]
        await asyncio.gather(*(submit(tx) for tx in batch))
        seq += 16

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _run_worker(url: str, seed: str, rng: random.Random) -> tuple[int, list[tuple[bytes, int]]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, url, seed],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode()
            if not line.endswith("\n"):  # torn by the kill: not an acknowledgement
                break
            lines.append(line.rstrip("\n"))
            ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(timeout=60), "worker did not start"
        time.sleep(rng.uniform(0.3, 1.2))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        reader.join(timeout=10)
    assert proc.stderr is not None
    errors = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, errors)
    assert lines and lines[0].startswith("ready"), errors
    acks = [(bytes.fromhex(t), int(i)) for t, i in (line.split() for line in lines[1:])]
    return int(lines[0].split()[1]), acks


@pytest.mark.slow
def test_e2e_pg_sigkill_never_loses_acknowledged_transactions(pg_url: str) -> None:
    seed = "pg-crash"
    wl = Workload(seed, orgs=1, patients_per_org=1, genesis_time=int(time.time() * 1000) - 1000)

    async def create() -> None:
        node = await Node.create(pg_url, wl.genesis, signers=wl.signers)
        await node.close()

    asyncio.run(create())
    admin_kid = wl.key("admin-org-01").key_id
    rng = random.Random(11)
    acknowledged: dict[bytes, int] = {}
    last_seq = 0
    for round_ in range(3):
        start_seq, acks = _run_worker(pg_url, seed, rng)
        assert start_seq == last_seq, (round_, start_seq, last_seq)
        for tx_id, index in acks:
            assert acknowledged.setdefault(tx_id, index) == index
        store = open_store(pg_url)
        try:
            for tx_id, index in acknowledged.items():
                rec = store.get_tx_at(index)
                assert rec is not None, f"round {round_}: acknowledged tx #{index} lost"
                assert rec.tx_id == tx_id, f"round {round_}: tx #{index} is another tx"
            report = verify_ledger(store)
            assert report.ok, f"round {round_}: {report.failure}"
            raw = store.get(k_seq(admin_kid))
            last_seq = 0 if raw is None else int(decode(raw))
            stored = list(store.iter_txs())
            assert report.transactions == len(stored) >= len(acknowledged)
            assert [Transaction.from_bytes(r.raw).seq for r in stored] == list(
                range(1, last_seq + 1)
            )
        finally:
            store.close()
    assert acknowledged, "no transaction was ever acknowledged"
