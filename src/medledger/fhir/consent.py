"""FHIR R4 Consent <-> the ``consent_v1`` contract's consent document.

A patient posts a FHIR Consent; :func:`consent_to_payload` turns it into the
``consent.grant`` payload the patient signs, and :func:`payload_to_consent`
renders a consent held in ledger state back as FHIR. The two are inverse on
everything the contract can hold.

Mapping (FHIR -> contract)
--------------------------
==============================  ===============================================
``status``                      must be ``active`` (a grant); state ``revoked``
                                renders as ``inactive``
``scope``                       must be ``patient-privacy`` (consentscope)
``patient``                     ``Patient/<id>``, must be the granting patient
``policyRule``                  v3-ActCode ``OPTIN`` / ``OPTOUT`` -> ``policy``
``policy[].uri``                only :data:`POLICY_URI` (medledger's own rules)
``provision.period``            consent validity ``period`` (root provision only)
``provision.type``              ``permit`` / ``deny`` (required at every level)
``provision.actor[].reference`` ``Organization/<id>`` -> org,
                                ``Practitioner/<id>`` -> practitioner,
                                identifier ``urn:medledger:role|<role>`` -> role,
                                identifier ``urn:medledger:actor|referred`` ->
                                referred (``actor.role`` is informational)
``provision.action``            consentaction codes -> actions
``provision.purpose``           v3-ActReason codes (medledger's PURPOSES)
``provision.class``             resource-types codes -> resource_types
``provision.dataPeriod``        data_period
``provision.provision``         nested provisions (depth <= consent_v1.MAX_DEPTH)
==============================  ===============================================

FHIR periods are inclusive of their end (``end: 2024-12-31`` covers that whole
day); the contract's are half-open ``[start, end)`` in ms, so the end maps to
the first millisecond *after* the FHIR value's precision, and back to the last
millisecond before it.

Anything that would change who may see what but cannot be held by the
contract (``provision.data``, ``securityLabel``, ``code``, a nested ``period``,
an actor that is a Patient or a Group, an unknown purpose ...) is refused with
FhirError(422) naming the element, never silently dropped. Purely descriptive
elements (text, identifier, dateTime, performer, organization, source[x],
verification, category) are accepted and not kept.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from medledger.contracts._common import ACTIONS, FHIR_TYPES, PURPOSES
from medledger.contracts.consent_v1 import MAX_DEPTH, validate_consent
from medledger.contracts.core import ROLES
from medledger.errors import MalformedTransaction
from medledger.fhir.dates import format_instant, parse_range
from medledger.fhir.index import reference_id
from medledger.fhir.outcome import FhirError, Issue
from medledger.fhir.validate import codings, parse_resource

__all__ = [
    "ACTOR_SYSTEM",
    "POLICY_URI",
    "ROLE_SYSTEM",
    "consent_to_payload",
    "payload_to_consent",
]

SYS_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
SYS_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SYS_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SYS_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
SYS_RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
SYS_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SYS_LOINC = "http://loinc.org"

#: Identifier system of a "role" actor: every practitioner holding the role.
ROLE_SYSTEM = "urn:medledger:role"
#: Identifier system of special actors (value ``referred``).
ACTOR_SYSTEM = "urn:medledger:actor"
#: The policy a consent without OPTIN/OPTOUT points at (ppc-1 needs one).
POLICY_URI = "urn:medledger:policy:consent-v1"

_POLICY_RULES = {"OPTIN": "opt-in", "OPTOUT": "opt-out"}
_REJECTED_TOP = ("modifierExtension",)
_REJECTED_PROVISION = ("data", "securityLabel", "code", "modifierExtension")


class _Errors:
    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def add(self, diagnostics: str, expr: str, code: str = "business-rule") -> None:
        self.issues.append(Issue(code, diagnostics, (expr,)))


def _period(errs: _Errors, value: Any, expr: str) -> list[int | None]:
    """A FHIR Period as the contract's half-open ``[start_ms, end_ms)``."""
    if not isinstance(value, dict):
        return [None, None]
    out: list[int | None] = [None, None]
    for i, key in enumerate(("start", "end")):
        raw = value.get(key)
        if isinstance(raw, str):
            try:
                rng = parse_range(raw)
            except ValueError as exc:
                errs.add(str(exc), f"{expr}.{key}", "value")
                continue
            out[i] = rng.start if key == "start" else rng.end
    return out


def _codes(
    errs: _Errors,
    value: Any,
    system: str,
    allowed: frozenset[str],
    expr: str,
    what: str,
) -> list[str]:
    out: list[str] = []
    items = value if isinstance(value, list) else ([value] if value is not None else [])
    for i, item in enumerate(items):
        found = codings(item)
        if not found:
            errs.add(f"{what} must be coded ({system})", f"{expr}[{i}]")
        for sys, code in found:
            if sys not in (system, None) or code not in allowed:
                errs.add(f"{sys or ''}|{code} is not a {what} medledger supports", f"{expr}[{i}]")
            elif code not in out:
                out.append(code)
    return out


