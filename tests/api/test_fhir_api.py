"""The FHIR R4 API over HTTP: a real uvicorn server, real SMART tokens, the real ledger.

Each test makes its own patients on the shared session network (see conftest),
so tests do not depend on each other's data.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from medledger.datadir import DataDir
from medledger.fhir.index import SUBSETTED
from medledger.ledger.checkpoint import checkpoint_of, verify_checkpoint
from medledger.ledger.note import NoteVerifier
from medledger.ledger.tx import Transaction
from medledger.merkle.hasher import leaf_hash
from medledger.merkle.verify import verify_inclusion

from .conftest import (
    FHIR_JSON,
    Api,
    LiveServer,
    consent_resource,
    lab_observation,
    new_key,
    records_digest,
    synthea_patient,
)

# -- helpers -------------------------------------------------------------------------------------


def outcome(r: httpx.Response, status: int) -> dict[str, Any]:
    """Assert ``r`` is an OperationOutcome error with ``status``; return it."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(FHIR_JSON)
    doc: dict[str, Any] = r.json()
    assert doc["resourceType"] == "OperationOutcome"
    assert doc["issue"] and doc["issue"][0]["severity"] == "error"
    return doc


def entries(bundle: dict[str, Any], mode: str = "match") -> list[dict[str, Any]]:
    return [
        e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode
    ]


def condition(patient: str, code: str = "44054006", display: str = "Diabetes") -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]
        },
        "subject": {"reference": f"Patient/{patient}"},
        "onsetDateTime": "2019-05-01T00:00:00Z",
    }


# -- discovery and metadata ----------------------------------------------------------------------


def test_metadata_and_smart_configuration(api: Api, live: LiveServer) -> None:
    r = api.http.get("/fhir/metadata")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(FHIR_JSON)
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    rest = cs["rest"][0]
    token = rest["security"]["extension"][0]["extension"][0]
    assert token == {"url": "token", "valueUri": live.settings.token_url}
    types = {r["type"]: {i["code"] for i in r["interaction"]} for r in rest["resource"]}
    assert types["AuditEvent"] == {"read", "search-type"}
    assert {"create", "update", "delete", "read", "vread", "history-instance"} <= types[
        "Observation"
    ]
    assert "history-type" not in types["Observation"]  # not implemented, so not claimed
    for path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        conf = api.http.get(path).json()
        assert conf["token_endpoint"] == live.settings.token_url
        assert "private_key_jwt" in conf["token_endpoint_auth_methods_supported"]


# -- SMART token endpoint -------------------------------------------------------------------------


def test_token_endpoint_refuses_bad_assertions(api: Api, live: LiveServer) -> None:
    client = api.client("system:clinic", "system/*.rs")

    def token(form: dict[str, str]) -> httpx.Response:
        return api.http.post("/auth/token", data=form)

    good = client.form()
    r = token(good)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    doc = r.json()
    assert doc["token_type"] == "bearer" and doc["expires_in"] == 300
    assert doc["scope"] == "system/*.rs"

    replay = token(good)  # the same assertion (same jti) again
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
    assert "jti" in replay.json()["error_description"]

    wrong_aud = token(client.form(aud=f"{live.base_url}/fhir"))
    assert wrong_aud.status_code == 401 and "aud" in wrong_aud.json()["error_description"]

    expired = token(client.form(exp_in=-5))
    assert expired.status_code == 401 and "expired" in expired.json()["error_description"]

    too_long = token(client.form(exp_in=3600))
    assert too_long.status_code == 401

    other_key, _ = new_key()
    forged = token(client.form(key=other_key))  # right kid, wrong key
    assert forged.status_code == 401 and forged.json()["error"] == "invalid_client"

    unknown_kid = token(client.form(kid="not-registered"))
    assert unknown_kid.status_code == 401 and "kid" in unknown_kid.json()["error_description"]

    unknown_client = token(client.form(iss="cli-0000"))
    assert unknown_client.status_code == 401

    widen = token(client.form(scope="system/*.cruds"))  # registered for .rs only
    assert widen.status_code == 200 and widen.json()["scope"] == "system/*.rs"

    bad_grant = token({**client.form(), "grant_type": "password"})
    assert bad_grant.status_code == 400 and bad_grant.json()["error"] == "unsupported_grant_type"


