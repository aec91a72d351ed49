"""medledger.fhir: the FHIR R4 library (pure functions; only ``ndjson`` reads files).

Modules
-------
``outcome``     FhirError (HTTP status + OperationOutcome issues), mapping of medledger errors
``validate``    parse_resource: JSON rules, fhir.resources R4B models, required codes, invariants
``index``       extract (patient, codes, categories, date, references) and parse_search
``bundle``      transaction/batch planning, urn:uuid rewriting, response/searchset/history bundles
``consent``     FHIR Consent <-> consent_v1 documents
``audit``       access.log entries as IHE BALP AuditEvents
``capability``  the CapabilityStatement
``ndjson``      Bulk Data NDJSON and Bundle readers
``dates``       FHIR dates as millisecond ranges
"""

from medledger.fhir.outcome import FhirError, from_medledger_error, operation_outcome
from medledger.fhir.validate import SUPPORTED_TYPES, parse_resource

__all__ = [
    "SUPPORTED_TYPES",
    "FhirError",
    "from_medledger_error",
    "operation_outcome",
    "parse_resource",
]
