"""Real Synthea test data (tests/fhir/data, see its SOURCE.md) for the FHIR library tests.

tests/fhir deliberately has no ``__init__.py``: as a package it would be imported
as ``fhir`` and shadow the ``fhir.resources`` namespace package. Test modules are
therefore named ``test_fhir_*`` (unique basenames) and import this module directly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
NDJSON_FILES = sorted((DATA / "synthea-10").glob("*.ndjson"))
BUNDLE_FILES = sorted((DATA / "synthea-bundles").glob("*.json"))


def load_bundle(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _collect() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for f in NDJSON_FILES:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                out.append((f"{f.name}:{n}", json.loads(line)))
    for f in BUNDLE_FILES:
        for i, entry in enumerate(load_bundle(f)["entry"]):
            out.append((f"{f.stem}#{i}", entry["resource"]))
    return out


#: (label, resource) for every resource in tests/fhir/data
ALL_RESOURCES: list[tuple[str, dict[str, Any]]] = _collect()


def _literal_map() -> dict[str, str]:
    out: dict[str, str] = {}
    for f in BUNDLE_FILES:
        for entry in load_bundle(f)["entry"]:
            res = entry["resource"]
            out[entry["fullUrl"]] = f"{res['resourceType']}/{res['id']}"
    return out


#: bundle fullUrl (urn:uuid:...) -> Type/id of the resource it names
LITERAL: dict[str, str] = _literal_map()


def _literal(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (LITERAL.get(v, v) if k == "reference" and isinstance(v, str) else _literal(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def resources_of(rtype: str, *, literal: bool = False) -> list[dict[str, Any]]:
    """Deep copies of every test resource of ``rtype``.

    With ``literal`` the bundle resources' ``urn:uuid:`` references are replaced by
    ``Type/id`` literals (as a server would store them).
    """
    out = [copy.deepcopy(r) for _, r in ALL_RESOURCES if r["resourceType"] == rtype]
    return [_literal(r) for r in out] if literal else out


def stevie() -> dict[str, Any]:
    """The Stevie Cormier transaction bundle subset (80 entries)."""
    return load_bundle(DATA / "synthea-bundles" / "Stevie_Cormier.json")
