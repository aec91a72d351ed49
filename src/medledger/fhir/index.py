"""What a resource is indexed under, and FHIR search parameters.

:func:`extract` reads the few facts the record store indexes (the patient,
clinical codes, categories, one clinically relevant date, references); it
works on every resource type (Synthea also exports Claim,
ExplanationOfBenefit, CarePlan, Provenance ...): types without a specific
entry fall back to the usual element names (``subject``/``patient``,
``code``, ``category``, ``effective[x]``/``occurrence[x]``/``period``...).

Dates are ms since the epoch (UTC), at the *start* of a partial value
(``2020-05`` -> 2020-05-01T00:00:00Z); a period counts by its start.

:func:`parse_search` turns a FHIR query string into a :class:`SearchQuery`
that maps one to one onto ``RecordStore.search``; tokens for codes and
categories come from :meth:`Extracted.terms` (indexing) and
:meth:`SearchQuery.code_terms` / :meth:`SearchQuery.category_terms` (search),
which agree on one rule: a coding ``system|code`` is indexed as
``(kind, system, code)`` and as ``(kind, None, code)`` (so ``code=4548-4``
finds it in any system); a coding without a system also as ``(kind, "", code)``
(what ``code=|4548-4`` asks for).

A Patient has no clinical code; its business identifiers (``identifier``: an MRN,
a national number) are indexed the same way as its ``code`` terms, so that
``Patient?identifier=system|value`` (or just ``value``) finds the organisation's
own patient. Like every index term they are stored only as tokens keyed by the
custodian's index key (:func:`medledger.services.records.index_token`), never in
plain text, and they are not part of the code commitment on the ledger.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from medledger.contracts.records_v1 import PUBLIC_CATEGORIES
from medledger.fhir.dates import parse_range
from medledger.fhir.outcome import FhirError
from medledger.fhir.validate import KNOWN_TYPES, SUPPORTED_TYPES, codings, summary_elements

__all__ = [
    "DEFAULT_COUNT",
    "INDEX_VERSION",
    "MAX_COUNT",
    "RESULT_PARAMS",
    "SEARCH_PARAMS",
    "SUBSETTED",
    "Extracted",
    "SearchQuery",
    "extract",
    "inclusions",
    "iter_references",
    "parse_search",
    "reference_id",
    "search_links",
    "sort_keys",
]

#: The version of what :func:`extract` indexes a stored resource under. Raise it with
#: every change that gives an already stored resource other tokens: a node whose
#: record store was indexed under another version reindexes it when it starts
#: (:meth:`medledger.services.fhir.FhirService.upgrade_index`). History:
#: 1, codes, categories, references and dates; 2, also a Patient's identifiers.
INDEX_VERSION = 2

SYS_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
SYS_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
SYS_ALLERGY_CATEGORY = "http://hl7.org/fhir/allergy-intolerance-category"

#: diagnostic-service-section codes that have a public observation-category twin
_SECTION_TO_PUBLIC = {"LAB": "laboratory", "RAD": "imaging"}

# ----------------------------------------------------------------------------- references

_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def reference_id(reference: Any, resource_type: str = "Patient") -> str | None:
    """The logical id in a literal reference to ``resource_type``, else None.

    Accepts ``Patient/123``, ``Patient/123/_history/2`` and absolute
    ``https://host/fhir/Patient/123``; a Reference object (``{"reference": ...}``)
    too. ``urn:uuid:``, contained (``#x``) and conditional (``Patient?...``)
    references have no logical id yet and give None.
    """
    if isinstance(reference, dict):
        reference = reference.get("reference")
    if not isinstance(reference, str) or reference.startswith(("urn:", "#")):
        return None
    if "?" in reference:
        return None
    parts = reference.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or parts[-2] != resource_type:
        return None
    rid = parts[-1]
    return rid if _ID_RE.fullmatch(rid) else None


def iter_references(value: Any) -> Iterator[str]:
    """Every ``Reference.reference`` string anywhere in a resource, in document order."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            elif isinstance(item, dict | list):
                yield from iter_references(item)
    elif isinstance(value, list):
        for item in value:
            yield from iter_references(item)


# ----------------------------------------------------------------------------- extraction

#: elements naming the patient, in order of preference (default for other types)
_PATIENT_KEYS: dict[str, tuple[str, ...]] = {
    "Coverage": ("beneficiary", "subscriber"),
    "Provenance": ("target",),
    "Appointment": ("participant.actor",),
    "Group": (),
    "Person": (),
    "Practitioner": (),
    "PractitionerRole": (),
    "Organization": (),
    "Location": (),
}
_DEFAULT_PATIENT_KEYS = ("subject", "patient", "beneficiary")

#: elements holding the code a resource is searched by with ``code``
_CODE_KEYS: dict[str, tuple[str, ...]] = {
    "Observation": ("code",),
    "Condition": ("code",),
    "Procedure": ("code",),
    "DiagnosticReport": ("code",),
    "AllergyIntolerance": ("code",),
    "MedicationRequest": ("medicationCodeableConcept",),
    "MedicationAdministration": ("medicationCodeableConcept",),
    "MedicationDispense": ("medicationCodeableConcept",),
    "MedicationStatement": ("medicationCodeableConcept",),
    "Immunization": ("vaccineCode",),
    "Encounter": ("type",),
    "DocumentReference": ("type",),
    "Consent": (),
    "AuditEvent": ("type", "subtype"),
    "Patient": (),
    "Claim": ("type",),
    "ExplanationOfBenefit": ("type",),
    "Goal": ("description",),
    "ImagingStudy": ("procedureCode",),
    "Device": ("type",),
    "Provenance": ("activity",),
    "Coverage": ("type",),
    "Specimen": ("type",),
    "CarePlan": (),
    "CareTeam": (),
}
_DEFAULT_CODE_KEYS = ("code",)

#: elements holding categories (CodeableConcepts, Codings or plain codes)
_CATEGORY_KEYS: dict[str, tuple[str, ...]] = {
    "Encounter": ("class",),
    "Immunization": (),
    "Patient": (),
    "AuditEvent": (),
    "ImagingStudy": ("modality",),
}
_DEFAULT_CATEGORY_KEYS = ("category",)

#: the clinically relevant date, first present wins; choice names without [x]
_DATE_KEYS: dict[str, tuple[str, ...]] = {
    "Observation": ("effective", "issued"),
    "DiagnosticReport": ("effective", "issued"),
    "Condition": ("onset", "recordedDate"),
    "Encounter": ("period",),
    "Procedure": ("performed",),
    "MedicationRequest": ("authoredOn",),
    "AllergyIntolerance": ("recordedDate", "onset"),
    "Immunization": ("occurrence", "recorded"),
    "DocumentReference": ("date", "context.period"),
    "Consent": ("dateTime", "provision.period"),
    "AuditEvent": ("recorded", "period"),
    "Patient": ("birthDate",),
    "Claim": ("billablePeriod", "created"),
    "ExplanationOfBenefit": ("billablePeriod", "created"),
    "CarePlan": ("period", "created"),
    "Goal": ("start", "statusDate"),
    "ImagingStudy": ("started",),
    "Provenance": ("occurred", "recorded"),
    "MedicationAdministration": ("effective",),
    "MedicationDispense": ("whenHandedOver", "whenPrepared"),
    "MedicationStatement": ("effective", "dateAsserted"),
    "ServiceRequest": ("occurrence", "authoredOn"),
    "Device": (),
    "Practitioner": (),
    "PractitionerRole": (),
    "Organization": (),
    "Location": (),
}
_DEFAULT_DATE_KEYS = (
    "effective",
    "occurrence",
    "performed",
    "onset",
    "period",
    "date",
    "recorded",
    "authoredOn",
    "created",
    "issued",
)
_CHOICE_SUFFIXES = ("DateTime", "Instant", "Date", "Period", "Timing")


@dataclass(frozen=True, slots=True)
class Extracted:
    """The indexable facts of one resource (no free text, no names)."""

    patient: str | None
    codes: list[tuple[str | None, str]]
    categories: list[tuple[str | None, str]]
    public_category: str | None
    date: int | None
    references: list[str]
    resource_type: str = ""
    id: str | None = None
    last_updated: int | None = None
    #: a Patient's business identifiers ``(system, value)``: searched, never committed
    identifiers: list[tuple[str | None, str]] = field(default_factory=list)

    def code_strings(self) -> list[str]:
        """Codes as ``system|code`` (``|code`` without a system), e.g. for code commitments."""
        return [f"{s or ''}|{c}" for s, c in self.codes]

    def terms(self) -> list[tuple[str, str | None, str]]:
        """``(kind, system, value)`` index terms: kind ``code`` or ``category`` (see module doc)."""
        out: list[tuple[str, str | None, str]] = []
        for kind, pairs in (
            ("code", [*self.codes, *self.identifiers]),
            ("category", self.categories),
        ):
            for system, value in pairs:
                out.append((kind, system or "", value))
                out.append((kind, None, value))
        return list(dict.fromkeys(out))


def _get_path(obj: Any, path: str) -> list[Any]:
    """Values at a dotted path (lists are flattened)."""
    values = [obj]
    for part in path.split("."):
        nxt: list[Any] = []
        for v in values:
            if isinstance(v, dict) and part in v:
                item = v[part]
                nxt.extend(item if isinstance(item, list) else [item])
        values = nxt
    return values


def _patient_of(rtype: str, res: Mapping[str, Any]) -> str | None:
    if rtype == "Patient":
        rid = res.get("id")
        return rid if isinstance(rid, str) else None
    if rtype == "AuditEvent":
        for what in _get_path(res, "entity.what"):
            pid = reference_id(what)
            if pid:
                return pid
        for who in _get_path(res, "agent.who"):
            pid = reference_id(who)
            if pid:
                return pid
        return None
    for key in _PATIENT_KEYS.get(rtype, _DEFAULT_PATIENT_KEYS):
        for ref in _get_path(res, key):
            pid = reference_id(ref)
            if pid:
                return pid
    return None


def _codes_at(
    res: Mapping[str, Any], keys: Iterable[str], implicit: str | None = None
) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for key in keys:
        for value in _get_path(res, key):
            if isinstance(value, str):  # primitive code (AllergyIntolerance.category)
                out.append((implicit, value))
            else:
                out.extend(codings(value))
    return list(dict.fromkeys(out))


def _date_of(value: Any) -> int | None:
    if isinstance(value, str):
        try:
            return parse_range(value).start
        except ValueError:
            return None
    if isinstance(value, dict):
        for key in ("start", "end"):  # Period
            if isinstance(value.get(key), str):
                return _date_of(value[key])
        events = value.get("event")  # Timing
        if isinstance(events, list) and events:
            return _date_of(events[0])
    return None


def _clinical_date(rtype: str, res: Mapping[str, Any]) -> int | None:
    for key in _DATE_KEYS.get(rtype, _DEFAULT_DATE_KEYS):
        head, _, rest = key.partition(".")
        candidates = (
            [head] if head in res else [head + s for s in _CHOICE_SUFFIXES if head + s in res]
        )
        for name in candidates:
            for value in _get_path(res, name + ("." + rest if rest else "")):
                ms = _date_of(value)
                if ms is not None:
                    return ms
    return None


def _public_category(categories: Sequence[tuple[str | None, str]]) -> str | None:
    for system, code in categories:
        if system in (SYS_OBS_CATEGORY, None, "") and code in PUBLIC_CATEGORIES:
            return code
        if system == SYS_V2_0074 and code in _SECTION_TO_PUBLIC:
            return _SECTION_TO_PUBLIC[code]
    return None


def extract(resource: Mapping[str, Any]) -> Extracted:
    """The index facts of a (validated) resource of any type."""
    rtype = str(resource.get("resourceType") or "")
    implicit = SYS_ALLERGY_CATEGORY if rtype == "AllergyIntolerance" else None
    codes = _codes_at(resource, _CODE_KEYS.get(rtype, _DEFAULT_CODE_KEYS))
    categories = _codes_at(resource, _CATEGORY_KEYS.get(rtype, _DEFAULT_CATEGORY_KEYS), implicit)
    meta = resource.get("meta")
    updated = None
    if isinstance(meta, dict) and isinstance(meta.get("lastUpdated"), str):
        updated = _date_of(meta["lastUpdated"])
    rid = resource.get("id")
    identifiers: list[tuple[str | None, str]] = []
    if rtype == "Patient":
        for ident in resource.get("identifier") or []:
            if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"]:
                system = ident.get("system")
                identifiers.append((system if isinstance(system, str) else None, ident["value"]))
    return Extracted(
        patient=_patient_of(rtype, resource),
        codes=codes,
        categories=categories,
        public_category=_public_category(categories),
        date=_clinical_date(rtype, resource),
        references=list(dict.fromkeys(iter_references(resource))),
        resource_type=rtype,
        id=rid if isinstance(rid, str) else None,
        last_updated=updated,
        identifiers=list(dict.fromkeys(identifiers)),
    )


# ----------------------------------------------------------------------------- search

DEFAULT_COUNT = 50
MAX_COUNT = 100

_COMMON_PARAMS: dict[str, tuple[str, str]] = {
    "_id": ("token", "Logical id of the resource (comma separated: any of)"),
    "_lastUpdated": (
        "date",
        "When the current version was written (prefixes eq/gt/ge/lt/le/sa/eb)",
    ),
}
_PATIENT_PARAMS: dict[str, tuple[str, str]] = {
    "patient": ("reference", "The patient the resource is about (Patient/<id> or <id>)"),
    "subject": ("reference", "Same as patient (only Patient subjects are indexed)"),
}


def _code_doc(rtype: str) -> str:
    keys = _CODE_KEYS.get(rtype, _DEFAULT_CODE_KEYS)
    return f"{rtype}.{' | '.join(keys)} as system|code or code (comma separated: any of)"


def _category_doc(rtype: str) -> str:
    keys = _CATEGORY_KEYS.get(rtype, _DEFAULT_CATEGORY_KEYS)
    return f"{rtype}.{' | '.join(keys)} as system|code or code (comma separated: any of)"


def _date_doc(rtype: str) -> str:
    keys = _DATE_KEYS.get(rtype, _DEFAULT_DATE_KEYS)
    return (
        f"Clinically relevant date: first of {rtype}.{' | '.join(k + '[x]' for k in keys)} "
        "(a period counts by its start); prefixes eq/gt/ge/lt/le/sa/eb, partial dates allowed"
    )


def _build_params() -> dict[str, dict[str, tuple[str, str, str]]]:
    """type -> {name: (FHIR param type, field of SearchQuery, documentation)}."""
    out: dict[str, dict[str, tuple[str, str, str]]] = {}
    code_names: dict[str, tuple[str, ...]] = {
        "Immunization": ("vaccine-code", "code"),
        "Encounter": ("type", "code"),
        "DocumentReference": ("type", "code"),
        "AuditEvent": ("type", "code"),
    }
    category_names: dict[str, tuple[str, ...]] = {"Encounter": ("class", "category")}
    date_names: dict[str, tuple[str, ...]] = {
        "Patient": ("birthdate",),
        "MedicationRequest": ("authoredon", "date"),
        "Condition": ("onset-date", "date"),
    }
    for rtype in sorted(SUPPORTED_TYPES):
        params: dict[str, tuple[str, str, str]] = {
            name: (kind, name, doc) for name, (kind, doc) in _COMMON_PARAMS.items()
        }
        if rtype != "Patient":
            for name, (kind, doc) in _PATIENT_PARAMS.items():
                params[name] = (kind, "patient", doc)
        if _CODE_KEYS.get(rtype, _DEFAULT_CODE_KEYS):
            for name in code_names.get(rtype, ("code",)):
                params[name] = ("token", "code", _code_doc(rtype))
        if rtype == "Patient":
            params["identifier"] = (
                "token",
                "code",
                "Patient.identifier as system|value or value (comma separated: any of)",
            )
        if _CATEGORY_KEYS.get(rtype, _DEFAULT_CATEGORY_KEYS):
            for name in category_names.get(rtype, ("category",)):
                params[name] = ("token", "category", _category_doc(rtype))
        for name in date_names.get(rtype, ("date",)):
            params[name] = ("date", "date", _date_doc(rtype))
        out[rtype] = params
    return out


#: Search parameters per supported type: name -> (FHIR type, what it maps to, documentation).
#: ``_count``, ``_offset``, ``_sort`` (``_lastUpdated`` or the type's clinical date, ``-`` for
#: newest first), ``_total``, ``_format``, ``_pretty`` and ``_elements`` are accepted
#: everywhere as result parameters.
SEARCH_PARAMS: dict[str, dict[str, tuple[str, str, str]]] = _build_params()

#: The result parameters (they shape the answer, they do not filter).
RESULT_PARAMS = frozenset(
    {"_count", "_offset", "_sort", "_total", "_format", "_pretty", "_elements", "_summary"}
)
#: the types searched on their own (consents on the ledger, the access log), not by the
#: record index: ``_include`` and ``_revinclude`` never add them
_SEARCHED_APART = frozenset({"Consent", "AuditEvent"})
#: ``_summary`` values (FHIR search 3.1.1.5.8)
SUMMARY_VALUES = ("true", "text", "data", "count", "false")
_ELEMENT_RE = re.compile(r"[a-z][A-Za-z0-9]{0,63}")
#: the tag a resource trimmed by ``_elements`` carries (FHIR search 3.1.1.5.10)
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}
_DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A parsed FHIR search; the filters are ANDed, values inside one filter ORed."""

    resource_type: str | None
    ids: tuple[str, ...] = ()
    patient: str | None = None
    codes: tuple[tuple[str | None, str], ...] = ()
    categories: tuple[tuple[str | None, str], ...] = ()
    date_ge: int | None = None
    date_lt: int | None = None
    updated_ge: int | None = None
    updated_lt: int | None = None
    count: int = DEFAULT_COUNT
    offset: int = 0
    params: tuple[tuple[str, str], ...] = ()  # the filter parameters as given (for links)
    ignored: tuple[str, ...] = field(default=())  # names ignored under handling=lenient
    elements: tuple[str, ...] = ()  # _elements: the top-level elements to return (all: empty)
    sort: str = ""  # _sort as given (empty: the natural order, newest _lastUpdated first)
    summary: str = ""  # _summary (SUMMARY_VALUES; empty: whole resources)
    include: tuple[str, ...] = ()  # _include values as given (all name the Patient)
    revinclude: tuple[str, ...] = ()  # _revinclude values as given (Patient searches)
    order: str = "-updated"  # the order of the results: -updated, updated, -date or date

    @property
    def impossible(self) -> bool:
        """True when the date filters cannot match anything (e.g. ge2021&lt2020)."""
        return (
            self.date_ge is not None and self.date_lt is not None and self.date_ge >= self.date_lt
        ) or (
            self.updated_ge is not None
            and self.updated_lt is not None
            and self.updated_ge >= self.updated_lt
        )

    def code_terms(self) -> list[tuple[str, str | None, str]]:
        """Index terms any of which a result must carry (empty: no code filter)."""
        return [("code", s, c) for s, c in self.codes]

    def category_terms(self) -> list[tuple[str, str | None, str]]:
        return [("category", s, c) for s, c in self.categories]

    def link_params(
        self, *, offset: int | None = None, count: int | None = None
    ) -> list[tuple[str, str]]:
        """The query string of this search (for Bundle.link), at another page if asked."""
        return [
            *self.params,
            *([("_elements", ",".join(self.elements))] if self.elements else []),
            *([("_sort", self.sort)] if self.sort else []),
            *([("_summary", self.summary)] if self.summary else []),
            *(("_include", v) for v in self.include),
            *(("_revinclude", v) for v in self.revinclude),
            ("_count", str(self.count if count is None else count)),
            ("_offset", str(self.offset if offset is None else offset)),
        ]

    @property
    def included_types(self) -> tuple[str, ...]:
        """The resource types ``_include`` (the Patient) and ``_revinclude`` ask for, each
        once, in the order given."""
        types = (["Patient"] if self.include else []) + [
            v.split(":", 1)[0] for v in self.revinclude
        ]
        return tuple(dict.fromkeys(types))

    def subset(self, resource: dict[str, Any]) -> dict[str, Any]:
        """``resource`` with only the ``_elements`` asked for (a choice element such as
        ``value`` keeps ``valueQuantity``), its id and meta, tagged SUBSETTED; or the part
        ``_summary`` asks for: ``true`` the summary elements, ``text`` the narrative and the
        required elements, ``data`` all but the narrative (top-level elements, as the
        specification of the type marks them)."""
        if self.summary in ("true", "text"):
            summary, required = summary_elements(str(resource.get("resourceType")))
            keep = summary if self.summary == "true" else required | {"text"}
            out = {
                k: v
                for k, v in resource.items()
                if k in ("resourceType", "id") or k.removeprefix("_") in keep  # _x: x's extensions
            }
        elif self.summary == "data":
            out = {k: v for k, v in resource.items() if k != "text"}
        elif self.elements:

            def wanted(key: str) -> bool:
                key = key.removeprefix("_")  # _x: the extensions of primitive element x
                return any(
                    key == name
                    or (key.startswith(name) and key[len(name) : len(name) + 1].isupper())
                    for name in self.elements
                )

            out = {k: v for k, v in resource.items() if k in ("resourceType", "id") or wanted(k)}
        else:
            return resource
        meta = dict(resource.get("meta") or {})
        meta["tag"] = [*(meta.get("tag") or []), dict(SUBSETTED)]
        out["meta"] = meta
        return out


def _split(value: str, sep: str) -> list[str]:
    """Split on ``sep`` honouring FHIR search escapes (``\\,`` ``\\|`` ``\\$`` ``\\\\``)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append("\\" + value[i + 1])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def _bad(name: str, msg: str, code: str = "invalid") -> FhirError:
    return FhirError(400, code, f"search parameter {name}: {msg}", [name])


