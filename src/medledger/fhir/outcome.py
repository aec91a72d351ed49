"""FHIR errors and OperationOutcome resources.

Every failure the FHIR layer reports is a :class:`FhirError`: an HTTP status
plus one or more OperationOutcome issues (IssueType code, diagnostics and
FHIRPath-like expressions such as ``Observation.code.coding[0].system``). The
REST layer turns it into an ``OperationOutcome`` body with that status, so a
client always learns *what* was wrong and *where*.

Status conventions used throughout :mod:`medledger.fhir`:

* 400 -- the body cannot be read as the FHIR resource it claims to be: invalid
  JSON, wrong or unknown ``resourceType``, unknown elements, wrong JSON types,
  malformed primitive values (an impossible date, a bad id), an unsupported
  search parameter.
* 422 -- it reads fine but breaks the rules on content: a required element is
  missing, a code is outside a required value set, an invariant (``con-4``,
  ``ppc-1`` ...) fails, or it cannot be represented by the ledger contracts.
* 403/404/409/410/412/500 -- mapped from :mod:`medledger.errors` by
  :func:`from_medledger_error` or raised by the API directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from medledger import errors as merr

__all__ = [
    "ISSUE_TYPES",
    "FhirError",
    "Issue",
    "from_medledger_error",
    "operation_outcome",
    "status_line",
]

#: FHIR R4 IssueType codes (http://hl7.org/fhir/issue-type).
ISSUE_TYPES: frozenset[str] = frozenset(
    {
        "invalid",
        "structure",
        "required",
        "value",
        "invariant",
        "security",
        "login",
        "unknown",
        "expired",
        "forbidden",
        "suppressed",
        "processing",
        "not-supported",
        "duplicate",
        "multiple-matches",
        "not-found",
        "deleted",
        "too-long",
        "code-invalid",
        "extension",
        "too-costly",
        "business-rule",
        "conflict",
        "transient",
        "lock-error",
        "no-store",
        "exception",
        "timeout",
        "incomplete",
        "throttled",
        "informational",
    }
)

SEVERITIES = frozenset({"fatal", "error", "warning", "information"})

#: Default IssueType for an HTTP status when the caller gives none.
_DEFAULT_CODE: dict[int, str] = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "business-rule",
    429: "throttled",
    500: "exception",
    501: "not-supported",
    503: "transient",
}


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue."""

    code: str
    diagnostics: str
    expression: tuple[str, ...] = ()
    severity: str = "error"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        if self.diagnostics:
            out["diagnostics"] = self.diagnostics
        if self.expression:
            out["expression"] = list(self.expression)
        return out


class FhirError(Exception):
    """A FHIR-level failure: HTTP ``status`` plus OperationOutcome issues.

    ``code``, ``diagnostics`` and ``expression`` describe the first (main)
    issue; ``issues`` holds all of them (validation may find several).
    """

    status: int
    code: str
    diagnostics: str
    expression: list[str]
    issues: list[Issue]

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        expression: Iterable[str] = (),
        *,
        issues: Sequence[Issue] = (),
    ) -> None:
        if code not in ISSUE_TYPES:
            raise ValueError(f"unknown IssueType code {code!r}")
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.expression = list(expression)
        main = Issue(code, diagnostics, tuple(self.expression))
        rest = [i for i in issues if i != main]
        self.issues = [main, *rest]

    @classmethod
    def from_issues(cls, status: int, issues: Sequence[Issue]) -> FhirError:
        """An error whose main issue is ``issues[0]``."""
        if not issues:
            raise ValueError("at least one issue is needed")
        first = issues[0]
        return cls(status, first.code, first.diagnostics, first.expression, issues=issues)

    def __str__(self) -> str:
        where = f" at {', '.join(self.expression)}" if self.expression else ""
        more = f" (+{len(self.issues) - 1} more)" if len(self.issues) > 1 else ""
        return f"{self.status} {self.code}: {self.diagnostics}{where}{more}"

    def __repr__(self) -> str:
        return f"FhirError({self.status}, {self.code!r}, {self.diagnostics!r}, {self.expression!r})"

    def prefixed(self, old: str, new: str) -> FhirError:
        """This error with its expressions re-rooted.

        ``err.prefixed("Observation", "Bundle.entry[3].resource")`` turns
        ``Observation.code`` into ``Bundle.entry[3].resource.code``.
        """

        def fix(expr: str) -> str:
            if expr == old:
                return new
            if expr.startswith(old + "."):
                return new + expr[len(old) :]
            return expr

        issues = [
            Issue(i.code, i.diagnostics, tuple(fix(e) for e in i.expression), i.severity)
            for i in self.issues
        ]
        return FhirError.from_issues(self.status, issues)

    def outcome(self) -> dict[str, Any]:
        """This error as an OperationOutcome resource."""
        return operation_outcome(self)


