"""BALP AuditEvents and the CapabilityStatement, checked against the R4B models."""

from __future__ import annotations

from typing import Any

import pytest

from medledger.fhir.audit import audit_event, interaction_of
from medledger.fhir.capability import INTERACTIONS, capability_statement
from medledger.fhir.dates import to_ms
from medledger.fhir.index import SEARCH_PARAMS, parse_search
from medledger.fhir.validate import SUPPORTED_TYPES, model_class, parse_resource

PATIENT = "pat-" + "cd" * 16
TX = "0f" * 32


def log_entry(**over: Any) -> dict[str, Any]:
    """An access.log entry as AccessService.audit_feed returns it (bytes hex'd)."""
    entry: dict[str, Any] = {
        "request": "req-0123456789abcdef01234567",
        "actor": "dr-ana",
        "org": "hospital-a",
        "role": "physician",
        "on_behalf": "client-9",
        "patient": PATIENT,
        "resource_types": ["Observation"],
        "records": ["3f2c9d9e-1111-4c1e-9d1a-000000000001"],
        "purpose": "TREAT",
        "action": "access",
        "outcome": "permit",
        "consents": ["consent-1"],
        "rule": "consent",
        "break_glass": False,
        "time": 1717000000123,
        "height": 42,
        "tx": TX,
        "by": "node-hospital-a",
    }
    entry.update(over)
    return entry


def _codes(cc_list: list[dict[str, Any]]) -> list[str]:
    return [c["code"] for cc in cc_list for c in cc["coding"]]


def test_read_permit_event() -> None:
    event = audit_event(log_entry(), tx_id_hex=TX)
    parse_resource(event, "AuditEvent")
    model_class("AuditEvent").model_validate(event)
    assert event["id"] == TX
    assert event["type"]["code"] == "rest"
    assert event["type"]["system"] == "http://terminology.hl7.org/CodeSystem/audit-event-type"
    assert event["subtype"] == [
        {"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}
    ]
    assert (event["action"], event["outcome"]) == ("R", "0")
    assert to_ms(event["recorded"]) == 1717000000123
    user = event["agent"][0]
    assert user["requestor"] is True
    assert user["who"] == {"reference": "Practitioner/dr-ana"}
    assert _codes(user["purposeOfUse"]) == ["TREAT"]
    assert [a["requestor"] for a in event["agent"][1:]] == [False, False, False]
    whats = [e.get("what", {}).get("reference") for e in event["entity"]]
    assert f"Patient/{PATIENT}" in whats
    assert "Observation/3f2c9d9e-1111-4c1e-9d1a-000000000001" in whats
    assert "Consent/consent-1" in whats
    assert "meta" not in event
    ledger = event["entity"][-1]
    assert ledger["what"]["identifier"]["value"] == TX
    assert {"type": "height", "valueString": "42"} in ledger["detail"]


def test_search_deny_event() -> None:
    entry = log_entry(
        outcome="deny",
        rule="default",
        consents=[],
        records=[],
        resource_types=["Condition", "Observation"],
    )
    event = audit_event(entry, tx_id_hex=TX)
    parse_resource(event, "AuditEvent")
    assert event["subtype"][0]["code"] == "search-type"
    assert (event["action"], event["outcome"]) == ("E", "4")
    assert "default" in event["outcomeDesc"]
    query = [e for e in event["entity"] if e.get("role", {}).get("code") == "24"]
    assert query and query[0]["detail"][0]["valueString"] == "Condition,Observation"


def test_break_glass_event() -> None:
    entry = log_entry(
        purpose="ETREAT", rule="break-glass", break_glass=True, role="emergency-clinician"
    )
    event = audit_event(entry, tx_id_hex=TX)
    parse_resource(event, "AuditEvent")
    assert event["meta"]["security"] == [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "BTG",
            "display": "break the glass",
        }
    ]
    assert _codes(event["purposeOfEvent"]) == ["ETREAT"]
    assert _codes(event["agent"][0]["purposeOfUse"]) == ["ETREAT"]
    event = audit_event(log_entry(break_glass=True), tx_id_hex=TX)  # purpose TREAT + BTG
    assert _codes(event["purposeOfEvent"]) == ["TREAT", "ETREAT"]


