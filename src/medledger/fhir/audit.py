"""Access decisions on the ledger as FHIR AuditEvents shaped by IHE BALP.

Each ``access.log`` transaction records one access decision (a read, a
search, a denial). :func:`audit_event` renders it following the IHE Basic
Audit Log Patterns: the *Read* pattern (``rest``/``read``, action ``R``) for a
single record and the *Query* pattern (``rest``/``search-type``, action ``E``)
otherwise, enriched with what the *consent decision* pattern (AuthZconsent)
records: the consents that decided, the rule, and the authorising node.

* ``type``: audit-event-type ``rest``; ``subtype``: restful-interaction
  ``read`` | ``vread`` | ``history-instance`` | ``search-type``;
* ``outcome``: ``0`` (permitted) or ``4`` (denied); ``outcomeDesc`` names the
  decision rule;
* agents: the user (``IRCP`` information recipient, ``requestor: true``, with
  the purpose of use), the client application it came through (DICOM 110150),
  the organisation it acted for (``PROV``) and the serving node that decided
  (DICOM 110152);
* entities: the patient (type 1 / role 1), each record (type 2 / role 4), the
  search (role 24, Query) for searches, each consent that decided, and the
  ledger transaction (height, rule, request id);
* break-glass: ``purposeOfEvent`` and the user's ``purposeOfUse`` carry
  ``ETREAT`` and ``meta.security`` the v3-ActCode ``BTG`` label.

The AuditEvent id is the transaction id (hex), so
``AuditEvent/<id>/$proof`` can find its inclusion proof. How the request was
made is taken from the request id prefix when the service sets one
(``read-``, ``vread-``, ``history-``, ``search-``, ``everything-``), else
guessed: one record of one type is a read, anything else a search.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medledger.fhir.dates import format_instant

__all__ = ["audit_event", "interaction_of"]

SYS_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
SYS_RESTFUL = "http://hl7.org/fhir/restful-interaction"
SYS_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
SYS_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SYS_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SYS_ROLE_CLASS = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
SYS_DICOM = "http://dicom.nema.org/resources/ontology/DCM"
SYS_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
SYS_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
SYS_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SYS_RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"

ROLE_SYSTEM = "urn:medledger:role"
NODE_SYSTEM = "urn:medledger:node"
CLIENT_SYSTEM = "urn:medledger:client"
PRINCIPAL_SYSTEM = "urn:medledger:principal"
TX_SYSTEM = "urn:medledger:tx"

_SUBTYPES = {
    "read": ("read", "R"),
    "vread": ("vread", "R"),
    "history-instance": ("history-instance", "R"),
    "search-type": ("search-type", "E"),
}
_PREFIXES = {
    "read-": "read",
    "vread-": "vread",
    "history-": "history-instance",
    "search-": "search-type",
    "everything-": "search-type",
    "dupcheck-": "search-type",
}


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"coding": [_coding(system, code, display)]}


def interaction_of(entry: Mapping[str, Any]) -> str:
    """``read`` | ``vread`` | ``history-instance`` | ``search-type`` for an access.log entry."""
    request = str(entry.get("request") or "")
    for prefix, interaction in _PREFIXES.items():
        if request.startswith(prefix):
            return interaction
    records: Sequence[Any] = entry.get("records") or []
    types: Sequence[Any] = entry.get("resource_types") or []
    return "read" if len(records) == 1 and len(types) == 1 else "search-type"


def _user_reference(entry: Mapping[str, Any]) -> dict[str, Any]:
    actor = str(entry.get("actor") or "")
    if actor and (actor == entry.get("patient") or actor.startswith("pat-")):
        return {"reference": f"Patient/{actor}"}
    if entry.get("role"):
        return {"reference": f"Practitioner/{actor}"}
    return {"identifier": {"system": PRINCIPAL_SYSTEM, "value": actor}, "display": actor}


def audit_event(
    entry: Mapping[str, Any], *, tx_id_hex: str, interaction: str | None = None
) -> dict[str, Any]:
    """A BALP-shaped AuditEvent for one ``access.log`` entry (as ``audit_feed`` returns it).

    ``interaction`` overrides what :func:`interaction_of` infers.
    """
    kind = interaction or interaction_of(entry)
    subtype, action = _SUBTYPES.get(kind, _SUBTYPES["search-type"])
    permit = entry.get("outcome") == "permit"
    break_glass = bool(entry.get("break_glass"))
    purpose = str(entry.get("purpose") or "TREAT")
    purposes = [purpose]
    if break_glass and "ETREAT" not in purposes:
        purposes.append("ETREAT")
    purpose_cc = [_cc(SYS_ACT_REASON, p) for p in purposes]
    org = str(entry.get("org") or "")
    node = str(entry.get("by") or org)
    patient = str(entry.get("patient") or "")
    rule = str(entry.get("rule") or "")
    types = [str(t) for t in entry.get("resource_types") or []]
    records = [str(r) for r in entry.get("records") or []]

    user: dict[str, Any] = {
        "type": _cc(SYS_PARTICIPATION, "IRCP", "information recipient"),
        "who": _user_reference(entry),
        "requestor": True,
        "purposeOfUse": purpose_cc,
    }
    if entry.get("role"):
        user["role"] = [_cc(ROLE_SYSTEM, str(entry["role"]))]
    agents: list[dict[str, Any]] = [user]
    if entry.get("on_behalf"):
        agents.append(
            {
                "type": _cc(SYS_DICOM, "110150", "Application"),
                "who": {"identifier": {"system": CLIENT_SYSTEM, "value": str(entry["on_behalf"])}},
                "requestor": False,
            }
        )
    if org:
        agents.append(
            {
                "type": _cc(SYS_ROLE_CLASS, "PROV", "healthcare provider"),
                "who": {"reference": f"Organization/{org}"},
                "requestor": False,
            }
        )
    node_ref = {
        "identifier": {"system": NODE_SYSTEM, "value": node},
        "display": f"medledger node of {org}" if org else "medledger node",
    }
    agents.append(
        {
            "type": _cc(SYS_DICOM, "110152", "Destination Role ID"),
            "who": node_ref,
            "requestor": False,
        }
    )

    entities: list[dict[str, Any]] = []
    if patient:
        entities.append(
            {
                "what": {"reference": f"Patient/{patient}"},
                "type": _coding(SYS_ENTITY_TYPE, "1", "Person"),
                "role": _coding(SYS_OBJECT_ROLE, "1", "Patient"),
            }
        )
    for rid in records:
        what: dict[str, Any] = (
            {"reference": f"{types[0]}/{rid}"}
            if len(types) == 1
            else {"identifier": {"value": rid}}
        )
        entities.append(
            {
                "what": what,
                "type": _coding(SYS_ENTITY_TYPE, "2", "System Object"),
                "role": _coding(SYS_OBJECT_ROLE, "4", "Domain Resource"),
            }
        )
    if subtype == "search-type" and types:
        entities.append(
            {
                "type": _coding(SYS_ENTITY_TYPE, "2", "System Object"),
                "role": _coding(SYS_OBJECT_ROLE, "24", "Query"),
                "description": f"search of {', '.join(types)} for the patient",
                "detail": [{"type": "resource_types", "valueString": ",".join(types)}],
            }
        )
    for cid in entry.get("consents") or []:
        entities.append(
            {
                "what": {"reference": f"Consent/{cid}"},
                "type": _coding(SYS_RESOURCE_TYPES, "Consent", "Consent"),
            }
        )
    details = [{"type": "rule", "valueString": rule or "unknown"}]
    if entry.get("request"):
        details.append({"type": "request", "valueString": str(entry["request"])})
    if entry.get("height") is not None:
        details.append({"type": "height", "valueString": str(entry["height"])})
    entities.append(
        {
            "what": {"identifier": {"system": TX_SYSTEM, "value": tx_id_hex}},
            "type": _coding(SYS_ENTITY_TYPE, "2", "System Object"),
            "description": "the access.log transaction on the ledger",
            "detail": details,
        }
    )

    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": tx_id_hex}
    if break_glass:
        event["meta"] = {"security": [_coding(SYS_ACT_CODE, "BTG", "break the glass")]}
    time = entry.get("time")
    event.update(
        {
            "type": _coding(SYS_EVENT_TYPE, "rest", "Restful Operation"),
            "subtype": [_coding(SYS_RESTFUL, subtype)],
            "action": action,
            "recorded": format_instant(int(time) if isinstance(time, int) else 0),
            "outcome": "0" if permit else "4",
            "outcomeDesc": (
                f"{'permitted' if permit else 'denied'} by rule {rule}"
                + (" (break-glass)" if break_glass else "")
            ),
            "purposeOfEvent": purpose_cc,
            "agent": agents,
            "source": {
                "site": org or node,
                "observer": node_ref,
                "type": [_coding(SYS_SOURCE_TYPE, "4", "Application Server")],
            },
            "entity": entities,
        }
    )
    return event
