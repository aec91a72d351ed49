"""Bundles: planning transactions and batches, and building response bundles.

:func:`plan_transaction` checks a ``transaction`` or ``batch`` Bundle and
turns it into :class:`Entry` plans the API executes; it validates every
resource (:func:`~medledger.fhir.validate.parse_resource`), assigns ids to
creates and, for a transaction, rewrites every reference to an entry's
``fullUrl`` (``urn:uuid:...``, ``urn:oid:...`` or an absolute URL) into the
``Type/id`` the entry will have. It is pure: nothing is written.

Transactions are all or nothing, so any problem raises a :class:`FhirError`
naming the entry (``Bundle.entry[3].resource.status``). In a batch each entry
stands alone: an invalid entry gets ``Entry.error`` and the others still run;
batch entries must not depend on each other, so their references are left as
they are (FHIR: no interdependencies in a batch).

FHIR processes a transaction's entries in the order DELETE, POST, PUT/PATCH,
GET/HEAD (:func:`processing_order`), while the response lists them in request
order; :func:`transaction_response` and :func:`batch_response` take results
in request order.

Not supported (400 ``not-supported``): PATCH, conditional update/delete
(``PUT Type?...``), and resolving conditional references (``Patient?identifier=``)
inside resources (they are left untouched). ``ifNoneExist`` / ``ifMatch`` /
``ifNoneMatch`` / ``ifModifiedSince`` are passed through on the Entry.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from medledger.fhir.dates import format_instant
from medledger.fhir.outcome import FhirError, operation_outcome, status_line
from medledger.fhir.validate import (
    is_known_type,
    parse_json,
    parse_resource,
    validate_element,
)

__all__ = [
    "Entry",
    "EntryResult",
    "SearchEntry",
    "VersionLike",
    "batch_response",
    "etag",
    "history_bundle",
    "location",
    "parse_request_url",
    "plan_transaction",
    "processing_order",
    "rewrite_references",
    "searchset",
    "transaction_response",
]

IdFactory = Callable[[str, str | None, dict[str, Any]], str]
"""``(resource_type, full_url, resource) -> new logical id`` for a POSTed entry."""


def _uuid_id(resource_type: str, full_url: str | None, resource: dict[str, Any]) -> str:
    return str(uuid.uuid4())


# ----------------------------------------------------------------------------- planning


@dataclass(slots=True)
class Entry:
    """One planned entry of a transaction/batch (in request order: ``index``)."""

    index: int
    method: str  # "GET" | "POST" | "PUT" | "DELETE" | "HEAD"
    url: str  # as given in request.url
    #: create | update | delete | read | vread | search-type | history-instance |
    #: history-type | operation
    interaction: str
    resource_type: str
    id: str | None = None  # target id (POST: the new id)
    version: int | None = None  # vread
    resource: dict[str, Any] | None = None  # validated, references rewritten, id set
    full_url: str | None = None
    query: list[tuple[str, str]] = field(default_factory=list)  # GET search / operation params
    operation: str | None = None  # "$everything" ...
    if_match: str | None = None
    if_none_match: str | None = None
    if_none_exist: str | None = None
    if_modified_since: str | None = None
    error: FhirError | None = None  # batch only: this entry cannot run
    matched: bool = False  # a conditional create whose criteria found ``id``: nothing to write

    @property
    def reference(self) -> str | None:
        """``Type/id`` of the target, when known."""
        return f"{self.resource_type}/{self.id}" if self.id else None


def parse_request_url(url: str) -> tuple[str, str | None, str | None, list[tuple[str, str]]]:
    """Split a FHIR request URL into (resource type, id, rest of the path, query).

    ``Observation/1/_history/2?x=y`` -> ``("Observation", "1", "_history/2", [("x", "y")])``.
    Absolute URLs are cut at the first path segment naming a resource type.
    Raises FhirError(400) for anything else.
    """
    if not isinstance(url, str) or not url.strip():
        raise FhirError(400, "invalid", "request.url is required")
    parts = urlsplit(url.strip())
    segments = [s for s in parts.path.split("/") if s]
    if parts.scheme or url.startswith("/"):
        for i, seg in enumerate(segments):
            if is_known_type(seg):
                segments = segments[i:]
                break
        else:
            raise FhirError(400, "invalid", f"no resource type in request URL {url!r}")
    if not segments or not is_known_type(segments[0]):
        first = segments[0] if segments else ""
        raise FhirError(400, "not-supported", f"{first!r} is not a FHIR R4 resource type")
    query = parse_qsl(parts.query, keep_blank_values=True)
    rtype = segments[0]
    rid = segments[1] if len(segments) > 1 else None
    rest = "/".join(segments[2:]) or None
    return rtype, rid, rest, query


def _req_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _plan_entry(index: int, raw: Any, new_id: IdFactory) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise FhirError(400, "structure", "a bundle entry must be an object", [where])
    _check_entry_shell(index, raw)
    request = raw.get("request")
    if not isinstance(request, dict):
        raise FhirError(400, "required", "entry.request is required", [f"{where}.request"])
    method = request.get("method")
    if method not in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"):
        raise FhirError(
            400, "value", f"request.method {method!r} is not valid", [f"{where}.request.method"]
        )
    if method == "PATCH":
        raise FhirError(400, "not-supported", "PATCH is not supported", [f"{where}.request.method"])
    url = request.get("url")
    try:
        rtype, rid, rest, query = parse_request_url(url if isinstance(url, str) else "")
    except FhirError as exc:
        raise FhirError(exc.status, exc.code, exc.diagnostics, [f"{where}.request.url"]) from None
    full_url = _req_str(raw, "fullUrl")
    entry = Entry(
        index=index,
        method=method,
        url=str(url),
        interaction="",
        resource_type=rtype,
        id=rid,
        full_url=full_url,
        query=query,
        if_match=_req_str(request, "ifMatch"),
        if_none_match=_req_str(request, "ifNoneMatch"),
        if_none_exist=_req_str(request, "ifNoneExist"),
        if_modified_since=_req_str(request, "ifModifiedSince"),
    )
    resource = raw.get("resource")
    url_where = [f"{where}.request.url"]
    if method in ("POST", "PUT"):
        if resource is None:
            raise FhirError(400, "required", f"a {method} entry needs a resource", [where])
        try:
            checked = parse_resource(resource, rtype)
        except FhirError as exc:
            raise exc.prefixed(rtype, f"{where}.resource").prefixed(
                "resourceType", f"{where}.resource.resourceType"
            ) from None
        resource = copy.deepcopy(checked)
        if method == "POST":
            if rid is not None or query:
                raise FhirError(400, "invalid", "POST url must be the resource type", url_where)
            entry.interaction = "create"
            entry.id = new_id(rtype, full_url, resource)
            resource["id"] = entry.id
        else:
            if query or rid is None:
                raise FhirError(
                    400, "not-supported", "conditional update is not supported", url_where
                )
            if rest is not None:
                raise FhirError(400, "invalid", "PUT url must be Type/id", url_where)
            if resource.get("id") != rid:
                raise FhirError(
                    400,
                    "invalid",
                    f"resource.id must equal the id in the URL ({rid})",
                    [f"{where}.resource.id"],
                )
            entry.interaction = "update"
        entry.resource = resource
        return entry
    if resource is not None:
        raise FhirError(400, "invalid", f"a {method} entry has no resource", [f"{where}.resource"])
    if method == "DELETE":
        if rid is None or query or rest is not None:
            raise FhirError(400, "not-supported", "only DELETE Type/id is supported", url_where)
        entry.interaction = "delete"
        return entry
    # GET / HEAD
    if rid is None:
        entry.interaction = "search-type"
    elif rid == "_history":
        entry.id = None
        entry.interaction = "history-type"
        if rest is not None:
            raise FhirError(400, "invalid", f"cannot read {url!r}", url_where)
    elif rid.startswith("$"):
        entry.id, entry.operation, entry.interaction = None, rid, "operation"
    elif rest is None:
        entry.interaction = "read"
    elif rest == "_history":
        entry.interaction = "history-instance"
    elif rest.startswith("_history/") and rest[len("_history/") :].isdigit():
        entry.interaction = "vread"
        entry.version = int(rest[len("_history/") :])
    elif rest.startswith("$") and "/" not in rest:
        entry.interaction, entry.operation = "operation", rest
    else:
        raise FhirError(400, "invalid", f"cannot read {url!r}", url_where)
    return entry


def rewrite_references(
    resource: Any,
    mapping: Mapping[str, str],
    *,
    unresolved: list[str] | None = None,
    prefix: str = "urn:uuid:",
) -> Any:
    """A copy of ``resource`` with every ``Reference.reference`` in ``mapping`` replaced.

    Works at any depth (contained resources, extensions, backbone elements).
    Any reference string can be mapped (``urn:uuid:...`` -> ``Patient/123``, or an
    importer's ``Patient/<source id>`` -> ``Patient/<ledger id>``). References
    starting with ``prefix`` that are not in ``mapping`` are appended to
    ``unresolved`` when a list is given.
    """
    if isinstance(resource, dict):
        out: dict[str, Any] = {}
        for key, value in resource.items():
            if key == "reference" and isinstance(value, str):
                new = mapping.get(value)
                if new is None and unresolved is not None and value.startswith(prefix):
                    unresolved.append(value)
                out[key] = value if new is None else new
            elif isinstance(value, dict | list):
                out[key] = rewrite_references(value, mapping, unresolved=unresolved, prefix=prefix)
            else:
                out[key] = value
        return out
    if isinstance(resource, list):
        return [
            rewrite_references(v, mapping, unresolved=unresolved, prefix=prefix) for v in resource
        ]
    return resource


def _check_bundle_shell(bundle: dict[str, Any]) -> None:
    """Validate the Bundle's own elements (not its entries) with the R4B model."""
    shell = {k: v for k, v in bundle.items() if k != "entry"}
    parse_resource(shell, "Bundle")


def _check_entry_shell(index: int, raw: dict[str, Any]) -> None:
    """Validate one entry's own elements (request, fullUrl ...) with the R4B model."""
    from fhir.resources.R4B.bundle import BundleEntry

    shell = {k: v for k, v in raw.items() if k != "resource"}
    if shell:
        try:
            validate_element(BundleEntry, shell, f"Bundle.entry[{index}]")
        except FhirError as exc:
            # the entry envelope is the request itself: anything wrong with it is a 400
            raise FhirError.from_issues(400, exc.issues) from None


def plan_transaction(
    bundle: Any, *, new_id: IdFactory | None = None, matched: Mapping[int, str] | None = None
) -> list[Entry]:
    """Check a transaction/batch Bundle and plan its entries (request order).

    ``new_id(resource_type, full_url, resource)`` assigns the logical id of
    each POSTed resource (default: a random UUID); the importer passes a
    deterministic one so that re-runs are idempotent. ``matched`` maps the index
    of a conditional create (``ifNoneExist``) whose criteria found a resource to
    that resource's id: the entry is planned as :attr:`Entry.matched` (nothing
    to write) and references to its ``fullUrl`` resolve to the resource found.
    """
    if isinstance(bundle, bytes | bytearray | str):
        bundle = parse_json(bundle)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirError(400, "invalid", "expected a Bundle", ["resourceType"])
    btype = bundle.get("type")
    if btype not in ("transaction", "batch"):
        raise FhirError(
            400,
            "invalid",
            f"Bundle.type must be transaction or batch, not {btype!r}",
            ["Bundle.type"],
        )
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise FhirError(400, "structure", "Bundle.entry must be an array", ["Bundle.entry"])
    _check_bundle_shell(bundle)
    factory = new_id or _uuid_id
    is_tx = btype == "transaction"

    entries: list[Entry] = []
    for i, raw in enumerate(raw_entries):
        try:
            entry = _plan_entry(i, raw, factory)
        except FhirError as exc:
            if is_tx:
                raise
            entries.append(_failed_entry(i, raw, exc))
            continue
        found = (matched or {}).get(i)
        if found is not None and entry.interaction == "create" and entry.resource is not None:
            entry.id, entry.matched = found, True
            entry.resource["id"] = found
        entries.append(entry)

    if not is_tx:
        return entries

    mapping: dict[str, str] = {}
    targets: dict[str, int] = {}
    for e in entries:
        if e.full_url:
            if e.full_url in mapping:
                raise FhirError(
                    400,
                    "duplicate",
                    f"fullUrl {e.full_url} appears more than once",
                    [f"Bundle.entry[{e.index}].fullUrl"],
                )
            if e.interaction in ("create", "update") and e.reference:
                mapping[e.full_url] = e.reference
                # a relative reference resolves against an absolute fullUrl's base
                if e.full_url.startswith(("http://", "https://")):
                    tail = "/".join(e.full_url.rstrip("/").split("/")[-2:])
                    if tail.split("/")[0] == e.resource_type:
                        mapping.setdefault(tail, e.reference)
        if e.interaction in ("update", "delete") and e.reference:
            if e.reference in targets:
                raise FhirError(
                    400,
                    "duplicate",
                    f"{e.reference} is changed by more than one entry "
                    f"(entries {targets[e.reference]} and {e.index})",
                    [f"Bundle.entry[{e.index}].request.url"],
                )
            targets[e.reference] = e.index
    for e in entries:
        if e.resource is None:
            continue
        unresolved: list[str] = []
        e.resource = rewrite_references(e.resource, mapping, unresolved=unresolved)
        if unresolved:
            raise FhirError(
                400,
                "invalid",
                f"reference {unresolved[0]} does not match the fullUrl of any entry",
                [f"Bundle.entry[{e.index}].resource"],
            )
    return entries


def _failed_entry(index: int, raw: Any, exc: FhirError) -> Entry:
    request = raw.get("request") if isinstance(raw, dict) else None
    method = request.get("method") if isinstance(request, dict) else None
    url = request.get("url") if isinstance(request, dict) else None
    return Entry(
        index=index,
        method=method if isinstance(method, str) else "",
        url=url if isinstance(url, str) else "",
        interaction="",
        resource_type="",
        error=exc,
    )


_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


def processing_order(entries: Iterable[Entry]) -> list[Entry]:
    """Entries in the order FHIR processes a transaction: DELETE, POST, PUT, GET."""
    return sorted(entries, key=lambda e: (_ORDER.get(e.method, 4), e.index))


# ----------------------------------------------------------------------------- responses


def etag(version: int) -> str:
    """The weak ETag of a version: ``W/"3"``."""
    return f'W/"{version}"'


def location(resource_type: str, rid: str, version: int) -> str:
    """``Type/id/_history/n``."""
    return f"{resource_type}/{rid}/_history/{version}"


def _full_url(base_url: str | None, resource_type: str | None, rid: str | None) -> str | None:
    if not base_url or not resource_type or not rid:
        return None
    return f"{base_url.rstrip('/')}/{resource_type}/{rid}"


@dataclass(frozen=True, slots=True)
class EntryResult:
    """The outcome of one executed entry, for a transaction/batch response."""

    status: int
    resource_type: str | None = None
    id: str | None = None
    version: int | None = None
    last_updated: int | None = None  # ms
    resource: dict[str, Any] | None = None  # Prefer: return=representation, or GET results
    outcome: dict[str, Any] | None = None  # OperationOutcome (errors, warnings)

    @classmethod
    def from_error(cls, error: FhirError) -> EntryResult:
        return cls(status=error.status, outcome=operation_outcome(error))

    def to_entry(self, base_url: str | None) -> dict[str, Any]:
        response: dict[str, Any] = {"status": status_line(self.status)}
        has_version = self.resource_type and self.id and self.version is not None
        if has_version and self.status in (200, 201) and self.version is not None:
            assert self.resource_type is not None and self.id is not None
            response["location"] = location(self.resource_type, self.id, self.version)
            response["etag"] = etag(self.version)
        elif self.version is not None:
            response["etag"] = etag(self.version)
        if self.last_updated is not None:
            response["lastModified"] = format_instant(self.last_updated)
        if self.outcome is not None:
            response["outcome"] = self.outcome
        entry: dict[str, Any] = {}
        full = _full_url(base_url, self.resource_type, self.id)
        if full and self.status < 300:
            entry["fullUrl"] = full
        if self.resource is not None:
            entry["resource"] = self.resource
        entry["response"] = response
        return entry


def _bundle(btype: str, entries: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": btype}
    out.update({k: v for k, v in extra.items() if v is not None})
    if entries:
        out["entry"] = entries
    return out


def _meta(timestamp: int | None) -> dict[str, Any] | None:
    return {"lastUpdated": format_instant(timestamp)} if timestamp is not None else None


def transaction_response(
    results: Sequence[EntryResult], *, base_url: str | None = None, timestamp: int | None = None
) -> dict[str, Any]:
    """A ``transaction-response`` Bundle (results in request order)."""
    return _bundle(
        "transaction-response",
        [r.to_entry(base_url) for r in results],
        meta=_meta(timestamp),
    )


def batch_response(
    results: Sequence[EntryResult], *, base_url: str | None = None, timestamp: int | None = None
) -> dict[str, Any]:
    """A ``batch-response`` Bundle (results in request order; failures carry an outcome)."""
    return _bundle(
        "batch-response",
        [r.to_entry(base_url) for r in results],
        meta=_meta(timestamp),
    )


@dataclass(frozen=True, slots=True)
class SearchEntry:
    """A searchset entry: a resource and its search mode."""

    resource: dict[str, Any]
    mode: str = "match"  # match | include | outcome


def searchset(
    entries: Iterable[dict[str, Any] | SearchEntry],
    total: int | None,
    links: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    *,
    base_url: str | None = None,
    outcome: dict[str, Any] | None = None,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """A ``searchset`` Bundle.

    ``links`` is relation -> URL (see :func:`medledger.fhir.index.search_links`);
    ``outcome`` (an OperationOutcome, e.g. "some types were withheld") is added
    as an entry with search mode ``outcome``.
    """
    out_entries: list[dict[str, Any]] = []
    for item in entries:
        se = item if isinstance(item, SearchEntry) else SearchEntry(item)
        res = se.resource
        entry: dict[str, Any] = {}
        full = _full_url(base_url, res.get("resourceType"), res.get("id"))
        if full:
            entry["fullUrl"] = full
        entry["resource"] = res
        entry["search"] = {"mode": se.mode}
        out_entries.append(entry)
    if outcome is not None:
        out_entries.append({"resource": outcome, "search": {"mode": "outcome"}})
    pairs = list(links.items()) if isinstance(links, Mapping) else list(links)
    return _bundle(
        "searchset",
        out_entries,
        meta=_meta(timestamp),
        total=total,
        link=[{"relation": rel, "url": url} for rel, url in pairs] or None,
    )


class VersionLike(Protocol):
    """Anything with these attributes (e.g. services.records.StoredRecord)."""

    @property
    def id(self) -> str: ...
    @property
    def resource_type(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def last_updated(self) -> int: ...
    @property
    def resource(self) -> dict[str, Any] | None: ...


def history_bundle(
    versions: Iterable[VersionLike],
    total: int | None = None,
    links: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    *,
    base_url: str | None = None,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """A ``history`` Bundle, newest version first as given.

    Version 1 appears as ``POST`` (201), later versions as ``PUT`` (200) and
    deleted versions (``resource is None``) as ``DELETE`` without a resource.
    """
    out_entries: list[dict[str, Any]] = []
    count = 0
    for v in versions:
        count += 1
        deleted = v.resource is None
        if deleted:
            method, url, status = "DELETE", f"{v.resource_type}/{v.id}", 204
        elif v.version == 1:
            method, url, status = "POST", v.resource_type, 201
        else:
            method, url, status = "PUT", f"{v.resource_type}/{v.id}", 200
        entry: dict[str, Any] = {}
        full = _full_url(base_url, v.resource_type, v.id)
        if full:
            entry["fullUrl"] = full
        if v.resource is not None:
            entry["resource"] = v.resource
        entry["request"] = {"method": method, "url": url}
        entry["response"] = {
            "status": status_line(status),
            "etag": etag(v.version),
            "lastModified": format_instant(v.last_updated),
        }
        if not deleted:
            entry["response"]["location"] = location(v.resource_type, v.id, v.version)
        out_entries.append(entry)
    pairs = list(links.items()) if isinstance(links, Mapping) else list(links)
    return _bundle(
        "history",
        out_entries,
        meta=_meta(timestamp),
        total=count if total is None else total,
        link=[{"relation": rel, "url": url} for rel, url in pairs] or None,
    )
