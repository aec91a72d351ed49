"""MemoryState and Overlay: point reads, merged scans, nested savepoints."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from medledger.errors import MedledgerError
from medledger.state import MemoryState, Overlay, StateReader, prefix_upper_bound

# Keys over a tiny alphabet so prefixes, 0x00 and 0xff edges collide often.
key_st = st.binary(max_size=3).map(lambda b: bytes(b"ab\x00\xff"[x % 4] for x in b))
value_st = st.binary(max_size=2)


def model_scan(
    view: dict[bytes, bytes], prefix: bytes, start: bytes | None, limit: int | None
) -> list[tuple[bytes, bytes]]:
    out = sorted(
        (k, v) for k, v in view.items() if k.startswith(prefix) and (start is None or k >= start)
    )
    return out if limit is None else out[:limit]


# -- MemoryState -------------------------------------------------------------------


def test_prefix_upper_bound() -> None:
    assert prefix_upper_bound(b"") is None
    assert prefix_upper_bound(b"\xff\xff") is None
    assert prefix_upper_bound(b"ab") == b"ac"
    assert prefix_upper_bound(b"a\xff") == b"b"
    assert prefix_upper_bound(b"a\xff\xff") == b"b"


def test_memory_state_scan_and_apply() -> None:
    s = MemoryState({b"a": b"1", b"a\x00": b"2", b"a\xff": b"3", b"b": b"4", b"\xff": b"5"})
    assert isinstance(s, StateReader)
    assert list(s.scan(b"a")) == [(b"a", b"1"), (b"a\x00", b"2"), (b"a\xff", b"3")]
    assert list(s.scan(b"a", start=b"a\x01")) == [(b"a\xff", b"3")]
    assert list(s.scan(b"a", limit=2)) == [(b"a", b"1"), (b"a\x00", b"2")]
    assert list(s.scan(b"a", limit=0)) == []
    assert list(s.scan(b"\xff")) == [(b"\xff", b"5")]
    assert [k for k, _ in s.scan(b"")] == [b"a", b"a\x00", b"a\xff", b"b", b"\xff"]
    s.apply({b"a": None, b"c": b"6", b"zz": None})
    assert s.get(b"a") is None and s.get(b"c") == b"6"
    assert [k for k, _ in s.scan(b"")] == [b"a\x00", b"a\xff", b"b", b"c", b"\xff"]
    assert len(s) == 5 and b"c" in s
    with pytest.raises(ValueError):
        s.scan(b"", limit=-1)


# -- Overlay: examples ---------------------------------------------------------------


def test_overlay_reads_and_scan_merge() -> None:
    base = MemoryState({b"k1": b"b1", b"k2": b"b2", b"k4": b"b4", b"x": b"bx"})
    o = Overlay(base)
    o.put(b"k3", b"o3")
    o.put(b"k2", b"o2")
    o.delete(b"k4")
    o.put(b"k0", b"o0")
    assert o.get(b"k2") == b"o2" and o.get(b"k4") is None and o.get(b"k1") == b"b1"
    assert list(o.scan(b"k")) == [
        (b"k0", b"o0"),
        (b"k1", b"b1"),
        (b"k2", b"o2"),
        (b"k3", b"o3"),
    ]
    assert list(o.scan(b"k", start=b"k2", limit=1)) == [(b"k2", b"o2")]
    assert list(o.scan(b"k", limit=3))[-1] == (b"k2", b"o2")
    assert base.get(b"k4") == b"b4", "the base is never written"
    assert o.changes() == {b"k3": b"o3", b"k2": b"o2", b"k4": None, b"k0": b"o0"}
    assert o.touched_keys() == {b"k0", b"k2", b"k3", b"k4"}


def test_scan_snapshot_is_stable_under_writes() -> None:
    o = Overlay(MemoryState({b"a": b"1", b"c": b"3"}))
    o.put(b"b", b"2")
    it = o.scan(b"")
    assert next(it) == (b"a", b"1")
    o.put(b"bb", b"x")  # written after the scan started
    rest = list(it)
    assert (b"b", b"2") in rest and (b"c", b"3") in rest


def test_put_then_delete_of_absent_key_reports_delete() -> None:
    o = Overlay(MemoryState())
    o.put(b"k", b"v")
    o.delete(b"k")
    assert o.get(b"k") is None
    assert o.changes() == {b"k": None}
    assert list(o.scan(b"")) == []


def test_nested_savepoints() -> None:
    o = Overlay(MemoryState({b"a": b"0"}))
    o.put(b"a", b"1")
    sp1 = o.savepoint()
    o.put(b"b", b"1")
    sp2 = o.savepoint()
    o.delete(b"a")
    o.put(b"c", b"1")
    sp3 = o.savepoint()
    o.put(b"c", b"2")
    assert o.savepoint_depth == 3
    o.release(sp3)
    assert o.get(b"c") == b"2"
    o.rollback(sp2)
    assert o.get(b"a") == b"1" and o.get(b"c") is None and o.get(b"b") == b"1"
    assert o.touched_keys() == {b"a", b"b"}
    assert list(o.scan(b"")) == [(b"a", b"1"), (b"b", b"1")]
    with pytest.raises(MedledgerError):
        o.rollback(sp2)  # already closed
    o.rollback(sp1)
    assert o.changes() == {b"a": b"1"}
    assert o.savepoint_depth == 0


def test_rollback_of_outer_savepoint_closes_inner_ones() -> None:
    o = Overlay(MemoryState())
    sp1 = o.savepoint()
    o.put(b"x", b"1")
    sp2 = o.savepoint()
    o.put(b"y", b"1")
    o.rollback(sp1)
    assert o.changes() == {}
    with pytest.raises(MedledgerError):
        o.release(sp2)


def test_atomic_context_manager() -> None:
    o = Overlay(MemoryState())
    with o.atomic():
        o.put(b"ok", b"1")
    with pytest.raises(RuntimeError), o.atomic():
        o.put(b"bad", b"1")
        o.delete(b"ok")
        raise RuntimeError("rejected")
    assert o.changes() == {b"ok": b"1"}
    assert o.savepoint_depth == 0


def test_overlay_over_overlay_and_type_checks() -> None:
    block = Overlay(MemoryState({b"a": b"1"}))
    block.delete(b"a")
    tx = Overlay(block)
    assert tx.get(b"a") is None
    tx.put(b"a", b"2")
    assert list(tx.scan(b"")) == [(b"a", b"2")]
    assert list(block.scan(b"")) == []
    with pytest.raises(TypeError):
        tx.put(b"k", "str")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tx.delete("k")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tx.scan(b"", limit=-1)


# -- Overlay: model-based ------------------------------------------------------------


class OverlayMachine(RuleBasedStateMachine):
    """Overlay vs. a dict model with snapshot copies per savepoint."""

    def __init__(self) -> None:
        super().__init__()
        self.base: dict[bytes, bytes] = {}
        self.overlay = Overlay(MemoryState())
        self.view: dict[bytes, bytes] = {}
        self.writes: dict[bytes, bytes | None] = {}
        self.stack: list[tuple[int, dict[bytes, bytes], dict[bytes, bytes | None]]] = []

    @initialize(base=st.dictionaries(key_st, value_st, max_size=15))
    def init_base(self, base: dict[bytes, bytes]) -> None:
        self.base = base
        self.overlay = Overlay(MemoryState(base))
        self.view = dict(base)

    @rule(key=key_st, value=value_st)
    def put(self, key: bytes, value: bytes) -> None:
        self.overlay.put(key, value)
        self.view[key] = value
        self.writes[key] = value

    @rule(key=key_st)
    def delete(self, key: bytes) -> None:
        self.overlay.delete(key)
        self.view.pop(key, None)
        self.writes[key] = None

    @rule(key=key_st)
    def get(self, key: bytes) -> None:
        assert self.overlay.get(key) == self.view.get(key)

    @rule(
        prefix=key_st,
        start=st.none() | key_st,
        limit=st.none() | st.integers(min_value=0, max_value=4),
    )
    def scan(self, prefix: bytes, start: bytes | None, limit: int | None) -> None:
        got = list(self.overlay.scan(prefix, start=start, limit=limit))
        assert got == model_scan(self.view, prefix, start, limit)

    @rule()
    def savepoint(self) -> None:
        sp = self.overlay.savepoint()
        self.stack.append((sp, dict(self.view), dict(self.writes)))

    @precondition(lambda self: self.stack)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(min_value=0, max_value=len(self.stack) - 1))
        sp, view, writes = self.stack[i]
        self.overlay.rollback(sp)
        self.view, self.writes = view, writes
        del self.stack[i:]

    @precondition(lambda self: self.stack)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(min_value=0, max_value=len(self.stack) - 1))
        self.overlay.release(self.stack[i][0])
        del self.stack[i:]

    @invariant()
    def net_changes(self) -> None:
        assert self.overlay.changes() == self.writes
        assert self.overlay.touched_keys() == set(self.writes)
        assert self.overlay.savepoint_depth == len(self.stack)
        # Applying the net changes to the base gives the overlay's view.
        applied = MemoryState(self.base)
        applied.apply(self.overlay.changes())
        assert applied.items() == self.view


TestOverlayMachine = OverlayMachine.TestCase
TestOverlayMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
