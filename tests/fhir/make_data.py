"""Rebuild tests/fhir/data from /work/shared/testdata (not part of the test suite).

Run: .venv/bin/python tests/fhir/make_data.py [SHARED_TESTDATA_DIR]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medledger.fhir.index import iter_references

HERE = Path(__file__).parent / "data"
NDJSON_LIMITS = {
    "DocumentReference": 6,
    "Encounter": 12,
    "MedicationRequest": 12,
    "Procedure": 12,
    "Condition": 14,
    "Patient": 3,
    "AllergyIntolerance": 11,
    "Device": 6,
    "Immunization": 8,
    "Location": 3,
    "Organization": 3,
    "Practitioner": 3,
    "PractitionerRole": 3,
}


def _signature(r: dict[str, Any]) -> str:
    sig: list[Any] = [r.get("status"), r.get("intent")]
    for key in ("clinicalStatus", "verificationStatus", "class", "category", "type"):
        value = r.get(key)
        if isinstance(value, dict):
            sig.append([c.get("code") for c in value.get("coding", [])])
        elif isinstance(value, list):
            sig.append(json.dumps(value, sort_keys=True)[:200])
    sig.append(sorted(k for k in r if k[0].islower() and k not in ("id", "meta", "text")))
    return json.dumps(sig, default=str)


def ndjson(src: Path) -> None:
    out = HERE / "synthea-10"
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.000.ndjson")):
        rtype = f.name.split(".")[0]
        n = NDJSON_LIMITS[rtype]
        lines = f.read_text(encoding="utf-8").splitlines()
        chosen: list[str] = []
        seen: set[str] = set()
        for line in lines:
            sig = _signature(json.loads(line))
            if sig not in seen:
                seen.add(sig)
                chosen.append(line)
            if len(chosen) >= n:
                break
        for line in lines:
            if len(chosen) >= n:
                break
            if line not in chosen and len(line) < 2500:
                chosen.append(line)
        if rtype == "DocumentReference":
            chosen = sorted(lines, key=len)[:2] + [x for x in chosen if len(x) < 6000][:4]
        (out / f.name).write_text("\n".join(chosen) + "\n", encoding="utf-8")


def _closure(bundle: dict[str, Any], seeds: list[str]) -> list[dict[str, Any]]:
    by_url = {e["fullUrl"]: e for e in bundle["entry"]}
    keep: set[str] = set()
    todo = list(seeds)
    while todo:
        url = todo.pop()
        if url in keep or url not in by_url:
            continue
        keep.add(url)
        todo.extend(
            r for r in iter_references(by_url[url]["resource"]) if r.startswith("urn:uuid:")
        )
    return [e for e in bundle["entry"] if e["fullUrl"] in keep]


def _rich(entries: list[dict[str, Any]], n: int) -> list[str]:
    def first(pred: Callable[[dict[str, Any]], bool], k: int = 1) -> list[str]:
        return [e["fullUrl"] for e in entries if pred(e["resource"])][:k]

    def code(r: dict[str, Any]) -> str:
        return str(r["code"]["coding"][0]["code"])

    seeds: list[str] = []
    for t in (
        "Patient AllergyIntolerance CarePlan Goal ImagingStudy Immunization MedicationRequest "
        "Procedure Condition Claim ExplanationOfBenefit"
    ).split():
        seeds += first(lambda r, t=t: r["resourceType"] == t, n)
    for c in ("69409-1", "55405-5", "57698-3", "51990-0", "58410-2", "24323-8"):
        seeds += first(lambda r, c=c: r["resourceType"] == "DiagnosticReport" and code(r) == c)
    obs: Callable[[dict[str, Any]], bool] = lambda r: r["resourceType"] == "Observation"  # noqa: E731
    seeds += first(lambda r: obs(r) and "valueCodeableConcept" in r, 3)
    seeds += first(lambda r: obs(r) and "component" in r, 2)
    seeds += first(lambda r: obs(r) and code(r) in ("4548-4", "33914-3"), 3)
    seeds += first(lambda r: obs(r) and "\u200b" in json.dumps(r, ensure_ascii=False), 2)
    seeds += first(lambda r: r["resourceType"] == "Condition" and "abatementDateTime" in r, 2)
    return seeds


def _goals_and_hba1c(entries: list[dict[str, Any]], n: int) -> list[str]:
    goals = [e["fullUrl"] for e in entries if e["resource"]["resourceType"] == "Goal"][:3]
    hba1c = [
        e["fullUrl"]
        for e in entries
        if e["resource"]["resourceType"] == "Observation"
        and e["resource"]["code"]["coding"][0]["code"] == "4548-4"
    ][:3]
    return goals + hba1c


def bundles(src: Path) -> None:
    out = HERE / "synthea-bundles"
    out.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, Callable[[list[dict[str, Any]], int], list[str]], int]] = [
        ("Stevie_Cormier_7f4c7519-5b22-4855-812f-9e937c5a8d2f", _rich, 2),
        ("Beatrice_Aufderhar_5451401c-ab1b-4adc-9df6-c02e856e492a", _rich, 1),
        ("Tom_Goodwin_e20de9eb-6f2d-4871-a43f-bbede53293ed", _goals_and_hba1c, 0),
    ]
    for name, seeds, n in plan:
        bundle = json.loads((src / f"{name}.json").read_text(encoding="utf-8"))
        subset = dict(bundle)
        subset["entry"] = _closure(bundle, seeds(bundle["entry"], n))
        text = json.dumps(subset, ensure_ascii=False, separators=(",", ":"))
        (out / ("_".join(name.split("_")[:2]) + ".json")).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/testdata")
    ndjson(root / "synthea-10")
    bundles(root / "synthea-bundles")