def test_authentication_attempts_are_logged_without_secrets(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """Log-in monitoring: issued tokens, refused token requests and refused bearer tokens
    go to the ``medledger.security`` log with the client and address, never a secret."""
    client = api.client("system:clinic", "system/*.rs")
    caplog.set_level(logging.INFO, logger="medledger.security")
    good = client.form()
    issued = api.http.post("/auth/token", data=good)
    assert issued.status_code == 200
    replay = api.http.post("/auth/token", data=good)
    assert replay.status_code == 401
    bogus = "not-a-token-" + "x" * 20
    r = api.http.get("/fhir/Observation?patient=p", headers={"Authorization": f"Bearer {bogus}"})
    assert r.status_code == 401
    records = [rec for rec in caplog.records if rec.name == "medledger.security"]
    lines = [rec.getMessage() for rec in records]
    assert any(
        "issued a token" in m and client.client_id in m and "127.0.0.1" in m for m in lines
    ), lines
    refused = [rec for rec in records if "refused a token request" in rec.getMessage()]
    assert refused and refused[0].levelno == logging.WARNING
    assert client.client_id in refused[0].getMessage() and "jti" in refused[0].getMessage()
    assert any("refused a bearer token" in m and "/fhir/Observation" in m for m in lines)
    text = "\n".join(lines)
    for secret in (good["client_assertion"], issued.json()["access_token"], bogus):
        assert secret not in text


def test_missing_invalid_and_expired_tokens_are_401(api: Api, live: LiveServer) -> None:
    r = api.http.get("/fhir/Patient/pat-00000000000000000000000000000000")
    doc = outcome(r, 401)
    assert doc["issue"][0]["code"] == "login"
    assert r.headers["www-authenticate"].startswith("Bearer")

    r = api.http.get("/fhir/Observation?patient=x", headers={"Authorization": "Bearer nope"})
    outcome(r, 401)
    assert 'error="invalid_token"' in r.headers["www-authenticate"]

    # automatic logoff: tokens are short-lived; an expired one is refused
    pid = api.new_patient()
    smart = live.runtime.require_smart()
    client = api.client("system:hospital", "system/*.cruds")
    registered = live.call(smart.get_client(client.client_id))
    assert registered is not None
    # expiry is a whole second (floor(now) + ttl): a 1 s token may have lived out its
    # last fraction of a second before its first use; with 2 s it has at least one left
    info = live.call(smart.issue(registered, "system/*.rs", ttl=2))
    headers = {"Authorization": f"Bearer {info.token}"}
    assert api.http.get(f"/fhir/Patient/{pid}", headers=headers).status_code == 200
    time.sleep(max(0.0, info.expires_at - time.time()) + 0.1)
    outcome(api.http.get(f"/fhir/Patient/{pid}", headers=headers), 401)


# -- CRUD, versions, errors ------------------------------------------------------------------------


def test_create_read_update_version_delete(api: Api) -> None:
    pid = api.new_patient()
    body = lab_observation(pid)
    r = api.post("Observation", body, "system:lab")
    assert r.status_code == 201, r.text
    oid = r.json()["id"]
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["location"].endswith(f"/fhir/Observation/{oid}/_history/1")
    assert r.json()["meta"]["versionId"] == "1"

    r = api.get(f"Observation/{oid}", "system:lab")
    assert r.status_code == 200 and r.headers["etag"] == 'W/"1"'
    assert r.json()["valueQuantity"]["value"] == 5.9
    assert "last-modified" in r.headers and r.headers["cache-control"] == "no-store"

    # conditional read: 304 (no body) while the client holds the current version
    modified = r.headers["last-modified"]
    for held in (
        {"If-None-Match": 'W/"1"'},
        {"If-None-Match": '"1", W/"7"'},
        {"If-None-Match": "*"},
    ):
        same = api.get(f"Observation/{oid}", "system:lab", headers=held)
        assert same.status_code == 304 and same.content == b"", held
        assert same.headers["etag"] == 'W/"1"' and same.headers["last-modified"] == modified
    assert (
        api.get(f"Observation/{oid}", "system:lab", headers={"If-None-Match": 'W/"2"'}).status_code
        == 200
    )
    since = {"If-Modified-Since": modified}
    assert api.get(f"Observation/{oid}", "system:lab", headers=since).status_code == 304
    earlier = {"If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}
    assert api.get(f"Observation/{oid}", "system:lab", headers=earlier).status_code == 200
    garbage = {"If-Modified-Since": "yesterday"}
    assert api.get(f"Observation/{oid}", "system:lab", headers=garbage).status_code == 200

    changed = {**r.json(), "valueQuantity": {**body["valueQuantity"], "value": 6.1}}
    r = api.put(f"Observation/{oid}", changed, "system:lab", headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == 'W/"2"' and r.json()["meta"]["versionId"] == "2"

    stale = api.put(f"Observation/{oid}", changed, "system:lab", headers={"If-Match": 'W/"1"'})
    assert outcome(stale, 412)["issue"][0]["code"] == "conflict"

    assert (
        api.get(f"Observation/{oid}/_history/1", "system:lab").json()["valueQuantity"]["value"]
        == 5.9
    )
    assert (
        api.get(f"Observation/{oid}/_history/2", "system:lab").json()["valueQuantity"]["value"]
        == 6.1
    )
    outcome(api.get(f"Observation/{oid}/_history/9", "system:lab"), 404)

    # another organisation cannot update or delete what the lab holds
    outcome(api.put(f"Observation/{oid}", changed, "system:hospital"), 403)

    r = api.delete(f"Observation/{oid}", "system:lab", headers={"If-Match": 'W/"2"'})
    assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome"
    assert outcome(api.get(f"Observation/{oid}", "system:lab"), 410)["issue"][0]["code"] == (
        "deleted"
    )
    hist = api.get(f"Observation/{oid}/_history", "system:lab").json()
    assert hist["type"] == "history" and hist["total"] == 3
    methods = [e["request"]["method"] for e in hist["entry"]]
    assert methods == ["DELETE", "PUT", "POST"]


def test_decimals_keep_their_precision(api: Api) -> None:
    """5.40 is stored, served, searched and versioned as 5.40, not 5.4 (FHIR decimals)."""
    pid = api.new_patient()
    body = lab_observation(pid)
    raw = json.dumps(body).replace(
        json.dumps(body["valueQuantity"]["value"]), "5.40", 1
    )  # the client's own digits
    assert '"value": 5.40' in raw
    r = api.post("Observation", raw.encode(), "system:lab")
    assert r.status_code == 201, r.text
    assert '"value":5.40' in r.text
    oid = r.json()["id"]
    assert '"value":5.40' in api.get(f"Observation/{oid}", "system:lab").text
    assert '"value":5.40' in api.get(f"Observation?patient={pid}", "system:lab").text
    assert '"value":5.40' in api.get(f"Observation/{oid}/_history/1", "system:lab").text
    # a value a float prints back as written is unchanged too
    r = api.put(
        f"Observation/{oid}",
        {**r.json(), "valueQuantity": {**body["valueQuantity"], "value": 6.1}},
        "system:lab",
    )
    assert r.status_code == 200 and '"value":6.1,' in r.text


def test_errors_are_operation_outcomes(api: Api) -> None:
    pid = api.new_patient()
    who = "system:lab"
    outcome(api.post("Observation", b"{not json", who), 400)
    outcome(api.post("Observation", {**lab_observation(pid), "colour": "red"}, who), 400)
    no_status = lab_observation(pid)
    del no_status["status"]
    assert outcome(api.post("Observation", no_status, who), 422)["issue"][0]["code"] == "required"
    wrong_type = api.post("Observation", {"resourceType": "Condition"}, who)
    outcome(wrong_type, 400)
    no_patient = lab_observation(pid)
    del no_patient["subject"]
    outcome(api.post("Observation", no_patient, who), 422)
    unknown_patient = lab_observation("pat-" + "0" * 32)
    outcome(api.post("Observation", unknown_patient, who), 422)
    outcome(api.get("Observation/does-not-exist", who), 404)
    outcome(api.get("Observation?patient=" + pid + "&colour=red", who), 400)
    # ... unless the client asks for lenient handling
    lenient = api.get(
        "Observation?patient=" + pid + "&colour=red", who, headers={"Prefer": "handling=lenient"}
    )
    assert lenient.status_code == 200
    outcome(api.post("AuditEvent", {"resourceType": "AuditEvent"}, who), 405)
    outcome(api.http.get("/fhir/Specimen/1", headers=api.headers(who)), 404)
    r = api.http.post(
        "/fhir/Observation",
        content=b"<Observation/>",
        headers={**api.headers(who), "Content-Type": "application/xml"},
    )
    outcome(r, 415)
    # JSON only: a client that accepts only XML (or asks for it with _format) gets 406
    xml = {"Accept": "application/fhir+xml"}
    assert outcome(api.get("Observation/does-not-exist", who, headers=xml), 406)["issue"][0][
        "code"
    ] == ("not-supported")
    outcome(api.http.get("/fhir/metadata", headers=xml), 406)
    outcome(api.get(f"Observation?patient={pid}&_format=xml", who), 406)
    outcome(api.get(f"Patient/{pid}?_format=application/fhir+xml", who), 406)
    accepted = (
        "application/fhir+json",
        "application/fhir+xml;q=0.9, application/json;q=0.5",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",  # a browser
        "application/fhir+json; fhirVersion=4.0",
    )
    for accept in accepted:
        got = api.get(f"Observation?patient={pid}", who, headers={"Accept": accept})
        assert got.status_code == 200, accept
    search = f"Observation?patient={pid}"
    outcome(api.get(search, who, headers={"Accept": "application/json;q=0"}), 406)
    for fmt in ("json", "application/fhir+json", "application/fhir json"):  # unencoded "+"
        assert api.get(f"{search}&_format={fmt}", who).status_code == 200, fmt
    # an id already used by another type: 409
    obs = api.observation(pid)
    cond = condition(pid)
    cond["id"] = obs["id"]
    assert outcome(api.put(f"Condition/{obs['id']}", cond, who), 409)["issue"][0]["code"] == (
        "conflict"
    )
    outcome(api.put(f"Observation/{obs['id']}", obs, who, headers={"If-Match": "v1"}), 400)


# -- consent, scopes and the audit trail -----------------------------------------------------------


def test_scopes_cannot_widen_consent(api: Api) -> None:
    pid = api.new_patient()
    obs = api.observation(pid, "lab")
    path = f"Observation/{obs['id']}"
    before = len(api.audit(pid))
    # a practitioner client whose token carries the widest scope, but no consent exists
    r = api.get(path, "practitioner:dr-house", "system/*.rs")
    doc = outcome(r, 403)
    assert "consent" in doc["issue"][0]["diagnostics"]
    # a system client of another organisation: only its own organisation's records
    outcome(api.get(path, "system:clinic", "system/*.rs"), 403)
    feed = api.audit(pid)
    assert len(feed) == before + 2
    assert [e["outcome"] for e in feed[-2:]] == ["deny", "deny"]

    api.consent(pid, to_org="hospital", types=["Observation"])
    assert api.get(path, "practitioner:dr-house", "system/*.rs").status_code == 200
    # scopes narrow: a Condition-only token cannot read the Observation consent allows
    narrow = api.get(path, "practitioner:dr-house", "user/Condition.rs")
    assert "scopes" in outcome(narrow, 403)["issue"][0]["diagnostics"]
    # consent is per type: Condition is still not shared
    cond = api.post("Condition", condition(pid), "system:lab").json()
    outcome(api.get(f"Condition/{cond['id']}", "practitioner:dr-house"), 403)


def test_every_read_search_and_denial_is_logged_once(api: Api) -> None:
    pid = api.new_patient()
    obs = api.observation(pid, "lab")
    api.consent(pid, to_org="clinic", types=["Observation", "Patient"])
    who = "practitioner:dr-clinic"

    def one_entry(call: Any, status: int) -> dict[str, Any]:
        before = len(api.audit(pid))
        r = call()
        assert r.status_code == status, r.text
        feed = api.audit(pid)
        assert len(feed) == before + 1, f"{len(feed) - before} audit entries"
        return feed[-1]

    e = one_entry(lambda: api.get(f"Observation/{obs['id']}", who), 200)
    assert e["outcome"] == "permit" and e["records"] == [obs["id"]] and e["actor"] == "dr-clinic"
    assert e["on_behalf"] == api.client(who, "user/*.cruds").client_id  # unique identification
    held = {"If-None-Match": 'W/"1"'}  # a conditional read answered 304 is still an access
    e = one_entry(lambda: api.get(f"Observation/{obs['id']}", who, headers=held), 304)
    assert e["outcome"] == "permit" and e["records"] == [obs["id"]]
    e = one_entry(lambda: api.get(f"Observation?patient={pid}", who), 200)
    assert e["outcome"] == "permit"
    e = one_entry(lambda: api.get(f"Observation?patient={pid}&code=0000-0", who), 200)
    assert e["records"] == []  # an empty search is still an access, and logged
    e = one_entry(lambda: api.get(f"Observation/{obs['id']}/_history", who), 200)
    e = one_entry(lambda: api.get(f"Observation/{obs['id']}/_history/1", who), 200)
    e = one_entry(lambda: api.get(f"Patient/{pid}/$everything", who), 200)
    e = one_entry(
        lambda: api.get(f"Observation/$duplicate-check?patient={pid}&code=4548-4", who), 200
    )
    e = one_entry(lambda: api.get(f"Condition?patient={pid}", who), 403)
    assert e["outcome"] == "deny"
    e = one_entry(lambda: api.get(f"Observation/{obs['id']}", "practitioner:dr-house"), 403)
    assert e["outcome"] == "deny" and e["actor"] == "dr-house"
    e = one_entry(lambda: api.get(f"Consent?patient={pid}", f"patient:{pid}", "patient/*.rs"), 200)
    assert e["actor"] == pid and e["rule"] == "self"
    e = one_entry(lambda: api.get(f"AuditEvent?patient={pid}", "practitioner:dr-clinic"), 403)
    assert e["outcome"] == "deny"
    # refused by the token's scopes: never reaches the data, nothing to log about the patient
    before = len(api.audit(pid))
    outcome(api.get(f"Observation/{obs['id']}", who, "user/Condition.rs"), 403)
    assert len(api.audit(pid)) == before


def test_consent_as_fhir_granted_by_the_patient(api: Api) -> None:
    pid = api.new_patient()
    obs = api.observation(pid, "lab")
    patient = f"patient:{pid}"
    # only the patient grants consent
    outcome(api.post("Consent", consent_resource(pid, "clinic"), "system:hospital"), 403)
    outcome(api.post("Consent", consent_resource(pid, "clinic"), "practitioner:dr-house"), 403)
    other = api.new_patient()
    outcome(api.post("Consent", consent_resource(pid, "clinic"), f"patient:{other}"), 403)
    invalid = consent_resource(pid, "clinic")
    invalid["status"] = "proposed"
    outcome(api.post("Consent", invalid, patient, "patient/*.cruds"), 422)

    r = api.post(
        "Consent", consent_resource(pid, "clinic", ["Observation"]), patient, "patient/*.cruds"
    )
    assert r.status_code == 201, r.text
    consent = r.json()
    cid = consent["id"]
    assert consent["status"] == "active"
    assert consent["provision"]["actor"][0]["reference"]["reference"] == "Organization/clinic"
    # the grant is a ledger transaction signed by the patient's own key
    grants = api.server.call(api.server.runtime.node.state_get(f"consent/{pid}/{cid}".encode()))
    assert grants is not None
    assert api.get(f"Observation/{obs['id']}", "practitioner:dr-clinic").status_code == 200
    got = api.get(f"Consent/{cid}", patient, "patient/*.cruds").json()
    assert got["id"] == cid and got["status"] == "active"
    listed = api.get(f"Consent?patient={pid}", patient, "patient/*.cruds").json()
    assert [c["id"] for c in entries(listed)] == [cid]
    # a privacy officer of the custodian may review consents; a physician may not
    assert api.get(f"Consent/{cid}", "practitioner:po-hospital").status_code == 200
    outcome(api.get(f"Consent/{cid}", "practitioner:dr-house"), 403)

    r = api.delete(f"Consent/{cid}", patient, "patient/*.cruds")
    assert r.status_code == 200
    assert api.get(f"Consent/{cid}", patient, "patient/*.cruds").json()["status"] == "inactive"
    outcome(api.get(f"Observation/{obs['id']}", "practitioner:dr-clinic"), 403)


def test_patient_right_of_access(api: Api) -> None:
    pid = api.new_patient()
    obs = api.observation(pid, "lab")
    cond = api.post("Condition", condition(pid), "system:hospital").json()
    me = f"patient:{pid}"
    everything = api.get(f"Patient/{pid}/$everything", me, "patient/*.rs").json()
    ids = {r["id"] for r in entries(everything)}
    assert {pid, obs["id"], cond["id"]} <= ids  # every custodian
    assert api.get(f"Observation?patient={pid}", me, "patient/*.rs").json()["total"] == 1
    other = api.new_patient()
    outcome(api.get(f"Patient/{other}", me, "patient/*.rs"), 403)
    outcome(api.post("Observation", lab_observation(pid), me, "patient/*.cruds"), 403)


def test_cross_organisation_everything(api: Api) -> None:
    pid = api.new_patient("hospital")
    cond = api.post("Condition", condition(pid), "system:hospital").json()
    obs = api.observation(pid, "lab")
    # the clinic sees nothing without consent
    outcome(api.get(f"Patient/{pid}/$everything", "practitioner:dr-clinic"), 403)
    api.consent(pid, to_org="clinic", types=["Patient", "Observation", "Condition"])
    bundle = api.get(f"Patient/{pid}/$everything", "practitioner:dr-clinic").json()
    found = {r["resourceType"]: r for r in entries(bundle)}
    assert set(found) == {"Patient", "Observation", "Condition"}
    assert found["Condition"]["id"] == cond["id"]  # held by the hospital
    assert found["Observation"]["id"] == obs["id"]  # held by the lab
    assert found["Patient"]["name"] == synthea_patient()["name"]
    # the clinic's reads of other custodians' records wrapped their keys for the clinic
    store = api.server.runtime.store
    assert api.server.call(store.get_wrapped(obs["id"], 1, "org:clinic")) is not None
    # consent covers only what it names: DocumentReference is withheld, with a warning entry
    doc = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": f"Patient/{pid}"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}],
    }
    assert api.post("DocumentReference", doc, "system:hospital").status_code == 201
    bundle = api.get(f"Patient/{pid}/$everything", "practitioner:dr-clinic").json()
    assert "DocumentReference" not in {r["resourceType"] for r in entries(bundle)}
    warning = entries(bundle, "outcome")[0]["issue"][0]
    assert warning["code"] == "suppressed" and "DocumentReference" in warning["diagnostics"]


def test_everything_counts_and_pages_only_the_types_the_caller_may_ask_for(api: Api) -> None:
    pid = api.new_patient("hospital")
    api.post("Condition", condition(pid), "system:hospital")
    obs = [api.observation(pid, "lab", value=5.0 + i)["id"] for i in range(3)]
    api.consent(pid, to_org="clinic", types=["Patient", "Observation", "Condition"])
    who = "practitioner:dr-clinic"
    # the whole record: the patient, a condition, three observations
    assert api.get(f"Patient/{pid}/$everything", who).json()["total"] == 5
    # a token for the patient and observations: neither the total nor the pages count
    # the condition
    scope = "user/Patient.rs user/Observation.rs"
    narrow = api.get(f"Patient/{pid}/$everything?_count=2", who, scope).json()
    assert narrow["total"] == 4 and len(entries(narrow)) == 2
    links = {link["relation"]: link["url"] for link in narrow["link"]}
    rest = api.http.get(links["next"], headers=api.headers(who, scope)).json()
    assert rest["total"] == 4 and len(entries(rest)) == 2
    got = entries(narrow) + entries(rest)
    assert {r["id"] for r in got if r["resourceType"] == "Observation"} == set(obs)
    assert sorted(r["resourceType"] for r in got) == ["Observation"] * 3 + ["Patient"]
    # so does _type
    only = api.get(f"Patient/{pid}/$everything?_type=Condition", who).json()
    assert only["total"] == 1 and [r["resourceType"] for r in entries(only)] == ["Condition"]


def test_search_parameters_and_paging(api: Api) -> None:
    pid = api.new_patient()
    who = "system:lab"
    for i, (code, when) in enumerate(
        [("4548-4", "2020-01-05"), ("4548-4", "2021-03-01"), ("2339-0", "2021-03-02")]
    ):
        api.observation(pid, code=code, when=f"{when}T08:00:00Z", value=5.0 + i)
    vital = lab_observation(pid, code="8302-2", display="Body Height", when="2019-01-01")
    vital["category"][0]["coding"][0]["code"] = "vital-signs"
    assert api.post("Observation", vital, who).status_code == 201

    def ids(query: str) -> list[str]:
        r = api.get(f"Observation?patient={pid}&{query}", who)
        assert r.status_code == 200, r.text
        return [o["code"]["coding"][0]["code"] for o in entries(r.json())]

    assert sorted(ids("code=http://loinc.org|4548-4")) == ["4548-4", "4548-4"]
    assert sorted(ids("code=4548-4,2339-0")) == ["2339-0", "4548-4", "4548-4"]
    assert ids("code=http://snomed.info/sct|4548-4") == []
    assert sorted(ids("category=laboratory")) == ["2339-0", "4548-4", "4548-4"]
    assert ids("category=vital-signs") == ["8302-2"]
    assert ids("category=laboratory&code=2339-0") == ["2339-0"]
    assert sorted(ids("date=ge2021-01-01&date=lt2021-03-02")) == ["4548-4"]
    assert sorted(ids("date=2021-03")) == ["2339-0", "4548-4"]
    assert len(ids("_lastUpdated=gt2020-01-01")) == 4
    assert ids("_lastUpdated=lt2000-01-01") == []

    r = api.get(f"Observation?patient={pid}&_count=3", who).json()
    assert r["total"] == 4 and len(entries(r)) == 3
    links = {link["relation"]: link["url"] for link in r["link"]}
    assert "next" in links and links["next"].startswith(api.server.fhir)
    page2 = api.http.get(links["next"], headers=api.headers(who)).json()
    assert len(entries(page2)) == 1
    one = entries(r)[0]
    r = api.get(f"Observation?_id={one['id']}", who).json()
    assert [o["id"] for o in entries(r)] == [one["id"]]
    outcome(api.get("Observation", who), 400)  # a search is about one patient
    outcome(api.get("Observation?date=2021-13-45&patient=" + pid, who), 400)


def test_search_sorted_by_clinical_date_or_last_updated(api: Api) -> None:
    pid = api.new_patient()
    who = "system:lab"
    # written in this order, taken on other days; one Observation has no date
    when = {"a": "2021-03-01", "b": "2019-06-30", "c": "2023-01-15", "d": "2020-11-11"}
    made = {k: api.observation(pid, when=f"{d}T08:00:00Z")["id"] for k, d in when.items()}
    undated = lab_observation(pid)
    del undated["effectiveDateTime"]
    r = api.post("Observation", undated, who)
    assert r.status_code == 201, r.text
    made["none"] = r.json()["id"]
    name = {v: k for k, v in made.items()}

    def order(query: str) -> list[str]:
        r = api.get(f"Observation?patient={pid}&{query}", who)
        assert r.status_code == 200, r.text
        return [name[o["id"]] for o in entries(r.json())]

    assert order("_sort=-date") == ["c", "a", "d", "b", "none"]
    assert order("_sort=date") == ["b", "d", "a", "c", "none"]
    assert order("_sort=_lastUpdated") == ["a", "b", "c", "d", "none"]
    assert order("_sort=-_lastUpdated") == order("") == ["none", "d", "c", "b", "a"]
    assert order("_sort=-date&date=ge2020") == ["c", "a", "d"]
    # the latest two results, then the next page through the link, which keeps the order
    r = api.get(f"Observation?patient={pid}&_sort=-date&_count=2", who).json()
    assert [name[o["id"]] for o in entries(r)] == ["c", "a"] and r["total"] == 5
    links = {link["relation"]: link["url"] for link in r["link"]}
    assert "_sort=-date" in links["next"]
    page2 = api.http.get(links["next"], headers=api.headers(who)).json()
    assert [name[o["id"]] for o in entries(page2)] == ["d", "b"]
    # a key the type cannot sort by: 400 OperationOutcome, or ignored when lenient
    for bad in ("code", "birthdate", "date,-_lastUpdated"):
        outcome(api.get(f"Observation?patient={pid}&_sort={bad}", who), 400)
    lenient = api.get(
        f"Observation?patient={pid}&_sort=code", who, headers={"Prefer": "handling=lenient"}
    )
    assert lenient.status_code == 200 and lenient.json()["total"] == 5
    patient = api.get(f"Patient?_id={pid}&_sort=-birthdate", "system:hospital")
    assert patient.status_code == 200 and patient.json()["total"] == 1


def test_search_summary(api: Api) -> None:
    pid = api.new_patient()
    who = "system:lab"
    body = lab_observation(pid)
    body["text"] = {
        "status": "generated",
        "div": '<div xmlns="http://www.w3.org/1999/xhtml">HbA1c 5.9 %</div>',
    }
    r = api.post("Observation", body, who)
    assert r.status_code == 201, r.text
    api.observation(pid, when="2022-05-05T08:00:00Z")
    whole = {o["id"]: o for o in entries(api.get(f"Observation?patient={pid}", who).json())}

    # count: the total only, no resource read; still one decision, logged, with no records
    before = len(api.audit(pid))
    r = api.get(f"Observation?patient={pid}&_summary=count", who)
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["total"] == 2 and not bundle.get("entry")
    feed = api.audit(pid)
    assert len(feed) == before + 1 and feed[-1]["records"] == []
    assert feed[-1]["outcome"] == "permit"
    assert "_summary=count" in {x["relation"]: x["url"] for x in bundle["link"]}["self"]

    def summary(value: str) -> dict[str, dict[str, Any]]:
        r = api.get(f"Observation?patient={pid}&_summary={value}", who)
        assert r.status_code == 200, r.text
        return {o["id"]: o for o in entries(r.json())}

    subsetted = {"system": SUBSETTED["system"], "code": SUBSETTED["code"]}
    for oid, o in summary("true").items():
        # Observation's summary elements: not category, text, referenceRange...
        assert {"code", "status", "subject", "valueQuantity", "effectiveDateTime"} <= set(o)
        assert not {"category", "text"} & set(o)
        assert subsetted in o["meta"]["tag"] and o["code"] == whole[oid]["code"]
    for oid, o in summary("text").items():
        assert set(o) - {"resourceType", "id", "meta", "text"} == {"code", "status"}
        assert ("text" in o) == ("text" in whole[oid])
    for oid, o in summary("data").items():
        assert "text" not in o and o["category"] == whole[oid]["category"]
        assert subsetted in o["meta"]["tag"]
    assert summary("false") == whole
    outcome(api.get(f"Observation?patient={pid}&_summary=brief", who), 400)
    outcome(api.get(f"Observation?patient={pid}&_summary=true&_elements=code", who), 400)
    # a count the decision refuses is refused like the search
    e = api.get(f"Condition?patient={pid}&_summary=count", "practitioner:dr-clinic")
    outcome(e, 403)


def test_search_include_the_patient_and_revinclude_the_patients_records(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = api.new_patient()
    staff = "system:hospital"
    obs = [api.observation(pid, "hospital", when=f"202{i}-01-01T08:00:00Z")["id"] for i in range(3)]

    def search(query: str, who: str = staff) -> dict[str, Any]:
        r = api.get(query, who)
        assert r.status_code == 200, r.text
        bundle: dict[str, Any] = r.json()
        return bundle

    def ids(bundle: dict[str, Any], mode: str) -> list[str]:
        return [f"{e['resourceType']}/{e['id']}" for e in entries(bundle, mode)]

    before = len(api.audit(pid))
    b = search(f"Observation?patient={pid}&_count=2&_include=Observation:patient")
    assert len(ids(b, "match")) == 2 and b["total"] == 3
    assert ids(b, "include") == [f"Patient/{pid}"]
    feed = api.audit(pid)
    # the search and the include: two decisions, each logged with what it read
    assert len(feed) == before + 2 and feed[-1]["records"] == [pid]
    assert "_include=Observation%3Apatient" in {x["relation"]: x["url"] for x in b["link"]}["next"]
    b = search(f"Observation?patient={pid}&_include=Observation:subject:Patient")
    assert ids(b, "include") == [f"Patient/{pid}"]
    # no match, nothing included (and nothing more read)
    before = len(api.audit(pid))
    b = search(f"Observation?patient={pid}&code=0000-0&_include=Observation:patient")
    assert ids(b, "include") == [] and len(api.audit(pid)) == before + 1

    b = search(f"Patient?_id={pid}&_revinclude=Observation:patient&_revinclude=Condition:subject")
    assert ids(b, "match") == [f"Patient/{pid}"]
    assert sorted(ids(b, "include")) == sorted(f"Observation/{o}" for o in obs)
    assert entries(b, "outcome") == []
    # past the limit a type: the first ones, and a warning that says how to get them all
    monkeypatch.setattr("medledger.services.fhir._INCLUDE_MAX", 2)
    b = search(f"Patient?_id={pid}&_revinclude=Observation:patient")
    assert len(ids(b, "include")) == 2
    (warning,) = entries(b, "outcome")
    assert warning["issue"][0]["code"] == "too-costly"
    assert f"Observation?patient=Patient/{pid}" in warning["issue"][0]["diagnostics"]
    # and no more than one access entry may name, over all the types
    monkeypatch.setattr("medledger.services.fhir.MAX_RECORDS", 2)
    monkeypatch.setattr("medledger.services.fhir._INCLUDE_MAX", 100)
    b = search(f"Patient?_id={pid}&_revinclude=Observation:patient")
    assert len(ids(b, "include")) == 2 and len(entries(b, "outcome")) == 1
    monkeypatch.undo()

    # a practitioner the patient's consent lets see Observations only: the Patient
    # resource is withheld from the include, with a warning, and the denial is logged
    consent = consent_resource(pid, "clinic", ["Observation"])
    r = api.post("Consent", consent, f"patient:{pid}", "patient/*.cruds")
    assert r.status_code == 201, r.text
    b = search(f"Observation?patient={pid}&_include=Observation:patient", "practitioner:dr-clinic")
    assert len(ids(b, "match")) == 3 and ids(b, "include") == []
    (warning,) = entries(b, "outcome")
    assert "Patient" in warning["issue"][0]["diagnostics"]
    assert api.audit(pid)[-1]["outcome"] == "deny"

    # a token that may not search the included type: 403, before anything is searched
    before = len(api.audit(pid))
    r = api.get(
        f"Observation?patient={pid}&_include=Observation:patient", staff, "system/Observation.rs"
    )
    outcome(r, 403)
    assert len(api.audit(pid)) == before

    # unsupported forms: 400 (or ignored under handling=lenient)
    for bad in (
        f"Observation?patient={pid}&_include=Observation:encounter",
        f"Observation?patient={pid}&_include=Condition:patient",
        f"Observation?patient={pid}&_include=Observation:patient:Group",
        f"Observation?patient={pid}&_revinclude=Observation:patient",
        f"Observation?patient={pid}&_include:iterate=Observation:patient",
        f"Patient?_id={pid}&_revinclude=Patient:patient",
        f"Patient?_id={pid}&_include=Patient:patient",
    ):
        outcome(api.get(bad, staff), 400)
    lenient = api.get(
        f"Observation?patient={pid}&_include=Observation:encounter",
        staff,
        headers={"Prefer": "handling=lenient"},
    )
    assert lenient.status_code == 200 and entries(lenient.json(), "include") == []


def test_a_patient_is_found_by_an_identifier_of_the_searching_organisation(
    api: Api, network_dir: Path
) -> None:
    body = synthea_patient(2)
    tag = hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:10]
    mrn, ssn = f"MRN-{tag}", f"999-{tag[:2]}-{tag[2:6]}"
    body["identifier"] = [
        {"system": "http://hospital.smarthealthit.org", "value": mrn},
        {"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn},
    ]
    pid = api.new_patient("hospital", body)
    staff = "system:hospital"

    def found(query: str, who: str = staff) -> list[str]:
        r = api.get(f"Patient?{query}", who)
        assert r.status_code == 200, r.text
        return [p["id"] for p in entries(r.json())]

    # by system|value or by value in any system; an identifier search is one logged access
    before = len(api.audit(pid))
    assert found(f"identifier=http://hospital.smarthealthit.org|{mrn}") == [pid]
    assert len(api.audit(pid)) == before + 1
    assert found(f"identifier={ssn}") == [pid]
    assert found(f"identifier=http://hl7.org/fhir/sid/us-ssn|{mrn}") == []
    assert found("identifier=MRN-none") == []
    # an MRN means something only to the organisation that issued it: another
    # organisation's staff find nothing (no lookup of the hospital's identifiers)
    assert found(f"identifier={mrn}", "system:clinic") == []
    # the patient finds only themself
    assert found(f"identifier={mrn}", f"patient:{pid}") == [pid]
    # the identifiers are searchable but nowhere in the record store in plain text
    files = [network_dir / "records.db", network_dir / "records.db-wal"]
    raw = b"".join(f.read_bytes() for f in files if f.exists())
    assert len(raw) > 10_000 and mrn.encode() not in raw and ssn.encode() not in raw

    # a Patient indexed before identifiers were (its tokens without them) is found again
    # once reindexed; nothing else of the record changes, and a second run rewrites nothing
    runtime = api.server.runtime
    store = runtime.store
    (entry,) = api.server.call(store.search(resource_type="Patient", ids=[pid]))[0]
    identifier_tokens = {
        runtime.fhir._token("hospital", ("code", system, value))
        for value in (mrn, ssn)
        for system in (None, "http://hospital.smarthealthit.org", "http://hl7.org/fhir/sid/us-ssn")
    } & set(entry.tokens)
    assert len(identifier_tokens) == 4  # each identifier with its system, and without
    version = api.server.call(store.get_version(pid, entry.version))
    old = dataclasses.replace(entry, tokens=tuple(set(entry.tokens) - identifier_tokens))
    api.server.call(store.put_version(version, [], old))
    assert found(f"identifier={mrn}") == []
    checked, rewritten = api.server.call(runtime.fhir.reindex("hospital"))
    assert checked >= 1 and rewritten >= 1
    assert found(f"identifier={mrn}") == [pid]
    again = api.server.call(store.search(resource_type="Patient", ids=[pid]))[0][0]
    assert set(again.tokens) == set(entry.tokens) and again.last_updated == entry.last_updated
    assert api.server.call(runtime.fhir.reindex("hospital"))[1] == 0


def test_duplicate_check_across_custodians(api: Api) -> None:
    pid = api.new_patient("hospital")
    api.observation(pid, "lab", when="2020-06-01T09:00:00Z", value=6.5)
    api.observation(pid, "clinic", when="2021-02-10T09:00:00Z", value=6.1)
    api.observation(pid, "lab", code="2339-0", display="Glucose", when="2021-03-01T09:00:00Z")
    api.consent(pid, to_org="hospital", types=["Observation"])
    r = api.get(
        f"Observation/$duplicate-check?patient={pid}&code=http://loinc.org|4548-4",
        "practitioner:dr-house",
    )
    assert r.status_code == 200, r.text
    bundle = r.json()
    results = entries(bundle)
    assert [o["effectiveDateTime"] for o in results] == [
        "2021-02-10T09:00:00Z",
        "2020-06-01T09:00:00Z",
    ]
    summary = entries(bundle, "outcome")[0]["issue"][0]
    assert "2 earlier result(s)" in summary["diagnostics"]
    assert "clinic" in summary["diagnostics"] and "lab" in summary["diagnostics"]
    recent = api.get(
        f"Observation/$duplicate-check?patient={pid}&code=4548-4&since=2021-01-01",
        "practitioner:dr-house",
    ).json()
    assert len(entries(recent)) == 1
    outcome(api.get(f"Observation/$duplicate-check?patient={pid}", "practitioner:dr-house"), 400)
    # the clinic's physician: no consent for the clinic, so only the clinic's own result
    mine = api.get(
        f"Observation/$duplicate-check?patient={pid}&code=4548-4", "practitioner:dr-clinic"
    ).json()
    assert [o["effectiveDateTime"] for o in entries(mine)] == ["2021-02-10T09:00:00Z"]
    notes = [o["issue"][0] for o in entries(mine, "outcome")]
    assert notes[0]["code"] == "suppressed"
    assert "1 earlier result(s)" in notes[1]["diagnostics"]  # nothing about withheld ones
    assert mine["total"] == 1


def test_break_glass_is_allowed_for_a_declared_emergency_and_audited(
    api: Api, network_dir: Path
) -> None:
    pid = api.new_patient()
    obs = api.observation(pid, "lab")
    er = "practitioner:dr-er"
    emergency = {"X-Purpose-Of-Use": "ETREAT", "X-Break-Glass": "true"}
    outcome(api.get(f"Observation/{obs['id']}", er, headers=emergency), 403)
    key = DataDir(network_dir).identity("dr-er").signing
    runtime = api.server.runtime
    api.server.call(
        runtime.submitter.submit(
            key,
            "breakglass.declare",
            {"patient": pid, "reason": "unconscious in ED", "resource_types": []},
        )
    )
    r = api.get(f"Observation/{obs['id']}", er, headers=emergency)
    assert r.status_code == 200, r.text
    events = entries(api.get(f"AuditEvent?patient={pid}", f"patient:{pid}", "patient/*.rs").json())
    glass = [e for e in events if e.get("meta", {}).get("security")]
    assert len(glass) == 1
    purposes = {
        c["code"] for a in glass[0]["agent"] for p in a.get("purposeOfUse", []) for c in p["coding"]
    }
    assert "ETREAT" in purposes and glass[0]["outcome"] == "0"


def test_audit_events_with_verifiable_proofs(api: Api) -> None:
    pid = api.new_patient()
    obs = api.observation(pid, "lab")
    outcome(api.get(f"Observation/{obs['id']}", "practitioner:dr-house"), 403)  # a denial
    me = f"patient:{pid}"
    bundle = api.get(f"AuditEvent?patient={pid}", me, "patient/*.rs").json()
    events = entries(bundle)
    assert bundle["total"] == len(events) == len(api.audit(pid))
    denied = [e for e in events if e["outcome"] == "4"]
    assert denied, "the denied read is in the patient's audit trail"
    event = denied[0]
    assert event["type"]["code"] == "rest" and event["action"] == "R"
    assert event["subtype"][0]["code"] == "read"
    assert any(a.get("who", {}).get("reference") == "Practitioner/dr-house" for a in event["agent"])
    # the single AuditEvent, and its ledger inclusion proof
    assert api.get(f"AuditEvent/{event['id']}", me, "patient/*.rs").json()["id"] == event["id"]
    r = api.get(f"AuditEvent/{event['id']}/$proof", me, "patient/*.rs")
    assert r.status_code == 200, r.text
    params: dict[str, list[Any]] = {}
    for p in r.json()["parameter"]:
        value = next(v for k, v in p.items() if k.startswith("value"))
        params.setdefault(p["name"], []).append(value)
    raw = base64.b64decode(params["canonicalTransaction"][0])
    tx = Transaction.from_bytes(raw)
    assert tx.tx_id.hex() == event["id"] and tx.type == "access.log"
    assert tx.payload["actor"] == "dr-house" and tx.payload["outcome"] == "deny"
    lh = bytes.fromhex(params["leafHash"][0])
    assert lh == leaf_hash(raw) == hashlib.sha256(b"\x00" + raw).digest()
    note = params["checkpoint"][0]
    cp = checkpoint_of(note)
    verify_inclusion(
        params["leafIndex"][0],
        params["treeSize"][0],
        lh,
        [bytes.fromhex(h) for h in params.get("proof", [])],
        cp.root,
    )
    verifiers = [NoteVerifier.from_verifier_key(k) for k in params["verifierKey"]]
    verify_checkpoint(note, verifiers)
    # another patient may not see it; the hospital's privacy officer may
    other = api.new_patient()
    outcome(api.get(f"AuditEvent/{event['id']}", f"patient:{other}", "patient/*.rs"), 403)
    assert api.get(f"AuditEvent?patient={pid}", "practitioner:po-hospital").status_code == 200
    outcome(api.get("AuditEvent/" + "ab" * 32, me, "patient/*.rs"), 404)


# -- Bundles ---------------------------------------------------------------------------------------


def _transaction(patient_body: dict[str, Any], *, bad: bool = False) -> dict[str, Any]:
    entries_: list[dict[str, Any]] = [
        {
            "fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
            "resource": patient_body,
            "request": {"method": "POST", "url": "Patient"},
        }
    ]
    for i in range(3):
        obs = lab_observation("x", value=4.0 + i)
        obs["subject"] = {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}
        entries_.append(
            {
                "fullUrl": f"urn:uuid:22222222-2222-4222-8222-00000000000{i}",
                "resource": obs,
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    if bad:
        broken = lab_observation("x")
        broken["subject"] = {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}
        broken["status"] = "not-a-status"  # valid JSON, invalid FHIR code: 422
        entries_.append(
            {
                "fullUrl": "urn:uuid:33333333-3333-4333-8333-333333333333",
                "resource": broken,
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries_}


def test_transaction_is_all_or_nothing(api: Api, network_dir: Path) -> None:
    who = "system:hospital"
    head, store = api.head(), records_digest(network_dir)
    r = api.post("", _transaction(synthea_patient(1), bad=True), who)
    outcome(r, 422)
    assert "Bundle.entry[4]" in json.dumps(r.json())
    assert api.head() == head and records_digest(network_dir) == store

    # a failure found only against the ledger (an update of a missing record) is also pre-flight
    tx = _transaction(synthea_patient(1))
    gone = lab_observation("x")
    gone["id"] = "no-such-record"
    gone["subject"] = {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}
    tx["entry"].append(
        {"resource": gone, "request": {"method": "PUT", "url": "Observation/no-such-record"}}
    )
    outcome(api.post("", tx, who), 404)
    assert api.head() == head and records_digest(network_dir) == store

    r = api.post("", _transaction(synthea_patient(1)), who)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in resp["entry"]]
    assert statuses == ["201 Created"] * 4
    pid = resp["entry"][0]["response"]["location"].split("/")[1]
    assert pid.startswith("pat-")
    obs_id = resp["entry"][1]["response"]["location"].split("/")[1]
    obs = api.get(f"Observation/{obs_id}", who).json()
    assert obs["subject"]["reference"] == f"Patient/{pid}"  # urn:uuid rewritten


def test_batch_entries_stand_alone(api: Api) -> None:
    pid = api.new_patient()
    obs = api.observation(pid, "hospital")
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Observation/{obs['id']}"}},
            {"request": {"method": "GET", "url": "Observation/missing"}},
            {"resource": lab_observation(pid), "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "GET", "url": f"Observation?patient={pid}"}},
        ],
    }
    r = api.post("", batch, "system:hospital")
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in resp["entry"]]
    assert statuses == ["200 OK", "404 Not Found", "201 Created", "200 OK"]
    assert resp["entry"][0]["resource"]["id"] == obs["id"]
    assert resp["entry"][3]["resource"]["total"] == 2


def test_search_elements_returns_only_the_elements_asked_for(api: Api) -> None:
    staff = "system:lab"
    pid = api.new_patient()
    for value in (5.1, 5.2, 5.3):
        api.observation(pid, value=value)
    r = api.get(f"Observation?patient={pid}&_elements=code,value,status&_count=2", staff)
    assert r.status_code == 200, r.text
    found = entries(r.json())
    assert len(found) == 2
    for res in found:
        assert set(res) == {"resourceType", "id", "meta", "code", "valueQuantity", "status"}
        assert {"system": SUBSETTED["system"], "code": "SUBSETTED"} in res["meta"]["tag"]
        assert res["meta"]["versionId"] == "1"
    links = {link["relation"]: link["url"] for link in r.json()["link"]}
    assert "_elements=code%2Cvalue%2Cstatus" in links["next"]
    page2 = api.http.get(links["next"], headers=api.headers(staff)).json()
    assert [set(res) for res in entries(page2)] == [set(found[0])]
    whole = entries(api.get(f"Observation?patient={pid}", staff).json())
    assert "subject" in whole[0] and "tag" not in whole[0]["meta"]
    outcome(api.get(f"Observation?patient={pid}&_elements=value.code", staff), 400)


def test_head_answers_the_headers_of_the_get(api: Api) -> None:
    staff = "system:hospital"
    pid = api.new_patient()
    obs = api.observation(pid, "hospital")
    url = f"/fhir/Observation/{obs['id']}"
    got = api.http.get(url, headers=api.headers(staff))
    logged = len(api.audit(pid))
    head = api.http.head(url, headers=api.headers(staff))
    assert head.status_code == 200 and head.content == b""
    for name in ("etag", "last-modified", "content-type", "content-length"):
        assert head.headers[name] == got.headers[name], name
    assert len(api.audit(pid)) == logged + 1  # a HEAD of a record is a logged read
    missing = api.http.head("/fhir/Observation/no-such-id", headers=api.headers(staff))
    assert missing.status_code == 404 and missing.content == b""
    assert api.http.head("/fhir/metadata").status_code == 200
    assert api.http.head(url).status_code == 401  # no token


def test_prefer_return_shapes_what_a_write_answers(api: Api) -> None:
    staff = "system:hospital"
    pid = api.new_patient()
    r = api.post("Observation", lab_observation(pid), staff, headers={"Prefer": "return=minimal"})
    assert r.status_code == 201 and r.content == b""
    assert r.headers["etag"] == 'W/"1"' and "last-modified" in r.headers
    oid = r.headers["location"].split("/Observation/")[1].split("/")[0]
    stored = api.get(f"Observation/{oid}", staff).json()
    r = api.put(
        f"Observation/{oid}",
        stored,
        staff,
        headers={"Prefer": "handling=strict, return=OperationOutcome", "If-Match": 'W/"1"'},
    )
    assert r.status_code == 200 and r.headers["etag"] == 'W/"2"'
    issue = r.json()["issue"][0]
    assert r.json()["resourceType"] == "OperationOutcome" and issue["severity"] == "information"
    assert f"Observation/{oid} is at version 2" in issue["diagnostics"]
    r = api.put(f"Observation/{oid}", stored, staff, headers={"Prefer": "return=representation"})
    assert r.status_code == 200 and r.json()["resourceType"] == "Observation"
    assert r.json()["meta"]["versionId"] == "3"


def test_conditional_create_with_if_none_exist(api: Api, network_dir: Path) -> None:
    """``If-None-Exist``: no match creates, one match answers with it and writes nothing,
    several matches (or bad criteria) are refused and leave everything as it was."""
    staff = "system:hospital"
    mrn_system = "http://hospital.smarthealthit.org"
    tag = hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:10]

    def patient_with(mrn: str) -> dict[str, Any]:
        body = synthea_patient(2)
        body["identifier"] = [{"system": mrn_system, "value": mrn}]
        return body

    def found(mrn: str) -> list[str]:
        r = api.get(f"Patient?identifier={mrn_system}|{mrn}", staff)
        assert r.status_code == 200, r.text
        return [p["id"] for p in entries(r.json())]

    mrn = f"MRN-{tag}"
    only_if = {"If-None-Exist": f"identifier={mrn_system}|{mrn}"}
    r = api.post("Patient", patient_with(mrn), staff, headers=only_if)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    assert found(mrn) == [pid]

    # the same request again: that Patient (200) with its validators; nothing is written
    # but the match's search, logged like any search
    logged = len(api.audit(pid))
    store = records_digest(network_dir)
    again = api.post("Patient", patient_with(mrn), staff, headers=only_if)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == pid and again.json()["meta"]["versionId"] == "1"
    assert again.headers["etag"] == 'W/"1"' and "last-modified" in again.headers
    assert again.headers["location"].endswith(f"/Patient/{pid}/_history/1")
    assert len(api.audit(pid)) == logged + 1
    assert records_digest(network_dir) == store and found(mrn) == [pid]
    # a leading "?" is accepted, and a bare value finds it in any system
    bare = {"If-None-Exist": f"?identifier={mrn}"}
    assert api.post("Patient", patient_with(mrn), staff, headers=bare).status_code == 200

    # identical conditional creates sent at once: one creates, the others find it
    mrn2 = f"MRN-{tag}-2"
    headers = {
        **api.headers(staff),
        "Content-Type": FHIR_JSON,
        "If-None-Exist": f"identifier={mrn_system}|{mrn2}",
    }
    body = json.dumps(patient_with(mrn2)).encode()

    async def post_together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=api.server.base_url, timeout=60) as http:
            return list(
                await asyncio.gather(
                    *(http.post("/fhir/Patient", content=body, headers=headers) for _ in range(3))
                )
            )

    together = asyncio.run(post_together())
    assert sorted(r.status_code for r in together) == [200, 200, 201], [r.text for r in together]
    assert len({r.json()["id"] for r in together}) == 1 and len(found(mrn2)) == 1

    # two Patients with the MRN (one created unconditionally): 412, nothing written
    assert api.post("Patient", patient_with(mrn), staff).status_code == 201
    head, store = api.head(), records_digest(network_dir)
    doc = outcome(api.post("Patient", patient_with(mrn), staff, headers=only_if), 412)
    assert doc["issue"][0]["code"] == "multiple-matches"
    assert records_digest(network_dir) == store
    # refused criteria: 400, nothing written (not even a logged search)
    head = api.head()
    for criteria in ("", "identifier=", "_count=1", f"identifier={mrn}&_sort=-_lastUpdated"):
        r = api.post("Patient", patient_with(mrn), staff, headers={"If-None-Exist": criteria})
        outcome(r, 400)
    outcome(api.post("Patient", patient_with(mrn), staff, headers={"If-None-Exist": "x=1"}), 400)
    assert api.head() == head and records_digest(network_dir) == store

    # another type, by patient and code; in a batch entry too; not in a transaction
    loinc = {"If-None-Exist": f"patient={pid}&code=http://loinc.org|4548-4"}
    first = api.post("Observation", lab_observation(pid), staff, headers=loinc)
    assert first.status_code == 201, first.text
    second = api.post("Observation", lab_observation(pid), staff, headers=loinc)
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    request = {
        "method": "POST",
        "url": "Observation",
        "ifNoneExist": loinc["If-None-Exist"],
    }
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": lab_observation(pid), "request": request}],
    }
    r = api.post("", batch, staff)
    assert r.status_code == 200, r.text
    (entry,) = r.json()["entry"]
    assert entry["response"]["status"] == "200 OK"
    assert entry["response"]["location"].startswith(f"Observation/{first.json()['id']}/")
    # in a transaction: a Patient created only if its MRN is new, and an Observation
    # referring to it by fullUrl, which resolves to the Patient found when there is one
    mrn3 = f"MRN-{tag}-3"
    patient_url = "urn:uuid:7f9a51d4-1c1e-4f53-9d8e-0b6f2c3a4e51"
    reading = lab_observation("x")
    reading["subject"] = {"reference": patient_url}

    def transaction(mrn: str) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": patient_url,
                    "resource": patient_with(mrn),
                    "request": {
                        "method": "POST",
                        "url": "Patient",
                        "ifNoneExist": f"identifier={mrn_system}|{mrn}",
                    },
                },
                {"resource": reading, "request": {"method": "POST", "url": "Observation"}},
            ],
        }

    def outcome_of(r: httpx.Response) -> list[tuple[str, str]]:
        assert r.status_code == 200, r.text
        return [
            (e["response"]["status"], e["response"]["location"].split("/_history")[0])
            for e in r.json()["entry"]
        ]

    (made, obs1) = outcome_of(api.post("", transaction(mrn3), staff))
    assert made[0] == "201 Created" and obs1[0] == "201 Created"
    (kept, obs2) = outcome_of(api.post("", transaction(mrn3), staff))
    assert kept == ("200 OK", made[1]) and obs2[0] == "201 Created" and obs2[1] != obs1[1]
    linked = api.get(obs2[1], staff).json()
    assert linked["subject"]["reference"] == made[1]  # the Patient found, not a new one
    assert found(mrn3) == [made[1].split("/")[1]]
    # several matches: 412 naming the entry, and nothing of the Bundle is written
    store = records_digest(network_dir)
    doc = outcome(api.post("", transaction(mrn), staff), 412)
    assert doc["issue"][0]["expression"] == ["Bundle.entry[0].request.ifNoneExist"]
    assert records_digest(network_dir) == store
    # results the access decision withholds may match: 412, not a duplicate. The consent
    # lets the clinic see Observations dated before 2020 only: the 2019 one matches, and so
    # may the 2021 one it does not see
    other = api.new_patient()
    for when in ("2019-05-01T08:00:00Z", "2021-05-01T08:00:00Z"):
        api.observation(other, "hospital", when=when)
    limited = consent_resource(other, to_org="clinic", types=["Observation"])
    limited["provision"]["dataPeriod"] = {"end": "2020-01-01T00:00:00Z"}
    r = api.post("Consent", limited, f"patient:{other}", "patient/*.cruds")
    assert r.status_code == 201, r.text
    visible = api.get(f"Observation?patient={other}", "practitioner:dr-clinic")
    assert len(entries(visible.json())) == 1 and entries(visible.json(), "outcome")
    store = records_digest(network_dir)
    criteria = {"If-None-Exist": f"patient={other}&code=4548-4"}
    r = api.post("Observation", lab_observation(other), "practitioner:dr-clinic", headers=criteria)
    assert outcome(r, 412)["issue"][0]["code"] == "multiple-matches"
    assert "withheld" in r.json()["issue"][0]["diagnostics"]
    assert records_digest(network_dir) == store
    # a Consent cannot be created conditionally
    consent = consent_resource(pid, to_org="clinic")
    outcome(api.post("Consent", consent, staff, headers={"If-None-Exist": "_id=x"}), 400)


