"""The node's read cache (``medledger.node._ReadCache``): bounded, never stale.

Checked against a plain dict (the store, counting its reads) under random
interleavings of reads and commits that overflow the cache many times.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from medledger.node import _ReadCache


class CountingStore:
    """Just what the cache reads: ``get`` and ``get_node`` over dicts."""

    def __init__(self) -> None:
        self.rows: dict[bytes, bytes] = {}
        self.nodes: dict[bytes, bytes] = {}
        self.reads = 0

    def get(self, key: bytes) -> bytes | None:
        self.reads += 1
        return self.rows.get(key)

    def get_node(self, key: bytes) -> bytes | None:
        self.reads += 1
        return self.nodes.get(key)

    def commit(
        self, cache: _ReadCache, rows: dict[bytes, bytes | None], nodes: dict[bytes, bytes | None]
    ) -> None:
        for table, changes in ((self.rows, rows), (self.nodes, nodes)):
            for k, v in changes.items():
                if v is None:
                    table.pop(k, None)
                else:
                    table[k] = v
        cache.committed(rows, nodes)


KEYS = [bytes([i]) for i in range(40)]
ops = st.lists(
    st.tuples(
        st.sampled_from(["get", "get_node", "commit"]),
        st.sampled_from(KEYS),
        st.one_of(st.none(), st.binary(min_size=1, max_size=3)),
    ),
    max_size=300,
)


@given(ops=ops, limit=st.integers(min_value=1, max_value=12))
@settings(max_examples=200, deadline=None)
def test_cache_always_answers_what_the_store_holds(
    ops: list[tuple[str, bytes, bytes | None]], limit: int
) -> None:
    store = CountingStore()
    cache = _ReadCache(store, limit=limit)  # type: ignore[arg-type]
    for op, key, value in ops:
        if op == "get":
            assert cache.get(key) == store.rows.get(key)
        elif op == "get_node":
            assert cache.get_node(key) == store.nodes.get(key)
        else:
            store.commit(cache, {key: value}, {key: value})
        assert len(cache.rows) < max(1, limit // 2) + 1
        assert len(cache.nodes) < max(1, limit // 2) + 1


def test_hot_entries_survive_turnover() -> None:
    # a few keys read all the time among many read once: after many turnovers the
    # hot ones are still answered without going back to the store
    store = CountingStore()
    hot = [b"hot-%d" % i for i in range(5)]
    for k in hot:
        store.rows[k] = b"v" + k
    cache = _ReadCache(store, limit=100)  # type: ignore[arg-type]
    rng = random.Random(7)
    for i in range(5_000):
        cache.get(b"cold-%d" % i)
        cache.get(rng.choice(hot))
    before = store.reads
    for k in hot:
        assert cache.get(k) == b"v" + k
    assert store.reads == before
    # each cold key was read once and each hot key about once in all: a cache that
    # cleared itself when full would have re-read the hot keys after every clear
    # (some 5 x 100 more reads)
    assert store.reads <= 5_000 + 5 * 3
