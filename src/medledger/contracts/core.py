"""The core contract: genesis, principals and their keys, key rotation, anchors.

State layout (keys are ASCII, values canonical CBOR)::

    cfg/network          network configuration (policy, contract activations)
    org/<org id>         {"id", "name", "node_key", "enc_key", "enc_alg", "status", "since"}
    principal/<pid>      {"id", "kind", "org", "roles", "status", "keys": [kid hex, ...]}
    key/<kid hex>        {"pub", "alg", "principal", "from", "until"}   until: height or None
    seq/<kid hex>        last sequence number used by that key (int)
    anchor/<digest hex>  {"by", "kind", "height", "tx"}

Principal kinds: ``node`` (an organisation's node key), ``admin``,
``practitioner``, ``app``, ``patient``, ``representative``.

Key rotation: ``key.rotate`` is signed by the current key and names the new
public key. The old key's ``until`` is set to the rotation height: it verifies
everything it signed before, and signs nothing after.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from medledger.contracts.base import Effects, Env, get_obj, require_absent
from medledger.crypto.kem import ENC_PUBLIC_SIZES
from medledger.crypto.signing import ALG_ED25519, VerifyKey
from medledger.errors import (
    Conflict,
    MalformedTransaction,
    MedledgerError,
    Unauthorized,
    UnknownSigner,
)
from medledger.ledger.tx import Transaction
from medledger.state.base import StateReader

__all__ = [
    "DEFAULT_POLICY",
    "HANDLERS",
    "SIGNER_STATE",
    "GenesisError",
    "check_signer",
    "genesis_effects",
    "k_key",
    "k_org",
    "k_principal",
    "k_seq",
    "normalise_genesis",
    "register_node",
    "register_principal",
]

DEFAULT_POLICY: dict[str, Any] = {
    "consent_default": "opt-in",
    "break_glass_minutes": 60,
    "break_glass_review_hours": 72,
    "max_tx_skew_ms": 10 * 60 * 1000,
}

ROLES = (
    "physician",
    "nurse",
    "lab",
    "pharmacist",
    "emergency-clinician",
    "privacy-officer",
    "admin",
)


class GenesisError(MedledgerError):
    """The genesis document is invalid."""

    code = "genesis"


def k_org(org_id: str) -> bytes:
    return b"org/" + org_id.encode()


def k_principal(pid: str) -> bytes:
    return b"principal/" + pid.encode()


def k_key(kid: bytes) -> bytes:
    return b"key/" + kid.hex().encode()


def k_seq(kid: bytes) -> bytes:
    return b"seq/" + kid.hex().encode()


#: Key prefixes of the state :func:`check_signer` reads (signing keys, principals,
#: organisations): a write under one of them may change who may sign.
SIGNER_STATE = (k_key(b""), k_principal(""), k_org(""))


def _b(value: Any, what: str, size: int | None = None) -> bytes:
    """Accept bytes, or base64 / hex text (as written in a JSON genesis file)."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        try:
            raw = (
                bytes.fromhex(value)
                if len(value) == 2 * (size or 0)
                else base64.b64decode(value, validate=True)
            )
        except ValueError as exc:
            raise GenesisError(f"{what}: not hex or base64") from exc
    else:
        raise GenesisError(f"{what}: expected bytes")
    if size is not None and len(raw) != size:
        raise GenesisError(f"{what}: expected {size} bytes, got {len(raw)}")
    return raw


