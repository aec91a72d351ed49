"""FHIR Consent <-> consent_v1 documents: round trips and refusals."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from medledger.contracts.consent_v1 import validate_consent
from medledger.fhir.consent import (
    ACTOR_SYSTEM,
    POLICY_URI,
    ROLE_SYSTEM,
    consent_to_payload,
    payload_to_consent,
)
from medledger.fhir.dates import to_ms
from medledger.fhir.outcome import FhirError
from medledger.fhir.validate import parse_resource

PATIENT = "pat-" + "ab" * 16
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"


def fhir_consent(**over: Any) -> dict[str, Any]:
    """A patient's FHIR Consent as a client (e.g. the portal) would post it."""
    doc: dict[str, Any] = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{PATIENT}"},
        "dateTime": "2024-05-01T09:00:00Z",
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": {
            "type": "permit",
            "period": {"start": "2024-05-01", "end": "2025-04-30"},
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                            }
                        ]
                    },
                    "reference": {"reference": "Organization/hospital-b"},
                }
            ],
            "action": [{"coding": [{"system": ACTION, "code": "access"}]}],
            "purpose": [{"system": ACT_REASON, "code": "TREAT"}],
            "class": [
                {"system": RESOURCE_TYPES, "code": "Observation"},
                {"system": RESOURCE_TYPES, "code": "Condition"},
            ],
            "dataPeriod": {"start": "2020-01"},
            "provision": [
                {
                    "type": "deny",
                    "actor": [
                        {
                            "role": {"text": "recipient"},
                            "reference": {"reference": "Practitioner/dr-x"},
                        }
                    ],
                }
            ],
        },
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def _refused(resource: dict[str, Any], patient: str = PATIENT) -> FhirError:
    with pytest.raises(FhirError) as info:
        consent_to_payload(resource, patient)
    return info.value


def test_fhir_consent_to_payload() -> None:
    resource = fhir_consent(id="consent-1")
    parse_resource(resource, "Consent")
    payload = consent_to_payload(resource, PATIENT)
    consent = payload["consent"]
    assert validate_consent(consent) == consent
    assert consent["id"] == "consent-1"
    assert consent["patient"] == PATIENT
    assert consent["policy"] == "opt-in"
    # FHIR period end is inclusive of its day; the contract's is exclusive
    assert consent["period"] == [to_ms("2024-05-01"), to_ms("2025-05-01")]
    prov = consent["provision"]
    assert prov["type"] == "permit"
    assert prov["actors"] == [{"kind": "org", "id": "hospital-b"}]
    assert prov["actions"] == ["access"]
    assert prov["purposes"] == ["TREAT"]
    assert prov["resource_types"] == ["Condition", "Observation"]
    assert prov["data_period"] == [to_ms("2020-01-01"), None]
    assert prov["provisions"][0]["type"] == "deny"
    assert prov["provisions"][0]["actors"] == [{"kind": "practitioner", "id": "dr-x"}]


def test_consent_id_choice() -> None:
    assert (
        consent_to_payload(fhir_consent(id="from-body"), PATIENT, consent_id="api")["consent"]["id"]
        == "api"
    )
    assert consent_to_payload(fhir_consent(id="from-body"), PATIENT)["consent"]["id"] == "from-body"
    generated = consent_to_payload(fhir_consent(), PATIENT)["consent"]["id"]
    assert len(generated) == 36


def test_round_trip_from_state() -> None:
    state = {
        "id": "c-7",
        "patient": PATIENT,
        "period": [1700000000000, 1800000000000],
        "policy": None,
        "provision": {
            "type": "permit",
            "actors": [
                {"kind": "org", "id": "org-b"},
                {"kind": "role", "id": "emergency-clinician"},
                {"kind": "referred", "id": ""},
                {"kind": "practitioner", "id": "dr-1"},
            ],
            "actions": ["access", "use"],
            "purposes": ["ETREAT", "TREAT"],
            "resource_types": ["AllergyIntolerance", "Observation"],
            "data_period": [1600000000123, 1650000000000],
            "provisions": [
                {
                    "type": "deny",
                    "actors": [],
                    "actions": [],
                    "purposes": ["HRESCH"],
                    "resource_types": [],
                    "data_period": [None, None],
                    "provisions": [
                        {
                            "type": "permit",
                            "actors": [{"kind": "org", "id": "research-1"}],
                            "actions": [],
                            "purposes": [],
                            "resource_types": ["Observation"],
                            "data_period": [None, None],
                            "provisions": [],
                        }
                    ],
                }
            ],
        },
        "status": "active",
        "by": PATIENT,
        "height": 12,
        "revoked_at": None,
    }
    resource = payload_to_consent(state)
    parse_resource(resource, "Consent")
    assert resource["status"] == "active"
    assert resource["policy"] == [{"uri": POLICY_URI}]
    refs = [a["reference"] for a in resource["provision"]["actor"]]
    assert {
        "identifier": {"system": ROLE_SYSTEM, "value": "emergency-clinician"},
        "display": "any emergency-clinician",
    } in refs
    assert any(r.get("identifier", {}).get("system") == ACTOR_SYSTEM for r in refs)
    back = consent_to_payload(resource, PATIENT)["consent"]
    expected = validate_consent(
        {k: state[k] for k in ("id", "patient", "period", "policy", "provision")}
    )
    assert back == expected
    # and again through the grant payload form
    assert consent_to_payload(payload_to_consent({"consent": back}), PATIENT)["consent"] == back


