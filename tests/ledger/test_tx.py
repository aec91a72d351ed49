"""Transaction envelopes: encoding, ids, signatures, and rejection of every mutation."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from medledger.crypto.signing import ALG_ED25519, SigningKey, key_id
from medledger.encoding import decode, encode
from medledger.errors import (
    BadTransactionSignature,
    MalformedTransaction,
    TransactionRejected,
    WrongNetwork,
)
from medledger.ledger.tx import (
    MAX_TX_BYTES,
    SIG_DOMAIN,
    Transaction,
    check_signed,
    make_tx,
)

from .conftest import BLOCK_TIME, NETWORK, seeded_key

KEY = seeded_key("tx-tests")
OTHER = seeded_key("tx-tests-other")


def sample_tx(**kw: Any) -> Transaction:
    args: dict[str, Any] = {
        "network": NETWORK,
        "type_": "note.anchor",
        "payload": {"digest": bytes(range(32)), "kind": "document"},
        "seq": 7,
        "time": BLOCK_TIME,
    }
    args.update(kw)
    return make_tx(
        KEY, args["network"], args["type_"], args["payload"], seq=args["seq"], time=args["time"]
    )


TX = sample_tx()


def envelope(tx: Transaction) -> dict[str, Any]:
    env: dict[str, Any] = decode(tx.raw)
    return env


def parse_and_verify(raw: bytes) -> Transaction:
    tx = Transaction.from_bytes(raw)
    tx.verify_signature()
    return tx


# -- round trip and ids ------------------------------------------------------------------


def test_envelope_round_trip() -> None:
    tx = TX
    again = Transaction.from_bytes(tx.raw)
    assert again == tx
    assert again.raw == tx.raw
    assert again.tx_id == tx.tx_id
    again.verify_signature()
    env = envelope(tx)
    assert set(env) == {"v", "net", "type", "payload", "signer", "pub", "seq", "time", "sig"}
    assert env["v"] == 1
    assert env["net"] == NETWORK
    assert env["type"] == "note.anchor"
    assert env["payload"] == {"digest": bytes(range(32)), "kind": "document"}
    assert env["signer"] == KEY.key_id
    assert env["pub"] == KEY.public.raw
    assert env["seq"] == 7
    assert env["time"] == BLOCK_TIME
    assert encode(env) == tx.raw  # the raw bytes are the canonical encoding


def test_tx_id_is_sha256_of_raw() -> None:
    assert TX.tx_id == hashlib.sha256(TX.raw).digest()
    assert len(TX.tx_id) == 32


def test_signature_covers_domain_and_unsigned_body() -> None:
    env = envelope(TX)
    sig = env.pop("sig")
    KEY.public.verify(sig, SIG_DOMAIN + encode(env))
    assert TX.signing_bytes() == SIG_DOMAIN + encode(env)


def test_signing_is_deterministic() -> None:
    assert sample_tx().raw == TX.raw
    assert sample_tx(seq=8).tx_id != TX.tx_id


def test_to_json_is_hex() -> None:
    doc = TX.to_json()
    assert doc["tx_id"] == TX.tx_id.hex()
    assert doc["payload"]["digest"] == bytes(range(32)).hex()
    assert doc["signer"] == KEY.key_id.hex()


def test_check_network() -> None:
    TX.check_network(NETWORK)
    with pytest.raises(WrongNetwork):
        TX.check_network("another-net")


def test_oversized_transaction_is_malformed() -> None:
    with pytest.raises(MalformedTransaction):
        Transaction.from_bytes(b"\xa0" + bytes(MAX_TX_BYTES))


# -- generated payloads round trip ---------------------------------------------------------

_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20)
)
_values = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.dictionaries(st.text(max_size=12), _values, max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    payload=payloads,
    type_=st.text(min_size=1, max_size=64),
    seq=st.integers(min_value=1, max_value=2**64 - 1),
    time=st.integers(min_value=0, max_value=2**64 - 1),
    network=st.text(min_size=1, max_size=30),
)
def test_generated_envelopes_round_trip(
    payload: dict[str, Any], type_: str, seq: int, time: int, network: str
) -> None:
    tx = make_tx(KEY, network, type_, payload, seq=seq, time=time)
    again = Transaction.from_bytes(tx.raw)
    assert again == tx
    assert again.payload == payload
    assert (again.type, again.seq, again.time, again.network) == (type_, seq, time, network)
    assert again.tx_id == hashlib.sha256(tx.raw).digest()
    again.verify_signature()
    assert encode(decode(tx.raw)) == tx.raw


# -- every byte-level mutation is rejected -------------------------------------------------


def _assert_rejected(raw: bytes) -> None:
    """``raw`` differs from ``TX.raw``: parsing + signature check must reject it."""
    assert raw != TX.raw
    try:
        tx = Transaction.from_bytes(raw)
    except MalformedTransaction:
        return
    # It parsed: canonical CBOR means one byte string per value, so the envelope
    # must differ from the original one ...
    assert envelope(tx) != envelope(TX)
    assert tx.tx_id != TX.tx_id
    # ... and the signature must not cover it.
    with pytest.raises(BadTransactionSignature):
        tx.verify_signature()


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    raw = bytearray(TX.raw)
    kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "insert", "delete"]))
    if kind == "flip":
        # flip 1..3 bytes with non-zero masks
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= draw(st.integers(1, 255))
    elif kind == "set":
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif kind == "extend":
        raw += draw(st.binary(min_size=1, max_size=40))
    elif kind == "insert":
        i = draw(st.integers(0, len(raw)))
        raw[i:i] = draw(st.binary(min_size=1, max_size=8))
    else:
        i = draw(st.integers(0, len(raw) - 1))
        del raw[i : i + draw(st.integers(1, 8))]
    return bytes(raw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated=mutations())
@example(mutated=TX.raw[:-1])
@example(mutated=TX.raw + b"\x00")
@example(mutated=b"")
def test_every_byte_mutation_is_rejected(mutated: bytes) -> None:
    assume(mutated != TX.raw)
    _assert_rejected(mutated)


def test_every_single_byte_flip_is_rejected() -> None:
    """Exhaustive over positions: flip the low bit, the high bit and all bits of each byte."""
    raw = TX.raw
    for i in range(len(raw)):
        for mask in (0x01, 0x80, 0xFF):
            m = bytearray(raw)
            m[i] ^= mask
            _assert_rejected(bytes(m))


def test_every_truncation_is_rejected() -> None:
    for n in range(len(TX.raw)):
        _assert_rejected(TX.raw[:n])


# -- field-level mutations, re-encoded canonically ------------------------------------------


def _reencode(**changes: Any) -> bytes:
    env = envelope(TX)
    for name, value in changes.items():
        if value is _DELETE:
            del env[name]
        else:
            env[name] = value
    return encode(env)


_DELETE = object()


@pytest.mark.parametrize(
    "changes",
    [
        {"net": "another-network"},
        {"type": "key.rotate"},
        {"payload": {"digest": bytes(32), "kind": "document"}},
        {"payload": {"digest": bytes(range(32)), "kind": "report"}},
        {"payload": {}},
        {"seq": 8},
        {"seq": 6},
        {"time": BLOCK_TIME + 1},
        {"time": 0},
        {"sig": bytes(64)},
        {"sig": bytes([TX.sig[0] ^ 1]) + TX.sig[1:]},
        {"sig": TX.sig[:63] + bytes([TX.sig[63] ^ 0x10])},
        # another valid key with its own key id: parses, but the signature is not its
        {"pub": OTHER.public.raw, "signer": OTHER.key_id},
    ],
    ids=lambda c: ",".join(c),
)
def test_field_mutation_breaks_signature(changes: dict[str, Any]) -> None:
    raw = _reencode(**changes)
    tx = Transaction.from_bytes(raw)  # still a well-formed envelope
    with pytest.raises(BadTransactionSignature):
        tx.verify_signature()


def test_signature_of_another_transaction_is_rejected() -> None:
    other = sample_tx(seq=8)
    tx = Transaction.from_bytes(_reencode(sig=other.sig))
    with pytest.raises(BadTransactionSignature):
        tx.verify_signature()


def test_resigned_by_another_key_but_claiming_ours_is_rejected() -> None:
    env = envelope(TX)
    del env["sig"]
    env["sig"] = OTHER.sign(SIG_DOMAIN + encode({k: v for k, v in env.items() if k != "sig"}))
    tx = Transaction.from_bytes(encode(env))
    with pytest.raises(BadTransactionSignature):
        tx.verify_signature()


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 2},
        {"v": True},
        {"v": _DELETE},
        {"net": ""},
        {"net": b"bytes"},
        {"type": ""},
        {"type": "x" * 65},
        {"type": 5},
        {"payload": [1, 2]},
        {"payload": b""},
        {"signer": OTHER.key_id},  # does not match pub
        {"signer": KEY.key_id[:15]},
        {"signer": _DELETE},
        {"pub": OTHER.public.raw},  # signer no longer matches
        {"pub": KEY.public.raw[:31]},
        {"pub": "text"},
        {"seq": 0},
        {"seq": -1},
        {"seq": True},
        {"seq": "7"},
        {"time": -1},
        {"time": None},
        {"sig": TX.sig[:63]},
        {"sig": TX.sig + b"\x00"},
        {"sig": _DELETE},
        {"extra": 1},
    ],
    ids=lambda c: ",".join(f"{k}={type(v).__name__}" for k, v in c.items()),
)
def test_field_mutation_is_malformed(changes: dict[str, Any]) -> None:
    raw = _reencode(**changes)
    with pytest.raises(MalformedTransaction):
        Transaction.from_bytes(raw)


@pytest.mark.parametrize(
    "raw",
    [
        encode([1, 2, 3]),
        encode("a string"),
        encode(None),
        b"\xff",
        # a non-canonical encoding of the genuine envelope (seq as a 2-byte integer)
        None,
    ],
)
def test_non_envelopes_are_malformed(raw: bytes | None) -> None:
    if raw is None:
        good = TX.raw
        i = good.index(b"cseq\x07")
        raw = good[: i + 4] + b"\x19\x00\x07" + good[i + 5 :]
    with pytest.raises(MalformedTransaction):
        Transaction.from_bytes(raw)


def test_invalid_public_key_point_is_malformed() -> None:
    # 32 bytes that are not a valid Ed25519 point (y >= p)
    bad_pub = b"\xff" * 31 + b"\x7f"
    env = envelope(TX)
    env["pub"] = bad_pub
    env["signer"] = key_id(ALG_ED25519, bad_pub)  # consistent with pub: only the point is bad
    with pytest.raises(MalformedTransaction, match="not a valid Ed25519 public key"):
        parse_and_verify(encode(env))


@given(seed=st.binary(min_size=32, max_size=32))
@settings(max_examples=25, deadline=None)
def test_any_key_signs_verifiable_transactions(seed: bytes) -> None:
    key = SigningKey.from_seed(seed)
    tx = make_tx(key, NETWORK, "note.anchor", {"digest": seed}, seq=1, time=0)
    parse_and_verify(tx.raw)
    assert tx.signer == key.key_id


def test_check_signed_agrees_with_checking_the_parsed_transaction() -> None:
    key = seeded_key("check-signed")
    good = [
        make_tx(
            key, NETWORK, "note.anchor", {"digest": bytes([i]) * 32}, seq=i + 1, time=BLOCK_TIME
        )
        for i in range(3)
    ]
    forged = Transaction.from_bytes(good[1].raw.replace(good[1].sig, bytes(64)))
    other = seeded_key("someone else")
    items = [(t.pub, t.sig, t.signing_bytes()) for t in [*good, forged]]
    items.append((other.public.raw, good[0].sig, good[0].signing_bytes()))  # wrong key
    items.append((b"\x01" * 31 + b"\x80", good[0].sig, good[0].signing_bytes()))  # bad point
    assert check_signed(items) == [True, True, True, False, False, False]

    def verifies(tx: Transaction) -> bool:
        try:
            Transaction.from_bytes(tx.raw).verify_signature()
        except TransactionRejected:
            return False
        return True

    assert [verifies(t) for t in [*good, forged]] == check_signed(items)[:4]