def _actor(errs: _Errors, actor: Mapping[str, Any], expr: str) -> dict[str, str] | None:
    ref = actor.get("reference")
    if not isinstance(ref, dict):
        errs.add("actor.reference is required", f"{expr}.reference", "required")
        return None
    for rtype, kind in (("Organization", "org"), ("Practitioner", "practitioner")):
        rid = reference_id(ref, rtype)
        if rid is not None:
            return {"kind": kind, "id": rid}
    ident = ref.get("identifier")
    if isinstance(ident, dict) and "reference" not in ref:
        system, value = ident.get("system"), ident.get("value")
        if system == ROLE_SYSTEM:
            if value in ROLES:
                return {"kind": "role", "id": str(value)}
            errs.add(f"unknown role {value!r}; roles: {', '.join(ROLES)}", f"{expr}.reference")
            return None
        if system == ACTOR_SYSTEM and value == "referred":
            return {"kind": "referred", "id": ""}
    errs.add(
        "an actor must be Organization/<id>, Practitioner/<id>, or an identifier "
        f"{ROLE_SYSTEM}|<role> or {ACTOR_SYSTEM}|referred",
        f"{expr}.reference",
    )
    return None


def _provision(errs: _Errors, prov: Mapping[str, Any], expr: str, depth: int) -> dict[str, Any]:
    for key in _REJECTED_PROVISION:
        if key in prov:
            errs.add(f"provision.{key} cannot be represented on the ledger", f"{expr}.{key}")
    if depth > 1 and "period" in prov:
        errs.add("only the root provision may have a period", f"{expr}.period")
    if depth > MAX_DEPTH:
        errs.add(f"provisions nest deeper than {MAX_DEPTH} levels", expr)
        return {"type": "deny"}
    ptype = prov.get("type")
    if ptype not in ("permit", "deny"):
        errs.add("provision.type (permit or deny) is required", f"{expr}.type", "required")
    actors: list[dict[str, str]] = []
    raw_actors = prov.get("actor")
    for i, actor in enumerate(raw_actors if isinstance(raw_actors, list) else []):
        if isinstance(actor, dict):
            mapped = _actor(errs, actor, f"{expr}.actor[{i}]")
            if mapped is not None and mapped not in actors:
                actors.append(mapped)
    children = prov.get("provision")
    return {
        "type": ptype if ptype in ("permit", "deny") else "deny",
        "actors": actors,
        "actions": _codes(
            errs, prov.get("action"), SYS_ACTION, ACTIONS, f"{expr}.action", "consent action"
        ),
        "purposes": _codes(
            errs, prov.get("purpose"), SYS_ACT_REASON, PURPOSES, f"{expr}.purpose", "purpose of use"
        ),
        "resource_types": _codes(
            errs,
            prov.get("class"),
            SYS_RESOURCE_TYPES,
            FHIR_TYPES,
            f"{expr}.class",
            "resource type",
        ),
        "data_period": _period(errs, prov.get("dataPeriod"), f"{expr}.dataPeriod"),
        "provisions": [
            _provision(errs, child, f"{expr}.provision[{i}]", depth + 1)
            for i, child in enumerate(children if isinstance(children, list) else [])
            if isinstance(child, dict)
        ],
    }


def consent_to_payload(
    resource: Mapping[str, Any], patient: str, *, consent_id: str | None = None
) -> dict[str, Any]:
    """The ``consent.grant`` payload (``{"consent": {...}}``) for a FHIR Consent.

    ``patient`` is the granting patient (from the caller's token). The consent
    id is ``consent_id`` if given (the API's choice on create), else the
    resource's id, else a new UUID. Raises FhirError 400/422.
    """
    res = parse_resource(dict(resource), "Consent")
    errs = _Errors()
    for key in _REJECTED_TOP:
        if key in res:
            errs.add(f"{key} cannot be represented on the ledger", f"Consent.{key}")
    if res.get("status") != "active":
        errs.add(
            f"only an active consent can be granted (status is {res.get('status')!r}); "
            "revoke an existing consent instead",
            "Consent.status",
        )
    scopes = codings(res.get("scope"))
    if not any(code == "patient-privacy" and sys in (SYS_SCOPE, None) for sys, code in scopes):
        errs.add("scope must be patient-privacy (a data sharing consent)", "Consent.scope")
    if "patient" in res:
        if reference_id(res["patient"]) != patient:
            errs.add(
                f"patient must be Patient/{patient}, the patient granting it", "Consent.patient"
            )
    policy: str | None = None
    rules = codings(res.get("policyRule"))
    if "policyRule" in res:
        mapped = {_POLICY_RULES.get(c) for s, c in rules if s in (SYS_ACT_CODE, None)} - {None}
        if len(mapped) != 1:
            errs.add(
                "policyRule must be v3-ActCode OPTIN or OPTOUT",
                "Consent.policyRule",
            )
        else:
            policy = str(next(iter(mapped)))
    for i, pol in enumerate(res.get("policy") or []):
        if not isinstance(pol, dict) or pol.get("uri") != POLICY_URI or "authority" in pol:
            errs.add(f"the only policy medledger can hold is {POLICY_URI}", f"Consent.policy[{i}]")
    prov = res.get("provision")
    provision: dict[str, Any] = {"type": "deny"}
    period: list[int | None] = [None, None]
    if not isinstance(prov, dict):
        errs.add("a consent needs a provision", "Consent.provision", "required")
    else:
        period = _period(errs, prov.get("period"), "Consent.provision.period")
        provision = _provision(errs, prov, "Consent.provision", 1)
    if errs.issues:
        raise FhirError.from_issues(422, errs.issues)
    cid = consent_id or res.get("id") or str(uuid.uuid4())
    document = {
        "id": cid,
        "patient": patient,
        "period": period,
        "policy": policy,
        "provision": provision,
    }
    try:
        normalised = validate_consent(document)
    except MalformedTransaction as exc:
        raise FhirError(
            422, "business-rule", f"consent cannot be granted: {exc}", ["Consent"]
        ) from None
    return {"consent": normalised}


