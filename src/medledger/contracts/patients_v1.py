"""Patients contract, version 1: pseudonymous patients, their links, keys and representatives.

No PHI reaches the ledger: a patient is a pseudonymous id (``pat-`` + 32 hex
digits); the link to an organisation's local identifier (MRN, ...) is a salted
commitment ``SHA-256(salt || identifier)`` computed off-ledger.

Transactions
------------
``patient.register`` (signed by an ``admin`` or ``node`` of the custodian org)::

    {"id": "pat-<32 hex>", "links": [{"org": <signer's org>, "commitment": 32 bytes}],
     "pub": 32 bytes | absent, "claim": 32 bytes | absent,
     "enc_key": bytes | absent, "enc_alg": int | absent}

Exactly one of ``pub`` (the patient's own Ed25519 key: the patient principal is
registered at once) and ``claim`` (``SHA-256(claim code)``, the code handed to
the patient off-ledger) must be given. Every link must name the signer's org.

``patient.claim`` (signed by the ``node`` of an org linked to the patient, on the
patient's behalf)::

    {"patient", "pub": 32 bytes, "claim_code": 16..64 bytes, "patient_sig": 64 bytes}

Checks ``SHA-256(claim_code) == claim`` and that ``patient_sig`` is the new key's
signature over :func:`claim_message` (domain, network, patient, pub, the node's
key id and the tx sequence number: a signature cannot be replayed by another
node or in another tx). Registers the patient principal with that key and
consumes the claim commitment. It may also carry ``enc_key``/``enc_alg``; the
patient's signature then covers them too (a relaying node cannot substitute
its own encryption key).

``enc_key``/``enc_alg`` (optional, always together) is the patient's HPKE
public encryption key (:mod:`medledger.crypto.kem`: ``enc_alg`` 2 = X25519,
3 = ML-KEM-768+X25519): custodians wrap every new record key for it too, so
the patient can open their own records with their own key.

``patient.set_enc_key`` (signed by the patient): ``{"patient", "enc_key",
"enc_alg"}`` sets or rotates that key (records written afterwards use it).

``patient.link`` (``admin``/``node`` of an org): ``{"patient", "commitment"}`` adds
a link for the signer's org.

``representative.register`` (signed by the patient): ``{"patient", "representative":
pid, "pub": 32 bytes | absent}``. When the representative principal does not
exist yet, ``pub`` registers it (kind ``representative``, no org); an existing
principal must be an active ``representative`` or ``patient``.

``representative.remove`` (signed by the patient): ``{"patient", "representative"}``.

State keys owned
----------------
::

    patient/<id>                       {"id", "links": [{"org", "commitment"}], "orgs": [..],
                                        "claim": bytes | None, "claimed": bool, "since",
                                        "enc_key": bytes, "enc_alg": int}  (enc_* only once set)
    representative/<patient>/<pid>     {"patient", "representative", "status", "since"}
    principal/<patient id>             (via core.register_principal) kind "patient", org None
"""

from __future__ import annotations

import re
from typing import Any

from medledger.contracts._common import (
    only_keys,
    opt_bytes,
    principal,
    req_bytes,
    req_id,
    require_kind,
)
from medledger.contracts.base import Effects, Env, Handler, get_obj, require_absent, require_obj
from medledger.contracts.core import k_principal, register_principal
from medledger.crypto.hashing import sha256
from medledger.crypto.kem import EncryptionPublicKey
from medledger.crypto.signing import VerifyKey
from medledger.encoding import encode
from medledger.errors import Conflict, CryptoError, MalformedTransaction, Unauthorized
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

__all__ = ["HANDLERS", "claim_message", "is_representative", "k_patient", "patient_enc_key"]

PATIENT_ID = re.compile(r"pat-[0-9a-f]{32}")
CLAIM_DOMAIN = b"medledger/patient-claim/v1\x00"
MAX_LINKS = 32


def k_patient(pid: str) -> bytes:
    return f"patient/{pid}".encode()


def k_representative(patient: str, rep: str) -> bytes:
    return f"representative/{patient}/{rep}".encode()


def is_representative(state: StateReader, patient: str, rep: str) -> bool:
    value = get_obj(state, k_representative(patient, rep))
    return value is not None and value["status"] == "active"


def claim_message(
    network: str,
    patient: str,
    pub: bytes,
    node_kid: bytes,
    seq: int,
    enc_key: bytes | None = None,
    enc_alg: int | None = None,
) -> bytes:
    """What the patient's new key signs to claim ``patient`` through a node's tx.

    ``enc_key``/``enc_alg`` are part of the message only when the claim carries them.
    """
    body: dict[str, Any] = {
        "net": network,
        "patient": patient,
        "pub": pub,
        "node": node_kid,
        "seq": seq,
    }
    if enc_key is not None:
        body["enc_key"] = enc_key
        body["enc_alg"] = enc_alg
    return CLAIM_DOMAIN + encode(body)


