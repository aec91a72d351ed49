"""SMART on FHIR resource scopes: parsing, narrowing and checks.

A scope names a context (``patient``, ``user`` or ``system``), a resource type
(or ``*``) and the interactions it allows: ``c`` create, ``r`` read, ``u``
update, ``d`` delete, ``s`` search. Both SMART v2 (``system/Observation.rs``,
permissions in the order ``cruds``) and SMART v1 (``.read`` = ``rs``,
``.write`` = ``cud``, ``.*`` = ``cruds``) forms are understood.

Scopes are only ever narrowed here: :func:`intersect_scopes` grants what both a
request and a registration allow, so a token can never carry more than its
client was registered for. Scopes with v2 query restrictions
(``patient/Observation.rs?category=laboratory``) are not understood and are
therefore never granted, because granting the unrestricted form would widen
them. Non-resource scopes (``openid``, ``fhirUser``, ``launch``...) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CONTEXTS",
    "PERMISSIONS",
    "Scope",
    "format_scopes",
    "intersect_scopes",
    "normalise_scopes",
    "parse_scope",
    "parse_scopes",
    "scope_allows",
    "unrecognised_scopes",
]

CONTEXTS = ("patient", "user", "system")
PERMISSIONS = "cruds"
"""Every interaction, in the order SMART v2 writes them."""

_V1_PERMS = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset(PERMISSIONS)}
_SCOPE_RE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.([A-Za-z*]+)$")
_V2_RE = re.compile(r"^c?r?u?d?s?$")

# Scopes that are legitimate in SMART but carry no resource permission.
_NON_RESOURCE = re.compile(
    r"^(openid|fhirUser|profile|offline_access|online_access|launch(/[A-Za-z]+)?)$"
)


@dataclass(frozen=True, slots=True)
class Scope:
    """One resource scope: who it speaks for, which resource type, which interactions."""

    context: str  # "patient" | "user" | "system"
    resource_type: str  # a FHIR resource type or "*"
    perms: frozenset[str]  # subset of {"c", "r", "u", "d", "s"}

    def __str__(self) -> str:
        """The SMART v2 text of the scope, e.g. ``system/Observation.rs``."""
        perms = "".join(p for p in PERMISSIONS if p in self.perms)
        return f"{self.context}/{self.resource_type}.{perms}"


def parse_scope(token: str) -> Scope | None:
    """Parse one space-free scope token; ``None`` for anything that is not a resource scope."""
    m = _SCOPE_RE.match(token)
    if m is None:
        return None
    context, resource_type, perms = m.groups()
    if perms in _V1_PERMS:
        return Scope(context, resource_type, _V1_PERMS[perms])
    if perms and _V2_RE.match(perms):
        return Scope(context, resource_type, frozenset(perms))
    return None


def parse_scopes(text: str) -> list[Scope]:
    """Parse a space-separated scope string into resource scopes (others are ignored).

    Duplicates are dropped; the order of first appearance is kept.
    """
    out: list[Scope] = []
    for token in text.split():
        scope = parse_scope(token)
        if scope is not None and scope not in out:
            out.append(scope)
    return out


def unrecognised_scopes(text: str) -> list[str]:
    """Tokens of ``text`` that are neither resource scopes nor known non-resource scopes."""
    return [t for t in text.split() if parse_scope(t) is None and not _NON_RESOURCE.match(t)]


def scope_allows(scopes: Iterable[Scope], resource_type: str, interaction: str) -> bool:
    """Whether any of ``scopes`` allows ``interaction`` (one of c, r, u, d, s) on ``resource_type``.

    The context (patient/user/system) is not consulted: it says whose data the
    caller may reach, which the consent decision enforces, not the scope.
    """
    if len(interaction) != 1 or interaction not in PERMISSIONS:
        raise ValueError(f"interaction must be one of c, r, u, d, s, not {interaction!r}")
    return any(interaction in s.perms and s.resource_type in ("*", resource_type) for s in scopes)


def normalise_scopes(scopes: Iterable[Scope]) -> list[Scope]:
    """Merge scopes of the same context and type, drop those a wildcard already covers.

    The result allows exactly what the input allows, sorted by context then type.
    """
    merged: dict[tuple[str, str], frozenset[str]] = {}
    for s in scopes:
        if s.perms:
            key = (s.context, s.resource_type)
            merged[key] = merged.get(key, frozenset()) | s.perms
    out: list[Scope] = []
    for (context, resource_type), perms in merged.items():
        if resource_type != "*":
            wild = merged.get((context, "*"), frozenset())
            perms = perms - wild
            if not perms:
                continue
        out.append(Scope(context, resource_type, perms))
    order = {c: i for i, c in enumerate(CONTEXTS)}
    out.sort(key=lambda s: (order[s.context], s.resource_type != "*", s.resource_type))
    return out


def intersect_scopes(requested: Iterable[Scope], registered: Iterable[Scope]) -> list[Scope]:
    """What both ``requested`` and ``registered`` allow (never more than either).

    Contexts must match exactly; ``*`` on one side narrows to the other side's
    type (``patient/*.rs`` requested against registered ``patient/Observation.r``
    grants ``patient/Observation.r``).
    """
    registered = list(registered)
    granted: list[Scope] = []
    for want in requested:
        for have in registered:
            if want.context != have.context:
                continue
            if have.resource_type == "*":
                resource_type = want.resource_type
            elif want.resource_type in ("*", have.resource_type):
                resource_type = have.resource_type
            else:
                continue
            perms = want.perms & have.perms
            if perms:
                granted.append(Scope(want.context, resource_type, perms))
    return normalise_scopes(granted)


def format_scopes(scopes: Iterable[Scope]) -> str:
    """The space-separated SMART v2 text of ``scopes``."""
    return " ".join(str(s) for s in scopes)
