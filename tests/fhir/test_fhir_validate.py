"""parse_resource on real Synthea data, and on damaged copies of it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from fhirdata import ALL_RESOURCES, resources_of

from medledger.fhir.outcome import FhirError
from medledger.fhir.validate import (
    KNOWN_TYPES,
    NO_R4B_MODEL,
    SUPPORTED_TYPES,
    is_known_type,
    model_class,
    parse_resource,
)


def _fails(body: Any, expected_type: str | None = None) -> FhirError:
    with pytest.raises(FhirError) as info:
        parse_resource(body, expected_type)
    return info.value


# ----------------------------------------------------------------------------- real data


def test_the_data_covers_every_synthea_type() -> None:
    types = {r["resourceType"] for _, r in ALL_RESOURCES}
    assert len(ALL_RESOURCES) > 200
    assert types >= {
        "Patient",
        "Observation",
        "Condition",
        "Encounter",
        "Procedure",
        "MedicationRequest",
        "AllergyIntolerance",
        "Immunization",
        "DiagnosticReport",
        "DocumentReference",
        "Claim",
        "ExplanationOfBenefit",
        "CarePlan",
        "Goal",
        "ImagingStudy",
        "Device",
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "Location",
    }


@pytest.mark.parametrize(("label", "resource"), ALL_RESOURCES, ids=[x[0] for x in ALL_RESOURCES])
def test_every_real_resource_validates(label: str, resource: dict[str, Any]) -> None:
    body = json.dumps(resource, ensure_ascii=False).encode()
    parsed = parse_resource(body, resource["resourceType"])
    # returned as sent: no re-serialisation of instants or decimals
    assert parsed == resource
    assert parse_resource(copy.deepcopy(resource)) == resource


def test_returned_json_keeps_the_client_form() -> None:
    obs = next(r for r in resources_of("Observation") if "issued" in r)
    assert obs["issued"].endswith("+00:00")
    assert parse_resource(json.dumps(obs).encode())["issued"] == obs["issued"]


def test_known_types_are_r4_types_with_models() -> None:
    assert SUPPORTED_TYPES <= KNOWN_TYPES
    assert "Claim" in KNOWN_TYPES and "Provenance" in KNOWN_TYPES
    assert "MedicinalProduct" not in KNOWN_TYPES  # R4 only, no R4B model
    assert "Citation" not in KNOWN_TYPES  # R4B only, not an R4 type
    assert model_class("Nope") is None


def test_known_types_are_exactly_the_r4_types_with_an_r4b_model() -> None:
    """The static list (no model imported to build it) matches what the models say."""
    from fhir.resources.R4B import get_fhir_model_class

    from medledger.contracts._common import FHIR_TYPES

    def has_model(rtype: str) -> bool:
        try:
            cls = get_fhir_model_class(rtype)
        except ValueError:
            return False
        return getattr(cls, "__resource_type__", None) == rtype

    assert {t for t in FHIR_TYPES if has_model(t)} == KNOWN_TYPES
    assert all(model_class(t) is not None for t in KNOWN_TYPES)
    assert all(model_class(t) is None for t in NO_R4B_MODEL)
    assert all(is_known_type(t) for t in KNOWN_TYPES) and not is_known_type("Citation")


def test_importing_the_library_loads_no_model() -> None:
    """Models load on first use: start-up (the CLI, each import worker) pays for none."""
    code = (
        "import sys, medledger.fhir, medledger.fhir.index, medledger.fhir.bundle, "
        "medledger.fhir.ndjson, medledger.fhir.capability\n"
        "loaded = [m for m in sys.modules if m.startswith('fhir.resources.R4B.')]\n"
        "assert 'fhir.resources.R4B.patient' not in loaded, loaded\n"
        "from medledger.fhir.validate import parse_resource\n"
        "parse_resource({'resourceType': 'Patient'}, 'Patient')\n"
        "assert 'fhir.resources.R4B.patient' in sys.modules\n"
        "assert 'fhir.resources.R4B.claim' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- 400: not readable


def test_unparsable_json_is_400() -> None:
    err = _fails(b'{"resourceType": "Patient",')
    assert (err.status, err.code) == (400, "structure")


@pytest.mark.parametrize(
    "body",
    [
        b'{"resourceType":"Patient","gender":"male","gender":"female"}',
        b'{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":NaN}}',
        b"\xff\xfe{}",
        b'{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1e999}}',
        b"[]",
        b'"Patient"',
    ],
)
def test_bad_json_forms_are_400(body: bytes) -> None:
    assert _fails(body).status == 400


def test_missing_or_unknown_resource_type_is_400() -> None:
    err = _fails({"id": "x"})
    assert (err.status, err.expression) == (400, ["resourceType"])
    err = _fails({"resourceType": "Nonsense"})
    assert (err.status, err.code) == (400, "not-supported")
    err = _fails({"resourceType": "MedicinalProduct"})
    assert err.status == 400


def test_wrong_resource_type_for_the_endpoint_is_400() -> None:
    obs = resources_of("Observation")[0]
    err = _fails(obs, "Condition")
    assert (err.status, err.code, err.expression) == (400, "invalid", ["resourceType"])


def test_elements_of_another_type_are_400() -> None:
    enc = resources_of("Encounter")[0]
    enc["resourceType"] = "Observation"
    err = _fails(enc)
    assert err.status == 400
    assert "Observation.class" in [e for i in err.issues for e in i.expression]


def test_unknown_element_is_400_with_its_path() -> None:
    enc = resources_of("Encounter")[0]
    enc["participant"][0]["colour"] = "blue"
    err = _fails(enc)
    assert (err.status, err.code) == (400, "structure")
    assert err.expression == ["Encounter.participant[0].colour"]


def test_wrong_json_type_is_400() -> None:
    obs = resources_of("Observation")[0]
    obs["status"] = 5
    err = _fails(obs)
    assert (err.status, err.expression) == (400, ["Observation.status"])
    obs = resources_of("Observation")[0]
    obs["subject"] = "Patient/123"
    assert _fails(obs).expression == ["Observation.subject"]


@pytest.mark.parametrize(
    "bad", ["2020-13-01T00:00:00Z", "2020-02-30", "yesterday", "2020-01-01T10:00"]
)
def test_invalid_dates_in_every_observation_are_400(bad: str) -> None:
    for obs in resources_of("Observation"):
        if "effectiveDateTime" not in obs:
            continue
        obs["effectiveDateTime"] = bad
        err = _fails(obs)
        assert err.status == 400, bad
        assert err.expression == ["Observation.effectiveDateTime"]


def test_invalid_id_is_400() -> None:
    pat = resources_of("Patient")[0]
    pat["id"] = "has space"
    err = _fails(pat)
    assert (err.status, err.code, err.expression) == (400, "value", ["Patient.id"])


@pytest.mark.parametrize(
    ("mutate", "expr"),
    [
        (lambda r: r.update(language=""), "Condition.language"),
        (lambda r: r.update(note=[]), "Condition.note"),
        (lambda r: r.update(note=None), "Condition.note"),
        (lambda r: r.update(onsetPeriod={}), "Condition.onsetPeriod"),
        (lambda r: r["code"]["coding"].append(None), "Condition.code.coding[1]"),
    ],
)
def test_fhir_json_rules_nulls_and_empties_are_400(
    mutate: Callable[[dict[str, Any]], None], expr: str
) -> None:
    cond = resources_of("Condition")[0]
    mutate(cond)
    err = _fails(cond)
    assert (err.status, err.code) == (400, "structure")
    assert expr in err.expression


def test_null_placeholder_with_extension_twin_is_allowed() -> None:
    pat = resources_of("Patient")[0]
    pat["name"][0]["given"] = ["A", None]
    pat["name"][0]["_given"] = [None, {"extension": [{"url": "http://x", "valueString": "y"}]}]
    parse_resource(pat)


def test_two_choices_of_one_element_are_400() -> None:
    obs = next(r for r in resources_of("Observation") if "valueQuantity" in r)
    obs["valueString"] = "also"
    assert _fails(obs).status == 400


# ----------------------------------------------------------------------------- 422: content rules

STATUS_TYPES = [
    "Observation",
    "Encounter",
    "Procedure",
    "MedicationRequest",
    "Immunization",
    "DiagnosticReport",
    "DocumentReference",
]


@pytest.mark.parametrize("rtype", STATUS_TYPES)
def test_missing_status_in_every_real_resource_is_422(rtype: str) -> None:
    items = resources_of(rtype)
    assert items
    for res in items:
        del res["status"]
        err = _fails(res)
        assert (err.status, err.code) == (422, "required")
        assert f"{rtype}.status" in err.expression


@pytest.mark.parametrize("rtype", STATUS_TYPES)
def test_unknown_status_code_in_every_real_resource_is_422(rtype: str) -> None:
    for res in resources_of(rtype):
        res["status"] = "done-ish"
        err = _fails(res)
        assert (err.status, err.code, err.expression) == (422, "code-invalid", [f"{rtype}.status"])


@pytest.mark.parametrize(
    ("rtype", "element"),
    [
        ("Observation", "code"),
        ("Condition", "subject"),
        ("Encounter", "class"),
        ("Procedure", "subject"),
        ("MedicationRequest", "subject"),
        ("MedicationRequest", "intent"),
        ("AllergyIntolerance", "patient"),
        ("Immunization", "vaccineCode"),
        ("Immunization", "patient"),
        ("DiagnosticReport", "code"),
        ("DocumentReference", "content"),
    ],
)
def test_missing_required_elements_are_422(rtype: str, element: str) -> None:
    for res in resources_of(rtype):
        del res[element]
        err = _fails(res)
        assert (err.status, err.code) == (422, "required")
        assert f"{rtype}.{element}" in err.expression


def test_medication_request_needs_a_medication_and_a_valid_intent() -> None:
    mr = resources_of("MedicationRequest")[0]
    del mr["medicationCodeableConcept"]
    err = _fails(mr)
    assert err.status == 422
    mr = resources_of("MedicationRequest")[0]
    mr["intent"] = "wish"
    err = _fails(mr)
    assert (err.status, err.expression) == (422, ["MedicationRequest.intent"])


def test_allergy_codes_and_invariants() -> None:
    a = resources_of("AllergyIntolerance")[0]
    a["criticality"] = "extreme"
    assert _fails(a).expression == ["AllergyIntolerance.criticality"]
    a = resources_of("AllergyIntolerance")[0]
    a["clinicalStatus"]["coding"][0]["code"] = "gone"
    assert _fails(a).code == "code-invalid"
    a = resources_of("AllergyIntolerance")[0]
    del a["clinicalStatus"]
    err = _fails(a)
    assert (err.code, err.diagnostics[:5]) == ("invariant", "ait-1")
    a = resources_of("AllergyIntolerance")[0]
    a["verificationStatus"]["coding"][0]["code"] = "entered-in-error"
    err = _fails(a)
    assert (err.status, err.diagnostics[:5]) == (422, "ait-2")


def test_condition_status_codes_and_con_3_4_5() -> None:
    abated = [r for r in resources_of("Condition") if "abatementDateTime" in r]
    assert abated
    for cond in abated:  # con-4: abated -> resolved/inactive/remission
        cond["clinicalStatus"]["coding"][0]["code"] = "active"
        err = _fails(cond)
        assert (err.status, err.code, err.diagnostics[:5]) == (422, "invariant", "con-4")
        assert err.expression == ["Condition.clinicalStatus"]
    cond = resources_of("Condition")[0]
    cond["verificationStatus"]["coding"][0]["code"] = "entered-in-error"
    assert "con-5" in [i.diagnostics[:5] for i in _fails(cond).issues]
    cond = next(r for r in resources_of("Condition") if "abatementDateTime" not in r)
    del cond["clinicalStatus"]
    cond["category"] = [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                    "code": "problem-list-item",
                }
            ]
        }
    ]
    assert _fails(cond).diagnostics.startswith("con-3")
    cond = resources_of("Condition")[0]
    cond["verificationStatus"]["coding"][0]["code"] = "maybe"
    assert _fails(cond).expression == ["Condition.verificationStatus"]


def test_observation_invariants() -> None:
    obs = next(r for r in resources_of("Observation") if "valueQuantity" in r)
    obs["dataAbsentReason"] = {"text": "not measured"}
    assert _fails(obs).diagnostics.startswith("obs-6")
    obs = next(r for r in resources_of("Observation") if "component" in r)
    obs["valueString"] = "x"
    obs["component"][0]["code"] = copy.deepcopy(obs["code"])
    err = _fails(obs)
    assert err.diagnostics.startswith("obs-7")
    assert err.expression == ["Observation.component[0].code"]
    obs = next(r for r in resources_of("Observation") if "valueQuantity" in r)
    obs["referenceRange"] = [{"type": {"text": "normal"}}]
    assert _fails(obs).diagnostics.startswith("obs-3")


def test_patient_codes_and_pat_1() -> None:
    pat = resources_of("Patient")[0]
    pat["gender"] = "robot"
    assert _fails(pat).expression == ["Patient.gender"]
    pat = resources_of("Patient")[0]
    pat["contact"] = [{"gender": "female"}]
    assert _fails(pat).diagnostics.startswith("pat-1")
    pat = resources_of("Patient")[0]
    pat["telecom"][0]["use"] = "pigeon"
    assert _fails(pat).expression == ["Patient.telecom[0].use"]


def test_document_reference_codes() -> None:
    doc = resources_of("DocumentReference")[0]
    doc["docStatus"] = "scribbled"
    assert _fails(doc).expression == ["DocumentReference.docStatus"]
    doc = resources_of("DocumentReference")[0]
    doc["content"][0] = {"format": {"code": "x"}}
    err = _fails(doc)
    assert err.status == 422
    assert "DocumentReference.content[0].attachment" in err.expression


def test_all_issues_are_reported_together() -> None:
    mr = resources_of("MedicationRequest")[0]
    mr["status"] = "bad"
    mr["intent"] = "bad"
    mr["priority"] = "bad"
    err = _fails(mr)
    assert sorted(e for i in err.issues for e in i.expression) == [
        "MedicationRequest.intent",
        "MedicationRequest.priority",
        "MedicationRequest.status",
    ]


def test_primitive_extension_can_stand_in_for_a_required_status() -> None:
    proc = resources_of("Procedure")[0]
    del proc["status"]
    proc["_status"] = {
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                "valueCode": "unknown",
            }
        ]
    }
    parse_resource(proc)


# ----------------------------------------------------------------------------- Consent, AuditEvent

PATIENT = "pat-" + "1" * 32


def consent(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
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
        "policyRule": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}
            ]
        },
        "provision": {"type": "permit"},
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_a_minimal_consent_validates() -> None:
    parse_resource(consent(), "Consent")


@pytest.mark.parametrize("element", ["status", "scope", "category"])
def test_consent_required_elements(element: str) -> None:
    err = _fails(consent(**{element: None}))
    assert (err.status, err.code) == (422, "required")
    assert f"Consent.{element}" in err.expression


def test_consent_invariants() -> None:
    err = _fails(consent(policyRule=None))
    assert (err.status, err.code, err.diagnostics[:5]) == (422, "invariant", "ppc-1")
    for key, scope in (
        ("ppc-2", "patient-privacy"),
        ("ppc-3", "research"),
        ("ppc-4", "adr"),
        ("ppc-5", "treatment"),
    ):
        doc = consent(patient=None)
        doc["scope"]["coding"][0]["code"] = scope
        err = _fails(doc)
        assert (err.code, err.diagnostics[:5], err.expression) == (
            "invariant",
            key,
            ["Consent.patient"],
        )


def test_consent_codes() -> None:
    err = _fails(consent(status="signed"))
    assert (err.status, err.expression) == (422, ["Consent.status"])
    err = _fails(consent(provision={"type": "permit", "provision": [{"type": "maybe"}]}))
    assert err.expression == ["Consent.provision.provision[0].type"]


def test_audit_event_rules() -> None:
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
        },
        "action": "R",
        "recorded": "2024-01-01T00:00:00Z",
        "outcome": "0",
        "agent": [{"who": {"reference": "Practitioner/x"}, "requestor": True}],
        "source": {"observer": {"reference": "Organization/o"}},
    }
    parse_resource(event, "AuditEvent")
    for key in ("recorded", "agent", "source", "type"):
        bad = copy.deepcopy(event)
        del bad[key]
        err = _fails(bad)
        assert (err.status, err.code) == (422, "required"), key
        assert f"AuditEvent.{key}" in err.expression
    bad = copy.deepcopy(event)
    bad["outcome"] = "1"
    assert _fails(bad).expression == ["AuditEvent.outcome"]
    bad = copy.deepcopy(event)
    bad["action"] = "X"
    assert _fails(bad).expression == ["AuditEvent.action"]
    bad = copy.deepcopy(event)
    bad["entity"] = [{"name": "n", "query": "cXVlcnk="}]
    assert _fails(bad).diagnostics.startswith("sev-1")


def test_error_outcome_is_a_valid_operation_outcome() -> None:
    err = _fails(consent(status="x", policyRule=None))
    outcome = err.outcome()
    parse_resource(outcome, "OperationOutcome")
    assert len(outcome["issue"]) == 2