# -- integrity -----------------------------------------------------------------------------------


def test_tampered_ciphertext_or_commitment_is_refused(fresh: Any) -> None:
    server, api = fresh(practitioners=False)
    pid = api.new_patient()
    obs = api.observation(pid, "hospital")
    oid = obs["id"]
    assert api.get(f"Observation/{oid}", "system:hospital").status_code == 200
    db_path = server.settings.data_dir / "records.db"

    def flip(column: str, offset: int) -> None:
        db = sqlite3.connect(db_path)
        try:
            (blob,) = db.execute(
                f"SELECT {column} FROM rec_versions WHERE record = ?", (oid,)
            ).fetchone()
            changed = bytearray(blob)
            changed[offset] ^= 1
            db.execute(
                f"UPDATE rec_versions SET {column} = ? WHERE record = ?", (bytes(changed), oid)
            )
            db.commit()
        finally:
            db.close()

    flip("ciphertext", 20)  # one bit of the stored ciphertext
    doc = outcome(api.get(f"Observation/{oid}", "system:hospital"), 500)
    assert "integrity" in doc["issue"][0]["diagnostics"]
    flip("ciphertext", 20)  # restored
    assert api.get(f"Observation/{oid}", "system:hospital").status_code == 200
    flip("salt", 0)  # the salted commitment no longer matches the ledger
    doc = outcome(api.get(f"Observation/{oid}", "system:hospital"), 500)
    assert "integrity" in doc["issue"][0]["diagnostics"]


