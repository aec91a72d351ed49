"""medledger.encoding: byte-exact RFC 8949 vectors, strict canonical decoding, properties.

The vectors are RFC 8949 Appendix A entries that fall inside medledger's data model
(integers, byte and text strings, arrays, text-keyed maps, true/false/null).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from medledger.encoding import MAX_DEPTH, decode, encode
from medledger.errors import EncodingError

# -- RFC 8949 Appendix A ------------------------------------------------------------------

RFC8949_APPENDIX_A: list[tuple[Any, str]] = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    (
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
        "a56161614161626142616361436164614461656145",
    ),
]


def _same(a: Any, b: Any) -> bool:
    """Structural equality that also tells bool from int (True == 1 in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize(
    ("value", "hexed"), RFC8949_APPENDIX_A, ids=[h for _, h in RFC8949_APPENDIX_A]
)
def test_rfc8949_appendix_a(value: Any, hexed: str) -> None:
    assert encode(value).hex() == hexed
    assert _same(decode(bytes.fromhex(hexed)), value)


def test_tuples_encode_as_arrays() -> None:
    assert encode((1, (2, 3), [4, 5])).hex() == "8301820203820405"
    assert decode(encode((1, (2, 3)))) == [1, [2, 3]]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    # decode() is annotated ``bytes`` but accepts any bytes-like object at runtime.
    assert decode(bytearray(b"\x83\x01\x02\x03")) == [1, 2, 3]  # type: ignore[arg-type]
    assert decode(memoryview(b"\x83\x01\x02\x03")) == [1, 2, 3]  # type: ignore[arg-type]


# -- map key order (RFC 8949 section 4.2.1: bytewise order of the encoded keys) -------------


def test_map_key_order_shorter_first() -> None:
    enc = encode({"b": 1, "a": 2, "aa": 3})
    assert enc.hex() == "a3" + "616102" + "616201" + "62616103"
    assert list(decode(enc)) == ["a", "b", "aa"]


def test_map_key_order_is_by_utf8_bytes_not_characters() -> None:
    # "\u00e9" is one character but two UTF-8 bytes (c3 a9): it sorts with the
    # two-byte keys, after "ab" (0x61 < 0xc3), and after every one-byte key.
    enc = encode({"\u00e9": 1, "ab": 2, "z": 3})
    assert enc.hex() == "a3" + "617a03" + "6261620262c3a901"
    assert list(decode(enc)) == ["z", "ab", "\u00e9"]


def test_map_key_order_across_length_headers() -> None:
    k23, k24 = "b" * 23, "a" * 24  # header 0x77 vs 0x78 0x18
    enc = encode({k24: 1, k23: 2})
    assert list(decode(enc)) == [k23, k24]
    assert enc.startswith(bytes.fromhex("a277") + k23.encode())


def test_insertion_order_does_not_matter() -> None:
    items = [("x", 1), ("yy", 2), ("a", 3), ("\u6c34", 4), ("", 5)]
    assert encode(dict(items)) == encode(dict(reversed(items)))


# -- rejections -----------------------------------------------------------------------------

REJECTED: list[tuple[str, str]] = [
    # non-shortest integer / length heads
    ("1817", "int 23 in two bytes"),
    ("190017", "int 23 in three bytes"),
    ("1a00000017", "int 23 in five bytes"),
    ("1b0000000000000017", "int 23 in nine bytes"),
    ("1900ff", "int 255 in three bytes"),
    ("3817", "negative int, non-shortest"),
    ("5801ff", "byte string length non-shortest"),
    ("780161", "text string length non-shortest"),
    ("980101", "array length non-shortest"),
    ("b80161610f", "map length non-shortest"),
    # indefinite lengths
    ("5f4100ff", "indefinite byte string"),
    ("7f6161ff", "indefinite text string"),
    ("9f01ff", "indefinite array"),
    ("bf616101ff", "indefinite map"),
    ("ff", "lone break"),
    # maps
    ("a2616101616102", "duplicate key"),
    ("a2616201616102", "unsorted keys"),
    ("a262616101616202", "longer key first"),
    ("a1010102", "integer key"),
    ("a1416102", "byte string key"),
    ("a18001", "array key"),
    ("a1f601", "null key"),
    ("a1a0f6", "map key"),
    # floats
    ("f90000", "half float 0.0"),
    ("f93c00", "half float 1.0"),
    ("fa3f800000", "single float 1.0"),
    ("fb3ff0000000000000", "double float 1.0"),
    ("f97e00", "NaN"),
    # tags (all of them, including ones cbor2 decodes natively)
    ("c074323031332d30332d32315432303a30343a30305a", "tag 0 date/time"),
    ("c11a514b67b0", "tag 1 epoch time"),
    ("c249010000000000000000", "tag 2 bignum"),
    ("c34100", "tag 3 negative bignum"),
    ("c24101", "tag 2 bignum 1 (non-canonical int)"),
    ("d8184100", "tag 24 embedded CBOR"),
    ("d81c81d81d00", "tags 28/29 shared reference: cyclic"),
    ("d81ca16161d81d00", "tags 28/29 shared reference: cyclic map"),
    ("d82076687474703a2f2f7777772e6578616d706c652e636f6d", "tag 32 URI"),
    ("d82363612a2b", "tag 35 regex"),
    ("d9010280", "tag 258 set"),
    ("d9d9f700", "tag 55799 self-described"),
    ("d9ffff00", "unknown tag 65535"),
    ("db000000010000000000", "unknown 64-bit tag"),
    # other simple values
    ("f0", "simple value 16"),
    ("f7", "undefined"),
    ("f818", "simple value in two bytes (invalid)"),
    ("f820", "simple value 32"),
    # trailing bytes
    ("0000", "two items"),
    ("8000", "array then int"),
    ("f6f6", "two nulls"),
    ("a000", "map then int"),
    # truncated input
    ("", "empty input"),
    ("18", "missing int argument"),
    ("1903", "half an int argument"),
    ("6261", "text shorter than its length"),
    ("4401020304"[:-2], "bytes shorter than their length"),
    ("830102", "array short one item"),
    ("a16161", "map missing a value"),
    ("5b00000000ffffffff", "huge declared length"),
    ("9bffffffffffffffff", "huge declared array"),
    # reserved additional information
    ("1c", "reserved ai 28"),
    ("1d", "reserved ai 29"),
    ("1e", "reserved ai 30"),
    ("3c", "reserved ai, negative"),
    ("5c", "reserved ai, bytes"),
    ("1f", "ai 31 on an int"),
    # invalid UTF-8
    ("62c328", "invalid continuation"),
    ("61ff", "0xff byte"),
    ("61c3", "truncated sequence"),
    ("62c0af", "overlong encoding"),
    ("63eda080", "UTF-8 encoded surrogate"),
    ("64f4908080", "code point above U+10FFFF"),
    ("a162c32801", "invalid UTF-8 in a key"),
]


@pytest.mark.parametrize(("hexed", "why"), REJECTED, ids=[w for _, w in REJECTED])
def test_decode_rejects(hexed: str, why: str) -> None:
    with pytest.raises(EncodingError):
        decode(bytes.fromhex(hexed))


@pytest.mark.parametrize(
    "value",
    [
        2**64,
        -(2**64) - 1,
        1.0,
        float("nan"),
        {1: 2},
        {b"a": 1},
        {("a",): 1},
        {"a": {1: 2}},
        {1, 2},
        bytearray(b"a"),
        object(),
        [1, 2.5],
        ("a", {"b": 2**70}),
    ],
    ids=repr,
)
def test_encode_rejects(value: Any) -> None:
    with pytest.raises(EncodingError):
        encode(value)


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(EncodingError):
        decode("a0")  # type: ignore[arg-type]


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def test_depth_limit() -> None:
    deepest = next(d for d in range(MAX_DEPTH + 3, -1, -1) if _encodes(_nested(d)))
    assert deepest >= MAX_DEPTH - 1
    enc = encode(_nested(deepest))
    assert _same(decode(enc), _nested(deepest))
    too_deep = b"\x81" + enc  # one more level, otherwise canonical
    with pytest.raises(EncodingError):
        decode(too_deep)
    with pytest.raises(EncodingError):
        encode(_nested(deepest + 1))


def _encodes(value: Any) -> bool:
    try:
        encode(value)
    except EncodingError:
        return False
    return True


def test_cyclic_value_rejected_on_encode() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(EncodingError):
        encode(loop)


# -- properties -----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -24, -25, -(2**64)])
    | st.binary(max_size=40)
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.lists(children, max_size=6).map(tuple)
        | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=30,
)