def _enc_key(payload: dict[str, Any], *, required: bool = False) -> tuple[bytes, int] | None:
    """The optional ``enc_key``/``enc_alg`` pair of a payload, validated as an HPKE public key."""
    key, alg = payload.get("enc_key"), payload.get("enc_alg")
    if key is None and alg is None and not required:
        return None
    if not isinstance(key, bytes) or not isinstance(alg, int) or isinstance(alg, bool):
        raise MalformedTransaction("enc_key (bytes) and enc_alg (int) must be given together")
    try:
        EncryptionPublicKey(alg, key)
    except CryptoError as exc:
        raise MalformedTransaction(f"enc_key is not a valid encryption key: {exc}") from exc
    return key, alg


def patient_enc_key(state: StateReader, patient: str) -> tuple[bytes, int] | None:
    """The patient's registered HPKE public key ``(raw, alg)``, if any."""
    record = get_obj(state, k_patient(patient))
    if record is None or record.get("enc_key") is None:
        return None
    return bytes(record["enc_key"]), int(record["enc_alg"])


def _custodian(env: Env, action: str) -> str:
    require_kind(env.principal, {"admin", "node"}, action)
    return str(env.principal["org"])


def _patient_id(payload: dict[str, Any], name: str = "patient") -> str:
    pid = payload.get(name)
    if not isinstance(pid, str) or not PATIENT_ID.fullmatch(pid):
        raise MalformedTransaction(f"{name} must be 'pat-' followed by 32 lowercase hex digits")
    return pid


def patient_register(state: StateReader, tx: Transaction, env: Env) -> Effects:
    org = _custodian(env, "patient.register")
    p = tx.payload
    only_keys(p, {"id", "links", "pub", "claim", "enc_key", "enc_alg"}, "patient.register")
    pid = _patient_id(p, "id")
    links_in = p.get("links")
    if not isinstance(links_in, list) or not 0 < len(links_in) <= MAX_LINKS:
        raise MalformedTransaction(f"links must list 1..{MAX_LINKS} {{org, commitment}}")
    links: list[dict[str, Any]] = []
    for i, link in enumerate(links_in):
        if not isinstance(link, dict):
            raise MalformedTransaction(f"links[{i}] must be a map")
        only_keys(link, {"org", "commitment"}, f"links[{i}]")
        if link.get("org") != org:
            raise Unauthorized(f"links[{i}]: an organisation may only link its own identifiers")
        commitment = req_bytes(link, "commitment", 32)
        if any(x["commitment"] == commitment for x in links):
            raise MalformedTransaction(f"links[{i}] is a duplicate")
        links.append({"org": org, "commitment": commitment})
    pub = opt_bytes(p, "pub", 32)
    claim = opt_bytes(p, "claim", 32)
    if (pub is None) == (claim is None):
        raise MalformedTransaction("give exactly one of pub (patient key) and claim (commitment)")
    enc = _enc_key(p)
    require_absent(state, k_patient(pid), f"patient {pid}")
    require_absent(state, k_principal(pid), f"principal {pid}")
    fx = Effects()
    if pub is not None:
        register_principal(
            fx, state, pid=pid, kind="patient", org=None, roles=[], pub=pub, height=env.height
        )
    record: dict[str, Any] = {
        "id": pid,
        "links": links,
        "orgs": [org],
        "claim": claim,
        "claimed": pub is not None,
        "since": env.height,
    }
    if enc is not None:
        record["enc_key"], record["enc_alg"] = enc
    fx.put(k_patient(pid), record)
    fx.emit("patient.registered", patient=pid, org=org)
    return fx


def patient_claim(state: StateReader, tx: Transaction, env: Env) -> Effects:
    require_kind(env.principal, {"node"}, "patient.claim")
    p = tx.payload
    only_keys(
        p, {"patient", "pub", "claim_code", "patient_sig", "enc_key", "enc_alg"}, "patient.claim"
    )
    pid = _patient_id(p)
    pub = req_bytes(p, "pub", 32)
    code = p.get("claim_code")
    if not isinstance(code, bytes) or not 16 <= len(code) <= 64:
        raise MalformedTransaction("claim_code must be 16..64 bytes")
    sig = req_bytes(p, "patient_sig", 64)
    enc = _enc_key(p)
    record = dict(require_obj(state, k_patient(pid), f"patient {pid}"))
    if env.principal["org"] not in record["orgs"]:
        raise Unauthorized("only the node of an org linked to the patient may relay a claim")
    if record["claimed"] or record["claim"] is None:
        raise Conflict(f"patient {pid} is already claimed")
    if sha256(code) != record["claim"]:
        raise Unauthorized("claim code does not match the registered commitment")
    try:
        key = VerifyKey(pub)
    except CryptoError as exc:
        raise MalformedTransaction("pub is not a valid Ed25519 key") from exc
    message = claim_message(
        env.network,
        pid,
        pub,
        tx.signer,
        tx.seq,
        None if enc is None else enc[0],
        None if enc is None else enc[1],
    )
    if not key.is_valid(sig, message):
        raise Unauthorized("patient_sig does not verify with the claimed key")
    fx = Effects()
    register_principal(
        fx, state, pid=pid, kind="patient", org=None, roles=[], pub=pub, height=env.height
    )
    record["claim"] = None
    record["claimed"] = True
    if enc is not None:
        record["enc_key"], record["enc_alg"] = enc
    fx.put(k_patient(pid), record)
    fx.emit("patient.claimed", patient=pid, via=env.principal["org"])
    return fx