def test_tampered_ledger_commitment_is_refused(fresh: Any) -> None:
    server, api = fresh(practitioners=False)
    pid = api.new_patient()
    oid = api.observation(pid, "hospital")["id"]
    data_dir = server.settings.data_dir
    server.stop()
    # change the commitment of version 1 in the ledger's state (record/<id> and recver/<id>/1)
    from medledger.encoding import decode, encode

    db = sqlite3.connect(data_dir / "ledger.db")
    try:
        for key in (f"record/{oid}".encode(), f"recver/{oid}/{1:08d}".encode()):
            (raw,) = db.execute("SELECT v FROM state WHERE k = ?", (key,)).fetchone()
            value = decode(raw)
            value["commitment"] = bytes(32 * [7])
            db.execute("UPDATE state SET v = ? WHERE k = ?", (encode(value), key))
        db.commit()
    finally:
        db.close()
    restarted = LiveServer(data_dir).start()
    try:
        with httpx.Client(base_url=restarted.base_url, timeout=60) as http:
            again = Api(restarted, http)
            doc = outcome(again.get(f"Observation/{oid}", "system:hospital"), 500)
            assert "integrity" in doc["issue"][0]["diagnostics"]
    finally:
        restarted.stop()


# -- erasure -------------------------------------------------------------------------------------