def test_patient_reading_own_record() -> None:
    event = audit_event(log_entry(actor=PATIENT, role=None, on_behalf=None), tx_id_hex=TX)
    parse_resource(event, "AuditEvent")
    assert event["agent"][0]["who"] == {"reference": f"Patient/{PATIENT}"}
    assert len(event["agent"]) == 3  # user, organisation, node


def test_interaction_from_request_prefix() -> None:
    assert interaction_of(log_entry(request="search-1")) == "search-type"
    assert interaction_of(log_entry(request="vread-1")) == "vread"
    assert interaction_of(log_entry(request="history-1")) == "history-instance"
    assert interaction_of(log_entry(records=["a", "b"])) == "search-type"
    event = audit_event(log_entry(), tx_id_hex=TX, interaction="vread")
    assert (event["subtype"][0]["code"], event["action"]) == ("vread", "R")


# ----------------------------------------------------------------------------- capability


@pytest.mark.parametrize("smart", [True, False])
def test_capability_statement_validates(smart: bool) -> None:
    cs = capability_statement("https://node.example:8443/fhir", smart=smart)
    parse_resource(cs, "CapabilityStatement")
    assert cs["fhirVersion"] == "4.0.1"
    assert "application/fhir+json" in cs["format"]
    rest = cs["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    assert {r["type"] for r in rest["resource"]} == set(SUPPORTED_TYPES)
    security = rest["security"]
    if smart:
        ext = security["extension"][0]
        assert ext["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
        assert ext["extension"] == [
            {"url": "token", "valueUri": "https://node.example:8443/auth/token"}
        ]
        assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    else:
        assert "extension" not in security and "service" not in security


def test_capability_statement_tells_the_truth() -> None:
    cs = capability_statement("https://h/fhir", smart=True, token_url="https://auth.h/token")
    assert (
        cs["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"]
        == "https://auth.h/token"
    )
    by_type = {r["type"]: r for r in cs["rest"][0]["resource"]}
    obs = by_type["Observation"]
    assert [i["code"] for i in obs["interaction"]] == list(INTERACTIONS["Observation"])
    assert "delete" not in [i["code"] for r in by_type.values() for i in r["interaction"]]
    assert [i["code"] for i in by_type["AuditEvent"]["interaction"]] == ["read", "search-type"]
    ops = {(t, o["name"]) for t, r in by_type.items() for o in r.get("operation", [])}
    assert ops == {
        ("Patient", "everything"),
        ("AuditEvent", "proof"),
        ("Observation", "duplicate-check"),
    }
    assert (
        by_type["AuditEvent"]["operation"][0]["definition"]
        == "https://h/fhir/OperationDefinition/AuditEvent-proof"
    )
    # every advertised search parameter is one parse_search accepts, and vice versa
    for rtype, res in by_type.items():
        names = {p["name"] for p in res.get("searchParam", [])}
        assert names == set(SEARCH_PARAMS[rtype])
        for p in res.get("searchParam", []):
            value = {"token": "x", "reference": "Patient/p", "date": "2020"}[p["type"]]
            parse_search(rtype, [(p["name"], "a" if p["name"] == "_id" else value)])
        # and every advertised _include / _revinclude too
        for value in res.get("searchInclude", []):
            assert parse_search(rtype, [("_include", value)]).include == (value,)
        for value in res.get("searchRevInclude", []):
            assert parse_search(rtype, [("_revinclude", value)]).revinclude == (value,)
    assert by_type["Observation"]["searchInclude"] == ["Observation:patient", "Observation:subject"]
    assert "Observation:patient" in by_type["Patient"]["searchRevInclude"]
    assert "searchInclude" not in by_type["Consent"] and "searchInclude" not in by_type["Patient"]


def test_capability_interactions_can_be_overridden() -> None:
    cs = capability_statement(
        "https://h/fhir",
        smart=False,
        interactions={"Consent": ("read", "create", "search-type", "update")},
    )
    parse_resource(cs, "CapabilityStatement")
    consent = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Consent")
    assert [i["code"] for i in consent["interaction"]] == [
        "read",
        "create",
        "search-type",
        "update",
    ]
    assert consent["versioning"] == "versioned-update"