def _tokens(name: str, value: str) -> tuple[tuple[str | None, str], ...]:
    out: list[tuple[str | None, str]] = []
    for item in _split(value, ","):
        parts = _split(item, "|")
        if len(parts) == 1:
            system, code = None, _unescape(parts[0])
        elif len(parts) == 2:
            system, code = _unescape(parts[0]), _unescape(parts[1])
        else:
            raise _bad(name, f"{item!r} is not [system|]code", "value")
        if not code:
            raise _bad(
                name, "searching a whole code system (system|) is not supported", "not-supported"
            )
        out.append((system, code))
    return tuple(dict.fromkeys(out))


def _patient_value(name: str, value: str) -> str:
    if "," in value:
        raise _bad(name, "only one patient can be searched at a time", "not-supported")
    if "/" in value:
        pid = reference_id(value)
        if pid is None:
            raise _bad(name, f"{value!r} is not a Patient reference", "value")
        return pid
    if not _ID_RE.fullmatch(value):
        raise _bad(name, f"{value!r} is not a valid id", "value")
    return value


def _date_bounds(name: str, value: str) -> tuple[int | None, int | None]:
    prefix = value[:2] if value[:2] in _DATE_PREFIXES else "eq"
    raw = value[2:] if value[:2] in _DATE_PREFIXES else value
    if "," in raw:
        raise _bad(
            name,
            "several dates (OR) are not supported; repeat the parameter for AND",
            "not-supported",
        )
    try:
        rng = parse_range(raw, lenient_time=True)
    except ValueError as exc:
        raise _bad(name, str(exc), "value") from None
    if prefix == "eq":
        return rng.start, rng.end
    if prefix in ("gt", "sa"):
        return rng.end, None
    if prefix == "ge":
        return rng.start, None
    if prefix in ("lt", "eb"):
        return None, rng.start
    if prefix == "le":
        return None, rng.end
    raise _bad(name, f"prefix {prefix!r} is not supported", "not-supported")


