"""A deterministic synthetic consortium workload (for tests and benchmarks).

Everything is derived from one seed: the genesis document, every signing key
(``SigningKey.from_seed(SHA-256(seed || name))``), the organisations' X25519
encryption keys, and a ``random.Random`` that picks what happens next. The same
seed and the same calls give byte-identical transactions.

No PHI: patients are pseudonymous ``pat-<32 hex>`` ids, links are salted
commitments of synthetic identifiers, records are commitments of nothing.

The generator keeps a *mirror* of the ledger state (a :class:`MirrorState` to
which it applies each transaction it emits with the real contract handlers), so

* every transaction it emits is valid when applied in the order emitted
  (signer active, sequence numbers consecutive per key, references existing);
* ``access.log`` entries carry the outcome that :func:`~medledger.contracts.access.decide`
  gives on the mirror at the transaction's time.

Usage::

    wl = Workload(seed=7, orgs=3)
    node = await Node.create(url, wl.genesis, signers=wl.signers)
    for tx in wl.setup_txs(): ...               # practitioners and patients
    for tx in wl.mixed(1000, mix={"record": .1, "consent": .1, "access": .8}): ...

The mirror assumes membership does not change behind its back: after removing an
organisation or suspending a practitioner (with :meth:`Workload.tx`), do not ask
:meth:`Workload.mixed` for more.

Every batch is stamped with ``time`` (default: :attr:`Workload.time`, which
callers may advance); it must be within the network's ``max_tx_skew_ms`` of the
block time of the block the transactions end up in.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left, insort
from collections.abc import Iterator, Mapping
from typing import Any

from medledger.contracts import core, make_registry
from medledger.contracts.access import CLINICAL_TYPES, ROLE_TYPES, AccessRequest, decide
from medledger.contracts.base import Env, get_obj
from medledger.crypto.kem import EncryptionKey
from medledger.crypto.signing import ALG_X25519, SigningKey
from medledger.encoding import encode
from medledger.ledger.tx import Transaction, make_tx
from medledger.state.base import scan_bounds
from medledger.state.overlay import Overlay

__all__ = ["DEFAULT_MIX", "GENESIS_TIME", "KINDS", "STAFF", "MirrorState", "Workload"]

GENESIS_TIME = 1_764_000_000_000

#: The default mix of :meth:`Workload.mixed`.
DEFAULT_MIX: dict[str, float] = {"record": 0.1, "consent": 0.1, "access": 0.8}

#: Every kind :meth:`Workload.mixed` understands.
KINDS = ("record", "consent", "access", "breakglass", "referral", "patient")

#: Practitioners registered per organisation by :meth:`Workload.setup_txs`: (suffix, roles).
STAFF: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("phys-1", ("physician",)),
    ("phys-2", ("physician", "emergency-clinician")),
    ("nurse-1", ("nurse",)),
    ("lab-1", ("lab",)),
    ("pharm-1", ("pharmacist",)),
    ("er-1", ("emergency-clinician",)),
    ("po-1", ("privacy-officer",)),
)

_RECORD_TYPES = (
    "Observation",
    "Observation",
    "DiagnosticReport",
    "Condition",
    "MedicationRequest",
    "AllergyIntolerance",
    "Encounter",
    "Immunization",
    "Procedure",
)
_PURPOSES = ("TREAT",) * 6 + ("ETREAT", "HRESCH", "CAREMGT")


class MirrorState:
    """A dict plus an incrementally maintained sorted key list.

    :class:`~medledger.state.base.MemoryState` re-sorts all keys after any insert,
    which makes a write-then-scan loop (every emitted transaction, then ``decide``)
    quadratic; here an insert is one ``insort``.
    """

    __slots__ = ("_data", "_keys")

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def scan(
        self, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        keys, data = self._keys, self._data
        low, high = scan_bounds(prefix, start)
        i = bisect_left(keys, low)
        end = len(keys) if high is None else bisect_left(keys, high, i)
        if limit is not None:
            end = min(end, i + limit)
        return iter([(k, data[k]) for k in keys[i:end]])

    def apply(self, changes: Mapping[bytes, bytes | None]) -> None:
        """Apply net changes: a ``bytes`` value is a put, ``None`` a delete."""
        data, keys = self._data, self._keys
        new = [k for k, v in changes.items() if v is not None and k not in data]
        if len(new) > 64:  # bulk load: one sort beats many inserts
            keys.extend(new)
            keys.sort()
        else:
            for k in new:
                insort(keys, k)
        for key, value in changes.items():
            if value is None:
                if data.pop(key, None) is not None:
                    del keys[bisect_left(keys, key)]
            else:
                data[key] = value

    def items(self) -> dict[bytes, bytes]:
        return dict(self._data)

    def __len__(self) -> int:
        return len(self._data)


class Workload:
    """A seeded consortium of ``orgs`` organisations and the transactions it emits."""

    def __init__(
        self,
        seed: int | str | bytes = 0,
        orgs: int = 3,
        *,
        patients_per_org: int = 20,
        network: str = "medledger-synthetic",
        genesis_time: int = GENESIS_TIME,
        policy: Mapping[str, Any] | None = None,
    ) -> None:
        if orgs < 1:
            raise ValueError("a consortium needs at least one organisation")
        self._seed = seed if isinstance(seed, bytes) else str(seed).encode()
        self.rng = random.Random(hashlib.sha256(b"workload/" + self._seed).digest())
        self.network = network
        self.patients_per_org = patients_per_org
        #: the time stamped on emitted transactions unless a call passes ``time``
        self.time = genesis_time + 1_000
        self.org_ids = [f"org-{i + 1:02d}" for i in range(orgs)]
        self.keys: dict[str, SigningKey] = {}
        self.seqs: dict[str, int] = {}
        doc_orgs, admins = [], []
        for org in self.org_ids:
            node = self.key(f"node:{org}")
            admin = self.key(f"admin-{org}")
            enc = EncryptionKey.from_bytes(ALG_X25519, self._derive(f"enc:{org}"))
            doc_orgs.append(
                {
                    "id": org,
                    "name": f"Synthetic Hospital {org[4:]}",
                    "node_key": node.public.raw,
                    "enc_key": enc.public.raw,
                    "enc_alg": ALG_X25519,
                }
            )
            admins.append({"id": f"admin-{org}", "org": org, "key": admin.public.raw})
        #: the genesis document for :meth:`medledger.node.Node.create`
        self.genesis: dict[str, Any] = {
            "network": network,
            "time": genesis_time,
            "orgs": doc_orgs,
            "admins": admins,
            "policy": dict(policy or {}),
        }
        #: ``(org, node key)`` pairs for :meth:`medledger.node.Node.create`
        self.signers: list[tuple[str, SigningKey]] = [
            (org, self.keys[f"node:{org}"]) for org in self.org_ids
        ]
        normalised = core.normalise_genesis(self.genesis)
        self.state = MirrorState()
        self.state.apply(dict(core.genesis_effects(normalised).writes))
        self.config: dict[str, Any] = get_obj(self.state, b"cfg/network")
        self.registry = make_registry(self.config)
        self.height = 0
        # what exists, for picking references (all lists in creation order)
        self.staff: dict[str, list[tuple[str, tuple[str, ...]]]] = {o: [] for o in self.org_ids}
        self.patients: dict[str, list[str]] = {o: [] for o in self.org_ids}
        self.records: dict[str, list[str]] = {}  # patient -> record ids
        #: record id -> (custodian org, patient, resource type, last version, last commitment)
        self.record_meta: dict[str, tuple[str, str, str, int, bytes]] = {}
        self.consents: dict[str, list[str]] = {}  # patient -> active consent ids
        self.open_declarations: list[tuple[str, str]] = []  # (declaration id, org)
        self.referrals: list[tuple[str, str, str]] = []  # (patient, referral id, referrer)
        self._record_ids: list[str] = []
        self._counter = 0

    # -- keys and signing ------------------------------------------------------------
    def _derive(self, name: str) -> bytes:
        return hashlib.sha256(self._seed + b"||" + name.encode()).digest()

    def key(self, name: str) -> SigningKey:
        """The deterministic signing key of principal ``name`` (created on first use)."""
        found = self.keys.get(name)
        if found is None:
            found = self.keys[name] = SigningKey.from_seed(self._derive(f"sign:{name}"))
        return found

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{self._counter:08d}"

    def forge(
        self, who: str, type_: str, payload: dict[str, Any], time: int | None = None
    ) -> Transaction:
        """Sign a transaction with ``who``'s next sequence number *without* consuming it.

        Nothing is applied to the mirror: this is for transactions that are meant
        to be rejected (negative tests).
        """
        seq = self.seqs.get(who, 0) + 1
        return make_tx(self.key(who), self.network, type_, payload, seq=seq, time=self._t(time))

    def tx(
        self, who: str, type_: str, payload: dict[str, Any], time: int | None = None
    ) -> Transaction:
        """Sign and emit one transaction; it is applied to the mirror at once.

        Raises the contract's error if the mirror rejects it (a workload bug, or
        a caller asking for something invalid): nothing is consumed then.
        """
        tx = self.forge(who, type_, payload, time)
        self._apply(tx)
        self.seqs[who] = tx.seq
        return tx

    def _t(self, time: int | None) -> int:
        return self.time if time is None else time

    def _apply(self, tx: Transaction) -> None:
        height = self.height + 1
        principal = core.check_signer(self.state, tx, height)
        handler = self.registry.handler(tx.type, height)
        env = Env(
            network=self.network,
            height=height,
            time=tx.time,
            tx_id=tx.tx_id,
            signer=tx.signer,
            principal=principal,
            config=self.config,
        )
        fx = handler(self.state, tx, env)
        overlay = Overlay(self.state)
        overlay.put(core.k_seq(tx.signer), encode(tx.seq))
        for k, v in fx.writes.items():
            if v is None:
                overlay.delete(k)
            else:
                overlay.put(k, v)
        self.state.apply(overlay.changes())
        self.height = height

    # -- setup -----------------------------------------------------------------------
    def setup_txs(self, time: int | None = None) -> list[Transaction]:
        """Register every org's staff (:data:`STAFF`) and ``patients_per_org`` patients each."""
        out: list[Transaction] = []
        for org in self.org_ids:
            for suffix, roles in STAFF:
                out.append(self.register_practitioner(org, f"{suffix}-{org}", roles, time))
        for _ in range(self.patients_per_org):
            for org in self.org_ids:
                out.append(self.register_patient(org, time))
        return out

    def register_practitioner(
        self, org: str, pid: str, roles: tuple[str, ...], time: int | None = None
    ) -> Transaction:
        tx = self.tx(
            f"admin-{org}",
            "principal.register",
            {
                "id": pid,
                "kind": "practitioner",
                "roles": list(roles),
                "pub": self.key(pid).public.raw,
            },
            time,
        )
        self.staff[org].append((pid, roles))
        return tx

    def register_patient(self, org: str, time: int | None = None) -> Transaction:
        pid = "pat-" + self.rng.getrandbits(128).to_bytes(16, "big").hex()
        local_id = f"MRN-{self.rng.getrandbits(40):012d}"  # synthetic, never on the ledger
        link = hashlib.sha256(self._derive(f"salt:{org}") + local_id.encode()).digest()
        tx = self.tx(
            f"node:{org}",
            "patient.register",
            {
                "id": pid,
                "links": [{"org": org, "commitment": link}],
                "pub": self.key(pid).public.raw,
            },
            time,
        )
        self.patients[org].append(pid)
        return tx

    # -- the mixed workload ------------------------------------------------------------
    def mixed(
        self, n: int, mix: Mapping[str, float] | None = None, time: int | None = None
    ) -> list[Transaction]:
        """``n`` transactions drawn from ``mix`` (kind -> weight; see :data:`KINDS`)."""
        weights = dict(DEFAULT_MIX if mix is None else mix)
        unknown = set(weights) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown workload kinds {sorted(unknown)}")
        kinds, cum = list(weights), []
        total = 0.0
        for k in kinds:
            total += weights[k]
            cum.append(total)
        makers = {
            "record": self.record_tx,
            "consent": self.consent_tx,
            "access": self.access_tx,
            "breakglass": self.breakglass_tx,
            "referral": self.referral_tx,
            "patient": lambda t: self.register_patient(self._org(), t),
        }
        out = []
        for _ in range(n):
            x = self.rng.random() * total
            kind = next(k for k, c in zip(kinds, cum, strict=True) if x < c)
            out.append(makers[kind](time))
        return out

    def _org(self) -> str:
        return self.rng.choice(self.org_ids)

    def _patient_of(self, org: str) -> str:
        return self.rng.choice(self.patients[org])

    def _any_patient(self) -> tuple[str, str]:
        org = self._org()
        return org, self._patient_of(org)

    def _staff_with(self, org: str, role: str) -> str:
        return self.rng.choice([p for p, roles in self.staff[org] if role in roles])

    def record_tx(self, time: int | None = None) -> Transaction:
        """A new record (90%) or an amendment of an existing one, by the custodian node."""
        org, patient = self._any_patient()
        mine = [r for r in self.records.get(patient, ()) if self.record_meta[r][0] == org]
        if mine and self.rng.random() < 0.1:
            rid = self.rng.choice(mine)
            _, _, rtype, version, prev = self.record_meta[rid]
            version += 1
        else:
            rid, rtype, version, prev = self._next_id("rec"), self.rng.choice(_RECORD_TYPES), 1, b""
        commitment = hashlib.sha256(self._derive(f"content:{rid}/{version}")).digest()
        payload: dict[str, Any] = {
            "record": rid,
            "patient": patient,
            "resource_type": rtype,
            "commitment": commitment,
            "version": version,
            "prev": prev or None,
            "effective": self._t(time) - self.rng.randrange(0, 400 * 86_400_000),
        }
        if rtype in ("Observation", "DiagnosticReport"):
            payload["category"] = "laboratory"
        tx = self.tx(f"node:{org}", "record.register", payload, time)
        if version == 1:
            self.records.setdefault(patient, []).append(rid)
            self._record_ids.append(rid)
        self.record_meta[rid] = (org, patient, rtype, version, commitment)
        return tx

    def _provision(self, depth: int = 1) -> dict[str, Any]:
        rng = self.rng
        prov: dict[str, Any] = {"type": "permit" if depth == 1 or rng.random() < 0.4 else "deny"}
        r = rng.random()
        if r < 0.3:
            prov["actors"] = [{"kind": "org", "id": self._org()}]
        elif r < 0.45:
            prov["actors"] = [{"kind": "role", "id": rng.choice(("physician", "nurse", "lab"))}]
        elif r < 0.5:
            prov["actors"] = [{"kind": "referred"}]
        if rng.random() < 0.5:
            prov["purposes"] = sorted(rng.sample(("TREAT", "ETREAT", "HRESCH", "CAREMGT"), 2))
        if rng.random() < 0.4:
            prov["resource_types"] = sorted(rng.sample(_RECORD_TYPES[1:], 3))
        if rng.random() < 0.1:
            prov["data_period"] = [self.time - 365 * 86_400_000, None]
        if depth < 3 and rng.random() < 0.5:
            prov["provisions"] = [self._provision(depth + 1) for _ in range(rng.randint(1, 2))]
        return prov

    def consent_tx(self, time: int | None = None) -> Transaction:
        """A patient grants a consent with nested provisions (80%) or revokes one."""
        _, patient = self._any_patient()
        active = self.consents.setdefault(patient, [])
        if active and self.rng.random() < 0.2:
            cid = active.pop(self.rng.randrange(len(active)))
            return self.tx(patient, "consent.revoke", {"id": cid}, time)
        cid = self._next_id("cns")
        consent: dict[str, Any] = {
            "id": cid,
            "patient": patient,
            "policy": "opt-in",
            "provision": self._provision(),
        }
        if self.rng.random() < 0.3:
            now = self._t(time)
            consent["period"] = [now - 86_400_000, now + 365 * 86_400_000]
        tx = self.tx(patient, "consent.grant", {"consent": consent}, time)
        active.append(cid)
        return tx

    def access_tx(self, time: int | None = None) -> Transaction:
        """An ``access.log`` by a serving org's node, with the decision ``decide`` gives."""
        rng = self.rng
        org = self._org()
        actor, roles = rng.choice([s for s in self.staff[org] if "privacy-officer" not in s[1]])
        _, patient = self._any_patient()
        now = self._t(time)
        purpose = rng.choice(_PURPOSES)
        break_glass = purpose == "ETREAT" and "emergency-clinician" in roles and rng.random() < 0.5
        records = self.records.get(patient, [])
        record = rng.choice(records) if records and rng.random() < 0.5 else None
        allowed = sorted({t for r in roles for t in ROLE_TYPES[r]} & CLINICAL_TYPES)
        if record is not None:
            types: tuple[str, ...] = (self.record_meta[record][2],)
        else:
            types = tuple(sorted(rng.sample(allowed, min(len(allowed), rng.randint(1, 3)))))
        decision = decide(
            self.state,
            AccessRequest(
                actor=actor,
                org=org,
                patient=patient,
                resource_types=types,
                purpose=purpose,
                time=now,
                break_glass=break_glass,
                record=record,
            ),
        )
        payload = {
            "request": self._next_id("req"),
            "actor": actor,
            "org": org,
            "role": sorted(roles)[0],
            "on_behalf": None,
            "patient": patient,
            "resource_types": list(decision.permitted_types or types),
            "records": [record] if record is not None else [],
            "purpose": purpose,
            "action": "access",
            "outcome": "permit" if decision.permit else "deny",
            "consents": list(decision.consents),
            "rule": decision.rule,
            "break_glass": decision.break_glass,
            "time": now,
        }
        return self.tx(f"node:{org}", "access.log", payload, time)

    def breakglass_tx(self, time: int | None = None) -> Transaction:
        """Review an open declaration (40%, by a privacy officer) or declare a new one."""
        rng = self.rng
        if self.open_declarations and rng.random() < 0.4:
            bid, org = self.open_declarations.pop(0)
            officer = self._staff_with(org, "privacy-officer")
            outcome = rng.choice(("justified", "justified", "unjustified"))
            return self.tx(
                officer, "breakglass.review", {"id": bid, "outcome": outcome, "note": ""}, time
            )
        org, patient = self._org(), self._any_patient()[1]
        clinician = self._staff_with(org, "emergency-clinician")
        payload: dict[str, Any] = {"patient": patient, "reason": "unresponsive on arrival"}
        if rng.random() < 0.5:
            signer = clinician
        else:
            signer, payload["actor"] = f"node:{org}", clinician
        if rng.random() < 0.5:
            payload["resource_types"] = ["AllergyIntolerance", "MedicationStatement"]
        tx = self.tx(signer, "breakglass.declare", payload, time)
        self.open_declarations.append((tx.tx_id.hex(), org))
        return tx

    def referral_tx(self, time: int | None = None) -> Transaction:
        """A practitioner of a custodian org refers (75%) or cancels an earlier referral."""
        rng = self.rng
        if self.referrals and rng.random() < 0.25:
            patient, rid, referrer = self.referrals.pop(rng.randrange(len(self.referrals)))
            return self.tx(referrer, "referral.cancel", {"patient": patient, "id": rid}, time)
        if not self.record_meta:
            return self.record_tx(time)
        rid = rng.choice(self._record_ids)
        org, patient = self.record_meta[rid][:2]
        referrer = self._staff_with(org, "physician")
        others = [o for o in self.org_ids if o != org] or [org]
        target = rng.choice(others)
        to = (
            {"kind": "org", "id": target}
            if rng.random() < 0.5
            else {"kind": "practitioner", "id": self._staff_with(target, "physician")}
        )
        now = self._t(time)
        payload = {
            "patient": patient,
            "to": to,
            "resource_types": sorted(rng.sample(_RECORD_TYPES[1:], 2)),
            "period": [now - 1, now + 30 * 86_400_000],
        }
        tx = self.tx(referrer, "referral.create", payload, time)
        self.referrals.append((patient, tx.tx_id.hex(), referrer))
        return tx