# ----------------------------------------------------------------------------- state -> FHIR


def _fhir_period(value: Any) -> dict[str, str] | None:
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    start, end = value
    out: dict[str, str] = {}
    if isinstance(start, int):
        out["start"] = format_instant(start)
    if isinstance(end, int):
        out["end"] = format_instant(end - 1)
    return out or None


def _fhir_actor(actor: Mapping[str, Any]) -> dict[str, Any]:
    kind, aid = actor.get("kind"), str(actor.get("id") or "")
    if kind == "org":
        ref: dict[str, Any] = {"reference": f"Organization/{aid}"}
    elif kind == "practitioner":
        ref = {"reference": f"Practitioner/{aid}"}
    elif kind == "role":
        ref = {"identifier": {"system": ROLE_SYSTEM, "value": aid}, "display": f"any {aid}"}
    else:
        ref = {
            "identifier": {"system": ACTOR_SYSTEM, "value": "referred"},
            "display": "anyone holding an active referral for the patient",
        }
    return {
        "role": {
            "coding": [
                {"system": SYS_PARTICIPATION, "code": "IRCP", "display": "information recipient"}
            ]
        },
        "reference": ref,
    }


def _fhir_provision(prov: Mapping[str, Any], root_period: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": prov.get("type", "deny")}
    period = _fhir_period(root_period)
    if period:
        out["period"] = period
    if prov.get("actors"):
        out["actor"] = [_fhir_actor(a) for a in prov["actors"]]
    if prov.get("actions"):
        out["action"] = [{"coding": [{"system": SYS_ACTION, "code": a}]} for a in prov["actions"]]
    if prov.get("purposes"):
        out["purpose"] = [{"system": SYS_ACT_REASON, "code": p} for p in prov["purposes"]]
    if prov.get("resource_types"):
        out["class"] = [{"system": SYS_RESOURCE_TYPES, "code": t} for t in prov["resource_types"]]
    data_period = _fhir_period(prov.get("data_period"))
    if data_period:
        out["dataPeriod"] = data_period
    if prov.get("provisions"):
        out["provision"] = [_fhir_provision(child) for child in prov["provisions"]]
    return out


def payload_to_consent(state_obj: Mapping[str, Any]) -> dict[str, Any]:
    """A FHIR Consent for a consent document from ledger state (or a grant payload).

    Accepts the ``consent/<patient>/<id>`` state object (with ``status``), the
    bare consent document, or the ``{"consent": {...}}`` grant payload.
    """
    doc: Mapping[str, Any] = state_obj
    if "consent" in state_obj and isinstance(state_obj["consent"], Mapping):
        doc = state_obj["consent"]
    status = state_obj.get("status", doc.get("status", "active"))
    resource: dict[str, Any] = {
        "resourceType": "Consent",
        "id": str(doc["id"]),
        "status": "active" if status == "active" else "inactive",
        "scope": {
            "coding": [
                {"system": SYS_SCOPE, "code": "patient-privacy", "display": "Privacy Consent"}
            ]
        },
        "category": [
            {"coding": [{"system": SYS_LOINC, "code": "59284-0", "display": "Patient Consent"}]}
        ],
        "patient": {"reference": f"Patient/{doc['patient']}"},
    }
    policy = doc.get("policy")
    if policy in ("opt-in", "opt-out"):
        code = "OPTIN" if policy == "opt-in" else "OPTOUT"
        resource["policyRule"] = {"coding": [{"system": SYS_ACT_CODE, "code": code}]}
    else:
        resource["policy"] = [{"uri": POLICY_URI}]
    resource["provision"] = _fhir_provision(doc.get("provision") or {}, doc.get("period"))
    return resource
