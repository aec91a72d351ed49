"""The CapabilityStatement served at ``GET /fhir/metadata``.

It lists exactly what the medledger API implements: the resource types of
:data:`~medledger.fhir.validate.SUPPORTED_TYPES` with their interactions
(:data:`INTERACTIONS`), the search parameters :func:`~medledger.fhir.index.parse_search`
accepts (:data:`~medledger.fhir.index.SEARCH_PARAMS`), transaction and batch,
the operations ``Patient/$everything``, ``AuditEvent/$proof`` and
``Observation/$duplicate-check``, and, with ``smart=True``, the SMART on FHIR
security service with its token endpoint. The API passes ``interactions`` if
it serves a different set, so the statement stays true.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from medledger import __version__ as _version
from medledger.fhir.index import SEARCH_PARAMS, inclusions
from medledger.fhir.validate import SUPPORTED_TYPES

__all__ = ["INTERACTIONS", "OPERATIONS", "capability_statement"]

_CLINICAL = ("read", "vread", "update", "create", "search-type", "history-instance", "history-type")

#: Interactions per type (the default promise; override with ``interactions=``).
INTERACTIONS: dict[str, tuple[str, ...]] = {
    **{t: _CLINICAL for t in SUPPORTED_TYPES},
    "Consent": ("read", "create", "search-type"),
    "AuditEvent": ("read", "search-type"),
}

#: (type, operation name, definition path under the base, documentation)
OPERATIONS: tuple[tuple[str, str, str, str], ...] = (
    (
        "Patient",
        "everything",
        "http://hl7.org/fhir/OperationDefinition/Patient-everything",
        "Everything the caller may see about the patient, from every custodian",
    ),
    (
        "AuditEvent",
        "proof",
        "OperationDefinition/AuditEvent-proof",
        "The ledger inclusion proof of the access.log transaction behind this AuditEvent, "
        "with the signed checkpoint it verifies against",
    ),
    (
        "Observation",
        "duplicate-check",
        "OperationDefinition/Observation-duplicate-check",
        "Recent results for a patient and a LOINC code (patient=, code=system|code) from every "
        "custodian the caller may see, to avoid repeating a test",
    ),
)

SMART_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SYS_SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"

_DATE = "2024-06-01"  # publication date of this statement's content


def _token_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}/auth/token"


def _canonical(base_url: str, definition: str) -> str:
    if definition.startswith(("http://", "https://")):
        return definition
    return f"{base_url.rstrip('/')}/{definition}"


def capability_statement(
    base_url: str,
    *,
    smart: bool,
    token_url: str | None = None,
    interactions: Mapping[str, Sequence[str]] | None = None,
    software_version: str | None = None,
) -> dict[str, Any]:
    """The server's CapabilityStatement (R4, JSON).

    ``base_url`` is the FHIR base (``https://host:8443/fhir``). With ``smart``
    the security section names SMART on FHIR and the OAuth token endpoint
    (``token_url``, default ``<origin>/auth/token``).
    """
    base = base_url.rstrip("/")
    promised = {**INTERACTIONS, **(dict(interactions) if interactions else {})}
    resources: list[dict[str, Any]] = []
    for rtype in sorted(promised):
        kinds = list(promised[rtype])
        if not kinds:
            continue
        res: dict[str, Any] = {
            "type": rtype,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
            "interaction": [{"code": k} for k in kinds],
            "versioning": "versioned-update" if "update" in kinds else "versioned",
            "readHistory": "vread" in kinds,
            "updateCreate": False,
            # If-None-Exist on POST (ifNoneExist in Bundles), searched as the caller searches
            "conditionalCreate": "create" in kinds and rtype != "Consent",
            # If-None-Match on every read; If-Modified-Since where versions carry lastUpdated
            "conditionalRead": "not-match"
            if rtype in ("Consent", "AuditEvent")
            else "full-support",
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "referencePolicy": ["literal", "local"],
        }
        if "search-type" in kinds:
            params = SEARCH_PARAMS.get(rtype, {})
            res["searchParam"] = [
                {"name": name, "type": kind, "documentation": doc}
                for name, (kind, _target, doc) in sorted(params.items())
            ]
            include, revinclude = inclusions(rtype)
            revinclude = [
                v for v in revinclude if "search-type" in promised.get(v.split(":")[0], ())
            ]
            if include:
                res["searchInclude"] = include
            if revinclude:
                res["searchRevInclude"] = revinclude
        ops = [
            {"name": name, "definition": _canonical(base, definition), "documentation": doc}
            for t, name, definition, doc in OPERATIONS
            if t == rtype
        ]
        if ops:
            res["operation"] = ops
        resources.append(res)

    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": (
            "medledger: FHIR R4 over a permissioned ledger. Records are encrypted per version; "
            "every read, search and denial is decided by consent and logged on the ledger. "
            "In a consortium (one node per organisation), practitioners' and apps' reads, "
            "history, Patient/$everything and searches by patient alone (with _count, "
            "_offset) include records other organisations' nodes hold; searches with "
            "clinical filters (code, category, date, _lastUpdated, _id) and "
            "Observation/$duplicate-check cover the records this node holds, and patients "
            "read records at their custodian's node."
        ),
    }
    security: dict[str, Any] = {"cors": True}
    if smart:
        security["extension"] = [
            {
                "url": SMART_OAUTH_URIS,
                "extension": [{"url": "token", "valueUri": token_url or _token_url(base)}],
            }
        ]
        security["service"] = [
            {
                "coding": [
                    {
                        "system": SYS_SECURITY_SERVICE,
                        "code": "SMART-on-FHIR",
                        "display": "SMART-on-FHIR",
                    }
                ],
                "text": "OAuth2 client credentials (SMART Backend Services, private_key_jwt)",
            }
        ]
        security["description"] = (
            "Bearer tokens from the SMART Backend Services token endpoint; scopes narrow, "
            "never widen, what patient consent permits."
        )
    rest["security"] = security
    rest["resource"] = resources
    rest["interaction"] = [{"code": "transaction"}, {"code": "batch"}]
    version = software_version or _version
    return {
        "resourceType": "CapabilityStatement",
        "id": "medledger",
        "status": "active",
        "date": _DATE,
        "publisher": "medledger",
        "kind": "instance",
        "software": {"name": "medledger", "version": version},
        "implementation": {"description": "medledger FHIR API", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    }
