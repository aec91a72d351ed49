"""extract() on real data, FHIR dates, and parse_search."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from fhirdata import ALL_RESOURCES, resources_of, stevie

from medledger.contracts.records_v1 import PUBLIC_CATEGORIES
from medledger.fhir.bundle import plan_transaction
from medledger.fhir.dates import format_date, format_instant, parse_range, to_ms
from medledger.fhir.index import (
    DEFAULT_COUNT,
    MAX_COUNT,
    SEARCH_PARAMS,
    extract,
    parse_search,
    reference_id,
    search_links,
)
from medledger.fhir.outcome import FhirError
from medledger.fhir.validate import SUPPORTED_TYPES, parse_resource

LOINC = "http://loinc.org"


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


# ----------------------------------------------------------------------------- dates


@pytest.mark.parametrize(
    ("value", "start", "end", "precision"),
    [
        ("2020", ms(2020, 1, 1), ms(2021, 1, 1), "year"),
        ("2020-02", ms(2020, 2, 1), ms(2020, 3, 1), "month"),
        ("2020-12", ms(2020, 12, 1), ms(2021, 1, 1), "month"),
        ("2020-02-29", ms(2020, 2, 29), ms(2020, 3, 1), "day"),
        ("2020-05-01T10:00:00Z", ms(2020, 5, 1, 10), ms(2020, 5, 1, 10) + 1000, "second"),
        ("2020-05-01T10:00:00+02:00", ms(2020, 5, 1, 8), ms(2020, 5, 1, 8) + 1000, "second"),
        (
            "1989-10-04T02:25:16-04:00",
            ms(1989, 10, 4, 6, 25, 16),
            ms(1989, 10, 4, 6, 25, 17),
            "second",
        ),
        ("2020-05-01T10:00:00.123Z", ms(2020, 5, 1, 10) + 123, ms(2020, 5, 1, 10) + 124, "ms"),
        ("2020-05-01T10:00:00.5Z", ms(2020, 5, 1, 10) + 500, ms(2020, 5, 1, 10) + 600, "ms"),
        ("1920-04-23", ms(1920, 4, 23), ms(1920, 4, 24), "day"),
    ],
)
def test_parse_range(value: str, start: int, end: int, precision: str) -> None:
    rng = parse_range(value)
    assert (rng.start, rng.end, rng.precision) == (start, end, precision)
    assert to_ms(value) == start


@pytest.mark.parametrize(
    "value",
    ["2020-13", "2021-02-29", "2020-05-01T10:00:00", "2020-05-01T25:00:00Z", "20200501", "", "x"],
)
def test_parse_range_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_range(value)


def test_lenient_search_times() -> None:
    assert parse_range("2020-05-01T10:00", lenient_time=True).start == ms(2020, 5, 1, 10)
    assert parse_range("2020-05-01T10:00:00", lenient_time=True).start == ms(2020, 5, 1, 10)


def test_format_instant_round_trips() -> None:
    for value in (0, 1717000000123, -1000000000001, ms(1920, 4, 23)):
        assert to_ms(format_instant(value)) == value
    assert format_instant(1717000000123) == "2024-05-29T16:26:40.123Z"
    assert format_date(ms(1920, 4, 23, 5)) == "1920-04-23"


# ----------------------------------------------------------------------------- extract


@pytest.mark.parametrize(("label", "resource"), ALL_RESOURCES, ids=[x[0] for x in ALL_RESOURCES])
def test_extract_works_on_every_real_resource(label: str, resource: dict[str, Any]) -> None:
    ex = extract(resource)
    assert ex.resource_type == resource["resourceType"]
    assert ex.id == resource.get("id")
    if ex.public_category is not None:
        assert ex.public_category in PUBLIC_CATEGORIES
    for system, code in ex.codes + ex.categories:
        assert code and (system is None or system)
    # NDJSON resources use literal Patient/<id> references
    if label.endswith(".ndjson") or ".ndjson:" in label:
        ref = resource.get("subject") or resource.get("patient")
        if isinstance(ref, dict) and str(ref.get("reference", "")).startswith("Patient/"):
            assert ex.patient == ref["reference"].split("/")[1]


def test_every_resource_of_a_planned_bundle_has_its_patient() -> None:
    entries = plan_transaction(stevie())
    patient_id = next(e.id for e in entries if e.resource_type == "Patient")
    for e in entries:
        assert e.resource is not None
        ex = extract(e.resource)
        if e.resource_type in ("Organization", "Practitioner"):
            assert ex.patient is None
        else:
            assert ex.patient == patient_id, e.resource_type
        assert not [r for r in ex.references if r.startswith("urn:uuid:")]


def test_observation_lab_result() -> None:
    obs = next(r for r in resources_of("Observation") if r["code"]["coding"][0]["code"] == "4548-4")
    ex = extract(obs)
    assert (LOINC, "4548-4") in ex.codes
    assert ex.categories == [
        ("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")
    ]
    assert ex.public_category == "laboratory"
    assert ex.date == to_ms(obs["effectiveDateTime"])
    assert f"{LOINC}|4548-4" in ex.code_strings()
    terms = ex.terms()
    assert ("code", LOINC, "4548-4") in terms and ("code", None, "4548-4") in terms


def test_synthea_vital_sign_quirk_is_not_public() -> None:
    quirky = [
        r
        for r in resources_of("Observation")
        if any(
            c.get("code") == "vital-sign" for cat in r.get("category", []) for c in cat["coding"]
        )
    ]
    assert quirky, "the Beatrice bundle carries the 'vital-sign' category"
    for obs in quirky:
        assert extract(obs).public_category is None


def test_diagnostic_report_lab_section_is_public_laboratory() -> None:
    for dr in resources_of("DiagnosticReport"):
        ex = extract(dr)
        assert ex.public_category == "laboratory"
        assert ex.codes and ex.codes[0][0] == LOINC
        assert ex.date is not None
        assert len(ex.references) >= 2  # subject, encounter, results


def test_dates_per_type() -> None:
    pat = resources_of("Patient")[0]
    assert extract(pat).date == to_ms(pat["birthDate"])
    assert extract(pat).patient == pat["id"]
    enc = resources_of("Encounter")[0]
    assert extract(enc).date == to_ms(enc["period"]["start"])
    proc = next(r for r in resources_of("Procedure") if "performedPeriod" in r)
    assert extract(proc).date == to_ms(proc["performedPeriod"]["start"])
    mr = resources_of("MedicationRequest")[0]
    assert extract(mr).date == to_ms(mr["authoredOn"])
    cond = resources_of("Condition")[0]
    assert extract(cond).date == to_ms(cond["onsetDateTime"])
    imm = resources_of("Immunization")[0]
    assert extract(imm).date == to_ms(imm["occurrenceDateTime"])
    allergy = resources_of("AllergyIntolerance")[0]
    assert extract(allergy).date == to_ms(allergy["recordedDate"])
    doc = resources_of("DocumentReference")[0]
    assert extract(doc).date == to_ms(doc["date"])
    claim = resources_of("Claim")[0]
    assert extract(claim).date == to_ms(claim["billablePeriod"]["start"])
    eob = resources_of("ExplanationOfBenefit")[0]
    assert extract(eob).date == to_ms(eob["billablePeriod"]["start"])


def test_partial_dates_count_from_their_start() -> None:
    obs = copy.deepcopy(resources_of("Observation")[0])
    obs["effectiveDateTime"] = "2019-07"
    parse_resource(obs)
    assert extract(obs).date == ms(2019, 7, 1)
    obs["effectiveDateTime"] = "2019"
    assert extract(obs).date == ms(2019, 1, 1)
    del obs["effectiveDateTime"]
    obs["effectivePeriod"] = {"start": "2018-03-04"}
    assert extract(obs).date == ms(2018, 3, 4)


def test_codes_per_type() -> None:
    imm = resources_of("Immunization")[0]
    assert extract(imm).codes[0][0] == "http://hl7.org/fhir/sid/cvx"
    mr = resources_of("MedicationRequest")[0]
    assert extract(mr).codes[0][0] == "http://www.nlm.nih.gov/research/umls/rxnorm"
    enc = resources_of("Encounter")[0]
    ex = extract(enc)
    assert ex.codes[0][0] == "http://snomed.info/sct"
    assert ex.categories[0] == ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB")
    allergy = resources_of("AllergyIntolerance")[0]
    assert extract(allergy).categories == [
        ("http://hl7.org/fhir/allergy-intolerance-category", allergy["category"][0])
    ]
    claim = resources_of("Claim")[0]
    assert extract(claim).codes[0][1] in ("professional", "institutional", "pharmacy")


def test_types_outside_the_supported_set() -> None:
    prov = {
        "resourceType": "Provenance",
        "id": "prov-1",
        "target": [{"reference": "Observation/o1"}, {"reference": "Patient/p-1"}],
        "recorded": "2021-03-31T12:00:00+00:00",
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE",
                }
            ]
        },
        "agent": [{"who": {"reference": "Organization/org-1"}}],
    }
    parse_resource(prov)
    ex = extract(prov)
    assert ex.patient == "p-1"
    assert ex.date == to_ms("2021-03-31T12:00:00+00:00")
    assert ex.codes == [("http://terminology.hl7.org/CodeSystem/v3-DataOperation", "CREATE")]
    assert ex.references == ["Observation/o1", "Patient/p-1", "Organization/org-1"]
    for org in resources_of("Organization"):
        ex = extract(org)
        assert (ex.patient, ex.date) == (None, None)
    for device in resources_of("Device"):
        assert extract(device).patient is not None


def test_conditional_references_are_listed_but_give_no_patient() -> None:
    doc = resources_of("DocumentReference")[0]
    refs = extract(doc).references
    assert any(r.startswith("Practitioner?identifier=") for r in refs)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("Patient/abc", "abc"),
        ("Patient/abc/_history/3", "abc"),
        ("https://h.example/fhir/Patient/abc", "abc"),
        ({"reference": "Patient/pat-01"}, "pat-01"),
        ("Group/abc", None),
        ("urn:uuid:8c2e", None),
        ("#contained", None),
        ("Patient?identifier=x|1", None),
        ("Patient/bad id", None),
        (None, None),
    ],
)
def test_reference_id(ref: Any, expected: str | None) -> None:
    assert reference_id(ref) == expected


# ----------------------------------------------------------------------------- parse_search


def test_search_the_issue_examples() -> None:
    q = parse_search(
        "Observation",
        [
            ("date", "ge2020-01"),
            ("_lastUpdated", "lt2024-05-01T10:00:00Z"),
            ("code", "http://loinc.org|4548-4"),
            ("category", "laboratory"),
            ("patient", "Patient/pat-0123"),
            ("_count", "10"),
            ("_offset", "20"),
        ],
    )
    assert q.date_ge == ms(2020, 1, 1) and q.date_lt is None
    assert q.updated_lt == ms(2024, 5, 1, 10) and q.updated_ge is None
    assert q.codes == ((LOINC, "4548-4"),)
    assert q.categories == ((None, "laboratory"),)
    assert q.patient == "pat-0123"
    assert (q.count, q.offset) == (10, 20)
    assert q.code_terms() == [("code", LOINC, "4548-4")]
    assert q.category_terms() == [("category", None, "laboratory")]


def test_search_code_forms_match_index_terms() -> None:
    obs = next(r for r in resources_of("Observation") if r["code"]["coding"][0]["code"] == "4548-4")
    terms = set(extract(obs).terms())
    for value in ("4548-4", "http://loinc.org|4548-4", "9999-9,4548-4"):
        q = parse_search("Observation", [("code", value)])
        assert terms & set(q.code_terms()), value
    q = parse_search("Observation", [("code", "http://snomed.info/sct|4548-4")])
    assert not terms & set(q.code_terms())
    q = parse_search("Observation", [("code", "|4548-4")])  # explicitly no system
    assert q.codes == (("", "4548-4"),)
    assert not terms & set(q.code_terms())


def test_search_patient_forms() -> None:
    for value in ("pat-1", "Patient/pat-1", "https://x/fhir/Patient/pat-1"):
        assert parse_search("Condition", [("patient", value)]).patient == "pat-1"
    assert parse_search("Condition", [("subject", "Patient/pat-1")]).patient == "pat-1"
    assert parse_search("Condition", [("subject:Patient", "pat-1")]).patient == "pat-1"
    for bad in ("Group/1", "a b", "pat-1,pat-2"):
        with pytest.raises(FhirError) as info:
            parse_search("Condition", [("patient", bad)])
        assert info.value.status == 400


@pytest.mark.parametrize(
    ("value", "ge", "lt"),
    [
        ("2020-01", ms(2020, 1, 1), ms(2020, 2, 1)),
        ("eq2020-01-15", ms(2020, 1, 15), ms(2020, 1, 16)),
        ("ge2020-01", ms(2020, 1, 1), None),
        ("gt2020-01", ms(2020, 2, 1), None),
        ("sa2020", ms(2021, 1, 1), None),
        ("lt2020-01", None, ms(2020, 1, 1)),
        ("eb2020-01", None, ms(2020, 1, 1)),
        ("le2020-01", None, ms(2020, 2, 1)),
        ("ge2020-01-01T10:00:00+01:00", ms(2020, 1, 1, 9), None),
    ],
)
def test_search_date_prefixes(value: str, ge: int | None, lt: int | None) -> None:
    q = parse_search("Observation", [("date", value)])
    assert (q.date_ge, q.date_lt) == (ge, lt)


def test_repeated_dates_intersect() -> None:
    q = parse_search(
        "Encounter", [("date", "ge2019"), ("date", "lt2020-06"), ("date", "ge2019-03")]
    )
    assert (q.date_ge, q.date_lt) == (ms(2019, 3, 1), ms(2020, 6, 1))
    assert not q.impossible
    q = parse_search("Encounter", [("date", "ge2021"), ("date", "lt2020")])
    assert q.impossible


@pytest.mark.parametrize(
    "pair",
    [
        ("date", "ne2020"),
        ("date", "ap2020"),
        ("date", "2020-13"),
        ("date", "ge2020,le2021"),
        ("_count", "-1"),
        ("_count", "ten"),
        ("_offset", "x"),
        ("code", "a|b|c"),
        ("code", "http://loinc.org|"),
        ("_id", "bad id"),
        ("_total", "lots"),
    ],
)
def test_search_bad_values_are_400(pair: tuple[str, str]) -> None:
    with pytest.raises(FhirError) as info:
        parse_search("Observation", [pair])
    assert info.value.status == 400
    with pytest.raises(FhirError):  # bad values fail even when lenient
        parse_search("Observation", [pair], lenient=True)


def test_unknown_parameters_400_unless_lenient() -> None:
    for pair in (
        ("name", "Smith"),
        ("code:text", "glucose"),
        ("_include", "Observation:encounter"),
        ("_sort", "code"),
        ("_sort", "date,-_lastUpdated"),
    ):
        with pytest.raises(FhirError) as info:
            parse_search("Observation", [pair])
        assert (info.value.status, info.value.code) == (400, "not-supported")
        q = parse_search("Observation", [pair, ("code", "4548-4")], lenient=True)
        assert q.ignored == (pair[0],)
        assert q.codes == ((None, "4548-4"),)
        assert pair not in q.params


def test_repeated_token_parameters_are_refused() -> None:
    with pytest.raises(FhirError):
        parse_search("Observation", [("code", "a"), ("code", "b")])
    with pytest.raises(FhirError):
        parse_search("Observation", [("_count", "1"), ("_count", "2")])


def test_count_defaults_and_caps() -> None:
    assert parse_search("Observation", []).count == DEFAULT_COUNT
    assert parse_search("Observation", [("_count", "100000")]).count == MAX_COUNT
    assert parse_search("Observation", [("_count", "0")]).count == 0


def test_ids_and_result_parameters() -> None:
    q = parse_search(
        "Patient",
        [("_id", "a,b,a"), ("_sort", "-_lastUpdated"), ("_format", "json"), ("_total", "accurate")],
    )
    assert q.ids == ("a", "b")
    assert q.params == (("_id", "a,b,a"),)
    q = parse_search("Patient", [("birthdate", "1920")])
    assert (q.date_ge, q.date_lt) == (ms(1920, 1, 1), ms(1921, 1, 1))
    with pytest.raises(FhirError):
        parse_search("Patient", [("code", "x")])


def test_sort_by_last_updated_or_the_clinical_date() -> None:
    assert (parse_search("Observation", []).sort, parse_search("Observation", []).order) == (
        "",
        "-updated",
    )
    cases = {
        ("Observation", "-date"): "-date",
        ("Observation", "date"): "date",
        ("Observation", "_lastUpdated"): "updated",
        ("Observation", "-_lastUpdated"): "-updated",
        ("Patient", "-birthdate"): "-date",
        ("MedicationRequest", "authoredon"): "date",
        ("MedicationRequest", "-date"): "-date",
        ("Condition", "onset-date"): "date",
    }
    for (rtype, value), order in cases.items():
        q = parse_search(rtype, [("_sort", value), ("_count", "5")])
        assert (q.sort, q.order) == (value, order)
        # paging links keep the order
        assert ("_sort", value) in q.link_params(offset=5)
    for rtype, value in (("Patient", "date"), ("Observation", "birthdate"), (None, "date")):
        with pytest.raises(FhirError) as info:
            parse_search(rtype, [("_sort", value)])
        assert info.value.code == "not-supported"
    assert parse_search(None, [("_sort", "-_lastUpdated")]).order == "-updated"
    with pytest.raises(FhirError):
        parse_search("Observation", [("_sort", "date"), ("_sort", "-date")])


def test_summary_values_and_what_each_keeps() -> None:
    from medledger.fhir.validate import summary_elements

    assert parse_search("Observation", [("_summary", "count"), ("_count", "20")]).count == 0
    q = parse_search("Observation", [("_summary", "true")])
    assert q.summary == "true" and ("_summary", "true") in q.link_params()
    assert parse_search("Observation", [("_summary", "false")]).summary == ""
    for bad in ("yes", "TRUE", "count,true"):
        with pytest.raises(FhirError) as info:
            parse_search("Observation", [("_summary", bad)], lenient=True)
        assert info.value.status == 400
    with pytest.raises(FhirError):
        parse_search("Observation", [("_summary", "data"), ("_elements", "code")])
    summary, required = summary_elements("Patient")
    assert {"name", "birthDate", "gender", "identifier", "active"} <= summary
    assert not {"text", "contact", "communication", "photo"} & summary and required == set()
    summary, required = summary_elements("Observation")
    assert {"valueQuantity", "valueString", "effectiveDateTime", "code"} <= summary
    assert required == {"status", "code"} and "category" not in summary
    # a required choice counts by each of its names
    assert {"medicationCodeableConcept", "medicationReference"} <= summary_elements(
        "MedicationRequest"
    )[1]
    patient = {"resourceType": "Patient", "id": "p", "text": {"div": "x"}, "gender": "female"}
    patient["photo"] = [{"contentType": "image/png"}]
    patient["_gender"] = {"extension": [{"url": "urn:x", "valueString": "y"}]}
    out = parse_search("Patient", [("_summary", "true")]).subset(patient)
    assert set(out) == {"resourceType", "id", "gender", "_gender", "meta"}
    assert "_gender" in parse_search("Patient", [("_elements", "gender")]).subset(patient)
    out = parse_search("Patient", [("_summary", "text")]).subset(patient)
    assert set(out) == {"resourceType", "id", "text", "meta"}
    assert "text" not in parse_search("Patient", [("_summary", "data")]).subset(patient)
    assert parse_search("Patient", []).subset(patient) is patient


def test_include_the_patient_and_revinclude_on_patient_searches() -> None:
    q = parse_search(
        "Observation",
        [
            ("patient", "p1"),
            ("_include", "Observation:patient"),
            ("_include", "Observation:patient"),
        ],
    )
    assert q.include == ("Observation:patient",) and q.revinclude == ()
    assert ("_include", "Observation:patient") in q.link_params(offset=10)
    assert parse_search("Condition", [("_include", "Condition:subject:Patient")]).include
    q = parse_search(
        "Patient",
        [
            ("_id", "p1"),
            ("_revinclude", "Observation:patient"),
            ("_revinclude", "Condition:subject"),
        ],
    )
    assert q.included_types == ("Observation", "Condition")
    q = parse_search("Observation", [("_include", "Observation:subject")])
    assert q.included_types == ("Patient",)
    for rtype, name, value in (
        ("Observation", "_include", "Observation:encounter"),
        ("Observation", "_include", "Condition:patient"),
        ("Observation", "_include", "Observation:patient:Group"),
        ("Observation", "_include", "Observation"),
        ("Observation", "_revinclude", "Observation:patient"),
        ("Patient", "_include", "Patient:patient"),
        ("Patient", "_revinclude", "Patient:patient"),
        ("Patient", "_revinclude", "Nope:patient"),
        ("Patient", "_revinclude", "Consent:patient"),  # searched on their own
        ("Patient", "_revinclude", "AuditEvent:subject"),
        ("Consent", "_include", "Consent:patient"),
        ("Observation", "_include:iterate", "Observation:patient"),
    ):
        with pytest.raises(FhirError) as info:
            parse_search(rtype, [(name, value)])
        assert (info.value.status, info.value.code) == (400, "not-supported"), value
        assert parse_search(rtype, [(name, value)], lenient=True).ignored == (name,)


def test_empty_values_are_ignored() -> None:
    q = parse_search("Observation", [("code", ""), ("date", "")])
    assert q.codes == () and q.date_ge is None


def test_escaped_separators() -> None:
    q = parse_search("Observation", [("code", r"urn:x\|y|a\,b,c")])
    assert q.codes == (("urn:x|y", "a,b"), (None, "c"))


def test_type_specific_names() -> None:
    assert parse_search("Immunization", [("vaccine-code", "140")]).codes == ((None, "140"),)
    assert parse_search("Encounter", [("class", "AMB")]).categories == ((None, "AMB"),)
    assert parse_search("MedicationRequest", [("authoredon", "2020")]).date_ge == ms(2020, 1, 1)
    with pytest.raises(FhirError):
        parse_search("Nope", [])


def test_every_advertised_parameter_is_accepted() -> None:
    samples = {"token": "x", "reference": "Patient/p", "date": "ge2020"}
    for rtype in SUPPORTED_TYPES:
        for name, (kind, _target, _doc) in SEARCH_PARAMS[rtype].items():
            value = "a" if name == "_id" else samples[kind]
            parse_search(rtype, [(name, value)])


def test_search_links_page_through() -> None:
    q = parse_search("Observation", [("code", "4548-4"), ("_count", "10"), ("_offset", "10")])
    links = search_links("https://h/fhir/", q, total=35)
    assert list(links) == ["self", "first", "previous", "next", "last"]

    def offset(url: str) -> int:
        parts = urlsplit(url)
        assert parts.path == "/fhir/Observation"
        query = dict(parse_qsl(parts.query))
        assert query["code"] == "4548-4" and query["_count"] == "10"
        return int(query["_offset"])

    assert [offset(links[k]) for k in links] == [10, 0, 0, 20, 30]
    last = parse_search("Observation", [("_count", "10"), ("_offset", "30")])
    assert "next" not in search_links("https://h/fhir", last, total=35)
    first = parse_search("Observation", [("_count", "10")])
    assert "previous" not in search_links("https://h/fhir", first, total=5)
    links = search_links("https://h/fhir", first, total=5, path="Patient/p/$everything")
    assert links["self"].startswith("https://h/fhir/Patient/p/$everything?")
