"""C2SP tlog-checkpoint bodies, medledger's block extension, and co-signed checkpoints."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from medledger.crypto.signing import SigningKey
from medledger.errors import CheckpointError
from medledger.ledger.checkpoint import (
    MAX_TREE_SIZE,
    BlockRef,
    Checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from medledger.ledger.note import NoteSigner, NoteVerifier, add_signatures, open_note, sign_note

VECTORS = Path(__file__).parent / "vectors"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


OURS = _load("checkpoint_ed25519.json")
PUBLISHED = _load("published_notes.json")

ROOT = hashlib.sha256(b"root").digest()
H1 = hashlib.sha256(b"block").digest()
H2 = hashlib.sha256(b"state").digest()
B64_ROOT = base64.b64encode(ROOT).decode()
URLSAFE_ROOT = base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode()


def _signer(i: int) -> NoteSigner:
    seed = hashlib.sha256(f"test_checkpoint signer {i}".encode()).digest()
    return NoteSigner(f"org-{i}.example/witness", SigningKey.from_seed(seed))


def _vector_signers() -> list[NoteSigner]:
    return [
        NoteSigner(k["name"], SigningKey.from_seed(bytes.fromhex(k["seed_hex"])))
        for k in OURS["keys"]
    ]


def _vector_verifiers() -> list[NoteVerifier]:
    return [NoteVerifier.from_verifier_key(k["verifier_key"]) for k in OURS["keys"]]


# -- the body ------------------------------------------------------------------------------


def test_to_text_and_parse_roundtrip() -> None:
    cp = Checkpoint("example.com/log", 5, ROOT, ("ext one", "ext two"))
    text = cp.to_text()
    assert text == f"example.com/log\n5\n{B64_ROOT}\next one\next two\n"
    assert Checkpoint.parse(text) == cp
    assert Checkpoint.parse(text.encode()) == cp


def test_empty_tree() -> None:
    empty = hashlib.sha256(b"").digest()
    cp = Checkpoint("o", 0, empty)
    assert cp.to_text() == "o\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
    assert Checkpoint.parse(cp.to_text()) == cp


def test_spec_example_body_parses() -> None:
    ex = PUBLISHED["c2sp_tlog_checkpoint"]
    body = ex["note"].split("\n\n")[0] + "\n"
    cp = Checkpoint.parse(body)
    assert cp.origin == ex["origin"]
    assert cp.size == ex["size"]
    assert cp.root == base64.b64decode(ex["root_base64"])
    assert cp.extensions == ()
    assert cp.to_text() == body


def test_spec_example_note_cosigned_and_verified() -> None:
    # The published signature is from a key we do not know: it is kept but ignored.
    ex = PUBLISHED["c2sp_tlog_checkpoint"]
    me = _signer(1)
    cosigned = add_signatures(ex["note"], [me])
    cp = verify_checkpoint(cosigned, [me.verifier()])
    assert cp.size == ex["size"]
    assert len(open_note(cosigned, [me.verifier()]).unverified) == 1


def test_max_tree_size() -> None:
    cp = Checkpoint("o", MAX_TREE_SIZE, ROOT)
    assert Checkpoint.parse(cp.to_text()).size == 2**64 - 1
    with pytest.raises(CheckpointError):
        Checkpoint("o", MAX_TREE_SIZE + 1, ROOT)


def test_origin_may_contain_spaces_and_plus() -> None:
    # The spec only RECOMMENDS a schema-less URL; clients MUST NOT assume the format.
    cp = Checkpoint("my log + friends", 1, ROOT)
    assert Checkpoint.parse(cp.to_text()) == cp


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "o\n1\n",
        "o\n1",
        f"o\n1\n{B64_ROOT}",  # missing final newline
        f"o\n1\n{B64_ROOT}\n\n",  # empty extension line
        f"o\n\n1\n{B64_ROOT}\n",
        f"\n1\n{B64_ROOT}\n",  # empty origin
        f"o\n01\n{B64_ROOT}\n",
        f"o\n00\n{B64_ROOT}\n",
        f"o\n-1\n{B64_ROOT}\n",
        f"o\n+1\n{B64_ROOT}\n",
        f"o\n 1\n{B64_ROOT}\n",
        f"o\n1 \n{B64_ROOT}\n",
        f"o\n1_0\n{B64_ROOT}\n",
        f"o\n\u0661\n{B64_ROOT}\n",  # ARABIC-INDIC DIGIT ONE
        f"o\n0x1\n{B64_ROOT}\n",
        f"o\n1e3\n{B64_ROOT}\n",
        f"o\n{2**64}\n{B64_ROOT}\n",
        f"o\n1\n{base64.b64encode(ROOT[:31]).decode()}\n",
        f"o\n1\n{base64.b64encode(ROOT + b'x').decode()}\n",
        f"o\n1\n{B64_ROOT.rstrip('=')}\n",
        f"o\n1\n{URLSAFE_ROOT}\n",
        f"o\n1\n{B64_ROOT[:42]}{chr(ord(B64_ROOT[42]) + 1)}=\n",  # non-zero trailing bits
        f"o\n1\n{ROOT.hex()}\n",
        f"o\n1\n {B64_ROOT}\n",
        f"o\r\n1\r\n{B64_ROOT}\r\n",
        f"o\t\n1\n{B64_ROOT}\n",
        f"o\n1\n{B64_ROOT}\next\x00\n",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(CheckpointError):
        Checkpoint.parse(text)


def test_parse_rejects_invalid_utf8() -> None:
    with pytest.raises(CheckpointError):
        Checkpoint.parse(b"\xff\n1\n" + B64_ROOT.encode() + b"\n")


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions"),
    [
        ("", 1, ROOT, ()),
        ("a\nb", 1, ROOT, ()),
        ("o", -1, ROOT, ()),
        ("o", True, ROOT, ()),
        ("o", 1, ROOT[:31], ()),
        ("o", 1, ROOT, ("",)),
        ("o", 1, ROOT, ("a\nb",)),
        ("o", 1, ROOT, ("medledger-block",)),
    ],
)
def test_constructor_validates(origin: str, size: int, root: bytes, extensions: Any) -> None:
    with pytest.raises(CheckpointError):
        Checkpoint(origin, size, root, extensions)


def test_constructor_normalises_extension_list() -> None:
    cp = Checkpoint("o", 1, ROOT, ["a", "b"])  # type: ignore[arg-type]
    assert cp.extensions == ("a", "b")
    with pytest.raises(CheckpointError):
        Checkpoint("o", 1, ROOT, "ab")  # type: ignore[arg-type]


# -- the medledger-block extension -------------------------------------------------------


def test_block_extension_roundtrip() -> None:
    block = BlockRef(42, H1, H2)
    cp = Checkpoint.for_block("o", 10, ROOT, block, extensions=["other"])
    assert cp.extensions[0] == (
        f"medledger-block 42 {base64.b64encode(H1).decode()} {base64.b64encode(H2).decode()}"
    )
    assert cp.extensions[1] == "other"
    parsed = Checkpoint.parse(cp.to_text())
    assert parsed == cp
    assert parsed.block_info() == block


def test_no_block_extension() -> None:
    assert Checkpoint("o", 1, ROOT, ("medledger-blocks 1",)).block_info() is None
    assert Checkpoint("o", 1, ROOT).block_info() is None


def test_vector_block_info() -> None:
    v = OURS["checkpoint"]
    cp = Checkpoint.parse(v["text"])
    assert (cp.origin, cp.size, cp.root.hex()) == (v["origin"], v["size"], v["root_hex"])
    block = cp.block_info()
    assert block is not None
    assert block.height == v["block"]["height"]
    assert block.block_hash.hex() == v["block"]["block_hash_hex"]
    assert block.state_root.hex() == v["block"]["state_root_hex"]
    assert cp.extensions == (v["extension"],)
    rebuilt = Checkpoint.for_block(
        v["origin"],
        v["size"],
        bytes.fromhex(v["root_hex"]),
        BlockRef(
            v["block"]["height"],
            bytes.fromhex(v["block"]["block_hash_hex"]),
            bytes.fromhex(v["block"]["state_root_hex"]),
        ),
    )
    assert rebuilt.to_text() == v["text"]


@pytest.mark.parametrize(
    "suffix",
    [
        "",
        " 1",
        " 1 {h1}",
        " 01 {h1} {h2}",
        " -1 {h1} {h2}",
        " 1 {h1} {h2} extra",
        " 1  {h1} {h2}",
        " 1 {h1} {short}",
        " 1 {hex} {h2}",
        f" {2**64} {{h1}} {{h2}}",
    ],
)
def test_bad_block_extension(suffix: str) -> None:
    line = "medledger-block" + suffix.format(
        h1=base64.b64encode(H1).decode(),
        h2=base64.b64encode(H2).decode(),
        short=base64.b64encode(H2[:31]).decode(),
        hex=H1.hex(),
    )
    with pytest.raises(CheckpointError):
        BlockRef.from_extension(line)
    with pytest.raises(CheckpointError):
        Checkpoint.parse(f"o\n1\n{B64_ROOT}\n{line}\n")


def test_two_block_extensions_rejected() -> None:
    line = BlockRef(1, H1, H2).to_extension()
    with pytest.raises(CheckpointError, match="more than one"):
        Checkpoint("o", 1, ROOT, (line, line))


@pytest.mark.parametrize(
    ("height", "block_hash", "state_root"),
    [(-1, H1, H2), (2**64, H1, H2), (1, H1[:31], H2), (1, H1, b""), (True, H1, H2)],
)
def test_blockref_validates(height: int, block_hash: bytes, state_root: bytes) -> None:
    with pytest.raises(CheckpointError):
        BlockRef(height, block_hash, state_root)


# -- signed checkpoints: the vector file ------------------------------------------------


def test_vector_note_verifies() -> None:
    cp = verify_checkpoint(OURS["note"], _vector_verifiers())
    assert cp.to_text() == OURS["checkpoint"]["text"]
    assert sign_checkpoint(cp, _vector_signers()[:1]) == OURS["note"]


def test_vector_cosigned_note_quorum() -> None:
    verifiers = _vector_verifiers()
    for q in (1, 2, 3):
        verify_checkpoint(OURS["cosigned_note"], verifiers, quorum=q)
    with pytest.raises(CheckpointError, match="3 of the 4"):
        verify_checkpoint(OURS["cosigned_note"], verifiers, quorum=4)
    cp = Checkpoint.parse(OURS["checkpoint"]["text"])
    assert sign_checkpoint(cp, _vector_signers()) == OURS["cosigned_note"]


def test_vector_invalid_list_is_present() -> None:
    # An emptied vector file must not make the damaged-copy tests vacuous.
    names = {case["name"] for case in OURS["invalid"]}
    assert len(OURS["invalid"]) >= 30
    for required in [
        "signature: one bit flipped",
        "signature: truncated to 63 bytes",
        "signature: wrong key hash (unknown key, so no verified signature)",
        "body changed: wrong size line",
        "body changed: origin",
        "extra blank line inside the body",
        "missing final newline",
        "validly signed body: size with leading zero",
    ]:
        assert required in names


@pytest.mark.parametrize("case", OURS["invalid"], ids=[c["name"] for c in OURS["invalid"]])
def test_vector_invalid_notes_rejected(case: dict[str, str]) -> None:
    verifiers = _vector_verifiers()
    with pytest.raises(CheckpointError):
        verify_checkpoint(case["note"], verifiers)
    if case["stage"] == "note":
        with pytest.raises(CheckpointError):
            open_note(case["note"], verifiers)
    else:
        # The signature is fine: it is the checkpoint body that is refused.
        text = open_note(case["note"], verifiers).text
        with pytest.raises(CheckpointError):
            Checkpoint.parse(text)


# -- co-signing by several organisations ----------------------------------------------------


@pytest.fixture
def three() -> list[NoteSigner]:
    return [_signer(i) for i in range(3)]


@pytest.fixture
def cp() -> Checkpoint:
    return Checkpoint.for_block("medledger.example/consortium", 12, ROOT, BlockRef(3, H1, H2))


def test_cosign_three_quorum(three: list[NoteSigner], cp: Checkpoint) -> None:
    verifiers = [s.verifier() for s in three]
    note = sign_checkpoint(cp, three[:1])
    with pytest.raises(CheckpointError, match="1 of the 2"):
        verify_checkpoint(note, verifiers, quorum=2)
    note = add_signatures(note, [three[1]], verifiers=verifiers)
    assert verify_checkpoint(note, verifiers, quorum=2) == cp
    with pytest.raises(CheckpointError, match="2 of the 3"):
        verify_checkpoint(note, verifiers, quorum=3)
    note = add_signatures(note, [three[2]], verifiers=verifiers)
    assert verify_checkpoint(note, verifiers, quorum=3) == cp
    assert note == sign_checkpoint(cp, three)


def test_quorum_ignores_unknown_signers(three: list[NoteSigner], cp: Checkpoint) -> None:
    strangers = [_signer(10), _signer(11)]
    note = sign_checkpoint(cp, [three[0], *strangers])
    verifiers = [s.verifier() for s in three]
    assert verify_checkpoint(note, verifiers, quorum=1) == cp
    with pytest.raises(CheckpointError):
        verify_checkpoint(note, verifiers, quorum=2)


def test_quorum_ignores_duplicate_lines(three: list[NoteSigner], cp: Checkpoint) -> None:
    note = sign_checkpoint(cp, three[:1])
    line = note.split("\n\n")[1]
    with pytest.raises(CheckpointError, match="1 of the 2"):
        verify_checkpoint(note + line + line, [s.verifier() for s in three], quorum=2)


def test_quorum_counts_one_org_with_two_keys_once(cp: Checkpoint) -> None:
    # Same key name, two keys (e.g. during rotation): one organisation.
    k1 = NoteSigner("org.example/log", SigningKey.from_seed(b"\x01" * 32))
    k2 = NoteSigner("org.example/log", SigningKey.from_seed(b"\x02" * 32))
    note = sign_checkpoint(cp, [k1, k2])
    verifiers = [k1.verifier(), k2.verifier()]
    assert len(open_note(note, verifiers).verified) == 2
    verify_checkpoint(note, verifiers, quorum=1)
    with pytest.raises(CheckpointError, match="1 of the 2"):
        verify_checkpoint(note, verifiers, quorum=2)


def test_quorum_counts_one_key_under_two_names_once(cp: Checkpoint) -> None:
    key = SigningKey.from_seed(b"\x03" * 32)
    a, b = NoteSigner("a.example/log", key), NoteSigner("b.example/log", key)
    note = sign_checkpoint(cp, [a, b])
    with pytest.raises(CheckpointError, match="1 of the 2"):
        verify_checkpoint(note, [a.verifier(), b.verifier()], quorum=2)


def test_bad_cosignature_from_known_key_rejects(three: list[NoteSigner], cp: Checkpoint) -> None:
    note = sign_checkpoint(cp, three[:2])
    forged = note + sign_note("not the checkpoint\n", [three[2]]).split("\n\n")[1]
    with pytest.raises(CheckpointError, match="invalid signature"):
        verify_checkpoint(forged, [s.verifier() for s in three])
    # A verifier that does not know the third key ignores the bad line.
    assert verify_checkpoint(forged, [s.verifier() for s in three[:2]], quorum=2) == cp


def test_origin_check(three: list[NoteSigner], cp: Checkpoint) -> None:
    note = sign_checkpoint(cp, three)
    verifiers = [s.verifier() for s in three]
    assert verify_checkpoint(note, verifiers, origin=cp.origin) == cp
    with pytest.raises(CheckpointError, match="origin"):
        verify_checkpoint(note, verifiers, origin="other.example/log")


@pytest.mark.parametrize("quorum", [0, -1, True])
def test_bad_quorum(quorum: int, three: list[NoteSigner], cp: Checkpoint) -> None:
    with pytest.raises(CheckpointError, match="quorum"):
        verify_checkpoint(sign_checkpoint(cp, three), [s.verifier() for s in three], quorum=quorum)


def test_no_known_signer(three: list[NoteSigner], cp: Checkpoint) -> None:
    with pytest.raises(CheckpointError, match="no verifiable"):
        verify_checkpoint(sign_checkpoint(cp, three), [_signer(99).verifier()])
