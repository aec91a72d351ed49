"""C2SP signed-note: interop with Go's golang.org/x/mod/sumdb/note, plus our own rules.

The Go vectors (``vectors/published_notes.json``) were copied verbatim from
note_test.go; reproducing Go's signed note byte for byte from Go's private key is
the interoperability check.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from medledger.crypto.signing import SigningKey
from medledger.errors import CheckpointError
from medledger.ledger.note import (
    MAX_SIGNATURES,
    NoteSigner,
    NoteVerifier,
    Signature,
    add_signatures,
    b64decode_strict,
    is_valid_key_name,
    key_hash,
    open_note,
    sign_note,
    signature_lines,
)

VECTORS = Path(__file__).parent / "vectors"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


PUBLISHED = _load("published_notes.json")
GO = PUBLISHED["go_sumdb_note"]
OURS = _load("checkpoint_ed25519.json")

TEXT: str = GO["text"]
PETER_KEY: str = GO["peter"]["verifier_key"]
ENOCH_KEY: str = GO["enoch"]["verifier_key"]
PETER_SIG = GO["peter"]["signature_line"] + "\n"
ENOCH_SIG = GO["enoch"]["signature_line"] + "\n"


def _go_signer() -> NoteSigner:
    """Go's ``PRIVATE+KEY+<name>+<hash>+base64(0x01 || seed)`` as a NoteSigner."""
    priv, key, name, hash16, key64 = GO["signer_key"].split("+", 4)
    assert (priv, key) == ("PRIVATE", "KEY")
    raw = base64.b64decode(key64)
    assert raw[0] == 0x01
    signer = NoteSigner(name, SigningKey.from_seed(raw[1:]))
    assert signer.key_hash.hex() == hash16
    return signer


def _signer(i: int, name: str | None = None) -> NoteSigner:
    seed = hashlib.sha256(f"test_note signer {i}".encode()).digest()
    return NoteSigner(name or f"org-{i}.example/log", SigningKey.from_seed(seed))


@pytest.fixture
def peter() -> NoteVerifier:
    return NoteVerifier.from_verifier_key(PETER_KEY)


@pytest.fixture
def enoch() -> NoteVerifier:
    return NoteVerifier.from_verifier_key(ENOCH_KEY)


# -- interoperability with Go -----------------------------------------------------------


def test_go_signer_reproduces_published_note_byte_for_byte() -> None:
    signer = _go_signer()
    assert signer.verifier_key() == PETER_KEY
    assert sign_note(TEXT, [signer]) == GO["signed_note"]
    assert signer.sign(TEXT).base64 == GO["peter"]["signature_base64"]


def test_go_verifier_keys_parse(peter: NoteVerifier, enoch: NoteVerifier) -> None:
    assert peter.name == "PeterNeumann"
    assert peter.key_hash.hex() == GO["peter"]["key_hash_hex"]
    assert peter.verifier_key() == PETER_KEY
    assert enoch.name == "EnochRoot"
    assert enoch.key_hash.hex() == GO["enoch"]["key_hash_hex"]
    assert enoch.verifier_key() == ENOCH_KEY


def test_go_open_one_verified_one_unverified(peter: NoteVerifier) -> None:
    text, verified, unverified = open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [peter])
    assert text == TEXT
    assert [s.to_line() for s in verified] == [GO["peter"]["signature_line"]]
    assert unverified == (GO["enoch"]["signature_line"],)


def test_go_open_both_verified(peter: NoteVerifier, enoch: NoteVerifier) -> None:
    opened = open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [peter, enoch])
    assert [s.name for s in opened.verified] == ["PeterNeumann", "EnochRoot"]
    assert opened.unverified == ()
    assert opened.verified[1].base64 == GO["enoch"]["signature_base64"]


def test_go_open_without_known_keys_fails() -> None:
    with pytest.raises(CheckpointError, match="no verifiable signatures"):
        open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, [])


def test_go_open_accepts_bytes(peter: NoteVerifier) -> None:
    assert open_note(GO["signed_note"].encode(), [peter]).text == TEXT


def test_go_verifier_key_manglings_rejected() -> None:
    # As Go's TestNewVerifier: every proper substring and every single-byte increment fails.
    b = PETER_KEY
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(CheckpointError):
                    NoteVerifier.from_verifier_key(b[i:j])
    for i in range(len(b)):
        mangled = b[:i] + chr(ord(b[i]) + 1) + b[i + 1 :]
        with pytest.raises(CheckpointError):
            NoteVerifier.from_verifier_key(mangled)
    for bad in GO["bad_verifier_keys"]:
        with pytest.raises(CheckpointError):
            NoteVerifier.from_verifier_key(bad)