def test_erasure_crypto_shreds_every_custodian_and_verify_still_passes(api: Api) -> None:
    from medledger.ledger.verify import verify_ledger

    pid = api.new_patient("hospital")
    obs = api.observation(pid, "lab")
    cond = api.post("Condition", condition(pid), "system:hospital").json()
    # only the patient or a custodian's system client may ask
    outcome(api.post(f"Patient/{pid}/$erase", {}, "practitioner:dr-house"), 403)
    outcome(api.post(f"Patient/{pid}/$erase", {}, "system:clinic"), 403)
    r = api.post(f"Patient/{pid}/$erase", {}, f"patient:{pid}", "patient/*.cruds")
    assert r.status_code == 200, r.text
    assert "3 record(s)" in r.json()["issue"][0]["diagnostics"]
    for path in (f"Observation/{obs['id']}", f"Condition/{cond['id']}", f"Patient/{pid}"):
        assert outcome(api.get(path, "system:hospital"), 410)["issue"][0]["code"] == "deleted"
    store = api.server.runtime.store
    for rid in (obs["id"], cond["id"], pid):
        version = api.server.call(store.get_version(rid))
        assert version is not None and version.ciphertext == b""
        assert api.server.call(store.get_wrapped(rid, 1, "org:hospital")) is None
        assert api.server.call(store.get_wrapped(rid, 1, f"patient:{pid}")) is None
    node = api.server.runtime.node
    report = api.server.call(node.storage(verify_ledger))
    assert report.ok, report.failure


