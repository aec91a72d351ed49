"""Shared payload validation, codes and authorisation helpers of the healthcare contracts.

Everything here is pure: it reads a payload or a state snapshot and either
returns a value or raises :class:`~medledger.errors.MalformedTransaction` /
a :class:`~medledger.errors.ContractError` subclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medledger.contracts.base import get_obj
from medledger.contracts.core import DEFAULT_POLICY, k_org, k_principal
from medledger.errors import Conflict, MalformedTransaction, NotFound, Unauthorized
from medledger.state.base import StateReader

MAX_ID_LEN = 128
MAX_LIST = 64

#: FHIR R4 (4.0.1) resource types.
FHIR_TYPES: frozenset[str] = frozenset(
    """
    Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment
    AppointmentResponse AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure
    Bundle CapabilityStatement CarePlan CareTeam CatalogEntry ChargeItem
    ChargeItemDefinition Claim ClaimResponse ClinicalImpression CodeSystem Communication
    CommunicationRequest CompartmentDefinition Composition ConceptMap Condition Consent
    Contract Coverage CoverageEligibilityRequest CoverageEligibilityResponse DetectedIssue
    Device DeviceDefinition DeviceMetric DeviceRequest DeviceUseStatement DiagnosticReport
    DocumentManifest DocumentReference EffectEvidenceSynthesis Encounter Endpoint
    EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
    GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
    ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan
    Invoice Library Linkage List Location Measure MeasureReport Media Medication
    MedicationAdministration MedicationDispense MedicationKnowledge MedicationRequest
    MedicationStatement MedicinalProduct MedicinalProductAuthorization
    MedicinalProductContraindication MedicinalProductIndication MedicinalProductIngredient
    MedicinalProductInteraction MedicinalProductManufactured MedicinalProductPackaged
    MedicinalProductPharmaceutical MedicinalProductUndesirableEffect MessageDefinition
    MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization
    OrganizationAffiliation Parameters Patient PaymentNotice PaymentReconciliation Person
    PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire
    QuestionnaireResponse RelatedPerson RequestGroup ResearchDefinition
    ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment RiskEvidenceSynthesis
    Schedule SearchParameter ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition
    StructureMap Subscription Substance SubstanceNucleicAcid SubstancePolymer SubstanceProtein
    SubstanceReferenceInformation SubstanceSourceMaterial SubstanceSpecification SupplyDelivery
    SupplyRequest Task TerminologyCapabilities TestReport TestScript ValueSet VerificationResult
    VisionPrescription
    """.split()
)

#: Consent actions (FHIR consentaction value set).
ACTIONS: frozenset[str] = frozenset({"access", "collect", "use", "disclose", "correct"})

#: PurposeOfUse codes (HL7 v3 ActReason, the subset this network recognises).
PURPOSES: frozenset[str] = frozenset(
    {
        "TREAT",  # treatment
        "ETREAT",  # emergency treatment
        "HPAYMT",  # healthcare payment
        "HOPERAT",  # healthcare operations
        "HRESCH",  # healthcare research
        "PUBHLTH",  # public health
        "HMARKT",  # marketing
        "HDIRECT",  # directory
        "CAREMGT",  # care management
        "PATRQT",  # patient requested
        "FAMRQT",  # family requested
        "HLEGAL",  # legal
        "HSYSADMIN",  # system administration
    }
)


def is_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LEN
        and value.isprintable()
        and "/" not in value
        and " " not in value
    )


def req_id(payload: Mapping[str, Any], name: str, what: str | None = None) -> str:
    value = payload.get(name)
    if not is_id(value):
        raise MalformedTransaction(
            f"{what or name} must be a non-empty id (at most {MAX_ID_LEN} characters, "
            "no '/' or spaces)"
        )
    assert isinstance(value, str)
    return value


def req_bytes(payload: Mapping[str, Any], name: str, size: int) -> bytes:
    value = payload.get(name)
    if not isinstance(value, bytes) or len(value) != size:
        raise MalformedTransaction(f"{name} must be {size} bytes")
    return value


def opt_bytes(payload: Mapping[str, Any], name: str, size: int) -> bytes | None:
    if payload.get(name) is None:
        return None
    return req_bytes(payload, name, size)


def req_int(value: Any, what: str, *, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MalformedTransaction(f"{what} must be an integer >= {minimum}")
    return value


def only_keys(payload: Mapping[str, Any], allowed: set[str], what: str) -> None:
    extra = set(payload) - allowed
    if extra:
        raise MalformedTransaction(f"{what}: unexpected field(s) {sorted(extra)}")


def code_list(value: Any, allowed: frozenset[str], what: str) -> list[str]:
    """A list of distinct known codes; ``None``/absent is the empty list (= any)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise MalformedTransaction(f"{what} must be a list of at most {MAX_LIST} codes")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or item not in allowed:
            raise MalformedTransaction(f"{what}: unknown code {item!r}")
        if item in out:
            raise MalformedTransaction(f"{what}: duplicate code {item!r}")
        out.append(item)
    return sorted(out)


def period(value: Any, what: str, *, require_end: bool = False) -> list[int | None]:
    """``[start_ms | None, end_ms | None]``: a half-open interval ``start <= t < end``."""
    if value is None and not require_end:
        return [None, None]
    if not isinstance(value, list) or len(value) != 2:
        raise MalformedTransaction(f"{what} must be [start_ms or null, end_ms or null]")
    start, end = value
    for bound in (start, end):
        if bound is not None:
            req_int(bound, what)
    if require_end and end is None:
        raise MalformedTransaction(f"{what} needs an end")
    if start is not None and end is not None and start >= end:
        raise MalformedTransaction(f"{what}: start must be before end")
    return [start, end]


def in_period(p: list[Any] | tuple[Any, ...], t: int) -> bool:
    start, end = p
    return (start is None or start <= t) and (end is None or t < end)


def active_org(state: StateReader, org_id: str) -> dict[str, Any]:
    org = get_obj(state, k_org(org_id))
    if org is None:
        raise NotFound(f"organisation {org_id} not found")
    if org["status"] != "active":
        raise Conflict(f"organisation {org_id} is {org['status']}")
    return dict(org)


def principal(state: StateReader, pid: str) -> dict[str, Any] | None:
    value = get_obj(state, k_principal(pid))
    return None if value is None else dict(value)


def require_kind(signer: Mapping[str, Any], kinds: set[str], action: str) -> None:
    if signer.get("kind") not in kinds:
        raise Unauthorized(f"{action} must be signed by a principal of kind {sorted(kinds)}")


def policy(config: Mapping[str, Any]) -> Mapping[str, Any]:
    pol = config.get("policy")
    return pol if isinstance(pol, Mapping) else DEFAULT_POLICY