def test_go_verifier_key_uppercase_hex_accepted() -> None:
    name, hash16, key64 = PETER_KEY.split("+", 2)
    v = NoteVerifier.from_verifier_key(f"{name}+{hash16.upper()}+{key64}")
    assert v.verifier_key() == PETER_KEY  # written back canonically (lowercase)


def test_go_too_many_signatures(peter: NoteVerifier) -> None:
    ok = TEXT + "\n" + PETER_SIG * MAX_SIGNATURES
    assert len(open_note(ok, [peter]).verified) == 1
    for known in ([peter], []):
        with pytest.raises(CheckpointError, match="malformed"):
            open_note(TEXT + "\n" + PETER_SIG * (MAX_SIGNATURES + 1), known)


def test_spec_minimum_of_16_signatures_accepted() -> None:
    signers = [_signer(i) for i in range(16)]
    note = sign_note(TEXT, signers)
    opened = open_note(note, [s.verifier() for s in signers])
    assert len(opened.verified) == 16


def test_go_invalid_signature_from_known_key(peter: NoteVerifier) -> None:
    bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(CheckpointError, match="invalid signature for key PeterNeumann\\+c74f20a3"):
        open_note(TEXT + "\n" + bad, [peter])


def test_go_duplicate_lines_collapsed(peter: NoteVerifier) -> None:
    # Go's TestOpen: duplicated verified and unverified lines; the damaged Enoch line
    # is a different unknown-key line and is kept.
    enoch_abcd = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    note = TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_abcd
    opened = open_note(note, [peter])
    assert [s.name for s in opened.verified] == ["PeterNeumann"]
    assert opened.unverified == (ENOCH_SIG[:-1], enoch_abcd[:-1])


@pytest.mark.parametrize(
    "msg",
    [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT + "\n" + "\u2014 Bad Name " + GO["peter"]["signature_base64"],
        TEXT + "\n" + "\u2014 Bad Name " + GO["peter"]["signature_base64"] + "\n",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    ],
    ids=[
        "text-only",
        "no-signatures",
        "no-final-newline",
        "control-char",
        "name-with-space-no-newline",
        "name-with-space",
        "trailing-junk",
    ],
)
def test_go_malformed_messages(msg: str, peter: NoteVerifier) -> None:
    with pytest.raises(CheckpointError, match="malformed"):
        open_note(msg, [peter])


def test_go_invalid_utf8_rejected(peter: NoteVerifier) -> None:
    with pytest.raises(CheckpointError, match="UTF-8"):
        open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), [peter])
    with pytest.raises(CheckpointError, match="UTF-8"):
        open_note("\ud800" + TEXT + "\n" + PETER_SIG, [peter])


def test_ambiguous_known_keys(peter: NoteVerifier) -> None:
    # Two *different* keys sharing name and key hash cannot happen by accident; if the
    # configured list has them anyway, opening a note that uses them fails (as Go).
    other = NoteVerifier("PeterNeumann", _signer(1).key.public)
    other.key_hash = peter.key_hash
    with pytest.raises(CheckpointError, match="ambiguous"):
        open_note(GO["signed_note"], [peter, other])
    # The same key twice is fine.
    assert open_note(GO["signed_note"], [peter, peter]).text == TEXT


def test_same_name_other_hash_is_unknown(peter: NoteVerifier) -> None:
    # "Verifiers MUST ignore signatures from unknown keys, even if they share a name or
    # ID (but not both) with a known key."
    impostor = _signer(2, "PeterNeumann")
    note = add_signatures(GO["signed_note"], [impostor])
    opened = open_note(note, [peter])
    assert [s.name for s in opened.verified] == ["PeterNeumann"]
    assert opened.unverified == (impostor.sign(TEXT).to_line(),)


# -- the C2SP signed-note spec example ----------------------------------------------------


def test_spec_example_text_may_contain_empty_line() -> None:
    ex = PUBLISHED["c2sp_signed_note"]
    me = _signer(3)
    cosigned = add_signatures(ex["note"], [me])
    assert cosigned.startswith(ex["note"])
    text, verified, unverified = open_note(cosigned, [me.verifier()])
    assert text == ex["text"]
    assert "\n\n" in text
    assert [s.name for s in verified] == [me.name]
    assert len(unverified) == 1 and unverified[0].startswith("\u2014 quasimodo.example/salvatore ")


# -- our fixed-seed vector ------------------------------------------------------------------


