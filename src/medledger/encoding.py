"""The one canonical encoder for everything medledger hashes or signs.

Format: deterministically encoded CBOR, RFC 8949 section 4.2.1 ("core
deterministic encoding requirements"), over a deliberately small data model:

* ``None``, ``True``, ``False``
* integers in ``[-2**64, 2**64 - 1]`` (shortest head, as 4.2.1 requires)
* ``bytes`` (major type 2) and ``str`` (major type 3, UTF-8), definite length
* ``list`` / ``tuple`` (encoded as arrays)
* ``dict`` with ``str`` keys only, sorted by the bytewise order of their
  encoded form (for text keys that is: shorter first, then bytewise)

Floats, tags, indefinite lengths, duplicate map keys and non-text map keys are
refused in both directions. Decoding rejects any input that is not exactly the
canonical encoding of the value it decodes to (it re-encodes and compares), so
there is one and only one byte string per value: hashes and signatures over
these bytes are unambiguous.

The encoder itself is cbor2's ``canonical=True`` mode; this module restricts
what reaches it and enforces canonicity on the way back in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import cbor2

from medledger.errors import EncodingError

__all__ = ["MAX_DEPTH", "Value", "decode", "encode"]

#: Any value of the data model (recursive; typed loosely for ergonomics).
Value = Any

MAX_DEPTH = 64
_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1


_SCALARS = (type(None), bool, bytes, str)
_dumps = cbor2.dumps
_loads = cbor2.loads


def _check(value: object, depth: int) -> None:
    """Refuse anything outside the data model (any type; the slow, general path)."""
    t = type(value)
    if t in _SCALARS:
        return
    if t is int:
        if not _INT_MIN <= value <= _INT_MAX:  # type: ignore[operator]
            raise EncodingError("integer out of CBOR range")
        return
    if depth >= MAX_DEPTH:
        raise EncodingError(f"nesting deeper than {MAX_DEPTH}")
    if t is dict:
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise EncodingError(f"map key must be text, got {type(key).__name__}")
            if type(item) not in _SCALARS:
                _check(item, depth + 1)
        return
    if t is list or t is tuple:
        for item in value:  # type: ignore[attr-defined]
            if type(item) not in _SCALARS:
                _check(item, depth + 1)
        return
    if t is float:
        raise EncodingError("floating-point numbers are not allowed")
    if isinstance(value, (bool, bytes, str)):
        return
    if isinstance(value, int):
        _check(int(value), depth)
        return
    raise EncodingError(f"type {t.__name__} is not encodable")


class _General(Exception):
    """Raised by :func:`_prepare` for values it leaves to the general path."""


def _sort_key(key: str) -> tuple[int, bytes]:
    """Canonical order of text map keys (RFC 8949 4.2.1, bytewise on the encoded
    key): shorter UTF-8 first, then bytewise on the UTF-8."""
    try:
        raw = key.encode()
    except UnicodeEncodeError:
        raise _General from None
    return len(raw), raw


#: Key tuple of a map, as iterated -> ``()`` if that order is canonical, else the
#: keys in canonical order. Values of the same kind have the same keys, so this is
#: computed once per shape. Bounded (cleared when full; big shapes are not kept).
_orders: dict[tuple[str, ...], tuple[str, ...]] = {}
_ORDERS_LIMIT = 4096
_ORDERS_MAX_KEYS = 32


def _order_of(keys: tuple[str, ...]) -> tuple[str, ...]:
    order = tuple(sorted(keys, key=_sort_key))
    if order == keys:
        order = ()
    if len(keys) <= _ORDERS_MAX_KEYS:
        if len(_orders) >= _ORDERS_LIMIT:
            _orders.clear()
        _orders[keys] = order
    return order


def _prepare(value: object, depth: int) -> object:
    """Check ``value`` against the data model and put every map in canonical key order.

    Returns ``value`` itself when it is already in order, else a copy with the
    out-of-order maps (and the containers holding them) rebuilt sorted; cbor2's
    plain output for the result is the canonical encoding. This is what cbor2's
    canonical mode does, minus its per-key re-encoding, which costs more than the
    rest of the encoding. Raises :class:`_General` for subclasses of the model's
    types (and keys that are not UTF-8 encodable), left to that mode.
    """
    t = type(value)
    if t in _SCALARS:
        return value
    if t is int:
        if not _INT_MIN <= value <= _INT_MAX:  # type: ignore[operator]
            raise EncodingError("integer out of CBOR range")
        return value
    if depth >= MAX_DEPTH:
        raise EncodingError(f"nesting deeper than {MAX_DEPTH}")
    if t is dict:
        swapped: dict[str, object] | None = None
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise EncodingError(f"map key must be text, got {type(key).__name__}")
            if type(item) not in _SCALARS:
                new = _prepare(item, depth + 1)
                if new is not item:
                    if swapped is None:
                        swapped = {}
                    swapped[key] = new
        keys: tuple[str, ...] = tuple(value)  # type: ignore[arg-type]
        order = _orders.get(keys)
        if order is None:
            order = _order_of(keys)
        if swapped is None:
            if not order:
                return value
            src = value
        else:
            src = {**value, **swapped}  # type: ignore[dict-item]
            if not order:
                return src
        return {k: src[k] for k in order}  # type: ignore[index]
    if t is list or t is tuple:
        copy: list[object] | None = None
        for i, item in enumerate(value):  # type: ignore[arg-type]
            if type(item) not in _SCALARS:
                new = _prepare(item, depth + 1)
                if new is not item:
                    if copy is None:
                        copy = list(value)  # type: ignore[call-overload]
                    copy[i] = new
        return value if copy is None else copy
    if t is float:
        raise EncodingError("floating-point numbers are not allowed")
    if isinstance(value, (bool, bytes, str, int)):
        raise _General
    raise EncodingError(f"type {t.__name__} is not encodable")


def encode(value: Value) -> bytes:
    """Return the canonical CBOR encoding of ``value``.

    Raises :class:`EncodingError` for anything outside the data model.
    """
    try:
        try:
            return _dumps(_prepare(value, 0))
        except _General:
            pass
        _check(value, 0)
        return _dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:  # e.g. lone surrogates
        raise EncodingError(f"cannot encode: {exc}") from exc


def _reject_tag(decoder: object, tag: object) -> object:
    raise EncodingError("CBOR tags are not allowed")


def _reject_semantic_tag(decoder: object) -> NoReturn:
    raise EncodingError("CBOR tags are not allowed")


class _RejectAllTags(Mapping[int, Callable[[Any], Any]]):
    """A ``semantic_decoders`` table that maps *every* tag number to a rejection.

    cbor2 runs its built-in semantic decoders (datetimes, bignums, regexes,
    shared references...) *before* ``tag_hook`` is consulted, so ``tag_hook``
    alone does not keep tagged input away from them: tags 28/29 build cyclic
    containers (``RecursionError`` instead of :class:`EncodingError`) and tag 35
    compiles an attacker-chosen regular expression. Overriding the table refuses
    any tag as soon as it is read.
    """

    def __getitem__(self, tag: int) -> Callable[[Any], Any]:
        return _reject_semantic_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_SEMANTIC_TAGS = _RejectAllTags()

#: Byte strings already found canonical by :func:`decode`. The same state rows
#: (signing keys, principals, organisations) are decoded for every transaction;
#: identical bytes decode to an equal value, so for those the canonicity check
#: (a full re-encoding) is not repeated. Every call still returns fresh objects.
#: Bounded: cleared when full; tiny values (cheap to check) and big ones are not kept.
_canonical: set[bytes] = set()
_CANONICAL_LIMIT = 4096
_CANONICAL_MIN_SIZE = 24
_CANONICAL_MAX_SIZE = 4096


def decode(data: bytes) -> Value:
    """Decode canonical CBOR bytes, refusing anything non-canonical.

    Returns plain ``dict`` / ``list`` / scalars. Raises :class:`EncodingError`
    for malformed, trailing, non-canonical or out-of-model input.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EncodingError("decode expects bytes")
    data = bytes(data)
    size = len(data)
    cacheable = _CANONICAL_MIN_SIZE <= size <= _CANONICAL_MAX_SIZE
    known = cacheable and data in _canonical
    try:
        value = _loads(
            data,
            tag_hook=_reject_tag,
            semantic_decoders=_NO_SEMANTIC_TAGS,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            max_depth=MAX_DEPTH + 1,
        )
    except EncodingError:
        raise
    except Exception as exc:  # cbor2 raises several types, incl. for trailing data
        raise EncodingError(f"malformed CBOR: {exc}") from exc
    if known:
        return value
    # cbor2 gives plain dicts and lists (other containers only as map keys, which
    # are refused): re-encode canonically and compare.
    if type(value) in _SCALARS:
        again = _dumps(value)
    else:
        try:
            again = _dumps(_prepare(value, 0))
        except _General:
            again = encode(_thaw(value))
    if again != data:
        raise EncodingError("input is not in canonical form")
    if cacheable:
        if len(_canonical) >= _CANONICAL_LIMIT:
            _canonical.clear()
        _canonical.add(data)
    return value


def _thaw(value: object) -> object:
    """Turn cbor2's decoded containers into plain lists / dicts, rejecting floats.

    cbor2 already returns ``dict`` and ``list`` for maps and arrays; only other
    container types (frozen maps used as keys, tuples) need converting.
    """
    t = type(value)
    if t is dict:
        for k, v in value.items():  # type: ignore[attr-defined]
            if type(v) in (dict, list) or type(v) not in _SCALARS:
                value[k] = _thaw(v)  # type: ignore[index]
        return value
    if t is list:
        for i, v in enumerate(value):  # type: ignore[arg-type]
            if type(v) in (dict, list) or type(v) not in _SCALARS:
                value[i] = _thaw(v)  # type: ignore[index]
        return value
    if t in _SCALARS or t is int:
        return value
    if isinstance(value, float):
        raise EncodingError("floating-point numbers are not allowed")
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        return [_thaw(v) for v in value]
    return value
