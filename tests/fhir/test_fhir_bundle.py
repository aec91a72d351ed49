"""Transaction/batch planning on real Synthea bundles, and response bundles."""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from fhirdata import BUNDLE_FILES, load_bundle, resources_of, stevie

from medledger.fhir.bundle import (
    Entry,
    EntryResult,
    SearchEntry,
    batch_response,
    history_bundle,
    parse_request_url,
    plan_transaction,
    processing_order,
    rewrite_references,
    searchset,
    transaction_response,
)
from medledger.fhir.index import extract, iter_references
from medledger.fhir.outcome import FhirError
from medledger.fhir.validate import parse_resource


def _fails(bundle: Any) -> FhirError:
    with pytest.raises(FhirError) as info:
        plan_transaction(bundle)
    return info.value


@pytest.mark.parametrize("path", BUNDLE_FILES, ids=[p.stem for p in BUNDLE_FILES])
def test_plan_real_synthea_bundles(path: Any) -> None:
    bundle = load_bundle(path)
    original = copy.deepcopy(bundle)
    entries = plan_transaction(bundle)
    assert bundle == original  # pure: the input is not modified
    assert [e.index for e in entries] == list(range(len(bundle["entry"])))
    ids = {e.full_url: e.reference for e in entries}
    assert all(e.interaction == "create" and e.method == "POST" for e in entries)
    assert len(set(ids.values())) == len(entries)
    for e, raw in zip(entries, bundle["entry"], strict=True):
        assert e.resource is not None and e.id is not None
        uuid.UUID(e.id)
        assert e.resource["id"] == e.id
        assert e.resource_type == raw["resource"]["resourceType"]
        parse_resource(e.resource, e.resource_type)  # still valid after rewriting
        # every urn:uuid reference now points at the planned Type/id of its entry
        before = list(iter_references(raw["resource"]))
        after = list(iter_references(e.resource))
        assert len(before) == len(after)
        for old, new in zip(before, after, strict=True):
            if old.startswith("urn:uuid:"):
                assert new == ids[old]
            else:
                assert new == old  # "#referral", "#coverage": contained references
        assert not any(r.startswith("urn:uuid:") for r in after)


def test_deterministic_ids_for_idempotent_import() -> None:
    def new_id(rtype: str, full_url: str | None, resource: dict[str, Any]) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"org-a|{full_url}"))

    a = plan_transaction(stevie(), new_id=new_id)
    b = plan_transaction(stevie(), new_id=new_id)
    assert [e.resource for e in a] == [e.resource for e in b]
    patient = next(e for e in a if e.resource_type == "Patient")
    obs = next(e for e in a if e.resource_type == "Observation")
    assert obs.resource is not None
    assert obs.resource["subject"]["reference"] == f"Patient/{patient.id}"
    assert extract(obs.resource).patient == patient.id