def status_line(status: int) -> str:
    """``201`` -> ``"201 Created"`` (the form Bundle.entry.response.status uses)."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def operation_outcome(
    status_or_error: FhirError | int,
    diagnostics: str | None = None,
    *,
    code: str | None = None,
    expression: Iterable[str] = (),
    severity: str | None = None,
) -> dict[str, Any]:
    """An OperationOutcome resource.

    ``operation_outcome(err)`` renders a :class:`FhirError` with all its issues.
    ``operation_outcome(404, "no such record")`` builds a single issue; the code
    defaults from the status (404 -> ``not-found``) and the severity is
    ``information`` for statuses below 400 (e.g. a successful delete).
    """
    if isinstance(status_or_error, FhirError):
        return {
            "resourceType": "OperationOutcome",
            "issue": [i.to_json() for i in status_or_error.issues],
        }
    status = status_or_error
    if code is None:
        code = "informational" if status < 400 else _DEFAULT_CODE.get(status, "processing")
    if code not in ISSUE_TYPES:
        raise ValueError(f"unknown IssueType code {code!r}")
    if severity is None:
        severity = "information" if status < 400 else "error"
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}")
    text = diagnostics if diagnostics is not None else status_line(status)
    return {
        "resourceType": "OperationOutcome",
        "issue": [Issue(code, text, tuple(expression), severity).to_json()],
    }


def from_medledger_error(exc: BaseException) -> FhirError:
    """Map any exception to the FhirError the API should answer with.

    Internal failures keep their class name in the diagnostics but no details
    that could leak data (their messages are written by medledger itself).
    """
    if isinstance(exc, FhirError):
        return exc
    msg = str(exc) or exc.__class__.__name__
    # Order matters: subclasses before their bases.
    if isinstance(exc, merr.Unauthorized):
        return FhirError(403, "forbidden", msg)
    if isinstance(exc, merr.NotFound | merr.NotFoundError):
        return FhirError(404, "not-found", msg)
    if isinstance(exc, merr.Conflict):
        return FhirError(409, "conflict", msg)
    if isinstance(exc, merr.RuleError):
        return FhirError(422, "business-rule", msg)
    if isinstance(exc, merr.ContractError):
        return FhirError(422, "business-rule", msg)
    if isinstance(exc, merr.MalformedTransaction | merr.UnknownTransactionType):
        return FhirError(400, "invalid", msg)
    if isinstance(exc, merr.ReplayedTransaction | merr.OutOfOrderSequence):
        return FhirError(409, "conflict", msg)
    if isinstance(exc, merr.TransactionRejected):
        return FhirError(422, "business-rule", msg)
    if isinstance(exc, merr.IntegrityError):
        return FhirError(500, "exception", f"integrity check failed: {msg}")
    if isinstance(exc, merr.StorageError):
        return FhirError(500, "exception", f"storage failure: {msg}")
    if isinstance(exc, merr.OrdererError):
        return FhirError(503, "transient", f"ledger unavailable: {msg}")
    if isinstance(exc, merr.DecryptionError):
        return FhirError(500, "exception", "record could not be decrypted")
    if isinstance(exc, merr.MedledgerError):
        return FhirError(500, "exception", f"{exc.__class__.__name__}: {msg}")
    return FhirError(500, "exception", f"internal error ({exc.__class__.__name__})")


@dataclass(slots=True)
class IssueCollector:
    """Accumulates issues while checking a resource; raises them all at once."""

    issues: list[Issue] = field(default_factory=list)

    def add(self, code: str, diagnostics: str, *expression: str) -> None:
        self.issues.append(Issue(code, diagnostics, tuple(expression)))

    def raise_if_any(self, status: int) -> None:
        if self.issues:
            raise FhirError.from_issues(status, self.issues)
