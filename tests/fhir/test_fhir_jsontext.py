"""FHIR JSON decimals keep the precision they were written with (medledger.fhir.jsontext)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medledger.fhir.jsontext import dump_json, load_json, parse_number
from medledger.fhir.validate import parse_json, parse_resource


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5.4", 5.4),  # prints back as written: a float
        ("0.25", 0.25),
        ("103.58273648", 103.58273648),
        ("-0.0", -0.0),
        ("5.40", Decimal("5.40")),  # trailing zero: significant
        ("1.0e3", Decimal("1.0e3")),
        ("0.100", Decimal("0.100")),
        ("3.14159265358979323846264", Decimal("3.14159265358979323846264")),
    ],
)
def test_parse_number(text: str, expected: float | Decimal) -> None:
    got = parse_number(text)
    assert type(got) is type(expected) and got == expected


def test_round_trip_keeps_every_digit() -> None:
    text = '{"a":5.40,"b":5.4,"c":[0.10,-0.0,7,1.000],"d":{"e":3.14159265358979323846264}}'
    doc = parse_json(text)
    assert dump_json(doc) == text
    assert load_json(dump_json(doc)) == doc
    assert dump_json(parse_json('{"x":1.0e3}')) == '{"x":1.0E+3}'  # same value and digits
    # sorted keys (the importer's content hash) keep them too
    assert dump_json(parse_json('{"b":5.40,"a":[0.10]}'), sort_keys=True) == (
        '{"a":[0.10],"b":5.40}'
    )


def test_document_content_cannot_forge_a_number() -> None:
    """A string shaped like the placeholder stays a string (its nonce is not the call's)."""
    forged = "\x00" + "0" * 16 + ":0\x00"
    doc = {"s": forged, "n": Decimal("5.40")}
    out = dump_json(doc)
    assert json.loads(out)["s"] == forged and '"n":5.40' in out
    assert load_json(out) == doc


def test_non_finite_and_unknown_values_are_refused() -> None:
    with pytest.raises(ValueError):
        dump_json({"v": Decimal("NaN")})
    with pytest.raises(ValueError):
        dump_json({"v": float("inf")})
    with pytest.raises(TypeError):
        dump_json({"v": object()})
    assert parse_number("1e400") == float("inf")  # refused by validation, as before


def test_a_validated_resource_keeps_its_precision() -> None:
    body = (
        '{"resourceType":"Observation","status":"final","code":{"coding":[{"system":'
        '"http://loinc.org","code":"4548-4"}]},"valueQuantity":{"value":5.40,"unit":"%"}}'
    )
    resource = parse_resource(body.encode(), "Observation")
    assert resource["valueQuantity"]["value"] == Decimal("5.40")
    assert dump_json(resource) == body


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.decimals(
            allow_nan=False, allow_infinity=False, min_value=-(10**300), max_value=10**300
        )
        | st.text(),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
        max_leaves=20,
    )
)
def test_dump_then_load_is_identity(doc: object) -> None:
    again = load_json(dump_json(doc))
    assert dump_json(again) == dump_json(doc)
