"""Parse and validate FHIR R4 resources.

:func:`parse_resource` is the one entry point: bytes (or an already decoded
JSON object) in, a checked resource dict out, or a :class:`FhirError`.

Three layers, cheapest first:

1. **JSON.** Valid UTF-8 JSON, one object, no duplicate keys, no ``NaN``; the
   FHIR JSON rules: no ``null`` property values (nulls only as placeholders in
   primitive arrays with a ``_name`` sibling), no empty objects, arrays or
   strings; a known R4 ``resourceType`` (matching ``expected_type``).
2. **Structure** with the ``fhir.resources.R4B`` model of the type (R4B's
   models read R4 JSON of every type medledger serves): element names, JSON
   types, primitive formats (dates, ids, codes), cardinality. A type's model
   is imported the first time it is needed (:func:`model_class`); importing
   this module loads none (all ~130 take seconds, an import needs a dozen).
3. **Content rules** the models skip, for :data:`SUPPORTED_TYPES`: status and
   other codes with a *required* binding, mandatory elements, and invariants
   (Observation obs-3/6/7, Condition con-3/4/5, AllergyIntolerance ait-1/2,
   Consent ppc-1..5, AuditEvent sev-1, Patient pat-1 ...).

Failures of 1-2 are 400 (the body is not a readable resource of that type),
except a missing mandatory element which, like every failure of 3, is 422.
All issues found at one layer are reported together, each with a FHIRPath-like
expression (``Observation.component[1].code``).

The returned dict is the input JSON itself (not a re-serialisation of the
model): the models would rewrite instants (``+00:00`` -> ``Z``, ``.251`` ->
``.251000``) and R4 asks servers to keep what the client sent. Because the
models forbid unknown elements and layer 1 forbids nulls and empties, the
input is already in normal form.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from typing import Any

from pydantic import ValidationError

from medledger.contracts._common import FHIR_TYPES
from medledger.fhir.jsontext import parse_number
from medledger.fhir.outcome import FhirError, Issue

__all__ = [
    "KNOWN_TYPES",
    "NO_R4B_MODEL",
    "SUPPORTED_TYPES",
    "codings",
    "is_known_type",
    "load_models",
    "model_class",
    "parse_json",
    "parse_resource",
    "validate_element",
    "validate_resource",
]

#: The resource types the medledger FHIR API serves (create/read/search...).
SUPPORTED_TYPES: frozenset[str] = frozenset(
    {
        "Patient",
        "Observation",
        "Condition",
        "Encounter",
        "Procedure",
        "MedicationRequest",
        "AllergyIntolerance",
        "Immunization",
        "DiagnosticReport",
        "DocumentReference",
        "Consent",
        "AuditEvent",
    }
)


#: R4 resource types without an R4B model (R4-only types: R4B dropped or reshaped them).
NO_R4B_MODEL: frozenset[str] = frozenset(
    """
    EffectEvidenceSynthesis MedicinalProduct MedicinalProductAuthorization
    MedicinalProductContraindication MedicinalProductIndication MedicinalProductIngredient
    MedicinalProductInteraction MedicinalProductManufactured MedicinalProductPackaged
    MedicinalProductPharmaceutical MedicinalProductUndesirableEffect RiskEvidenceSynthesis
    SubstanceNucleicAcid SubstancePolymer SubstanceProtein SubstanceReferenceInformation
    SubstanceSourceMaterial SubstanceSpecification
    """.split()
)

#: R4 resource types with an R4B model (R4-only types such as MedicinalProduct are absent).
#: Names only: a model is imported on first use (:func:`model_class`), as importing all
#: ~130 of them takes seconds and an import or a server needs a dozen or so.
KNOWN_TYPES: frozenset[str] = FHIR_TYPES - NO_R4B_MODEL


@cache
def model_class(resource_type: str) -> Any:
    """The ``fhir.resources.R4B`` model class of ``resource_type`` (None if unknown).

    Imported on first use (then cached).
    """
    if resource_type not in KNOWN_TYPES:
        return None
    from fhir.resources.R4B import get_fhir_model_class

    try:
        cls = get_fhir_model_class(resource_type)
    except ValueError:
        return None
    if getattr(cls, "__resource_type__", None) != resource_type:
        return None
    return cls


@cache
def summary_elements(resource_type: str) -> tuple[frozenset[str], frozenset[str]]:
    """(the top-level elements the FHIR specification marks as summary elements, the
    top-level elements it requires) of ``resource_type``, as JSON names (a choice
    element by each of its names, e.g. ``valueQuantity``), from the R4B model."""
    model = model_class(resource_type)
    summary: set[str] = set()
    required: set[str] = set()
    if model is not None:
        for name, info in model.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if not extra.get("element_property"):
                continue
            json_name = info.alias or name
            if extra.get("summary_element_property"):
                summary.add(json_name)
            if (
                info.is_required()
                or extra.get("element_required")
                or extra.get("one_of_many_required")  # a required choice: each of its names
            ):
                required.add(json_name)
    return frozenset(summary), frozenset(required)


def load_models(types: Iterable[str]) -> None:
    """Import the models of ``types`` now (e.g. before forking worker processes)."""
    for rtype in types:
        model_class(rtype)


def is_known_type(resource_type: Any) -> bool:
    """True for an R4 resource type that this library can validate (imports no model)."""
    return isinstance(resource_type, str) and resource_type in KNOWN_TYPES


# --------------------------------------------------------------------------- JSON layer


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate property {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes | bytearray | memoryview | str) -> Any:
    """Decode a JSON document strictly (UTF-8, no duplicate keys, no NaN/Infinity).

    Decimal numbers keep their precision (:func:`parse_number`). Raises
    FhirError(400, structure) naming the problem.
    """
    if isinstance(body, memoryview | bytearray):
        body = bytes(body)
    try:
        return json.loads(
            body,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_float=parse_number,
        )
    except RecursionError:
        raise FhirError(400, "structure", "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, duplicates
        raise FhirError(400, "structure", f"body is not valid JSON: {exc}") from None


def _shape_issues(value: Any, path: str, out: list[Issue], depth: int = 0) -> None:
    """FHIR JSON rules the models do not enforce (nulls, empties)."""
    if depth > 64:
        out.append(Issue("structure", "elements nested too deeply", (path,)))
        return
    if isinstance(value, dict):
        if not value:
            out.append(Issue("structure", "empty objects are not allowed in FHIR JSON", (path,)))
            return
        for key, item in value.items():
            sub = f"{path}.{key}"
            if item is None:
                out.append(Issue("structure", "null is not a valid FHIR JSON value", (sub,)))
            elif isinstance(item, list):
                if not item:
                    out.append(
                        Issue("structure", "empty arrays are not allowed in FHIR JSON", (sub,))
                    )
                    continue
                # nulls may only align primitive values with their _extension twins
                may_null = key.startswith("_") or f"_{key}" in value
                for i, elem in enumerate(item):
                    if elem is None:
                        if not may_null or all(e is None for e in item):
                            out.append(
                                Issue(
                                    "structure",
                                    "null is only allowed as a placeholder in primitive arrays",
                                    (f"{sub}[{i}]",),
                                )
                            )
                    else:
                        _shape_issues(elem, f"{sub}[{i}]", out, depth + 1)
            else:
                _shape_issues(item, sub, out, depth + 1)
    elif isinstance(value, str):
        if value == "":
            out.append(Issue("structure", "empty strings are not allowed in FHIR JSON", (path,)))
    elif isinstance(value, float) and not math.isfinite(value):
        out.append(Issue("value", "numbers must be finite", (path,)))


# --------------------------------------------------------------------------- model layer


def _loc_expr(root: str, loc: Iterable[Any]) -> str:
    expr = root
    for part in loc:
        if isinstance(part, int):
            expr += f"[{part}]"
        else:
            name = str(part)
            if name.endswith("__ext"):
                name = "_" + name[: -len("__ext")]
            expr += f".{name}"
    return expr


_MISSING_TYPES = frozenset({"missing", "model_field_validation.missing"})
_STRUCTURE_TYPES = frozenset(
    {
        "extra_forbidden",
        "json_invalid",
        "json_type",
        "model_type",
        "model_attributes_type",
        "dict_type",
        "list_type",
        "string_type",
        "bool_type",
        "int_type",
        "float_type",
        "decimal_type",
        "bytes_type",
        "is_instance_of",
        "union_tag_invalid",
        "union_tag_not_found",
        "fhir-validation-wrong-resource-type",
        "fhir-validation-missing-resource-type",
    }
)


def _model_issues(root: str, exc: ValidationError) -> tuple[list[Issue], list[Issue]]:
    """(400-class issues, missing-element issues) from a pydantic ValidationError."""
    bad: list[Issue] = []
    missing: list[Issue] = []
    for err in exc.errors(include_url=False):
        kind = str(err.get("type", ""))
        loc = tuple(err.get("loc", ()))
        expr = _loc_expr(root, loc)
        msg = " ".join(str(err.get("msg", "")).split())
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if kind in _MISSING_TYPES:
            missing.append(Issue("required", f"{expr} is required", (expr,)))
        elif kind == "value_error" and msg.startswith("Expect any of field value"):
            missing.append(Issue("required", f"one of {_choice_names(msg)} is required", (expr,)))
        elif kind == "extra_forbidden":
            bad.append(Issue("structure", f"unknown element {loc[-1] if loc else ''!s}", (expr,)))
        elif kind in _STRUCTURE_TYPES or kind.endswith("_type"):
            bad.append(Issue("structure", f"wrong type: {msg}", (expr,)))
        elif "but got multiple" in msg:
            bad.append(
                Issue("structure", f"only one of {_choice_names(msg)} may be given", (expr,))
            )
        else:
            bad.append(Issue("value", f"invalid value: {msg}", (expr,)))
    return bad, missing


def _choice_names(msg: str) -> str:
    start, end = msg.find("["), msg.find("]")
    return msg[start : end + 1] if 0 <= start < end else "the choices"


# --------------------------------------------------------------------------- content layer

CS = "http://terminology.hl7.org/CodeSystem/"

OBSERVATION_STATUS = frozenset(
    {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
CONDITION_CLINICAL = frozenset(
    {"active", "recurrence", "relapse", "inactive", "remission", "resolved"}
)
CONDITION_VERIFICATION = frozenset(
    {"unconfirmed", "provisional", "differential", "confirmed", "refuted", "entered-in-error"}
)
ENCOUNTER_STATUS = frozenset(
    {
        "planned",
        "arrived",
        "triaged",
        "in-progress",
        "onleave",
        "finished",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
PROCEDURE_STATUS = frozenset(
    {
        "preparation",
        "in-progress",
        "not-done",
        "on-hold",
        "stopped",
        "completed",
        "entered-in-error",
        "unknown",
    }
)
MEDREQ_STATUS = frozenset(
    {
        "active",
        "on-hold",
        "cancelled",
        "completed",
        "entered-in-error",
        "stopped",
        "draft",
        "unknown",
    }
)
MEDREQ_INTENT = frozenset(
    {
        "proposal",
        "plan",
        "order",
        "original-order",
        "reflex-order",
        "filler-order",
        "instance-order",
        "option",
    }
)
REQUEST_PRIORITY = frozenset({"routine", "urgent", "asap", "stat"})
ALLERGY_CLINICAL = frozenset({"active", "inactive", "resolved"})
ALLERGY_VERIFICATION = frozenset({"unconfirmed", "confirmed", "refuted", "entered-in-error"})
ALLERGY_TYPE = frozenset({"allergy", "intolerance"})
ALLERGY_CATEGORY = frozenset({"food", "medication", "environment", "biologic"})
ALLERGY_CRITICALITY = frozenset({"low", "high", "unable-to-assess"})
REACTION_SEVERITY = frozenset({"mild", "moderate", "severe"})
IMMUNIZATION_STATUS = frozenset({"completed", "entered-in-error", "not-done"})
REPORT_STATUS = frozenset(
    {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    }
)
DOCREF_STATUS = frozenset({"current", "superseded", "entered-in-error"})
DOCREF_DOC_STATUS = frozenset({"preliminary", "final", "amended", "entered-in-error"})
DOCREF_RELATION = frozenset({"replaces", "transforms", "signs", "appends"})
CONSENT_STATUS = frozenset(
    {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
)
CONSENT_PROVISION_TYPE = frozenset({"deny", "permit"})
CONSENT_DATA_MEANING = frozenset({"instance", "related", "dependents", "authoredby"})
AUDIT_ACTION = frozenset({"C", "R", "U", "D", "E"})
AUDIT_OUTCOME = frozenset({"0", "4", "8", "12"})
AUDIT_NETWORK_TYPE = frozenset({"1", "2", "3", "4", "5"})
GENDER = frozenset({"male", "female", "other", "unknown"})
LINK_TYPE = frozenset({"replaced-by", "replaces", "refer", "seealso"})
NAME_USE = frozenset({"usual", "official", "temp", "nickname", "anonymous", "old", "maiden"})
TELECOM_SYSTEM = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})
TELECOM_USE = frozenset({"home", "work", "temp", "old", "mobile"})
ADDRESS_USE = frozenset({"home", "work", "temp", "old", "billing"})
ADDRESS_TYPE = frozenset({"postal", "physical", "both"})
IDENTIFIER_USE = frozenset({"usual", "official", "temp", "secondary", "old"})

SYS_CONDITION_CLINICAL = CS + "condition-clinical"
SYS_CONDITION_VERIFICATION = CS + "condition-ver-status"
SYS_CONDITION_CATEGORY = CS + "condition-category"
SYS_ALLERGY_CLINICAL = CS + "allergyintolerance-clinical"
SYS_ALLERGY_VERIFICATION = CS + "allergyintolerance-verification"
SYS_CONSENT_SCOPE = CS + "consentscope"


def codings(cc: Any) -> list[tuple[str | None, str]]:
    """(system, code) pairs of a CodeableConcept (or a Coding, or a list of either)."""
    out: list[tuple[str | None, str]] = []
    if isinstance(cc, list):
        for item in cc:
            out.extend(codings(item))
        return out
    if not isinstance(cc, dict):
        return out
    items = cc.get("coding") if "coding" in cc else [cc]
    if isinstance(items, list):
        for c in items:
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                system = c.get("system")
                out.append((system if isinstance(system, str) else None, c["code"]))
    return out


class _Checker:
    """Content checks of one resource; issues accumulate, raised as 422."""

    def __init__(self, rtype: str, res: Mapping[str, Any]) -> None:
        self.t = rtype
        self.r = res
        self.issues: list[Issue] = []

    def add(self, code: str, diagnostics: str, expr: str) -> None:
        self.issues.append(Issue(code, diagnostics, (expr,)))

    def path(self, *parts: str | int) -> str:
        return _loc_expr(self.t, parts)

    def require(self, obj: Mapping[str, Any], key: str, *where: str | int) -> bool:
        """``key`` (or its ``_key`` extension twin for primitives) must be present."""
        if obj.get(key) is None and not obj.get(f"_{key}"):
            self.add("required", f"{self.path(*where, key)} is required", self.path(*where, key))
            return False
        return True

    def require_choice(self, obj: Mapping[str, Any], prefix: str, *where: str | int) -> None:
        if not any(
            k.startswith(prefix) and k[len(prefix) : len(prefix) + 1].isupper() for k in obj
        ):
            expr = self.path(*where, prefix + "[x]")
            self.add("required", f"{expr} is required", expr)

    def code(
        self, obj: Mapping[str, Any], key: str, allowed: frozenset[str], *where: str | int
    ) -> None:
        """A primitive ``code`` (or list of codes) bound to a required value set."""
        value = obj.get(key)
        values = value if isinstance(value, list) else [value]
        for i, v in enumerate(values):
            if v is None or not isinstance(v, str):
                continue
            if v not in allowed:
                expr = (
                    self.path(*where, key, i) if isinstance(value, list) else self.path(*where, key)
                )
                self.add(
                    "code-invalid",
                    f"{v!r} is not a valid code for {self.path(*where, key)}; "
                    f"expected one of {', '.join(sorted(allowed))}",
                    expr,
                )

    def concept(
        self,
        obj: Mapping[str, Any],
        key: str,
        system: str,
        allowed: frozenset[str],
        *where: str | int,
    ) -> str | None:
        """A CodeableConcept bound (required) to ``allowed`` codes of ``system``.

        Returns the code found (None if the element is absent or invalid).
        """
        cc = obj.get(key)
        if cc is None:
            return None
        expr = self.path(*where, key)
        found = [c for s, c in codings(cc) if s == system]
        bad = [c for c in found if c not in allowed]
        if bad:
            self.add(
                "code-invalid",
                f"{bad[0]!r} is not a valid {system} code; "
                f"expected one of {', '.join(sorted(allowed))}",
                expr,
            )
            return None
        if not found:
            self.add(
                "code-invalid",
                f"{expr} must have a coding from {system} ({', '.join(sorted(allowed))})",
                expr,
            )
            return None
        return found[0]

    def items(self, obj: Mapping[str, Any], key: str) -> list[tuple[int, dict[str, Any]]]:
        value = obj.get(key)
        if not isinstance(value, list):
            return [(0, value)] if isinstance(value, dict) else []
        return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]


def _has_code(cc: Any, system: str, code: str) -> bool:
    return (system, code) in codings(cc)


def _has_value(obj: Mapping[str, Any]) -> bool:
    return any(k.startswith("value") and k[5:6].isupper() for k in obj)


def _check_patient(c: _Checker) -> None:
    r = c.r
    c.code(r, "gender", GENDER)
    for i, link in c.items(r, "link"):
        c.require(link, "other", "link", i)
        if c.require(link, "type", "link", i):
            c.code(link, "type", LINK_TYPE, "link", i)
    for i, contact in c.items(r, "contact"):
        if not any(contact.get(k) for k in ("name", "telecom", "address", "organization")):
            c.add(
                "invariant",
                "pat-1: a contact needs a name, telecom, address or organization",
                c.path("contact", i),
            )
        c.code(contact, "gender", GENDER, "contact", i)
    _check_person_datatypes(c, r)


def _check_person_datatypes(c: _Checker, r: Mapping[str, Any]) -> None:
    for i, name in c.items(r, "name"):
        c.code(name, "use", NAME_USE, "name", i)
    for i, tel in c.items(r, "telecom"):
        c.code(tel, "system", TELECOM_SYSTEM, "telecom", i)
        c.code(tel, "use", TELECOM_USE, "telecom", i)
        if tel.get("value") is not None and tel.get("system") is None:
            c.add(
                "invariant",
                "cpt-2: a system is required if a value is provided",
                c.path("telecom", i),
            )
    for i, addr in c.items(r, "address"):
        c.code(addr, "use", ADDRESS_USE, "address", i)
        c.code(addr, "type", ADDRESS_TYPE, "address", i)
    for i, ident in c.items(r, "identifier"):
        c.code(ident, "use", IDENTIFIER_USE, "identifier", i)


def _check_observation(c: _Checker) -> None:
    r = c.r
    if c.require(r, "status"):
        c.code(r, "status", OBSERVATION_STATUS)
    c.require(r, "code")
    if "dataAbsentReason" in r and _has_value(r):
        c.add(
            "invariant",
            "obs-6: dataAbsentReason SHALL only be present if value[x] is not present",
            c.path("dataAbsentReason"),
        )
    own = set(codings(r.get("code")))
    for i, comp in c.items(r, "component"):
        c.require(comp, "code", "component", i)
        if "dataAbsentReason" in comp and _has_value(comp):
            c.add(
                "invariant",
                "obs-6: dataAbsentReason SHALL only be present if value[x] is not present",
                c.path("component", i, "dataAbsentReason"),
            )
        if _has_value(r) and own & set(codings(comp.get("code"))):
            c.add(
                "invariant",
                "obs-7: value[x] SHALL NOT be present when a component has the same code "
                "as the Observation",
                c.path("component", i, "code"),
            )
    for i, rng in c.items(r, "referenceRange"):
        if not any(rng.get(k) for k in ("low", "high", "text")):
            c.add(
                "invariant",
                "obs-3: a reference range must have at least a low, a high or a text",
                c.path("referenceRange", i),
            )


def _check_condition(c: _Checker) -> None:
    r = c.r
    c.require(r, "subject")
    clinical = c.concept(r, "clinicalStatus", SYS_CONDITION_CLINICAL, CONDITION_CLINICAL)
    c.concept(r, "verificationStatus", SYS_CONDITION_VERIFICATION, CONDITION_VERIFICATION)
    in_error = _has_code(
        r.get("verificationStatus"), SYS_CONDITION_VERIFICATION, "entered-in-error"
    )
    problem = any(
        code == "problem-list-item" and system in (SYS_CONDITION_CATEGORY, None)
        for system, code in codings(r.get("category"))
    )
    if r.get("clinicalStatus") is None and not in_error and problem:
        c.add(
            "invariant",
            "con-3: clinicalStatus SHALL be present if verificationStatus is not "
            "entered-in-error and category is problem-list-item",
            c.path("clinicalStatus"),
        )
    abated = any(k.startswith("abatement") for k in r)
    if abated and clinical not in ("inactive", "resolved", "remission"):
        c.add(
            "invariant",
            "con-4: if the condition is abated, clinicalStatus must be inactive, resolved "
            "or remission",
            c.path("clinicalStatus"),
        )
    if in_error and r.get("clinicalStatus") is not None:
        c.add(
            "invariant",
            "con-5: clinicalStatus SHALL NOT be present if verificationStatus is entered-in-error",
            c.path("clinicalStatus"),
        )


def _check_encounter(c: _Checker) -> None:
    r = c.r
    if c.require(r, "status"):
        c.code(r, "status", ENCOUNTER_STATUS)
    c.require(r, "class")
    for i, hist in c.items(r, "statusHistory"):
        if c.require(hist, "status", "statusHistory", i):
            c.code(hist, "status", ENCOUNTER_STATUS, "statusHistory", i)
        c.require(hist, "period", "statusHistory", i)


def _check_procedure(c: _Checker) -> None:
    r = c.r
    if c.require(r, "status"):
        c.code(r, "status", PROCEDURE_STATUS)
    c.require(r, "subject")


def _check_medication_request(c: _Checker) -> None:
    r = c.r
    if c.require(r, "status"):
        c.code(r, "status", MEDREQ_STATUS)
    if c.require(r, "intent"):
        c.code(r, "intent", MEDREQ_INTENT)
    c.code(r, "priority", REQUEST_PRIORITY)
    c.require(r, "subject")
    c.require_choice(r, "medication")


def _check_allergy(c: _Checker) -> None:
    r = c.r
    c.require(r, "patient")
    c.concept(r, "clinicalStatus", SYS_ALLERGY_CLINICAL, ALLERGY_CLINICAL)
    c.concept(r, "verificationStatus", SYS_ALLERGY_VERIFICATION, ALLERGY_VERIFICATION)
    c.code(r, "type", ALLERGY_TYPE)
    c.code(r, "category", ALLERGY_CATEGORY)
    c.code(r, "criticality", ALLERGY_CRITICALITY)
    for i, reaction in c.items(r, "reaction"):
        c.code(reaction, "severity", REACTION_SEVERITY, "reaction", i)
        c.require(reaction, "manifestation", "reaction", i)
    in_error = _has_code(r.get("verificationStatus"), SYS_ALLERGY_VERIFICATION, "entered-in-error")
    if not in_error and r.get("clinicalStatus") is None:
        c.add(
            "invariant",
            "ait-1: clinicalStatus SHALL be present if verificationStatus is not entered-in-error",
            c.path("clinicalStatus"),
        )
    if in_error and r.get("clinicalStatus") is not None:
        c.add(
            "invariant",
            "ait-2: clinicalStatus SHALL NOT be present if verificationStatus is entered-in-error",
            c.path("clinicalStatus"),
        )


def _check_immunization(c: _Checker) -> None:
    r = c.r
    if c.require(r, "status"):
        c.code(r, "status", IMMUNIZATION_STATUS)
    c.require(r, "vaccineCode")
    c.require(r, "patient")
    c.require_choice(r, "occurrence")


def _check_diagnostic_report(c: _Checker) -> None:
    r = c.r
    if c.require(r, "status"):
        c.code(r, "status", REPORT_STATUS)
    c.require(r, "code")


def _check_document_reference(c: _Checker) -> None:
    r = c.r
    if c.require(r, "status"):
        c.code(r, "status", DOCREF_STATUS)
    c.code(r, "docStatus", DOCREF_DOC_STATUS)
    if c.require(r, "content"):
        for i, content in c.items(r, "content"):
            c.require(content, "attachment", "content", i)
    for i, rel in c.items(r, "relatesTo"):
        if c.require(rel, "code", "relatesTo", i):
            c.code(rel, "code", DOCREF_RELATION, "relatesTo", i)
        c.require(rel, "target", "relatesTo", i)


def _check_consent(c: _Checker) -> None:
    r = c.r
    if c.require(r, "status"):
        c.code(r, "status", CONSENT_STATUS)
    c.require(r, "scope")
    c.require(r, "category")
    if not r.get("policy") and not r.get("policyRule"):
        c.add("invariant", "ppc-1: either a policy or a policyRule is required", c.path("policy"))
    if r.get("patient") is None:
        scopes = {
            code for system, code in codings(r.get("scope")) if system in (SYS_CONSENT_SCOPE, None)
        }
        for key, code in (
            ("ppc-2", "patient-privacy"),
            ("ppc-3", "research"),
            ("ppc-4", "adr"),
            ("ppc-5", "treatment"),
        ):
            if code in scopes:
                c.add(
                    "invariant",
                    f"{key}: a consent with scope {code} must name the patient",
                    c.path("patient"),
                )
    prov = r.get("provision")
    if isinstance(prov, dict):
        _check_provision(c, prov, ("provision",), 1)


def _check_provision(
    c: _Checker, prov: Mapping[str, Any], where: tuple[str | int, ...], depth: int
) -> None:
    if depth > 16:
        c.add("structure", "provisions nest too deeply", c.path(*where))
        return
    c.code(prov, "type", CONSENT_PROVISION_TYPE, *where)
    for i, actor in c.items(prov, "actor"):
        c.require(actor, "role", *where, "actor", i)
        c.require(actor, "reference", *where, "actor", i)
    for i, data in c.items(prov, "data"):
        if c.require(data, "meaning", *where, "data", i):
            c.code(data, "meaning", CONSENT_DATA_MEANING, *where, "data", i)
        c.require(data, "reference", *where, "data", i)
    for i, child in c.items(prov, "provision"):
        _check_provision(c, child, (*where, "provision", i), depth + 1)


def _check_audit_event(c: _Checker) -> None:
    r = c.r
    c.require(r, "type")
    c.require(r, "recorded")
    c.code(r, "action", AUDIT_ACTION)
    c.code(r, "outcome", AUDIT_OUTCOME)
    if c.require(r, "agent"):
        for i, agent in c.items(r, "agent"):
            c.require(agent, "requestor", "agent", i)
            net = agent.get("network")
            if isinstance(net, dict):
                c.code(net, "type", AUDIT_NETWORK_TYPE, "agent", i, "network")
    if c.require(r, "source"):
        source = r.get("source")
        if isinstance(source, dict):
            c.require(source, "observer", "source")
    for i, entity in c.items(r, "entity"):
        if entity.get("name") is not None and entity.get("query") is not None:
            c.add(
                "invariant",
                "sev-1: an entity has either a name or a query, not both",
                c.path("entity", i),
            )


_CHECKS: dict[str, Callable[[_Checker], None]] = {
    "Patient": _check_patient,
    "Observation": _check_observation,
    "Condition": _check_condition,
    "Encounter": _check_encounter,
    "Procedure": _check_procedure,
    "MedicationRequest": _check_medication_request,
    "AllergyIntolerance": _check_allergy,
    "Immunization": _check_immunization,
    "DiagnosticReport": _check_diagnostic_report,
    "DocumentReference": _check_document_reference,
    "Consent": _check_consent,
    "AuditEvent": _check_audit_event,
}


# --------------------------------------------------------------------------- entry points


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen: set[tuple[str, tuple[str, ...]]] = set()
    out: list[Issue] = []
    for issue in issues:
        key = (issue.code, issue.expression)
        if key not in seen:
            seen.add(key)
            out.append(issue)
    return out


def validate_element(cls: Any, data: Any, root: str) -> None:
    """Validate a non-resource element (e.g. a Bundle.entry) with its R4B model class.

    Expressions are rooted at ``root``; raises FhirError 400 (structure) or 422
    (a missing mandatory element).
    """
    shape: list[Issue] = []
    _shape_issues(data, root, shape)
    if shape:
        raise FhirError.from_issues(400, shape)
    try:
        cls.model_validate(data)
    except ValidationError as exc:
        bad, missing = _model_issues(root, exc)
        raise FhirError.from_issues(400 if bad else 422, bad + missing) from None


def validate_resource(resource: dict[str, Any], expected_type: str | None = None) -> None:
    """Check an already decoded resource; raises FhirError (400/422) or returns None."""
    if not isinstance(resource, dict):
        raise FhirError(400, "structure", "a FHIR resource must be a JSON object")
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise FhirError(400, "structure", "resourceType is missing", ["resourceType"])
    if expected_type is not None and rtype != expected_type:
        raise FhirError(
            400,
            "invalid",
            f"expected a {expected_type} resource but got {rtype}",
            ["resourceType"],
        )
    cls = model_class(rtype)
    if cls is None:
        raise FhirError(
            400, "not-supported", f"{rtype!r} is not a FHIR R4 resource type", ["resourceType"]
        )
    shape: list[Issue] = []
    _shape_issues(resource, rtype, shape)
    if shape:
        raise FhirError.from_issues(400, shape)
    missing: list[Issue] = []
    try:
        cls.model_validate(resource)
    except ValidationError as exc:
        bad, missing = _model_issues(rtype, exc)
        if bad:
            raise FhirError.from_issues(400, bad + missing) from None
    except (TypeError, ValueError) as exc:  # defensive: a model raising outside pydantic
        raise FhirError(400, "structure", f"invalid {rtype}: {exc}", [rtype]) from None
    check = _CHECKS.get(rtype)
    content: list[Issue] = []
    if check is not None:
        checker = _Checker(rtype, resource)
        check(checker)
        content = checker.issues
    issues = _dedupe(missing + content)
    if issues:
        raise FhirError.from_issues(422, issues)


def parse_resource(
    body: bytes | bytearray | memoryview | str | dict[str, Any],
    expected_type: str | None = None,
) -> dict[str, Any]:
    """Decode and validate one FHIR R4 resource; returns it as a JSON dict.

    ``expected_type`` (the type in the URL) must match ``resourceType``. Any R4
    type with an R4B model is accepted here (the importer stores Claim,
    ExplanationOfBenefit ...); whether an endpoint serves a type is the API's
    decision (see :data:`SUPPORTED_TYPES`). Raises :class:`FhirError` 400 or 422.
    """
    resource = body if isinstance(body, dict) else parse_json(body)
    if not isinstance(resource, dict):
        raise FhirError(400, "structure", "a FHIR resource must be a JSON object")
    validate_resource(resource, expected_type)
    return resource