def normalise_genesis(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a genesis document (as loaded from JSON) into its canonical form.

    The canonical form is what is hashed into block 0, so every node derives the
    same genesis from the same file.
    """
    if not isinstance(doc, Mapping):
        raise GenesisError("genesis must be a JSON object")
    network = doc.get("network")
    if not isinstance(network, str) or not network or any(c in network for c in " +\n"):
        raise GenesisError("genesis.network must be a non-empty name without spaces or '+'")
    time = doc.get("time")
    if not isinstance(time, int) or isinstance(time, bool) or time < 0:
        raise GenesisError("genesis.time must be milliseconds since the epoch")
    orgs_in = doc.get("orgs")
    if not isinstance(orgs_in, list) or not orgs_in:
        raise GenesisError("genesis.orgs must list at least one organisation")
    orgs = []
    seen: set[str] = set()
    for i, org in enumerate(orgs_in):
        if not isinstance(org, Mapping):
            raise GenesisError(f"genesis.orgs[{i}] must be an object")
        oid = org.get("id")
        if not isinstance(oid, str) or not oid or "/" in oid:
            raise GenesisError(f"genesis.orgs[{i}].id must be a non-empty id without '/'")
        if oid in seen:
            raise GenesisError(f"duplicate organisation id {oid}")
        seen.add(oid)
        enc_alg = int(org.get("enc_alg", 2))
        if enc_alg not in ENC_PUBLIC_SIZES:
            raise GenesisError(f"genesis.orgs[{i}].enc_alg {enc_alg} is not a known algorithm")
        orgs.append(
            {
                "id": oid,
                "name": str(org.get("name", oid)),
                "node_key": _b(org.get("node_key"), f"orgs[{i}].node_key", 32),
                "enc_key": _b(org.get("enc_key"), f"orgs[{i}].enc_key", ENC_PUBLIC_SIZES[enc_alg]),
                "enc_alg": enc_alg,
            }
        )
    admins = []
    for i, adm in enumerate(doc.get("admins") or []):
        if not isinstance(adm, Mapping):
            raise GenesisError(f"genesis.admins[{i}] must be an object")
        aid, org = adm.get("id"), adm.get("org")
        if not isinstance(aid, str) or not aid or org not in seen:
            raise GenesisError(f"genesis.admins[{i}] needs an id and a known org")
        admins.append({"id": aid, "org": org, "key": _b(adm.get("key"), f"admins[{i}].key", 32)})
    policy = dict(DEFAULT_POLICY)
    policy.update(doc.get("policy") or {})
    if policy["consent_default"] not in ("opt-in", "opt-out"):
        raise GenesisError("policy.consent_default must be opt-in or opt-out")
    for name in ("break_glass_minutes", "break_glass_review_hours", "max_tx_skew_ms"):
        if not isinstance(policy[name], int) or policy[name] <= 0:
            raise GenesisError(f"policy.{name} must be a positive integer")
    contracts = {
        str(name): [[int(h), int(v)] for h, v in plan]
        for name, plan in (doc.get("contracts") or {}).items()
    }
    return {
        "network": network,
        "time": time,
        "orgs": orgs,
        "admins": admins,
        "policy": policy,
        "contracts": contracts,
    }


def register_principal(
    fx: Effects,
    state: StateReader,
    *,
    pid: str,
    kind: str,
    org: str | None,
    roles: list[str],
    pub: bytes,
    height: int,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    """Write a new principal with its first signing key; returns the key id.

    Refuses (Conflict) an existing principal id or an already registered key.
    """
    try:
        kid = VerifyKey(pub).key_id
    except MedledgerError as exc:
        raise MalformedTransaction(f"invalid public key for {pid}") from exc
    require_absent(state, k_principal(pid), f"principal {pid}")
    if state.get(k_key(kid)) is not None or kid.hex().encode() in _pending_keys(fx):
        raise Conflict(f"key {kid.hex()} is already registered")
    record: dict[str, Any] = {
        "id": pid,
        "kind": kind,
        "org": org,
        "roles": sorted(roles),
        "status": "active",
        "keys": [kid.hex()],
        "since": height,
    }
    if extra:
        record.update(extra)
    fx.put(k_principal(pid), record)
    fx.put(
        k_key(kid),
        {"pub": pub, "alg": ALG_ED25519, "principal": pid, "from": height, "until": None},
    )
    return kid


def register_node(fx: Effects, state: StateReader, org: Mapping[str, Any], *, height: int) -> bytes:
    """Register an organisation's node principal ``node:<org id>`` with its node key."""
    return register_principal(
        fx,
        state,
        pid=f"node:{org['id']}",
        kind="node",
        org=org["id"],
        roles=[],
        pub=org["node_key"],
        height=height,
    )


def _pending_keys(fx: Effects) -> set[bytes]:
    return {k[4:] for k in fx.writes if k.startswith(b"key/")}


def genesis_effects(genesis: Mapping[str, Any]) -> Effects:
    """The writes that make the initial state of a (normalised) genesis."""
    from medledger.state.base import MemoryState

    fx = Effects()
    empty = MemoryState()
    config = {
        "network": genesis["network"],
        "policy": genesis["policy"],
        "contracts": genesis["contracts"],
        "genesis_time": genesis["time"],
    }
    fx.put(b"cfg/network", config)
    for org in genesis["orgs"]:
        fx.put(
            k_org(org["id"]),
            {
                "id": org["id"],
                "name": org["name"],
                "node_key": org["node_key"],
                "enc_key": org["enc_key"],
                "enc_alg": org["enc_alg"],
                "status": "active",
                "since": 0,
            },
        )
        register_node(fx, empty, org, height=0)
    for adm in genesis["admins"]:
        register_principal(
            fx,
            empty,
            pid=adm["id"],
            kind="admin",
            org=adm["org"],
            roles=["admin"],
            pub=adm["key"],
            height=0,
        )
    return fx


def check_signer(state: StateReader, tx: Transaction, height: int) -> Mapping[str, Any]:
    """Resolve and check the signer: a registered, current key of an active principal.

    Returns the principal record. Raises :class:`UnknownSigner` for an
    unregistered or retired key, :class:`Unauthorized` for a suspended principal
    or an organisation that is not active.
    """
    key = get_obj(state, k_key(tx.signer))
    if key is None:
        raise UnknownSigner(f"key {tx.signer.hex()} is not registered on this network")
    if key["pub"] != tx.pub:
        raise UnknownSigner(f"key {tx.signer.hex()} is registered with another public key")
    if key["until"] is not None and height >= key["until"]:
        raise UnknownSigner(f"key {tx.signer.hex()} was retired at height {key['until']}")
    principal = get_obj(state, k_principal(key["principal"]))
    if principal is None:  # pragma: no cover - state invariant
        raise UnknownSigner(f"principal {key['principal']} is missing")
    if principal["status"] != "active":
        raise Unauthorized(f"principal {principal['id']} is {principal['status']}")
    org_id = principal.get("org")
    if org_id is not None:
        org = get_obj(state, k_org(org_id))
        if org is None or org["status"] != "active":
            status = "unknown" if org is None else org["status"]
            raise Unauthorized(f"organisation {org_id} is {status}")
    result: Mapping[str, Any] = principal
    return result


# -- transaction handlers -----------------------------------------------------------


def key_rotate(state: StateReader, tx: Transaction, env: Env) -> Effects:
    """Retire the signing key and register ``payload.pub`` for the same principal."""
    new_pub = tx.payload.get("pub")
    if not isinstance(new_pub, bytes) or len(new_pub) != 32:
        raise MalformedTransaction("key.rotate needs payload.pub, a 32-byte Ed25519 key")
    if set(tx.payload) != {"pub"}:
        raise MalformedTransaction("key.rotate takes only payload.pub")
    try:
        new_kid = VerifyKey(new_pub).key_id
    except MedledgerError as exc:
        raise MalformedTransaction("payload.pub is not a valid Ed25519 key") from exc
    if state.get(k_key(new_kid)) is not None:
        raise Conflict("the new key is already registered")
    fx = Effects()
    old = get_obj(state, k_key(tx.signer))
    old["until"] = env.height  # signed this transaction; signs nothing after it
    fx.put(k_key(tx.signer), old)
    principal = dict(env.principal)
    principal["keys"] = [*principal["keys"], new_kid.hex()]
    fx.put(k_principal(principal["id"]), principal)
    fx.put(
        k_key(new_kid),
        {
            "pub": new_pub,
            "alg": ALG_ED25519,
            "principal": principal["id"],
            "from": env.height,
            "until": None,
        },
    )
    fx.emit("key.rotated", principal=principal["id"], old=tx.signer, new=new_kid)
    return fx


ANCHOR_KINDS = frozenset({"document", "dataset", "report", "other"})


def note_anchor(state: StateReader, tx: Transaction, env: Env) -> Effects:
    """Anchor the SHA-256 digest of an off-ledger document (a notarisation)."""
    digest, kind = tx.payload.get("digest"), tx.payload.get("kind", "other")
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise MalformedTransaction("note.anchor needs payload.digest, 32 bytes")
    if kind not in ANCHOR_KINDS or set(tx.payload) - {"digest", "kind"}:
        raise MalformedTransaction(f"note.anchor kind must be one of {sorted(ANCHOR_KINDS)}")
    key = b"anchor/" + digest.hex().encode()
    if state.get(key) is not None:
        raise Conflict(f"digest {digest.hex()} is already anchored")
    fx = Effects()
    fx.put(key, {"by": env.principal["id"], "kind": kind, "height": env.height, "tx": env.tx_id})
    return fx


HANDLERS = {
    "key.rotate": key_rotate,
    "note.anchor": note_anchor,
}
