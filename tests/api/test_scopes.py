"""SMART scope parsing, narrowing and checks."""

from __future__ import annotations

import pytest

from medledger.api.scopes import (
    Scope,
    format_scopes,
    intersect_scopes,
    normalise_scopes,
    parse_scope,
    parse_scopes,
    scope_allows,
    unrecognised_scopes,
)


def S(text: str) -> Scope:
    scope = parse_scope(text)
    assert scope is not None, text
    return scope


@pytest.mark.parametrize(
    ("text", "context", "rtype", "perms"),
    [
        ("system/Observation.rs", "system", "Observation", "rs"),
        ("patient/*.rs", "patient", "*", "rs"),
        ("user/Observation.cruds", "user", "Observation", "cruds"),
        ("user/Patient.c", "user", "Patient", "c"),
        ("system/*.read", "system", "*", "rs"),  # v1 read = read + search
        ("system/Observation.write", "system", "Observation", "cud"),
        ("patient/*.*", "patient", "*", "cruds"),
    ],
)
def test_parse_v1_and_v2(text: str, context: str, rtype: str, perms: str) -> None:
    assert parse_scope(text) == Scope(context, rtype, frozenset(perms))


@pytest.mark.parametrize(
    "text",
    [
        "openid",
        "fhirUser",
        "launch/patient",
        "offline_access",
        "system/Observation.rc",  # v2 permissions must be in cruds order
        "system/Observation.rr",
        "system/Observation.",
        "system/Observation.x",
        "admin/Observation.rs",
        "system/observation.rs",  # resource types start upper-case
        "system/Observation.rs?category=laboratory",  # query restrictions are never widened
        "system/Observation",
    ],
)
def test_non_resource_and_unsupported_scopes_are_ignored(text: str) -> None:
    assert parse_scope(text) is None
    assert parse_scopes(f"{text} system/Patient.r") == [S("system/Patient.r")]


def test_parse_scopes_dedupes_and_keeps_order() -> None:
    got = parse_scopes("  launch/patient system/Patient.r openid system/*.rs system/Patient.r ")
    assert got == [S("system/Patient.r"), S("system/*.rs")]


def test_unrecognised_scopes_names_only_unknown_tokens() -> None:
    text = "openid fhirUser launch launch/patient system/Observation.rs bogus user/X.rc"
    assert unrecognised_scopes(text) == ["bogus", "user/X.rc"]


def test_scope_allows() -> None:
    scopes = parse_scopes("system/Observation.rs patient/*.r")
    assert scope_allows(scopes, "Observation", "r")
    assert scope_allows(scopes, "Observation", "s")
    assert not scope_allows(scopes, "Observation", "c")
    assert scope_allows(scopes, "Condition", "r")  # via patient/*.r
    assert not scope_allows(scopes, "Condition", "s")
    assert not scope_allows([], "Observation", "r")
    with pytest.raises(ValueError):
        scope_allows(scopes, "Observation", "read")


def test_str_is_v2_text_in_cruds_order() -> None:
    assert str(Scope("user", "Observation", frozenset("sdcru"))) == "user/Observation.cruds"
    assert format_scopes(parse_scopes("system/*.read system/Patient.write")) == (
        "system/*.rs system/Patient.cud"
    )


def test_normalise_merges_and_drops_covered() -> None:
    scopes = parse_scopes("system/Observation.r system/Observation.s system/*.rs user/Patient.u")
    scopes += [S("system/Patient.c")]
    assert format_scopes(normalise_scopes(scopes)) == (
        "user/Patient.u system/*.rs system/Patient.c"
    )


@pytest.mark.parametrize(
    ("requested", "registered", "granted"),
    [
        ("system/Observation.rs", "system/Observation.rs", "system/Observation.rs"),
        ("system/Observation.cruds", "system/Observation.rs", "system/Observation.rs"),
        (
            "system/*.cruds",
            "system/Observation.rs system/Patient.r",
            "system/Observation.rs system/Patient.r",
        ),
        ("system/Observation.rs", "system/*.r", "system/Observation.r"),
        ("system/*.rs", "system/*.cruds", "system/*.rs"),
        ("system/Observation.read", "system/*.*", "system/Observation.rs"),
        ("patient/*.rs", "system/*.cruds", ""),  # contexts never cross
        ("user/Observation.rs", "patient/Observation.rs", ""),
        ("system/Condition.rs", "system/Observation.rs", ""),
        ("system/Observation.c", "system/Observation.rs", ""),
        ("launch/patient openid", "system/*.cruds", ""),
        (
            "system/Observation.rs?category=laboratory",
            "system/*.cruds",
            "",
        ),
        (
            "system/Observation.r system/Patient.cruds user/*.s",
            "system/*.rs user/Observation.rs",
            "user/Observation.s system/Observation.r system/Patient.rs",
        ),
    ],
)
def test_intersection_never_widens(requested: str, registered: str, granted: str) -> None:
    got = intersect_scopes(parse_scopes(requested), parse_scopes(registered))
    assert format_scopes(got) == granted
    # Whatever is granted is allowed by both sides.
    for s in got:
        for p in s.perms:
            types = [s.resource_type] if s.resource_type != "*" else ["Observation", "Patient"]
            for t in types:
                assert scope_allows(parse_scopes(requested), t, p)
                assert scope_allows(parse_scopes(registered), t, p)