def test_fixed_seed_vector_key_material() -> None:
    for k in OURS["keys"]:
        signer = NoteSigner(k["name"], SigningKey.from_seed(bytes.fromhex(k["seed_hex"])))
        assert signer.key.public.raw.hex() == k["public_key_hex"]
        # Key hash recomputed independently of medledger.
        expected = hashlib.sha256(
            k["name"].encode() + b"\n\x01" + bytes.fromhex(k["public_key_hex"])
        ).digest()[:4]
        assert signer.key_hash == expected == bytes.fromhex(k["key_hash_hex"])
        assert signer.verifier_key() == k["verifier_key"]
        assert k["verifier_key"] == "{}+{}+{}".format(
            k["name"],
            expected.hex(),
            base64.b64encode(b"\x01" + bytes.fromhex(k["public_key_hex"])).decode(),
        )
        v = NoteVerifier.from_verifier_key(k["verifier_key"])
        assert (v.name, v.key_hash, v.key.raw) == (
            signer.name,
            signer.key_hash,
            signer.key.public.raw,
        )


def test_fixed_seed_vector_signature_bytes() -> None:
    k = OURS["keys"][0]
    signer = NoteSigner(k["name"], SigningKey.from_seed(bytes.fromhex(k["seed_hex"])))
    text = OURS["checkpoint"]["text"]
    sig = signer.sign(text)
    assert sig.signature.hex() == OURS["signature_hex"]
    assert sig.to_line() == OURS["signature_line"]
    assert sign_note(text, [signer]) == OURS["note"]
    assert OURS["note"] == text + "\n" + OURS["signature_line"] + "\n"
    assert signer.verifier().verify(text, bytes.fromhex(OURS["signature_hex"]))


def test_fixed_seed_vector_cosigned_order() -> None:
    signers = [
        NoteSigner(k["name"], SigningKey.from_seed(bytes.fromhex(k["seed_hex"])))
        for k in OURS["keys"]
    ]
    text = OURS["checkpoint"]["text"]
    assert sign_note(text, signers) == OURS["cosigned_note"]
    # Co-signing one at a time gives the same bytes.
    note = sign_note(text, signers[:1])
    for s in signers[1:]:
        note = add_signatures(note, [s])
    assert note == OURS["cosigned_note"]


# -- signing / co-signing ------------------------------------------------------------------


def test_sign_and_open_roundtrip() -> None:
    s = _signer(1)
    note = sign_note("hello\nworld\n", [s])
    assert note == "hello\nworld\n\n" + s.sign("hello\nworld\n").to_line() + "\n"
    assert open_note(note, [s.verifier()]).text == "hello\nworld\n"


@pytest.mark.parametrize("text", ["", "no newline", "tab\there\n", "cr\r\n", "\ud800\n"])
def test_sign_rejects_bad_text(text: str) -> None:
    with pytest.raises(CheckpointError):
        sign_note(text, [_signer(1)])


def test_sign_requires_a_signer() -> None:
    with pytest.raises(CheckpointError):
        sign_note("x\n", [])


def test_sign_dedups_same_key() -> None:
    s = _signer(1)
    assert sign_note("x\n", [s, s]) == sign_note("x\n", [s])


def test_add_signatures_keeps_body_and_dedups() -> None:
    a, b, c = _signer(1), _signer(2), _signer(3)
    note = sign_note("body\n", [a])
    twice = add_signatures(add_signatures(note, [b]), [b, a])
    assert twice == sign_note("body\n", [a, b])
    three = add_signatures(twice, [c])
    assert three.startswith(twice)
    assert three == sign_note("body\n", [a, b, c])
    # An already duplicated line in the input is collapsed.
    dup = note + a.sign("body\n").to_line() + "\n"
    assert add_signatures(dup, [b]) == sign_note("body\n", [a, b])


def test_add_signatures_replaces_stale_line_of_same_key() -> None:
    a, b = _signer(1), _signer(2)
    note = sign_note("body\n", [a, b])
    stale = note.replace(a.sign("body\n").to_line(), a.sign("other\n").to_line())
    with pytest.raises(CheckpointError, match="invalid signature"):
        open_note(stale, [a.verifier()])
    fixed = add_signatures(stale, [a])
    assert fixed == sign_note("body\n", [b, a])
    assert len(open_note(fixed, [a.verifier(), b.verifier()]).verified) == 2


def test_add_signatures_can_verify_first() -> None:
    a, b = _signer(1), _signer(2)
    note = sign_note("body\n", [a])
    tampered = note.replace("body", "bodY", 1)
    assert add_signatures(tampered, [b])  # structure only: accepted
    with pytest.raises(CheckpointError):
        add_signatures(tampered, [b], verifiers=[a.verifier()])


def test_add_signatures_rejects_malformed() -> None:
    with pytest.raises(CheckpointError):
        add_signatures("body\n", [_signer(1)])


def test_add_signatures_limit() -> None:
    signers = [_signer(i) for i in range(MAX_SIGNATURES)]
    note = sign_note("x\n", signers)
    with pytest.raises(CheckpointError, match="more than"):
        add_signatures(note, [_signer(MAX_SIGNATURES)])