def _int_param(name: str, value: str) -> int:
    if not value.isdigit() or len(value) > 9:
        raise _bad(name, f"{value!r} is not a non-negative integer", "value")
    return int(value)


def _tighten(
    lo: int | None, hi: int | None, new: tuple[int | None, int | None]
) -> tuple[int | None, int | None]:
    nlo, nhi = new
    if nlo is not None:
        lo = nlo if lo is None else max(lo, nlo)
    if nhi is not None:
        hi = nhi if hi is None else min(hi, nhi)
    return lo, hi


def parse_search(
    resource_type: str | None,
    query: Iterable[tuple[str, str]] | Mapping[str, str],
    *,
    lenient: bool = False,
) -> SearchQuery:
    """Parse a search on ``resource_type`` (None: across types) into a :class:`SearchQuery`.

    Unknown or unsupported parameters and modifiers are a FhirError(400)
    unless ``lenient`` (``Prefer: handling=lenient``), in which case they are
    ignored and listed in ``SearchQuery.ignored``. Bad values are always 400.
    Empty values are ignored, as FHIR asks.
    """
    if resource_type is not None and resource_type not in KNOWN_TYPES:
        raise FhirError(400, "not-supported", f"unknown resource type {resource_type!r}")
    pairs = list(query.items()) if isinstance(query, Mapping) else list(query)
    allowed = (
        SEARCH_PARAMS.get(resource_type)
        if resource_type is not None
        else {
            **{k: (v[0], k, v[1]) for k, v in _COMMON_PARAMS.items()},
            **{k: (v[0], "patient", v[1]) for k, v in _PATIENT_PARAMS.items()},
        }
    )
    if allowed is None:  # a known type the API does not serve: the common parameters only
        allowed = {k: (v[0], k, v[1]) for k, v in _COMMON_PARAMS.items()}

    ids: tuple[str, ...] = ()
    patient: str | None = None
    codes: tuple[tuple[str | None, str], ...] = ()
    categories: tuple[tuple[str | None, str], ...] = ()
    date_ge = date_lt = updated_ge = updated_lt = None
    count, offset = DEFAULT_COUNT, 0
    elements: tuple[str, ...] = ()
    sort, order = "", "-updated"
    summary = ""
    include: list[str] = []
    revinclude: list[str] = []
    kept: list[tuple[str, str]] = []
    ignored: list[str] = []
    seen: set[str] = set()

    def reject(name: str, msg: str) -> None:
        if lenient:
            ignored.append(name)
        else:
            raise _bad(name, msg, "not-supported")

    for raw_name, value in pairs:
        if not isinstance(raw_name, str) or not isinstance(value, str):
            raise FhirError(400, "invalid", "search parameters must be strings")
        if value == "":
            continue
        name, _, modifier = raw_name.partition(":")
        if name in ("_include", "_revinclude"):
            if modifier:
                reject(raw_name, f"modifier :{modifier} is not supported (no iteration)")
                continue
            problem = _inclusion_problem(name, resource_type, value)
            if problem:
                reject(name, problem)
                continue
            (include if name == "_include" else revinclude).append(value)
            continue
        if name in RESULT_PARAMS:
            if modifier:
                reject(raw_name, "modifiers are not supported on result parameters")
                continue
            if name in seen:
                raise _bad(name, "given more than once")
            seen.add(name)
            if name == "_count":
                count = min(_int_param(name, value), MAX_COUNT)
            elif name == "_offset":
                offset = _int_param(name, value)
            elif name == "_elements":
                names = [v.strip() for v in value.split(",")]
                bad = [v for v in names if not _ELEMENT_RE.fullmatch(v)]
                if bad:
                    raise _bad(name, f"{bad[0]!r} is not an element name", "value")
                elements = tuple(dict.fromkeys(names))
            elif name == "_sort":
                key = _sort_order(allowed, value)
                if key is None:
                    keys = ", ".join(f"{k}, -{k}" for k in sort_keys(allowed))
                    reject(name, f"sorts by one of {keys} (one key)")
                else:
                    sort, order = value, key
            elif name == "_summary":
                if value not in SUMMARY_VALUES:
                    raise _bad(name, f"{value!r} is not {'|'.join(SUMMARY_VALUES)}", "value")
                summary = "" if value == "false" else value
            elif name == "_total":
                if value not in ("none", "estimate", "accurate"):
                    raise _bad(name, f"{value!r} is not none|estimate|accurate", "value")
            elif name == "_format":
                if "json" not in value:
                    reject(name, "only JSON is supported")
            continue
        spec = allowed.get(name)
        if spec is None:
            reject(raw_name, f"not supported for {resource_type or 'system'} searches")
            continue
        kind, target, _doc = spec
        if modifier and not (kind == "reference" and modifier == "Patient"):
            reject(raw_name, f"modifier :{modifier} is not supported")
            continue
        if target in ("code", "category", "_id", "patient") and target in seen:
            raise _bad(name, "may be given only once (use commas to OR values)", "not-supported")
        if target in ("code", "category", "_id", "patient"):
            seen.add(target)
        if target == "_id":
            values = [_unescape(v) for v in _split(value, ",")]
            for v in values:
                if not _ID_RE.fullmatch(v):
                    raise _bad(name, f"{v!r} is not a valid id", "value")
            ids = tuple(dict.fromkeys(values))
        elif target == "patient":
            patient = _patient_value(raw_name, value)
        elif target == "code":
            codes = _tokens(name, value)
        elif target == "category":
            categories = _tokens(name, value)
        elif target == "date":
            date_ge, date_lt = _tighten(date_ge, date_lt, _date_bounds(name, value))
        elif target == "_lastUpdated":
            updated_ge, updated_lt = _tighten(updated_ge, updated_lt, _date_bounds(name, value))
        kept.append((raw_name, value))
    if summary and elements:
        raise _bad("_summary", "cannot be combined with _elements", "not-supported")
    if summary == "count":
        count = 0  # the total only: one logged decision, no record read
    return SearchQuery(
        resource_type=resource_type,
        ids=ids,
        patient=patient,
        codes=codes,
        categories=categories,
        date_ge=date_ge,
        date_lt=date_lt,
        updated_ge=updated_ge,
        updated_lt=updated_lt,
        count=count,
        offset=offset,
        params=tuple(kept),
        ignored=tuple(ignored),
        elements=elements,
        sort=sort,
        order=order,
        summary=summary,
        include=tuple(dict.fromkeys(include)),
        revinclude=tuple(dict.fromkeys(revinclude)),
    )


