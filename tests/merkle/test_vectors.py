"""RFC 9162 proof test vectors from transparency-dev/merkle (copied into testdata/).

One test case per JSON file: ``happy-path.json`` (and the other ``wantErr: false`` files)
must verify, every other file must raise :class:`ProofError`. A missing or emptied
vector folder fails the suite instead of silently running nothing.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from medledger.errors import ProofError
from medledger.merkle import root_from_inclusion_proof, verify_consistency, verify_inclusion

VECTORS = Path(__file__).parent / "testdata" / "rfc9162-vectors"
# Number of JSON files per kind in transparency-dev/merkle@417fb0c3 testdata.
EXPECTED_COUNTS = {"inclusion": 86, "consistency": 84}


def _files(kind: str) -> list[Any]:
    files = sorted((VECTORS / kind).rglob("*.json"))
    if not files:
        return [pytest.param(None, id=f"{kind}-vectors-missing")]
    return [pytest.param(f, id=str(f.relative_to(VECTORS / kind))) for f in files]


def _load(path: Path | None) -> dict[str, Any]:
    assert path is not None, f"test vectors not found under {VECTORS}"
    data: dict[str, Any] = json.loads(path.read_text())
    assert isinstance(data["wantErr"], bool)
    return data


def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def _proof(value: list[str] | None) -> list[bytes] | None:
    return None if value is None else [_b64(h) for h in value]


@pytest.mark.parametrize("kind", sorted(EXPECTED_COUNTS))
def test_all_vectors_present(kind: str) -> None:
    files = list((VECTORS / kind).rglob("*.json"))
    assert len(files) == EXPECTED_COUNTS[kind], f"vector files missing under {VECTORS / kind}"
    assert (VECTORS / "SOURCE.md").is_file()


@pytest.mark.parametrize("path", _files("inclusion"))
def test_inclusion_vector(path: Path | None) -> None:
    v = _load(path)
    args = (v["leafIdx"], v["treeSize"], _b64(v["leafHash"]), _proof(v["proof"]))
    root = _b64(v["root"])
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args, root)
    else:
        verify_inclusion(*args, root)
        assert root_from_inclusion_proof(*args) == root


@pytest.mark.parametrize("path", _files("consistency"))
def test_consistency_vector(path: Path | None) -> None:
    v = _load(path)
    args = (v["size1"], v["size2"], _proof(v["proof"]), _b64(v["root1"]), _b64(v["root2"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_happy_paths_are_the_only_valid_vectors() -> None:
    valid = sorted(
        str(p.relative_to(VECTORS))
        for p in VECTORS.rglob("*.json")
        if not json.loads(p.read_text())["wantErr"]
    )
    assert all(
        p.endswith("happy-path.json") or p.endswith("matching-root-and-leaf.json") for p in valid
    )
    assert len(valid) == 11
