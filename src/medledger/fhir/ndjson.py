"""Reading FHIR Bulk Data NDJSON files and Bundles (the only I/O in medledger.fhir).

:func:`iter_ndjson` streams one resource per line, with its line number, so
an importer can report ``Observation.000.ndjson:1234`` and resume after the
last line it committed (``start_line``). ``.gz`` files are read transparently.
A line that is not a JSON object with a ``resourceType`` raises
:class:`NdjsonError` (a 400 FhirError) naming the file and line; validation of
the resource itself is :func:`medledger.fhir.validate.parse_resource`'s job.

:func:`iter_bundle_resources` walks a Bundle's entries (transaction, batch,
collection, searchset ...) yielding each resource with its position and
``fullUrl``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

from medledger.fhir.outcome import FhirError
from medledger.fhir.validate import parse_json

__all__ = ["BundleItem", "NdjsonError", "iter_bundle_resources", "iter_ndjson", "read_json"]


class NdjsonError(FhirError):
    """A line of an NDJSON file is not a FHIR resource."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(400, "structure", f"{path}:{line}: {message}", [f"line {line}"])
        self.path = path
        self.line = line


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return cast(IO[bytes], gzip.open(path, "rb"))
    return path.open("rb")


def iter_ndjson(
    path: str | os.PathLike[str], *, start_line: int = 1
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, resource)`` for each non-blank line, from ``start_line`` (1-based) on.

    Lines before ``start_line`` are skipped without being parsed (resuming).
    """
    p = Path(path)
    name = str(p)
    with _open(p) as fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no < start_line:
                continue
            text = raw.strip()
            if not text:
                continue
            try:
                obj = parse_json(text)
            except FhirError as exc:
                raise NdjsonError(name, line_no, exc.diagnostics) from None
            if not isinstance(obj, dict):
                raise NdjsonError(name, line_no, "a line must hold one JSON object")
            rtype = obj.get("resourceType")
            if not isinstance(rtype, str) or not rtype:
                raise NdjsonError(name, line_no, "resourceType is missing")
            yield line_no, obj


def read_json(path: str | os.PathLike[str]) -> Any:
    """A whole JSON file (e.g. a Bundle), strictly parsed; errors name the file."""
    p = Path(path)
    with _open(p) as fh:
        data = fh.read()
    try:
        return parse_json(data)
    except FhirError as exc:
        raise FhirError(400, "structure", f"{p}: {exc.diagnostics}") from None


class BundleItem(NamedTuple):
    """One resource of a Bundle: its entry position, fullUrl, resource and request (if any)."""

    position: int
    full_url: str | None
    resource: dict[str, Any]
    request: dict[str, Any] | None


def iter_bundle_resources(
    bundle: Mapping[str, Any] | str | os.PathLike[str],
) -> Iterator[BundleItem]:
    """Every entry of a Bundle (a dict or a path to a JSON file) that holds a resource."""
    data = read_json(bundle) if isinstance(bundle, str | os.PathLike) else bundle
    if not isinstance(data, Mapping) or data.get("resourceType") != "Bundle":
        raise FhirError(400, "invalid", "expected a Bundle", ["resourceType"])
    entries = data.get("entry") or []
    if not isinstance(entries, list):
        raise FhirError(400, "structure", "Bundle.entry must be an array", ["Bundle.entry"])
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise FhirError(
                400, "structure", "a bundle entry must be an object", [f"Bundle.entry[{i}]"]
            )
        resource = entry.get("resource")
        if resource is None:
            continue
        if not isinstance(resource, dict):
            raise FhirError(
                400,
                "structure",
                "entry.resource must be an object",
                [f"Bundle.entry[{i}].resource"],
            )
        full_url = entry.get("fullUrl")
        request = entry.get("request")
        yield BundleItem(
            i,
            full_url if isinstance(full_url, str) else None,
            resource,
            request if isinstance(request, dict) else None,
        )