def test_unknown_signer_lines_ignored() -> None:
    a, stranger = _signer(1), _signer(9)
    note = sign_note("body\n", [stranger, a])
    opened = open_note(note, [a.verifier()])
    assert [s.name for s in opened.verified] == [a.name]
    assert opened.unverified == (stranger.sign("body\n").to_line(),)


def test_garbage_signature_from_unknown_key_is_ignored() -> None:
    a = _signer(1)
    junk = Signature("someone.example", b"\x00\x00\x00\x00", b"\x01").to_line()
    note = sign_note("body\n", [a]) + junk + "\n"
    assert open_note(note, [a.verifier()]).unverified == (junk,)


def test_second_distinct_line_from_known_key_must_verify() -> None:
    # Stricter than Go (which skips later lines of an already verified key).
    a = _signer(1)
    good = sign_note("body\n", [a])
    bad = Signature(a.name, a.key_hash, bytes(64)).to_line()
    with pytest.raises(CheckpointError, match="invalid signature"):
        open_note(good + bad + "\n", [a.verifier()])


# -- names, keys, signature lines ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "a b", "a+b", "a\tb", "a\u00a0b", "a\u2003b", "a\u3000b", "a\x85b", "a\nb", "\ud800"],
)
def test_invalid_key_names(name: str) -> None:
    assert not is_valid_key_name(name)
    with pytest.raises(CheckpointError):
        NoteSigner(name, _signer(1).key)


@pytest.mark.parametrize("name", ["a", "example.com/log", "h\u00f4pital.example/\u6c34", "a-b_c~"])
def test_valid_key_names(name: str) -> None:
    assert is_valid_key_name(name)
    assert NoteSigner(name, _signer(1).key).verifier().name == name


def test_key_hash_definition() -> None:
    s = _signer(1)
    assert key_hash(s.name, s.key.public.raw) == s.key_hash
    with pytest.raises(CheckpointError):
        key_hash("x", b"\x00" * 31)


@pytest.mark.parametrize(
    "line",
    [
        "\u2014 name",
        "\u2014 name ",
        "\u2014 name AAAA",  # 3 bytes: shorter than key hash + 1
        "\u2014 name AAAAAA==",  # 4 bytes: key hash only
        "\u2014 name AAAAAAA",  # missing padding
        "\u2014 name AAAAAAB=",  # non-zero trailing bits
        "\u2014 name AAAAAA-_",  # URL-safe alphabet
        "\u2014  name AAAAAAA=",
        "\u2014name AAAAAAA=",
        "\u2013 name AAAAAAA=",
        "- name AAAAAAA=",
        "\u2014 a+b AAAAAAA=",
    ],
)
def test_malformed_signature_lines(line: str) -> None:
    with pytest.raises(CheckpointError):
        Signature.parse_line(line)
    with pytest.raises(CheckpointError, match="malformed"):
        open_note("x\n\n" + line + "\n", [_signer(1).verifier()])


def test_signature_line_roundtrip() -> None:
    sig = Signature.parse_line("\u2014 name AAAAAAA=")
    assert (sig.name, sig.key_hash, sig.signature) == ("name", b"\x00" * 4, b"\x00")
    assert sig.to_line() == "\u2014 name AAAAAAA="


def test_b64decode_strict() -> None:
    assert b64decode_strict("") == b""
    assert b64decode_strict("AQID") == b"\x01\x02\x03"
    assert b64decode_strict("AQ==") == b"\x01"
    for bad in ["AQ", "AQ=", "AR==", "A===", "AQID\n", " AQID", "AQ-_", "AQ==AQ=="]:
        assert b64decode_strict(bad) is None, bad


def test_verifier_verify_api() -> None:
    s = _signer(1)
    v = s.verifier()
    sig = s.sign("m\n")
    assert v.verify("m\n", sig)
    assert v.verify(b"m\n", sig.signature)
    assert not v.verify("n\n", sig)
    assert not v.verify("m\n", sig.signature[:63])
    assert not v.verify("m\n", Signature("other", sig.key_hash, sig.signature))
    assert not _signer(2).verifier().verify("m\n", sig.signature)


def test_signature_lines_are_parsed_without_checking_them() -> None:
    a, b = (
        NoteSigner("example.com/a", SigningKey.generate()),
        NoteSigner("example.com/b", SigningKey.generate()),
    )
    note = sign_note("some text\n", [a, b])
    got = signature_lines(note)
    assert [line for line, _ in got] == note.split("\n\n", 1)[1].splitlines()
    assert [(sig.name, sig.key_hash) for _, sig in got] == [
        (a.name, a.verifier().key_hash),
        (b.name, b.verifier().key_hash),
    ]
    forged = note.replace(got[0][0], got[0][0][:-4] + "AAA=")  # a bad signature: still listed
    assert len(signature_lines(forged)) == 2
    with pytest.raises(CheckpointError):
        signature_lines("no signatures\n")
