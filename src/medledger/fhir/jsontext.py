"""FHIR JSON text with its decimals' precision kept.

FHIR decimals carry their precision: ``5.40`` is not ``5.4`` (a laboratory
reports significant figures), and the specification asks servers to keep it.
Python's ``json`` turns both into the same float, so here a number that a float
would print back differently from how it was written becomes a
:class:`~decimal.Decimal` of its text (:func:`parse_number`), and
:func:`dump_json` writes every Decimal back with those digits. Numbers that a
float prints back exactly (``5.4``, ``0.25``, Synthea's ``103.58273648``) stay
floats, so most documents take the standard encoder's fast path.

Imports nothing heavy: the record service decodes stored plaintext with
:func:`load_json` without loading the FHIR models.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from decimal import Decimal
from typing import Any

__all__ = ["dump_json", "load_json", "parse_number"]


def parse_number(text: str) -> float | Decimal:
    """A JSON number with a fraction or exponent, keeping the precision it was written with.

    FHIR decimals carry their precision (``5.40`` is not ``5.4``: a lab reports
    significant figures). A number that a float prints back exactly as written
    (``5.4``, ``0.25``, ``103.58273648``) becomes that float; any other finite one
    (``5.40``, ``1.0e3``, more digits than a double holds) a :class:`~decimal.Decimal`
    of its text, which :func:`dump_json` writes back with the same digits.
    """
    value = float(text)
    if not math.isfinite(value) or repr(value) == text:
        return value  # (an overflow to infinity is refused by validation as before)
    return Decimal(text)


def load_json(body: bytes | str) -> Any:
    """Decode JSON written by :func:`dump_json` (stored plaintext), decimals kept."""
    return json.loads(body, parse_float=parse_number)


#: a Decimal's placeholder as the JSON encoder escapes it: "\u0000<nonce>:<n>\u0000"
_PLACEHOLDER = re.compile(r'"\\u0000([0-9a-f]{16}):([0-9]+)\\u0000"')


def dump_json(doc: Any, *, sort_keys: bool = False) -> str:
    """Compact JSON of ``doc`` with every :class:`~decimal.Decimal` written as its digits.

    The standard encoder cannot write a number from text, so each Decimal goes
    out as a placeholder string holding a random nonce (no document content can
    forge it) and its index, and the placeholders are replaced afterwards.
    Documents without Decimals take the encoder's fast path unchanged.
    """
    digits: list[str] = []
    nonce = ""

    def default(obj: Any) -> str:
        nonlocal nonce
        if not isinstance(obj, Decimal):
            raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
        if not obj.is_finite():
            raise ValueError("numbers must be finite")
        if not nonce:
            nonce = secrets.token_hex(8)
        digits.append(str(obj))
        return f"\x00{nonce}:{len(digits) - 1}\x00"

    text = json.dumps(
        doc,
        ensure_ascii=False,
        separators=(",", ":"),
        allow_nan=False,
        sort_keys=sort_keys,
        default=default,
    )
    if not digits:
        return text
    return _PLACEHOLDER.sub(lambda m: digits[int(m[2])] if m[1] == nonce else m[0], text)
