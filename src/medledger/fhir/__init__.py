"""medledger.fhir."""