# -- demo sign-in ----------------------------------------------------------------------------------


def test_demo_identities_sign_in_with_registered_clients(fresh: Any) -> None:
    _, api = fresh(demo=True)
    idents = {i["id"]: i for i in api.http.get("/api/demo/identities").json()}
    assert {"dr-house", "tech-lab", "system:hospital"} <= set(idents)
    assert idents["dr-house"]["org"] == "hospital" and idents["dr-house"]["roles"] == ["physician"]
    login = api.http.post("/api/demo/login", json={"identity": "system:hospital"}).json()
    headers = {"Authorization": f"Bearer {login['access_token']}", "Content-Type": FHIR_JSON}
    r = api.http.post("/fhir/Patient", content=json.dumps(synthea_patient()), headers=headers)
    assert r.status_code == 201, r.text
    doctor = api.http.post("/api/demo/login", json={"identity": "dr-house"}).json()
    r = api.http.get(
        f"/fhir/Patient/{r.json()['id']}",
        headers={"Authorization": f"Bearer {doctor['access_token']}"},
    )
    assert r.status_code == 200  # the hospital holds the record: its physician may treat
    # the demo clients' private keys were thrown away: no assertion can ever be made for them
    assert all("client_id" not in i for i in idents.values())


# -- fhirclient ----------------------------------------------------------------------------------


def test_fhirclient_reads_with_backend_services(api: Api, live: LiveServer) -> None:
    """The SMART Python client, unchanged: discovers the token endpoint, posts our assertion."""
    from fhirclient import client as fc
    from fhirclient.models.observation import Observation
    from fhirclient.models.patient import Patient

    pid = api.new_patient("hospital", synthea_patient(2))
    obs = api.observation(pid, "hospital")
    smart = api.client("system:hospital", "system/*.rs")
    settings = {
        "app_id": smart.client_id,
        "api_base": live.fhir,
        "jwt_token": smart.assertion(),
        "scope": "system/*.rs",
    }
    client = fc.FHIRClient(settings=settings, save_func=lambda state: None)
    client.prepare()
    client.authorize()  # client_credentials + private_key_jwt, as fhirclient implements it
    assert client.ready
    patient = Patient.read(pid, client.server)
    assert patient.id == pid
    assert patient.name[0].family == synthea_patient(2)["name"][0]["family"]
    found = list(Observation.where(struct={"patient": pid}).perform_resources_iter(client.server))
    assert [o.id for o in found] == [obs["id"]]
    assert found[0].code.coding[0].code == "4548-4"