def _inclusion_problem(name: str, resource_type: str | None, value: str) -> str | None:
    """Why an ``_include`` or ``_revinclude`` value is not supported (None if it is).

    Supported: ``_include=<type>:patient`` (or ``:subject``, with or without the target
    ``:Patient``), the Patient the results are about; and on Patient searches
    ``_revinclude=<type>:patient`` (or ``:subject``), that patient's records of the type.
    Consents and audit events are searched on their own, never included.
    """
    parts = value.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "Patient"):
        return "takes <type>:<parameter>[:Patient]"
    source, param = parts[0], parts[1]
    if param not in _PATIENT_PARAMS:
        return "includes follow patient (or subject) only"
    if name == "_include":
        if source != resource_type or resource_type == "Patient":
            return f"includes the Patient of a search of a type other than Patient ({value!r})"
    elif resource_type != "Patient":
        return "is supported on Patient searches"
    elif source == "Patient" or param not in SEARCH_PARAMS.get(source, {}):
        return f"{source} has no search parameter {param!r}"
    if source in _SEARCHED_APART:
        return f"{source} resources are searched on their own ({source}?patient=), not included"
    return None


def inclusions(resource_type: str) -> tuple[list[str], list[str]]:
    """The ``_include`` and the ``_revinclude`` values :func:`parse_search` accepts in a
    search of ``resource_type`` (without the optional ``:Patient``): what the
    CapabilityStatement advertises."""
    include = [
        f"{resource_type}:{p}"
        for p in _PATIENT_PARAMS
        if _inclusion_problem("_include", resource_type, f"{resource_type}:{p}") is None
    ]
    revinclude = [
        f"{t}:{p}"
        for t in sorted(SEARCH_PARAMS)
        for p in _PATIENT_PARAMS
        if _inclusion_problem("_revinclude", resource_type, f"{t}:{p}") is None
    ]
    return include, revinclude