def _plain(value: Any) -> Any:
    """What decode returns for ``value``: tuples become lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _same_unordered(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_unordered(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_unordered(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


@given(values)
@settings(max_examples=400)
def test_roundtrip(value: Any) -> None:
    enc = encode(value)
    out = decode(enc)
    assert _same_unordered(out, _plain(value))
    assert encode(out) == enc


@given(st.dictionaries(st.text(max_size=30), st.integers(0, 3), min_size=2, max_size=12))
def test_map_keys_sorted_by_encoded_bytes(value: dict[str, int]) -> None:
    keys = list(decode(encode(value)))
    assert keys == sorted(value, key=lambda k: encode(k))


@given(values, st.data())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_single_byte_mutation(value: Any, data: st.DataObject) -> None:
    enc = encode(value)
    i = data.draw(st.integers(0, len(enc) - 1), label="index")
    b = data.draw(st.integers(0, 255), label="byte")
    assume(enc[i] != b)
    mutated = enc[:i] + bytes([b]) + enc[i + 1 :]
    try:
        out = decode(mutated)
    except EncodingError:
        return
    assert encode(out) == mutated


@given(values, st.binary(min_size=1, max_size=4))
def test_trailing_bytes_rejected(value: Any, extra: bytes) -> None:
    with pytest.raises(EncodingError):
        decode(encode(value) + extra)


@given(values, st.data())
def test_strict_prefix_rejected(value: Any, data: st.DataObject) -> None:
    enc = encode(value)
    cut = data.draw(st.integers(0, len(enc) - 1), label="cut")
    with pytest.raises(EncodingError):
        decode(enc[:cut])


@given(st.binary(max_size=24))
def test_arbitrary_bytes_decode_canonically_or_fail(blob: bytes) -> None:
    try:
        out = decode(blob)
    except EncodingError:
        return
    assert encode(out) == blob