def tx(*entries: dict[str, Any], btype: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": btype, "entry": list(entries)}


def post(resource: dict[str, Any], full_url: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"]},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def test_mixed_interactions_and_processing_order() -> None:
    pat = resources_of("Patient")[0]
    obs = resources_of("Observation", literal=True)[0]
    cond = resources_of("Condition")[0]
    cond["subject"] = {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"}
    entries = plan_transaction(
        tx(
            {"request": {"method": "GET", "url": "Observation?code=4548-4&_count=5"}},
            {"request": {"method": "GET", "url": "Observation/o1/_history/2"}},
            {"request": {"method": "GET", "url": "Patient/p1/$everything"}},
            {"request": {"method": "GET", "url": "Condition/c1/_history"}},
            {"request": {"method": "GET", "url": "Condition/_history"}},
            {"request": {"method": "GET", "url": "https://other.example/fhir/Patient/p1"}},
            {
                "request": {"method": "PUT", "url": f"Observation/{obs['id']}", "ifMatch": 'W/"1"'},
                "resource": obs,
            },
            post(pat, "urn:uuid:11111111-1111-1111-1111-111111111111"),
            post(cond),
            {"request": {"method": "DELETE", "url": "Condition/c9"}},
        )
    )
    kinds = [(e.method, e.interaction) for e in entries]
    assert kinds == [
        ("GET", "search-type"),
        ("GET", "vread"),
        ("GET", "operation"),
        ("GET", "history-instance"),
        ("GET", "history-type"),
        ("GET", "read"),
        ("PUT", "update"),
        ("POST", "create"),
        ("POST", "create"),
        ("DELETE", "delete"),
    ]
    assert entries[0].query == [("code", "4548-4"), ("_count", "5")]
    assert (entries[1].id, entries[1].version) == ("o1", 2)
    assert (entries[2].id, entries[2].operation) == ("p1", "$everything")
    assert entries[5].id == "p1"
    assert entries[6].if_match == 'W/"1"' and entries[6].id == obs["id"]
    patient_id = entries[7].id
    assert entries[8].resource is not None
    assert entries[8].resource["subject"]["reference"] == f"Patient/{patient_id}"
    order = [e.index for e in processing_order(entries)]
    assert order == [9, 7, 8, 6, 0, 1, 2, 3, 4, 5]


def test_unresolved_urn_uuid_fails_the_transaction() -> None:
    cond = resources_of("Condition")[0]
    cond["subject"] = {"reference": "urn:uuid:22222222-2222-2222-2222-222222222222"}
    err = _fails(tx(post(cond)))
    assert err.status == 400
    assert err.expression == ["Bundle.entry[0].resource"]


def test_an_invalid_resource_fails_the_transaction_naming_the_entry() -> None:
    bundle = stevie()
    del bundle["entry"][5]["resource"]["status"]
    rtype = bundle["entry"][5]["resource"]["resourceType"]
    err = _fails(bundle)
    assert (err.status, err.code) == (422, "required")
    assert err.expression == ["Bundle.entry[5].resource.status"], rtype


def test_wrong_type_for_the_url_is_400() -> None:
    obs = resources_of("Observation")[0]
    err = _fails(tx({"resource": obs, "request": {"method": "POST", "url": "Condition"}}))
    assert err.status == 400
    assert err.expression == ["Bundle.entry[0].resource.resourceType"]


@pytest.mark.parametrize(
    ("entry", "status"),
    [
        ({"request": {"method": "PATCH", "url": "Patient/1"}}, 400),
        ({"request": {"method": "FETCH", "url": "Patient/1"}}, 400),
        ({"request": {"method": "GET", "url": "Nonsense/1"}}, 400),
        ({"request": {"method": "GET"}}, 400),
        ({"request": {"method": "DELETE", "url": "Patient?name=x"}}, 400),
        ({"request": {"method": "GET", "url": "Patient/1/foo/bar"}}, 400),
        ({"resource": {"resourceType": "Patient"}}, 400),
        ({"request": {"method": "GET", "url": "Patient/1", "colour": "red"}}, 400),
    ],
)
def test_bad_entries(entry: dict[str, Any], status: int) -> None:
    err = _fails(tx(entry))
    assert err.status == status
    assert err.expression and err.expression[0].startswith("Bundle.entry[0]")


def test_put_needs_matching_id() -> None:
    obs = resources_of("Observation", literal=True)[0]
    err = _fails(tx({"resource": obs, "request": {"method": "PUT", "url": "Observation/other"}}))
    assert (err.status, err.expression) == (400, ["Bundle.entry[0].resource.id"])
    err = _fails(tx({"resource": obs, "request": {"method": "PUT", "url": "Observation?code=x"}}))
    assert err.code == "not-supported"


def test_duplicates_are_refused() -> None:
    pat = resources_of("Patient")[0]
    url = "urn:uuid:33333333-3333-3333-3333-333333333333"
    assert _fails(tx(post(pat, url), post(copy.deepcopy(pat), url))).code == "duplicate"
    d = {"request": {"method": "DELETE", "url": "Patient/x"}}
    assert _fails(tx(d, copy.deepcopy(d))).code == "duplicate"


def test_bundle_level_checks() -> None:
    assert _fails({"resourceType": "Patient"}).status == 400
    assert _fails({"resourceType": "Bundle", "type": "collection"}).expression == ["Bundle.type"]
    assert _fails(b"{nope").status == 400
    assert _fails({"resourceType": "Bundle", "type": "batch", "total": "x"}).status == 400
    assert plan_transaction({"resourceType": "Bundle", "type": "transaction"}) == []


def test_batch_entries_fail_alone_and_keep_references() -> None:
    good = resources_of("Observation", literal=True)[0]
    bad = resources_of("Observation", literal=True)[1]
    bad["status"] = "nope"
    cond = resources_of("Condition")[0]
    cond["subject"] = {"reference": "urn:uuid:44444444-4444-4444-4444-444444444444"}
    entries = plan_transaction(
        tx(
            post(good),
            post(bad),
            {"request": {"method": "PATCH", "url": "Patient/1"}},
            post(cond),
            btype="batch",
        )
    )
    assert [e.error is None for e in entries] == [True, False, False, True]
    assert entries[1].error is not None and entries[1].error.status == 422
    assert entries[1].error.expression == ["Bundle.entry[1].resource.status"]
    assert entries[3].resource is not None
    assert entries[3].resource["subject"]["reference"].startswith("urn:uuid:")


def test_rewrite_references_everywhere() -> None:
    claim = next(c for c in resources_of("ExplanationOfBenefit") if "contained" in c)
    refs = list(iter_references(claim))
    mapping = {r: f"Mapped/{i}" for i, r in enumerate(refs) if r.startswith("urn:uuid:")}
    unresolved: list[str] = []
    out = rewrite_references(claim, mapping, unresolved=unresolved)
    assert unresolved == []
    assert all(not r.startswith("urn:uuid:") for r in iter_references(out))
    assert any(r.startswith("#") for r in iter_references(out))  # contained kept
    assert list(iter_references(claim)) == refs  # input untouched
    out = rewrite_references(claim, {}, unresolved=unresolved)
    assert sorted(set(unresolved)) == sorted(set(mapping))
    # any literal reference can be mapped (importer: source id -> ledger id)
    cond = resources_of("Condition")[0]
    new = rewrite_references(cond, {cond["subject"]["reference"]: "Patient/pat-1"})
    assert extract(new).patient == "pat-1"


def test_parse_request_url() -> None:
    assert parse_request_url("Observation/1/_history/2?x=y") == (
        "Observation",
        "1",
        "_history/2",
        [("x", "y")],
    )
    assert parse_request_url("/fhir/Patient")[0:2] == ("Patient", None)
    with pytest.raises(FhirError):
        parse_request_url("https://h/fhir/nothing")


# ----------------------------------------------------------------------------- responses


def test_transaction_response_validates_and_has_locations() -> None:
    entries = plan_transaction(stevie())
    results = [
        EntryResult(201, e.resource_type, e.id, 1, 1717000000000 + i) for i, e in enumerate(entries)
    ]
    bundle = transaction_response(results, base_url="https://h/fhir", timestamp=1717000000000)
    parse_resource(bundle, "Bundle")
    assert bundle["type"] == "transaction-response"
    first = bundle["entry"][0]
    e0 = entries[0]
    assert first["response"]["status"] == "201 Created"
    assert first["response"]["location"] == f"{e0.resource_type}/{e0.id}/_history/1"
    assert first["response"]["etag"] == 'W/"1"'
    assert first["response"]["lastModified"] == "2024-05-29T16:26:40.000Z"
    assert first["fullUrl"] == f"https://h/fhir/{e0.resource_type}/{e0.id}"


def test_batch_response_with_errors_validates() -> None:
    err = FhirError(422, "required", "status is required", ["Observation.status"])
    obs = resources_of("Observation")[0]
    results = [
        EntryResult(200, "Observation", obs["id"], 3, 1717000000000, resource=obs),
        EntryResult.from_error(err),
        EntryResult(204),
    ]
    bundle = batch_response(results, base_url="https://h/fhir")
    parse_resource(bundle, "Bundle")
    statuses = [e["response"]["status"] for e in bundle["entry"]]
    assert statuses == ["200 OK", "422 Unprocessable Entity", "204 No Content"]
    outcome = bundle["entry"][1]["response"]["outcome"]
    assert outcome["issue"][0]["expression"] == ["Observation.status"]
    assert "fullUrl" not in bundle["entry"][1]


def test_searchset_validates() -> None:
    found = resources_of("Observation")[:3]
    links = {
        "self": "https://h/fhir/Observation?_count=3&_offset=0",
        "next": "https://h/fhir/Observation?_count=3&_offset=3",
    }
    warning = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "warning", "code": "suppressed", "diagnostics": "Condition withheld"}
        ],
    }
    bundle = searchset(
        [*found[:2], SearchEntry(found[2], "include")],
        10,
        links,
        base_url="https://h/fhir",
        outcome=warning,
    )
    parse_resource(bundle, "Bundle")
    assert bundle["total"] == 10
    assert bundle["link"][1] == {"relation": "next", "url": links["next"]}
    assert [e["search"]["mode"] for e in bundle["entry"]] == [
        "match",
        "match",
        "include",
        "outcome",
    ]
    assert bundle["entry"][0]["fullUrl"] == f"https://h/fhir/Observation/{found[0]['id']}"
    empty = searchset([], 0, {"self": "https://h/fhir/Observation"})
    parse_resource(empty, "Bundle")
    assert "entry" not in empty


@dataclass(frozen=True)
class Version:
    id: str
    resource_type: str
    version: int
    last_updated: int
    resource: dict[str, Any] | None


def test_history_bundle_validates() -> None:
    obs = resources_of("Observation")[0]
    v2 = dict(obs, status="amended")
    versions = [
        Version(obs["id"], "Observation", 3, 3000, None),
        Version(obs["id"], "Observation", 2, 2000, v2),
        Version(obs["id"], "Observation", 1, 1000, obs),
    ]
    bundle = history_bundle(versions, base_url="https://h/fhir")
    parse_resource(bundle, "Bundle")
    assert bundle["type"] == "history" and bundle["total"] == 3
    methods = [(e["request"]["method"], e["response"]["status"]) for e in bundle["entry"]]
    assert methods == [("DELETE", "204 No Content"), ("PUT", "200 OK"), ("POST", "201 Created")]
    assert "resource" not in bundle["entry"][0]
    assert bundle["entry"][1]["response"]["etag"] == 'W/"2"'
    assert bundle["entry"][2]["request"]["url"] == "Observation"


def test_entry_reference_property() -> None:
    e = Entry(
        index=0, method="GET", url="Patient", interaction="search-type", resource_type="Patient"
    )
    assert e.reference is None