def test_round_trip_from_fhir() -> None:
    payload = consent_to_payload(fhir_consent(id="c-1"), PATIENT)
    again = consent_to_payload(payload_to_consent(payload), PATIENT)
    assert again == payload


def test_revoked_consent_renders_inactive() -> None:
    state = {**consent_to_payload(fhir_consent(id="c-2"), PATIENT)["consent"], "status": "revoked"}
    resource = payload_to_consent(state)
    assert resource["status"] == "inactive"
    parse_resource(resource, "Consent")
    err = _refused(resource)  # an inactive consent is not a grant
    assert err.expression == ["Consent.status"]


@pytest.mark.parametrize(
    ("mutate", "expression"),
    [
        (lambda c: c.update(status="draft"), "Consent.status"),
        (lambda c: c["scope"]["coding"][0].update(code="research"), "Consent.scope"),
        (lambda c: c.update(patient={"reference": "Patient/someone-else"}), "Consent.patient"),
        (
            lambda c: c["policyRule"]["coding"][0].update(code="OPTINR"),
            "Consent.policyRule",
        ),
        (lambda c: c.update(policy=[{"uri": "http://example.org/policy"}]), "Consent.policy[0]"),
        (
            lambda c: c["provision"].update(
                data=[{"meaning": "instance", "reference": {"reference": "Observation/1"}}]
            ),
            "Consent.provision.data",
        ),
        (
            lambda c: c["provision"].update(securityLabel=[{"system": "http://x", "code": "R"}]),
            "Consent.provision.securityLabel",
        ),
        (lambda c: c["provision"].update(code=[{"text": "x"}]), "Consent.provision.code"),
        (
            lambda c: c["provision"]["provision"][0].update(period={"start": "2024"}),
            "Consent.provision.provision[0].period",
        ),
        (
            lambda c: c["provision"]["actor"][0].update(reference={"reference": "Patient/p"}),
            "Consent.provision.actor[0].reference",
        ),
        (
            lambda c: c["provision"]["actor"][0].update(
                reference={"identifier": {"system": ROLE_SYSTEM, "value": "wizard"}}
            ),
            "Consent.provision.actor[0].reference",
        ),
        (
            lambda c: c["provision"]["purpose"][0].update(code="HTEST"),
            "Consent.provision.purpose[0]",
        ),
        (
            lambda c: c["provision"]["purpose"][0].update(system="http://other"),
            "Consent.provision.purpose[0]",
        ),
        (
            lambda c: c["provision"]["action"][0]["coding"][0].update(code="destroy"),
            "Consent.provision.action[0]",
        ),
        (
            lambda c: c["provision"]["class"][0].update(
                system="urn:ietf:bcp:13", code="text/plain"
            ),
            "Consent.provision.class[0]",
        ),
        (lambda c: c["provision"].pop("type"), "Consent.provision.type"),
        (lambda c: c.pop("provision"), "Consent.provision"),
    ],
)
def test_what_cannot_be_represented_is_refused(mutate: Any, expression: str) -> None:
    resource = fhir_consent()
    mutate(resource)
    err = _refused(resource)
    assert err.status == 422
    assert expression in [e for i in err.issues for e in i.expression]


def test_too_deep_nesting_is_refused() -> None:
    resource = fhir_consent()
    prov = resource["provision"]
    for _ in range(4):
        child = {"type": "deny"}
        prov["provision"] = [child]
        prov = child
    err = _refused(resource)
    assert err.status == 422


def test_invalid_fhir_is_refused_first() -> None:
    err = _refused(fhir_consent(status="bogus", scope=None))
    assert err.status == 422
    err = _refused({"resourceType": "Observation"})
    assert err.status == 400


def test_opt_out_and_unbounded_consents() -> None:
    resource = fhir_consent()
    resource["policyRule"]["coding"][0]["code"] = "OPTOUT"
    del resource["provision"]["period"]
    consent = consent_to_payload(resource, PATIENT)["consent"]
    assert consent["policy"] == "opt-out"
    assert consent["period"] == [None, None]
    rendered = payload_to_consent(consent)
    assert "period" not in rendered["provision"]
    assert rendered["policyRule"]["coding"][0]["code"] == "OPTOUT"


def test_period_precision_round_trip() -> None:
    for end in ("2025-04-30", "2025-04-30T12:00:00Z", "2025-04-30T12:00:00.250Z", "2025-04"):
        resource = fhir_consent()
        resource["provision"]["period"] = {"end": end}
        consent = consent_to_payload(resource, PATIENT)["consent"]
        again = consent_to_payload(payload_to_consent(consent), PATIENT)["consent"]
        assert again["period"] == consent["period"]
        start_copy = copy.deepcopy(resource)
        start_copy["provision"]["period"] = {"start": end}
        consent = consent_to_payload(start_copy, PATIENT)["consent"]
        assert consent["period"][0] == to_ms(end)