def sort_keys(params: Mapping[str, tuple[str, str, str]]) -> list[str]:
    """What ``_sort`` takes (each also with ``-``) in a search with parameters ``params``
    (e.g. ``SEARCH_PARAMS[type]``): ``_lastUpdated``, then the clinical date parameters."""
    return ["_lastUpdated", *(n for n, spec in params.items() if spec[:2] == ("date", "date"))]


def _sort_order(allowed: Mapping[str, tuple[str, str, str]], value: str) -> str | None:
    """The store order (``-updated``, ``updated``, ``-date``, ``date``) of a ``_sort``
    value (one of :func:`sort_keys`, ``-`` for descending); None if it is none of those
    (or several keys)."""
    name = value.removeprefix("-")
    if name not in sort_keys(allowed):
        return None
    return ("-" if value.startswith("-") else "") + (
        "updated" if name == "_lastUpdated" else "date"
    )


def search_links(
    base_url: str, query: SearchQuery, total: int | None, *, path: str | None = None
) -> dict[str, str]:
    """Bundle.link relations (self, first, previous, next, last) for one page of a search.

    ``path`` defaults to the resource type (``Observation``); pass e.g.
    ``Patient/123/$everything`` for operations.
    """
    where = path if path is not None else (query.resource_type or "")
    url = f"{base_url.rstrip('/')}/{where}".rstrip("/")

    def page(offset: int) -> str:
        return f"{url}?{urlencode(query.link_params(offset=offset))}"

    links = {"self": page(query.offset)}
    size = query.count
    if size <= 0:
        return links
    links["first"] = page(0)
    if query.offset > 0:
        links["previous"] = page(max(0, query.offset - size))
    if total is not None and query.offset + size < total:
        links["next"] = page(query.offset + size)
    if total is not None and total > 0:
        links["last"] = page(((total - 1) // size) * size)
    return links
