"""Schema-based fuzzing of the live API with schemathesis (its CLI, against /openapi.json).

Every operation of the OpenAPI document is exercised with generated valid and
invalid requests carrying a real bearer token (all scopes of the hospital's
system client). The run must find no 5xx response and no response that breaks
the schema: undeclared status codes, content types or headers, or bodies that
do not match the declared schemas (OperationOutcome for every FHIR error).
The example count is kept small: the machine has two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import Api, LiveServer

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def test_openapi_document_is_fhir_shaped(api: Api) -> None:
    doc = api.http.get("/openapi.json").json()
    ops = {
        (path, method): op
        for path, item in doc["paths"].items()
        if path.startswith("/fhir") and ".well-known" not in path
        for method, op in item.items()
    }
    assert ("/fhir/Observation/{rid}", "put") in ops
    assert ("/fhir/Patient/{pid}/$everything", "get") in ops
    assert ("/fhir/AuditEvent", "post") not in ops  # AuditEvents are written by the ledger
    for op in ops.values():
        for status, resp in op["responses"].items():
            if status == "304":  # a conditional read's Not Modified has no body
                assert "content" not in resp and op["operationId"].startswith("read_")
                continue
            content = resp["content"]
            assert set(content) == {"application/fhir+json"}, (op["operationId"], status)
            if status.startswith(("4", "5")):  # every FHIR error is an OperationOutcome
                schema = content["application/fhir+json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/OperationOutcome"}


def test_schemathesis_finds_no_server_errors_or_schema_violations(
    api: Api, live: LiveServer, tmp_path: Path
) -> None:
    smart = live.runtime.require_smart()
    client = api.client("system:hospital", "system/*.cruds")
    registered = live.call(smart.get_client(client.client_id))
    assert registered is not None
    token = live.call(smart.issue(registered, "system/*.cruds", ttl=3600)).token
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}
    env["SCHEMATHESIS_HOOKS"] = ""
    cmd = [
        str(SCHEMATHESIS),
        "run",
        f"{live.base_url}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        "4",
        "--phases",
        "examples,coverage,fuzzing",
        "--mode",
        "all",
        "--workers",
        "1",
        "--seed",
        "20261125",
        "--no-shrink",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        "--header",
        f"Authorization: Bearer {token}",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-12000:]
    assert "passed" in output