def patient_link(state: StateReader, tx: Transaction, env: Env) -> Effects:
    org = _custodian(env, "patient.link")
    only_keys(tx.payload, {"patient", "commitment"}, "patient.link")
    pid = _patient_id(tx.payload)
    commitment = req_bytes(tx.payload, "commitment", 32)
    record = dict(require_obj(state, k_patient(pid), f"patient {pid}"))
    if any(x["commitment"] == commitment for x in record["links"]):
        raise Conflict("this link is already registered")
    if len(record["links"]) >= MAX_LINKS:
        raise Conflict(f"a patient has at most {MAX_LINKS} links")
    record["links"] = [*record["links"], {"org": org, "commitment": commitment}]
    record["orgs"] = sorted({*record["orgs"], org})
    fx = Effects()
    fx.put(k_patient(pid), record)
    fx.emit("patient.linked", patient=pid, org=org)
    return fx


def _signed_by_patient(env: Env, pid: str, action: str) -> None:
    if env.principal.get("kind") != "patient" or env.principal.get("id") != pid:
        raise Unauthorized(f"{action} must be signed by the patient")


def patient_set_enc_key(state: StateReader, tx: Transaction, env: Env) -> Effects:
    p = tx.payload
    only_keys(p, {"patient", "enc_key", "enc_alg"}, "patient.set_enc_key")
    pid = _patient_id(p)
    _signed_by_patient(env, pid, "patient.set_enc_key")
    enc = _enc_key(p, required=True)
    assert enc is not None
    record = dict(require_obj(state, k_patient(pid), f"patient {pid}"))
    record["enc_key"], record["enc_alg"] = enc
    fx = Effects()
    fx.put(k_patient(pid), record)
    fx.emit("patient.enc_key_set", patient=pid)
    return fx


def representative_register(state: StateReader, tx: Transaction, env: Env) -> Effects:
    p = tx.payload
    only_keys(p, {"patient", "representative", "pub"}, "representative.register")
    pid = _patient_id(p)
    rep = req_id(p, "representative")
    _signed_by_patient(env, pid, "representative.register")
    if rep == pid:
        raise MalformedTransaction("a patient cannot be their own representative")
    if is_representative(state, pid, rep):
        raise Conflict(f"{rep} already represents {pid}")
    pub = opt_bytes(p, "pub", 32)
    existing = principal(state, rep)
    fx = Effects()
    if existing is None:
        if pub is None:
            raise MalformedTransaction(f"principal {rep} does not exist: give its pub key")
        register_principal(
            fx,
            state,
            pid=rep,
            kind="representative",
            org=None,
            roles=[],
            pub=pub,
            height=env.height,
        )
    else:
        if pub is not None:
            raise Conflict(f"principal {rep} already exists; omit pub")
        if existing["kind"] not in ("representative", "patient") or existing["status"] != "active":
            raise Conflict(f"principal {rep} cannot act as a representative")
    fx.put(
        k_representative(pid, rep),
        {"patient": pid, "representative": rep, "status": "active", "since": env.height},
    )
    fx.emit("representative.registered", patient=pid, representative=rep)
    return fx


def representative_remove(state: StateReader, tx: Transaction, env: Env) -> Effects:
    only_keys(tx.payload, {"patient", "representative"}, "representative.remove")
    pid = _patient_id(tx.payload)
    rep = req_id(tx.payload, "representative")
    _signed_by_patient(env, pid, "representative.remove")
    if not is_representative(state, pid, rep):
        raise Conflict(f"{rep} does not represent {pid}")
    value = dict(require_obj(state, k_representative(pid, rep), "representative"))
    value["status"] = "removed"
    fx = Effects()
    fx.put(k_representative(pid, rep), value)
    fx.emit("representative.removed", patient=pid, representative=rep)
    return fx


HANDLERS: dict[str, Handler] = {
    "patient.register": patient_register,
    "patient.claim": patient_claim,
    "patient.link": patient_link,
    "patient.set_enc_key": patient_set_enc_key,
    "representative.register": representative_register,
    "representative.remove": representative_remove,
}
