"""The in-browser verifier (static/verify.js) run in headless Chromium.

Known-good and tampered inclusion proofs and checkpoints come from a real
ledger built here in Python; the published RFC 9162 and C2SP/Go signed-note
vectors the Python verifiers are tested with must give the same verdicts in
JavaScript. Anything tampered must NOT verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from medledger.crypto.signing import SigningKey
from medledger.datadir import DataDir
from medledger.ledger.checkpoint import checkpoint_of
from medledger.ledger.note import NoteSigner, note_text, sign_note
from medledger.ledger.tx import make_tx

from .conftest import ServerThread

TESTS = Path(__file__).resolve().parents[1]
MERKLE_VECTORS = TESTS / "merkle" / "testdata" / "rfc9162-vectors"
NOTE_VECTORS = TESTS / "ledger" / "vectors"

RUN_CASES = """
async (cases) => {
  const v = await import('/static/verify.js');
  const hex = (b64) => b64;
  const out = [];
  for (const c of cases) {
    try {
      let result = null;
      if (c.kind === 'entry') {
        const bytes = Uint8Array.from(atob(c.entry), (ch) => ch.charCodeAt(0));
        result = await v.verifyEntry({entryBytes: bytes, txId: c.txId, proof: c.proof,
                                      verifierKeys: c.keys, quorum: c.quorum || 1});
      } else if (c.kind === 'inclusion') {
        await v.verifyInclusion(c.index, c.size, c.leaf, c.proof, c.root);
      } else if (c.kind === 'consistency') {
        await v.verifyConsistency(c.size1, c.size2, c.proof, c.root1, c.root2);
      } else if (c.kind === 'checkpoint') {
        result = await v.verifyCheckpoint(c.note, c.keys, {quorum: c.quorum || 1});
        result = {signers: result.signers, size: String(result.size)};
      } else if (c.kind === 'note') {
        const keys = [];
        for (const k of c.keys) keys.push(await v.parseVerifierKey(k));
        result = await v.openNote(c.note, keys);
      } else if (c.kind === 'vkey') {
        await v.parseVerifierKey(c.key);
      }
      out.push({name: c.name, ok: true, result: result});
    } catch (e) {
      out.push({name: c.name, ok: false, error: String(e && e.message || e),
                typed: e instanceof v.VerifyError});
    }
  }
  return out;
}
"""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hex64(b64: str) -> str:
    return base64.b64decode(b64).hex()


async def _run(page: Page, cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    results = await page.evaluate(RUN_CASES, cases)
    assert len(results) == len(cases)
    return {r["name"]: r for r in results}


async def _page(browser: Browser, server: ServerThread) -> Page:
    page = await browser.new_page()
    await page.goto(server.url + "/static/index.html")
    return page


@pytest.fixture
async def ledger(tmp_path: Path) -> dict[str, Any]:
    """A three-organisation embedded ledger with 40 transactions in several blocks."""
    dd = DataDir(tmp_path / "node")
    node = await dd.init_embedded(
        network="medledger-webtest", orgs=[("h1", "Hospital"), ("c1", "Clinic"), ("l1", "Lab")]
    )
    admin = dd.identity("admin-h1")
    await node.start()
    try:
        now = int(time.time() * 1000)
        sizes = []
        seq = 0
        for batch in (1, 6, 13, 20):
            txs = []
            for _ in range(batch):
                seq += 1
                digest = hashlib.sha256(f"doc {seq}".encode()).digest()
                txs.append(
                    make_tx(
                        admin.signing,
                        node.network,
                        "note.anchor",
                        {"digest": digest, "kind": "document"},
                        seq=seq,
                        time=now,
                    )
                )
            for tx in txs:
                await node.submit(tx)
            sizes.append(node.head.log_size)
        recs = await node.list_txs(0, 1000)
        proofs = {}
        for rec in recs:
            p = await node.inclusion_proof(rec.tx_id)
            proofs[rec.index] = {"raw": rec.raw, "tx_id": rec.tx_id.hex(), "proof": p.to_json()}
        consistency = []
        for a, b in [(1, 7), (7, 20), (3, 40), (20, 40), (40, 40), (1, 40)]:
            r1, r2, cp = await node.consistency_proof(a, b)
            consistency.append((a, b, r1.hex(), r2.hex(), [h.hex() for h in cp]))
        return {
            "proofs": proofs,
            "keys": node.verifier_keys(),
            "note": await node.checkpoint(),
            "consistency": consistency,
            "size": node.head.log_size,
        }
    finally:
        await node.close()


def _entry_case(name: str, p: dict[str, Any], keys: list[str], **over: Any) -> dict[str, Any]:
    case = {
        "kind": "entry",
        "name": name,
        "entry": _b64(p["raw"]),
        "txId": p["tx_id"],
        "proof": dict(p["proof"]),
        "keys": keys,
    }
    case.update(over)
    return case


def _flip_hex(h: str, pos: int = 0) -> str:
    raw = bytearray(bytes.fromhex(h))
    raw[pos] ^= 0x01
    return raw.hex()


async def test_good_inclusion_proofs_verify_tampered_ones_do_not(
    browser: Browser, static_server: ServerThread, ledger: dict[str, Any]
) -> None:
    keys: list[str] = ledger["keys"]
    proofs = ledger["proofs"]
    size = ledger["size"]
    assert size == 40 and len(keys) == 3
    good = [_entry_case(f"good-{i}", proofs[i], keys) for i in (0, 1, 6, 19, 20, 33, 39)]

    p = proofs[19]
    pr = p["proof"]
    other = proofs[20]
    unknown = NoteSigner("medledger-webtest/h1", SigningKey.generate())
    forged_note = sign_note(note_text(pr["checkpoint"]), [unknown])
    cp = checkpoint_of(pr["checkpoint"])
    other_root = _b64(hashlib.sha256(b"another root").digest())
    body_lines = note_text(pr["checkpoint"]).split("\n")
    body_lines[2] = other_root
    rerooted = "\n".join(body_lines) + pr["checkpoint"][len(note_text(pr["checkpoint"])) :]
    raw = bytearray(p["raw"])
    raw[len(raw) // 2] ^= 0x20
    bad = [
        _entry_case(
            "proof hash flipped",
            p,
            keys,
            proof={**pr, "proof": [_flip_hex(pr["proof"][0]), *pr["proof"][1:]]},
        ),
        _entry_case(
            "last proof hash flipped",
            p,
            keys,
            proof={**pr, "proof": [*pr["proof"][:-1], _flip_hex(pr["proof"][-1], 31)]},
        ),
        _entry_case("proof truncated", p, keys, proof={**pr, "proof": pr["proof"][:-1]}),
        _entry_case(
            "proof extended", p, keys, proof={**pr, "proof": [*pr["proof"], pr["proof"][0]]}
        ),
        _entry_case("proof reversed", p, keys, proof={**pr, "proof": list(reversed(pr["proof"]))}),
        _entry_case("leaf index + 1", p, keys, proof={**pr, "leaf_index": pr["leaf_index"] + 1}),
        _entry_case("tree size - 1", p, keys, proof={**pr, "tree_size": pr["tree_size"] - 1}),
        _entry_case("proof of another entry", p, keys, proof=other["proof"]),
        _entry_case("entry bytes altered", p, keys, entry=_b64(bytes(raw))),
        _entry_case(
            "entry bytes altered, id recomputed",
            p,
            keys,
            entry=_b64(bytes(raw)),
            txId=hashlib.sha256(bytes(raw)).hexdigest(),
        ),
        _entry_case("wrong tx id", p, keys, txId=other["tx_id"]),
        _entry_case("checkpoint root replaced", p, keys, proof={**pr, "checkpoint": rerooted}),
        _entry_case(
            "checkpoint signed by an unknown key", p, keys, proof={**pr, "checkpoint": forged_note}
        ),
        _entry_case(
            "checkpoint without signatures",
            p,
            keys,
            proof={**pr, "checkpoint": note_text(pr["checkpoint"])},
        ),
        _entry_case("no known verifier keys", p, [unknown.verifier_key()]),
        _entry_case("quorum of four", p, keys, quorum=4),
    ]
    page = await _page(browser, static_server)
    results = await _run(page, good + bad)
    for case in good:
        r = results[case["name"]]
        assert r["ok"], r
        assert r["result"]["treeSize"] == size
        assert sorted(r["result"]["signers"]) == sorted(k.split("+")[0] for k in keys)
        assert r["result"]["origin"] == cp.origin
    for case in bad:
        r = results[case["name"]]
        assert not r["ok"], f"{case['name']} was accepted"
        assert r["typed"], r  # a VerifyError, not a crash
    assert results["quorum of four"]["error"].startswith("checkpoint has 3 of 4")


async def test_consistency_proofs(
    browser: Browser, static_server: ServerThread, ledger: dict[str, Any]
) -> None:
    cases = []
    for a, b, r1, r2, proof in ledger["consistency"]:
        cases.append(
            {
                "kind": "consistency",
                "name": f"good {a}->{b}",
                "size1": a,
                "size2": b,
                "proof": proof,
                "root1": r1,
                "root2": r2,
            }
        )
        if proof:
            cases.append(
                {
                    "kind": "consistency",
                    "name": f"flipped {a}->{b}",
                    "size1": a,
                    "size2": b,
                    "proof": [_flip_hex(proof[0]), *proof[1:]],
                    "root1": r1,
                    "root2": r2,
                }
            )
        cases.append(
            {
                "kind": "consistency",
                "name": f"swapped roots {a}->{b}",
                "size1": a,
                "size2": b,
                "proof": proof,
                "root1": r2,
                "root2": r1,
            }
        )
    page = await _page(browser, static_server)
    results = await _run(page, cases)
    for c in cases:
        r = results[c["name"]]
        if c["name"].startswith("good") or (c["size1"] == c["size2"] and "swapped" in c["name"]):
            assert r["ok"], r
        else:
            assert not r["ok"], c["name"]


def _vector_cases(kind: str) -> list[dict[str, Any]]:
    cases = []
    for path in sorted((MERKLE_VECTORS / kind).rglob("*.json")):
        v = json.loads(path.read_text())
        name = f"{kind}/{path.relative_to(MERKLE_VECTORS / kind)}"
        proof = [_hex64(h) for h in (v.get("proof") or [])]
        if kind == "inclusion":
            cases.append(
                {
                    "kind": "inclusion",
                    "name": name,
                    "want": not v["wantErr"],
                    "index": v["leafIdx"],
                    "size": v["treeSize"],
                    "leaf": _hex64(v["leafHash"]),
                    "proof": proof,
                    "root": _hex64(v["root"]),
                }
            )
        else:
            cases.append(
                {
                    "kind": "consistency",
                    "name": name,
                    "want": not v["wantErr"],
                    "size1": v["size1"],
                    "size2": v["size2"],
                    "proof": proof,
                    "root1": _hex64(v["root1"]),
                    "root2": _hex64(v["root2"]),
                }
            )
    return cases


async def test_rfc9162_vectors(browser: Browser, static_server: ServerThread) -> None:
    """The transparency-dev vectors: only the valid ones verify, in the browser too."""
    cases = _vector_cases("inclusion") + _vector_cases("consistency")
    assert len(cases) > 100
    page = await _page(browser, static_server)
    results = await _run(page, cases)
    wrong = [c["name"] for c in cases if results[c["name"]]["ok"] != c["want"]]
    assert not wrong, wrong


async def test_signed_note_and_checkpoint_vectors(
    browser: Browser, static_server: ServerThread
) -> None:
    ours = json.loads((NOTE_VECTORS / "checkpoint_ed25519.json").read_text())
    published = json.loads((NOTE_VECTORS / "published_notes.json").read_text())
    keys = [k["verifier_key"] for k in ours["keys"]]
    go = published["go_sumdb_note"]
    cases: list[dict[str, Any]] = [
        {"kind": "checkpoint", "name": "our note", "note": ours["note"], "keys": keys},
        {
            "kind": "checkpoint",
            "name": "co-signed note",
            "note": ours["cosigned_note"],
            "keys": keys,
            "quorum": 3,
        },
        {
            "kind": "note",
            "name": "go sumdb note",
            "note": go["signed_note"],
            "keys": [go["peter"]["verifier_key"]],
        },
        {
            "kind": "note",
            "name": "go note, other key only",
            "note": go["signed_note"],
            "keys": [go["enoch"]["verifier_key"]],
        },
    ]
    cases += [
        {"kind": "vkey", "name": f"bad vkey {i}", "key": k}
        for i, k in enumerate(go["bad_verifier_keys"])
    ]
    cases += [
        {"kind": "checkpoint", "name": f"invalid: {c['name']}", "note": c["note"], "keys": keys}
        for c in ours["invalid"]
    ]
    page = await _page(browser, static_server)
    results = await _run(page, cases)
    assert results["our note"]["ok"], results["our note"]
    assert results["our note"]["result"]["size"] == str(ours["checkpoint"]["size"])
    assert results["co-signed note"]["ok"], results["co-signed note"]
    assert len(results["co-signed note"]["result"]["signers"]) == 3
    assert results["go sumdb note"]["ok"], results["go sumdb note"]
    assert results["go sumdb note"]["result"]["verified"] == ["PeterNeumann"]
    assert not results["go note, other key only"]["ok"]
    accepted = [
        c["name"]
        for c in cases
        if c["name"].startswith(("invalid", "bad vkey")) and results[c["name"]]["ok"]
    ]
    assert not accepted, accepted


async def test_cbor_decoder_reads_transactions(
    browser: Browser, static_server: ServerThread, ledger: dict[str, Any]
) -> None:
    """The decoder the audit view uses to read a verified entry's own bytes."""
    p = ledger["proofs"][5]
    page = await _page(browser, static_server)
    got = await page.evaluate(
        """async (b64) => {
          const {decodeCbor} = await import('/static/cbor.js');
          const tx = decodeCbor(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)));
          let trailing = null;
          try { decodeCbor(Uint8Array.from(atob(b64 ), (c) => c.charCodeAt(0)).slice(0, 10)); }
          catch (e) { trailing = String(e.message); }
          return {type: tx.type, net: tx.net, seq: tx.seq, kind: tx.payload.kind,
                  digestLen: tx.payload.digest.length, trailing};
        }""",
        _b64(p["raw"]),
    )
    assert got == {
        "type": "note.anchor",
        "net": "medledger-webtest",
        "seq": 6,
        "kind": "document",
        "digestLen": 32,
        "trailing": "truncated CBOR",
    }
