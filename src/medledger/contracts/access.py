"""The access decision: one pure function, :func:`decide`, over a state snapshot.

``decide(state, request)`` reads only ``state`` and ``request`` (the time of the
request comes in the request; nothing reads a clock) and returns a
:class:`Decision`. Resource types are decided one by one; the decision permits
when at least one requested type is permitted, and the server must return only
``permitted_types``.

Decision checklist
------------------
1. **Request.** ``purpose`` must be a known PurposeOfUse code, ``action`` a known
   consent action and ``resource_types`` a non-empty tuple of FHIR R4 types;
   otherwise every type is denied (rule ``invalid-request``).
2. **Actor.** ``actor`` must be an active ``practitioner`` or ``app`` principal of
   ``org``, and ``org`` an active member; otherwise every type is denied (rule
   ``actor``, reason "unknown or suspended actor").
3. **Patient.** ``patient`` must be registered (rule ``patient``).
4. **Record.** If ``record`` is given it must exist and belong to ``patient``
   (rule ``record``) and not be shredded (rule ``shredded``).
5. For each requested type ``t``, in order, the first step that decides wins:

   1. **Role baseline.** Some role of the actor must allow both ``t``
      (:data:`ROLE_TYPES`) and the purpose (:data:`ROLE_PURPOSES`); otherwise deny
      (rule ``role``). Nothing below, not even break-glass, overrides this.
   2. **Custodian.** If ``record`` is given, is of type ``t``, is held by ``org``
      and the purpose is ``TREAT``: permit (rule ``custodian``). An organisation
      may always use its own records to treat; consent governs sharing.
   3. **Consents.** The patient's consents with status ``active`` whose
      validity period covers ``time`` (``start <= time < end``) are evaluated
      (in id order). In one consent a provision *applies* when it matches actor,
      action, purpose, resource type and data period (empty list = any; see
      :func:`provision_applies`) and its parent applies. The deepest applicable
      provisions decide: a provision whose children produce results takes
      theirs (deny if any child denies), else its own type. Across consents any
      applicable **deny wins** (rule ``consent``, deny).
   4. Otherwise any applicable **permit** permits (rule ``consent``).
   5. **Patient rule.** If ``record`` is given, is of type ``t``, the purpose is
      ``TREAT`` or ``ETREAT`` and a grant written by one of the *patient's* CEL
      rules names the actor or its org: permit (rule ``patient-rule``). Org rules
      never permit by themselves.
   6. **Default policy** (``policy.consent_default``): ``opt-in`` denies (rule
      ``default``, "no consent"); ``opt-out`` permits ``TREAT`` and ``ETREAT`` only.
   7. **Break-glass.** A deny from step 3 or 6 becomes a permit (rule
      ``break-glass``) when ``break_glass`` is requested, the purpose is
      ``ETREAT``, the actor has the ``emergency-clinician`` role and holds a
      declaration for this patient, made for ``org``, whose window covers
      ``time`` and whose resource types (empty = any) include ``t``.

Actor matching in a provision: ``org`` matches ``org``; ``practitioner`` matches
the actor id; ``role`` matches a role of the actor; ``referred`` matches when
the patient has an active referral, valid at ``time``, to the actor or its org
covering ``t`` (so a referral counts only where a consent permits referred
actors). Data period: a provision with a data period applies to a *permit*
only when the record's effective time is known (``record`` given, of type
``t``, with ``effective``) and inside it; a *deny* with a data period applies
unless the effective time is known and outside it (unknown data is treated
conservatively in both directions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medledger.contracts import breakglass_v1, consent_v1, records_v1, referrals_v1, rules_v1
from medledger.contracts._common import (
    ACTIONS,
    FHIR_TYPES,
    PURPOSES,
    in_period,
    policy,
    principal,
)
from medledger.contracts.base import get_obj, scan_objs
from medledger.contracts.core import k_org
from medledger.contracts.patients_v1 import k_patient
from medledger.state.base import StateReader

__all__ = [
    "CLINICAL_TYPES",
    "ROLE_PURPOSES",
    "ROLE_TYPES",
    "AccessRequest",
    "Decision",
    "TypeDecision",
    "decide",
    "provision_applies",
]

#: Clinical resource types: what physicians, nurses and emergency clinicians may see.
CLINICAL_TYPES: frozenset[str] = frozenset(
    {
        "AllergyIntolerance",
        "Appointment",
        "BodyStructure",
        "CarePlan",
        "CareTeam",
        "ClinicalImpression",
        "Communication",
        "Composition",
        "Condition",
        "DetectedIssue",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentReference",
        "Encounter",
        "EpisodeOfCare",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "ImagingStudy",
        "Immunization",
        "Media",
        "Medication",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationRequest",
        "MedicationStatement",
        "NutritionOrder",
        "Observation",
        "Patient",
        "Procedure",
        "QuestionnaireResponse",
        "RiskAssessment",
        "ServiceRequest",
        "Specimen",
    }
)

ROLE_TYPES: dict[str, frozenset[str]] = {
    "physician": CLINICAL_TYPES,
    "nurse": CLINICAL_TYPES,
    "emergency-clinician": CLINICAL_TYPES,
    "lab": frozenset({"Observation", "DiagnosticReport", "Specimen", "ServiceRequest", "Patient"}),
    "pharmacist": frozenset(
        {"MedicationRequest", "MedicationStatement", "AllergyIntolerance", "Patient", "Condition"}
    ),
    "privacy-officer": frozenset({"AuditEvent", "Consent"}),
    "admin": frozenset(),
}

ROLE_PURPOSES: dict[str, frozenset[str]] = {
    "physician": frozenset({"TREAT", "ETREAT", "HRESCH", "PUBHLTH", "CAREMGT"}),
    "nurse": frozenset({"TREAT", "ETREAT", "HRESCH", "PUBHLTH", "CAREMGT"}),
    "emergency-clinician": frozenset({"TREAT", "ETREAT"}),
    "lab": frozenset({"TREAT", "HRESCH", "PUBHLTH"}),
    "pharmacist": frozenset({"TREAT", "ETREAT"}),
    "privacy-officer": frozenset({"HOPERAT", "HLEGAL"}),
    "admin": frozenset(),
}

TREATMENT = frozenset({"TREAT", "ETREAT"})


@dataclass(frozen=True, slots=True)
class AccessRequest:
    actor: str  # principal id of the practitioner or app
    org: str  # the org the actor acts for
    patient: str
    resource_types: tuple[str, ...]
    purpose: str
    time: int  # ms since the epoch: when the access happens
    action: str = "access"
    break_glass: bool = False
    record: str | None = None


@dataclass(frozen=True, slots=True)
class TypeDecision:
    resource_type: str
    permit: bool
    rule: str
    reason: str
    consents: tuple[str, ...]
    break_glass: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    permit: bool
    permitted_types: tuple[str, ...]
    denied_types: tuple[str, ...]
    rule: str
    reason: str
    consents: tuple[str, ...]
    break_glass: bool
    details: tuple[TypeDecision, ...] = ()


def _deny_all(req: AccessRequest, rule: str, reason: str) -> Decision:
    types = tuple(dict.fromkeys(req.resource_types))
    details = tuple(TypeDecision(t, False, rule, reason, ()) for t in types)
    return Decision(False, (), types, rule, reason, (), False, details)


@dataclass(frozen=True, slots=True)
class _Ctx:
    req: AccessRequest
    roles: frozenset[str]
    record: Mapping[str, Any] | None
    state: StateReader


def _actor_matches(actor: Mapping[str, str], ctx: _Ctx, t: str) -> bool:
    kind, ident = actor["kind"], actor["id"]
    req = ctx.req
    if kind == "org":
        return ident == req.org
    if kind == "practitioner":
        return ident == req.actor
    if kind == "role":
        return ident in ctx.roles
    if kind == "referred":
        return bool(
            referrals_v1.referral_covers(ctx.state, req.patient, req.actor, req.org, t, req.time)
        )
    return False  # pragma: no cover - validated at grant time


def _effective(ctx: _Ctx, t: str) -> int | None:
    rec = ctx.record
    if rec is None or rec["resource_type"] != t or rec.get("effective") is None:
        return None
    return int(rec["effective"])


def provision_applies(prov: Mapping[str, Any], ctx: _Ctx, t: str) -> bool:
    """Does this provision (ignoring its children and parent) match the request for ``t``?"""
    req = ctx.req
    if prov["actors"] and not any(_actor_matches(a, ctx, t) for a in prov["actors"]):
        return False
    if prov["actions"] and req.action not in prov["actions"]:
        return False
    if prov["purposes"] and req.purpose not in prov["purposes"]:
        return False
    if prov["resource_types"] and t not in prov["resource_types"]:
        return False
    dp = prov["data_period"]
    if dp[0] is not None or dp[1] is not None:
        eff = _effective(ctx, t)
        if eff is None:
            return bool(prov["type"] == "deny")
        return in_period(dp, eff)
    return True


def _evaluate(prov: Mapping[str, Any], ctx: _Ctx, t: str) -> str | None:
    if not provision_applies(prov, ctx, t):
        return None
    results = [r for r in (_evaluate(c, ctx, t) for c in prov["provisions"]) if r is not None]
    if results:
        return "deny" if "deny" in results else "permit"
    return str(prov["type"])


def _active_consents(state: StateReader, patient: str, time: int) -> list[Mapping[str, Any]]:
    return [
        c
        for _, c in scan_objs(state, consent_v1.k_consent_prefix(patient))
        if c["status"] == "active" and in_period(c["period"], time)
    ]


def _role_allows(roles: frozenset[str], t: str, purpose: str) -> bool:
    return any(t in ROLE_TYPES.get(r, ()) and purpose in ROLE_PURPOSES.get(r, ()) for r in roles)


def _patient_rule_grant(ctx: _Ctx, t: str) -> str | None:
    req, rec = ctx.req, ctx.record
    if rec is None or rec["resource_type"] != t or req.purpose not in TREATMENT:
        return None
    for key in (
        rules_v1.k_grant(rec["id"], "practitioner", req.actor),
        rules_v1.k_grant(rec["id"], "org", req.org),
    ):
        grant = get_obj(ctx.state, key)
        if grant is not None and grant["basis"] == "patient":
            return str(grant["rule"])
    return None


def _break_glass(ctx: _Ctx, t: str) -> str | None:
    req = ctx.req
    if not req.break_glass or req.purpose != "ETREAT" or "emergency-clinician" not in ctx.roles:
        return None
    for d in breakglass_v1.active_declarations(ctx.state, req.patient, req.actor, req.time):
        if d["org"] == req.org and (not d["resource_types"] or t in d["resource_types"]):
            return str(d["id"])
    return None


def _decide_type(
    ctx: _Ctx, t: str, consents: list[Mapping[str, Any]], default: str
) -> TypeDecision:
    req = ctx.req
    # 5.1 role baseline
    if not _role_allows(ctx.roles, t, req.purpose):
        return TypeDecision(
            t, False, "role", f"roles {sorted(ctx.roles)} may not see {t} for {req.purpose}", ()
        )
    # 5.2 custodian
    rec = ctx.record
    if (
        rec is not None
        and rec["resource_type"] == t
        and rec["custodian"] == req.org
        and req.purpose == "TREAT"
    ):
        return TypeDecision(t, True, "custodian", f"{req.org} holds this {t} record", ())
    # 5.3 / 5.4 consents
    denies, permits = [], []
    for c in consents:
        result = _evaluate(c["provision"], ctx, t)
        if result == "deny":
            denies.append(str(c["id"]))
        elif result == "permit":
            permits.append(str(c["id"]))
    deny: TypeDecision
    if denies:
        reason = f"denied by consent {', '.join(denies)}"
        deny = TypeDecision(t, False, "consent", reason, tuple(denies))
    elif permits:
        return TypeDecision(
            t, True, "consent", f"permitted by consent {', '.join(permits)}", tuple(permits)
        )
    else:
        # 5.5 patient rule
        rule = _patient_rule_grant(ctx, t)
        if rule is not None:
            return TypeDecision(t, True, "patient-rule", f"granted by patient rule {rule}", ())
        # 5.6 default
        if default == "opt-out" and req.purpose in TREATMENT:
            return TypeDecision(t, True, "default", "no consent applies; network is opt-out", ())
        deny = TypeDecision(t, False, "default", f"no consent permits {t} ({default} network)", ())
    # 5.7 break-glass
    bg = _break_glass(ctx, t)
    if bg is not None:
        return TypeDecision(
            t, True, "break-glass", f"emergency access under declaration {bg}", deny.consents, True
        )
    return deny


def decide(state: StateReader, request: AccessRequest) -> Decision:
    """Decide ``request`` against ``state``; see the module docstring for the checklist."""
    req = request
    # 1. request
    types = tuple(dict.fromkeys(req.resource_types))
    if (
        req.purpose not in PURPOSES
        or req.action not in ACTIONS
        or not types
        or any(t not in FHIR_TYPES for t in types)
    ):
        return _deny_all(req, "invalid-request", "unknown purpose, action or resource type")
    # 2. actor
    actor = principal(state, req.actor)
    org = get_obj(state, k_org(req.org))
    if (
        actor is None
        or actor["kind"] not in ("practitioner", "app")
        or actor["status"] != "active"
        or actor["org"] != req.org
        or org is None
        or org["status"] != "active"
    ):
        return _deny_all(req, "actor", "unknown or suspended actor")
    # 3. patient
    if get_obj(state, k_patient(req.patient)) is None:
        return _deny_all(req, "patient", "unknown patient")
    # 4. record
    record = None
    if req.record is not None:
        record = records_v1.get_record(state, req.record)
        if record is None or record["patient"] != req.patient:
            return _deny_all(req, "record", "unknown record")
        if record["status"] == "shredded":
            return _deny_all(req, "shredded", "the record was shredded")
    # 5. per type
    ctx = _Ctx(req, frozenset(actor["roles"]), record, state)
    consents = _active_consents(state, req.patient, req.time)
    default = str(policy(get_obj(state, b"cfg/network") or {})["consent_default"])
    details = tuple(_decide_type(ctx, t, consents, default) for t in types)
    permitted = tuple(d.resource_type for d in details if d.permit)
    denied = tuple(d.resource_type for d in details if not d.permit)
    lead = next((d for d in details if d.permit), details[0])
    return Decision(
        permit=bool(permitted),
        permitted_types=permitted,
        denied_types=denied,
        rule=lead.rule,
        reason="; ".join(f"{d.resource_type}: {d.reason}" for d in details),
        consents=tuple(sorted({c for d in details for c in d.consents})),
        break_glass=any(d.break_glass for d in details),
        details=details,
    )
