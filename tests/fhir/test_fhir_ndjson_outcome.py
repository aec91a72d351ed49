"""NDJSON/Bundle readers and the error mapping."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
from fhirdata import BUNDLE_FILES, NDJSON_FILES, load_bundle

from medledger import errors as merr
from medledger.fhir.ndjson import NdjsonError, iter_bundle_resources, iter_ndjson, read_json
from medledger.fhir.outcome import (
    FhirError,
    Issue,
    from_medledger_error,
    operation_outcome,
    status_line,
)
from medledger.fhir.validate import parse_resource


def test_iter_ndjson_reads_every_real_file() -> None:
    total = 0
    for path in NDJSON_FILES:
        rtype = path.name.split(".")[0]
        lines = path.read_text(encoding="utf-8").splitlines()
        items = list(iter_ndjson(path))
        assert [n for n, _ in items] == list(range(1, len(lines) + 1))
        for _, resource in items:
            assert resource["resourceType"] == rtype
            parse_resource(resource, rtype)
        total += len(items)
    assert total > 90


def test_resume_from_a_line(tmp_path: Path) -> None:
    path = NDJSON_FILES[0]
    all_items = list(iter_ndjson(path))
    assert list(iter_ndjson(path, start_line=4)) == all_items[3:]


def test_gzip_and_blank_lines(tmp_path: Path) -> None:
    src = next(p for p in NDJSON_FILES if p.name.startswith("Condition"))
    text = src.read_text(encoding="utf-8").replace("\n", "\n\n", 1)
    gz = tmp_path / "Condition.000.ndjson.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(text)
    items = list(iter_ndjson(gz))
    assert [n for n, _ in items][:3] == [1, 3, 4]
    assert len(items) == len(src.read_text().splitlines())


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "one JSON object"),
        ('{"id": "x"}', "resourceType"),
    ],
)
def test_errors_name_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "Patient.000.ndjson"
    good = next(p for p in NDJSON_FILES if p.name.startswith("Patient")).read_text().splitlines()
    path.write_text("\n".join([good[0], good[1], bad_line, good[0]]) + "\n")
    it = iter_ndjson(path)
    assert next(it)[0] == 1 and next(it)[0] == 2
    with pytest.raises(NdjsonError) as info:
        next(it)
    err = info.value
    assert (err.status, err.line) == (400, 3)
    assert f"{path}:3:" in err.diagnostics and message in err.diagnostics


@pytest.mark.parametrize("path", BUNDLE_FILES, ids=[p.stem for p in BUNDLE_FILES])
def test_iter_bundle_resources(path: Path, tmp_path: Path) -> None:
    bundle = load_bundle(path)
    items = list(iter_bundle_resources(bundle))
    assert len(items) == len(bundle["entry"])
    first = items[0]
    assert first.position == 0
    assert first.full_url == bundle["entry"][0]["fullUrl"]
    assert first.request == {"method": "POST", "url": first.resource["resourceType"]}
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    assert list(iter_bundle_resources(copy)) == items
    assert read_json(copy) == bundle


def test_bundle_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(FhirError):
        list(iter_bundle_resources({"resourceType": "Patient"}))
    bad = tmp_path / "b.json"
    bad.write_text('{"resourceType": "Bundle", "entry": [')
    with pytest.raises(FhirError) as info:
        read_json(bad)
    assert str(bad) in info.value.diagnostics


# ----------------------------------------------------------------------------- outcome


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (merr.Unauthorized("no"), 403, "forbidden"),
        (merr.NotFound("gone"), 404, "not-found"),
        (merr.NotFoundError("gone"), 404, "not-found"),
        (merr.Conflict("twice"), 409, "conflict"),
        (merr.MalformedTransaction("bad"), 400, "invalid"),
        (merr.RuleError("cel"), 422, "business-rule"),
        (merr.ContractError("no"), 422, "business-rule"),
        (merr.ReplayedTransaction("again"), 409, "conflict"),
        (merr.IntegrityError("tampered"), 500, "exception"),
        (merr.StorageError("disk"), 500, "exception"),
        (merr.OrdererError("down"), 503, "transient"),
        (merr.DecryptionError("x"), 500, "exception"),
        (merr.ProofError("x"), 500, "exception"),
        (RuntimeError("boom"), 500, "exception"),
    ],
)
def test_from_medledger_error(exc: BaseException, status: int, code: str) -> None:
    err = from_medledger_error(exc)
    assert (err.status, err.code) == (status, code)
    parse_resource(operation_outcome(err), "OperationOutcome")


def test_internal_errors_do_not_leak_messages() -> None:
    err = from_medledger_error(RuntimeError("secret patient name"))
    assert "secret" not in err.diagnostics


def test_fhir_error_passes_through() -> None:
    original = FhirError(410, "deleted", "deleted")
    assert from_medledger_error(original) is original


def test_operation_outcome_forms() -> None:
    oo = operation_outcome(404, "no such record", expression=["Observation/1"])
    parse_resource(oo, "OperationOutcome")
    assert oo["issue"] == [
        {
            "severity": "error",
            "code": "not-found",
            "diagnostics": "no such record",
            "expression": ["Observation/1"],
        }
    ]
    ok = operation_outcome(200, "deleted")
    assert ok["issue"][0]["severity"] == "information"
    assert operation_outcome(412)["issue"][0]["code"] == "conflict"
    with pytest.raises(ValueError):
        operation_outcome(400, code="bogus")
    with pytest.raises(ValueError):
        FhirError(400, "bogus", "x")


def test_fhir_error_multiple_issues_and_prefix() -> None:
    err = FhirError.from_issues(
        422,
        [
            Issue("required", "status is required", ("Observation.status",)),
            Issue("code-invalid", "bad", ("Observation.code",)),
        ],
    )
    assert (err.code, err.expression) == ("required", ["Observation.status"])
    moved = err.prefixed("Observation", "Bundle.entry[2].resource")
    assert [i.expression for i in moved.issues] == [
        ("Bundle.entry[2].resource.status",),
        ("Bundle.entry[2].resource.code",),
    ]
    assert "422 required" in str(err) and "+1 more" in str(err)
    assert status_line(201) == "201 Created" and status_line(299) == "299"
